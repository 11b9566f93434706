//! The proxy over real sockets on 127.0.0.1: a raw HTTP proxy client, a hyper upstream that
//! counts every connection it accepts, and an echo server standing in for a CONNECT target.
//!
//! "Upstream got nothing" is checked after [`Upstream::settle`]: the listen queue is FIFO, so
//! once a direct connection made after the refusal has been accepted, any connection the proxy
//! had made before it has been counted too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::egress::{
    serve, Denied, DenyReason, EgressObserver, EgressPolicy, HostPattern, HostTraffic, Kind,
    PortRange, RequestInfo, Traffic,
};

/// Hang guard only: every step that waits on the network is bounded by it.
const GUARD: Duration = Duration::from_secs(20);
const SETTLE_PATH: &str = "/__settle";
const BIG_LEN: usize = 1 << 20;

async fn guard<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("hang guard: {what} did not finish"),
    }
}

#[derive(Default)]
struct Recorder {
    requests: Mutex<Vec<RequestInfo>>,
    denied: Mutex<Vec<Denied>>,
    traffic: Traffic,
}

/// What the recorder treats as a held value (the broker's detector in production).
const HELD: &[u8] = b"HELD-VALUE-4b1d";

impl EgressObserver for Recorder {
    fn holds_value_in(&self, _host: &str, material: &[u8]) -> bool {
        material
            .windows(HELD.len())
            .any(|w| w.eq_ignore_ascii_case(HELD))
    }
    fn request(&self, r: &RequestInfo) {
        self.requests.lock().unwrap().push(r.clone());
    }
    fn denied(&self, d: &Denied) {
        self.denied.lock().unwrap().push(d.clone());
    }
    fn shown_host(&self, host: &str) -> String {
        if self.holds_value_in(host, host.as_bytes()) {
            "[held value].site.test".to_owned()
        } else {
            host.to_owned()
        }
    }
    fn traffic(&self) -> Option<&Traffic> {
        Some(&self.traffic)
    }
}

impl Recorder {
    fn traffic_of(&self, host: &str) -> HostTraffic {
        self.traffic
            .snapshot()
            .get(host)
            .copied()
            .unwrap_or_default()
    }
    fn requests(&self) -> Vec<RequestInfo> {
        self.requests.lock().unwrap().clone()
    }
    fn denied(&self) -> Vec<Denied> {
        self.denied.lock().unwrap().clone()
    }
}

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A hyper HTTP/1.1 server on 127.0.0.1 that records requests and counts accepted connections.
struct Upstream {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (a, s) = (Arc::clone(&accepts), Arc::clone(&seen));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let s = Arc::clone(&s);
                        async move { Ok::<_, Infallible>(upstream_reply(req, &s).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            accepts,
            seen,
            task,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted before this call, not counting its own.
    async fn settle(&self) -> usize {
        let mut c = Client::direct(self.addr).await;
        c.send(&format!(
            "GET {SETTLE_PATH} HTTP/1.1\r\nHost: settle\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert_eq!(c.response().await.status, 200);
        self.accepts.load(Ordering::SeqCst) - 1
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upstream_reply(req: Request<Incoming>, seen: &Mutex<Vec<Seen>>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let target = req.uri().to_string();
    let headers = req.headers().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if target != SETTLE_PATH {
        seen.lock().unwrap().push(Seen {
            method: method.clone(),
            target: target.clone(),
            headers,
            body: body.clone(),
        });
    }
    let payload = if target == "/big" {
        Bytes::from((0..BIG_LEN).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
    } else {
        Bytes::from(format!(
            "upstream saw {method} {target} with {} body bytes",
            body.len()
        ))
    };
    Response::builder()
        .header("x-upstream", "yes")
        .header("connection", "x-hop")
        .header("x-hop", "must not reach the client")
        .header("proxy-authenticate", "Basic realm=upstream")
        .body(Full::new(payload))
        .unwrap()
}

/// An echo server standing in for a CONNECT target; counts accepts and closed connections.
struct Echo {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    closed_notify: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Echo {
    async fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let closed_notify = Arc::new(Notify::new());
        let (a, c, n) = (
            Arc::clone(&accepts),
            Arc::clone(&closed),
            Arc::clone(&closed_notify),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (c, n) = (Arc::clone(&c), Arc::clone(&n));
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                    n.notify_waiters();
                });
            }
        });
        Echo {
            addr,
            accepts,
            closed,
            closed_notify,
            task,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted before this call, not counting its own.
    async fn settle(&self) -> usize {
        let mut c = Client::direct(self.addr).await;
        c.send("ping").await;
        assert_eq!(c.read_exactly(4).await, b"ping");
        self.accepts.load(Ordering::SeqCst) - 1
    }

    async fn wait_closed(&self, n: usize) {
        guard("echo connections closing", async {
            loop {
                let notified = self.closed_notify.notified();
                if self.closed.load(Ordering::SeqCst) >= n {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running proxy under test.
struct Proxy {
    addr: SocketAddr,
    /// The policy in force; replacing it is what a mandate change does.
    policy: tokio::sync::watch::Sender<Arc<EgressPolicy>>,
    recorder: Arc<Recorder>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    async fn start(policy: EgressPolicy) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorder = Arc::new(Recorder::default());
        let shutdown = CancellationToken::new();
        let (policy, rx) = tokio::sync::watch::channel(Arc::new(policy));
        let task = tokio::spawn(serve(
            listener,
            rx,
            Arc::clone(&recorder) as Arc<dyn EgressObserver>,
            shutdown.clone(),
        ));
        Proxy {
            addr,
            policy,
            recorder,
            shutdown,
            task: Some(task),
        }
    }

    async fn client(&self) -> Client {
        Client::direct(self.addr).await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `site.test` (allowed) and `evil.test` (not allowed) both map to 127.0.0.1.
fn policy(allow: &[&str], private: &[&str]) -> EgressPolicy {
    EgressPolicy {
        allow: allow
            .iter()
            .map(|p| HostPattern::parse(p).unwrap())
            .collect(),
        private_networks: private.iter().map(|n| n.parse().unwrap()).collect(),
        hosts: [("site.test", "127.0.0.1"), ("evil.test", "127.0.0.1")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
            .collect(),
        // The test servers listen on ephemeral ports.
        ports: vec![PortRange::parse("1024-65535").unwrap()],
        ..EgressPolicy::default()
    }
}

fn open_policy() -> EgressPolicy {
    policy(&["site.test"], &["127.0.0.0/8"])
}

struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Speaks raw HTTP/1.1 over one TCP connection, keeping bytes read past a response.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn direct(addr: SocketAddr) -> Client {
        let stream = guard("connect", TcpStream::connect(addr)).await.unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, raw: &str) {
        self.send_bytes(raw.as_bytes()).await;
    }

    async fn send_bytes(&mut self, raw: &[u8]) {
        guard("write", self.stream.write_all(raw)).await.unwrap();
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        let n = guard("read", self.stream.read(&mut chunk)).await.unwrap();
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one response head and its Content-Length body (none if absent).
    async fn response(&mut self) -> RawResponse {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head_len) = parsed.parse(&self.buf).unwrap() {
                let status = parsed.code.unwrap();
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                self.buf.drain(..head_len);
                let mut response = RawResponse {
                    status,
                    headers,
                    body: Vec::new(),
                };
                assert!(
                    response.header("transfer-encoding").is_none(),
                    "test client reads Content-Length bodies only"
                );
                let len: usize = response
                    .header("content-length")
                    .map_or(0, |v| v.parse().unwrap());
                response.body = self.read_exactly(len).await;
                return response;
            }
            assert!(self.buf.len() < 64 * 1024, "response head too long");
            assert_ne!(
                self.fill().await,
                0,
                "connection closed before a full response head"
            );
        }
    }

    async fn read_exactly(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert_ne!(
                self.fill().await,
                0,
                "connection closed after {} of {n} bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// True once the peer has closed (EOF or reset) with nothing more to read.
    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        match guard("read until close", self.stream.read(&mut chunk)).await {
            Ok(0) | Err(_) => true,
            Ok(_) => false,
        }
    }
}

fn get(host_port: &str, path: &str) -> String {
    format!("GET http://{host_port}{path} HTTP/1.1\r\nHost: {host_port}\r\n\r\n")
}

fn connect_req(host_port: &str) -> String {
    format!("CONNECT {host_port} HTTP/1.1\r\nHost: {host_port}\r\n\r\n")
}

fn denied(kind: Kind, host: &str, port: u16, reason: DenyReason) -> Denied {
    Denied {
        kind,
        host: host.to_owned(),
        port,
        reason,
    }
}

#[tokio::test]
async fn allowed_name_mapped_by_hosts_reaches_upstream_and_tunnels_both_ways() {
    let upstream = Upstream::start().await;
    let echo = Echo::start().await;
    let proxy = Proxy::start(open_policy()).await;

    let mut c = proxy.client().await;
    c.send(&format!(
        "GET http://SITE.test:{}/hello?x=1 HTTP/1.1\r\n\
         Host: attacker.invalid\r\n\
         Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==\r\n\
         Proxy-Connection: keep-alive\r\n\
         Connection: keep-alive, X-Drop-Me\r\n\
         X-Drop-Me: 1\r\n\
         X-Keep: 1\r\n\r\n",
        upstream.port()
    ))
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "upstream saw GET /hello?x=1 with 0 body bytes");
    assert_eq!(r.header("x-upstream"), Some("yes"));
    assert_eq!(
        r.header("x-hop"),
        None,
        "a header the upstream named in Connection came back"
    );
    assert_eq!(r.header("proxy-authenticate"), None);

    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(seen[0].target, "/hello?x=1", "forwarded in origin-form");
    assert_eq!(
        h.get("host").unwrap(),
        format!("SITE.test:{}", upstream.port()).as_str()
    );
    assert!(
        h.get("proxy-authorization").is_none(),
        "Proxy-Authorization was forwarded"
    );
    assert!(h.get("proxy-connection").is_none());
    assert!(h.get("x-drop-me").is_none());
    assert_eq!(h.get("x-keep").unwrap(), "1");
    assert_eq!(upstream.settle().await, 1);

    let mut t = proxy.client().await;
    t.send(&connect_req(&format!("site.test:{}", echo.port())))
        .await;
    let r = t.response().await;
    assert_eq!(r.status, 200, "{}", r.text());
    t.send("hello through the tunnel").await;
    assert_eq!(t.read_exactly(24).await, b"hello through the tunnel");
    t.send_bytes(&[0u8, 1, 2, 255]).await;
    assert_eq!(t.read_exactly(4).await, [0u8, 1, 2, 255]);
    assert_eq!(echo.settle().await, 1);

    assert_eq!(
        proxy.recorder.requests(),
        vec![
            RequestInfo {
                kind: Kind::Http,
                host: "site.test".into(),
                port: upstream.port()
            },
            RequestInfo {
                kind: Kind::Connect,
                host: "site.test".into(),
                port: echo.port()
            },
        ]
    );
    assert_eq!(proxy.recorder.denied(), vec![]);
}

#[tokio::test]
async fn bodies_stream_both_ways() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(open_policy()).await;
    let up = format!("site.test:{}", upstream.port());
    let mut c = proxy.client().await;

    let body = "x".repeat(100_000);
    c.send(&format!(
        "POST http://{up}/upload HTTP/1.1\r\nHost: {up}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
    .await;
    let r = c.response().await;
    assert_eq!(r.text(), "upstream saw POST /upload with 100000 body bytes");

    c.send(&format!(
        "POST http://{up}/chunked HTTP/1.1\r\nHost: {up}\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    ))
    .await;
    let r = c.response().await;
    assert_eq!(r.text(), "upstream saw POST /chunked with 11 body bytes");

    c.send(&get(&up, "/big")).await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), BIG_LEN);
    assert!(r
        .body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 251) as u8));

    let seen = upstream.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].body.len(), 100_000);
    assert_eq!(&seen[1].body[..], b"hello world");
    assert!(
        seen[1].headers.get("transfer-encoding").is_some(),
        "re-framed as chunked"
    );
    assert_eq!(seen[2].method, "GET");
    assert_eq!(
        upstream.settle().await,
        3,
        "one upstream connection per request"
    );
}

#[tokio::test]
async fn host_not_in_allow_is_refused_and_upstream_gets_nothing() {
    let upstream = Upstream::start().await;
    let echo = Echo::start().await;
    // evil.test maps to the upstream and 127/8 is open: only the allow list stands in the way.
    let proxy = Proxy::start(open_policy()).await;
    let evil = format!("evil.test:{}", upstream.port());

    let mut c = proxy.client().await;
    c.send(&get(&evil, "/steal")).await;
    let r = c.response().await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.text(),
        format!(
            "chaperone: egress to {evil} refused: the host is not in the mandate's egress.allow list"
        )
    );

    // The Host header is not what is checked.
    let mut c = proxy.client().await;
    c.send(&format!(
        "GET http://{evil}/steal HTTP/1.1\r\nHost: site.test:{}\r\n\r\n",
        upstream.port()
    ))
    .await;
    assert_eq!(c.response().await.status, 403);

    let mut t = proxy.client().await;
    t.send(&connect_req(&format!("evil.test:{}", echo.port())))
        .await;
    let r = t.response().await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        t.closed().await,
        "a refused CONNECT must not leave the connection open"
    );

    assert_eq!(upstream.settle().await, 0, "upstream was contacted");
    assert_eq!(echo.settle().await, 0, "CONNECT target was contacted");
    assert!(upstream.seen().is_empty());
    let p = upstream.port();
    assert_eq!(
        proxy.recorder.denied(),
        vec![
            denied(Kind::Http, "evil.test", p, DenyReason::NotAllowed),
            denied(Kind::Http, "evil.test", p, DenyReason::NotAllowed),
            denied(
                Kind::Connect,
                "evil.test",
                echo.port(),
                DenyReason::NotAllowed
            ),
        ]
    );
    assert_eq!(
        proxy.recorder.requests().len(),
        3,
        "every request is reported first"
    );
}

#[tokio::test]
async fn allowed_host_on_a_private_address_needs_private_networks() {
    let upstream = Upstream::start().await;
    let echo = Echo::start().await;
    let proxy = Proxy::start(policy(&["site.test"], &[])).await;

    let mut c = proxy.client().await;
    c.send(&get(&format!("site.test:{}", upstream.port()), "/"))
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 403);
    assert!(
        r.text().contains("non-public address 127.0.0.1"),
        "{}",
        r.text()
    );

    let mut t = proxy.client().await;
    t.send(&connect_req(&format!("site.test:{}", echo.port())))
        .await;
    assert_eq!(t.response().await.status, 403);

    assert_eq!(upstream.settle().await, 0, "upstream was contacted");
    assert_eq!(echo.settle().await, 0, "CONNECT target was contacted");
    let private = DenyReason::PrivateAddress("127.0.0.1".parse().unwrap());
    assert_eq!(
        proxy.recorder.denied(),
        vec![
            denied(Kind::Http, "site.test", upstream.port(), private.clone()),
            denied(Kind::Connect, "site.test", echo.port(), private),
        ]
    );
}

#[tokio::test]
async fn ip_literals_are_checked_as_written_not_as_the_name_they_equal() {
    let upstream = Upstream::start().await;
    let echo = Echo::start().await;
    // site.test is allowed and 127/8 is open, so 127.0.0.1 would be reachable under its name.
    let proxy = Proxy::start(open_policy()).await;
    let p = upstream.port();

    for (target, status, reason) in [
        (format!("127.0.0.1:{p}"), 403, DenyReason::NotAllowed),
        (
            format!("[::ffff:127.0.0.1]:{p}"),
            403,
            DenyReason::NotAllowed,
        ),
        (format!("[::1]:{p}"), 403, DenyReason::NotAllowed),
    ] {
        let mut c = proxy.client().await;
        c.send(&get(&target, "/")).await;
        let r = c.response().await;
        assert_eq!(r.status, status, "{target}: {}", r.text());
        assert_eq!(
            proxy.recorder.denied().last().unwrap().reason,
            reason,
            "{target}"
        );
    }
    // A numeric host a resolver would read as 127.0.0.1 is judged as 127.0.0.1.
    let mut c = proxy.client().await;
    c.send(&get(&format!("2130706433:{p}"), "/")).await;
    let r = c.response().await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        proxy.recorder.denied().last().unwrap().reason,
        DenyReason::NotAllowed
    );

    let mut t = proxy.client().await;
    t.send(&connect_req(&format!("127.0.0.1:{}", echo.port())))
        .await;
    assert_eq!(t.response().await.status, 403);

    assert_eq!(upstream.settle().await, 0, "upstream was contacted");
    assert_eq!(echo.settle().await, 0, "CONNECT target was contacted");
    let shown: Vec<String> = proxy
        .recorder
        .denied()
        .into_iter()
        .map(|d| d.host)
        .collect();
    assert_eq!(
        shown,
        ["127.0.0.1", "127.0.0.1", "[::1]", "127.0.0.1", "127.0.0.1"]
    );
}

#[tokio::test]
async fn every_request_on_a_kept_alive_connection_is_checked() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(open_policy()).await;
    let p = upstream.port();

    let mut c = proxy.client().await;
    c.send(&get(&format!("site.test:{p}"), "/first")).await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("connection"),
        None,
        "the connection should stay open"
    );
    c.send(&get(&format!("evil.test:{p}"), "/second")).await;
    let r = c.response().await;
    assert_eq!(r.status, 403, "{}", r.text());
    // The refusal does not end the connection either: the next allowed request still works.
    c.send(&get(&format!("site.test:{p}"), "/third")).await;
    assert_eq!(c.response().await.status, 200);

    let targets: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/first", "/third"]);
    assert_eq!(
        upstream.settle().await,
        2,
        "one upstream connection per allowed request"
    );
    assert_eq!(proxy.recorder.requests().len(), 3);
    assert_eq!(
        proxy.recorder.denied(),
        vec![denied(Kind::Http, "evil.test", p, DenyReason::NotAllowed)]
    );
}

#[tokio::test]
async fn a_narrowed_policy_holds_from_the_next_request_and_closes_open_tunnels() {
    let upstream = Upstream::start().await;
    let echo = Echo::start().await;
    let proxy = Proxy::start(open_policy()).await;

    let mut t = proxy.client().await;
    t.send(&connect_req(&format!("site.test:{}", echo.port())))
        .await;
    assert_eq!(t.response().await.status, 200);
    t.send("before").await;
    assert_eq!(t.read_exactly(6).await, b"before");
    let mut c = proxy.client().await;
    c.send(&get(&format!("site.test:{}", upstream.port()), "/one"))
        .await;
    assert_eq!(c.response().await.status, 200);

    // Another destination stays allowed; site.test goes.
    proxy
        .policy
        .send_replace(Arc::new(policy(&["other.test"], &["127.0.0.0/8"])));
    assert!(
        t.closed().await,
        "a tunnel to a host the changed policy refuses stayed open"
    );
    echo.wait_closed(1).await;
    // The kept-alive connection's next request is judged by the changed policy.
    c.send(&get(&format!("site.test:{}", upstream.port()), "/two"))
        .await;
    assert_eq!(c.response().await.status, 403);
    assert_eq!(
        upstream.settle().await,
        1,
        "the refused request reached upstream"
    );
    assert_eq!(
        proxy.recorder.denied(),
        vec![
            denied(
                Kind::Connect,
                "site.test",
                echo.port(),
                DenyReason::NotAllowed
            ),
            denied(
                Kind::Http,
                "site.test",
                upstream.port(),
                DenyReason::NotAllowed
            ),
        ]
    );
}

#[tokio::test]
async fn a_widened_policy_leaves_open_tunnels_alone() {
    let echo = Echo::start().await;
    let proxy = Proxy::start(open_policy()).await;
    let mut t = proxy.client().await;
    t.send(&connect_req(&format!("site.test:{}", echo.port())))
        .await;
    assert_eq!(t.response().await.status, 200);
    proxy.policy.send_replace(Arc::new(policy(
        &["site.test", "other.test"],
        &["127.0.0.0/8"],
    )));
    t.send("still here").await;
    assert_eq!(t.read_exactly(10).await, b"still here");
    assert_eq!(proxy.recorder.denied(), vec![]);
}

#[tokio::test]
async fn shutdown_closes_open_tunnels_and_serve_returns() {
    let echo = Echo::start().await;
    let mut proxy = Proxy::start(open_policy()).await;

    let mut t = proxy.client().await;
    t.send(&connect_req(&format!("site.test:{}", echo.port())))
        .await;
    assert_eq!(t.response().await.status, 200);
    t.send("alive").await;
    assert_eq!(t.read_exactly(5).await, b"alive");
    assert_eq!(
        echo.closed.load(Ordering::SeqCst),
        0,
        "tunnel closed before shutdown"
    );

    proxy.shutdown.cancel();
    let task = proxy.task.take().unwrap();
    guard("serve returning after shutdown", task).await.unwrap();
    assert!(
        t.closed().await,
        "the client side of the tunnel stayed open"
    );
    echo.wait_closed(1).await;
}

#[tokio::test]
async fn shutdown_drops_idle_kept_alive_connections() {
    let upstream = Upstream::start().await;
    let mut proxy = Proxy::start(open_policy()).await;
    let mut c = proxy.client().await;
    c.send(&get(&format!("site.test:{}", upstream.port()), "/"))
        .await;
    assert_eq!(c.response().await.status, 200);

    proxy.shutdown.cancel();
    guard("serve returning", proxy.task.take().unwrap())
        .await
        .unwrap();
    assert!(
        c.closed().await,
        "a kept-alive proxy connection outlived shutdown"
    );
}

#[tokio::test]
async fn requests_that_are_not_proxy_requests_get_400() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(open_policy()).await;
    let p = upstream.port();

    for (raw, expect_host) in [
        // Origin-form, with a Host header pointing at a reachable server.
        (format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n"), ""),
        (format!("GET / HTTP/1.1\r\nHost: site.test:{p}\r\n\r\n"), ""),
        ("OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), ""),
        (
            format!("GET https://site.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            "site.test",
        ),
        (
            format!("GET ftp://site.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            "site.test",
        ),
        (
            format!("GET http://user:pw@site.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            "site.test",
        ),
        (
            "CONNECT site.test HTTP/1.1\r\nHost: site.test\r\n\r\n".to_owned(),
            "site.test",
        ),
        (
            "GET http://site.test:99999/ HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
            "site.test",
        ),
    ] {
        let before = proxy.recorder.denied().len();
        let mut c = proxy.client().await;
        c.send(&raw).await;
        let r = c.response().await;
        assert_eq!(r.status, 400, "{raw:?}: {}", r.text());
        assert!(
            r.text().starts_with("chaperone: egress"),
            "{raw:?}: {}",
            r.text()
        );
        let d = proxy.recorder.denied();
        assert_eq!(d.len(), before + 1, "{raw:?}");
        assert!(
            matches!(d[before].reason, DenyReason::BadRequest(_)),
            "{raw:?}: {:?}",
            d[before]
        );
        assert_eq!(d[before].host, expect_host, "{raw:?}");
    }
    assert_eq!(upstream.settle().await, 0, "upstream was contacted");
    assert_eq!(
        proxy.recorder.requests().len(),
        proxy.recorder.denied().len(),
        "every refused request was reported as a request first"
    );
}

#[tokio::test]
async fn malformed_http_gets_400_and_is_reported() {
    let proxy = Proxy::start(open_policy()).await;
    let mut c = proxy.client().await;
    c.send("this is not http\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.status, 400);
    assert!(c.closed().await);
    // hyper answers before the connection task reports; wait for the report.
    guard("denied report", async {
        while proxy.recorder.denied().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let d = proxy.recorder.denied();
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0].kind, d[0].host.as_str(), d[0].port),
        (Kind::Http, "", 0)
    );
    assert!(
        matches!(&d[0].reason, DenyReason::BadRequest(m) if m.contains("not a valid HTTP/1.1 request"))
    );
    assert_eq!(proxy.recorder.requests().len(), 1);
}

#[tokio::test]
async fn connect_failure_is_reported_as_502() {
    // A port that was just free: nothing listens there.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = Proxy::start(open_policy()).await;
    let mut c = proxy.client().await;
    c.send(&connect_req(&format!("site.test:{port}"))).await;
    let r = c.response().await;
    assert_eq!(r.status, 502, "{}", r.text());
    let d = proxy.recorder.denied();
    assert_eq!(d.len(), 1);
    assert!(
        matches!(&d[0].reason, DenyReason::ConnectFailed(_)),
        "{:?}",
        d[0]
    );
}

#[tokio::test]
async fn held_values_never_leave_through_host_names_urls_or_tunnelled_handshakes() {
    let upstream = Upstream::start().await;
    let echo = Echo::start().await;
    let proxy = Proxy::start(open_policy()).await;
    let before = echo.settle().await;

    // A DNS label: refused before any lookup.
    let mut c = proxy.client().await;
    c.send(&format!(
        "CONNECT held-value-4b1d.site.test:{0} HTTP/1.1\r\nHost: held-value-4b1d.site.test:{0}\r\n\r\n",
        echo.port()
    ))
    .await;
    assert_eq!(c.response().await.status, 403);

    // A plain-http URL.
    let up = format!("site.test:{}", upstream.port());
    let mut c = proxy.client().await;
    c.send(&get(&up, "/?q=HELD-VALUE-4b1d")).await;
    assert_eq!(c.response().await.status, 403);
    assert!(upstream.seen().is_empty());

    // A ws:// handshake inside a tunnel: the tunnel opens, the head never reaches upstream.
    let mut c = proxy.client().await;
    let target = format!("site.test:{}", echo.port());
    c.send(&format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
    ))
    .await;
    assert_eq!(c.response().await.status, 200);
    c.send("GET /socket?HELD-VALUE-4b1d HTTP/1.1\r\nHost: site.test\r\nUpgrade: websocket\r\n\r\n")
        .await;
    // The proxy closes the tunnel; the echo server never had anything to send back.
    let after_response = c.buf.len();
    while c.fill().await > 0 {}
    assert_eq!(
        c.buf.len(),
        after_response,
        "nothing came back through the tunnel"
    );
    echo.wait_closed(2).await;
    // Accepted since `before`: the first settle's own connection and the tunnel's.
    assert_eq!(
        echo.settle().await,
        before + 2,
        "the tunnel reached the echo server"
    );

    // A harmless handshake and a TLS-looking tunnel pass untouched.
    let mut c = proxy.client().await;
    c.send(&format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
    ))
    .await;
    assert_eq!(c.response().await.status, 200);
    let hello = "GET /socket HTTP/1.1\r\nHost: site.test\r\n\r\n";
    c.send(hello).await;
    assert_eq!(c.read_exactly(hello.len()).await, hello.as_bytes());
    let mut c = proxy.client().await;
    c.send(&format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
    ))
    .await;
    assert_eq!(c.response().await.status, 200);
    c.send("\u{16}\u{3}\u{1}hello").await;
    assert_eq!(c.read_exactly(8).await, b"\x16\x03\x01hello");

    let denied: Vec<_> = proxy
        .recorder
        .denied()
        .into_iter()
        .filter(|d| d.reason == DenyReason::HeldValue)
        .collect();
    assert_eq!(denied.len(), 3, "{denied:?}");
}

/// A masked client frame (RFC 6455) carrying `payload`.
fn masked_frame(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0x81];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[tokio::test]
async fn plaintext_websocket_frames_are_unmasked_and_held_values_stopped() {
    let echo = Echo::start().await;
    let proxy = Proxy::start(open_policy()).await;
    let target = format!("site.test:{}", echo.port());
    let open = || {
        let head = "GET /ws HTTP/1.1\r\nHost: site.test\r\nUpgrade: websocket\r\n\
                    Connection: Upgrade\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
            .to_string();
        (
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
            head,
        )
    };

    // A clean frame passes, and the handshake lost its compression offer on the way.
    let mut c = proxy.client().await;
    let (connect, head) = open();
    c.send(&connect).await;
    assert_eq!(c.response().await.status, 200);
    c.send(&head).await;
    let forwarded = head.replace("Sec-WebSocket-Extensions: permessage-deflate\r\n", "");
    assert_eq!(c.read_exactly(forwarded.len()).await, forwarded.as_bytes());
    let clean = masked_frame(&[b'x'; 300], [1, 2, 3, 4]);
    c.send_bytes(&clean).await;
    assert_eq!(c.read_exactly(clean.len()).await, clean);

    // A held value split across two frames and two writes never gets through.
    let mut c = proxy.client().await;
    let (connect, head) = open();
    c.send(&connect).await;
    assert_eq!(c.response().await.status, 200);
    c.send(&head).await;
    c.read_exactly(forwarded.len()).await;
    let first = masked_frame(b"data=HELD-VAL", [9, 8, 7, 6]);
    let second = masked_frame(b"UE-4b1d&more", [5, 4, 3, 2]);
    c.send_bytes(&first).await;
    assert_eq!(
        c.read_exactly(first.len()).await,
        first,
        "the first half alone is harmless"
    );
    // Header (6 bytes) and "UE-": still no whole value, passed on.
    c.send_bytes(&second[..9]).await;
    assert_eq!(c.read_exactly(9).await, &second[..9]);
    c.send_bytes(&second[9..]).await;
    let before = c.buf.len();
    while c.fill().await > 0 {}
    assert_eq!(
        c.buf.len(),
        before,
        "the bytes completing the value were not passed on"
    );
    let denied: Vec<_> = proxy
        .recorder
        .denied()
        .into_iter()
        .filter(|d| d.reason == DenyReason::HeldValue)
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
}

fn reasons(recorder: &Recorder) -> Vec<(String, &'static str)> {
    recorder
        .denied()
        .into_iter()
        .map(|d| (d.host, d.reason.code()))
        .collect()
}

#[tokio::test]
async fn deny_wins_over_allow_and_is_decided_before_any_lookup() {
    let upstream = Upstream::start().await;
    let echo = Echo::start().await;
    let mut p = policy(&["*.test", "*.invalid"], &["127.0.0.0/8"]);
    // The deny entry is written in Unicode; the request arrives in punycode.
    p.deny = ["evil.test", "bücher.test", "nowhere.invalid"]
        .iter()
        .map(|d| HostPattern::parse(d).unwrap())
        .collect();
    p.hosts
        .insert("xn--bcher-kva.test".into(), "127.0.0.1".parse().unwrap());
    let proxy = Proxy::start(p).await;
    let (up, ec) = (upstream.port(), echo.port());

    for raw in [
        get(&format!("evil.test:{up}"), "/"),
        get(&format!("EVIL.Test.:{up}"), "/"),
        get(&format!("xn--bcher-kva.test:{up}"), "/"),
        connect_req(&format!("evil.test:{ec}")),
        connect_req(&format!("XN--BCHER-KVA.test.:{ec}")),
        // Not resolvable at all: `denied`, not `resolve_failed`, so no lookup happened.
        get(&format!("nowhere.invalid:{up}"), "/"),
    ] {
        let mut c = proxy.client().await;
        c.send(&raw).await;
        let r = c.response().await;
        assert_eq!(r.status, 403, "{raw:?}: {}", r.text());
        assert!(r.text().contains("egress.deny"), "{}", r.text());
    }
    // The allowed neighbour still works.
    let mut c = proxy.client().await;
    c.send(&get(&format!("site.test:{up}"), "/")).await;
    assert_eq!(c.response().await.status, 200);

    assert_eq!(
        upstream.settle().await,
        1,
        "a denied request reached upstream"
    );
    assert_eq!(
        echo.settle().await,
        0,
        "a denied CONNECT reached its target"
    );
    let d = |h: &str| (h.to_owned(), "denied");
    assert_eq!(
        reasons(&proxy.recorder),
        vec![
            d("evil.test"),
            d("evil.test"),
            d("xn--bcher-kva.test"),
            d("evil.test"),
            d("xn--bcher-kva.test"),
            d("nowhere.invalid"),
        ]
    );
}

#[tokio::test]
async fn ports_beyond_80_443_and_the_list_are_refused_before_any_lookup() {
    let upstream = Upstream::start().await;
    let echo = Echo::start().await;
    let mut p = policy(&["*.test", "*.invalid"], &["127.0.0.0/8"]);
    p.ports = vec![PortRange::single(upstream.port())];
    let proxy = Proxy::start(p).await;
    let (up, ec) = (upstream.port(), echo.port());

    let mut c = proxy.client().await;
    c.send(&get(&format!("site.test:{up}"), "/")).await;
    assert_eq!(c.response().await.status, 200, "the listed port is open");

    for (raw, port) in [
        (connect_req(&format!("site.test:{ec}")), ec),
        (get(&format!("site.test:{ec}"), "/"), ec),
        (connect_req("site.test:22"), 22),
        (get("site.test:25", "/"), 25),
        // Not resolvable: `port_not_allowed`, not `resolve_failed`.
        (connect_req("nowhere.invalid:8443"), 8443),
    ] {
        let mut c = proxy.client().await;
        c.send(&raw).await;
        let r = c.response().await;
        assert_eq!(r.status, 403, "{raw:?}: {}", r.text());
        assert!(
            r.text()
                .ends_with(&format!("port {port} is not allowed; only 80, 443 and the ports in the mandate's egress.ports are")),
            "{}",
            r.text()
        );
    }
    assert_eq!(upstream.settle().await, 1);
    assert_eq!(echo.settle().await, 0, "an unlisted port was connected to");
    let codes: Vec<&str> = reasons(&proxy.recorder)
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    assert_eq!(codes, ["port_not_allowed"; 5]);
}

/// Every spelling of a loopback address, and names that resolve to one, with `allow = ["*"]`
/// and no private network: each is judged as the address it means and refused; nothing
/// reaches the servers. Malformed international names are refused as bad requests.
#[tokio::test]
async fn bypass_corpus_is_judged_as_the_address_it_means() {
    let upstream = Upstream::start().await;
    let echo = Echo::start().await;
    let mut p = policy(&["*"], &[]);
    p.hosts
        .insert("internal.test".into(), "127.0.0.1".parse().unwrap());
    let proxy = Proxy::start(p).await;
    let (up, ec) = (upstream.port(), echo.port());

    let loopback_spellings = [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "0177.0.0.01",
        "127.1",
        "127.0.1",
        "127.0.0.1.",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[0:0:0:0:0:ffff:7f00:1]",
    ];
    for h in loopback_spellings {
        for raw in [
            get(&format!("{h}:{up}"), "/"),
            connect_req(&format!("{h}:{ec}")),
        ] {
            let mut c = proxy.client().await;
            c.send(&raw).await;
            let r = c.response().await;
            assert_eq!(r.status, 403, "{raw:?}: {}", r.text());
            let last = proxy.recorder.denied().pop().unwrap();
            assert_eq!(
                (last.host.as_str(), &last.reason),
                (
                    "127.0.0.1",
                    &DenyReason::PrivateAddress("127.0.0.1".parse().unwrap())
                ),
                "{raw:?}"
            );
        }
    }
    // Names: the hosts table's answer and the system resolver's are both filtered after
    // resolution, on the address the proxy would dial.
    for h in [
        "internal.test",
        "INTERNAL.Test.",
        "localhost",
        "localhost.",
        "LocalHost",
    ] {
        for raw in [
            get(&format!("{h}:{up}"), "/"),
            connect_req(&format!("{h}:{ec}")),
        ] {
            let mut c = proxy.client().await;
            c.send(&raw).await;
            let r = c.response().await;
            assert_eq!(r.status, 403, "{raw:?}: {}", r.text());
            let last = proxy.recorder.denied().pop().unwrap();
            assert!(
                matches!(last.reason, DenyReason::PrivateAddress(ip) if ip.is_loopback()),
                "{raw:?}: {last:?}"
            );
            assert_eq!(last.host, h.trim_end_matches('.').to_ascii_lowercase());
        }
    }
    // Percent-encoding: hyper refuses it in a request target before the host parser (which
    // would decode it to 127.0.0.1) ever sees it; refused either way.
    for raw in [
        get(&format!("127%2e0.0.1:{up}"), "/"),
        connect_req(&format!("127%2e0.0.1:{ec}")),
    ] {
        let mut c = proxy.client().await;
        c.send(&raw).await;
        let r = c.response().await;
        assert!(matches!(r.status, 400 | 403), "{raw:?}: {}", r.text());
    }
    // IPv6 loopback and the unspecified addresses.
    for h in ["[::1]", "[::]", "0", "0x0", "[::ffff:0.0.0.0]"] {
        let mut c = proxy.client().await;
        c.send(&connect_req(&format!("{h}:{ec}"))).await;
        let r = c.response().await;
        assert_eq!(r.status, 403, "{h}: {}", r.text());
        assert_eq!(
            proxy.recorder.denied().pop().unwrap().reason.code(),
            "private_address",
            "{h}"
        );
    }
    // Invalid punycode, look-alike names, names ending in a number that is not an address.
    for h in [
        "xn--.test",
        "xn--abc.test",
        "xn--pypal-4ve.test",
        "1.2.3.4.5",
        "example.0x10",
    ] {
        let mut c = proxy.client().await;
        c.send(&connect_req(&format!("{h}:{ec}"))).await;
        let r = c.response().await;
        assert_eq!(r.status, 400, "{h}: {}", r.text());
        assert_eq!(
            proxy.recorder.denied().pop().unwrap().reason.code(),
            "bad_request",
            "{h}"
        );
    }
    assert_eq!(upstream.settle().await, 0, "upstream was contacted");
    assert_eq!(echo.settle().await, 0, "CONNECT target was contacted");
}

#[tokio::test]
async fn a_policy_change_closes_tunnels_to_a_port_no_longer_listed() {
    let echo = Echo::start().await;
    let proxy = Proxy::start(open_policy()).await;
    let mut t = proxy.client().await;
    t.send(&connect_req(&format!("site.test:{}", echo.port())))
        .await;
    assert_eq!(t.response().await.status, 200);
    let mut narrowed = open_policy();
    narrowed.ports = vec![PortRange::single(8443)];
    proxy.policy.send_replace(Arc::new(narrowed));
    assert!(
        t.closed().await,
        "the tunnel to an unlisted port stayed open"
    );
    echo.wait_closed(1).await;
    assert_eq!(
        proxy.recorder.denied(),
        vec![denied(
            Kind::Connect,
            "site.test",
            echo.port(),
            DenyReason::PortNotAllowed(echo.port())
        )]
    );
}

#[tokio::test]
async fn traffic_is_counted_per_host_both_ways_as_it_flows() {
    let upstream = Upstream::start().await;
    let echo = Echo::start().await;
    let mut p = open_policy();
    p.allow = ["site.test", "tunnel.test", "ws.test", "*.site.test"]
        .iter()
        .map(|a| HostPattern::parse(a).unwrap())
        .collect();
    for h in ["tunnel.test", "ws.test", "held-value-4b1d.site.test"] {
        p.hosts.insert(h.into(), "127.0.0.1".parse().unwrap());
    }
    let proxy = Proxy::start(p).await;

    // Plain http: heads and body, counted on the upstream stream.
    let mut c = proxy.client().await;
    c.send(&get(&format!("Site.Test.:{}", upstream.port()), "/big"))
        .await;
    assert_eq!(c.response().await.body.len(), BIG_LEN);
    let site = proxy.recorder.traffic_of("site.test");
    assert_eq!((site.requests, site.refused), (1, 0));
    assert!(site.bytes_received > BIG_LEN as u64, "{site:?}");
    assert!(site.bytes_sent > 0, "{site:?}");

    // A tunnel: counted while it is open, exactly what went through.
    let mut t = proxy.client().await;
    t.send(&connect_req(&format!("tunnel.test:{}", echo.port())))
        .await;
    assert_eq!(t.response().await.status, 200);
    t.send("hello").await;
    assert_eq!(t.read_exactly(5).await, b"hello");
    t.send("0123456789").await;
    assert_eq!(t.read_exactly(10).await, b"0123456789");
    assert_eq!(
        proxy.recorder.traffic_of("tunnel.test"),
        HostTraffic {
            requests: 1,
            refused: 0,
            bytes_sent: 15,
            bytes_received: 15
        }
    );

    // A plaintext WebSocket (the frame-checking path).
    let mut w = proxy.client().await;
    w.send(&connect_req(&format!("ws.test:{}", echo.port())))
        .await;
    assert_eq!(w.response().await.status, 200);
    let head = "GET /ws HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n\r\n";
    w.send(head).await;
    w.read_exactly(head.len()).await;
    let frame = masked_frame(b"payload", [1, 2, 3, 4]);
    w.send_bytes(&frame).await;
    assert_eq!(w.read_exactly(frame.len()).await, frame);
    let n = (head.len() + frame.len()) as u64;
    assert_eq!(
        proxy.recorder.traffic_of("ws.test"),
        HostTraffic {
            requests: 1,
            refused: 0,
            bytes_sent: n,
            bytes_received: n
        }
    );

    // Refusals: counted as requests and refusals, no bytes.
    for _ in 0..2 {
        let mut c = proxy.client().await;
        c.send(&get(&format!("evil.test:{}", upstream.port()), "/"))
            .await;
        assert_eq!(c.response().await.status, 403);
    }
    assert_eq!(
        proxy.recorder.traffic_of("evil.test"),
        HostTraffic {
            requests: 2,
            refused: 2,
            ..HostTraffic::default()
        }
    );
    // A host name carrying a held value is counted under its redacted form only.
    let mut c = proxy.client().await;
    c.send(&connect_req(&format!(
        "held-value-4b1d.site.test:{}",
        echo.port()
    )))
    .await;
    assert_eq!(c.response().await.status, 403);
    let hosts: Vec<String> = proxy.recorder.traffic.snapshot().into_keys().collect();
    assert_eq!(
        hosts,
        [
            "[held value].site.test",
            "evil.test",
            "site.test",
            "tunnel.test",
            "ws.test"
        ]
    );
    assert!(!proxy.recorder.traffic.is_finished());

    // A malformed request has no host: counted under (none).
    let mut c = proxy.client().await;
    c.send("not http at all\r\n\r\n").await;
    assert_eq!(c.response().await.status, 400);
    guard("the malformed request being counted", async {
        while proxy.recorder.traffic_of(crate::egress::NO_HOST).refused == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn the_counts_are_final_once_the_proxy_stops() {
    let mut proxy = Proxy::start(open_policy()).await;
    let recorder = Arc::clone(&proxy.recorder);
    proxy.shutdown.cancel();
    guard("serve returning", proxy.task.take().unwrap())
        .await
        .unwrap();
    assert!(recorder.traffic.is_finished());
}
