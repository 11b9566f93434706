//! What the kernel says about a process, read from `/proc`: the posture checks of tests and
//! of the supervisor's purge and continuous integrity checks (uid, capabilities,
//! `no_new_privs`, seccomp mode, namespaces and how deep below the session's they are, parent
//! and start time, cgroups, executable, network interfaces and listening sockets).
//!
//! Every reader returns an error (or `None`) when the process is gone: processes come and go
//! while a scan runs, and a vanished `/proc` entry says nothing about the session's posture.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;

use crate::error::Error;
use crate::namespaces::{depth_below, ns_ids_of, ns_ioctl, open_ns};
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

/// Fields of `/proc/PID/stat` that identify a process and its place in the process tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// The command name (`comm`, at most 15 bytes; the process may set it).
    pub comm: String,
    /// State letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Parent pid, as seen from the reader's pid namespace (0 when the parent is outside it).
    pub ppid: i32,
    /// Start time in clock ticks after boot: with the pid, it names one process for good (a
    /// recycled pid has a later start time).
    pub start_time: u64,
}

impl Stat {
    /// Whether the process has exited and only waits to be reaped (`Z`) or is being removed.
    pub fn is_gone(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the text of `/proc/PID/stat`. The command name may hold spaces and parentheses, so
/// the fields are read after the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    // starttime is field 22 of the line, the 20th after the command name.
    let start_time = rest.nth(17)?.parse().ok()?;
    Some(Stat {
        comm,
        state,
        ppid,
        start_time,
    })
}

/// The [`Stat`] of a live process.
pub fn stat_of(pid: i32) -> io::Result<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat: unparsable")))
}

/// How long ago a process with `start_time` (clock ticks after boot, see [`Stat`]) started.
/// `None` if the clock cannot be read.
pub fn age_of(start_time: u64) -> Option<Duration> {
    Some(uptime()?.saturating_sub(since_boot(start_time)?))
}

/// When a process with `start_time` started, counted from boot.
pub fn since_boot(start_time: u64) -> Option<Duration> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)? as u64;
    Some(
        Duration::from_secs(start_time / ticks)
            + Duration::from_nanos((start_time % ticks) * 1_000_000_000 / ticks),
    )
}

/// Time since boot on the clock process start times are counted on (`/proc/uptime`).
pub fn uptime() -> Option<Duration> {
    let secs: f64 = fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(Duration::from_secs_f64(secs.max(0.0)))
}

/// One line of `/proc/PID/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLine {
    /// Hierarchy id (0 for the v2 unified hierarchy).
    pub hierarchy: u32,
    /// Controllers bound to the hierarchy (v1); empty for v2. Named v1 hierarchies such as
    /// `name=systemd` appear as they are written.
    pub controllers: Vec<String>,
    /// The cgroup, relative to the hierarchy's root as the reader's cgroup namespace sees it.
    pub path: String,
}

/// Parses the text of `/proc/PID/cgroup`; malformed lines are skipped.
pub fn parse_cgroup(text: &str) -> Vec<CgroupLine> {
    text.lines()
        .filter_map(|line| {
            let (id, rest) = line.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            Some(CgroupLine {
                hierarchy: id.parse().ok()?,
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// The cgroups of a live process.
pub fn cgroup_of(pid: i32) -> io::Result<Vec<CgroupLine>> {
    Ok(parse_cgroup(&fs::read_to_string(format!(
        "/proc/{pid}/cgroup"
    ))?))
}

/// Whether `lines` put a process in the cgroup directory `dir` (as the launcher creates them,
/// see [`crate::Handle::cgroups`]) or in one below it: on v1, `dir` is
/// `/sys/fs/cgroup/<controller>/<path>` and the line of the hierarchy carrying `<controller>`
/// must name `<path>`; on v2, `dir` is `/sys/fs/cgroup/<path>` and the `0::` line must.
pub fn in_cgroup_dir(lines: &[CgroupLine], dir: &Path) -> bool {
    let Ok(rel) = dir.strip_prefix(crate::cgroup::ROOT) else {
        return false;
    };
    let within = |have: &str, want: &Path| {
        let want = Path::new("/").join(want);
        Path::new(have).starts_with(&want)
    };
    let mut parts = rel.components();
    let v1 = parts
        .next()
        .and_then(|c| c.as_os_str().to_str())
        .map(|controller| {
            lines.iter().any(|l| {
                l.controllers.iter().any(|c| c == controller) && within(&l.path, parts.as_path())
            })
        });
    let v2 = lines
        .iter()
        .any(|l| l.hierarchy == 0 && l.controllers.is_empty() && within(&l.path, rel));
    v1.unwrap_or(false) || v2
}

/// The executable a live process runs. The kernel appends ` (deleted)` when the file was
/// replaced or removed since; that suffix is taken off (an upgraded package is not drift).
pub fn exe_of(pid: i32) -> io::Result<PathBuf> {
    let target = fs::read_link(format!("/proc/{pid}/exe"))?;
    Ok(
        match target.to_str().and_then(|t| t.strip_suffix(" (deleted)")) {
            Some(t) => PathBuf::from(t),
            None => target,
        },
    )
}

/// Inode of one of a process's namespaces (`kind`: `user`, `pid`, `net`, `mnt`, `ipc`,
/// `uts`, ...).
pub fn ns_inode_of(pid: i32, kind: &str) -> io::Result<u64> {
    Ok(fs::metadata(format!("/proc/{pid}/ns/{kind}"))?.ino())
}

fn ns_fd(pid: i32, kind: &str) -> Option<OwnedFd> {
    open_ns(Path::new(&format!("/proc/{pid}")), kind)
}

/// How many levels below the user namespace with inode `user` the process's user namespace
/// is: `Some(0)` when it is that namespace, `None` when it is outside it (or the process is
/// gone).
pub fn user_ns_depth(pid: i32, user: u64) -> Option<u32> {
    depth_below(ns_fd(pid, "user")?, user)
}

/// Whether the process's pid namespace is the one with inode `pid_ns` or nested below it.
pub fn pid_ns_within(pid: i32, pid_ns: u64) -> bool {
    ns_fd(pid, "pid").is_some_and(|fd| depth_below(fd, pid_ns).is_some())
}

/// How many levels below the user namespace `user` the user namespace that owns the
/// process's `kind` namespace is (`None`: owned by one outside it). A network namespace
/// that Chromium's sandbox makes for a renderer is owned by its nested user namespace (depth
/// 1 or more); the session's own by the session's (0); the host's by the host's (`None`).
pub fn ns_owner_depth(pid: i32, kind: &str, user: u64) -> Option<u32> {
    let owner = ns_ioctl(&ns_fd(pid, kind)?, libc::NS_GET_USERNS)?;
    depth_below(owner, user)
}

/// Every live host process outside the user namespace `user` (and those below it) that is in
/// one of the namespaces in `inodes` (`(kind, inode)`, e.g. `("net", …)`): someone who
/// entered the session's network or mount namespace from outside (`nsenter -n`), whom
/// [`crate::processes_in`] does not see. The caller must keep those namespaces alive (an
/// open fd) while it relies on their inodes. Zombies and the caller are not listed.
pub fn outsiders(user: u64, inodes: &[(&str, u64)]) -> Vec<i32> {
    let mut pids: Vec<i32> = crate::namespaces::other_pids()
        .filter(|&pid| {
            inodes
                .iter()
                .any(|(kind, ino)| ns_inode_of(pid, kind).is_ok_and(|i| i == *ino))
        })
        .filter(|&pid| user_ns_depth(pid, user).is_none())
        .filter(|&pid| stat_of(pid).is_ok_and(|s| !s.is_gone()))
        .collect();
    pids.sort_unstable();
    pids
}

/// SIGKILLs the process `pid` if it is still the one that started at `start_time` (so a
/// recycled pid is never hit). `Ok(false)` when it was already gone.
pub fn kill_process(pid: i32, start_time: u64) -> Result<bool, Error> {
    let fd = match crate::handle::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(_) if stat_of(pid).is_err() => return Ok(false),
        Err(e) => return Err(e),
    };
    // The pidfd holds on to whatever process had the pid when it was opened: if that one
    // started when expected, the signal reaches the right process.
    match stat_of(pid) {
        Ok(s) if s.start_time == start_time => {}
        _ => return Ok(false),
    }
    match crate::handle::pidfd_send_sigkill(&fd) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(Error::Kill(e.into())),
    }
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

    #[test]
    fn stat_fields_survive_odd_command_names() {
        let text = "4242 (a) b (c)) S 17 4242 4242 0 -1 4194560 500 0 0 0 3 1 0 0 20 0 7 0 123456 1000 100 18446744073709551615";
        let s = parse_stat(text).unwrap();
        assert_eq!(s.comm, "a) b (c)");
        assert_eq!((s.state, s.ppid, s.start_time), ('S', 17, 123456));
        assert!(!s.is_gone());
        assert!(parse_stat("4242 (x) Z 1").is_none());
        let zombie = text.replace(") S 17", ") Z 17");
        assert!(parse_stat(&zombie).unwrap().is_gone());
    }

    #[test]
    fn own_stat_names_parent_and_is_older_than_a_new_child() {
        let me = stat_of(std::process::id() as i32).unwrap();
        assert_eq!(me.ppid, std::os::unix::process::parent_id() as i32);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let c = stat_of(child.id() as i32).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(c.ppid, std::process::id() as i32);
        assert!(c.start_time >= me.start_time);
        assert!(age_of(c.start_time).unwrap() <= age_of(me.start_time).unwrap());
    }

    const CGROUP_V1: &str = "9:name=systemd:/
8:pids:/chaperone/chaperone-ab
4:memory:/chaperone/chaperone-ab
2:cpu,cpuacct:/
0::/
";

    #[test]
    fn cgroup_lines_parse() {
        let lines = parse_cgroup(CGROUP_V1);
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0].controllers, ["name=systemd"]);
        assert_eq!(lines[3].controllers, ["cpu", "cpuacct"]);
        assert_eq!(lines[4].hierarchy, 0);
        assert!(lines[4].controllers.is_empty());
        assert_eq!(lines[1].path, "/chaperone/chaperone-ab");
    }

    #[test]
    fn cgroup_membership_on_v1_and_v2() {
        let v1 = parse_cgroup(CGROUP_V1);
        let dir = |p: &str| PathBuf::from(format!("/sys/fs/cgroup/{p}"));
        assert!(in_cgroup_dir(&v1, &dir("memory/chaperone/chaperone-ab")));
        assert!(in_cgroup_dir(&v1, &dir("pids/chaperone/chaperone-ab")));
        // A sibling whose name only starts the same is another cgroup.
        assert!(!in_cgroup_dir(&v1, &dir("pids/chaperone/chaperone-a")));
        assert!(!in_cgroup_dir(&v1, &dir("cpu/chaperone/chaperone-ab")));
        assert!(!in_cgroup_dir(&v1, Path::new("/elsewhere/pids/chaperone")));
        let v2 = parse_cgroup("0::/chaperone/chaperone-ab/inner\n");
        assert!(in_cgroup_dir(&v2, &dir("chaperone/chaperone-ab")));
        assert!(!in_cgroup_dir(&v2, &dir("chaperone/chaperone-cd")));
        let outside = parse_cgroup("0::/user.slice\n4:memory:/\n");
        assert!(!in_cgroup_dir(&outside, &dir("chaperone/chaperone-ab")));
        assert!(!in_cgroup_dir(
            &outside,
            &dir("memory/chaperone/chaperone-ab")
        ));
    }

    #[test]
    fn own_namespaces_depth_and_owner() {
        let me = std::process::id() as i32;
        let user = ns_inode_of(me, "user").unwrap();
        assert_eq!(user_ns_depth(me, user), Some(0));
        assert_eq!(user_ns_depth(me, 1), None);
        assert!(pid_ns_within(me, ns_inode_of(me, "pid").unwrap()));
        assert!(!pid_ns_within(me, 1));
        // Our network namespace is owned by our user namespace (or one above it, when the
        // test runs in a container whose network namespace came first).
        let owner = ns_owner_depth(me, "net", user);
        let above = ns_ioctl(&ns_fd(me, "net").unwrap(), libc::NS_GET_USERNS).is_some();
        assert!(owner == Some(0) || (owner.is_none() && above), "{owner:?}");
        assert!(exe_of(me).unwrap().is_absolute());
    }

    #[test]
    fn outsiders_are_those_in_the_namespace_but_not_below_the_user_namespace() {
        let me = std::process::id() as i32;
        let user = ns_inode_of(me, "user").unwrap();
        let net = ns_inode_of(me, "net").unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Seen from a user namespace it is not in (no inode is 1), the child is an outsider in
        // our network namespace; from its own, it is not.
        let foreign = outsiders(1, &[("net", net)]);
        let own = outsiders(user, &[("net", net)]);
        let elsewhere = outsiders(1, &[("net", 1)]);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(foreign.contains(&pid), "{foreign:?}");
        assert!(!foreign.contains(&me));
        assert!(!own.contains(&pid), "{own:?}");
        assert!(!elsewhere.contains(&pid));
    }

    #[test]
    fn kill_process_spares_a_recycled_pid() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = stat_of(pid).unwrap().start_time;
        assert!(!kill_process(pid, start + 1).unwrap());
        assert!(
            child.try_wait().unwrap().is_none(),
            "the wrong process was killed"
        );
        assert!(kill_process(pid, start).unwrap());
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Reaped: gone, or the pid belongs to a later process now.
        assert!(!kill_process(pid, start).unwrap());
    }
}
