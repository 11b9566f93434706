//! Namespaces: which `CLONE_NEW*` flag carries which layer, reading namespace ids, probing
//! what the host allows, and finding every process of a session from the host.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::stat::fstat;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

use crate::error::Error;
use crate::idmap;
use crate::spec::{Layer, NsIds};

/// The namespace layers and their clone flags, user namespace first.
pub(crate) const NS_LAYERS: [(Layer, CloneFlags); 6] = [
    (Layer::UserNs, CloneFlags::CLONE_NEWUSER),
    (Layer::PidNs, CloneFlags::CLONE_NEWPID),
    (Layer::NetNs, CloneFlags::CLONE_NEWNET),
    (Layer::MountNs, CloneFlags::CLONE_NEWNS),
    (Layer::IpcNs, CloneFlags::CLONE_NEWIPC),
    (Layer::UtsNs, CloneFlags::CLONE_NEWUTS),
];

/// Human-readable list of the namespaces in `flags`, for error messages.
pub(crate) fn describe(flags: CloneFlags) -> String {
    NS_LAYERS
        .iter()
        .filter(|(_, f)| flags.contains(*f))
        .map(|(layer, _)| layer.name())
        .collect::<Vec<_>>()
        .join("|")
}

/// Inode of a `/proc/.../ns/...` link.
pub(crate) fn ns_inode(path: &Path) -> Result<u64, Error> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|e| Error::ReadNamespace {
            path: path.to_path_buf(),
            cause: e.into(),
        })
}

/// Namespace ids of the calling process after `unshare`, read through `ns_dir` (its
/// `/proc/self/ns`, opened before the init pivots the shared mount namespace away). The pid
/// namespace is the one its children are born into, readable only once the first child
/// exists.
pub(crate) fn own_ids_for_children(ns_dir: &std::fs::File) -> Result<NsIds, Error> {
    let inode = |name: &str| {
        nix::sys::stat::fstatat(ns_dir, name, nix::fcntl::AtFlags::empty())
            .map(|st| st.st_ino)
            .map_err(|e| Error::ReadNamespace {
                path: Path::new("/proc/self/ns").join(name),
                cause: e.into(),
            })
    };
    Ok(NsIds {
        user: inode("user")?,
        pid: inode("pid_for_children")?,
        net: inode("net")?,
        mnt: inode("mnt")?,
    })
}

/// Runs `unshare(CLONE_NEWUSER | flags)` in a throw-away child and reports what the kernel
/// said. Only for the single-threaded launcher: `fork` in a threaded process may deadlock.
pub(crate) fn try_unshare_in_child(flags: CloneFlags) -> Result<(), Errno> {
    // SAFETY: the launcher process is single-threaded (a fresh exec of our binary that never
    // starts threads), so the child may run arbitrary code; it only calls unshare and _exit.
    match unsafe { fork() }? {
        ForkResult::Child => {
            let code = match nix::sched::unshare(CloneFlags::CLONE_NEWUSER | flags) {
                Ok(()) => 0,
                Err(errno) => errno as i32,
            };
            // SAFETY: _exit is always safe; it skips destructors on purpose (forked copy).
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, 0)) => return Ok(()),
                Ok(WaitStatus::Exited(_, code)) => return Err(Errno::from_raw(code)),
                Ok(_) => return Err(Errno::ECHILD),
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(errno),
            }
        },
    }
}

/// How many user namespaces can be nested below the caller (up to `max`). Chromium's own
/// sandbox needs two levels below the session's. Single-threaded launcher only.
pub(crate) fn userns_depth(max: u32) -> Result<u32, Errno> {
    // SAFETY: single-threaded launcher, see try_unshare_in_child.
    match unsafe { fork() }? {
        ForkResult::Child => {
            let mut depth = 0u32;
            while depth < max {
                let uid = nix::unistd::geteuid().as_raw();
                let gid = nix::unistd::getegid().as_raw();
                if nix::sched::unshare(CloneFlags::CLONE_NEWUSER).is_err()
                    || idmap::write_self_maps(uid, uid, gid, gid).is_err()
                {
                    break;
                }
                depth += 1;
            }
            // SAFETY: see try_unshare_in_child.
            unsafe { libc::_exit(depth as i32) }
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code as u32),
                Ok(_) => return Err(Errno::ECHILD),
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(errno),
            }
        },
    }
}

/// Whether the namespace open at `fd`, or one of its ancestors, has inode `target`. Chromium
/// nests its own user and pid namespaces below ours, so equality alone would miss renderers.
fn descends_from(fd: OwnedFd, target: u64) -> bool {
    depth_below(fd, target).is_some()
}

/// How many levels below the namespace with inode `target` the namespace open at `fd` is:
/// `Some(0)` for that namespace itself, `None` when it is not at or below it.
pub(crate) fn depth_below(fd: OwnedFd, target: u64) -> Option<u32> {
    let mut fd = fd;
    // The kernel allows 32 levels of nesting; the bound only guards against surprises.
    for depth in 0..40 {
        match fstat(&fd) {
            Ok(st) if st.st_ino == target => return Some(depth),
            Ok(_) => {}
            Err(_) => return None,
        }
        fd = ns_ioctl(&fd, libc::NS_GET_PARENT)?;
    }
    None
}

/// `NS_GET_PARENT` (the parent of a user or pid namespace) or `NS_GET_USERNS` (the user
/// namespace owning any namespace) on a namespace fd: the new fd, or `None` at the top of
/// what the caller may see.
pub(crate) fn ns_ioctl(fd: &OwnedFd, request: libc::Ioctl) -> Option<OwnedFd> {
    // SAFETY: both requests take no argument and return a new fd or -1; `fd` is a valid
    // namespace fd borrowed for the call.
    let got = unsafe { libc::ioctl(fd.as_raw_fd(), request) };
    if got < 0 {
        return None;
    }
    // SAFETY: the ioctl just returned this fd to us; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(got) })
}

pub(crate) fn open_ns(pid_dir: &Path, kind: &str) -> Option<OwnedFd> {
    fs::File::open(pid_dir.join("ns").join(kind))
        .ok()
        .map(OwnedFd::from)
}

/// Whether the process at `/proc/<pid>` belongs to the session with namespaces `ns`.
fn belongs(pid_dir: &Path, ns: &NsIds) -> bool {
    if open_ns(pid_dir, "pid").is_some_and(|fd| descends_from(fd, ns.pid)) {
        return true;
    }
    open_ns(pid_dir, "user").is_some_and(|fd| descends_from(fd, ns.user))
}

/// Every live host pid whose pid or user namespace is the session's (or nested below it).
/// Every process of a session is in its user namespace or one nested below (none can leave
/// it for an ancestor), so this finds them all. Mount and network namespaces are not
/// compared: their ids are only meaningful while they exist, and the caller keeps only the
/// user and pid namespaces alive (the handle's pins) until its check is done, so a newer
/// session that got a freed id is never mistaken for this one. Empty means the session is
/// gone.
/// Zombies are not counted: they run nothing and hold no namespace but their credentials
/// (the launcher stays one until its parent reaps it). Processes the caller may not inspect
/// (other users, without root) are not seen.
pub fn processes_in(ns: &NsIds) -> Vec<i32> {
    let mut pids: Vec<i32> = other_pids()
        .filter(|&pid| {
            let dir = PathBuf::from(format!("/proc/{pid}"));
            belongs(&dir, ns) && !crate::posture::stat_of(pid).is_ok_and(|s| s.is_gone())
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Every pid in `/proc` but the caller's own.
pub(crate) fn other_pids() -> impl Iterator<Item = i32> {
    let own = std::process::id() as i32;
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(move |&pid| pid != own)
}

/// Namespace ids of any host process, for posture checks and tests.
pub fn ns_ids_of(pid: i32) -> Result<NsIds, Error> {
    let dir = PathBuf::from(format!("/proc/{pid}/ns"));
    Ok(NsIds {
        user: ns_inode(&dir.join("user"))?,
        pid: ns_inode(&dir.join("pid"))?,
        net: ns_inode(&dir.join("net"))?,
        mnt: ns_inode(&dir.join("mnt"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_each_namespace() {
        let flags = CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET;
        assert_eq!(describe(flags), "user_ns|net_ns");
    }

    #[test]
    fn own_namespaces_are_found_by_their_ids() {
        let me = std::process::id() as i32;
        let ns = ns_ids_of(me).unwrap();
        // The scan skips the caller itself, so look for a child sharing every namespace.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let found = processes_in(&ns);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found.contains(&(child.id() as i32)), "{found:?}");
    }

    #[test]
    fn unknown_namespaces_match_nothing() {
        let ns = NsIds {
            user: 1,
            pid: 2,
            net: 3,
            mnt: 4,
        };
        assert!(processes_in(&ns).is_empty());
    }
}
