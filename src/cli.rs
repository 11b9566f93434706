//! The command line: `serve`, `run`, `session start|list|show|change|revoke`, `audit verify|show`,
//! `doctor`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::json;
use time::OffsetDateTime;

use crate::config::{Config, ControlAddr};
use crate::mandate::Mandate;

/// The mandate used when no profile is given (`profiles/default.toml`).
pub const DEFAULT_PROFILE: &str = include_str!("../profiles/default.toml");

#[derive(Parser)]
#[command(
    name = "chaperone",
    version,
    about = "Sandboxed headless Chromium for AI agents, with credentials the agent can use but never hold."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone, Default)]
struct ServeArgs {
    /// Supervisor config (TOML). Without it, the embedded defaults apply.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Agent CDP endpoint address, e.g. 127.0.0.1:9222.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Control API: unix:PATH or ADDR:PORT.
    #[arg(long)]
    control: Option<ControlAddr>,
    /// Audit log file (JSON Lines, hash-chained).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Key the audit chain with this file (≥ 32 bytes, mode 0600); overrides audit.key_file.
    #[arg(long)]
    audit_key_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor until SIGTERM/SIGINT; every session is purged on the way out.
    Serve(ServeArgs),
    /// Run CMD against one fresh session of a private supervisor; exits with CMD's code.
    Run {
        /// Mandate profile (TOML); default: the embedded profiles/default.toml.
        #[arg(long)]
        profile: Option<PathBuf>,
        #[command(flatten)]
        serve: ServeArgs,
        /// The command, after `--`. It gets CHAPERONE_CDP_URL and CHAPERONE_HTTP_URL.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Operate sessions of a running supervisor through its control API.
    Session {
        /// Control API: unix:PATH or ADDR:PORT (default: the default config's).
        #[arg(long, global = true)]
        control: Option<ControlAddr>,
        /// File with the operator token (TCP control API).
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        op: SessionOp,
    },
    /// Operate the agent keys of a running supervisor (mandates bind sessions to them with
    /// `identity.agent_key`).
    AgentKey {
        /// Control API: unix:PATH or ADDR:PORT (default: the default config's).
        #[arg(long, global = true)]
        control: Option<ControlAddr>,
        /// File with the operator token (TCP control API).
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        op: KeyOp,
    },
    /// Decide requests held for a human's approval (an `approve` action rule matched them).
    Approvals {
        /// Control API: unix:PATH or ADDR:PORT (default: the default config's).
        #[arg(long, global = true)]
        control: Option<ControlAddr>,
        /// File with the operator token (TCP control API).
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        op: ApprovalOp,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        op: AuditOp,
    },
    /// Check what this host offers the sandbox and what would be degraded.
    Doctor {
        /// Supervisor config to check against.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SessionOp {
    /// Start a session; prints it as JSON (with cdp_url and http_url).
    Start {
        /// Mandate profile (TOML); default: the embedded profiles/default.toml.
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Mandate as JSON instead of a profile.
        #[arg(long, conflicts_with = "profile")]
        mandate_json: Option<String>,
    },
    /// List sessions.
    List,
    /// Show one session.
    Show {
        /// Session id.
        id: String,
    },
    /// Change a live session's mandate (PATCH): narrowing at once, widening only with
    /// `--approved-by`.
    Change {
        /// Session id.
        id: String,
        /// The fields to change, as JSON, e.g. '{"ttl_secs": 600, "credentials": []}'.
        #[arg(long)]
        json: String,
        /// Who approved a widening (sets `approved_by`).
        #[arg(long)]
        approved_by: Option<String>,
    },
    /// Revoke a session; returns once it is purged.
    Revoke {
        /// Session id.
        id: String,
    },
    /// Issue a resume ticket for a session's agent (for one that lost its own); prints the
    /// ticket and the agent URLs that carry it.
    Ticket {
        /// Session id.
        id: String,
    },
    /// Check a live session's integrity now (namespaces, cgroup, capabilities, seccomp, the
    /// mandate); exits 1 on drift, which also revokes the session.
    Posture {
        /// Session id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ApprovalOp {
    /// List pending requests (session, agent, method, URL, matched rule, body summary).
    List {
        /// Only this session's.
        #[arg(long)]
        session: Option<String>,
    },
    /// Show one pending request with its whole body (up to 4096 fields or 64 KiB of text)
    /// and up to 64 KiB of its URL, held values cut out.
    Show {
        /// Approval id (`apr_…`).
        id: String,
    },
    /// Approve one: the request is sent, once, with any `on_approval` credential.
    Approve {
        /// Approval id (`apr_…`).
        id: String,
        /// Who approves (recorded in the audit log); default: $USER.
        #[arg(long, env = "USER")]
        by: String,
    },
    /// Deny one: the request fails as blocked by client.
    Deny {
        /// Approval id (`apr_…`).
        id: String,
        /// Who denies (recorded in the audit log); default: $USER.
        #[arg(long, env = "USER")]
        by: String,
    },
}

#[derive(Subcommand)]
enum KeyOp {
    /// Issue a key; prints its id and the key itself (shown only this once).
    Issue {
        /// Who the key is for.
        #[arg(long)]
        label: String,
    },
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key; every session bound to it is ended and purged before this returns.
    Revoke {
        /// Key id (`ak_…`).
        id: String,
    },
}

#[derive(Subcommand)]
enum AuditOp {
    /// Verify a log's hash chain, across its rotated files; names the first bad record.
    /// Exit 0: intact; 2: broken (or the wrong key); 3: intact, but the last line was cut off
    /// by a crash; 4: keyed, and no --key-file given (nothing verified).
    Verify {
        /// The log: its file, one of its rotated files, or the directory holding it.
        file: PathBuf,
        /// The key the log was written with (audit.key_file).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Print one session's records, oldest first, across rotated files (reads the files;
    /// no supervisor needed; does not verify: use `audit verify`).
    Show {
        /// Session id.
        #[arg(long)]
        session: String,
        /// Only events starting with this, e.g. `credential.`.
        #[arg(long)]
        event: Option<String>,
        /// The log (default: the default config's audit_log).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print each record as one JSON line.
        #[arg(long)]
        json: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaperone: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chaperone: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHAPERONE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn dispatch(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Serve(a) => serve(a).await,
        Command::Run {
            profile,
            serve,
            cmd,
        } => run(profile, serve, cmd).await,
        Command::Session {
            control,
            token_file,
            op,
        } => {
            let req = session_request(op)?;
            control_call(control, token_file, req).await
        }
        Command::AgentKey {
            control,
            token_file,
            op,
        } => {
            let req = match op {
                KeyOp::Issue { label } => (
                    "POST",
                    "/v1/agent-keys".to_string(),
                    Some(serde_json::json!({ "label": label }).to_string()),
                ),
                KeyOp::List => ("GET", "/v1/agent-keys".to_string(), None),
                KeyOp::Revoke { id } => ("DELETE", format!("/v1/agent-keys/{id}"), None),
            };
            control_call(control, token_file, req).await
        }
        Command::Approvals {
            control,
            token_file,
            op,
        } => {
            let decide = |id: String, decision: &str, by: String| {
                (
                    "POST",
                    format!("/v1/approvals/{id}"),
                    Some(serde_json::json!({ "decision": decision, "by": by }).to_string()),
                )
            };
            let req = match op {
                ApprovalOp::List { session: None } => ("GET", "/v1/approvals".to_string(), None),
                ApprovalOp::List { session: Some(s) } => (
                    "GET",
                    format!(
                        "/v1/approvals?{}",
                        url::form_urlencoded::Serializer::new(String::new())
                            .append_pair("session", &s)
                            .finish()
                    ),
                    None,
                ),
                ApprovalOp::Show { id } => ("GET", format!("/v1/approvals/{id}"), None),
                ApprovalOp::Approve { id, by } => decide(id, "approve", by),
                ApprovalOp::Deny { id, by } => decide(id, "deny", by),
            };
            control_call(control, token_file, req).await
        }
        Command::Audit {
            op: AuditOp::Verify { file, key_file },
        } => audit_verify(&file, key_file.as_deref()),
        Command::Audit {
            op:
                AuditOp::Show {
                    session,
                    event,
                    file,
                    json,
                },
        } => audit_show(session, event, file, json),
        Command::Doctor { config } => doctor(config.as_deref()),
    }
}

fn load_config(a: &ServeArgs) -> anyhow::Result<Config> {
    let mut cfg = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    if let Some(c) = &a.control {
        cfg.control = c.clone();
    }
    if let Some(p) = &a.audit_log {
        cfg.audit_log = p.clone();
    }
    if let Some(k) = &a.audit_key_file {
        cfg.audit.key_file = Some(k.clone());
    }
    Ok(cfg)
}

async fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&a)?;
    let running = crate::server::start(cfg).await?;
    // One line on stdout that scripts can wait for.
    println!(
        "{}",
        json!({
            "ready": true,
            "listen": running.listen.to_string(),
            "control": running.control.to_string(),
        })
    );
    wait_for_signal().await?;
    tracing::info!("stopping: ending every session");
    running.stop().await;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn read_profile(profile: Option<&Path>) -> anyhow::Result<Mandate> {
    let (name, text) = match profile {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("profile {}", p.display()))?,
        ),
        None => (
            "profiles/default.toml".to_string(),
            DEFAULT_PROFILE.to_string(),
        ),
    };
    Mandate::from_toml(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))
}

async fn run(
    profile: Option<PathBuf>,
    mut serve: ServeArgs,
    cmd: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let mandate = read_profile(profile.as_deref())?;
    let private = tempfile::Builder::new()
        .prefix("chaperone-run-")
        .tempdir()
        .context("cannot create a private runtime directory")?;
    if serve.listen.is_none() {
        serve.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    if serve.control.is_none() {
        serve.control = Some(ControlAddr::Unix(private.path().join("control.sock")));
    }
    let cfg = load_config(&serve)?;
    let mandate = mandate
        .validate(OffsetDateTime::now_utc(), cfg.limits.max_ttl.as_secs())
        .map_err(|e| anyhow::anyhow!("mandate.{e}"))?;
    // The command runs as the user who owns this private supervisor's control API: it could
    // approve its own requests. Step-up approval needs `serve`, with operators apart.
    if let Some(i) = mandate
        .source
        .actions
        .iter()
        .position(|r| r.decision == crate::actions::ActionDecision::Approve)
    {
        bail!(
            "mandate.actions[{i}]: `decision = \"approve\"` needs a human apart from the agent, \
             but `chaperone run` hands its command the supervisor's own control API, so the \
             command could approve itself; use `deny`, or `chaperone serve` with \
             `chaperone session start` for step-up approval"
        );
    }
    // Ctrl-C must purge from the first moment on, during the launch too: without a handler
    // the signal would kill this process with the browser still starting.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let running = crate::server::start(cfg).await?;
    let created = tokio::select! {
        r = running.registry.create(mandate) => Ok(r),
        _ = term.recv() => Err(143),
        _ = int.recv() => Err(130),
    };
    let session = match created {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            running.stop().await;
            bail!("{e}");
        }
        Err(code) => {
            running.stop().await;
            return Ok(ExitCode::from(code));
        }
    };
    let urls = running.registry.urls();
    let mut child = match tokio::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .env("CHAPERONE_CDP_URL", urls.cdp_url(&session.capability))
        .env("CHAPERONE_HTTP_URL", urls.http_url(&session.capability))
        .env("CHAPERONE_SESSION", &session.id)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            running.stop().await;
            bail!("cannot run `{}`: {e}", cmd[0]);
        }
    };
    let code = tokio::select! {
        status = child.wait() => exit_code(status?),
        _ = session.finished() => {
            // The session ended under the command (deadline, crash): the command cannot go
            // on meaningfully, so it is stopped.
            let _ = child.start_kill();
            let _ = child.wait().await;
            eprintln!("chaperone: session ended ({}) before the command finished", session.state().end_reason().map_or("?", |r| r.close_reason()));
            1
        }
        _ = term.recv() => { let _ = child.start_kill(); let _ = child.wait().await; 143 }
        _ = int.recv() => { let _ = child.start_kill(); let _ = child.wait().await; 130 }
    };
    running.stop().await;
    Ok(ExitCode::from(code))
}

fn exit_code(s: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        _ => 1,
    }
}

/// A control API request: method, path, body.
type ControlRequest = (&'static str, String, Option<String>);

fn session_request(op: SessionOp) -> anyhow::Result<ControlRequest> {
    Ok(match op {
        SessionOp::Start {
            profile,
            mandate_json,
        } => {
            let body = match mandate_json {
                Some(j) => j,
                None => serde_json::to_string(&read_profile(profile.as_deref())?)?,
            };
            ("POST", "/v1/sessions".to_string(), Some(body))
        }
        SessionOp::List => ("GET", "/v1/sessions".to_string(), None),
        SessionOp::Show { id } => ("GET", format!("/v1/sessions/{id}"), None),
        SessionOp::Change {
            id,
            json,
            approved_by,
        } => {
            let mut body: serde_json::Value =
                serde_json::from_str(&json).context("--json: not valid JSON")?;
            if let Some(who) = approved_by {
                let obj = body
                    .as_object_mut()
                    .ok_or_else(|| anyhow::anyhow!("--json: expected a JSON object"))?;
                obj.insert("approved_by".into(), who.into());
            }
            (
                "PATCH",
                format!("/v1/sessions/{id}"),
                Some(body.to_string()),
            )
        }
        SessionOp::Revoke { id } => ("DELETE", format!("/v1/sessions/{id}"), None),
        SessionOp::Ticket { id } => ("POST", format!("/v1/sessions/{id}/resume-ticket"), None),
        SessionOp::Posture { id } => ("GET", format!("/v1/sessions/{id}/posture"), None),
    })
}

/// Sends one request to the control API, prints the answer, and exits 1 on an error status.
async fn control_call(
    control: Option<ControlAddr>,
    token_file: Option<PathBuf>,
    (method, path, body): ControlRequest,
) -> anyhow::Result<ExitCode> {
    let addr = control.unwrap_or_else(|| Config::default().control);
    let token = match token_file {
        Some(f) => Some(
            std::fs::read_to_string(&f)
                .with_context(|| format!("--token-file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let (status, value) =
        crate::client::request(&addr, token.as_deref(), method, &path, body).await?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    // A posture check that found drift answers 200 with `"ok": false`.
    let failed_check = value.get("ok") == Some(&serde_json::Value::Bool(false));
    Ok(if (200..300).contains(&status) && !failed_check {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn audit_verify(file: &Path, key_file: Option<&Path>) -> anyhow::Result<ExitCode> {
    use crate::audit::VerifyError;
    let key = key_file
        .map(crate::audit::AuditKey::load)
        .transpose()
        .context("--key-file")?;
    let s = match crate::audit::verify_log(file, key.as_ref()) {
        Ok(s) => s,
        Err(VerifyError::Chain(e) | VerifyError::NotKeyed(e) | VerifyError::WrongKey(e)) => {
            println!("{}: chain broken at {e}", file.display());
            return Ok(ExitCode::from(2));
        }
        Err(VerifyError::KeyNeeded { key_id, .. }) => {
            println!(
                "{}: NOT verified: the log is keyed (hmac-sha256, key_id {key_id}); pass --key-file with the key it was written with",
                file.display()
            );
            return Ok(ExitCode::from(4));
        }
        Err(e) => bail!("{e}"),
    };
    let first = s.files.first().and_then(|f| f.first_seq).unwrap_or(0);
    let mut notes = Vec::new();
    if s.files.len() > 1 {
        notes.push(format!(
            "{} files, seq {first} to {}",
            s.files.len(),
            s.last_seq
        ));
    }
    if let Some(prev) = &s.continues {
        notes.push(format!(
            "continues an earlier file {prev} that is not here: verified from seq {first}"
        ));
    }
    notes.push(match &s.key_id {
        Some(id) => format!("keyed: hmac-sha256, key_id {id}"),
        None if s.records == 0 => "empty".to_string(),
        None => "not keyed: plain SHA-256, which anyone who can write the log can recompute (set audit.key_file)".to_string(),
    });
    if let Some(torn) = s.torn_tail() {
        println!(
            "{}: {} records verified; the last line is incomplete (a write was cut off): {torn} bytes after seq {}; the supervisor drops them and records audit.recovered when it next opens the log",
            file.display(),
            s.records,
            s.last_seq
        );
        for n in notes {
            println!("  {n}");
        }
        return Ok(ExitCode::from(3));
    }
    println!(
        "{}: {} records, chain intact (last hash {})",
        file.display(),
        s.records,
        s.last_hash
    );
    for n in notes {
        println!("  {n}");
    }
    Ok(ExitCode::SUCCESS)
}

fn audit_show(
    session: String,
    event: Option<String>,
    file: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let path = file.unwrap_or_else(|| Config::default().audit_log);
    let q = crate::audit::AuditQuery {
        session,
        event_prefix: event,
    };
    let records = crate::audit::read_log(&path, &q)?;
    for r in &records {
        if json {
            println!("{r}");
        } else {
            println!("{}", describe(r));
        }
    }
    if records.is_empty() {
        eprintln!(
            "chaperone: no records of session {} in {}",
            q.session,
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per record: time, seq, event, then the event's own fields.
fn describe(r: &serde_json::Value) -> String {
    const CHAIN: &[&str] = &[
        "seq", "ts", "event", "session", "prev", "hash", "alg", "key_id",
    ];
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut line = format!(
        "{} #{} {}",
        text(&r["ts"]),
        text(&r["seq"]),
        text(&r["event"])
    );
    if let Some(m) = r.as_object() {
        let mut keys: Vec<&String> = m.keys().filter(|k| !CHAIN.contains(&k.as_str())).collect();
        keys.sort();
        for k in keys {
            line.push_str(&format!(" {k}={}", text(&m[k])));
        }
    }
    line
}

fn doctor(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cfg = match config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let report = chaperone_sandbox::probe();
    println!("{report}");
    let chromium = &cfg.browser.path;
    let version = std::process::Command::new(chromium)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match &version {
        Some(v) => println!("chromium: {} ({v})", chromium.display()),
        None => println!(
            "chromium: MISSING at {} (install the Debian package `chromium`, or set browser.path)",
            chromium.display()
        ),
    }
    let missing: Vec<String> = report
        .missing()
        .into_iter()
        .map(|l| l.to_string())
        .collect();
    let refused: Vec<&String> = missing
        .iter()
        .filter(|l| !cfg.sandbox.accept_degraded.contains(l))
        .collect();
    if refused.is_empty() && version.is_some() {
        if missing.is_empty() {
            println!("verdict: sessions run with every sandbox layer");
        } else {
            println!(
                "verdict: sessions run DEGRADED (accepted by sandbox.accept_degraded): {}",
                missing.join(", ")
            );
        }
        Ok(ExitCode::SUCCESS)
    } else {
        if !refused.is_empty() {
            println!(
                "verdict: sessions will be REFUSED: missing layers {} (fix the host, or list them in sandbox.accept_degraded to run degraded)",
                refused.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
        Ok(ExitCode::from(1))
    }
}
