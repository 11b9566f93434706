//! The new root: a tmpfs that exists only inside the session's mount namespace, holding
//! read-only binds of system paths, a fresh `/proc`, a minimal `/dev`, private tmpfs mounts for
//! the profile, `/tmp` and `/dev/shm`, and the spec's files.
//!
//! Like bubblewrap, the launcher first mounts a staging tmpfs over `/tmp` and `pivot_root`s
//! into it with the host root below at `/oldroot`; that uncovers the host's `/tmp` again (the
//! staging tmpfs moved to `/`) so any host path can be bound from `/oldroot`. The final root is
//! built at `/newroot`, the host root is detached, and a second `pivot_root` makes `/newroot`
//! the root. Nothing of the session touches the host disk, and everything disappears with the
//! mount namespace. `pivot_root` (not `chroot`) is what lets Chromium nest its own user
//! namespaces.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{chdir, pivot_root};

use crate::error::{Cause, Error};
use crate::spec::Spec;

/// Host directory the staging tmpfs covers inside the private mount namespace.
const STAGING: &str = "/tmp";
/// Where the host root sits between the two pivots.
const OLD: &str = "/oldroot";
/// Where the final root is assembled between the two pivots.
const NEW: &str = "/newroot";

/// Device nodes bound from the host's `/dev`.
pub(crate) const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

const NONE: Option<&str> = None;

/// Flags for a bind remount of a mount whose current flags are `source`: the kernel locks
/// nosuid, nodev, noexec, read-only and the atime mode of mounts that came from a more
/// privileged namespace, and refuses a remount that would clear them (EPERM), so they are
/// carried over. `extra` adds restrictions (`MS_RDONLY`, `MS_NOSUID`, ...).
pub fn remount_flags(source: FsFlags, extra: MsFlags) -> MsFlags {
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | extra;
    let carried = [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ];
    for (st, ms) in carried {
        if source.contains(st) {
            flags |= ms;
        }
    }
    // Without an atime flag the kernel would default the remount to relatime, which differs
    // from a locked strictatime source.
    if !source.intersects(FsFlags::ST_NOATIME | FsFlags::ST_RELATIME) {
        flags |= MsFlags::MS_STRICTATIME;
    }
    flags
}

/// Undoes the octal escapes (`\040` for space, ...) of a `/proc/PID/mountinfo` path field.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points strictly below `dir` listed in a `/proc/PID/mountinfo` text, in mount order,
/// without duplicates. A recursive bind brings these along read-write; each needs its own
/// read-only remount.
pub fn mount_points_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for line in mountinfo.lines() {
        let Some(field) = line.split(' ').nth(4) else {
            continue;
        };
        let point = PathBuf::from(unescape_mountinfo(field));
        if point != dir && point.starts_with(dir) && !found.contains(&point) {
            found.push(point);
        }
    }
    found
}

fn inside(root: &str, path: &Path) -> PathBuf {
    Path::new(root).join(path.strip_prefix("/").unwrap_or(path))
}

fn mount_tmpfs(target: &Path, flags: MsFlags, options: &str, shown: &Path) -> Result<(), Error> {
    mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(options)).map_err(|e| {
        Error::MountTmpfs {
            path: shown.to_path_buf(),
            cause: e.into(),
        }
    })
}

fn create_dir(path: &Path, shown: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(|e| Error::CreatePath {
        path: shown.to_path_buf(),
        cause: e.into(),
    })
}

fn create_file(path: &Path, shown: &Path) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        create_dir(parent, shown)?;
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map(drop)
        .map_err(|e| Error::CreatePath {
            path: shown.to_path_buf(),
            cause: e.into(),
        })
}

/// Remounts the mount at `path` with its locked flags plus `extra`.
fn remount(path: &Path, extra: MsFlags, shown: &Path) -> Result<(), Error> {
    let fail = |cause: Cause| Error::RemountReadOnly {
        path: shown.to_path_buf(),
        cause,
    };
    let current = statvfs(path).map_err(|e| fail(e.into()))?;
    mount(
        NONE,
        path,
        NONE,
        remount_flags(current.flags(), extra),
        NONE,
    )
    .map_err(|e| fail(e.into()))
}

/// Binds host `path` (seen at `/oldroot/path`) read-only at the same place in the new root,
/// including its submounts. A host symlink is recreated as the same symlink instead.
fn bind_read_only(path: &Path) -> Result<(), Error> {
    let src = inside(OLD, path);
    let dst = inside(NEW, path);
    let bind_err = |cause: Cause| Error::BindMount {
        path: path.to_path_buf(),
        cause,
    };
    let meta = fs::symlink_metadata(&src).map_err(|e| bind_err(e.into()))?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(&src).map_err(|e| bind_err(e.into()))?;
        if let Some(parent) = dst.parent() {
            create_dir(parent, path)?;
        }
        return symlink(&target, &dst).map_err(|e| Error::CreatePath {
            path: path.to_path_buf(),
            cause: e.into(),
        });
    }
    if meta.is_dir() {
        create_dir(&dst, path)?;
    } else {
        create_file(&dst, path)?;
    }
    mount(
        Some(&src),
        &dst,
        NONE,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        NONE,
    )
    .map_err(|e| bind_err(e.into()))?;
    let hardening = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    remount(&dst, hardening, path)?;
    let mountinfo = fs::read_to_string(inside(OLD, Path::new("/proc/self/mountinfo")))
        .map_err(|e| bind_err(e.into()))?;
    for sub in mount_points_under(&mountinfo, &dst) {
        let shown = Path::new("/").join(sub.strip_prefix(NEW).unwrap_or(&sub));
        remount(&sub, hardening, &shown)?;
    }
    Ok(())
}

fn build_dev() -> Result<(), Error> {
    let dev = inside(NEW, Path::new("/dev"));
    create_dir(&dev, Path::new("/dev"))?;
    mount_tmpfs(
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755",
        Path::new("/dev"),
    )?;
    for name in DEVICES {
        let shown = Path::new("/dev").join(name);
        let dst = dev.join(name);
        let fail = |cause: Cause| Error::CreateDevice {
            path: shown.clone(),
            cause,
        };
        create_file(&dst, &shown)?;
        mount(
            Some(&inside(OLD, &shown)),
            &dst,
            NONE,
            MsFlags::MS_BIND,
            NONE,
        )
        .map_err(|e| fail(e.into()))?;
        // Device nodes must stay usable (no nodev) and writable (null, full).
        remount(&dst, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, &shown)?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(link)).map_err(|e| Error::CreatePath {
            path: Path::new("/dev").join(link),
            cause: e.into(),
        })?;
    }
    let shm = dev.join("shm");
    create_dir(&shm, Path::new("/dev/shm"))?;
    mount_tmpfs(
        &shm,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "mode=1777",
        Path::new("/dev/shm"),
    )
}

fn write_spec_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let dst = inside(NEW, path);
    let fail = |cause: Cause| Error::WriteFile {
        path: path.to_path_buf(),
        cause,
    };
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).map_err(|e| fail(e.into()))?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&dst)
        .map_err(|e| fail(e.into()))?;
    file.write_all(contents).map_err(|e| fail(e.into()))?;
    // The umask must not decide the final mode.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| fail(e.into()))
}

fn private_tmpfs(path: &Path, mode: &str) -> Result<(), Error> {
    let dst = inside(NEW, path);
    create_dir(&dst, path)?;
    mount_tmpfs(
        &dst,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        mode,
        path,
    )
}

/// Builds the new root and switches into it. Runs in the session's init (pid 1), inside the
/// new user and mount namespaces, with full capabilities there.
pub(crate) fn build(spec: &Spec) -> Result<(), Error> {
    // Nothing done below may propagate back to the host's mounts.
    mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE)
        .map_err(|e| Error::MakeRootPrivate(e.into()))?;

    mount_tmpfs(
        Path::new(STAGING),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755",
        Path::new(STAGING),
    )?;
    for dir in [OLD, NEW] {
        create_dir(&inside(STAGING, Path::new(dir)), Path::new(dir))?;
    }
    chdir(STAGING).map_err(|e| Error::PivotRoot(e.into()))?;
    pivot_root(".", &inside(".", Path::new(OLD))).map_err(|e| Error::PivotRoot(e.into()))?;
    chdir("/").map_err(|e| Error::PivotRoot(e.into()))?;

    mount_tmpfs(
        Path::new(NEW),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755",
        Path::new("/"),
    )?;

    // Parents first, so a nested bind lands on its parent's bind.
    let mut binds = spec.ro_binds.clone();
    binds.sort_by_key(|p| p.components().count());
    for path in &binds {
        bind_read_only(path)?;
    }
    for (link, target) in &spec.symlinks {
        let dst = inside(NEW, link);
        if let Some(parent) = dst.parent() {
            create_dir(parent, link)?;
        }
        symlink(target, &dst).map_err(|e| Error::CreatePath {
            path: link.clone(),
            cause: e.into(),
        })?;
    }

    let proc_dir = inside(NEW, Path::new("/proc"));
    create_dir(&proc_dir, Path::new("/proc"))?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        NONE,
    )
    .map_err(|e| Error::MountProc(e.into()))?;

    build_dev()?;
    private_tmpfs(Path::new("/tmp"), "mode=1777")?;
    private_tmpfs(&spec.profile_dir, "mode=0700")?;
    for dir in &spec.extra_writable {
        private_tmpfs(dir, "mode=0700")?;
    }
    for file in &spec.files {
        write_spec_file(&file.path, &file.contents, file.mode)?;
    }
    remount(
        &inside(NEW, Path::new("/dev")),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Path::new("/dev"),
    )?;

    umount2(OLD, MntFlags::MNT_DETACH).map_err(|e| Error::DetachOldRoot(e.into()))?;
    chdir(NEW).map_err(|e| Error::PivotRoot(e.into()))?;
    // pivot_root(".", ".") stacks the staging root on top of the new one; detaching "." then
    // drops it, so no path leads back to the staging tmpfs.
    pivot_root(".", ".").map_err(|e| Error::PivotRoot(e.into()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| Error::DetachOldRoot(e.into()))?;
    chdir("/").map_err(|e| Error::PivotRoot(e.into()))?;
    remount(
        Path::new("/"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Path::new("/"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_flags_are_carried_into_the_remount() {
        let source = FsFlags::ST_NOSUID | FsFlags::ST_NODEV | FsFlags::ST_RELATIME;
        let flags = remount_flags(source, MsFlags::MS_RDONLY);
        for wanted in [
            MsFlags::MS_REMOUNT,
            MsFlags::MS_BIND,
            MsFlags::MS_RDONLY,
            MsFlags::MS_NOSUID,
            MsFlags::MS_NODEV,
            MsFlags::MS_RELATIME,
        ] {
            assert!(flags.contains(wanted), "{wanted:?} missing from {flags:?}");
        }
        assert!(!flags.contains(MsFlags::MS_NOEXEC));
        assert!(!flags.contains(MsFlags::MS_STRICTATIME));
    }

    #[test]
    fn noexec_and_noatime_sources_stay_so() {
        let flags = remount_flags(FsFlags::ST_NOEXEC | FsFlags::ST_NOATIME, MsFlags::empty());
        assert!(flags.contains(MsFlags::MS_NOEXEC | MsFlags::MS_NOATIME));
        assert!(!flags.contains(MsFlags::MS_STRICTATIME));
    }

    #[test]
    fn strictatime_sources_are_remounted_strictatime() {
        let flags = remount_flags(FsFlags::empty(), MsFlags::MS_RDONLY);
        assert!(flags.contains(MsFlags::MS_STRICTATIME));
    }

    #[test]
    fn submounts_are_found_and_unescaped() {
        let info = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
60 27 0:50 / /newroot/usr ro,nosuid - ext4 /dev/vda rw
61 60 0:51 / /newroot/usr/share/my\\040fonts rw - tmpfs tmpfs rw
62 60 0:52 / /newroot/usr/lib rw - tmpfs tmpfs rw
63 60 0:53 / /newroot/usr/lib rw - tmpfs tmpfs rw
64 27 0:54 / /newroot/usrlocal rw - tmpfs tmpfs rw
";
        let found = mount_points_under(info, Path::new("/newroot/usr"));
        assert_eq!(
            found,
            vec![
                PathBuf::from("/newroot/usr/share/my fonts"),
                PathBuf::from("/newroot/usr/lib"),
            ]
        );
    }

    #[test]
    fn unescape_leaves_plain_and_malformed_text_alone() {
        assert_eq!(unescape_mountinfo("/a\\134b"), "/a\\b");
        assert_eq!(unescape_mountinfo("/a\\9b"), "/a\\9b");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }
}
