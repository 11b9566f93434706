//! Wiring of a running supervisor: audit log, registry, agent endpoint, control API.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::{bail, Context};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, AuditKey, FileOptions};
use crate::config::{Config, ControlAddr};
use crate::metrics::Metrics;
use crate::session::{AgentUrls, Registry};

/// A supervisor that is serving.
pub struct Running {
    /// The sessions.
    pub registry: Arc<Registry>,
    /// Where agents connect.
    pub listen: SocketAddr,
    /// Where operators connect.
    pub control: ControlAddr,
    stop_servers: CancellationToken,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

/// Opens the audit log, binds both listeners and starts serving.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    cfg.check().map_err(anyhow::Error::msg)?;
    for layer in &cfg.sandbox.accept_degraded {
        layer
            .parse::<chaperone_sandbox::Layer>()
            .map_err(|e| anyhow::anyhow!("sandbox.accept_degraded: {e}"))?;
    }
    let audit_key = match &cfg.audit.key_file {
        Some(f) => Some(Arc::new(AuditKey::load(f).context("audit.key_file")?)),
        None => None,
    };
    let audit = Audit::open(
        &cfg.audit_log,
        FileOptions {
            key: audit_key,
            rotate_bytes: cfg.audit.rotate_bytes.map(|b| b.as_u64()),
        },
    )?;
    // A supervisor killed with SIGKILL took its browsers with it but could not remove their
    // (now empty) cgroups.
    let swept = tokio::task::spawn_blocking(|| {
        chaperone_sandbox::sweep_stale_cgroups(std::time::Duration::from_secs(60))
    })
    .await
    .unwrap_or_default();
    if !swept.is_empty() {
        tracing::info!(
            count = swept.len(),
            "removed empty cgroups left by an earlier supervisor"
        );
    }
    let agent = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listen: cannot bind the agent endpoint on {}", cfg.listen))?;
    let listen = agent.local_addr()?;
    let urls = AgentUrls {
        authority: cfg.advertised_host(listen),
        tls: cfg.tls.is_some(),
    };
    let tls = match &cfg.tls {
        Some(t) => Some(tls_acceptor(&t.cert, &t.key)?),
        None => None,
    };
    let token = match (&cfg.control, &cfg.control_token_file) {
        (ControlAddr::Tcp(_), Some(f)) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("control_token_file: cannot read {}", f.display()))?;
            let t = t.trim().to_string();
            if t.len() < 16 {
                bail!("control_token_file: the token must be at least 16 characters");
            }
            Some(t)
        }
        _ => None,
    };
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(Registry::new(cfg.clone(), audit.clone(), metrics, urls));
    let stop = CancellationToken::new();
    let mut servers = Vec::new();

    let agent_app = crate::gate::endpoint::router(registry.clone());
    servers.push(tokio::spawn(serve_agents(
        agent,
        agent_app,
        tls,
        stop.clone(),
    )));

    let control_app = crate::control::router(registry.clone(), token);
    match &cfg.control {
        ControlAddr::Unix(path) => {
            let l = bind_unix(path)?;
            let stop = stop.clone();
            servers.push(tokio::spawn(async move {
                let r = axum::serve(l, control_app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "control API stopped");
                }
            }));
        }
        ControlAddr::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("control: cannot bind {addr}"))?;
            let stop = stop.clone();
            servers.push(tokio::spawn(async move {
                let r = axum::serve(l, control_app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "control API stopped");
                }
            }));
        }
    }
    audit
        .record(
            "supervisor.started",
            None,
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "listen": listen.to_string(),
                "control": cfg.control.to_string(),
            }),
        )
        .await?;
    Ok(Running {
        registry,
        listen,
        control: cfg.control.clone(),
        stop_servers: stop,
        servers,
    })
}

impl Running {
    /// Ends every session (each purged and verified), then stops serving.
    pub async fn stop(self) {
        self.registry.shutdown().await;
        let _ = self
            .registry
            .audit()
            .record("supervisor.stopped", None, json!({}))
            .await;
        self.stop_servers.cancel();
        for s in self.servers {
            let _ = s.await;
        }
        if let ControlAddr::Unix(p) = &self.control {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn bind_unix(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("control: cannot create {}", dir.display()))?;
    }
    if path.exists() {
        // A socket nobody answers on is a leftover of a supervisor that was killed.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "control: {} is in use by another supervisor",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("control: cannot remove stale {}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("control: cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("control: cannot chmod {}", path.display()))?;
    Ok(l)
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("tls.cert: {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("tls.cert: {} is not PEM", cert.display()))?;
    if certs.is_empty() {
        bail!("tls.cert: {} holds no certificate", cert.display());
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("tls.key: {}", key.display()))?,
    ))
    .with_context(|| format!("tls.key: {} is not PEM", key.display()))?
    .ok_or_else(|| anyhow::anyhow!("tls.key: {} holds no private key", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("tls: certificate and key do not match")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn serve_agents(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) {
    let Some(tls) = tls else {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "agent endpoint stopped");
        }
        return;
    };
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let tls = tls.clone();
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let stream = match tls.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
