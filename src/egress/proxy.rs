//! The HTTP proxy behind the sandbox's only socket.
//!
//! Chromium reuses one proxy connection for requests to different hosts, so the policy is
//! applied per request (hyper serves each connection, one service call per request), never per
//! connection. The proxy resolves names itself and dials exactly the addresses it checked.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::egress::host::Host;
use crate::egress::policy::{DenyReason, EgressPolicy};
use crate::egress::traffic::{Counted, HostCounters, Traffic};

/// How long dialling the checked upstream addresses may take, all attempts together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request head (bounds slow-header clients).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Proxy connections served at once per listener; further clients wait in the listen backlog.
/// Chromium opens at most 32 sockets to one proxy.
pub const MAX_CONNECTIONS: usize = 256;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Longest unparsed host text passed to the observer, so audit records stay bounded.
const MAX_SHOWN_HOST_LEN: usize = 255;

/// Hop-by-hop headers (RFC 9110 7.6.1) plus the proxy's own; never forwarded either way.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// How the browser asked to go out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `CONNECT host:port`: https, wss (and Chromium's ws) tunnels.
    Connect,
    /// An absolute-form plain-http request (`GET http://host/path`), or anything else that is
    /// not a CONNECT.
    Http,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Connect => "connect",
            Kind::Http => "http",
        })
    }
}

/// One request as it arrived, before any decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestInfo {
    /// CONNECT or plain http.
    pub kind: Kind,
    /// The host normalised (lowercase, IPv6 in brackets), or the raw text (clipped) when it
    /// does not parse; empty when the request names no host at all.
    pub host: String,
    /// The port requested (80 when a plain-http URL has none); 0 when unknown.
    pub port: u16,
}

/// One refused request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// CONNECT or plain http.
    pub kind: Kind,
    /// As in [`RequestInfo::host`].
    pub host: String,
    /// As in [`RequestInfo::port`].
    pub port: u16,
    /// Why it was refused.
    pub reason: DenyReason,
}

/// Receives what the proxy sees; the supervisor turns `denied` into `egress.denied` audit
/// records. Called inline on the proxy's tasks: keep it quick and non-blocking.
pub trait EgressObserver: Send + Sync + 'static {
    /// Every request, allowed or not, before it is decided.
    fn request(&self, r: &RequestInfo);
    /// Every refusal, including malformed requests.
    fn denied(&self, d: &Denied);
    /// Whether `material` (a host name, a plain-http URL, the head of a plaintext request
    /// inside a tunnel) bound for `host` carries a value the session holds for another site. The proxy refuses such requests
    /// before resolving the name, so not even a DNS query carries the value out.
    fn holds_value_in(&self, _host: &str, _material: &[u8]) -> bool {
        false
    }
    /// `host` as logs, audit records and refusal bodies may show it after
    /// [`holds_value_in`](Self::holds_value_in) found a held value for it (the host name itself
    /// may be the carrier).
    fn shown_host(&self, host: &str) -> String {
        host.to_string()
    }
    /// Where the proxy counts requests, refusals and bytes per destination host (keyed by
    /// [`shown_host`](Self::shown_host)); `None` counts nothing. The proxy marks it
    /// [finished](Traffic::finish) when it stops.
    fn traffic(&self) -> Option<&Traffic> {
        None
    }
}

/// Serves the proxy protocol on `listener` under `policy` until `shutdown` is cancelled.
///
/// Every request reads the policy in force at that moment; when it changes, open tunnels whose
/// destination it no longer allows are closed (and reported), so a narrowed mandate holds
/// from the very next request, in a reused connection too.
///
/// On cancellation it stops accepting, drops every connection, in-flight request and tunnel it
/// started, and returns once all of them are gone. Run it inside the session's tracing span:
/// the span is carried onto every task.
pub async fn serve(
    listener: TcpListener,
    policy: watch::Receiver<Arc<EgressPolicy>>,
    observer: Arc<dyn EgressObserver>,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared {
        policy,
        observer,
        tasks: TaskTracker::new(),
        shutdown: shutdown.clone(),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let conn_shared = Arc::clone(&shared);
                shared.spawn(async move {
                    serve_connection(stream, conn_shared).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "egress proxy: accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    drop(listener);
    shared.tasks.close();
    shared.tasks.wait().await;
    if let Some(t) = shared.observer.traffic() {
        t.finish();
    }
}

struct Shared {
    policy: watch::Receiver<Arc<EgressPolicy>>,
    observer: Arc<dyn EgressObserver>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Shared {
    /// The policy in force now.
    fn policy(&self) -> Arc<EgressPolicy> {
        self.policy.borrow().clone()
    }

    /// The counters of the destination `host` (as the observer shows it), or counters nobody
    /// reads when the observer keeps none.
    fn counters(&self, host: &str) -> Arc<HostCounters> {
        match self.observer.traffic() {
            Some(t) => t.host(&self.observer.shown_host(host)),
            None => Arc::default(),
        }
    }

    /// Spawns a task that `serve` waits for and that ends (dropping its sockets) on shutdown.
    fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(
            async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = work => {}
                }
            }
            .instrument(tracing::Span::current()),
        );
    }

    fn refuse(&self, kind: Kind, target: &Target, reason: DenyReason) -> Response<ProxyBody> {
        let redacted;
        let target = if reason == DenyReason::HeldValue {
            redacted = Target {
                shown: self.observer.shown_host(&target.shown),
                port: target.port,
                host: Err("carries a held value".into()),
            };
            &redacted
        } else {
            target
        };
        tracing::info!(%kind, host = %target.shown, port = target.port, %reason, "egress refused");
        let status = match reason {
            DenyReason::BadRequest(_) => StatusCode::BAD_REQUEST,
            DenyReason::NotAllowed
            | DenyReason::Denied
            | DenyReason::PortNotAllowed(_)
            | DenyReason::PrivateAddress(_)
            | DenyReason::HeldValue => StatusCode::FORBIDDEN,
            DenyReason::ResolveFailed(_) | DenyReason::ConnectFailed(_) => StatusCode::BAD_GATEWAY,
        };
        let body = if target.shown.is_empty() {
            format!("chaperone: egress refused: {reason}")
        } else {
            format!(
                "chaperone: egress to {}:{} refused: {reason}",
                target.shown, target.port
            )
        };
        // After a refused CONNECT the client may already have sent tunnel bytes, which must
        // not be read as the next request; a bad request leaves the stream in doubt too.
        let close = kind == Kind::Connect || matches!(reason, DenyReason::BadRequest(_));
        let counters = self.counters(&target.shown);
        counters.request();
        counters.refusal();
        self.observer.denied(&Denied {
            kind,
            host: target.shown.clone(),
            port: target.port,
            reason,
        });
        text_response(status, body, close)
    }
}

/// An allowed CONNECT already answered 200: the tunnel starts once hyper hands the client
/// connection over.
struct PendingTunnel {
    upgrade: OnUpgrade,
    upstream: TcpStream,
    host: String,
    port: u16,
    /// The parsed host and the address dialled, re-checked when the policy changes.
    dest: (Host, IpAddr),
    /// Where its bytes and a later refusal are counted.
    counters: Arc<HostCounters>,
}

type TunnelSlot = Arc<Mutex<Option<PendingTunnel>>>;

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "egress proxy: set_nodelay failed");
    }
    // The tunnel runs on this task, after hyper lets go of the connection, so it counts
    // against the same connection slot and ends with it.
    let slot = TunnelSlot::default();
    let service = {
        let shared = Arc::clone(&shared);
        let slot = Arc::clone(&slot);
        service_fn(move |req| {
            let shared = Arc::clone(&shared);
            let slot = Arc::clone(&slot);
            async move { Ok::<_, Infallible>(handle(req, &shared, &slot).await) }
        })
    };
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    match served {
        Ok(()) => {}
        Err(e) if e.is_parse() => {
            // hyper has already answered 400 (or 414/431); the audit still hears of it.
            let target = Target::unknown();
            shared.observer.request(&target.info(Kind::Http));
            let reason = DenyReason::BadRequest(format!("not a valid HTTP/1.1 request ({e})"));
            tracing::info!(%reason, "egress refused");
            let counters = shared.counters(&target.shown);
            counters.request();
            counters.refusal();
            shared.observer.denied(&Denied {
                kind: Kind::Http,
                host: target.shown,
                port: target.port,
                reason,
            });
        }
        Err(e) => tracing::debug!(error = %e, "egress proxy: connection ended"),
    }
    let pending = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(tunnel) = pending {
        run_tunnel(tunnel, &shared).await;
    }
}

async fn handle(req: Request<Incoming>, shared: &Shared, slot: &TunnelSlot) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        connect(req, shared, slot).await
    } else {
        forward(req, shared).await
    }
}

async fn connect(
    mut req: Request<Incoming>,
    shared: &Shared,
    slot: &TunnelSlot,
) -> Response<ProxyBody> {
    let target = Target::of_connect(req.uri());
    shared.observer.request(&target.info(Kind::Connect));
    if shared
        .observer
        .holds_value_in(&target.shown, target.shown.as_bytes())
    {
        return shared.refuse(Kind::Connect, &target, DenyReason::HeldValue);
    }
    match open_upstream(&shared.policy(), &target).await {
        Err(reason) => shared.refuse(Kind::Connect, &target, reason),
        Ok(upstream) => {
            let (Ok(host), Ok(peer)) = (target.host.clone(), upstream.peer_addr()) else {
                let reason = DenyReason::ConnectFailed("the connection has no peer".into());
                return shared.refuse(Kind::Connect, &target, reason);
            };
            let upgrade = hyper::upgrade::on(&mut req);
            let counters = shared.counters(&target.shown);
            counters.request();
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(PendingTunnel {
                upgrade,
                upstream,
                host: target.shown.clone(),
                port: target.port,
                dest: (host, peer.ip()),
                counters,
            });
            Response::new(empty_body())
        }
    }
}

/// Longest plaintext request head inspected at the start of a tunnel.
const MAX_TUNNEL_HEAD: usize = 16 * 1024;

/// Runs a tunnel until either side closes it, or until the policy in force no longer allows
/// its destination (then it is closed and the refusal reported).
async fn run_tunnel(tunnel: PendingTunnel, shared: &Shared) {
    let (host, ip) = tunnel.dest.clone();
    let (shown, port) = (tunnel.host.clone(), tunnel.port);
    let counters = Arc::clone(&tunnel.counters);
    let mut changes = shared.policy.clone();
    let withdrawn = async {
        loop {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            let now = changes.borrow_and_update().clone();
            if let Err(reason) = now.allows(&host, ip, port) {
                return reason;
            }
        }
    };
    tokio::select! {
        () = tunnel_traffic(tunnel, shared) => {}
        reason = withdrawn => {
            tracing::info!(host = %shared.observer.shown_host(&shown), port, "egress proxy: tunnel closed, the changed mandate no longer allows it");
            counters.refusal();
            shared.observer.denied(&Denied {
                kind: Kind::Connect,
                host: shared.observer.shown_host(&shown),
                port,
                reason,
            });
        }
    }
}

async fn tunnel_traffic(tunnel: PendingTunnel, shared: &Shared) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upgraded = match tunnel.upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "egress proxy: CONNECT was not upgraded");
            return;
        }
    };
    let mut client = TokioIo::new(upgraded);
    let counters = tunnel.counters;
    let mut upstream = Counted::new(tunnel.upstream, Arc::clone(&counters));
    let target = (tunnel.host.as_str(), tunnel.port);
    // Chromium tunnels plain ws:// through CONNECT too, and Fetch never sees WebSocket
    // handshakes: when a tunnel starts with a plaintext `GET` (a handshake, not a TLS hello),
    // read its head and look at it before anything goes upstream.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let read_head = async {
        loop {
            let n = match client.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            head.extend_from_slice(&buf[..n]);
            let may_be_get = b"GET ".starts_with(&head[..head.len().min(4)]);
            if !may_be_get
                || head.windows(4).any(|w| w == b"\r\n\r\n")
                || head.len() >= MAX_TUNNEL_HEAD
            {
                return true;
            }
        }
    };
    match tokio::time::timeout(HEADER_READ_TIMEOUT, read_head).await {
        Ok(true) => {}
        Ok(false) | Err(_) => return,
    }
    if head.starts_with(b"GET ") && holds_value(shared, target, &head, &counters) {
        return;
    }
    let websocket = head.starts_with(b"GET ") && is_websocket_upgrade(&head);
    if websocket {
        // Compressed frames could hide a value from the frame check below: never let the
        // handshake negotiate permessage-deflate.
        head = without_header(&head, "sec-websocket-extensions");
    }
    if upstream.write_all(&head).await.is_err() {
        return;
    }
    if !websocket {
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((sent, received)) => {
                tracing::debug!(sent, received, "egress proxy: tunnel closed")
            }
            Err(e) => tracing::debug!(error = %e, "egress proxy: tunnel ended"),
        }
        return;
    }
    // A plaintext WebSocket: frames from the browser are masked, not encrypted, so each one is
    // unmasked and looked at before it is passed on.
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    let down = tokio::io::copy(&mut up_rd, &mut client_wr);
    let up = async {
        let mut frames = FrameScanner::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let payload = frames.feed(&buf[..n]);
            if !payload.is_empty() && holds_value(shared, target, &payload, &counters) {
                return;
            }
            if up_wr.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = down => {}
        () = up => {}
    }
}

/// Whether tunnel bytes carry a held value; if so, the refusal is reported (the caller closes
/// the tunnel).
fn holds_value(
    shared: &Shared,
    (host, port): (&str, u16),
    material: &[u8],
    counters: &HostCounters,
) -> bool {
    if !shared.observer.holds_value_in(host, material) {
        return false;
    }
    counters.refusal();
    shared.observer.denied(&Denied {
        kind: Kind::Connect,
        host: shared.observer.shown_host(host),
        port,
        reason: DenyReason::HeldValue,
    });
    true
}

fn is_websocket_upgrade(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().any(|l| {
        l.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case("upgrade") && v.trim().eq_ignore_ascii_case("websocket")
        })
    })
}

/// `head` (a request head ending in an empty line) without the header `name`.
fn without_header(head: &[u8], name: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive("\r\n") {
        let drop = line
            .split_once(':')
            .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name));
        if !drop {
            out.push_str(line);
        }
    }
    out.into_bytes()
}

/// Unmasks the payload of WebSocket frames (RFC 6455 5.2) as their bytes stream by. Keeps the
/// tail of what came before, so a value split across reads or frames is still seen whole.
#[derive(Default)]
struct FrameScanner {
    /// Header bytes of the frame being read, until complete.
    header: Vec<u8>,
    /// Payload bytes left in the current frame, and its mask.
    left: u64,
    mask: [u8; 4],
    offset: usize,
    /// Unmasked payload seen last, kept for values that straddle a boundary.
    tail: Vec<u8>,
}

/// Longest stretch of earlier payload kept to catch a value cut in two (held values are short).
const FRAME_TAIL: usize = 1024;

impl FrameScanner {
    /// Takes the next bytes of the stream; returns the kept tail plus the payload they carry,
    /// unmasked.
    fn feed(&mut self, mut bytes: &[u8]) -> Vec<u8> {
        let mut payload = std::mem::take(&mut self.tail);
        let fresh_from = payload.len();
        while !bytes.is_empty() {
            if self.left == 0 {
                self.header.push(bytes[0]);
                bytes = &bytes[1..];
                if let Some((len, mask)) = frame_header(&self.header) {
                    self.header.clear();
                    self.left = len;
                    self.mask = mask;
                    self.offset = 0;
                }
                continue;
            }
            let take = usize::try_from(self.left)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            for &b in &bytes[..take] {
                payload.push(b ^ self.mask[self.offset % 4]);
                self.offset += 1;
            }
            self.left -= take as u64;
            bytes = &bytes[take..];
        }
        let keep = payload.len().saturating_sub(FRAME_TAIL);
        self.tail = payload[keep..].to_vec();
        if payload.len() == fresh_from {
            return Vec::new();
        }
        payload
    }
}

/// Parses a complete frame header: payload length and mask (zero when unmasked).
fn frame_header(h: &[u8]) -> Option<(u64, [u8; 4])> {
    let b1 = *h.get(1)?;
    let masked = b1 & 0x80 != 0;
    let (len, at) = match b1 & 0x7f {
        126 => (u64::from(u16::from_be_bytes([*h.get(2)?, *h.get(3)?])), 4),
        127 => {
            let bytes: [u8; 8] = h.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(bytes), 10)
        }
        n => (u64::from(n), 2),
    };
    let mut mask = [0u8; 4];
    if masked {
        mask.copy_from_slice(h.get(at..at + 4)?);
    }
    if h.len() < at + if masked { 4 } else { 0 } {
        return None;
    }
    Some((len, mask))
}

async fn forward(req: Request<Incoming>, shared: &Shared) -> Response<ProxyBody> {
    let target = Target::of_http(req.uri());
    shared.observer.request(&target.info(Kind::Http));
    let head_leaks = shared
        .observer
        .holds_value_in(&target.shown, req.uri().to_string().as_bytes())
        || req
            .headers()
            .values()
            .any(|v| shared.observer.holds_value_in(&target.shown, v.as_bytes()));
    if head_leaks {
        return shared.refuse(Kind::Http, &target, DenyReason::HeldValue);
    }
    let upstream = match open_upstream(&shared.policy(), &target).await {
        Ok(s) => s,
        Err(reason) => return shared.refuse(Kind::Http, &target, reason),
    };
    let (mut parts, body) = req.into_parts();
    // Target::of_http accepted the URI, so it has an authority without user info.
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .unwrap_or_default();
    // RFC 9112 3.2.2: a proxy replaces Host with the target URI's authority.
    let host_header = HeaderValue::from_str(authority);
    let origin_form = origin_form(&parts.uri);
    let (Ok(host_header), Ok(origin_form)) = (host_header, origin_form) else {
        let reason = DenyReason::BadRequest("the request target cannot be rewritten".into());
        return shared.refuse(Kind::Http, &target, reason);
    };
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(header::HOST, host_header);
    parts.uri = origin_form;
    parts.version = Version::HTTP_11;
    let request = Request::from_parts(parts, body);

    let counters = shared.counters(&target.shown);
    counters.request();
    // Request and response heads count too: they are bytes the destination got and sent.
    let upstream = Counted::new(upstream, counters);
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(pair) => pair,
            Err(e) => return upstream_failed(&target, &e),
        };
    // Drives the upstream connection while the response body streams back to the client.
    shared.spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "egress proxy: upstream connection ended");
        }
    });
    let response = match sender.send_request(request).await {
        Ok(r) => r,
        Err(e) => return upstream_failed(&target, &e),
    };
    let (mut parts, body) = response.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        // Upgrade was stripped from the request, so the upstream is not speaking HTTP sense.
        return text_response(
            StatusCode::BAD_GATEWAY,
            format!(
                "chaperone: egress to {}:{} failed: unexpected protocol switch",
                target.shown, target.port
            ),
            true,
        );
    }
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

fn upstream_failed(target: &Target, e: &hyper::Error) -> Response<ProxyBody> {
    tracing::debug!(host = %target.shown, port = target.port, error = %e, "egress proxy: upstream failed");
    text_response(
        StatusCode::BAD_GATEWAY,
        format!(
            "chaperone: egress to {}:{} failed: upstream error",
            target.shown, target.port
        ),
        true,
    )
}

/// Checks host and port, resolves the host and dials one of the addresses that passed.
async fn open_upstream(policy: &EgressPolicy, target: &Target) -> Result<TcpStream, DenyReason> {
    let host = target
        .host
        .as_ref()
        .map_err(|why| DenyReason::BadRequest(why.clone()))?;
    // Before any DNS query: a refused destination must not even be looked up.
    policy.check_target(host, target.port)?;
    let addrs = policy.resolve_host(host, target.port).await?;
    connect_any(&addrs).await
}

async fn connect_any(addrs: &[SocketAddr]) -> Result<TcpStream, DenyReason> {
    let attempts = async {
        let mut last = String::from("no address to try");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempts).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(last)) => Err(DenyReason::ConnectFailed(last)),
        Err(_) => Err(DenyReason::ConnectFailed(format!(
            "no answer within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// Where a request wants to go, as far as it could be read.
struct Target {
    /// What the observer and the refusal body show.
    shown: String,
    port: u16,
    /// The parsed host, or why the request is malformed.
    host: Result<Host, String>,
}

impl Target {
    fn unknown() -> Target {
        Target::bad(String::new(), 0, "no target".into())
    }

    fn bad(shown: impl Into<String>, port: u16, why: String) -> Target {
        Target {
            shown: clip(shown.into()),
            port,
            host: Err(why),
        }
    }

    fn parse(host: &str, port: u16) -> Target {
        match Host::parse(host) {
            Ok(h) => Target {
                shown: h.to_string(),
                port,
                host: Ok(h),
            },
            Err(e) => Target::bad(host, port, e.to_string()),
        }
    }

    /// `CONNECT host:port` (authority-form, port required).
    fn of_connect(uri: &Uri) -> Target {
        let Some(auth) = uri.authority().filter(|_| uri.scheme().is_none()) else {
            return Target::bad("", 0, "CONNECT needs a `host:port` target".into());
        };
        match split_authority(auth.as_str()) {
            Err(why) => Target::bad(auth.host(), 0, why),
            Ok((host, None)) => Target::bad(host, 0, "CONNECT needs a port".into()),
            Ok((host, Some(port))) => Target::parse(host, port),
        }
    }

    /// `METHOD http://host[:port]/path` (absolute-form, http only).
    fn of_http(uri: &Uri) -> Target {
        let Some(auth) = uri.authority() else {
            return Target::bad(
                "",
                0,
                "the request target must be an absolute http:// URL; this proxy does not serve \
                 origin-form requests"
                    .into(),
            );
        };
        let why = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => Some("https must be tunnelled with CONNECT".to_owned()),
            Some(other) => Some(format!("the scheme `{other}` is not supported, only http")),
            None => Some("only CONNECT takes a `host:port` target".to_owned()),
        };
        match (why, split_authority(auth.as_str())) {
            (Some(why), _) | (None, Err(why)) => Target::bad(auth.host(), 0, why),
            (None, Ok((host, port))) => Target::parse(host, port.unwrap_or(80)),
        }
    }

    fn info(&self, kind: Kind) -> RequestInfo {
        RequestInfo {
            kind,
            host: self.shown.clone(),
            port: self.port,
        }
    }
}

/// Splits `host[:port]`; user info and malformed or zero ports are errors.
fn split_authority(auth: &str) -> Result<(&str, Option<u16>), String> {
    if auth.contains('@') {
        return Err("user credentials in the request target are not allowed".into());
    }
    let (host, port) = match auth.rfind(':') {
        // A colon inside `[...]` belongs to an IPv6 address, not to a port.
        Some(i) if !auth[i..].contains(']') => (&auth[..i], &auth[i + 1..]),
        _ => return Ok((auth, None)),
    };
    if port.is_empty() {
        return Ok((host, None));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok((host, Some(p))),
        _ => Err(format!("`{}` is not a valid port", clip(port.to_owned()))),
    }
}

/// The path and query of an absolute-form URI, as an origin-form URI.
fn origin_form(uri: &Uri) -> Result<Uri, hyper::http::uri::InvalidUri> {
    let pq = uri.path_and_query().map_or("", |p| p.as_str());
    if pq.starts_with('/') {
        pq.parse()
    } else {
        format!("/{pq}").parse()
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // With chunked framing gone, a Content-Length that came alongside it would lie about the
    // body (request smuggling); hyper re-frames from the body itself.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in &listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in &proxy {
        headers.remove(name);
    }
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_SHOWN_HOST_LEN {
        let mut end = MAX_SHOWN_HOST_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn empty_body() -> ProxyBody {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn text_response(status: StatusCode, text: String, close: bool) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_proxy_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Secret-Hop"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic dXNlcjpwYXNz"),
            ("proxy-connection", "keep-alive"),
            ("proxy-anything", "1"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("content-length", "12"),
            ("upgrade", "websocket"),
            ("authorization", "Bearer kept"),
            ("accept", "*/*"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "authorization"]);
    }

    #[test]
    fn authority_split() {
        assert_eq!(
            split_authority("example.com:443"),
            Ok(("example.com", Some(443)))
        );
        assert_eq!(split_authority("example.com"), Ok(("example.com", None)));
        assert_eq!(split_authority("example.com:"), Ok(("example.com", None)));
        assert_eq!(split_authority("[::1]:8080"), Ok(("[::1]", Some(8080))));
        assert_eq!(split_authority("[::1]"), Ok(("[::1]", None)));
        assert!(split_authority("example.com:0").is_err());
        assert!(split_authority("example.com:65536").is_err());
        assert!(split_authority("example.com:+80").is_err());
        assert!(split_authority("user:pw@example.com").is_err());
    }

    #[test]
    fn targets_are_read_like_a_proxy_reads_them() {
        let t = Target::of_http(&"http://Example.COM./a?b".parse().unwrap());
        assert_eq!((t.shown.as_str(), t.port), ("example.com", 80));
        assert!(t.host.is_ok());
        let t = Target::of_http(&"http://[::1]:81/".parse().unwrap());
        assert_eq!((t.shown.as_str(), t.port), ("[::1]", 81));
        for bad in [
            "/",
            "https://example.com/",
            "ftp://example.com/",
            "http://u:p@example.com/",
        ] {
            assert!(
                Target::of_http(&bad.parse().unwrap()).host.is_err(),
                "{bad}"
            );
        }
        let t = Target::of_connect(&"example.com:443".parse().unwrap());
        assert_eq!((t.shown.as_str(), t.port), ("example.com", 443));
        assert!(Target::of_connect(&"example.com".parse().unwrap())
            .host
            .is_err());
        assert!(
            Target::of_connect(&"http://example.com:443/".parse().unwrap())
                .host
                .is_err()
        );
        assert_eq!(origin_form(&"http://h".parse().unwrap()).unwrap(), "/");
        assert_eq!(
            origin_form(&"http://h/p?q=1".parse().unwrap()).unwrap(),
            "/p?q=1"
        );
    }
}
