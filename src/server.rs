//! Wiring of a running supervisor: audit log, registry, agent endpoint, control API.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{bail, Context};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, AuditKey, FileOptions};
use crate::config::{Config, ControlAddr, TlsConfig};
use crate::control::Caller;
use crate::metrics::Metrics;
use crate::session::{AgentUrls, Registry};
use crate::tls::Peer;

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
        Some(t) => Some(tls_acceptor(t)?),
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
                let app = control_app.into_make_service_with_connect_info::<Caller>();
                let r = axum::serve(l, app)
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
                let app = control_app.into_make_service_with_connect_info::<Caller>();
                let r = axum::serve(l, app)
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
                // Resume tickets are bound to this instance (AG-374 4.8).
                "instance": registry.instance(),
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

/// The agent endpoint's TLS: `tls.cert`/`tls.key`, and client certificates as `tls.client_auth`
/// and `tls.client_ca` say.
fn tls_acceptor(t: &TlsConfig) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let (cert, key) = (&t.cert, &t.key);
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
    let verifier = crate::tls::client_verifier(t.client_auth, t.client_ca.as_deref(), &provider)?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("tls: certificate and key do not match")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves the agent endpoint until `stop`. Every request carries its connection's [`Peer`].
async fn serve_agents(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) {
    let Some(tls) = tls else {
        let r = axum::serve(listener, WithPeer(app))
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
            let peer = Peer::from_tls(peer, stream.get_ref().1);
            let service =
                TowerToHyperService::new(tower::Layer::layer(&axum::Extension(peer), app));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// For each plain TCP connection, the router with that connection's [`Peer`] inserted into
/// every request (the whole router is wrapped, so no route or fallback can miss it).
#[derive(Clone)]
struct WithPeer(axum::Router);

impl<'a> tower::Service<axum::serve::IncomingStream<'a, tokio::net::TcpListener>> for WithPeer {
    type Response = axum::middleware::AddExtension<axum::Router, Peer>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(
        &mut self,
        conn: axum::serve::IncomingStream<'a, tokio::net::TcpListener>,
    ) -> Self::Future {
        let peer = Peer {
            addr: Some(*conn.remote_addr()),
            cert_sha256: None,
        };
        std::future::ready(Ok(tower::Layer::layer(
            &axum::Extension(peer),
            self.0.clone(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use axum::routing::get;
    use axum::{Extension, Json};
    use http_body_util::BodyExt;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::sign::CertifiedKey;
    use serde_json::Value;

    use crate::config::ClientAuth;

    /// The agent endpoint as `serve_agents` runs it, with a router that echoes its `Peer`.
    struct Endpoint {
        addr: SocketAddr,
        /// Requests that reached the router.
        hits: Arc<AtomicUsize>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        server_cert: CertificateDer<'static>,
        _dir: tempfile::TempDir,
    }

    async fn echo(
        axum::extract::State(hits): axum::extract::State<Arc<AtomicUsize>>,
        peer: Option<Extension<Peer>>,
    ) -> Json<Value> {
        hits.fetch_add(1, Ordering::SeqCst);
        Json(match peer {
            Some(Extension(p)) => json!({
                "present": true,
                "addr": p.addr.map(|a| a.to_string()),
                "cert_sha256": p.cert_sha256,
            }),
            None => json!({"present": false}),
        })
    }

    /// Serves over TLS with `client_auth` (`Some`), or plain TCP (`None`).
    async fn endpoint(tls: Option<(ClientAuth, Option<&str>)>) -> Endpoint {
        let dir = tempfile::tempdir().unwrap();
        let server = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let acceptor = tls.map(|(client_auth, client_ca_pem)| {
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&cert, server.cert.pem()).unwrap();
            std::fs::write(&key, server.signing_key.serialize_pem()).unwrap();
            let client_ca = client_ca_pem.map(|pem| {
                let p = dir.path().join("client-ca.pem");
                std::fs::write(&p, pem).unwrap();
                p
            });
            tls_acceptor(&TlsConfig {
                cert,
                key,
                client_auth,
                client_ca,
            })
            .unwrap()
        });
        let hits = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new()
            .route("/peer", get(echo))
            .fallback(echo)
            .with_state(hits.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_agents(listener, app, acceptor, stop.clone()));
        Endpoint {
            addr,
            hits,
            stop,
            task,
            server_cert: server.cert.der().clone(),
            _dir: dir,
        }
    }

    impl Endpoint {
        /// Stops the endpoint and proves it stopped.
        async fn stop(self) {
            self.stop.cancel();
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("the agent endpoint stops when told")
                .unwrap();
        }
    }

    /// A client certificate, its key, and the key the client signs with (normally the same).
    struct ClientCert {
        chain: Vec<CertificateDer<'static>>,
        signing_key: PrivateKeyDer<'static>,
    }

    impl ClientCert {
        fn self_signed(cn: &str) -> ClientCert {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let cert = params.self_signed(&key).unwrap();
            ClientCert {
                chain: vec![cert.der().clone()],
                signing_key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            }
        }

        fn fingerprint(&self) -> String {
            crate::tls::sha256_hex(&self.chain[0])
        }
    }

    /// Presents the certificate whatever the server asks, even with a key that does not match.
    #[derive(Debug)]
    struct Present(Arc<CertifiedKey>);

    impl rustls::client::ResolvesClientCert for Present {
        fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }

    fn client_config(
        server_cert: &CertificateDer<'static>,
        client: Option<&ClientCert>,
    ) -> rustls::ClientConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server_cert.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        match client {
            None => builder.with_no_client_auth(),
            Some(c) => {
                // CertifiedKey::new skips the key/certificate match check that
                // with_client_auth_cert does, so a test can present a key it does not hold.
                let key = provider
                    .key_provider
                    .load_private_key(c.signing_key.clone_key())
                    .unwrap();
                builder.with_client_cert_resolver(Arc::new(Present(Arc::new(CertifiedKey::new(
                    c.chain.clone(),
                    key,
                )))))
            }
        }
    }

    /// One GET; the handler's echo and the client's own address, or why it failed.
    async fn get_peer(
        ep: &Endpoint,
        path: &str,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<(Value, SocketAddr), String> {
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(ep.addr)
                .await
                .map_err(|e| e.to_string())?;
            let local = tcp.local_addr().unwrap();
            let v = match tls {
                None => http_get(tcp, path).await?,
                Some(cfg) => {
                    let s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
                        .await
                        .map_err(|e| format!("client handshake: {e}"))?;
                    http_get(s, path).await?
                }
            };
            Ok((v, local))
        };
        tokio::time::timeout(Duration::from_secs(20), attempt)
            .await
            .expect("request hung")
    }

    async fn http_get<I>(io: I, path: &str) -> Result<Value, String>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("{e:?}"))?;
        let conn = tokio::spawn(conn);
        let req = axum::http::Request::get(path)
            .header("host", "127.0.0.1")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        match send.send_request(req).await {
            Ok(res) => {
                let body = res.into_body().collect().await.map_err(|e| e.to_string())?;
                serde_json::from_slice(&body.to_bytes()).map_err(|e| e.to_string())
            }
            // TLS 1.3 clients finish their side of the handshake before the server has seen
            // their certificate, so a refusal arrives as an alert on the first read.
            Err(e) => Err(format!("{e}; connection: {:?}", conn.await)),
        }
    }

    #[tokio::test]
    async fn required_client_auth_fails_the_handshake_without_a_certificate() {
        let ep = endpoint(Some((ClientAuth::Required, None))).await;
        let e = get_peer(&ep, "/peer", Some(client_config(&ep.server_cert, None)))
            .await
            .unwrap_err();
        assert!(e.contains("CertificateRequired"), "{e}");
        assert_eq!(ep.hits.load(Ordering::SeqCst), 0);
        ep.stop().await;
    }

    #[tokio::test]
    async fn required_client_auth_gives_the_handler_the_certificate_fingerprint() {
        let ep = endpoint(Some((ClientAuth::Required, None))).await;
        let client = ClientCert::self_signed("agent-1");
        for path in ["/peer", "/not-a-route"] {
            let (v, local) = get_peer(
                &ep,
                path,
                Some(client_config(&ep.server_cert, Some(&client))),
            )
            .await
            .unwrap();
            assert_eq!(v["present"], true, "{path}: {v}");
            assert_eq!(v["addr"], local.to_string(), "{path}: {v}");
            assert_eq!(v["cert_sha256"], client.fingerprint(), "{path}: {v}");
        }
        let other = ClientCert::self_signed("agent-2");
        let (v, _) = get_peer(
            &ep,
            "/peer",
            Some(client_config(&ep.server_cert, Some(&other))),
        )
        .await
        .unwrap();
        assert_eq!(v["cert_sha256"], other.fingerprint());
        assert_ne!(other.fingerprint(), client.fingerprint());
        ep.stop().await;
    }

    #[tokio::test]
    async fn optional_client_auth_lets_a_client_without_a_certificate_in_with_none() {
        let ep = endpoint(Some((ClientAuth::Optional, None))).await;
        let (v, local) = get_peer(&ep, "/peer", Some(client_config(&ep.server_cert, None)))
            .await
            .unwrap();
        assert_eq!(v["present"], true, "{v}");
        assert_eq!(v["addr"], local.to_string());
        assert_eq!(v["cert_sha256"], Value::Null, "{v}");
        let client = ClientCert::self_signed("agent-1");
        let (v, _) = get_peer(
            &ep,
            "/peer",
            Some(client_config(&ep.server_cert, Some(&client))),
        )
        .await
        .unwrap();
        assert_eq!(v["cert_sha256"], client.fingerprint(), "{v}");
        ep.stop().await;
    }

    #[tokio::test]
    async fn without_client_auth_a_client_certificate_is_never_asked_for() {
        let ep = endpoint(Some((ClientAuth::None, None))).await;
        let client = ClientCert::self_signed("agent-1");
        let (v, local) = get_peer(
            &ep,
            "/peer",
            Some(client_config(&ep.server_cert, Some(&client))),
        )
        .await
        .unwrap();
        assert_eq!(v["addr"], local.to_string(), "{v}");
        assert_eq!(v["cert_sha256"], Value::Null, "{v}");
        ep.stop().await;
    }

    #[tokio::test]
    async fn plain_requests_carry_the_address_and_no_certificate() {
        let ep = endpoint(None).await;
        for path in ["/peer", "/not-a-route"] {
            let (v, local) = get_peer(&ep, path, None).await.unwrap();
            assert_eq!(v["present"], true, "{path}: {v}");
            assert_eq!(v["addr"], local.to_string(), "{path}: {v}");
            assert_eq!(v["cert_sha256"], Value::Null, "{path}: {v}");
        }
        ep.stop().await;
    }

    /// The attack: present someone else's certificate (its fingerprint is public, e.g. from a
    /// mandate) without holding its key. The handshake signature gives it away.
    #[tokio::test]
    async fn a_certificate_presented_without_its_key_fails_the_handshake() {
        for auth in [ClientAuth::Required, ClientAuth::Optional] {
            let ep = endpoint(Some((auth, None))).await;
            let victim = ClientCert::self_signed("victim");
            let attacker = ClientCert::self_signed("attacker");
            let forged = ClientCert {
                chain: victim.chain.clone(),
                signing_key: attacker.signing_key.clone_key(),
            };
            let e = get_peer(
                &ep,
                "/peer",
                Some(client_config(&ep.server_cert, Some(&forged))),
            )
            .await
            .unwrap_err();
            assert!(
                e.contains("DecryptError") || e.contains("BadSignature"),
                "{auth:?}: {e}"
            );
            assert_eq!(ep.hits.load(Ordering::SeqCst), 0, "{auth:?}");
            ep.stop().await;
        }
    }

    #[tokio::test]
    async fn client_ca_admits_only_certificates_it_issued() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "agents CA");
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let issued = ClientCert {
            chain: vec![leaf.der().clone()],
            signing_key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()).into(),
        };
        let stranger = ClientCert::self_signed("stranger");

        let ep = endpoint(Some((ClientAuth::Optional, Some(&ca_pem)))).await;
        let (v, _) = get_peer(
            &ep,
            "/peer",
            Some(client_config(&ep.server_cert, Some(&issued))),
        )
        .await
        .unwrap();
        assert_eq!(v["cert_sha256"], issued.fingerprint(), "{v}");
        let (v, _) = get_peer(&ep, "/peer", Some(client_config(&ep.server_cert, None)))
            .await
            .unwrap();
        assert_eq!(v["cert_sha256"], Value::Null, "{v}");
        let e = get_peer(
            &ep,
            "/peer",
            Some(client_config(&ep.server_cert, Some(&stranger))),
        )
        .await
        .unwrap_err();
        assert!(
            e.contains("UnknownCA") || e.contains("BadCertificate"),
            "{e}"
        );
        assert_eq!(ep.hits.load(Ordering::SeqCst), 2);
        ep.stop().await;

        let ep = endpoint(Some((ClientAuth::Required, Some(&ca_pem)))).await;
        let e = get_peer(&ep, "/peer", Some(client_config(&ep.server_cert, None)))
            .await
            .unwrap_err();
        assert!(e.contains("CertificateRequired"), "{e}");
        let (v, _) = get_peer(
            &ep,
            "/peer",
            Some(client_config(&ep.server_cert, Some(&issued))),
        )
        .await
        .unwrap();
        assert_eq!(v["cert_sha256"], issued.fingerprint(), "{v}");
        ep.stop().await;
    }
}
