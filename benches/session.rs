//! chaperone against bare Chromium, measured in the same run on the same machine.
//!
//! `scripts/bench.sh` builds the release binaries and runs this program, which writes
//! `BENCHMARKS.md`. Four figures, each a median over `BENCH_RUNS` runs (default 10) next to
//! bare Chromium measured in the same run:
//!
//! 1. session start: `POST /v1/sessions` → first CDP reply on `cdp_url`, against a cold start of
//!    Chromium with the same flags → first reply over `--remote-debugging-pipe`;
//! 2. revoke: `DELETE /v1/sessions/{id}` (answers after the verified purge), against SIGKILL of
//!    every bare Chromium process → none of them left;
//! 3. CDP round trip: `Runtime.evaluate {"expression":"1"}` on a flat page session, through
//!    chaperone's websocket against the bare browser's pipe;
//! 4. PSS of an idle browser with one `about:blank` page.
//!
//! Bare and chaperone runs alternate (bare first in even runs, chaperone first in odd ones)
//! after one discarded warm-up of each, so drift on the machine hits both sides alike. Bare
//! Chromium runs as `nobody` with its own sandbox on: it refuses root, and `--no-sandbox` is
//! not an option for a comparison (nor anywhere else in this project).
//!
//! Every wait is bounded, and every browser, supervisor and temporary directory is gone when
//! the program ends, on failure too.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Round trips before the timed ones (connection and JIT warm-up on both ends).
const RTT_WARMUP: usize = 50;

/// Phase names the report refers to by name.
const PH_POST: &str = "start: POST → session.created record";
const PH_LAUNCH: &str =
    "start: session.created → session.active (sandbox + Chromium + first pipe reply)";
const PH_ANSWER: &str = "start: session.active → 201 received";
const PH_CONNECT: &str = "start: 201 → first CDP reply on cdp_url";
/// Posture checks per chaperone run.
const POSTURE_CHECKS: usize = 10;
const PH_PURGE_MS: &str = "revoke: purge_ms as chaperone reports it";
const BARE_AFTER_FIRST: &str = "bare (for comparison): right after the first reply, \
     `Target.attachToBrowserTarget` + `Browser.getVersion` over the pipe";
const CHAPERONE_SETTLED: &str = "chaperone (for comparison): a new websocket to the idle \
     session → first reply";

/// Targets from the issue.
const START_RATIO_TARGET: f64 = 1.15;
const REVOKE_TARGET_MS: f64 = 100.0;
const RTT_DIFF_TARGET_MS: f64 = 0.3;
const PSS_RATIO_TARGET: f64 = 1.05;

fn main() {
    // `cargo bench` and scripts/bench.sh pass `--bench`. `cargo test --all-targets` runs this
    // program too, without it: a four-minute benchmark has no place in the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("bench: skipped (run scripts/bench.sh, or `cargo bench --bench session`)");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run()) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("bench: FAILED: {e:#}");
            std::process::exit(1);
        }
    }
}

struct Settings {
    runs: usize,
    calls: usize,
    idle: Duration,
    out: PathBuf,
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let runs = env_runs()?;
        Ok(Settings {
            runs,
            calls: env_num("BENCH_CALLS", 500)?.max(1) as usize,
            idle: Duration::from_secs(env_num("BENCH_IDLE_SECS", 5)?),
            out: env_out(),
        })
    }
}

/// What one cycle (start, idle, round trips, stop) measured on one side.
#[derive(Default, Clone)]
struct Cycle {
    start_ms: f64,
    /// Median of this cycle's timed round trips.
    rtt_ms: f64,
    /// All of this cycle's round trips (for percentiles over the whole run).
    rtts_ms: Vec<f64>,
    pss_kib: u64,
    processes: usize,
    /// PSS by kind of process (browser, renderer, zygote, launcher, …).
    pss_by_kind: BTreeMap<String, (u64, usize)>,
    stop_ms: f64,
    /// chaperone only: `POST /v1/sessions` until its 201 arrived.
    post_ms: f64,
    /// chaperone only: the supervisor's own PSS while the session was idle.
    supervisor_pss_kib: u64,
    /// chaperone only: phases of the start and of the revoke, from the audit log.
    phases: BTreeMap<&'static str, f64>,
    /// chaperone only: processes of the session still alive after DELETE answered.
    survivors: Vec<i32>,
    /// chaperone only: how long each on-demand posture check of the idle session took, as
    /// the supervisor reports it (`took_ms`).
    posture_ms: Vec<f64>,
}

async fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    if !Path::new(CHROMIUM).exists() {
        bail!("{CHROMIUM} is not installed (scripts/setup.sh installs it)");
    }
    if !nix::unistd::geteuid().is_root() {
        // Switching bare Chromium to `nobody` needs root, and root is how chaperone runs in
        // production (each session then gets its own host uid).
        bail!("run the benchmark as root (bare Chromium is started as `nobody`)");
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .context("looking up user nobody")?
        .ok_or_else(|| anyhow!("user `nobody` does not exist on this machine"))?;

    let work = tempfile::Builder::new()
        .prefix("chaperone-bench-")
        .tempdir()
        .context("creating the bench's temporary directory")?;
    // `nobody` must reach the bare profiles below it.
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))?;

    let mut sup = Supervisor::start(work.path()).await?;
    let result = bench(&settings, &mut sup, work.path(), &nobody).await;
    let stopped = sup.stop().await;
    let (report, machine) = result?;
    stopped?;
    let mut md = render(&settings, &report, &machine);
    // The credential broker's section is another program's: it stays as that program left it.
    if let Some(section) = credentials_section(&settings.out) {
        md = format!("{}\n\n{section}\n", md.trim_end());
    }
    std::fs::write(&settings.out, md)
        .with_context(|| format!("writing {}", settings.out.display()))?;
    eprintln!("bench: wrote {}", settings.out.display());
    Ok(())
}

struct Report {
    bare: Vec<Cycle>,
    chap: Vec<Cycle>,
    ws_echo_ms: Vec<f64>,
}

struct Machine {
    chromium: String,
    date: String,
    load_before: String,
}

async fn bench(
    s: &Settings,
    sup: &mut Supervisor,
    work: &Path,
    nobody: &nix::unistd::User,
) -> anyhow::Result<(Report, Machine)> {
    let mut bare = Vec::new();
    let mut chap = Vec::new();
    let mut ws_echo_ms = Vec::new();
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut chromium_version = String::new();
    let load_before = loadavg();
    for i in 0..=s.runs {
        let warmup = i == 0;
        let label = if warmup {
            "warm-up".to_string()
        } else {
            format!("run {i}/{}", s.runs)
        };
        let bare_first = i % 2 == 0;
        let mut b = None;
        let mut c = None;
        for side in 0..2 {
            if (side == 0) == bare_first {
                let (cycle, version) = bare_cycle(s, work, nobody)
                    .await
                    .with_context(|| format!("bare Chromium, {label}"))?;
                chromium_version = version;
                b = Some(cycle);
            } else {
                c = Some(
                    chaperone_cycle(s, sup)
                        .await
                        .with_context(|| format!("chaperone, {label}"))?,
                );
            }
        }
        let (b, c) = (b.expect("bare ran"), c.expect("chaperone ran"));
        eprintln!(
            "bench: {label}: start {:.0}/{:.0} ms, rtt {:.3}/{:.3} ms, pss {}/{} MiB, stop {:.1}/{:.1} ms (bare/chaperone)",
            b.start_ms,
            c.start_ms,
            b.rtt_ms,
            c.rtt_ms,
            b.pss_kib / 1024,
            c.pss_kib / 1024,
            b.stop_ms,
            c.stop_ms
        );
        if !c.survivors.is_empty() {
            bail!(
                "chaperone answered DELETE while processes of the session were still alive: {:?}",
                c.survivors
            );
        }
        if !warmup {
            bare.push(b);
            chap.push(c);
            ws_echo_ms.push(ws_echo(s.calls).await.context("websocket echo baseline")?);
        }
    }
    Ok((
        Report {
            bare,
            chap,
            ws_echo_ms,
        },
        Machine {
            chromium: chromium_version,
            date,
            load_before,
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// CDP over a pipe or a websocket, one request at a time.

/// Leaves exactly one `about:blank` page, attached with a flat session; returns the session.
async fn one_blank_page(cdp: &mut Cdp) -> anyhow::Result<String> {
    let created = cdp
        .call("Target.createTarget", json!({"url": "about:blank"}), None)
        .await?;
    let mine = created["targetId"]
        .as_str()
        .ok_or_else(|| anyhow!("Target.createTarget gave no targetId: {created}"))?
        .to_string();
    let targets = cdp.call("Target.getTargets", json!({}), None).await?;
    for t in targets["targetInfos"].as_array().into_iter().flatten() {
        if t["type"] == "page" && t["targetId"] != mine.as_str() {
            cdp.call(
                "Target.closeTarget",
                json!({"targetId": t["targetId"]}),
                None,
            )
            .await?;
        }
    }
    let attached = cdp
        .call(
            "Target.attachToTarget",
            json!({"targetId": mine, "flatten": true}),
            None,
        )
        .await?;
    attached["sessionId"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("Target.attachToTarget gave no sessionId: {attached}"))
}

/// Median of `calls` sequential `Runtime.evaluate {"expression":"1"}` round trips.
async fn round_trips(cdp: &mut Cdp, session: &str, calls: usize) -> anyhow::Result<Vec<f64>> {
    for _ in 0..RTT_WARMUP {
        cdp.call(
            "Runtime.evaluate",
            json!({"expression": "1"}),
            Some(session),
        )
        .await?;
    }
    let mut v = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let r = cdp
            .call(
                "Runtime.evaluate",
                json!({"expression": "1"}),
                Some(session),
            )
            .await?;
        v.push(ms(t.elapsed()));
        if r["result"]["value"] != 1 {
            bail!("Runtime.evaluate(1) answered {r}");
        }
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Bare Chromium.

async fn bare_cycle(
    s: &Settings,
    work: &Path,
    nobody: &nix::unistd::User,
) -> anyhow::Result<(Cycle, String)> {
    let (bare, mut cdp, start, version) =
        tokio::time::timeout(STEP_TIMEOUT, Bare::start(work, nobody, None))
            .await
            .map_err(|_| anyhow!("bare Chromium did not answer within {STEP_TIMEOUT:?}"))??;
    let mut c = Cycle {
        start_ms: ms(start),
        ..Cycle::default()
    };
    // What an agent connection costs chaperone once the browser answered its first command,
    // done here on the bare pipe at the same moment: Chromium is still finishing its start
    // then, and answers slowly.
    let t_attach = Instant::now();
    cdp.call("Target.attachToBrowserTarget", json!({}), None)
        .await?;
    cdp.call("Browser.getVersion", json!({}), None).await?;
    c.phases.insert(BARE_AFTER_FIRST, ms(t_attach.elapsed()));
    let session = one_blank_page(&mut cdp).await?;
    tokio::time::sleep(s.idle).await;
    let procs = bare.processes();
    (c.pss_kib, c.pss_by_kind) = pss_of(&procs, None);
    c.processes = procs.len();
    c.rtts_ms = round_trips(&mut cdp, &session, s.calls).await?;
    c.rtt_ms = median(&c.rtts_ms);
    c.stop_ms = ms(bare.kill_all().await?);
    let product = version["product"].as_str().unwrap_or("unknown").to_string();
    Ok((c, product))
}

// ---------------------------------------------------------------------------------------------
// chaperone.

async fn chaperone_cycle(s: &Settings, sup: &Supervisor) -> anyhow::Result<Cycle> {
    let mandate = json!({
        "agent": "bench",
        "ttl_secs": 600,
        // The run opens a second connection next to the first (the settled-connect timing).
        "max_agent_connections": 2,
        "egress": {
            "allow": ["site.test"],
            "private_networks": ["127.0.0.0/8"],
            "hosts": {"site.test": "127.0.0.1"},
            // The local test server listens on an ephemeral port.
            "ports": ["1024-65535"],
        }
    });
    let wall0 = SystemTime::now();
    let t0 = Instant::now();
    let (status, body) = sup
        .api("POST", "/v1/sessions", Some(mandate.to_string()))
        .await?;
    if status != 201 {
        bail!("POST /v1/sessions answered {status}: {body}");
    }
    let created_at = t0.elapsed();
    let id = body["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no id in {body}"))?
        .to_string();
    // From here on, a failure must still revoke the session.
    let result = chaperone_session(s, sup, &body, t0, created_at).await;
    let t_del = Instant::now();
    let wall_del = SystemTime::now();
    let procs = descendants(sup.pid, false);
    let (status, answer) = sup
        .api("DELETE", &format!("/v1/sessions/{id}"), None)
        .await?;
    let revoke = t_del.elapsed();
    let mut c = result?;
    if status != 200 && status != 204 {
        bail!("DELETE /v1/sessions/{id} answered {status}: {answer}");
    }
    c.stop_ms = ms(revoke);
    c.survivors = procs.into_iter().filter(|&p| alive(p)).collect();
    phases_from_audit(&sup.audit, &id, wall0, wall_del, &mut c)?;
    Ok(c)
}

async fn chaperone_session(
    s: &Settings,
    sup: &Supervisor,
    body: &Value,
    t0: Instant,
    created_at: Duration,
) -> anyhow::Result<Cycle> {
    let url = body["cdp_url"]
        .as_str()
        .ok_or_else(|| anyhow!("no cdp_url in {body}"))?;
    let t_ws = Instant::now();
    let (ws, _) = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(url, None, true),
    )
    .await
    .map_err(|_| anyhow!("websocket connect to {url}: no answer"))?
    .with_context(|| format!("websocket connect to {url}"))?;
    let mut cdp = Cdp::new(Transport::Ws(Box::new(ws)));
    let handshake = t_ws.elapsed();
    cdp.call("Browser.getVersion", json!({}), None).await?;
    let mut c = Cycle {
        start_ms: ms(t0.elapsed()),
        post_ms: ms(created_at),
        ..Cycle::default()
    };
    c.phases.insert(PH_CONNECT, c.start_ms - c.post_ms);
    c.phases
        .insert("start: … of which the websocket handshake", ms(handshake));
    let session = one_blank_page(&mut cdp).await?;
    tokio::time::sleep(s.idle).await;
    let procs = descendants(sup.pid, false);
    (c.pss_kib, c.pss_by_kind) = pss_of(&procs, Some(sup.pid));
    c.processes = procs.len();
    c.supervisor_pss_kib = pss(sup.pid).unwrap_or(0);
    // A second agent connection, to the settled browser: what connecting costs when
    // Chromium's start is not in the way.
    let t_again = Instant::now();
    let (ws2, _) = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(url, None, true),
    )
    .await
    .map_err(|_| anyhow!("second websocket connect to {url}: no answer"))??;
    let mut again = Cdp::new(Transport::Ws(Box::new(ws2)));
    again.call("Browser.getVersion", json!({}), None).await?;
    c.phases.insert(CHAPERONE_SETTLED, ms(t_again.elapsed()));
    if let Transport::Ws(ws) = &mut again.t {
        let _ = SinkExt::close(ws).await;
    }
    drop(again);
    c.rtts_ms = round_trips(&mut cdp, &session, s.calls).await?;
    c.rtt_ms = median(&c.rtts_ms);
    // The continuous integrity check, run on demand a few times on the idle session.
    let id = body["id"].as_str().unwrap_or_default();
    for _ in 0..POSTURE_CHECKS {
        let (status, report) = sup
            .api("GET", &format!("/v1/sessions/{id}/posture"), None)
            .await?;
        if status != 200 || report["ok"] != true {
            bail!("GET /v1/sessions/{id}/posture answered {status}: {report}");
        }
        c.posture_ms
            .push(report["took_ms"].as_f64().unwrap_or(f64::NAN));
    }
    Ok(c)
}

/// Splits the start and the revoke into phases using the audit records' timestamps (same
/// wall clock as ours; a record's `ts` is taken just before it is written and fsynced).
fn phases_from_audit(
    audit: &Path,
    id: &str,
    wall_post: SystemTime,
    wall_delete: SystemTime,
    c: &mut Cycle,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(audit).context("reading the audit log")?;
    let mut at: BTreeMap<String, (SystemTime, Value)> = BTreeMap::new();
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).context("audit record")?;
        if r["session"] != id {
            continue;
        }
        let ts = r["ts"].as_str().unwrap_or_default();
        let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
            .with_context(|| format!("audit ts {ts:?}"))?;
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(t.unix_timestamp_nanos() as u64);
        let event = r["event"].as_str().unwrap_or_default().to_string();
        at.insert(event, (t, r));
    }
    let get = |e: &str| {
        at.get(e)
            .map(|(t, _)| *t)
            .ok_or_else(|| anyhow!("the audit log has no {e} record for session {id}"))
    };
    let span = |a: SystemTime, b: SystemTime| ms(b.duration_since(a).unwrap_or_default());
    let (created, active) = (get("session.created")?, get("session.active")?);
    let (revoked, purged) = (get("session.revoked")?, get("session.purged")?);
    c.phases.insert(PH_POST, span(wall_post, created));
    c.phases.insert(PH_LAUNCH, span(created, active));
    c.phases
        .insert(PH_ANSWER, c.post_ms - span(wall_post, active));
    c.phases.insert(
        "revoke: DELETE → session.revoked record",
        span(wall_delete, revoked),
    );
    c.phases.insert(
        "revoke: session.revoked → session.purged (kill + verify)",
        span(revoked, purged),
    );
    c.phases.insert(
        "revoke: session.purged → 200 received",
        c.stop_ms - span(wall_delete, purged),
    );
    if let Some(p) = at["session.purged"].1["purge_ms"].as_f64() {
        c.phases.insert(PH_PURGE_MS, p);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Websocket cost on its own: the same client against a bare tungstenite echo server.

/// Median round trip of a `Runtime.evaluate`-sized message through a local websocket echo
/// server on its own thread: what any websocket client and server add over loopback, without
/// chaperone's routing or the browser.
async fn ws_echo(calls: usize) -> anyhow::Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let (tcp, _) = tokio::time::timeout(STEP_TIMEOUT, listener.accept()).await??;
            tcp.set_nodelay(true)?;
            let mut ws = tokio_tungstenite::accept_async(tcp).await?;
            while let Some(m) = ws.next().await {
                match m? {
                    Message::Text(t) => {
                        // The browser's answer is longer than the request; so is this one.
                        let reply = format!(
                            r#"{{"id":{},"result":{{"result":{{"type":"number","value":1,"description":"1"}}}},"sessionId":"0123456789ABCDEF0123456789ABCDEF"}}"#,
                            t.len()
                        );
                        ws.send(Message::text(reply)).await?;
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            Ok(())
        })
    });
    let (ws, _) = tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/"), None, true)
        .await
        .context("connecting to the echo server")?;
    let mut cdp = Cdp::new(Transport::Ws(Box::new(ws)));
    let msg = |id: u64| {
        json!({"id": id, "method": "Runtime.evaluate", "params": {"expression": "1"},
               "sessionId": "0123456789ABCDEF0123456789ABCDEF"})
        .to_string()
    };
    let mut v = Vec::with_capacity(calls);
    for i in 0..(RTT_WARMUP + calls) {
        let t = Instant::now();
        cdp.send_raw(msg(i as u64)).await?;
        tokio::time::timeout(STEP_TIMEOUT, cdp.recv_raw())
            .await
            .map_err(|_| anyhow!("the echo server did not answer"))??;
        if i >= RTT_WARMUP {
            v.push(ms(t.elapsed()));
        }
    }
    if let Transport::Ws(ws) = &mut cdp.t {
        let _ = SinkExt::close(ws).await;
    }
    drop(cdp);
    server
        .join()
        .map_err(|_| anyhow!("the echo server panicked"))??;
    Ok(median(&v))
}

// ---------------------------------------------------------------------------------------------
// /proc.

/// `Pss:` of `/proc/PID/smaps_rollup`, in KiB.
fn pss(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Total PSS of `pids` and PSS by kind of process. `supervisor` names the process whose
/// children are chaperone's launcher (and whose grandchildren its init).
fn pss_of(pids: &[i32], supervisor: Option<i32>) -> (u64, BTreeMap<String, (u64, usize)>) {
    let mut total = 0;
    let mut by_kind = BTreeMap::new();
    for &p in pids {
        let Some(kib) = pss(p) else { continue };
        total += kib;
        let e = by_kind.entry(kind(p, supervisor)).or_insert((0, 0));
        e.0 += kib;
        e.1 += 1;
    }
    (total, by_kind)
}

fn kind(pid: i32, supervisor: Option<i32>) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // Chromium's child processes rewrite their command line into one space-separated string.
    if args.len() == 1 {
        args = args[0].split(' ').map(str::to_string).collect();
    }
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
        });
    if args.iter().any(|a| a.starts_with("__chaperone-sandbox")) {
        return if parent.is_some() && parent == supervisor {
            "chaperone: sandbox launcher".into()
        } else {
            "chaperone: sandbox init (pid 1)".into()
        };
    }
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_string))
    };
    if args
        .first()
        .is_some_and(|a| a.ends_with("chrome_crashpad_handler"))
    {
        return "chromium: crashpad handler".into();
    }
    match (flag("type"), flag("utility-sub-type")) {
        (None, _) if args.first().is_some_and(|a| a.contains("chromium")) => {
            "chromium: browser".into()
        }
        (None, _) => format!("other: {}", args.first().cloned().unwrap_or_default()),
        (Some(t), Some(sub)) => format!("chromium: {t} ({sub})"),
        (Some(t), None) => format!("chromium: {t}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Numbers and the report.

fn med_of(cycles: &[Cycle], f: impl Fn(&Cycle) -> f64) -> f64 {
    median(&cycles.iter().map(f).collect::<Vec<_>>())
}

fn render(s: &Settings, r: &Report, m: &Machine) -> String {
    let (b, c) = (&r.bare, &r.chap);
    let start = (med_of(b, |x| x.start_ms), med_of(c, |x| x.start_ms));
    let stop = (med_of(b, |x| x.stop_ms), med_of(c, |x| x.stop_ms));
    let rtt = (med_of(b, |x| x.rtt_ms), med_of(c, |x| x.rtt_ms));
    let pss = (
        med_of(b, |x| x.pss_kib as f64) / 1024.0,
        med_of(c, |x| x.pss_kib as f64) / 1024.0,
    );
    let sup_pss = med_of(c, |x| x.supervisor_pss_kib as f64) / 1024.0;
    let echo = median(&r.ws_echo_ms);
    let verdict = |ok: bool| if ok { "pass" } else { "**MISSED**" };
    let start_ratio = start.1 / start.0;
    let rtt_diff = rtt.1 - rtt.0;
    let pss_ratio = pss.1 / pss.0;

    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Written by `scripts/bench.sh` (program: `benches/session.rs`); rerun it rather than \
         editing this file. Every chaperone figure is set against bare Chromium measured in \
         the same run on the same machine. Medians of {} runs (plus one discarded warm-up of \
         each side); bare and chaperone alternate run by run.\n",
        s.runs
    );
    let _ = writeln!(w, "## Machine\n");
    let commit = std::env::var("BENCH_COMMIT").unwrap_or_else(|_| "unknown".into());
    let _ = writeln!(w, "| | |\n|---|---|");
    let _ = writeln!(w, "| date (UTC) | {} |", m.date);
    let _ = writeln!(
        w,
        "| CPU | {} × `{}` (`nproc`) |",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        read_first("/proc/cpuinfo", "model name")
    );
    let mem_kib: f64 = read_first("/proc/meminfo", "MemTotal")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or(f64::NAN);
    let _ = writeln!(
        w,
        "| memory | {:.1} GiB (`MemTotal`), swap {} |",
        mem_kib / 1024.0 / 1024.0,
        read_first("/proc/meminfo", "SwapTotal")
    );
    let _ = writeln!(
        w,
        "| kernel | {} |",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let _ = writeln!(w, "| Chromium | {} (`{CHROMIUM}`) |", m.chromium);
    let _ = writeln!(
        w,
        "| load average (1/5/15 min) | {} at the start, {} at the end |",
        m.load_before,
        loadavg()
    );
    let _ = writeln!(
        w,
        "| chaperone | commit {commit}, `cargo build --release --locked` |"
    );
    let _ = writeln!(
        w,
        "| settings | {} runs, {} timed round trips per run, {} s idle before the PSS sample |\n",
        s.runs,
        s.calls,
        s.idle.as_secs()
    );

    let _ = writeln!(w, "## Results\n");
    let _ = writeln!(
        w,
        "| figure | bare Chromium | chaperone | chaperone vs bare | target | result |\n|---|---:|---:|---:|---|---|"
    );
    let _ = writeln!(
        w,
        "| 1. session start → first CDP reply | {:.0} ms | {:.0} ms | {:.2} × ({:+.0} ms) | ≤ 1.15 × bare | {} |",
        start.0,
        start.1,
        start_ratio,
        start.1 - start.0,
        verdict(start_ratio <= START_RATIO_TARGET)
    );
    let _ = writeln!(
        w,
        "| 2. revoke → purged and verified | {:.1} ms (SIGKILL → all gone) | {:.1} ms (`DELETE`) | {:+.1} ms | ≤ 100 ms | {} |",
        stop.0,
        stop.1,
        stop.1 - stop.0,
        verdict(stop.1 <= REVOKE_TARGET_MS)
    );
    let _ = writeln!(
        w,
        "| 3. CDP round trip (`Runtime.evaluate`) | {:.3} ms (pipe) | {:.3} ms (websocket) | {:+.3} ms | ≤ bare + 0.3 ms | {} |",
        rtt.0,
        rtt.1,
        rtt_diff,
        verdict(rtt_diff <= RTT_DIFF_TARGET_MS)
    );
    let _ = writeln!(
        w,
        "| 4. idle session PSS (one about:blank) | {:.0} MiB ({:.0} processes) | {:.0} MiB ({:.0} processes) | {:.3} × ({:+.1} MiB) | ≤ 1.05 × bare | {} |",
        pss.0,
        med_of(b, |x| x.processes as f64),
        pss.1,
        med_of(c, |x| x.processes as f64),
        pss_ratio,
        pss.1 - pss.0,
        verdict(pss_ratio <= PSS_RATIO_TARGET)
    );
    let _ = writeln!(
        w,
        "\nAlongside (not part of a target): the supervisor's own PSS with one idle session, \
         median {sup_pss:.1} MiB; the same websocket client against a plain tungstenite echo \
         server on loopback, median {:.3} ms per round trip; round-trip 90th percentile over \
         all calls of all runs {:.3} ms bare, {:.3} ms chaperone; one posture check of the idle \
         session (every process's namespaces, cgroup, capabilities, seccomp, parent, and the \
         mandate; `took_ms` of `GET /v1/sessions/{{id}}/posture`, {POSTURE_CHECKS} per run), \
         median {:.1} ms.\n",
        echo,
        percentile(
            &b.iter().flat_map(|x| x.rtts_ms.clone()).collect::<Vec<_>>(),
            0.9
        ),
        percentile(
            &c.iter().flat_map(|x| x.rtts_ms.clone()).collect::<Vec<_>>(),
            0.9
        ),
        median(
            &c.iter()
                .flat_map(|x| x.posture_ms.clone())
                .collect::<Vec<_>>()
        ),
    );

    let _ = writeln!(w, "## Where the time and the memory go\n");
    let _ = writeln!(
        w,
        "chaperone's start and revoke, split by the timestamps of its own audit records, and what \
         a connection costs (medians; each line is a median of its own, so they need not add up \
         exactly):\n"
    );
    let _ = writeln!(w, "| phase | median |\n|---|---:|");
    let mut names: Vec<&str> = c
        .iter()
        .chain(b.iter())
        .flat_map(|x| x.phases.keys().copied())
        .collect();
    // Chronological: the start's phases, the connection costs, then the revoke's.
    const ORDER: &[&str] = &[
        "start: POST",
        "start: session.created",
        "start: session.active",
        "start: 201",
        "start: …",
        "bare (for",
        "chaperone (for",
        "revoke: DELETE",
        "revoke: session.revoked",
        "revoke: purge_ms",
        "revoke: session.purged",
    ];
    names.sort_unstable_by_key(|n| (ORDER.iter().position(|p| n.starts_with(p)), *n));
    names.dedup();
    for n in names {
        let side = if n.starts_with("bare") { b } else { c };
        let _ = writeln!(
            w,
            "| {n} | {:.1} ms |",
            med_of(side, |x| x.phases.get(n).copied().unwrap_or(f64::NAN))
        );
    }
    let _ = writeln!(
        w,
        "\nPSS by kind of process: MiB (number of processes), medians over the runs of each \
         kind's sum:\n"
    );
    let _ = writeln!(w, "| process | bare | chaperone |\n|---|---:|---:|");
    let mut kinds: Vec<&String> = b
        .iter()
        .chain(c.iter())
        .flat_map(|x| x.pss_by_kind.keys())
        .collect();
    kinds.sort();
    kinds.dedup();
    let kind_med = |cs: &[Cycle], k: &str| {
        let mib = med_of(cs, |x| x.pss_by_kind.get(k).map_or(0, |e| e.0) as f64) / 1024.0;
        let n = med_of(cs, |x| x.pss_by_kind.get(k).map_or(0, |e| e.1) as f64);
        format!("{mib:.1} ({n:.0})")
    };
    for k in kinds {
        let _ = writeln!(w, "| {k} | {} | {} |", kind_med(b, k), kind_med(c, k));
    }

    let _ = writeln!(w, "\n{}", analysis(b, c, echo));
    let _ = writeln!(w, "## Method\n");
    let _ = writeln!(w, "{METHOD}");
    let _ = writeln!(w, "## Every run\n");
    let _ = writeln!(
        w,
        "| run | start bare / chaperone (ms) | revoke bare / chaperone (ms) | round trip bare / chaperone (ms) | PSS bare / chaperone (MiB) | supervisor PSS (MiB) |\n|---|---|---|---|---|---|"
    );
    for (i, (x, y)) in b.iter().zip(c.iter()).enumerate() {
        let _ = writeln!(
            w,
            "| {} | {:.0} / {:.0} | {:.1} / {:.1} | {:.3} / {:.3} | {:.0} / {:.0} | {:.1} |",
            i + 1,
            x.start_ms,
            y.start_ms,
            x.stop_ms,
            y.stop_ms,
            x.rtt_ms,
            y.rtt_ms,
            x.pss_kib as f64 / 1024.0,
            y.pss_kib as f64 / 1024.0,
            y.supervisor_pss_kib as f64 / 1024.0
        );
    }
    let _ = writeln!(w, "\n## Notes\n\n{NOTES}");
    o
}

/// The paragraphs that read the tables above, with this run's numbers.
fn analysis(b: &[Cycle], c: &[Cycle], echo: f64) -> String {
    let phase =
        |cs: &[Cycle], name: &str| med_of(cs, |x| x.phases.get(name).copied().unwrap_or(f64::NAN));
    let start = (med_of(b, |x| x.start_ms), med_of(c, |x| x.start_ms));
    let launch = phase(c, PH_LAUNCH);
    let control = phase(c, PH_POST) + phase(c, PH_ANSWER);
    let connect = phase(c, PH_CONNECT);
    let bare_after = phase(b, BARE_AFTER_FIRST);
    let settled = phase(c, CHAPERONE_SETTLED);
    let stop = (med_of(b, |x| x.stop_ms), med_of(c, |x| x.stop_ms));
    let purge = phase(c, PH_PURGE_MS);
    let rtt = (med_of(b, |x| x.rtt_ms), med_of(c, |x| x.rtt_ms));
    let pss = (
        med_of(b, |x| x.pss_kib as f64) / 1024.0,
        med_of(c, |x| x.pss_kib as f64) / 1024.0,
    );
    let kind = |cs: &[Cycle], k: &str| {
        med_of(cs, |x| x.pss_by_kind.get(k).map_or(0, |e| e.0) as f64) / 1024.0
    };
    let own = kind(c, "chaperone: sandbox launcher") + kind(c, "chaperone: sandbox init (pid 1)");
    // Chromium's own processes, kind by kind, largest difference first.
    let mut kinds: Vec<&String> = b
        .iter()
        .chain(c)
        .flat_map(|x| x.pss_by_kind.keys())
        .filter(|k| k.starts_with("chromium"))
        .collect();
    kinds.sort();
    kinds.dedup();
    let mut diffs: Vec<(f64, &str)> = kinds
        .iter()
        .map(|k| (kind(c, k) - kind(b, k), k.trim_start_matches("chromium: ")))
        .collect();
    diffs.sort_by(|x, y| y.0.abs().total_cmp(&x.0.abs()));
    let chromium_diff: f64 = diffs.iter().map(|d| d.0).sum();
    let largest = diffs
        .iter()
        .take(3)
        .map(|(d, k)| format!("{k} {d:+.1}"))
        .collect::<Vec<_>>()
        .join(", ");
    let bare_pss: Vec<f64> = b.iter().map(|x| x.pss_kib as f64 / 1024.0).collect();
    let spread = bare_pss.iter().copied().fold(f64::MIN, f64::max)
        - bare_pss.iter().copied().fold(f64::MAX, f64::min);
    let spread_note = if chromium_diff.abs() <= spread {
        format!(", no more than bare Chromium's own spread from run to run ({spread:.1} MiB)")
    } else {
        String::new()
    };
    format!(
        "**Start** ({:+.0} ms against bare). The launch itself — sandbox, Chromium's cold start \
         inside it, chaperone's first command over the pipe — takes {launch:.0} ms against \
         bare Chromium's whole {:.0} ms start ({:+.0} ms); the control API and its two fsynced \
         audit records take {control:.1} ms. Between the 201 and the agent's first reply pass \
         {connect:.0} ms, and that is mostly Chromium: right after its first reply it is still \
         finishing its start and answers slowly; over the bare pipe, \
         `Target.attachToBrowserTarget` (what chaperone sends for each agent connection) and \
         then `Browser.getVersion`, sent at that moment, take {bare_after:.0} ms. Once the \
         browser has settled, a new agent connection gets its first reply in {settled:.1} ms. \
         Bare Chromium's figure stops at its very first reply, while chaperone's includes more \
         commands inside that busy window (a bare client's next commands would wait there as \
         well).\n\n\
         **Revoke** ({:.1} ms against {:.1} ms for killing bare Chromium). chaperone's purge \
         takes {purge:.1} ms by its own count: SIGKILL to the namespace's init and the \
         launcher, waiting for the launcher to exit (the last process of the session's mount \
         namespace, so its exit also tears down the tmpfs root and profile), then polling \
         `/proc` every 2 ms until no process is left in the session's namespaces (the kernel \
         is still tearing down Chromium's address spaces, which costs the bare kill its \
         {:.1} ms too), then removing the cgroups. The remaining {:.1} ms are the audit \
         records (fsynced) and the HTTP exchange.\n\n\
         **Round trip** ({:+.3} ms). The same client against a plain websocket echo server \
         on loopback takes {echo:.3} ms per round trip, so roughly that much of the difference \
         is what any websocket client pays over a pipe; the remainder is chaperone's gate \
         (parsing, id and session remapping, policy check, scrubbing) and the extra hop through \
         the supervisor.\n\n\
         **Memory** ({:+.1} MiB). chaperone's own processes in the session (launcher and \
         init) account for {own:.1} MiB; Chromium's processes differ by {chromium_diff:+.1} MiB \
         (largest differences, MiB: {largest}){spread_note}. The supervisor, {:.1} MiB, serves all sessions and is not \
         counted above.\n",
        start.1 - start.0,
        start.0,
        launch - start.0,
        stop.1,
        stop.0,
        stop.0,
        stop.1 - purge,
        rtt.1 - rtt.0,
        pss.1 - pss.0,
        med_of(c, |x| x.supervisor_pss_kib as f64) / 1024.0,
    )
}

const METHOD: &str = "\
Both sides run Chromium with the same command line: `chaperone::browser::chromium::args()`; bare \
Chromium gets its own fresh `--user-data-dir` instead of the sandbox's, the same environment \
(`chromium::env()`, with `HOME`/`TMPDIR` pointing at its profile directory), runs as `nobody` \
(`setpriv --reuid=nobody --regid=nogroup --clear-groups`) with Chromium's own sandbox on, and gets \
the pipe on fds 3/4 from a `bash -c 'exec chromium … 3<&0 4>&1'` that execs it. chaperone runs \
as `chaperone serve` (release build, default configuration, audit log on the same disk as the \
bench's temporary directory), one session at a time. Each side does, per run: start → create one \
`about:blank` target and close any other page → attach to it (`flatten: true`) → sit idle → \
sample memory → round trips → stop.

1. **Session start.** chaperone: from just before `POST /v1/sessions` on the control socket \
   (a fresh connection, `chaperone::client::request`) until `Browser.getVersion` is answered on a \
   new websocket to the returned `cdp_url`; this includes the HTTP exchange, the audit records \
   (each fsynced), the sandbox, Chromium's cold start, chaperone's own first pipe command and \
   the websocket handshake. Bare: from just before spawning `setpriv` until `Browser.getVersion` \
   is answered over the pipe (includes `setpriv` and `bash` exec'ing, a few ms). Page cache is \
   warm on both sides (one warm-up run each, discarded). Two more timings explain the gap: on \
   the bare pipe, right after the first reply, `Target.attachToBrowserTarget` (what chaperone \
   sends for each agent connection) followed by `Browser.getVersion`; on chaperone, a second \
   websocket opened to the session after it sat idle, until its first `Browser.getVersion` \
   reply.
2. **Revoke.** chaperone: the duration of `DELETE /v1/sessions/{id}`, which answers once the \
   session is purged and verified (SIGKILL of the sandbox, no process left in its namespaces, \
   cgroups removed, audit records fsynced), with the agent's websocket still open. After it \
   answers, the bench checks that every process the session had is gone (it fails the run \
   otherwise). Bare: SIGKILL sent to every process of the bare browser at once (the bare \
   counterpart of killing a pid namespace's init), until the browser is reaped and no other of \
   its processes is alive (absent or zombie), polled every 0.5 ms. The bare profile directory \
   is on disk and removed afterwards, untimed; chaperone's profile is a tmpfs in the session's \
   mount namespace and goes with it.
3. **CDP round trip.** `Runtime.evaluate {\"expression\":\"1\"}` on the flat page session, one at \
   a time: 50 untimed, then the timed ones; the run's figure is the median of its calls and the \
   table shows the median of the runs' medians. Bare: over the pipe (NUL-delimited JSON, no \
   framing). chaperone: over the `cdp_url` websocket (tokio-tungstenite client, `TCP_NODELAY`), \
   through chaperone's gate and its own pipe to the browser. The difference therefore includes \
   what any websocket client pays (framing, masking, loopback TCP) besides chaperone's own \
   work and the extra hop through the supervisor: the line below the table gives the same \
   client's round trip against a plain tungstenite echo server (a thread of the bench) on \
   loopback, as a yardstick for the websocket's share. The client is the same program on both \
   sides (one tokio current-thread runtime, JSON encoded and parsed per call).
4. **Idle PSS.** After the page was created and the browser sat idle, `Pss:` of \
   `/proc/PID/smaps_rollup` summed over the processes. Bare: the browser process, all its \
   descendants and its two crashpad handlers (see the notes). chaperone: every descendant of the supervisor (found through \
   `/proc/PID/task/*/children`, recursively) — the sandbox launcher, the sandbox's init (pid 1 \
   of the session's pid namespace) and all Chromium processes; the supervisor itself is \
   excluded and reported on its own. PSS splits shared pages between the processes that map \
   them, so the launcher and init (the chaperone binary) share their pages with the supervisor; \
   bare and chaperone browsers never run at the same time, so they share no pages with each \
   other.
";

const NOTES: &str = "\
- The start figure for chaperone is what an operator sees end to end; bare Chromium has no \
  control API, no audit log and no websocket to open, so everything chaperone does besides \
  starting Chromium counts against it (see the phase table above).
- chaperone's Chromium reads `/etc/chromium/policies/managed/chaperone.json` (the sandbox's own \
  `/etc`); the host has no managed policy, so bare Chromium runs without one. The sandbox binds \
  only `/usr`, `/etc/fonts`, `/etc/ld.so.cache` and `/etc/localtime`: without the host's \
  `/var/cache/fontconfig`, fontconfig writes a fresh cache into the session's tmpfs \
  (`~/.cache/fontconfig`, seen in a running session) on every start; bare Chromium reads the \
  host's.
- Both sides start two `chrome_crashpad_handler` processes despite `--disable-breakpad \
  --disable-crash-reporter`. They double-fork: in the sandbox they land under its init and \
  are counted as descendants; bare ones land under the host's pid 1, so the bench finds them \
  by their `--database` path, which lies in the bare profile directory.
- Bare Chromium's proxy flag points at `127.0.0.1:3128`, where nothing listens on the host; \
  an idle about:blank page sends no request, so neither side touches the network.
- Revoke compares a verified purge (chaperone polls every 2 ms, fsyncs two audit records and \
  answers over HTTP) with the bare minimum of killing processes; it is not a like-for-like \
  operation, which is why the target is absolute (100 ms), not a ratio.
- On this 2-core machine whole runs differ: bare Chromium's median start moved between 350 \
  and 450 ms across full runs during development, with whatever else the machine was doing, \
  and chaperone's moves with it. A start ratio near its target is inconclusive: rerun on an \
  idle machine and check the load average above (the bench alone keeps it near 1).
- Round trips of about a tenth of a millisecond are at the scale of scheduler noise on 2 cores: \
  the client, the supervisor and Chromium's browser and renderer processes compete for them. \
  Compare the medians, not single runs.
- Durations are measured with `Instant`; chaperone's phases compare the audit records' `ts` \
  with the bench's `SystemTime` (the same wall clock), so they carry that clock's jitter.
";
