//! The session's network namespace: only `lo`, brought up, and one TCP listener on
//! 127.0.0.1:<proxy_port> whose fd goes to the supervisor. A socket keeps the network
//! namespace it was created in, so the supervisor can `accept()` the browser's proxy
//! connections from the host without any forwarder inside.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrIn,
};

use crate::error::{Cause, Error};

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// Brings `lo` up in the caller's network namespace.
pub(crate) fn loopback_up() -> Result<(), Error> {
    let fail = |e: Errno| Error::LoopbackUp(e.into());
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(fail)?;
    let mut req = ifreq_for("lo");
    // SAFETY: SIOCGIFFLAGS reads the interface named in `req` and fills its flags union;
    // `req` is a valid, initialised ifreq that outlives the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    if rc < 0 {
        return Err(fail(Errno::last()));
    }
    // SAFETY: after SIOCGIFFLAGS the flags member of the union is the initialised one.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req` (name + flags); it is valid for the call's duration.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    if rc < 0 {
        return Err(fail(Errno::last()));
    }
    Ok(())
}

/// Creates the listening TCP socket on 127.0.0.1:`port` in the caller's network namespace.
pub(crate) fn proxy_listener(port: u16) -> Result<OwnedFd, Error> {
    let fail = |e: Errno| Error::ProxyListener {
        port,
        cause: Cause::from(e),
    };
    let sock = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(fail)?;
    setsockopt(&sock, sockopt::ReuseAddr, &true).map_err(fail)?;
    let addr = SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    bind(sock.as_raw_fd(), &addr).map_err(fail)?;
    listen(&sock, Backlog::new(128).map_err(fail)?).map_err(fail)?;
    Ok(sock)
}

/// Local port of a bound socket.
pub(crate) fn local_port(fd: &OwnedFd) -> Option<u16> {
    nix::sys::socket::getsockname::<SockaddrIn>(fd.as_raw_fd())
        .ok()
        .map(|a| a.port())
}
