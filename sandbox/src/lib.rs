//! Kernel isolation for one chaperone browser.
//!
//! [`launch`] runs one program (Chromium) in new user, pid, mount, network, IPC and UTS
//! namespaces, as a non-root uid inside (and, when the supervisor is root, its own host uid),
//! after `pivot_root` into a tmpfs root that exists only in the session's mount namespace,
//! with every capability dropped, `no_new_privs`, Landlock, rlimits and per-session cgroups.
//! The browser's network namespace holds only `lo`; its one way out is a TCP listener created
//! inside it and handed back as a file descriptor. The crate knows nothing about CDP or
//! credentials: it isolates one process tree and hands back its pipes and sockets.
//!
//! The binary must call [`run_launcher_if_requested`] first thing in `main()`: launches run
//! in a fresh single-threaded exec of the binary, never in the caller's (threaded) process.
//!
//! A layer the host cannot provide fails the launch with an error naming it, unless the spec
//! lists it in `accept_degraded`; [`Launched::degraded`] then says what is missing. [`probe`]
//! reports every layer for `chaperone doctor`.

mod capabilities;
mod cgroup;
mod error;
mod handle;
mod idmap;
mod landlock;
mod launcher;
mod namespaces;
mod net;
pub mod posture;
mod probe;
mod protocol;
mod rlimits;
mod rootfs;
mod spawner;
mod spec;

pub use cgroup::{cleanup_cgroups, sweep_stale_cgroups, CgroupReport, CgroupVersion};
pub use error::{Cause, Error};
pub use handle::{launch, probe, BrowserIo, Handle, Launched, LAUNCH_TIMEOUT};
pub use idmap::{map_line, parse_map, to_outside};
pub use landlock::kernel_abi as landlock_abi;
pub use namespaces::{ns_ids_of, processes_in};
pub use probe::{HostReport, LayerReport, CHROMIUM_USERNS_LEVELS};
pub use rlimits::nofile_limit;
pub use rootfs::{mount_points_under, remount_flags};
pub use spec::{default_ro_binds, FileSpec, Layer, Limits, NsIds, Output, Spec};

/// If this process was started as a sandbox launcher (first argument
/// `__chaperone-sandbox-launcher`), runs the launcher and exits; otherwise returns at once.
/// Call it as the first line of `main()`, before any thread or runtime starts.
pub fn run_launcher_if_requested() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new(protocol::LAUNCHER_ARG)) {
        return;
    }
    let fd = args.next();
    launcher::main(fd.as_deref())
}
