//! One error variant per isolation step, so an operator reading a failure knows which layer
//! broke. Errors cross the process boundary (the launcher reports them over its status socket as
//! JSON), so every variant is plain data.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::Layer;

/// What the kernel (or the I/O layer) said when a step failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    /// The `errno` value, when the failure came from a system call.
    pub errno: Option<i32>,
    /// Human-readable description.
    pub detail: String,
}

impl Cause {
    /// A cause that is not an `errno` (a protocol or validation problem).
    pub fn msg(detail: impl Into<String>) -> Self {
        Cause {
            errno: None,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errno {
            Some(errno) => write!(
                f,
                "{} ({})",
                self.detail,
                nix::errno::Errno::from_raw(errno)
            ),
            None => f.write_str(&self.detail),
        }
    }
}

impl From<nix::errno::Errno> for Cause {
    fn from(errno: nix::errno::Errno) -> Self {
        Cause {
            errno: Some(errno as i32),
            detail: errno.desc().to_string(),
        }
    }
}

impl From<std::io::Error> for Cause {
    fn from(err: std::io::Error) -> Self {
        match err.raw_os_error() {
            Some(errno) => Cause {
                errno: Some(errno),
                detail: nix::errno::Errno::from_raw(errno).desc().to_string(),
            },
            None => Cause::msg(err.to_string()),
        }
    }
}

/// A failed sandbox step. The variant names the step; the text says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The spec itself is unusable; nothing was started.
    #[error("spec.{field}: {reason}")]
    InvalidSpec {
        /// The field at fault.
        field: String,
        /// Why it is refused.
        reason: String,
    },
    /// The host cannot provide a layer the spec did not accept as degraded.
    #[error(
        "isolation layer `{layer}` is not available on this host: {reason}. Fix the host \
         (`chaperone doctor` lists every layer), or list `{layer}` in accept_degraded"
    )]
    LayerUnavailable {
        /// The missing layer.
        layer: Layer,
        /// What the host said.
        reason: String,
    },
    /// The launcher process could not be started.
    #[error(
        "starting the sandbox launcher (/proc/self/exe) failed: {0}. The binary must call \
         chaperone_sandbox::run_launcher_if_requested() first thing in main()"
    )]
    SpawnLauncher(Cause),
    /// Handing the spec to the launcher failed.
    #[error("sending the spec to the sandbox launcher failed: {0}")]
    SendSpec(Cause),
    /// Reading the launcher's status socket failed.
    #[error("reading the sandbox launcher's status failed: {0}")]
    ReadStatus(Cause),
    /// The launcher said something this version does not understand.
    #[error("sandbox launcher protocol error: {0}")]
    Protocol(String),
    /// The launcher ended without reporting success or a failed step.
    #[error(
        "the sandbox launcher ended before the program was started ({0}); its stderr says why"
    )]
    LauncherExited(String),
    /// The launcher did not finish in time and was killed.
    #[error("the sandbox launcher did not finish within {secs} s and was killed; is the host overloaded?")]
    Timeout {
        /// The time limit.
        secs: u64,
    },
    /// The launcher could not read its spec.
    #[error("launcher: reading the spec failed: {0}")]
    ReadSpec(Cause),
    /// Creating a session cgroup failed.
    #[error("cgroup: creating {path} failed: {cause}. Run as root or delegate the cgroup tree, or accept_degraded `cgroup`")]
    CgroupCreate {
        /// The cgroup directory.
        path: PathBuf,
        /// What the kernel said.
        cause: Cause,
    },
    /// Writing a cgroup limit failed.
    #[error("cgroup: writing the limit {path} failed: {cause}")]
    CgroupLimit {
        /// The limit file.
        path: PathBuf,
        /// What the kernel said.
        cause: Cause,
    },
    /// Moving the launcher into its cgroup failed.
    #[error("cgroup: moving the launcher into {path} failed: {cause}")]
    CgroupJoin {
        /// The cgroup directory.
        path: PathBuf,
        /// What the kernel said.
        cause: Cause,
    },
    /// Clearing supplementary groups failed.
    #[error("setgroups([]) before switching to the session's host ids failed: {0}")]
    SetGroups(Cause),
    /// Switching to the session's host gid failed.
    #[error("setresgid({gid}) failed: {cause}")]
    SetGid {
        /// The session's host gid.
        gid: u32,
        /// What the kernel said.
        cause: Cause,
    },
    /// Switching to the session's host uid failed.
    #[error("setresuid({uid}) failed: {cause}")]
    SetUid {
        /// The session's host uid.
        uid: u32,
        /// What the kernel said.
        cause: Cause,
    },
    /// Marking the launcher dumpable again after the uid switch failed (without it the
    /// launcher cannot open its own `/proc/self/uid_map`).
    #[error("prctl(PR_SET_DUMPABLE) after switching to the session's host ids failed: {0}")]
    SetDumpable(Cause),
    /// Arming the parent-death signal failed, or the parent was already gone.
    #[error("arming the parent-death signal failed: {0}")]
    ParentDeathSignal(Cause),
    /// `unshare` of the namespaces failed.
    #[error("unshare({namespaces}) failed: {cause}. Check kernel.unprivileged_userns_clone, user.max_user_namespaces and AppArmor's userns restriction")]
    Unshare {
        /// Which namespaces were requested.
        namespaces: String,
        /// What the kernel said.
        cause: Cause,
    },
    /// Writing `/proc/self/setgroups` failed.
    #[error("writing /proc/self/setgroups (deny) failed: {0}")]
    WriteSetgroups(Cause),
    /// Writing `/proc/self/gid_map` failed.
    #[error("writing /proc/self/gid_map failed: {0}")]
    WriteGidMap(Cause),
    /// Writing `/proc/self/uid_map` failed.
    #[error("writing /proc/self/uid_map failed: {0}")]
    WriteUidMap(Cause),
    /// Reading a namespace inode failed.
    #[error("reading namespace id {path} failed: {cause}")]
    ReadNamespace {
        /// The `/proc/.../ns/...` link.
        path: PathBuf,
        /// What the kernel said.
        cause: Cause,
    },
    /// Creating the CDP pipes or the lifeline pipe failed.
    #[error("creating a pipe failed: {0}")]
    CreatePipe(Cause),
    /// `fork` failed.
    #[error("fork of the {what} failed: {cause}")]
    Fork {
        /// Which process was being created.
        what: String,
        /// What the kernel said.
        cause: Cause,
    },
    /// Making the mount tree private failed.
    #[error("making / rprivate in the new mount namespace failed: {0}")]
    MakeRootPrivate(Cause),
    /// Mounting a tmpfs failed.
    #[error("mounting a tmpfs on {path} failed: {cause}")]
    MountTmpfs {
        /// Where (inside the sandbox, or the staging path).
        path: PathBuf,
        /// What the kernel said.
        cause: Cause,
    },
    /// `pivot_root` failed.
    #[error("pivot_root failed: {0}")]
    PivotRoot(Cause),
    /// A read-only bind mount failed.
    #[error("bind-mounting {path} failed: {cause}. Does it exist on the host?")]
    BindMount {
        /// The host path.
        path: PathBuf,
        /// What the kernel said.
        cause: Cause,
    },
    /// Remounting a bind mount read-only failed.
    #[error("remounting {path} read-only failed: {cause}")]
    RemountReadOnly {
        /// The path inside the sandbox.
        path: PathBuf,
        /// What the kernel said.
        cause: Cause,
    },
    /// Mounting a fresh `/proc` failed.
    #[error("mounting a fresh /proc failed: {0}. The host's /proc must be fully visible (no over-mounts)")]
    MountProc(Cause),
    /// Creating a `/dev` node failed.
    #[error("creating the device {path} failed: {cause}")]
    CreateDevice {
        /// The device inside the sandbox.
        path: PathBuf,
        /// What the kernel said.
        cause: Cause,
    },
    /// Creating a directory or symlink of the new root failed.
    #[error("creating {path} in the new root failed: {cause}")]
    CreatePath {
        /// The path inside the sandbox.
        path: PathBuf,
        /// What the kernel said.
        cause: Cause,
    },
    /// Writing a spec file into the new root failed.
    #[error("writing spec file {path} failed: {cause}")]
    WriteFile {
        /// The path inside the sandbox.
        path: PathBuf,
        /// What the kernel said.
        cause: Cause,
    },
    /// Detaching the host's root failed.
    #[error("detaching the old root failed: {0}")]
    DetachOldRoot(Cause),
    /// `sethostname` failed.
    #[error("sethostname failed: {0}")]
    SetHostname(Cause),
    /// Bringing `lo` up failed.
    #[error("bringing up lo in the new network namespace failed: {0}")]
    LoopbackUp(Cause),
    /// Creating the proxy listener inside the namespace failed.
    #[error("creating the proxy listener on 127.0.0.1:{port} inside the sandbox failed: {cause}")]
    ProxyListener {
        /// The requested port.
        port: u16,
        /// What the kernel said.
        cause: Cause,
    },
    /// Sending a status report (and its fds) to the caller failed.
    #[error("sending the launcher status failed: {0}")]
    SendStatus(Cause),
    /// Setting up stdin/stdout/stderr of the program failed.
    #[error("setting up the program's stdio failed: {0}")]
    Stdio(Cause),
    /// Placing the CDP pipe ends on fds 3 and 4 failed.
    #[error("placing the CDP pipe on fds 3/4 failed: {0}")]
    CdpFds(Cause),
    /// Closing inherited descriptors failed.
    #[error("closing inherited file descriptors failed: {0}")]
    CloseFds(Cause),
    /// Setting a resource limit failed.
    #[error("setrlimit({resource}) failed: {cause}")]
    Rlimit {
        /// The resource.
        resource: String,
        /// What the kernel said.
        cause: Cause,
    },
    /// Dropping capabilities failed or could not be verified.
    #[error("dropping capabilities failed: {0}")]
    DropCapabilities(Cause),
    /// Setting `no_new_privs` failed.
    #[error("setting no_new_privs failed: {0}")]
    NoNewPrivs(Cause),
    /// Building the Landlock ruleset failed.
    #[error("building the Landlock ruleset failed{}: {cause}", path.as_ref().map(|p| format!(" at {}", p.display())).unwrap_or_default())]
    LandlockRuleset {
        /// The rule path at fault, if any.
        path: Option<PathBuf>,
        /// What went wrong.
        cause: Cause,
    },
    /// `landlock_restrict_self` failed or did not enforce anything.
    #[error("Landlock restrict_self failed: {0}")]
    LandlockRestrict(Cause),
    /// `execve` of the program failed.
    #[error("execve({program}) failed: {cause}. It must be inside a ro_bind (Landlock allows execute there only)")]
    Exec {
        /// The program.
        program: PathBuf,
        /// What the kernel said.
        cause: Cause,
    },
    /// Opening a pidfd failed.
    #[error("pidfd_open({pid}) failed: {cause}")]
    PidfdOpen {
        /// The pid.
        pid: i32,
        /// What the kernel said.
        cause: Cause,
    },
    /// Sending SIGKILL failed.
    #[error("killing the sandbox failed: {0}")]
    Kill(Cause),
    /// Waiting for the launcher failed.
    #[error("reaping the sandbox launcher failed: {0}")]
    Reap(Cause),
    /// Removing a cgroup failed.
    #[error("removing cgroup {path} failed: {cause}")]
    CgroupRemove {
        /// The cgroup directory.
        path: PathBuf,
        /// What the kernel said.
        cause: Cause,
    },
    /// A cgroup still holds processes, so it cannot be removed.
    #[error("cgroup {path} still holds processes {pids:?}; kill the session first")]
    CgroupBusy {
        /// The cgroup directory.
        path: PathBuf,
        /// Host pids still inside.
        pids: Vec<i32>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_status_socket_round_trip() {
        let err = Error::BindMount {
            path: PathBuf::from("/usr"),
            cause: Cause::from(nix::errno::Errno::EPERM),
        };
        let json = serde_json::to_string(&err).unwrap();
        let back: Error = serde_json::from_str(&json).unwrap();
        assert_eq!(back, err);
        let text = back.to_string();
        assert!(text.contains("/usr"), "{text}");
        assert!(text.contains("EPERM"), "{text}");
    }

    #[test]
    fn layer_errors_tell_the_operator_what_to_do() {
        let err = Error::LayerUnavailable {
            layer: Layer::Landlock,
            reason: "kernel has no Landlock".into(),
        };
        let text = err.to_string();
        assert!(text.contains("landlock"), "{text}");
        assert!(text.contains("accept_degraded"), "{text}");
    }
}
