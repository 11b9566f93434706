//! The launcher: a fresh exec of the caller's binary, single-threaded, that builds the sandbox
//! in three processes.
//!
//! - **Host side** (the launcher itself): joins the session's cgroups and switches to the
//!   session's host uid/gid while still root, unshares the namespaces, writes the id maps,
//!   creates the CDP pipes, forks the init and reports `Started`. Then it waits for the init
//!   and exits with its status, so the caller's pidfd of the launcher becomes readable when
//!   the session ends.
//! - **Init** (pid 1 of the new pid namespace): builds the root and pivots into it, brings up
//!   `lo`, creates the proxy listener and reports it, forks the program and reaps zombies.
//!   When the program exits, the init exits with its status and the kernel kills whatever is
//!   left in the namespace.
//! - **Program**: limits, closes stray descriptors, drops every capability, sets
//!   `no_new_privs`, applies Landlock and executes the program with fds 3/4 on the CDP pipe.
//!
//! Each process arms `PR_SET_PDEATHSIG = SIGKILL` towards its parent, so the chain dies
//! with the supervisor. Any failing step is reported on the status socket, naming the step.

use std::convert::Infallible;
use std::ffi::{CString, OsStr};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, getegid, geteuid, getppid, ForkResult, Gid, Pid, Uid};

use crate::error::{Cause, Error};
use crate::landlock::kernel_abi;
use crate::namespaces::{self, describe, try_unshare_in_child, NS_LAYERS};
use crate::protocol::{self, Report, Request};
use crate::spec::{Layer, Output, Spec};
use crate::{capabilities, cgroup, idmap, net, probe, rlimits, rootfs};

/// Lowest descriptor number for the launcher's own long-lived fds, above the CDP slots 3/4.
const HIGH_FD: RawFd = 10;

/// Entry point of the launcher process. `status_fd` is the descriptor number the caller left
/// open for us (passed as the second argument).
pub(crate) fn main(status_fd: Option<&OsStr>) -> ! {
    let Some(raw) = status_fd
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse::<RawFd>().ok())
    else {
        eprintln!("chaperone-sandbox launcher: missing status descriptor argument");
        std::process::exit(2);
    };
    // SAFETY: the caller passed this descriptor number and cleared close-on-exec on it for us;
    // nothing else in this fresh process refers to it.
    let passed = unsafe { OwnedFd::from_raw_fd(raw) };
    // Move it above the CDP slots and make it close-on-exec, so the program's execve closes
    // it and the caller sees end-of-file exactly when the program started.
    let status = match fcntl(&passed, FcntlArg::F_DUPFD_CLOEXEC(HIGH_FD)) {
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that only we own.
        Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
        Err(e) => {
            eprintln!("chaperone-sandbox launcher: moving the status descriptor: {e}");
            std::process::exit(2);
        }
    };
    drop(passed);
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));

    let request = match read_request() {
        Ok(r) => r,
        Err(error) => fail(status.as_fd(), error, Vec::new(), 2),
    };
    match request {
        Request::Probe => {
            let report = Report::Probe(Box::new(probe::local()));
            let code = i32::from(protocol::send(status.as_fd(), &report, &[]).is_err());
            std::process::exit(code);
        }
        Request::Launch(spec) => {
            let mut cgroups = Vec::new();
            let mut status = Some(status);
            let error = match host_side(&mut status, &spec, &mut cgroups) {
                Ok(never) => match never {},
                Err(error) => error,
            };
            match status {
                Some(fd) => fail(fd.as_fd(), error, cgroups, 1),
                None => std::process::exit(1),
            }
        }
    }
}

/// Reports `error` and exits with `code`.
fn fail(status: BorrowedFd<'_>, error: Error, cgroups: Vec<PathBuf>, code: i32) -> ! {
    if protocol::send(
        status,
        &Report::Failed {
            error: error.clone(),
            cgroups,
        },
        &[],
    )
    .is_err()
    {
        // The caller is gone or the socket broke; stderr is the last place to say it.
        eprintln!("chaperone-sandbox launcher: {error}");
    }
    std::process::exit(code)
}

fn read_request() -> Result<Request, Error> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut bytes)
        .map_err(|e| Error::ReadSpec(e.into()))?;
    // The spec pipe must not leak into the sandbox.
    let null = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::ReadSpec(e.into()))?;
    nix::unistd::dup2_stdin(&null).map_err(|e| Error::ReadSpec(e.into()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::ReadSpec(Cause::msg(format!("the spec is not valid JSON: {e}"))))
}

/// Arms SIGKILL on parent death and checks the parent did not already go: a parent that
/// died before the prctl would never trigger it.
fn arm_parent_death(expected_parent: Pid) -> Result<(), Error> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| Error::ParentDeathSignal(e.into()))?;
    if getppid() != expected_parent {
        return Err(Error::ParentDeathSignal(Cause::msg(
            "the parent process exited during the launch",
        )));
    }
    Ok(())
}

/// Drops from root to the session's own host ids. Credential changes clear the parent-death
/// signal and the dumpable flag, so both are restored.
fn switch_ids(uid: u32, gid: u32, parent: Pid) -> Result<(), Error> {
    nix::unistd::setgroups(&[]).map_err(|e| Error::SetGroups(e.into()))?;
    let g = Gid::from_raw(gid);
    nix::unistd::setresgid(g, g, g).map_err(|e| Error::SetGid {
        gid,
        cause: e.into(),
    })?;
    let u = Uid::from_raw(uid);
    nix::unistd::setresuid(u, u, u).map_err(|e| Error::SetUid {
        uid,
        cause: e.into(),
    })?;
    // Dumpable = the process's own /proc files belong to it (the uid map must be writable).
    // The session uid is unique, so no other session can ptrace it because of this.
    nix::sys::prctl::set_dumpable(true).map_err(|e| Error::SetDumpable(e.into()))?;
    arm_parent_death(parent)
}

/// Unshares every namespace layer. When that fails, finds out which namespaces the host
/// refuses; those the spec accepts as degraded are left out, any other is an error.
fn unshare_namespaces(spec: &Spec, degraded: &mut Vec<Layer>) -> Result<CloneFlags, Error> {
    let mut flags = NS_LAYERS
        .iter()
        .fold(CloneFlags::empty(), |acc, (_, f)| acc | *f);
    let first = match unshare(flags) {
        Ok(()) => return Ok(flags),
        Err(errno) => errno,
    };
    if let Err(errno) = try_unshare_in_child(CloneFlags::empty()) {
        return Err(Error::Unshare {
            namespaces: describe(CloneFlags::CLONE_NEWUSER),
            cause: errno.into(),
        });
    }
    for (layer, flag) in NS_LAYERS.iter().skip(1) {
        if let Err(errno) = try_unshare_in_child(*flag) {
            if layer.degradable() && spec.accepts(*layer) {
                flags.remove(*flag);
                degraded.push(*layer);
            } else {
                return Err(Error::Unshare {
                    namespaces: describe(CloneFlags::CLONE_NEWUSER | *flag),
                    cause: errno.into(),
                });
            }
        }
    }
    let retry = if degraded.is_empty() {
        Err(first)
    } else {
        unshare(flags)
    };
    retry.map_err(|errno| Error::Unshare {
        namespaces: describe(flags),
        cause: errno.into(),
    })?;
    Ok(flags)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::CreatePipe(e.into()))
}

/// Everything the init and the program need, built by the host side before forking.
struct Chain<'a> {
    spec: &'a Spec,
    status: OwnedFd,
    /// Program's read end of the command pipe (becomes fd 3).
    browser_in: OwnedFd,
    /// Program's write end of the reply pipe (becomes fd 4).
    browser_out: OwnedFd,
    lifeline: OwnedFd,
    flags: CloneFlags,
    landlock: bool,
}

fn host_side(
    status: &mut Option<OwnedFd>,
    spec: &Spec,
    cgroups: &mut Vec<PathBuf>,
) -> Result<Infallible, Error> {
    let parent = getppid();
    let mut degraded = Vec::new();
    let degrade = |layer: Layer, error: Error, degraded: &mut Vec<Layer>| {
        if spec.accepts(layer) {
            degraded.push(layer);
            Ok(())
        } else {
            Err(error)
        }
    };

    // While still root: the cgroup directories belong to root, the session cannot raise its
    // own limits.
    if let Err(error) = cgroup::create_and_join(&spec.name, &spec.limits, cgroups) {
        degrade(Layer::Cgroup, error, &mut degraded)?;
    }
    match spec.host_ids {
        Some((uid, gid)) if probe::can_switch_ids() => switch_ids(uid, gid, parent)?,
        Some(_) => degrade(
            Layer::PerSessionUid,
            Error::LayerUnavailable {
                layer: Layer::PerSessionUid,
                reason: "the launcher is not root, so it cannot switch to spec.host_ids".into(),
            },
            &mut degraded,
        )?,
        None => degrade(
            Layer::PerSessionUid,
            Error::LayerUnavailable {
                layer: Layer::PerSessionUid,
                reason: "spec.host_ids is not set, so the session shares the supervisor's uid"
                    .into(),
            },
            &mut degraded,
        )?,
    }
    let landlock = kernel_abi() >= 1;
    if !landlock {
        degrade(
            Layer::Landlock,
            Error::LayerUnavailable {
                layer: Layer::Landlock,
                reason: "the kernel has no Landlock (or it is not in the lsm= list)".into(),
            },
            &mut degraded,
        )?;
    }

    let outer_uid = geteuid().as_raw();
    let outer_gid = getegid().as_raw();
    let flags = unshare_namespaces(spec, &mut degraded)?;
    arm_parent_death(parent)?;
    idmap::write_self_maps(spec.inner_uid, outer_uid, spec.inner_gid, outer_gid)?;
    // Opened now: once the init pivots, this process's root moves with it and /proc no
    // longer shows this process.
    let ns_dir = std::fs::File::open("/proc/self/ns").map_err(|e| Error::ReadNamespace {
        path: PathBuf::from("/proc/self/ns"),
        cause: e.into(),
    })?;

    let (browser_in, to_browser) = pipe()?;
    let (from_browser, browser_out) = pipe()?;
    let (lifeline, lifeline_keep) = pipe()?;
    let status_fd = status
        .take()
        .ok_or_else(|| Error::SendStatus(Cause::msg("status descriptor already consumed")))?;

    // SAFETY: this process is single-threaded (fresh exec, no threads started), so the child
    // may run arbitrary code.
    let forked = unsafe { fork() };
    let init = match forked {
        Err(e) => {
            *status = Some(status_fd);
            return Err(Error::Fork {
                what: "namespace init".into(),
                cause: e.into(),
            });
        }
        Ok(ForkResult::Child) => {
            drop((to_browser, from_browser, lifeline_keep, ns_dir));
            init_main(Chain {
                spec,
                status: status_fd,
                browser_in,
                browser_out,
                lifeline,
                flags,
                landlock,
            })
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    drop((browser_in, browser_out, lifeline));
    let ns = match namespaces::own_ids_for_children(&ns_dir) {
        Ok(ns) => ns,
        Err(error) => {
            *status = Some(status_fd);
            return Err(error);
        }
    };
    // From here on this process only reports and waits: it keeps no privilege in the new
    // user namespace that a compromised browser could borrow.
    if let Err(error) = capabilities::drop_all().and_then(|()| capabilities::set_no_new_privs()) {
        *status = Some(status_fd);
        return Err(error);
    }
    // Opened while the init is our unreaped child, so it cannot name a recycled pid.
    let init_pidfd = match crate::handle::pidfd_open(init.as_raw()) {
        Ok(fd) => fd,
        Err(error) => {
            *status = Some(status_fd);
            return Err(error);
        }
    };
    // The session's user and pid namespaces, held open by the caller until its purge check
    // is done: a namespace's inode number is reused as soon as it is freed, so without these
    // the check could mistake a newer session's processes for this one's.
    let pins = ["user", "pid_for_children"].map(|name| {
        nix::fcntl::openat(
            &ns_dir,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| Error::ReadNamespace {
            path: std::path::Path::new("/proc/self/ns").join(name),
            cause: e.into(),
        })
    });
    let [Ok(user_pin), Ok(pid_pin)] = pins else {
        *status = Some(status_fd);
        let [a, b] = pins;
        return Err(a
            .and(b)
            .err()
            .unwrap_or(Error::Protocol("namespace pins".into())));
    };
    let started = Report::Started {
        init_pid: init.as_raw(),
        ns,
        degraded,
        cgroups: cgroups.clone(),
    };
    let sent = protocol::send(
        status_fd.as_fd(),
        &started,
        &[
            to_browser.as_raw_fd(),
            from_browser.as_raw_fd(),
            init_pidfd.as_raw_fd(),
            user_pin.as_raw_fd(),
            pid_pin.as_raw_fd(),
        ],
    );
    if let Err(error) = sent {
        // The init is pointless without a caller; its parent-death signal ends it.
        *status = Some(status_fd);
        return Err(error);
    }
    drop((to_browser, from_browser, init_pidfd, status_fd));
    // Kept open until this process dies: the init's check that its parent is still there.
    let _lifeline_keep = lifeline_keep;
    std::process::exit(wait_for(init))
}

/// Waits for `child` and converts its end into an exit code (128 + signal when killed).
fn wait_for(child: Pid) -> i32 {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, signal, _)) => return 128 + signal as i32,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return 1,
        }
    }
}

fn init_main(chain: Chain<'_>) -> ! {
    let status = match chain.status.try_clone() {
        Ok(fd) => fd,
        Err(_) => std::process::exit(1),
    };
    match init_setup(chain) {
        Ok(never) => match never {},
        Err(error) => fail(status.as_fd(), error, Vec::new(), 1),
    }
}

fn init_setup(chain: Chain<'_>) -> Result<Infallible, Error> {
    // The parent (outside this pid namespace) shows as pid 0, so the lifeline pipe tells
    // whether it is still there: its write end closes only when the host side dies.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| Error::ParentDeathSignal(e.into()))?;
    let mut fds = [PollFd::new(chain.lifeline.as_fd(), PollFlags::POLLIN)];
    let ready =
        poll(&mut fds, PollTimeout::ZERO).map_err(|e| Error::ParentDeathSignal(e.into()))?;
    if ready > 0 {
        return Err(Error::ParentDeathSignal(Cause::msg(
            "the launcher exited during the launch",
        )));
    }
    let spec = chain.spec;
    rootfs::build(spec)?;
    if chain.flags.contains(CloneFlags::CLONE_NEWNET) {
        net::loopback_up()?;
    }
    let listener = net::proxy_listener(spec.proxy_port)?;
    let port = net::local_port(&listener).unwrap_or(spec.proxy_port);
    protocol::send(
        chain.status.as_fd(),
        &Report::Listening { port },
        &[listener.as_raw_fd()],
    )?;
    drop(listener);
    if chain.flags.contains(CloneFlags::CLONE_NEWUTS) {
        nix::unistd::sethostname(&spec.name).map_err(|e| Error::SetHostname(e.into()))?;
    }

    // SAFETY: still single-threaded (forked from the single-threaded host side).
    let program = match unsafe { fork() } {
        Err(e) => {
            return Err(Error::Fork {
                what: "program".into(),
                cause: e.into(),
            })
        }
        Ok(ForkResult::Child) => program_main(chain),
        Ok(ForkResult::Parent { child }) => child,
    };
    // The init only reaps from now on; exiting on failure takes the program with it.
    capabilities::drop_all()?;
    capabilities::set_no_new_privs()?;
    // Every copy of the status socket (including the one kept for failure reports) must
    // close here: the caller reads end-of-file as "the program started". The init needs no
    // descriptor to reap, and exit() below runs no destructor that could double-close.
    // SAFETY: close_range only closes descriptors of this process.
    let rc = unsafe { libc::close_range(3, u32::MAX, 0) };
    if rc != 0 {
        // Keeping the socket would stall the caller until its timeout; better fail loudly.
        std::process::exit(1);
    }
    std::process::exit(reap_until(program))
}

/// pid 1's job: reap every orphan, exit with the program's status when it ends.
fn reap_until(program: Pid) -> i32 {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == program => return code,
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == program => {
                return 128 + signal as i32
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return 1,
        }
    }
}

fn program_main(chain: Chain<'_>) -> ! {
    let status = match chain.status.try_clone() {
        Ok(fd) => fd,
        Err(_) => std::process::exit(127),
    };
    let error = match program_setup(&chain) {
        Ok(never) => match never {},
        Err(error) => error,
    };
    fail(status.as_fd(), error, Vec::new(), 127)
}

/// `dup2` with the raw descriptor numbers the program expects.
fn dup_to(old: RawFd, new: RawFd) -> Result<(), Errno> {
    // SAFETY: dup2 on descriptor numbers; `new` is one of the fixed slots (0-4) that this
    // process deliberately replaces, and nothing in it holds an OwnedFd for those numbers
    // except the ones being replaced on purpose.
    Errno::result(unsafe { libc::dup2(old, new) }).map(drop)
}

fn c_string(what: &str, bytes: &[u8]) -> Result<CString, Error> {
    CString::new(bytes).map_err(|_| Error::InvalidSpec {
        field: what.to_string(),
        reason: "contains a NUL byte".into(),
    })
}

fn program_setup(chain: &Chain<'_>) -> Result<Infallible, Error> {
    // Inside the pid namespace the init is pid 1.
    arm_parent_death(Pid::from_raw(1))?;
    let spec = chain.spec;

    let null = nix::fcntl::open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::Stdio(e.into()))?;
    dup_to(null.as_raw_fd(), 0).map_err(|e| Error::Stdio(e.into()))?;
    if spec.output == Output::Null {
        dup_to(null.as_raw_fd(), 1).map_err(|e| Error::Stdio(e.into()))?;
        dup_to(null.as_raw_fd(), 2).map_err(|e| Error::Stdio(e.into()))?;
    }
    // Lift both ends above the slots first, so placing one cannot clobber the other.
    let lift = |fd: &OwnedFd| {
        fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(HIGH_FD)).map_err(|e| Error::CdpFds(e.into()))
    };
    let cdp_in = lift(&chain.browser_in)?;
    let cdp_out = lift(&chain.browser_out)?;
    dup_to(cdp_in, 3).map_err(|e| Error::CdpFds(e.into()))?;
    dup_to(cdp_out, 4).map_err(|e| Error::CdpFds(e.into()))?;
    for fd in [3, 4] {
        // SAFETY: fds 3 and 4 were just created by dup2 above and are open.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::empty())).map_err(|e| Error::CdpFds(e.into()))?;
    }
    // Everything above the CDP slots closes at execve (the status socket must stay usable
    // until then to report a failing step).
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on descriptors.
    let rc = unsafe { libc::close_range(5, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    Errno::result(rc).map_err(|e| Error::CloseFds(e.into()))?;

    let program = c_string("program", spec.program.as_os_str().as_bytes())?;
    let mut argv = vec![program.clone()];
    for (i, arg) in spec.args.iter().enumerate() {
        argv.push(c_string(&format!("args[{i}]"), arg.as_bytes())?);
    }
    let mut envp = Vec::new();
    for (i, (key, value)) in spec.env.iter().enumerate() {
        envp.push(c_string(
            &format!("env[{i}]"),
            format!("{key}={value}").as_bytes(),
        )?);
    }

    rlimits::apply(spec.limits.nofile)?;
    capabilities::drop_all()?;
    capabilities::set_no_new_privs()?;
    if chain.landlock {
        crate::landlock::restrict(spec)?;
    }
    let errno = match nix::unistd::execve(&program, &argv, &envp) {
        Ok(never) => match never {},
        Err(errno) => errno,
    };
    Err(Error::Exec {
        program: spec.program.clone(),
        cause: errno.into(),
    })
}
