//! What the kernel says about a process, read from `/proc`: the posture checks of tests and
//! of the supervisor's purge and health verification (uid, capabilities, `no_new_privs`,
//! seccomp mode, namespaces, network interfaces and listening sockets).

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::namespaces::ns_ids_of;
use crate::spec::NsIds;

/// Security-relevant fields of `/proc/PID/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Real, effective, saved and filesystem uid, as seen from the reader's user namespace.
    pub uid: [u32; 4],
    /// Same for gid.
    pub gid: [u32; 4],
    /// `CapInh`, `CapPrm`, `CapEff`, `CapBnd`, `CapAmb` bitmasks.
    pub cap_inh: u64,
    /// Permitted capabilities.
    pub cap_prm: u64,
    /// Effective capabilities.
    pub cap_eff: u64,
    /// Bounding set.
    pub cap_bnd: u64,
    /// Ambient set.
    pub cap_amb: u64,
    /// `NoNewPrivs: 1`.
    pub no_new_privs: bool,
    /// `Seccomp:` mode (0 none, 1 strict, 2 filter).
    pub seccomp: u8,
}

fn ids(value: &str) -> Option<[u32; 4]> {
    let mut it = value.split_whitespace().map(|v| v.parse::<u32>().ok());
    Some([it.next()??, it.next()??, it.next()??, it.next()??])
}

/// Parses the text of `/proc/PID/status`. `None` if a needed field is missing or malformed.
pub fn parse_status(text: &str) -> Option<Status> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key == name).then(|| value.trim())
        })
    };
    let hex = |name: &str| u64::from_str_radix(field(name)?, 16).ok();
    Some(Status {
        uid: ids(field("Uid")?)?,
        gid: ids(field("Gid")?)?,
        cap_inh: hex("CapInh")?,
        cap_prm: hex("CapPrm")?,
        cap_eff: hex("CapEff")?,
        cap_bnd: hex("CapBnd")?,
        cap_amb: hex("CapAmb")?,
        no_new_privs: field("NoNewPrivs")? == "1",
        seccomp: field("Seccomp")?.parse().ok()?,
    })
}

/// The status of a live process.
pub fn status_of(pid: i32) -> io::Result<Status> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status(&text).ok_or_else(|| io::Error::other(format!("/proc/{pid}/status: unparsable")))
}

/// Command line of a process, split at NUL bytes.
pub fn cmdline_of(pid: i32) -> io::Result<Vec<String>> {
    let bytes = fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(bytes
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

/// Interface names listed in a `/proc/PID/net/dev` text.
pub fn parse_net_dev(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .collect()
}

/// Addresses in LISTEN state (`st` = `0A`) in a `/proc/PID/net/tcp` or `tcp6` text.
pub fn parse_tcp_listeners(text: &str) -> Vec<(IpAddr, u16)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != "0A" {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            Some((parse_proc_addr(addr)?, u16::from_str_radix(port, 16).ok()?))
        })
        .collect()
}

/// `/proc/net/tcp*` prints addresses as host-endian 32-bit words in hex.
fn parse_proc_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let chunk = hex.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(chunk, 16).ok()?.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Interfaces of the network namespace `pid` is in.
pub fn interfaces_of(pid: i32) -> io::Result<Vec<String>> {
    Ok(parse_net_dev(&fs::read_to_string(format!(
        "/proc/{pid}/net/dev"
    ))?))
}

/// Listening TCP sockets (v4 and v6) of the network namespace `pid` is in.
pub fn tcp_listeners_of(pid: i32) -> io::Result<Vec<(IpAddr, u16)>> {
    let mut out = parse_tcp_listeners(&fs::read_to_string(format!("/proc/{pid}/net/tcp"))?);
    if let Ok(v6) = fs::read_to_string(format!("/proc/{pid}/net/tcp6")) {
        out.extend(parse_tcp_listeners(&v6));
    }
    Ok(out)
}

/// Namespace ids of `pid` (re-exported for posture checks).
pub fn namespaces_of(pid: i32) -> Result<NsIds, crate::Error> {
    ns_ids_of(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tchromium
Umask:\t0022
State:\tS (sleeping)
Uid:\t201000\t201000\t201000\t201000
Gid:\t201000\t201000\t201000\t201000
NoNewPrivs:\t1
Seccomp:\t2
Seccomp_filters:\t1
CapInh:\t0000000000000000
CapPrm:\t0000000000000000
CapEff:\t0000000000000000
CapBnd:\t0000000000000000
CapAmb:\t0000000000000000
";

    #[test]
    fn status_fields_are_parsed() {
        let s = parse_status(STATUS).unwrap();
        assert_eq!(s.uid, [201000; 4]);
        assert_eq!(s.cap_eff, 0);
        assert!(s.no_new_privs);
        assert_eq!(s.seccomp, 2);
    }

    #[test]
    fn status_with_capabilities_and_no_seccomp() {
        let text = STATUS
            .replace("CapEff:\t0000000000000000", "CapEff:\t000001fffeffffff")
            .replace("Seccomp:\t2", "Seccomp:\t0")
            .replace("NoNewPrivs:\t1", "NoNewPrivs:\t0");
        let s = parse_status(&text).unwrap();
        assert_eq!(s.cap_eff, 0x1fffeffffff);
        assert!(!s.no_new_privs);
        assert_eq!(s.seccomp, 0);
    }

    #[test]
    fn status_without_seccomp_line_is_rejected() {
        let text = STATUS.replace("Seccomp:\t2\n", "");
        assert!(parse_status(&text).is_none());
    }

    #[test]
    fn net_dev_lists_interfaces() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0
";
        assert_eq!(parse_net_dev(text), vec!["lo", "eth0"]);
    }

    #[test]
    fn tcp_listeners_decode_host_endian_addresses() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0C38 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0C38 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1000        0 12346 1 0000000000000000 100 0 0 10 0
";
        let found = parse_tcp_listeners(text);
        if cfg!(target_endian = "little") {
            assert_eq!(found, vec![(IpAddr::V4(Ipv4Addr::LOCALHOST), 3128)]);
        } else {
            assert_eq!(found.len(), 1);
        }
    }

    #[test]
    fn tcp6_listeners_decode() {
        let text = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000
";
        let found = parse_tcp_listeners(text);
        if cfg!(target_endian = "little") {
            assert_eq!(found, vec![(IpAddr::V6(Ipv6Addr::LOCALHOST), 8080)]);
        }
    }
}
