//! The command line: `serve`, `run`, `session start|list|show|revoke`, `audit verify`,
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
    /// Revoke a session; returns once it is purged.
    Revoke {
        /// Session id.
        id: String,
    },
}

#[derive(Subcommand)]
enum AuditOp {
    /// Verify a log's hash chain; names the first bad record.
    Verify {
        /// The log file.
        file: PathBuf,
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
        } => session(control, token_file, op).await,
        Command::Audit {
            op: AuditOp::Verify { file },
        } => audit_verify(&file),
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
    let running = crate::server::start(cfg).await?;
    let session = match running.registry.create(mandate).await {
        Ok(s) => s,
        Err(e) => {
            running.stop().await;
            bail!("{e}");
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
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
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

async fn session(
    control: Option<ControlAddr>,
    token_file: Option<PathBuf>,
    op: SessionOp,
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
    let (method, path, body) = match op {
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
        SessionOp::Revoke { id } => ("DELETE", format!("/v1/sessions/{id}"), None),
    };
    let (status, value) =
        crate::client::request(&addr, token.as_deref(), method, &path, body).await?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(if (200..300).contains(&status) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn audit_verify(file: &Path) -> anyhow::Result<ExitCode> {
    match crate::audit::verify_file(file) {
        Ok(s) => {
            println!(
                "{}: {} records, chain intact (last hash {})",
                file.display(),
                s.records,
                s.last_hash
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(crate::audit::VerifyError::Chain(e)) => {
            println!("{}: chain broken at {e}", file.display());
            Ok(ExitCode::from(2))
        }
        Err(e) => bail!("{}: {e}", file.display()),
    }
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
