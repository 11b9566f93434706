//! Starting launcher processes from one dedicated thread.
//!
//! `PR_SET_PDEATHSIG` fires when the parent *thread* exits, not the parent process, and
//! tokio's blocking-pool threads exit when idle. A launcher forked from such a thread would
//! be killed at a random moment. So every launcher is forked by one crate-owned thread that
//! lives as long as the process.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;

use crate::protocol::LAUNCHER_ARG;

struct Job {
    status_fd: RawFd,
    reply: mpsc::Sender<io::Result<Child>>,
}

static SPAWNER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);

fn spawner() -> io::Result<mpsc::Sender<Job>> {
    let mut guard = SPAWNER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(tx) = guard.as_ref() {
        return Ok(tx.clone());
    }
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("chaperone-sandbox-spawner".into())
        .spawn(move || {
            // The static keeps a sender forever, so this loop (and the thread) never ends.
            for job in rx {
                let result = spawn_now(job.status_fd);
                let _ = job.reply.send(result);
            }
        })?;
    *guard = Some(tx.clone());
    Ok(tx)
}

/// Starts `/proc/self/exe __chaperone-sandbox-launcher <fd>` with `status` inherited, from the
/// dedicated thread. The launcher gets a piped stdin (for the request), the caller's
/// stdout/stderr, an empty environment, its own session, and SIGKILL when that thread (i.e.
/// this process) dies.
pub(crate) fn spawn_launcher(status: &OwnedFd) -> io::Result<Child> {
    let (reply, answer) = mpsc::channel();
    let job = Job {
        status_fd: status.as_raw_fd(),
        reply,
    };
    spawner()?
        .send(job)
        .map_err(|_| io::Error::other("the sandbox spawner thread is gone"))?;
    // `status` stays borrowed (open) until the spawner answered, i.e. until after the fork.
    answer
        .recv()
        .map_err(|_| io::Error::other("the sandbox spawner thread did not answer"))?
}

fn spawn_now(status_fd: RawFd) -> io::Result<Child> {
    let parent = std::process::id() as libc::pid_t;
    let mut command = Command::new("/proc/self/exe");
    command
        .arg(LAUNCHER_ARG)
        .arg(status_fd.to_string())
        .env_clear()
        .stdin(Stdio::piped());
    // SAFETY: the closure runs between fork and exec in a copy of a multi-threaded process,
    // so it only makes async-signal-safe system calls (setsid, prctl, getppid, fcntl) and
    // allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // A parent that died before the prctl would never deliver the signal.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            let flags = libc::fcntl(status_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(status_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
    command.spawn()
}
