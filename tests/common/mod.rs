//! Shared harness of the integration tests: a real `chaperone serve`, real Chromium, local
//! test servers, and helpers to read the audit log.
#![allow(dead_code)]

pub mod bank;
pub mod oauth;
pub mod shop;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// Fake secrets that must never appear anywhere: the mandate's cookie and token, and the two
/// cookies the test bank's login sets (see `bank.rs`).
pub const FAKE_SECRETS: &[&str] = &[
    "SECRET-COOKIE-7d1f0c",
    "SECRET-TOKEN-93ab2e",
    "SECRET-SESSION-5e7a11",
    "SECRET-CSRF-2c9d44",
];

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chaperone"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running `chaperone serve` in its own temp directory.
pub struct Supervisor {
    pub child: Option<Child>,
    pub listen: SocketAddr,
    pub control: PathBuf,
    pub audit: PathBuf,
    pub dir: tempfile::TempDir,
    pub stderr: Arc<Mutex<String>>,
}

impl Supervisor {
    pub fn start() -> Supervisor {
        Self::start_with_config("")
    }

    pub fn start_with_config(extra_toml: &str) -> Supervisor {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("control.sock");
        let audit = dir.path().join("audit.jsonl");
        let cfg = dir.path().join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\n{}audit_log = \"{}\"\n{extra_toml}",
                if extra_toml.starts_with("control =") {
                    String::new()
                } else {
                    format!("control = \"unix:{}\"\n", control.display())
                },
                audit.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(bin())
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env("CHAPERONE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chaperone serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let stderr = stderr.clone();
            let mut err = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let s = String::from_utf8_lossy(&buf[..n]).to_string();
                    eprint!("[chaperone] {s}");
                    stderr.lock().unwrap().push_str(&s);
                }
            });
        }
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).expect("read ready line");
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("no ready line from chaperone ({e}): {line:?}"));
        let listen: SocketAddr = ready["listen"].as_str().unwrap().parse().unwrap();
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = out.read_to_string(&mut sink);
        });
        Supervisor {
            child: Some(child),
            listen,
            control,
            audit,
            dir,
            stderr,
        }
    }

    /// One control API request; returns (status, body).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let control = chaperone::config::ControlAddr::Unix(self.control.clone());
        control_api(&control, None, method, path, body)
    }

    /// Creates a session and asserts 201.
    pub fn session(&self, mandate: &Value) -> Value {
        let (status, body) = self.api("POST", "/v1/sessions", Some(&mandate.to_string()));
        assert_eq!(status, 201, "create session: {body}");
        body
    }

    pub fn audit_records(&self) -> Vec<Value> {
        read_audit(&self.audit)
    }

    /// The audit records of one event.
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.audit_records()
            .into_iter()
            .filter(|r| r["event"] == event)
            .collect()
    }

    /// Waits (bounded) until the audit log has a record matching `pred`.
    pub fn wait_audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..600 {
            if let Some(r) = self.audit_records().into_iter().find(|r| pred(r)) {
                return r;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "audit log never showed {what}; it has:\n{}",
            std::fs::read_to_string(&self.audit).unwrap_or_default()
        );
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        child.wait().unwrap()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

/// One request to a control API at `addr` (blocking); returns (status, body). It runs on its
/// own thread and runtime, so a test may call it from inside an async block too.
pub fn control_api(
    addr: &chaperone::config::ControlAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(chaperone::client::request(
                    addr,
                    token,
                    method,
                    path,
                    body.map(str::to_string),
                ))
                .expect("control API request")
            })
            .join()
            .expect("control API thread")
    })
}

/// The `caller` the supervisor records for a control request sent by this test process over
/// the Unix socket: the kernel's word for who we are.
pub fn this_process_as_caller() -> Value {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid).unwrap().map(|u| u.name);
    json!({"transport": "unix", "uid": uid.as_raw(), "user": user, "pid": std::process::id()})
}

/// The audit log's records. The supervisor may be writing a record while the test reads:
/// a last line without its newline is not a record yet and is left for the next read. Every
/// complete line must parse.
pub fn read_audit(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

/// The `egress.ports` of test mandates: the local test servers listen on ephemeral ports.
pub const TEST_PORTS: &str = "1024-65535";

/// A mandate for tests: the given names map to 127.0.0.1, loopback is opened, and so are the
/// ephemeral ports the test servers listen on.
pub fn mandate(ttl: u64, sites: &[&str]) -> Value {
    let hosts: serde_json::Map<String, Value> = sites
        .iter()
        .map(|s| (s.to_string(), json!("127.0.0.1")))
        .collect();
    json!({
        "agent": "test-agent",
        "ttl_secs": ttl,
        "egress": {
            "allow": sites,
            "private_networks": ["127.0.0.0/8"],
            "hosts": hosts,
            "ports": [TEST_PORTS],
        }
    })
}

/// A tiny HTTP/1.1 server on 127.0.0.1 that records every request it gets.
pub struct Site {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub requests: Arc<Mutex<Vec<String>>>,
}

pub const TEST_PAGE: &str = "<!doctype html><html><head><title>chaperone test</title></head>\
<body><p id=\"msg\">hello from site</p></body></html>";

impl Site {
    pub fn start(body: &'static str) -> Site {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (h, r) = (hits.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let (h, r) = (h.clone(), r.clone());
                std::thread::spawn(move || serve_one(stream, body, &h, &r));
            }
        });
        Site {
            addr,
            hits,
            requests,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn seen(&self) -> String {
        self.requests.lock().unwrap().join("\n---\n")
    }
}

fn serve_one(mut s: TcpStream, body: &str, hits: &AtomicUsize, reqs: &Mutex<Vec<String>>) {
    hits.fetch_add(1, Ordering::SeqCst);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = find(&buf, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    reqs.lock().unwrap().push(head);
                    buf.drain(..end + 4);
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Runs a Node client driver; returns its JSON verdict.
pub fn node_client(script: &str, env: &[(&str, String)]) -> Value {
    let mut cmd = Command::new("node");
    cmd.arg(repo().join("tests/clients").join(script))
        .current_dir(repo().join("tests/clients"))
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("[{script} stderr] {}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|_| json!({"ok": false, "raw": stdout}))
}

/// Pids of every process whose pid namespace differs from ours and whose ancestor is `root`.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut all = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        // Children hang off the thread that forked them, not only the main thread.
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                all.push(c);
                frontier.push(c);
            }
        }
    }
    all
}

/// Every process on the host that runs the given executable path.
pub fn processes_running(exe: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(format!("/proc/{pid}/exe")) {
            if target.to_string_lossy().starts_with(exe) {
                v.push(pid);
            }
        }
    }
    v
}

/// Asserts that no artifact contains a fake secret.
pub fn assert_no_secrets(what: &str, text: &str) {
    for s in FAKE_SECRETS {
        assert!(!text.contains(s), "{what} contains the secret {s}");
    }
}

/// A raw CDP client over a websocket, for tests that need to see every frame.
pub struct Cdp {
    pub ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
    /// Every frame received, in order.
    pub seen: Vec<String>,
}

/// How a CDP connection ended.
#[derive(Debug)]
pub enum Ended {
    Close(u16, String),
    Eof,
}

impl Cdp {
    pub async fn connect(url: &str) -> Cdp {
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(20),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .expect("ws connect hung")
        .expect("ws connect");
        Cdp {
            ws,
            next_id: 0,
            seen: Vec::new(),
        }
    }

    /// Connects with extra request headers; on refusal, the HTTP status and body.
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Cdp, (u16, String)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = url.into_client_request().expect("ws request");
        for (k, v) in headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            tokio_tungstenite::connect_async(req),
        )
        .await
        .expect("ws connect hung");
        match r {
            Ok((ws, _)) => Ok(Cdp {
                ws,
                next_id: 0,
                seen: Vec::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err((
                resp.status().as_u16(),
                resp.body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).to_string())
                    .unwrap_or_default(),
            )),
            Err(e) => panic!("ws connect to {url}: {e}"),
        }
    }

    /// Drops the connection without a close frame, as a network failure would.
    pub fn abort(self) {
        drop(self);
    }

    pub async fn send_raw(&mut self, text: String) {
        use futures_util::SinkExt;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .expect("send");
    }

    /// Next text frame (bounded wait); None when the connection ended.
    pub async fn recv(&mut self) -> Result<Value, Ended> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(60), self.ws.next())
                .await
                .expect("no CDP frame within 60 s");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    self.seen.push(t.to_string());
                    return Ok(serde_json::from_str(&t).expect("browser frame is JSON"));
                }
                Some(Ok(Message::Close(f))) => {
                    let (code, reason) = f
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Err(Ended::Close(code, reason));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(Ended::Eof),
            }
        }
    }

    /// Sends a command and waits for its answer, collecting events on the way.
    pub async fn call(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.send_raw(msg.to_string()).await;
        loop {
            match self.recv().await {
                Ok(v) if v["id"] == json!(id) => return v,
                Ok(_) => continue,
                Err(e) => panic!("connection ended waiting for {method}: {e:?}"),
            }
        }
    }

    /// Creates an `about:blank` page and attaches a flat session to it; returns the session id.
    pub async fn blank_page(&mut self) -> String {
        let t = self
            .call("Target.createTarget", json!({"url": "about:blank"}), None)
            .await;
        let target = t["result"]["targetId"]
            .as_str()
            .expect("targetId")
            .to_string();
        let a = self
            .call(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
                None,
            )
            .await;
        a["result"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("attach: {a}"))
            .to_string()
    }

    /// Opens a page on `url` and returns its flat session id.
    pub async fn open_page(&mut self, url: &str) -> String {
        let session = self.blank_page().await;
        self.call("Page.enable", json!({}), Some(&session)).await;
        self.navigate(&session, url).await;
        session
    }

    /// Navigates and waits for the load event (bounded).
    pub async fn navigate(&mut self, session: &str, url: &str) -> Value {
        let r = self
            .call("Page.navigate", json!({"url": url}), Some(session))
            .await;
        for _ in 0..1000 {
            match self.recv().await {
                Ok(v)
                    if v["method"] == "Page.loadEventFired" && v["sessionId"] == json!(session) =>
                {
                    break
                }
                Ok(_) => continue,
                Err(e) => panic!("connection ended while loading {url}: {e:?}"),
            }
        }
        r
    }

    pub async fn eval(&mut self, session: &str, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
                Some(session),
            )
            .await;
        r["result"]["result"]["value"].clone()
    }

    /// Waits until the connection ends; returns how.
    pub async fn wait_end(&mut self) -> Ended {
        loop {
            match self.recv().await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    }
}

/// Chromium processes under `root` (pid of a supervisor).
pub fn chromium_under(root: i32) -> Vec<i32> {
    descendants(root)
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .map(|e| e.to_string_lossy().contains("chromium"))
                .unwrap_or(false)
        })
        .collect()
}

/// Whether `pid` is a live process. A zombie is not: it has released its memory, files and
/// namespaces, and only waits for a parent (on hosts whose pid 1 does not reap, forever).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Waits (bounded) until none of `pids` is alive; returns those still alive.
pub fn wait_gone(pids: &[i32]) -> Vec<i32> {
    for _ in 0..400 {
        if pids.iter().all(|p| !alive(*p)) {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    pids.iter().copied().filter(|p| alive(*p)).collect()
}

/// A self-signed client certificate with common name `cn`: (certificate PEM, key PEM,
/// lowercase hex SHA-256 of the certificate's DER, the form in which mandates pin it).
pub fn make_client_cert(cn: &str) -> (String, String, String) {
    use sha2::Digest;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(&key).unwrap();
    let fingerprint = hex::encode(sha2::Sha256::digest(cert.der()));
    (cert.pem(), key.serialize_pem(), fingerprint)
}

/// A rustls client that trusts `ca_pem` and, when the server asks, presents `client`
/// (certificate PEM, key PEM).
pub fn tls_client_config(
    ca_pem: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &*ca_pem) {
        roots
            .add(cert.map_err(|e| format!("CA PEM: {e}"))?)
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let Some((cert_pem, key_pem)) = client else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = rustls_pemfile::certs(&mut &*cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("client certificate PEM: {e}"))?;
    let key = rustls_pemfile::private_key(&mut &*key_pem)
        .map_err(|e| format!("client key PEM: {e}"))?
        .ok_or("client key PEM holds no key")?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("client certificate: {e}"))
}

/// A TLS connection to the host and port of `url` (`https://…` or `wss://…`).
pub async fn connect_tls(
    url: &str,
    ca_pem: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let config = tls_client_config(ca_pem, client)?;
    let u = url::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    let host = u.host_str().ok_or("URL without host")?.to_string();
    let port = u.port_or_known_default().ok_or("URL without port")?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake hung".to_string())?
    .map_err(|e| format!("TLS handshake: {e}"))
}

/// Why the server at `url` refuses a TLS client that presents no certificate: the client
/// finishes its side of the handshake, sends nothing, and reads. Under TLS 1.3 the server judges
/// the (empty) certificate only after the client's side is done, so the refusal arrives as an
/// alert on that read. Sending nothing first keeps it deterministic: a request already in
/// flight can meet a reset, or an HTTP client that reads while idle can swallow the alert.
/// `Ok` holds what was read instead, when the server did not refuse.
pub async fn tls_refusal_without_certificate(url: &str, ca_pem: &[u8]) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let mut tls = connect_tls(url, ca_pem, None).await?;
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_secs(20), tls.read(&mut buf)).await {
        Err(_) => Ok("nothing within 20 s: the connection stayed open".into()),
        Ok(Ok(n)) => Ok(format!(
            "{n} bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        )),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// A CDP websocket to `url` (`wss://…`) over TLS trusting `ca_pem`, presenting `client`
/// (certificate PEM, key PEM) when asked. `Err` says why, TLS alerts included.
///
/// `Cdp` holds a `MaybeTlsStream<TcpStream>` and tokio-tungstenite is built without its rustls
/// feature, so the TLS session runs in a task that relays it to a loopback socket; the
/// websocket (with the URL's own `Host`) runs over that socket.
pub async fn connect_tls_ws(
    url: &str,
    ca_pem: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<Cdp, String> {
    let mut tls = connect_tls(url, ca_pem, client).await?;
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let near = tokio::net::TcpStream::connect(relay.local_addr().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let (mut far, _) = relay.accept().await.map_err(|e| e.to_string())?;
    let pump = tokio::spawn(async move {
        tokio::io::copy_bidirectional(&mut far, &mut tls)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    });
    let handshake = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(near)),
    )
    .await
    .map_err(|_| "websocket handshake hung".to_string())?;
    match handshake {
        Ok((ws, _)) => Ok(Cdp {
            ws,
            next_id: 0,
            seen: Vec::new(),
        }),
        Err(e) => {
            let tls = match tokio::time::timeout(Duration::from_secs(5), pump).await {
                Ok(Ok(Err(e))) => e,
                Ok(Ok(Ok(()))) => "closed".into(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "still open".into(),
            };
            Err(format!("websocket handshake: {e}; TLS: {tls}"))
        }
    }
}

/// GET `url` (`https://…`) over TLS as `connect_tls` does: (status, body as JSON, or as a
/// string when it is not JSON). `Err` says why, TLS alerts included.
pub async fn https_get(
    url: &str,
    ca_pem: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<(u16, Value), String> {
    use http_body_util::BodyExt;
    let tls = connect_tls(url, ca_pem, client).await?;
    let u = url::Url::parse(url).map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| format!("{e:?}"))?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(u.path())
        .header("host", u.authority())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let exchange = async {
        match send.send_request(req).await {
            Ok(res) => {
                let status = res.status().as_u16();
                let body = res.into_body().collect().await.map_err(|e| e.to_string())?;
                let body = body.to_bytes();
                let v = serde_json::from_slice(&body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
                Ok((status, v))
            }
            // A TLS 1.3 client finishes its side of the handshake before the server has seen
            // its certificate, so a refusal arrives on the first read: as an alert, or, when
            // the connection read it while idle, as a connection closed before the request.
            Err(e) => Err(format!("{e}; connection: {:?}", conn.await)),
        }
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| "HTTPS request hung".to_string())?
}
