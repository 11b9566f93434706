//! Fixtures of the OAuth tests: a fake OAuth 2.0 authorization server on 127.0.0.1 (name
//! `localhost`) with a token endpoint (refresh grant) and an RFC 7009 revocation endpoint,
//! over TLS with a certificate from a CA made for the test run (the supervisor trusts it
//! through `[upstream] ca_file`), or over plain http where the browser must reach it too; and
//! a bank-like API on `bank.test` that lets a request in only with an access token the fake
//! server considers valid right now.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::bank::{Reply, Request, Server};

/// The refresh token the mandate holds.
pub const REFRESH: &str = "SECRET-REFRESH-6f2b90";
/// The client secret the mandate holds.
pub const CLIENT_SECRET: &str = "SECRET-CLIENT-31c7d5";
/// The client id.
pub const CLIENT_ID: &str = "chaperone-test-client";
/// The scope the mandate grants.
pub const SCOPE: &str = "read";

/// One access token the server issued.
#[derive(Clone, Debug)]
pub struct Issued {
    pub token: String,
    pub valid_until: Instant,
    /// The scope granted with it.
    pub scope: String,
}

/// What the fake authorization server saw and issued.
#[derive(Default)]
pub struct OAuthState {
    /// Every request to the token endpoint, in order.
    pub token_requests: Vec<Request>,
    /// Every request to the revocation endpoint, in order.
    pub revocations: Vec<Request>,
    /// Every access token issued, in order.
    pub issued: Vec<Issued>,
    /// Lifetime (`expires_in`) of the tokens it issues.
    pub lifetime_secs: u64,
    /// From this many grants on, it grants `read admin` instead of the scope asked for (an
    /// identity provider that does not hold scope on refresh, AG-120 scenario C).
    pub widen_after: Option<usize>,
}

impl OAuthState {
    /// The index of `token` among the issued tokens if it is valid now.
    pub fn valid(&self, token: &str) -> Option<usize> {
        self.issued
            .iter()
            .position(|i| i.token == token && Instant::now() < i.valid_until)
    }
}

/// The fake authorization server.
pub struct OAuthServer {
    /// `https://localhost:<port>` or `http://localhost:<port>`.
    pub base: String,
    pub state: Arc<Mutex<OAuthState>>,
    /// The CA that issued its certificate (PEM), for `[upstream] ca_file`.
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl OAuthServer {
    /// Starts it over TLS (`tls`) or plain http, issuing tokens valid `lifetime_secs`.
    pub fn start(tls: bool, lifetime_secs: u64) -> OAuthServer {
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        let config = {
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "chaperone test CA");
            let ca =
                rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                    .unwrap();
            std::fs::write(&ca_file, ca.pem()).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(
                rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
            );
            Arc::new(
                rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key_der)
                .unwrap(),
            )
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(OAuthState {
            lifetime_secs,
            ..OAuthState::default()
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let (st, config) = (st.clone(), config.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    if tls {
                        let Ok(conn) = rustls::ServerConnection::new(config) else {
                            return;
                        };
                        let mut s = rustls::StreamOwned::new(conn, stream);
                        if serve_one(&mut s, &st) {
                            s.conn.send_close_notify();
                            let _ = s.flush();
                        }
                    } else {
                        let mut s: TcpStream = stream;
                        serve_one(&mut s, &st);
                    }
                });
            }
        });
        OAuthServer {
            base: format!("{}://localhost:{port}", if tls { "https" } else { "http" }),
            state,
            ca_file,
            _dir: dir,
        }
    }

    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.base)
    }

    pub fn revocation_endpoint(&self) -> String {
        format!("{}/revoke", self.base)
    }

    /// The supervisor's config: trust this server's CA.
    pub fn supervisor_config(&self) -> String {
        format!(
            "[upstream]\nca_file = \"{}\"\ntimeout = \"5s\"\n",
            self.ca_file.display()
        )
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, OAuthState> {
        self.state.lock().unwrap()
    }

    /// Refresh grants it honoured (requests that carried the held refresh token).
    pub fn refreshes(&self) -> Vec<Request> {
        self.lock()
            .token_requests
            .iter()
            .filter(|r| form(r, "refresh_token").as_deref() == Some(REFRESH))
            .cloned()
            .collect()
    }

    /// Every value a log must not show: the held secrets and every token issued.
    pub fn values(&self) -> Vec<String> {
        let mut v = vec![REFRESH.to_string(), CLIENT_SECRET.to_string()];
        v.extend(self.lock().issued.iter().map(|i| i.token.clone()));
        v
    }
}

/// A form field of `r`'s body (`application/x-www-form-urlencoded`), decoded.
pub fn form(r: &Request, key: &str) -> Option<String> {
    url::form_urlencoded::parse(&r.body)
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Reads one request from `s`, answers it, and says whether an answer went out.
fn serve_one(s: &mut (impl Read + Write), st: &Mutex<OAuthState>) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break e + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let Some(super::bank::Head {
        method,
        target,
        headers,
        body_len: len,
    }) = super::bank::parse_head(&buf[..head_end])
    else {
        return false;
    };
    while buf.len() < head_end + len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let req = Request {
        method,
        target,
        headers,
        body: buf[head_end..head_end + len].to_vec(),
    };
    let (status, body) = answer(&req, st);
    let resp = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).is_ok() && s.flush().is_ok()
}

fn answer(req: &Request, st: &Mutex<OAuthState>) -> (u16, String) {
    let mut st = st.lock().unwrap();
    match (req.method.as_str(), req.path()) {
        ("POST", "/token") => {
            st.token_requests.push(req.clone());
            let ok = form(req, "grant_type").as_deref() == Some("refresh_token")
                && form(req, "refresh_token").as_deref() == Some(REFRESH)
                && form(req, "client_id").as_deref() == Some(CLIENT_ID)
                && form(req, "client_secret").as_deref() == Some(CLIENT_SECRET);
            if !ok {
                return (400, json!({"error": "invalid_grant"}).to_string());
            }
            let scope = match st.widen_after {
                Some(n) if st.issued.len() >= n => "read admin".to_string(),
                _ => form(req, "scope").unwrap_or_default(),
            };
            let token = format!(
                "SECRET-ACCESS-{:04}-{}",
                st.issued.len(),
                hex::encode(rand::random::<[u8; 6]>())
            );
            let lifetime = st.lifetime_secs;
            st.issued.push(Issued {
                token: token.clone(),
                valid_until: Instant::now() + Duration::from_secs(lifetime),
                scope: scope.clone(),
            });
            (
                200,
                json!({"access_token": token, "token_type": "Bearer",
                       "expires_in": lifetime, "scope": scope})
                .to_string(),
            )
        }
        ("POST", "/revoke") => {
            st.revocations.push(req.clone());
            (200, "{}".to_string())
        }
        _ => (404, json!({"error": "not_found"}).to_string()),
    }
}

/// The bank-like API on `bank.test`: `/` is a page with helpers for the tests (`me()` asks the
/// API who it is; `ask(scope)` posts a refresh request to the token endpoint itself), `/api/me`
/// lets in only a bearer token `oauth` considers valid now and says which one it was (by
/// index, never the value).
pub fn api(oauth: &OAuthServer) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let state = oauth.state.clone();
    let token_url = oauth.token_endpoint();
    let page = format!(
        r#"<!doctype html><title>api</title><p id=msg>api</p><script>
window.me = async () => {{
  const r = await fetch('/api/me', {{cache: 'no-store'}});
  return r.status + ' ' + await r.text();
}};
window.ask = async scope => {{
  const body = new URLSearchParams({{grant_type: 'refresh_token', refresh_token: 'page-own-guess-0000', client_id: '{CLIENT_ID}', scope}});
  try {{ await fetch('{token_url}', {{method: 'POST', mode: 'no-cors', body}}); return 'sent'; }}
  catch (e) {{ return 'error ' + e; }}
}};
</script>"#
    );
    Server::serve(
        listener,
        Arc::new(move |r: &Request| match r.path() {
            "/" => Reply::html(page.clone()),
            "/api/me" => {
                let token = r
                    .header("authorization")
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                match state.lock().unwrap().valid(token) {
                    Some(i) => Reply::new(200, "application/json", json!({"token": i}).to_string()),
                    None => Reply::new(401, "application/json", json!({"token": null}).to_string()),
                }
            }
            _ => Reply::new(404, "text/plain", "not found"),
        }),
    )
}

/// A mandate for the API on `bank.test` (and `localhost` reachable, for the tests where the
/// page calls the token endpoint itself), with an `oauth` grant on `oauth`'s token endpoint.
pub fn oauth_mandate(oauth: &OAuthServer, max_token_age_secs: u64) -> serde_json::Value {
    json!({
        "agent": "test-agent",
        "ttl_secs": 300,
        "egress": {
            "allow": ["bank.test", "localhost"],
            "private_networks": ["127.0.0.0/8"],
            "ports": ["1024-65535"],
            "hosts": {"bank.test": "127.0.0.1", "localhost": "127.0.0.1"},
        },
        "on_leak": "block",
        "credentials": [{
            "id": "bank-api",
            "site": "bank.test",
            "oauth": {
                "token_endpoint": oauth.token_endpoint(),
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "scope": SCOPE,
                "refresh_token": REFRESH,
                "max_token_age_secs": max_token_age_secs,
            },
        }],
    })
}
