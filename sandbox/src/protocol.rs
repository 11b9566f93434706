//! What the caller and the launcher say to each other. The request travels as JSON on the
//! launcher's stdin; reports come back as JSON datagrams on a `SOCK_SEQPACKET` socket, with
//! file descriptors attached (`SCM_RIGHTS`). Every process of the launcher chain holds the
//! socket close-on-exec, so end-of-file after a successful `execve` means "started".

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::error::{Cause, Error};
use crate::probe::HostReport;
use crate::spec::{Layer, NsIds, Spec};

/// First argument that turns the current executable into the launcher.
pub(crate) const LAUNCHER_ARG: &str = "__chaperone-sandbox-launcher";

/// Largest report datagram; reports are small JSON documents.
const MAX_REPORT: usize = 64 * 1024;

/// What the launcher is asked to do.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Launch the spec's program.
    Launch(Box<Spec>),
    /// Report what the host offers.
    Probe,
}

/// One report from the launcher chain.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Report {
    /// From the host-side launcher after forking the namespace init. Carries the caller's
    /// ends of the CDP pipes and a pidfd of the init: [to the program, from the program,
    /// init pidfd].
    Started {
        init_pid: i32,
        ns: NsIds,
        degraded: Vec<Layer>,
        cgroups: Vec<PathBuf>,
    },
    /// From the namespace init. Carries the proxy listener.
    Listening { port: u16 },
    /// A step failed; the chain exits.
    Failed { error: Error, cgroups: Vec<PathBuf> },
    /// Answer to [`Request::Probe`].
    Probe(Box<HostReport>),
}

/// Sends one report with `fds` attached.
pub(crate) fn send(sock: BorrowedFd<'_>, report: &Report, fds: &[RawFd]) -> Result<(), Error> {
    let bytes = serde_json::to_vec(report)
        .map_err(|e| Error::SendStatus(Cause::msg(format!("encoding the report: {e}"))))?;
    let iov = [IoSlice::new(&bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(n) => {
                return Err(Error::SendStatus(Cause::msg(format!(
                    "short send: {n} of {} bytes",
                    bytes.len()
                ))))
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::SendStatus(e.into())),
        }
    }
}

/// Waits up to `timeout_ms` for one report. `Ok(None)` is end-of-file: every writer is gone.
pub(crate) fn recv(
    sock: BorrowedFd<'_>,
    timeout_ms: u16,
) -> Result<Option<(Report, Vec<OwnedFd>)>, RecvError> {
    let mut fds = [PollFd::new(sock, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::from(timeout_ms)) {
            Ok(0) => return Err(RecvError::TimedOut),
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(RecvError::Failed(Error::ReadStatus(e.into()))),
        }
    }
    let mut buf = vec![0u8; MAX_REPORT];
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    let (len, received, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut received = Vec::new();
                for c in msg
                    .cmsgs()
                    .map_err(|e| RecvError::Failed(Error::ReadStatus(e.into())))?
                {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed these descriptors in our
                            // table for this message; nothing else refers to them.
                            received.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (msg.bytes, received, truncated);
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(RecvError::Failed(Error::ReadStatus(e.into()))),
        }
    };
    if len == 0 && received.is_empty() {
        return Ok(None);
    }
    if truncated {
        return Err(RecvError::Failed(Error::Protocol(
            "a launcher report was truncated".into(),
        )));
    }
    let report = serde_json::from_slice(&buf[..len]).map_err(|e| {
        RecvError::Failed(Error::Protocol(format!("unreadable launcher report: {e}")))
    })?;
    Ok(Some((report, received)))
}

/// Why [`recv`] returned without a report.
#[derive(Debug)]
pub(crate) enum RecvError {
    /// Nothing arrived in time.
    TimedOut,
    /// Reading failed.
    Failed(Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;

    #[test]
    fn reports_and_fds_cross_a_seqpacket_socket() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        send(
            a.as_fd(),
            &Report::Listening { port: 3128 },
            &[r.as_raw_fd(), w.as_raw_fd()],
        )
        .unwrap();
        drop(a);
        let (report, fds) = recv(b.as_fd(), 1000).unwrap().unwrap();
        assert!(matches!(report, Report::Listening { port: 3128 }));
        assert_eq!(fds.len(), 2);
        // The received write end feeds the original read end.
        nix::unistd::write(&fds[1], b"x").unwrap();
        let mut byte = [0u8; 1];
        nix::unistd::read(&r, &mut byte).unwrap();
        assert_eq!(&byte, b"x");
        assert!(
            recv(b.as_fd(), 1000).unwrap().is_none(),
            "end-of-file after the writer closed"
        );
    }
}
