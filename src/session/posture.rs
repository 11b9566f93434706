//! Continuous integrity ("posture") of a live session: every `[posture] interval`, and on
//! `GET /v1/sessions/{id}/posture`, the supervisor re-reads from `/proc` what the kernel says
//! about every process of the session and re-checks the mandate under the current policy. Any
//! drift is recorded (`session.posture_drift`, naming each check, pid and command) and ends
//! the session (`session.revoked`, trigger `posture`), which is then purged as always.
//!
//! A [`Baseline`] is taken once, right after the browser answered its first CDP command:
//! the session's namespace init and launcher (pid and start time), its namespaces (held open,
//! so their inode numbers stay theirs), its host uid and gid, its cgroup lines, the
//! executables it may run. Whether a Chromium process kind runs under seccomp is fixed the
//! first time a settled process of that kind is seen (renderers always do).
//!
//! What a session of Chromium 156 looks like, measured on this host (supervisor as root,
//! session host uid 1500000, 13 processes idle, up to 18 with pages opening and closing,
//! sampled every few milliseconds over 10 rounds of three pages with iframes, workers and WebGL,
//! plus a second browser context):
//!
//! | process | user ns | pid ns | net ns | seccomp | capabilities |
//! |---|---|---|---|---|---|
//! | launcher (supervisor binary) | session's | host's | session's | 0 | none, bounding set empty |
//! | namespace init (supervisor binary) | session's | session's | session's | 0 | none, bounding set empty |
//! | browser, 2 crashpad handlers, `--type=zygote --no-zygote-sandbox`, `gpu-process`, `utility` network service | session's | session's | session's | 0 | none, bounding set empty |
//! | sandboxed `--type=zygote` (two: the nested namespace's pid 1 and the zygote) | 1 below | 1 below | Chromium's own | 0 | bounding set full in its own user ns; the zygote holds `CAP_SYS_ADMIN` effective there |
//! | `--type=renderer`, `utility` storage service | 1 below | own, below | Chromium's own | 2 | none effective or permitted, bounding set full in its own user ns |
//!
//! Every process: `NoNewPrivs: 1`, the session's uid and gid in all four slots, no ambient or
//! inheritable capability, the session's mount, IPC and UTS namespaces (Chromium's sandbox
//! adds user, pid and network namespaces only), exactly the init's cgroup lines, an
//! executable under the browser's directory (`/usr/lib/chromium/`) except the launcher and
//! init, and a parent chain that leads to the init. Transients: a renderer fresh from the
//! zygote ran without its seccomp filter for up to 30 ms (16 of 11 000 samples); a process
//! that is exiting shows an empty command line and no executable.
//!
//! Hence the rules. Those that hold from a process's first instant apply at once; those
//! Chromium establishes right after a fork (seccomp, dropping the zygote's capability) apply
//! once the process is [`SETTLE`] old:
//! - `namespace`: user and pid namespace at or below the session's (the launcher's pid
//!   namespace is the host's); mount, IPC and UTS the session's; network the session's or one
//!   owned by a user namespace below the session's. A process outside the session's user
//!   namespace but inside its network, mount, IPC or UTS namespace (`nsenter -n`) is drift.
//! - `uid`: real, effective, saved and filesystem uid and gid are the init's.
//! - `no_new_privs`: set.
//! - `capabilities`: in the session's user namespace (and outside it), all five sets empty;
//!   below it, no ambient or inheritable capability, once settled nothing beyond
//!   `CAP_SYS_ADMIN` (within Chromium's own user namespace) and nothing at all for the
//!   seccomp-sandboxed kinds; and no process gains a capability between two checks.
//! - `seccomp`: renderers, and every kind whose settled processes ran under seccomp when the
//!   kind was first seen settled, run in mode 2 once settled; no process leaves seccomp
//!   between two checks.
//! - `executable`: under the browser's directory (the launcher and init: the binary they ran
//!   at the baseline).
//! - `unexpected_process`: the parent chain leads to the session's init.
//! - `cgroup`: the process's cgroup lines are the init's, which hold the session's cgroups.
//! - `mandate`: the mandate still holds under the current policy (deadline, window,
//!   validation under today's limits, agent key, held credentials; the checks a resumption
//!   makes). A passed deadline or closed window ends the session as the lifecycle's clocks
//!   do (`expired`, `window_ended`); the rest is drift.
//!
//! A process that vanishes mid-scan (or whose pid is recycled while it is read) is skipped:
//! a vanished `/proc` entry says nothing about the session's posture.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chaperone_sandbox as sandbox;
use sandbox::posture::{self as kernel, CgroupLine, Status};
use serde::Serialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::{rfc3339, EndReason, Registry, Session};

/// How old a process must be before the rules Chromium establishes right after a fork apply
/// to it (its seccomp filter, the zygote's capability dropped): measured at most 30 ms; the
/// margin covers a loaded host.
pub const SETTLE: Duration = Duration::from_secs(2);

/// What a process below the session's user namespace may hold there: Chromium's zygote keeps
/// `CAP_SYS_ADMIN` in its own user namespace (measured), which grants nothing over the
/// session's or the host's namespaces.
const NESTED_CAPS: u64 = 1 << 21;

/// Kinds that always run under seccomp, whatever the baseline saw.
const ALWAYS_SANDBOXED: &[&str] = &["renderer"];

/// Drift entries kept per report (a session gone wrong could list every process many times).
const MAX_DRIFT: usize = 100;

/// Drift entries an audit record carries; `drift_total` counts them all.
const MAX_AUDITED: usize = 32;

/// Which rule a drift broke; the names are stable (audit records, API, metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Namespaces other than the session's.
    Namespace,
    /// Host uid or gid other than the session's.
    Uid,
    /// `no_new_privs` not set.
    NoNewPrivs,
    /// Capabilities beyond what the process may hold, or gained.
    Capabilities,
    /// A sandboxed kind without seccomp, or a process that left it.
    Seccomp,
    /// An executable outside the browser's directory.
    Executable,
    /// A parent chain that does not lead to the session's init.
    UnexpectedProcess,
    /// Not in the session's cgroups.
    Cgroup,
    /// The mandate no longer holds under the current policy.
    Mandate,
}

impl Check {
    /// The stable name.
    pub fn name(self) -> &'static str {
        match self {
            Check::Namespace => "namespace",
            Check::Uid => "uid",
            Check::NoNewPrivs => "no_new_privs",
            Check::Capabilities => "capabilities",
            Check::Seccomp => "seccomp",
            Check::Executable => "executable",
            Check::UnexpectedProcess => "unexpected_process",
            Check::Cgroup => "cgroup",
            Check::Mandate => "mandate",
        }
    }
}

/// One broken rule.
#[derive(Clone, Debug, Serialize)]
pub struct Drift {
    /// The rule.
    pub check: Check,
    /// The host pid it concerns (none for the mandate).
    pub pid: Option<i32>,
    /// Its command name (`comm`, as the process set it).
    pub command: Option<String>,
    /// What was found, and what was expected.
    pub detail: String,
}

/// The outcome of one check.
#[derive(Clone, Debug)]
pub struct Report {
    /// When it ran.
    pub checked_at: OffsetDateTime,
    /// Processes examined (the session's and any intruder in its namespaces).
    pub processes: usize,
    /// Every broken rule (at most [`MAX_DRIFT`]).
    pub drift: Vec<Drift>,
    /// How long the `/proc` scan took.
    pub took: Duration,
    /// The mandate field at fault, when the mandate no longer holds.
    pub mandate_field: Option<String>,
}

impl Report {
    /// Whether nothing drifted.
    pub fn ok(&self) -> bool {
        self.drift.is_empty()
    }

    /// The names of the broken rules, each once.
    pub fn checks(&self) -> Vec<&'static str> {
        let set: BTreeSet<Check> = self.drift.iter().map(|d| d.check).collect();
        set.into_iter().map(Check::name).collect()
    }

    /// The pids involved, each once.
    pub fn pids(&self) -> Vec<i32> {
        let set: BTreeSet<i32> = self.drift.iter().filter_map(|d| d.pid).collect();
        set.into_iter().collect()
    }

    /// The answer of `GET /v1/sessions/{id}/posture`.
    pub fn to_json(&self, session: &str) -> Value {
        json!({
            "session": session,
            "checked_at": rfc3339(self.checked_at),
            "ok": self.ok(),
            "processes": self.processes,
            "took_ms": (self.took.as_secs_f64() * 1e6).round() / 1e3,
            "drift": self.drift,
        })
    }

    fn push(&mut self, d: Drift) {
        if self.drift.len() < MAX_DRIFT {
            self.drift.push(d);
        }
    }
}

/// A process identified for good: its pid and start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Ident {
    pid: i32,
    start: u64,
}

impl Ident {
    fn of(pid: i32, what: &str) -> Result<Ident, String> {
        let s =
            kernel::stat_of(pid).map_err(|e| format!("the session's {what} (pid {pid}): {e}"))?;
        if s.is_gone() {
            return Err(format!("the session's {what} (pid {pid}) has exited"));
        }
        Ok(Ident {
            pid,
            start: s.start_time,
        })
    }
}

/// The session's namespaces besides user and pid, by kind, with their inodes.
const SHARED_NS: [&str; 4] = ["net", "mnt", "ipc", "uts"];

/// What is legitimate for one session, taken right after its launch.
pub struct Baseline {
    init: Ident,
    launcher: Ident,
    ns: sandbox::NsIds,
    ipc: u64,
    uts: u64,
    /// The session's six namespaces, held open so that no later namespace can get one of
    /// their inode numbers while the checks and the purge rely on them.
    _pins: Vec<File>,
    uid: [u32; 4],
    gid: [u32; 4],
    cgroups: Vec<CgroupLine>,
    launcher_exe: PathBuf,
    init_exe: PathBuf,
    browser_dir: PathBuf,
}

impl Baseline {
    /// Reads the baseline of the session `h` runs, whose browser is the program `browser`.
    /// Blocking (`/proc`). Fails, naming what, when the session is not what its launch
    /// reported (its init is not in its namespaces or cgroups): such a session must not run.
    pub fn take(h: &sandbox::Handle, browser: &Path) -> Result<Baseline, String> {
        let init = Ident::of(h.init_pid, "namespace init")?;
        let launcher = Ident::of(h.launcher_pid, "sandbox launcher")?;
        let mut pins = Vec::new();
        let mut inode = HashMap::new();
        for kind in ["user", "pid", "net", "mnt", "ipc", "uts"] {
            let path = format!("/proc/{}/ns/{kind}", init.pid);
            let f = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            let ino = f.metadata().map_err(|e| format!("{path}: {e}"))?.ino();
            inode.insert(kind, ino);
            pins.push(f);
        }
        // The pins came from the init only if it is still the same process.
        if Ident::of(init.pid, "namespace init")? != init {
            return Err(format!(
                "the session's init (pid {}) was replaced",
                init.pid
            ));
        }
        for (kind, want) in [
            ("user", h.ns.user),
            ("pid", h.ns.pid),
            ("net", h.ns.net),
            ("mnt", h.ns.mnt),
        ] {
            if inode[kind] != want {
                return Err(format!(
                    "the session's init (pid {}) is not in the session's {kind} namespace ({} instead of {want})",
                    init.pid, inode[kind]
                ));
            }
        }
        let status = kernel::status_of(init.pid).map_err(|e| format!("init status: {e}"))?;
        let cgroups = kernel::cgroup_of(init.pid).map_err(|e| format!("init cgroups: {e}"))?;
        for dir in &h.cgroups {
            if !kernel::in_cgroup_dir(&cgroups, dir) {
                return Err(format!(
                    "the session's init (pid {}) is not in its cgroup {}",
                    init.pid,
                    dir.display()
                ));
            }
        }
        let launcher_exe =
            kernel::exe_of(launcher.pid).map_err(|e| format!("launcher executable: {e}"))?;
        let init_exe = kernel::exe_of(init.pid).map_err(|e| format!("init executable: {e}"))?;
        let browser_dir = browser
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("/"))
            .to_path_buf();

        // No scan of every process here: this runs on the session's start path.
        Ok(Baseline {
            init,
            launcher,
            ns: h.ns,
            ipc: inode["ipc"],
            uts: inode["uts"],
            _pins: pins,
            uid: status.uid,
            gid: status.gid,
            cgroups,
            launcher_exe,
            init_exe,
            browser_dir,
        })
    }

    /// A summary for the `session.active` record.
    pub fn summary(&self) -> Value {
        json!({
            "uid": self.uid[0],
            "gid": self.gid[0],
            "always_sandboxed": ALWAYS_SANDBOXED,
        })
    }

    fn shared_ns(&self) -> [(&'static str, u64); 4] {
        [
            ("net", self.ns.net),
            ("mnt", self.ns.mnt),
            ("ipc", self.ipc),
            ("uts", self.uts),
        ]
    }
}

/// Chromium's process kind from its command line: `renderer`, `zygote`, `gpu-process`,
/// `utility/<service>`; `None` for the browser, crashpad and anything else. Chromium rewrites
/// its command line into one space-separated string, so both separators count.
fn kind_of(pid: i32) -> Option<String> {
    let args = kernel::cmdline_of(pid).ok()?;
    kind_from_args(&args)
}

fn kind_from_args(args: &[String]) -> Option<String> {
    let words = || args.iter().flat_map(|a| a.split_whitespace());
    let kind = words().find_map(|w| w.strip_prefix("--type="))?;
    match words().find_map(|w| w.strip_prefix("--utility-sub-type=")) {
        Some(sub) => Some(format!("{kind}/{sub}")),
        None => Some(kind.to_string()),
    }
}

/// What one scan read about one process.
struct Observed {
    id: Ident,
    comm: String,
    status: Status,
    user_ns: u64,
    /// Levels below the session's user namespace; `None`: outside it.
    depth: Option<u32>,
    pid_ns_within: bool,
    shared: [(&'static str, Option<u64>); 4],
    net_owner_depth: Option<u32>,
    cgroups: Vec<CgroupLine>,
    exe: Option<PathBuf>,
    kind: Option<String>,
    age: Option<Duration>,
}

impl Observed {
    /// Reads a process; `None` when it vanished (or its pid was recycled) while being read.
    fn read(pid: i32, base: &Baseline, uptime: Option<Duration>) -> Option<Observed> {
        let st = kernel::stat_of(pid).ok()?;
        if st.is_gone() {
            return None;
        }
        let status = kernel::status_of(pid).ok()?;
        let user_ns = kernel::ns_inode_of(pid, "user").ok()?;
        let depth = kernel::user_ns_depth(pid, base.ns.user);
        let pid_ns_within = kernel::pid_ns_within(pid, base.ns.pid);
        let shared = SHARED_NS.map(|kind| (kind, kernel::ns_inode_of(pid, kind).ok()));
        let net_owner_depth = kernel::ns_owner_depth(pid, "net", base.ns.user);
        let cgroups = kernel::cgroup_of(pid).ok()?;
        // An exiting process has no executable left to show.
        let exe = kernel::exe_of(pid).ok();
        let kind = kind_of(pid);
        // Everything above belongs to `pid` only if it is still the process that was stat'ed.
        let again = kernel::stat_of(pid).ok()?;
        if again.start_time != st.start_time || again.is_gone() {
            return None;
        }
        Some(Observed {
            id: Ident {
                pid,
                start: st.start_time,
            },
            comm: st.comm,
            status,
            user_ns,
            depth,
            pid_ns_within,
            shared,
            net_owner_depth,
            cgroups,
            exe,
            kind,
            age: uptime
                .zip(kernel::since_boot(st.start_time))
                .map(|(up, at)| up.saturating_sub(at)),
        })
    }

    fn settled(&self) -> bool {
        self.age.is_some_and(|a| a >= SETTLE)
    }

    fn caps(&self) -> [u64; 5] {
        let s = &self.status;
        [s.cap_inh, s.cap_prm, s.cap_eff, s.cap_bnd, s.cap_amb]
    }
}

fn caps_text(c: [u64; 5]) -> String {
    format!(
        "CapInh={:016x} CapPrm={:016x} CapEff={:016x} CapBnd={:016x} CapAmb={:016x}",
        c[0], c[1], c[2], c[3], c[4]
    )
}

fn cgroup_text(lines: &[CgroupLine]) -> String {
    lines
        .iter()
        .map(|l| format!("{}:{}:{}", l.hierarchy, l.controllers.join(","), l.path))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the previous check saw of a process, for the "never gains" rules.
#[derive(Clone, Copy)]
struct Seen {
    user_ns: u64,
    caps: [u64; 5],
    seccomp: u8,
}

/// The checks of one live session: its baseline and what earlier checks saw.
pub struct Monitor {
    base: Baseline,
    seen: Mutex<HashMap<Ident, Seen>>,
    /// Whether each Chromium process kind runs under seccomp, fixed the first time a settled
    /// process of the kind is seen (most are younger than [`SETTLE`] at the baseline, which
    /// is taken as soon as the browser answers).
    kinds: Mutex<HashMap<String, bool>>,
    reported: AtomicBool,
}

impl Monitor {
    /// Starts watching a session from its baseline.
    pub fn new(base: Baseline) -> Self {
        let kinds = ALWAYS_SANDBOXED
            .iter()
            .map(|k| (k.to_string(), true))
            .collect();
        Monitor {
            base,
            seen: Mutex::new(HashMap::new()),
            kinds: Mutex::new(kinds),
            reported: AtomicBool::new(false),
        }
    }

    /// The baseline.
    pub fn baseline(&self) -> &Baseline {
        &self.base
    }

    /// Processes outside the session's user namespace but inside one of its other namespaces.
    pub fn outsiders(&self) -> Vec<i32> {
        kernel::outsiders(self.base.ns.user, &self.base.shared_ns())
    }

    /// Checks every process of the session (and anyone who entered its namespaces) against
    /// the rules of the module doc. Blocking: reads `/proc`. The mandate is checked by
    /// [`Registry::check_posture`].
    pub fn check(&self) -> Report {
        let started = Instant::now();
        let checked_at = OffsetDateTime::now_utc();
        let mut pids = sandbox::processes_in(&self.base.ns);
        pids.extend(self.outsiders());
        pids.sort_unstable();
        pids.dedup();
        // Read before any process: a process that starts later looks younger, never older.
        let uptime = kernel::uptime();
        let observed: Vec<Observed> = pids
            .into_iter()
            .filter_map(|p| Observed::read(p, &self.base, uptime))
            .collect();
        let mut report = Report {
            checked_at,
            processes: observed.len(),
            drift: Vec::new(),
            took: Duration::ZERO,
            mandate_field: None,
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let sandboxed = self.learn_kinds(&observed);
        let mut now_seen = HashMap::with_capacity(observed.len());
        let mut chains = HashMap::new();
        for p in &observed {
            let before = seen.get(&p.id).filter(|s| s.user_ns == p.user_ns).copied();
            let sandboxed_kind = p.kind.as_ref().is_some_and(|k| sandboxed.contains(k));
            self.judge(p, before, sandboxed_kind, &mut chains, &mut report);
            now_seen.insert(
                p.id,
                Seen {
                    user_ns: p.user_ns,
                    caps: p.caps(),
                    seccomp: p.status.seccomp,
                },
            );
        }
        *seen = now_seen;
        report.took = started.elapsed();
        report
    }

    /// Fixes whether each kind seen settled for the first time runs under seccomp (it does if
    /// any of its settled processes does), and returns the kinds that do.
    fn learn_kinds(&self, observed: &[Observed]) -> BTreeSet<String> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let mut first: HashMap<&str, bool> = HashMap::new();
        for p in observed.iter().filter(|p| p.settled()) {
            if let Some(k) = p.kind.as_deref().filter(|k| !kinds.contains_key(*k)) {
                *first.entry(k).or_insert(false) |= p.status.seccomp == 2;
            }
        }
        for (k, sandboxed) in first {
            kinds.insert(k.to_string(), sandboxed);
        }
        kinds
            .iter()
            .filter(|(_, sandboxed)| **sandboxed)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn judge(
        &self,
        p: &Observed,
        before: Option<Seen>,
        sandboxed_kind: bool,
        chains: &mut HashMap<i32, bool>,
        report: &mut Report,
    ) {
        let base = &self.base;
        let is_launcher = p.id == base.launcher;
        let is_init = p.id == base.init;
        let mut drift = |check: Check, detail: String| {
            report.push(Drift {
                check,
                pid: Some(p.id.pid),
                command: Some(p.comm.clone()),
                detail,
            })
        };

        // namespace
        let mut wrong_ns = Vec::new();
        match p.depth {
            None => {
                let inside: Vec<&str> = p
                    .shared
                    .iter()
                    .zip(base.shared_ns())
                    .filter(|((_, have), (_, want))| *have == Some(*want))
                    .map(|((kind, _), _)| *kind)
                    .collect();
                let inside = if inside.is_empty() && p.pid_ns_within {
                    vec!["pid"]
                } else {
                    inside
                };
                wrong_ns.push(format!(
                    "outside the session's user namespace, inside its {} namespace",
                    inside.join("+")
                ));
            }
            Some(depth) => {
                if !p.pid_ns_within && !is_launcher {
                    wrong_ns.push("pid namespace outside the session's".to_string());
                }
                for ((kind, have), (_, want)) in p.shared.iter().zip(base.shared_ns()) {
                    let Some(have) = *have else { continue };
                    let chromiums_own =
                        *kind == "net" && depth >= 1 && p.net_owner_depth.is_some_and(|d| d >= 1);
                    if have != want && !chromiums_own {
                        wrong_ns.push(format!(
                            "{kind} namespace {have} is not the session's ({want})"
                        ));
                    }
                }
            }
        }
        if !wrong_ns.is_empty() {
            drift(Check::Namespace, wrong_ns.join("; "));
        }

        // uid
        if p.status.uid != base.uid || p.status.gid != base.gid {
            drift(
                Check::Uid,
                format!(
                    "runs as host uid {:?} gid {:?}; the session's processes run as uid {} gid {}",
                    p.status.uid, p.status.gid, base.uid[0], base.gid[0]
                ),
            );
        }

        // no_new_privs
        if !p.status.no_new_privs {
            drift(
                Check::NoNewPrivs,
                "no_new_privs is not set: an execve could gain privileges".into(),
            );
        }

        // capabilities
        let caps = p.caps();
        let [inh, prm, eff, _bnd, amb] = caps;
        let cap_problem = match p.depth {
            Some(0) | None if caps.iter().any(|c| *c != 0) => Some(format!(
                "holds capabilities in {} user namespace: {}",
                if p.depth.is_some() {
                    "the session's"
                } else {
                    "its"
                },
                caps_text(caps)
            )),
            Some(d) if d >= 1 && (inh | amb) != 0 => Some(format!(
                "holds inheritable or ambient capabilities: {}",
                caps_text(caps)
            )),
            Some(d) if d >= 1 && p.settled() && (prm | eff) & !NESTED_CAPS != 0 => Some(format!(
                "holds more than CAP_SYS_ADMIN in Chromium's user namespace: {}",
                caps_text(caps)
            )),
            Some(d) if d >= 1 && p.settled() && sandboxed_kind && (prm | eff) != 0 => {
                Some(format!(
                    "a sandboxed {} holds capabilities: {}",
                    p.kind.as_deref().unwrap_or("process"),
                    caps_text(caps)
                ))
            }
            _ => None,
        };
        let gained = before.and_then(|b| {
            let new: Vec<String> = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]
                .iter()
                .zip(caps.iter().zip(b.caps))
                .filter(|(_, (now, was))| *now & !*was != 0)
                .map(|(name, (now, was))| format!("{name} {was:016x} -> {now:016x}"))
                .collect();
            (!new.is_empty()).then(|| {
                format!(
                    "gained capabilities since the last check: {}",
                    new.join(", ")
                )
            })
        });
        if let Some(detail) = [cap_problem, gained]
            .into_iter()
            .flatten()
            .reduce(|a, b| format!("{a}; {b}"))
        {
            drift(Check::Capabilities, detail);
        }

        // seccomp
        if p.status.seccomp != 2 {
            if let Some(b) = before.filter(|b| b.seccomp == 2) {
                drift(
                    Check::Seccomp,
                    format!(
                        "left seccomp: mode {} after {}",
                        p.status.seccomp, b.seccomp
                    ),
                );
            } else if sandboxed_kind && p.settled() {
                drift(
                    Check::Seccomp,
                    format!(
                        "Chromium's {} runs without its seccomp filter (mode {})",
                        p.kind.as_deref().unwrap_or("process"),
                        p.status.seccomp
                    ),
                );
            }
        }

        // executable
        if let Some(exe) = &p.exe {
            let allowed = if is_launcher {
                *exe == base.launcher_exe
            } else if is_init {
                *exe == base.init_exe
            } else {
                exe.starts_with(&base.browser_dir)
            };
            if !allowed {
                drift(
                    Check::Executable,
                    format!(
                        "runs {}, outside the browser's directory {}",
                        exe.display(),
                        base.browser_dir.display()
                    ),
                );
            }
        }

        // unexpected_process
        if !is_launcher && !is_init {
            if let Some(false) = self.leads_to_init(p.id.pid, chains) {
                drift(
                    Check::UnexpectedProcess,
                    format!(
                        "its parent chain does not lead to the session's init (pid {})",
                        base.init.pid
                    ),
                );
            }
        }

        // cgroup
        if p.cgroups != base.cgroups {
            drift(
                Check::Cgroup,
                format!(
                    "in cgroups {}; the session's are {}",
                    cgroup_text(&p.cgroups),
                    cgroup_text(&base.cgroups)
                ),
            );
        }
    }

    /// Whether `pid`'s parent chain leads to the session's init; `None` when `pid` vanished.
    /// An ancestor that exits mid-walk re-parents its children, so the walk starts over.
    /// `known` holds the pids of this scan already found to lead there.
    fn leads_to_init(&self, pid: i32, known: &mut HashMap<i32, bool>) -> Option<bool> {
        let init = self.base.init.pid;
        'attempt: for _ in 0..3 {
            let mut cur = pid;
            let mut path = Vec::new();
            // Deeper than any process tree Chromium builds; only guards against loops.
            for _ in 0..64 {
                if cur == init || known.get(&cur) == Some(&true) {
                    known.extend(path.into_iter().map(|p| (p, true)));
                    return Some(true);
                }
                if cur <= 1 {
                    return Some(false);
                }
                path.push(cur);
                match kernel::stat_of(cur) {
                    Ok(s) => cur = s.ppid,
                    Err(_) if cur == pid => return None,
                    Err(_) => continue 'attempt,
                }
            }
            return Some(false);
        }
        kernel::stat_of(pid).ok().map(|_| false)
    }

    /// Marks the session's drift as reported; true only for the first caller.
    fn first_report(&self) -> bool {
        !self.reported.swap(true, Ordering::SeqCst)
    }

    /// Processes in the session's namespaces that the namespace init's death does not take
    /// along: those outside its pid namespace (entered from outside, `nsenter` without `-p`),
    /// the launcher excepted.
    pub fn intruders(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = sandbox::processes_in(&self.base.ns)
            .into_iter()
            .filter(|&p| p != self.base.launcher.pid && !kernel::pid_ns_within(p, self.base.ns.pid))
            .chain(self.outsiders())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs every [`Monitor::intruders`] process. Returns how many were killed. Blocking.
    pub fn kill_intruders(&self) -> Result<usize, String> {
        let mut killed = 0;
        for pid in self.intruders() {
            let Ok(st) = kernel::stat_of(pid) else {
                continue;
            };
            match kernel::kill_process(pid, st.start_time) {
                Ok(true) => killed += 1,
                Ok(false) => {}
                Err(e) => return Err(format!("intruder pid {pid}: {e}")),
            }
        }
        Ok(killed)
    }
}

/// Why a posture check could not run.
#[derive(Debug, thiserror::Error)]
pub enum PostureError {
    /// The session is not active or detached.
    #[error("session `{0}` is {1}; posture is checked for active or detached sessions")]
    NotLive(String, &'static str),
    /// The blocking scan failed to run.
    #[error("posture check of session `{0}`: {1}")]
    Task(String, String),
}

impl Registry {
    /// Checks the posture of `s` now: its processes against the baseline and the mandate under
    /// the current policy. On drift (the first time only), `session.posture_drift` is recorded
    /// durably, then the session is asked to end (`revoked`, trigger `posture`). When all that
    /// failed is the mandate's deadline or window, the session ends as its clocks would have
    /// ended it (`expired`, `window_ended`), without a drift record.
    pub async fn check_posture(&self, s: &Arc<Session>) -> Result<Report, PostureError> {
        let monitor = match (s.is_running(), s.posture()) {
            (true, Some(m)) => m,
            _ => return Err(PostureError::NotLive(s.id.clone(), s.state().name())),
        };
        let scan = monitor.clone();
        let mut report = tokio::task::spawn_blocking(move || scan.check())
            .await
            .map_err(|e| PostureError::Task(s.id.clone(), e.to_string()))?;
        if let Err((field, message)) = self.mandate_holds(s) {
            report.push(Drift {
                check: Check::Mandate,
                pid: None,
                command: None,
                detail: format!("mandate.{field}: {message}"),
            });
            report.mandate_field = Some(field);
        }
        self.metrics.posture_checks.inc();
        if report.ok() || !s.is_running() {
            return Ok(report);
        }
        // The mandate's own clocks end the session as they always do (this check only raced
        // the lifecycle's timer to it): `expired` or `window_ended`, not a posture drift.
        let only_mandate = report.drift.iter().all(|d| d.check == Check::Mandate);
        match report.mandate_field.as_deref() {
            Some("not_after") if only_mandate => {
                s.request_end(EndReason::Expired);
                return Ok(report);
            }
            Some("window") if only_mandate => {
                s.request_end(EndReason::WindowEnded);
                return Ok(report);
            }
            _ => {}
        }
        if !monitor.first_report() {
            return Ok(report);
        }
        for c in report.checks() {
            self.metrics
                .posture_drift
                .get_or_create(&crate::metrics::CheckLabel { check: c.into() })
                .inc();
        }
        let checks = report.checks();
        tracing::warn!(session = %s.id, ?checks, "posture drift; revoking the session");
        let audited: Vec<&Drift> = report.drift.iter().take(MAX_AUDITED).collect();
        let recorded = self
            .audit
            .record(
                "session.posture_drift",
                Some(&s.id),
                json!({
                    "agent": s.mandate().source.agent,
                    "checked_at": rfc3339(report.checked_at),
                    "processes": report.processes,
                    "checks": checks,
                    "pids": report.pids(),
                    "drift": audited,
                    "drift_total": report.drift.len(),
                }),
            )
            .await;
        if let Err(e) = recorded {
            // The session ends regardless: drift is not tolerated because the log is full.
            tracing::error!(session = %s.id, error = %e, "could not record session.posture_drift");
        }
        s.request_end_by(
            EndReason::Revoked,
            "posture",
            json!({ "checks": checks, "pids": report.pids() }),
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split('\0').map(str::to_string).collect()
    }

    #[test]
    fn kinds_come_from_either_form_of_the_command_line() {
        assert_eq!(
            kind_from_args(&args(
                "/usr/lib/chromium/chromium --type=renderer --lang=en"
            )),
            Some("renderer".into())
        );
        assert_eq!(
            kind_from_args(&args(
                "/usr/lib/chromium/chromium\0--type=utility\0--utility-sub-type=network.mojom.NetworkService"
            )),
            Some("utility/network.mojom.NetworkService".into())
        );
        assert_eq!(
            kind_from_args(&args("/usr/lib/chromium/chromium --headless")),
            None
        );
        assert_eq!(kind_from_args(&[]), None);
    }

    #[test]
    fn report_names_each_check_and_pid_once() {
        let d = |check, pid| Drift {
            check,
            pid,
            command: None,
            detail: String::new(),
        };
        let r = Report {
            checked_at: OffsetDateTime::UNIX_EPOCH,
            processes: 3,
            drift: vec![
                d(Check::Uid, Some(7)),
                d(Check::Cgroup, Some(7)),
                d(Check::Uid, Some(9)),
                d(Check::Mandate, None),
            ],
            took: Duration::ZERO,
            mandate_field: None,
        };
        assert!(!r.ok());
        assert_eq!(r.checks(), ["uid", "cgroup", "mandate"]);
        assert_eq!(r.pids(), [7, 9]);
        let v = r.to_json("s1");
        assert_eq!(v["drift"][1]["check"], "cgroup");
        assert_eq!(v["ok"], false);
        assert_eq!(v["session"], "s1");
        for c in [Check::NoNewPrivs, Check::UnexpectedProcess] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.name());
        }
    }

    const UID: u32 = 1_500_000;
    const SYS_ADMIN: u64 = 1 << 21;
    const NET_ADMIN: u64 = 1 << 12;
    const FULL: u64 = 0x1ff_ffff_ffff;
    const SESSION_CGROUPS: &str =
        "8:pids:/chaperone/chaperone-x\n4:memory:/chaperone/chaperone-x\n0::/\n";

    /// A baseline whose init is this test process's parent, so that this process's parent
    /// chain leads to it (or, with `init` given, to that pid).
    fn monitor(init: Option<i32>) -> Monitor {
        let parent = std::os::unix::process::parent_id() as i32;
        let init_pid = init.unwrap_or(parent);
        Monitor::new(Baseline {
            init: Ident {
                pid: init_pid,
                start: kernel::stat_of(init_pid).map_or(0, |s| s.start_time),
            },
            launcher: Ident {
                pid: 999_999_999,
                start: 7,
            },
            ns: sandbox::NsIds {
                user: 1,
                pid: 2,
                net: 3,
                mnt: 4,
            },
            ipc: 5,
            uts: 6,
            _pins: Vec::new(),
            uid: [UID; 4],
            gid: [UID; 4],
            cgroups: kernel::parse_cgroup(SESSION_CGROUPS),
            launcher_exe: "/opt/chaperone".into(),
            init_exe: "/opt/chaperone".into(),
            browser_dir: "/usr/lib/chromium".into(),
        })
    }

    /// This test process dressed as a settled renderer: one user namespace below the
    /// session's, in a network namespace of Chromium's own, under seccomp, no capabilities.
    fn renderer() -> Observed {
        let me = std::process::id() as i32;
        Observed {
            id: Ident {
                pid: me,
                start: kernel::stat_of(me).unwrap().start_time,
            },
            comm: "chromium".into(),
            status: Status {
                uid: [UID; 4],
                gid: [UID; 4],
                cap_inh: 0,
                cap_prm: 0,
                cap_eff: 0,
                cap_bnd: FULL,
                cap_amb: 0,
                no_new_privs: true,
                seccomp: 2,
            },
            user_ns: 100,
            depth: Some(1),
            pid_ns_within: true,
            shared: [
                ("net", Some(77)),
                ("mnt", Some(4)),
                ("ipc", Some(5)),
                ("uts", Some(6)),
            ],
            net_owner_depth: Some(1),
            cgroups: kernel::parse_cgroup(SESSION_CGROUPS),
            exe: Some("/usr/lib/chromium/chromium".into()),
            kind: Some("renderer".into()),
            age: Some(Duration::from_secs(10)),
        }
    }

    /// A process of the session's own user namespace (the browser, its network service...).
    fn browser() -> Observed {
        let mut p = renderer();
        p.depth = Some(0);
        p.user_ns = 1;
        p.shared[0].1 = Some(3);
        p.net_owner_depth = Some(0);
        p.status.cap_bnd = 0;
        p.status.seccomp = 0;
        p.kind = None;
        p
    }

    fn checks(m: &Monitor, p: &Observed, before: Option<Seen>) -> Vec<&'static str> {
        let sandboxed = m
            .learn_kinds(std::slice::from_ref(p))
            .contains(p.kind.as_deref().unwrap_or(""));
        let mut r = Report {
            checked_at: OffsetDateTime::UNIX_EPOCH,
            processes: 1,
            drift: Vec::new(),
            took: Duration::ZERO,
            mandate_field: None,
        };
        m.judge(p, before, sandboxed, &mut HashMap::new(), &mut r);
        r.checks()
    }

    #[test]
    fn chromium_as_measured_does_not_drift() {
        let m = monitor(None);
        assert_eq!(checks(&m, &renderer(), None), Vec::<&str>::new());
        assert_eq!(checks(&m, &browser(), None), Vec::<&str>::new());
        // The sandboxed zygote keeps CAP_SYS_ADMIN in Chromium's own user namespace.
        let mut zygote = renderer();
        zygote.kind = Some("zygote".into());
        (
            zygote.status.cap_eff,
            zygote.status.cap_prm,
            zygote.status.seccomp,
        ) = (SYS_ADMIN, SYS_ADMIN, 0);
        assert_eq!(checks(&m, &zygote, None), Vec::<&str>::new());
        // A renderer fresh from the zygote has not yet dropped its capability nor loaded its
        // seccomp filter.
        let mut fresh = zygote.clone_as("renderer");
        fresh.age = Some(Duration::from_millis(30));
        assert_eq!(checks(&m, &fresh, None), Vec::<&str>::new());
        // An exiting process shows no executable and no command line.
        let mut exiting = renderer();
        (exiting.exe, exiting.kind) = (None, None);
        assert_eq!(checks(&m, &exiting, None), Vec::<&str>::new());
    }

    impl Observed {
        fn clone_as(&self, kind: &str) -> Observed {
            Observed {
                id: self.id,
                comm: self.comm.clone(),
                status: self.status.clone(),
                user_ns: self.user_ns,
                depth: self.depth,
                pid_ns_within: self.pid_ns_within,
                shared: self.shared,
                net_owner_depth: self.net_owner_depth,
                cgroups: self.cgroups.clone(),
                exe: self.exe.clone(),
                kind: Some(kind.into()),
                age: self.age,
            }
        }
    }

    #[test]
    fn each_rule_catches_its_drift() {
        let m = monitor(None);
        let mut p = renderer();
        p.status.seccomp = 0;
        assert_eq!(checks(&m, &p, None), ["seccomp"]);
        let mut p = renderer();
        p.status.cap_eff = SYS_ADMIN;
        assert_eq!(checks(&m, &p, None), ["capabilities"]);
        let mut p = renderer().clone_as("zygote");
        p.status.cap_eff = SYS_ADMIN | NET_ADMIN;
        assert_eq!(checks(&m, &p, None), ["capabilities"]);
        let mut p = renderer();
        p.status.cap_amb = NET_ADMIN;
        assert_eq!(checks(&m, &p, None), ["capabilities"]);
        // In the session's own user namespace nothing holds any capability, from birth on.
        let mut p = browser();
        (p.status.cap_bnd, p.age) = (FULL, Some(Duration::ZERO));
        assert_eq!(checks(&m, &p, None), ["capabilities"]);
        let mut p = browser();
        p.shared[0].1 = Some(77);
        assert_eq!(checks(&m, &p, None), ["namespace"]);
        let mut p = renderer();
        (p.shared[0].1, p.net_owner_depth) = (Some(1), None);
        assert_eq!(checks(&m, &p, None), ["namespace"]);
        let mut p = renderer();
        p.shared[2].1 = Some(4_026_531_839);
        assert_eq!(checks(&m, &p, None), ["namespace"]);
        let mut p = browser();
        p.pid_ns_within = false;
        assert_eq!(checks(&m, &p, None), ["namespace"]);
        let mut p = renderer();
        p.status.uid[1] = 0;
        assert_eq!(checks(&m, &p, None), ["uid"]);
        let mut p = renderer();
        p.status.no_new_privs = false;
        assert_eq!(checks(&m, &p, None), ["no_new_privs"]);
        let mut p = renderer();
        p.exe = Some("/usr/bin/sleep".into());
        assert_eq!(checks(&m, &p, None), ["executable"]);
        let mut p = renderer();
        p.cgroups = kernel::parse_cgroup("8:pids:/\n4:memory:/chaperone/chaperone-x\n0::/\n");
        assert_eq!(checks(&m, &p, None), ["cgroup"]);
        // The same process under a baseline whose init is not among its ancestors.
        assert_eq!(
            checks(&monitor(Some(999_999_998)), &renderer(), None),
            ["unexpected_process"]
        );
    }

    #[test]
    fn the_launcher_lives_in_the_host_pid_namespace_and_runs_the_supervisor() {
        let m = monitor(Some(999_999_998));
        let mut p = browser();
        (p.id, p.pid_ns_within) = (m.base.launcher, false);
        p.exe = Some("/opt/chaperone".into());
        assert_eq!(checks(&m, &p, None), Vec::<&str>::new());
        p.exe = Some("/usr/lib/chromium/chromium".into());
        assert_eq!(checks(&m, &p, None), ["executable"]);
    }

    #[test]
    fn an_outsider_in_the_session_network_namespace_is_caught_by_several_rules() {
        let m = monitor(Some(999_999_998));
        let mut p = browser();
        (p.depth, p.user_ns, p.pid_ns_within, p.net_owner_depth) = (None, 9, false, None);
        p.shared = [
            ("net", Some(3)),
            ("mnt", Some(40)),
            ("ipc", Some(50)),
            ("uts", Some(60)),
        ];
        p.status.uid = [0; 4];
        p.status.no_new_privs = false;
        (p.status.cap_eff, p.status.cap_prm, p.status.cap_bnd) = (FULL, FULL, FULL);
        p.exe = Some("/usr/bin/sleep".into());
        p.cgroups = kernel::parse_cgroup("0::/user.slice\n");
        assert_eq!(
            checks(&m, &p, None),
            [
                "namespace",
                "uid",
                "no_new_privs",
                "capabilities",
                "executable",
                "unexpected_process",
                "cgroup"
            ]
        );
    }

    #[test]
    fn no_process_gains_capabilities_or_leaves_seccomp() {
        let m = monitor(None);
        let mut zygote = renderer().clone_as("zygote");
        zygote.status.seccomp = 0;
        let seen = |p: &Observed| Seen {
            user_ns: p.user_ns,
            caps: p.caps(),
            seccomp: p.status.seccomp,
        };
        let before = seen(&zygote);
        zygote.status.cap_eff = SYS_ADMIN;
        assert_eq!(checks(&m, &zygote, Some(before)), ["capabilities"]);
        let mut p = renderer();
        let before = seen(&p);
        (p.status.seccomp, p.age) = (0, Some(Duration::ZERO));
        assert_eq!(checks(&m, &p, Some(before)), ["seccomp"]);
    }

    #[test]
    fn a_kind_is_sandboxed_as_first_seen_settled() {
        let m = monitor(None);
        let storage = |seccomp, age| {
            let mut p = renderer().clone_as("utility/storage.mojom.StorageService");
            (p.status.seccomp, p.age) = (seccomp, Some(Duration::from_millis(age)));
            p
        };
        let network = |seccomp| {
            let mut p = browser().clone_as("utility/network.mojom.NetworkService");
            p.status.seccomp = seccomp;
            p
        };
        // Young processes teach nothing.
        assert!(!m
            .learn_kinds(&[storage(0, 10)])
            .contains("utility/storage.mojom.StorageService"));
        let learned = m.learn_kinds(&[storage(2, 5_000), network(0)]);
        assert!(learned.contains("utility/storage.mojom.StorageService"));
        assert!(!learned.contains("utility/network.mojom.NetworkService"));
        // Fixed from then on.
        assert_eq!(checks(&m, &storage(0, 5_000), None), ["seccomp"]);
        assert!(!m
            .learn_kinds(&[network(2)])
            .contains("utility/network.mojom.NetworkService"));
        assert_eq!(checks(&m, &network(0), None), Vec::<&str>::new());
    }
}
