//! What both benchmark programs need: a CDP client over a pipe or a websocket, a bare Chromium
//! run as `nobody` with chaperone's flags, a real `chaperone serve`, and `/proc` and statistics
//! helpers. Each program uses a part of it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chaperone::browser::chromium;
use chaperone::config::ControlAddr;
use futures_util::{SinkExt, StreamExt};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// `root`'s descendants (every thread's children, recursively), with `root` itself if asked.
pub fn descendants(root: i32, include_root: bool) -> Vec<i32> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        if p != root || include_root {
            out.push(p);
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(kids) = std::fs::read_to_string(t.path().join("children")) else {
                continue;
            };
            stack.extend(
                kids.split_whitespace()
                    .filter_map(|k| k.parse::<i32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// Alive means present and not a zombie (a zombie holds no memory and runs nothing).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start())
            .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Polls (every 0.5 ms, bounded) until none of `pids` is alive.
pub fn wait_gone(pids: &[i32]) -> anyhow::Result<()> {
    let deadline = Instant::now() + GONE_TIMEOUT;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes still alive {GONE_TIMEOUT:?} after SIGKILL: {left:?}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// A whole number from the environment variable `name`, or `default` when it is unset.
pub fn env_num(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?}: expected a whole number")),
        Err(_) => Ok(default),
    }
}

/// `BENCH_RUNS` (default 10, at least 1): runs per side in both programs.
pub fn env_runs() -> anyhow::Result<usize> {
    let runs = env_num("BENCH_RUNS", 10)? as usize;
    if runs < 1 {
        bail!("BENCH_RUNS must be at least 1");
    }
    Ok(runs)
}

/// `BENCH_OUT`, or BENCHMARKS.md at the repository root.
pub fn env_out() -> std::path::PathBuf {
    std::env::var_os("BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md"))
}

/// Markers around `benches/credentials.rs`'s section of BENCHMARKS.md.
pub const CREDENTIALS_BEGIN: &str = "<!-- credentials:begin -->";
/// See [`CREDENTIALS_BEGIN`].
pub const CREDENTIALS_END: &str = "<!-- credentials:end -->";

/// The credentials section of the report at `path` (markers included), if it has one, so a
/// program that rewrites the rest of the file can keep it.
pub fn credentials_section(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let b = text.find(CREDENTIALS_BEGIN)?;
    let e = text.find(CREDENTIALS_END)?;
    (b < e).then(|| text[b..e + CREDENTIALS_END.len()].to_string())
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = q * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn read_first(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub enum Transport {
    Pipe {
        to: ChildStdin,
        from: BufReader<ChildStdout>,
        buf: Vec<u8>,
    },
    Ws(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
}

/// Answers events as they arrive: given an event, the commands to send at once (objects with
/// `method`, `params` and, for a target's session, `sessionId`; the id is added). It lets a
/// client keep up with events the browser blocks on (`Fetch.requestPaused`, a target waiting
/// for the debugger) while `call` or `wait_event` waits for something else.
pub type Hook = Box<dyn FnMut(&Value) -> Vec<Value> + Send>;

/// Ids of the hook's commands start here, far above `call`'s, so their answers are told apart
/// and dropped; below 2^31, as Chromium drops a command whose id is not a 32-bit integer. An
/// error answer is dropped too: a pause left unanswered stalls the page, which the bounded wait
/// for its load then reports.
const HOOK_IDS: u64 = 1 << 30;

pub struct Cdp {
    pub t: Transport,
    pub next_id: u64,
    /// Events received while waiting for something else, with when they arrived.
    pub events: VecDeque<(Instant, Value)>,
    /// Sees every event before it is kept or matched; none by default.
    pub hook: Option<Hook>,
    hook_id: u64,
}

impl Cdp {
    pub fn new(t: Transport) -> Cdp {
        Cdp {
            t,
            next_id: 0,
            events: VecDeque::new(),
            hook: None,
            hook_id: HOOK_IDS,
        }
    }

    /// Sends what the hook answers to `m`, when `m` is an event and there is a hook.
    async fn answer(&mut self, m: &Value) -> anyhow::Result<()> {
        let commands = match self.hook.as_mut() {
            Some(hook) if m.get("method").is_some() => hook(m),
            _ => return Ok(()),
        };
        for mut command in commands {
            self.hook_id += 1;
            command["id"] = json!(self.hook_id);
            self.send_raw(command.to_string()).await?;
        }
        Ok(())
    }

    pub async fn send_raw(&mut self, text: String) -> anyhow::Result<()> {
        match &mut self.t {
            Transport::Pipe { to, .. } => {
                let mut bytes = text.into_bytes();
                bytes.push(0);
                to.write_all(&bytes).await.context("writing to the pipe")?;
            }
            Transport::Ws(ws) => ws
                .send(Message::text(text))
                .await
                .context("writing to the websocket")?,
        }
        Ok(())
    }

    pub async fn recv_raw(&mut self) -> anyhow::Result<Value> {
        match &mut self.t {
            Transport::Pipe { from, buf, .. } => {
                buf.clear();
                let n = from.read_until(0, buf).await.context("reading the pipe")?;
                if n == 0 || buf.last() != Some(&0) {
                    bail!("the browser closed the pipe");
                }
                buf.pop();
                serde_json::from_slice(buf).context("a CDP message that is not JSON")
            }
            Transport::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        return serde_json::from_str(t.as_str())
                            .context("a CDP message that is not JSON")
                    }
                    Some(Ok(Message::Close(f))) => bail!("the websocket was closed: {f:?}"),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => bail!("websocket: {e}"),
                    None => bail!("the websocket ended"),
                }
            },
        }
    }

    pub fn keep(&mut self, at: Instant, m: Value) {
        if m.get("method").is_some() {
            if self.events.len() >= EVENT_BACKLOG {
                self.events.pop_front();
            }
            self.events.push_back((at, m));
        }
    }

    /// Sends one command and reads until its answer; events in between are answered by the
    /// hook, if any, and kept.
    pub async fn call(
        &mut self,
        method: &str,
        params: Value,
        session: Option<&str>,
    ) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.send_raw(msg.to_string()).await?;
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.recv_raw())
                .await
                .map_err(|_| anyhow!("no answer to {method} within {STEP_TIMEOUT:?}"))??;
            if m.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(e) = m.get("error") {
                    bail!("{method} failed: {e}");
                }
                return Ok(m.get("result").cloned().unwrap_or(Value::Null));
            }
            self.answer(&m).await?;
            self.keep(Instant::now(), m);
        }
    }

    /// When the first event `want` accepts arrived (it may have arrived already). Every event
    /// read meanwhile goes to the hook first, the awaited one too.
    pub async fn wait_event(
        &mut self,
        within: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Instant> {
        if let Some(i) = self.events.iter().position(|(_, m)| want(m)) {
            let (at, _) = self.events.remove(i).expect("found just now");
            return Ok(at);
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = tokio::time::timeout_at(deadline, self.recv_raw())
                .await
                .map_err(|_| anyhow!("the event did not arrive within {within:?}"))??;
            let at = Instant::now();
            self.answer(&m).await?;
            if want(&m) {
                return Ok(at);
            }
            self.keep(at, m);
        }
    }
}

/// A bare Chromium as `nobody`, its profile, and (until it is stopped) its processes.
pub struct Bare {
    pub child: Child,
    pub pid: i32,
    /// Set once the browser was reaped: its pid may belong to someone else from then on.
    pub reaped: bool,
    pub profile: tempfile::TempDir,
}

impl Bare {
    /// Spawns Chromium with chaperone's flags (its own profile directory instead of the
    /// sandbox's) and returns once `Browser.getVersion` was answered over the pipe, with the
    /// time that took and the answer. With `direct_to`, there is no proxy: the browser reaches
    /// that host name directly, mapped to 127.0.0.1.
    pub async fn start(
        work: &Path,
        nobody: &nix::unistd::User,
        direct_to: Option<&str>,
    ) -> anyhow::Result<(Bare, Cdp, Duration, Value)> {
        let profile = tempfile::Builder::new()
            .prefix("bare-")
            .tempdir_in(work)
            .context("creating a bare profile directory")?;
        nix::unistd::chown(profile.path(), Some(nobody.uid), Some(nobody.gid))
            .context("giving the bare profile to nobody")?;
        let mut args: Vec<String> = match direct_to {
            Some(host) => {
                let mut a = chromium::direct_args();
                a.push(format!("--host-resolver-rules=MAP {host} 127.0.0.1"));
                a
            }
            None => chromium::args()
                .into_iter()
                .filter(|a| !a.starts_with("--user-data-dir="))
                .collect(),
        };
        args.push(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ));
        let log = profile.path().join("chromium.log");
        let home = profile.path().display().to_string();
        let env = chromium::env().into_iter().map(|(k, v)| match k.as_str() {
            "HOME" | "TMPDIR" => (k, home.clone()),
            _ => (k, v),
        });

        let started = Instant::now();
        // The pipe ends arrive as stdin/stdout; the shell moves them to fds 3/4 (where
        // --remote-debugging-pipe wants them) and execs Chromium, so Chromium is our child.
        let mut child = Command::new("/usr/bin/setpriv")
            .arg(format!("--reuid={}", nobody.uid))
            .arg(format!("--regid={}", nobody.gid))
            .arg("--clear-groups")
            .arg("--")
            .arg("/bin/bash")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg(CHROMIUM)
            .args(&args)
            .env_clear()
            .envs(env)
            .current_dir(profile.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).context("creating chromium.log")?)
            .kill_on_drop(true)
            .spawn()
            .context("spawning setpriv + bash + chromium")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("chromium exited at once"))? as i32;
        let to = child.stdin.take().expect("piped stdin");
        let from = BufReader::with_capacity(1 << 16, child.stdout.take().expect("piped stdout"));
        let bare = Bare {
            child,
            pid,
            reaped: false,
            profile,
        };
        let mut cdp = Cdp::new(Transport::Pipe {
            to,
            from,
            buf: Vec::new(),
        });
        let version = match cdp.call("Browser.getVersion", json!({}), None).await {
            Ok(v) => v,
            Err(e) => {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let mut tail: Vec<&str> = text.lines().rev().take(20).collect();
                tail.reverse();
                bail!(
                    "bare Chromium: {e:#}; the end of its stderr:\n{}",
                    tail.join("\n")
                );
            }
        };
        Ok((bare, cdp, started.elapsed(), version))
    }

    /// The browser and its descendants, plus the crashpad handlers: they double-fork out of
    /// the tree (to the host's pid 1) and are found by their database path, which lies in this
    /// browser's own profile directory.
    pub fn processes(&self) -> Vec<i32> {
        let mut pids = descendants(self.pid, true);
        let marker = self.profile.path().display().to_string();
        pids.extend(processes_mentioning(&marker));
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs every process of the browser at once (the bare counterpart of killing a
    /// sandbox's pid 1) and returns how long until none of them is left.
    pub async fn kill_all(mut self) -> anyhow::Result<Duration> {
        let pids = self.processes();
        let started = Instant::now();
        for &p in &pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        tokio::time::timeout(GONE_TIMEOUT, self.child.wait())
            .await
            .map_err(|_| anyhow!("bare chromium did not exit after SIGKILL"))??;
        self.reaped = true;
        let others: Vec<_> = pids.into_iter().filter(|&p| p != self.pid).collect();
        wait_gone(&others)?;
        Ok(started.elapsed())
    }
}

impl Drop for Bare {
    /// On the error path only: the normal path went through [`Bare::kill_all`] already.
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let pids = self.processes();
        for &p in &pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        let _ = self.child.start_kill();
        let others: Vec<_> = pids.into_iter().filter(|&p| p != self.pid).collect();
        // The profile directory is removed after this; a process still dying could add a file.
        if let Err(e) = wait_gone(&others) {
            eprintln!("bench: bare Chromium: {e:#}");
        }
    }
}

/// A running `chaperone serve` (release build) with its control socket and audit log.
pub struct Supervisor {
    pub child: Option<Child>,
    pub pid: i32,
    pub control: ControlAddr,
    pub audit: PathBuf,
    pub stderr: PathBuf,
}

impl Supervisor {
    pub async fn start(work: &Path) -> anyhow::Result<Supervisor> {
        let bin = env!("CARGO_BIN_EXE_chaperone");
        let dir = work.join("supervisor");
        std::fs::create_dir(&dir)?;
        let sock = dir.join("control.sock");
        let audit = dir.join("audit.jsonl");
        let stderr = dir.join("stderr.log");
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--control")
            .arg(format!("unix:{}", sock.display()))
            .arg("--audit-log")
            .arg(&audit)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {bin} serve"))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("chaperone exited at once"))? as i32;
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut sup = Supervisor {
            child: Some(child),
            pid,
            control: ControlAddr::Unix(sock),
            audit,
            stderr,
        };
        let mut line = String::new();
        let read = tokio::time::timeout(STEP_TIMEOUT, out.read_line(&mut line)).await;
        let ready: Option<Value> = serde_json::from_str(&line).ok();
        if !matches!(read, Ok(Ok(n)) if n > 0)
            || ready.as_ref().map(|r| &r["ready"]) != Some(&json!(true))
        {
            let log = std::fs::read_to_string(&sup.stderr).unwrap_or_default();
            let _ = sup.stop().await;
            bail!("chaperone serve printed no ready line ({line:?}); its stderr:\n{log}");
        }
        // Keep draining stdout so the supervisor never blocks on a full pipe.
        tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut out, &mut sink).await;
        });
        Ok(sup)
    }

    pub async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<(u16, Value)> {
        tokio::time::timeout(
            STEP_TIMEOUT,
            chaperone::client::request(&self.control, None, method, path, body),
        )
        .await
        .map_err(|_| anyhow!("{method} {path}: no answer within {STEP_TIMEOUT:?}"))?
    }

    /// SIGTERM (the supervisor purges its sessions), bounded; SIGKILL if that hangs. Checks
    /// that nothing it started is left.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let left_before = descendants(self.pid, false);
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        let waited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        if waited.is_err() {
            let _ = child.start_kill();
            let _ = child.wait().await;
            bail!("chaperone serve did not stop within 30 s of SIGTERM (killed)");
        }
        wait_gone(&left_before)
    }
}

pub const CHROMIUM: &str = "/usr/lib/chromium/chromium";

/// Hang guard for one CDP answer, one control request, one browser start.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Hang guard for "every process is gone".
pub const GONE_TIMEOUT: Duration = Duration::from_secs(15);

/// Events kept while waiting for an answer (a page load emits a few dozen).
pub const EVENT_BACKLOG: usize = 10_000;
