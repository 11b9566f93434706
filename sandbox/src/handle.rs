//! The caller's side: `launch`, the `Launched` handle (kill, reap), and `probe`.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Child;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};

use crate::cgroup::cleanup_cgroups;
use crate::error::{Cause, Error};
use crate::probe::HostReport;
use crate::protocol::{self, RecvError, Report, Request};
use crate::spawner::spawn_launcher;
use crate::spec::{Layer, NsIds, Spec};

/// How long a launch may take before the launcher is killed.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);

/// A running sandbox. The caller owns its lifetime: call [`Launched::kill`] and reap it
/// ([`Launched::reap`]) when the session ends, then remove its cgroups
/// ([`crate::cleanup_cgroups`]). Dropping the handle does not kill the sandbox (the fds are
/// public so they can be moved into an async runtime); the supervisor's own death does.
#[derive(Debug)]
pub struct Launched {
    /// Host pid of the launcher (a child of the caller; reap it).
    pub launcher_pid: i32,
    /// Host pid of the namespace's init; SIGKILL to it ends every process of the session.
    pub init_pid: i32,
    /// Write end of the pipe the program reads commands from (its fd 3).
    pub cdp_to_browser: OwnedFd,
    /// Read end of the pipe the program writes replies to (its fd 4).
    pub cdp_from_browser: OwnedFd,
    /// Listening TCP socket bound to 127.0.0.1:`proxy_port` inside the session's network
    /// namespace, non-blocking. `accept()` on it serves the browser's proxy connections.
    pub proxy_listener: OwnedFd,
    /// The port `proxy_listener` is bound to.
    pub proxy_port: u16,
    /// Namespace ids, for [`crate::processes_in`].
    pub ns: NsIds,
    /// Layers the session runs without (all listed in the spec's `accept_degraded`).
    pub degraded: Vec<Layer>,
    /// cgroup directories of the session, to remove after it is gone.
    pub cgroups: Vec<PathBuf>,
    /// pidfd of the launcher: readable when it exits, i.e. when the session ended.
    pub pidfd: OwnedFd,
    /// pidfd of the namespace init, so a kill can never hit a recycled pid.
    pub init_pidfd: OwnedFd,
    /// The session's user and pid namespaces, held open so that their ids stay theirs until
    /// the purge check is done (a freed namespace's inode number is reused at once).
    pub ns_pins: Vec<OwnedFd>,
    exit: OnceLock<i32>,
}

impl Launched {
    /// SIGKILLs the namespace init (which takes every process of the pid namespace with it)
    /// and the launcher. Killing something already dead is not an error.
    pub fn kill(&self) -> Result<(), Error> {
        for fd in [&self.init_pidfd, &self.pidfd] {
            match pidfd_send_sigkill(fd) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => return Err(Error::Kill(e.into())),
            }
        }
        Ok(())
    }

    /// Non-blocking reap of the launcher: `Some(code)` once it exited (128 + signal when
    /// killed), `None` while it runs. Repeated calls after the exit return the same code.
    pub fn reap(&self) -> Result<Option<i32>, Error> {
        if let Some(code) = self.exit.get() {
            return Ok(Some(*code));
        }
        let status = waitid(
            Id::PIDFd(self.pidfd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
        )
        .map_err(|e| Error::Reap(e.into()))?;
        let code = match status {
            WaitStatus::StillAlive => return Ok(None),
            WaitStatus::Exited(_, code) => code,
            WaitStatus::Signaled(_, signal, _) => 128 + signal as i32,
            other => return Err(Error::Reap(Cause::msg(format!("unexpected {other:?}")))),
        };
        Ok(Some(*self.exit.get_or_init(|| code)))
    }
}

/// The file descriptors a session's browser talks through, split from [`Launched`] so they can
/// move into an async runtime while the [`Handle`] stays with the session's lifecycle.
#[derive(Debug)]
pub struct BrowserIo {
    /// Write end of the pipe the program reads commands from (its fd 3).
    pub cdp_to_browser: OwnedFd,
    /// Read end of the pipe the program writes replies to (its fd 4).
    pub cdp_from_browser: OwnedFd,
    /// Listening TCP socket inside the session's network namespace, non-blocking.
    pub proxy_listener: OwnedFd,
}

/// What it takes to end a sandbox and check that it is gone. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Handle {
    /// Host pid of the launcher.
    pub launcher_pid: i32,
    /// Host pid of the namespace's init.
    pub init_pid: i32,
    /// Namespace ids, for [`crate::processes_in`].
    pub ns: NsIds,
    /// Layers the session runs without.
    pub degraded: Vec<Layer>,
    /// cgroup directories of the session.
    pub cgroups: Vec<PathBuf>,
    pidfd: std::sync::Arc<OwnedFd>,
    init_pidfd: std::sync::Arc<OwnedFd>,
    /// See [`Launched::ns_pins`]; held, never read, released with the last clone.
    _ns_pins: std::sync::Arc<Vec<OwnedFd>>,
    exit: std::sync::Arc<OnceLock<i32>>,
}

impl Launched {
    /// Splits the sandbox into its browser fds and the handle that ends it.
    pub fn into_parts(self) -> (Handle, BrowserIo) {
        let exit = OnceLock::new();
        if let Some(code) = self.exit.get() {
            let _ = exit.set(*code);
        }
        (
            Handle {
                launcher_pid: self.launcher_pid,
                init_pid: self.init_pid,
                ns: self.ns,
                degraded: self.degraded,
                cgroups: self.cgroups,
                pidfd: std::sync::Arc::new(self.pidfd),
                init_pidfd: std::sync::Arc::new(self.init_pidfd),
                _ns_pins: std::sync::Arc::new(self.ns_pins),
                exit: std::sync::Arc::new(exit),
            },
            BrowserIo {
                cdp_to_browser: self.cdp_to_browser,
                cdp_from_browser: self.cdp_from_browser,
                proxy_listener: self.proxy_listener,
            },
        )
    }
}

impl Handle {
    /// SIGKILLs the namespace init and the launcher (see [`Launched::kill`]).
    pub fn kill(&self) -> Result<(), Error> {
        for fd in [&*self.init_pidfd, &*self.pidfd] {
            match pidfd_send_sigkill(fd) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => return Err(Error::Kill(e.into())),
            }
        }
        Ok(())
    }

    /// Non-blocking reap of the launcher (see [`Launched::reap`]).
    pub fn reap(&self) -> Result<Option<i32>, Error> {
        if let Some(code) = self.exit.get() {
            return Ok(Some(*code));
        }
        let status = waitid(
            Id::PIDFd(self.pidfd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
        )
        .map_err(|e| Error::Reap(e.into()))?;
        let code = match status {
            WaitStatus::StillAlive => return Ok(None),
            WaitStatus::Exited(_, code) => code,
            WaitStatus::Signaled(_, signal, _) => 128 + signal as i32,
            other => return Err(Error::Reap(Cause::msg(format!("unexpected {other:?}")))),
        };
        Ok(Some(*self.exit.get_or_init(|| code)))
    }

    /// Blocks until the launcher exited (its pidfd is readable) or `timeout` passed; returns
    /// whether it exited. Does not reap.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if self.exit.get().is_some() {
            return true;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(n) if n > 0 => return true,
                Ok(_) if left.is_zero() => return false,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }
}

pub(crate) fn pidfd_open(pid: i32) -> Result<OwnedFd, Error> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Error::PidfdOpen {
            pid,
            cause: Errno::last().into(),
        });
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub(crate) fn pidfd_send_sigkill(fd: &OwnedFd) -> Result<(), Errno> {
    // SAFETY: pidfd_send_signal with a valid pidfd, SIGKILL, no siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    Errno::result(rc).map(drop)
}

fn describe_exit(status: Result<WaitStatus, Errno>) -> String {
    match status {
        Ok(WaitStatus::Exited(_, code)) => format!("launcher exit code {code}"),
        Ok(WaitStatus::Signaled(_, signal, _)) => format!("launcher killed by {signal}"),
        Ok(other) => format!("launcher state {other:?}"),
        Err(e) => format!("launcher status unknown: {e}"),
    }
}

/// Kills a launch that failed half-way, waits for the launcher and removes its cgroups.
fn abandon(pidfd: &OwnedFd, cgroups: &[PathBuf]) -> String {
    let _ = pidfd_send_sigkill(pidfd);
    let status = waitid(Id::PIDFd(pidfd.as_fd()), WaitPidFlag::WEXITED);
    // The init dies by its parent-death signal right after the launcher; give the kernel a
    // moment to empty the cgroups (bounded).
    for _ in 0..100 {
        match cleanup_cgroups(cgroups) {
            Err(Error::CgroupBusy { .. }) => std::thread::sleep(Duration::from_millis(20)),
            _ => break,
        }
    }
    describe_exit(status)
}

/// What the reports of one launch add up to.
#[derive(Default)]
struct Collected {
    started: Option<(i32, NsIds, Vec<Layer>, Vec<OwnedFd>)>,
    listening: Option<(u16, OwnedFd)>,
    failed: Option<Error>,
    cgroups: Vec<PathBuf>,
}

fn collect(sock: &OwnedFd, deadline: Instant) -> Result<Collected, Error> {
    let mut got = Collected::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout {
                secs: LAUNCH_TIMEOUT.as_secs(),
            });
        }
        let wait_ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let (report, fds) = match protocol::recv(sock.as_fd(), wait_ms) {
            Ok(Some(x)) => x,
            Ok(None) => return Ok(got),
            Err(RecvError::TimedOut) => continue,
            Err(RecvError::Failed(e)) => return Err(e),
        };
        match report {
            Report::Started {
                init_pid,
                ns,
                degraded,
                cgroups,
            } => {
                got.cgroups = cgroups;
                if fds.len() != 5 {
                    return Err(Error::Protocol(format!(
                        "`Started` carried {} descriptors instead of 5",
                        fds.len()
                    )));
                }
                got.started = Some((init_pid, ns, degraded, fds));
            }
            Report::Listening { port } => {
                let mut fds = fds.into_iter();
                match (fds.next(), fds.next()) {
                    (Some(fd), None) => got.listening = Some((port, fd)),
                    _ => {
                        return Err(Error::Protocol(
                            "`Listening` must carry exactly one descriptor".into(),
                        ))
                    }
                }
            }
            Report::Failed { error, cgroups } => {
                got.cgroups.extend(cgroups);
                got.failed = Some(error);
                // The chain is exiting; nothing useful can follow.
                return Ok(got);
            }
            Report::Probe(_) => {
                return Err(Error::Protocol("unexpected probe report".into()));
            }
        }
    }
}

fn start(request: &Request) -> Result<(Child, OwnedFd), Error> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| Error::SpawnLauncher(e.into()))?;
    let mut child = spawn_launcher(&theirs).map_err(|e| Error::SpawnLauncher(e.into()))?;
    drop(theirs);
    let bytes = serde_json::to_vec(request)
        .map_err(|e| Error::SendSpec(Cause::msg(format!("encoding the request: {e}"))))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A launcher that died early closes its stdin; its report (if any) explains why, so
        // a failed write is only reported when nothing better arrives.
        if let Err(e) = stdin.write_all(&bytes) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(Error::SendSpec(e.into()));
            }
        }
    }
    Ok((child, ours))
}

/// Launches `spec.program` in a new sandbox. Blocking (a few hundred milliseconds for
/// Chromium): call it from a blocking context (`spawn_blocking`). The work happens in a
/// separate single-threaded launcher process, so calling it from a multi-threaded runtime is
/// safe. Fails with the step that broke; a layer the host cannot provide fails the launch
/// unless the spec accepts it as degraded.
pub fn launch(spec: &Spec) -> Result<Launched, Error> {
    spec.validate()?;
    let (child, sock) = start(&Request::Launch(Box::new(spec.clone())))?;
    let launcher_pid = child.id() as i32;
    drop(child);
    // The launcher is our unreaped child, so its pid cannot be recycled before this.
    let pidfd = pidfd_open(launcher_pid)?;
    let deadline = Instant::now() + LAUNCH_TIMEOUT;
    let collected = match collect(&sock, deadline) {
        Ok(c) => c,
        Err(error) => {
            abandon(&pidfd, &[]);
            return Err(error);
        }
    };
    let Collected {
        started,
        listening,
        failed,
        cgroups,
    } = collected;
    if let Some(error) = failed {
        abandon(&pidfd, &cgroups);
        return Err(error);
    }
    let (Some((init_pid, ns, degraded, fds)), Some((proxy_port, proxy_listener))) =
        (started, listening)
    else {
        let status = abandon(&pidfd, &cgroups);
        return Err(Error::LauncherExited(status));
    };
    fcntl(&proxy_listener, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(|e| {
        abandon(&pidfd, &cgroups);
        Error::ProxyListener {
            port: proxy_port,
            cause: e.into(),
        }
    })?;
    let mut fds = fds.into_iter();
    let (
        Some(cdp_to_browser),
        Some(cdp_from_browser),
        Some(init_pidfd),
        Some(user_pin),
        Some(pid_pin),
    ) = (fds.next(), fds.next(), fds.next(), fds.next(), fds.next())
    else {
        abandon(&pidfd, &cgroups);
        return Err(Error::Protocol("launcher descriptors missing".into()));
    };
    Ok(Launched {
        launcher_pid,
        init_pid,
        cdp_to_browser,
        cdp_from_browser,
        proxy_listener,
        proxy_port,
        ns,
        degraded,
        cgroups,
        pidfd,
        init_pidfd,
        ns_pins: vec![user_pin, pid_pin],
        exit: OnceLock::new(),
    })
}

/// Reports what this host offers, layer by layer (for `chaperone doctor`). Runs the checks
/// in a launcher process, like a launch would. Never fails: a probe that cannot run says so
/// in [`HostReport::error`].
pub fn probe() -> HostReport {
    let (mut child, sock) = match start(&Request::Probe) {
        Ok(x) => x,
        Err(e) => return HostReport::failed(e.to_string()),
    };
    let report = match protocol::recv(sock.as_fd(), 30_000) {
        Ok(Some((Report::Probe(report), _))) => *report,
        Ok(Some((Report::Failed { error, .. }, _))) => HostReport::failed(error.to_string()),
        Ok(Some(_)) => HostReport::failed("unexpected report from the launcher".into()),
        Ok(None) => HostReport::failed("the launcher exited without a report".into()),
        Err(RecvError::TimedOut) => {
            let _ = child.kill();
            HostReport::failed("the probe did not answer within 30 s".into())
        }
        Err(RecvError::Failed(e)) => HostReport::failed(e.to_string()),
    };
    let _ = child.wait();
    report
}
