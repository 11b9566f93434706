//! The agent-facing endpoint (`--listen`): Chromium's DevTools HTTP surface and the CDP
//! websocket, one per session, addressed by the session's capability.
//!
//! `http_url` is `http://HOST/session/<capability>`: its `/json/version` (with or without the
//! trailing slash), `/json`, `/json/list` and `/json/protocol` behave as Chromium's own. The
//! websocket is `ws://HOST/devtools/browser/<capability>`; each page listed by `/json/list` has
//! its own `ws://HOST/devtools/page/<capability>/<target id>`. Like Chromium, the endpoint refuses a
//! `Host` that is neither an IP address nor `localhost` (nor the configured `public_host`), and
//! refuses websocket upgrades that carry an `Origin` (a web page must not drive a browser).

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Extension;
use axum::{Json, Router};
use chromiumoxide::cdp::browser_protocol::target::{CreateTargetParams, GetTargetsParams};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

use crate::browser::ToAgent;
use crate::session::{Registry, ResumeMode, Session, State as SessionState};

/// Shared state of the endpoint.
#[derive(Clone)]
pub struct Endpoint {
    reg: Arc<Registry>,
    public_host: Option<String>,
    max_message: usize,
    resume_buffer: usize,
    ping_every: std::time::Duration,
    protocol: Arc<tokio::sync::OnceCell<Result<bytes::Bytes, String>>>,
}

/// The endpoint's routes.
pub fn router(reg: Arc<Registry>) -> Router {
    let cfg = reg.config();
    let ep = Endpoint {
        public_host: cfg.public_host.clone(),
        max_message: usize::try_from(cfg.limits.max_agent_message.as_u64()).unwrap_or(usize::MAX),
        resume_buffer: usize::try_from(cfg.limits.resume_buffer.as_u64()).unwrap_or(usize::MAX),
        ping_every: cfg.limits.agent_ping_interval,
        protocol: Arc::default(),
        reg,
    };
    Router::new()
        .route("/session/{cap}/json/version", get(version))
        .route("/session/{cap}/json/version/", get(version))
        .route("/session/{cap}/json", get(list))
        .route("/session/{cap}/json/", get(list))
        .route("/session/{cap}/json/list", get(list))
        .route("/session/{cap}/json/list/", get(list))
        .route("/session/{cap}/json/protocol", get(protocol))
        .route("/session/{cap}/json/protocol/", get(protocol))
        .route("/session/{cap}/json/new", any(new_target))
        .route("/devtools/browser/{cap}", get(websocket))
        .route("/devtools/page/{cap}/{target}", get(page_websocket))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(ep.clone(), check_host))
        .with_state(ep)
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.into(),
    )
        .into_response()
}

async fn not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "chaperone: unknown URL; use the cdp_url or http_url the control API gave for your session\n",
    )
}

/// Chromium answers 500 to a Host that is neither an IP nor localhost: it stops DNS
/// rebinding from turning a web page into a DevTools client.
async fn check_host(State(ep): State<Endpoint>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_allowed(host, ep.public_host.as_deref()) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Host header is specified and is not an IP address or localhost.",
        );
    }
    next.run(req).await
}

/// Whether `host` (a Host header value, port included) may address this endpoint.
pub fn host_allowed(host: &str, public_host: Option<&str>) -> bool {
    if host.is_empty() {
        return true;
    }
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, _)) => return v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || public_host.is_some_and(|p| name.eq_ignore_ascii_case(p))
}

/// What the agent URL's query may carry. Anything else is refused: a resumed session's
/// state comes from the registry, never from the client (AG-374 4.1).
#[derive(Default)]
struct AgentQuery {
    ticket: Option<String>,
    continue_: bool,
    agent_key: Option<String>,
}

impl AgentQuery {
    fn parse(raw: Option<&str>) -> Result<Self, Box<Response>> {
        let mut q = AgentQuery::default();
        for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            match &*k {
                "ticket" if q.ticket.is_none() => q.ticket = Some(v.into_owned()),
                "continue" if v == "1" || v == "true" => q.continue_ = true,
                "agent_key" if q.agent_key.is_none() => q.agent_key = Some(v.into_owned()),
                other => {
                    return Err(Box::new(text(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "chaperone: query parameter `{other}` is not accepted here (known: ticket, continue=1, agent_key; each once); session state comes from the supervisor, never from the URL\n"
                        ),
                    )))
                }
            }
        }
        Ok(q)
    }

    /// The parameters echoed into URLs this endpoint hands out (`webSocketDebuggerUrl`).
    fn echo(&self) -> String {
        let mut out = url::form_urlencoded::Serializer::new(String::new());
        if let Some(t) = &self.ticket {
            out.append_pair("ticket", t);
        }
        if self.continue_ {
            out.append_pair("continue", "1");
        }
        if let Some(k) = &self.agent_key {
            out.append_pair("agent_key", k);
        }
        let q = out.finish();
        if q.is_empty() {
            q
        } else {
            format!("?{q}")
        }
    }
}

/// A request from an agent, admitted: the session, the identity it proved, its query.
struct Admitted {
    session: Arc<Session>,
    proven: crate::session::identity::Proven,
    query: AgentQuery,
    peer: Option<String>,
}

fn refused(r: crate::session::ResumeRefused) -> Box<Response> {
    Box::new(text(
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN),
        format!("{}\n", r.message),
    ))
}

/// Every request to a session's agent URLs passes here: the capability names a running
/// session, the query is one this endpoint knows, and the connection proves the session's
/// agent identity (agent key, client certificate).
async fn admit(
    ep: &Endpoint,
    cap: &str,
    raw_query: Option<&str>,
    headers: &axum::http::HeaderMap,
    peer: Option<&crate::tls::Peer>,
    path: &str,
) -> Result<Admitted, Box<Response>> {
    let s = ep.reg.by_capability(cap).ok_or_else(|| {
        Box::new(text(
            StatusCode::NOT_FOUND,
            "chaperone: no live session for this URL (wrong capability, or the session ended)\n",
        ))
    })?;
    if !s.is_running() {
        return Err(Box::new(text(
            StatusCode::GONE,
            format!("chaperone: session is {}\n", s.state().name()),
        )));
    }
    let query = AgentQuery::parse(raw_query)?;
    let peer_addr = peer.and_then(|p| p.addr).map(|a| a.to_string());
    let presented = crate::session::presented(
        headers,
        query.agent_key.as_deref(),
        peer.and_then(|p| p.cert_sha256.clone()),
    );
    let proven = ep
        .reg
        .authorize(&s, &presented, path, peer_addr.as_deref())
        .await
        .map_err(refused)?;
    s.touch();
    Ok(Admitted {
        session: s,
        proven,
        query,
        peer: peer_addr,
    })
}

/// [`admit`] for the `/json/*` requests: on a detached session the ticket is checked (not
/// used: the websocket upgrade uses it).
async fn admit_http(
    ep: &Endpoint,
    cap: &str,
    raw_query: Option<&str>,
    headers: &axum::http::HeaderMap,
    peer: Option<&crate::tls::Peer>,
    path: &str,
) -> Result<Admitted, Box<Response>> {
    let a = admit(ep, cap, raw_query, headers, peer, path).await?;
    if a.session.state() == SessionState::Detached {
        ep.reg
            .peek_resume(
                &a.session,
                a.query.ticket.as_deref(),
                &a.proven,
                path,
                a.peer.as_deref(),
            )
            .await
            .map_err(refused)?;
    }
    Ok(a)
}

fn ws_base(req_host: Option<&str>, ep: &Endpoint) -> String {
    let scheme = if ep.reg.urls().tls { "wss" } else { "ws" };
    let authority = req_host.unwrap_or(&ep.reg.urls().authority);
    format!("{scheme}://{authority}")
}

fn req_host(h: &axum::http::HeaderMap) -> Option<&str> {
    h.get(header::HOST).and_then(|v| v.to_str().ok())
}

async fn version(
    State(ep): State<Endpoint>,
    Path(cap): Path<String>,
    RawQuery(raw): RawQuery,
    peer: Option<Extension<crate::tls::Peer>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let a = match admit_http(
        &ep,
        &cap,
        raw.as_deref(),
        &headers,
        peer.as_deref(),
        "/json/version",
    )
    .await
    {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let s = a.session;
    let Some(b) = s.browser() else {
        return text(StatusCode::GONE, "chaperone: session has no browser\n");
    };
    let v = &b.version;
    let base = ws_base(req_host(&headers), &ep);
    Json(json!({
        "Browser": v.get("product"),
        "Protocol-Version": v.get("protocolVersion"),
        "User-Agent": v.get("userAgent"),
        "V8-Version": v.get("jsVersion"),
        "WebKit-Version": format!("537.36 (@{})", v.get("revision").and_then(Value::as_str).unwrap_or("")),
        "webSocketDebuggerUrl": format!("{base}/devtools/browser/{cap}{}", a.query.echo()),
    }))
    .into_response()
}

async fn list(
    State(ep): State<Endpoint>,
    Path(cap): Path<String>,
    RawQuery(raw): RawQuery,
    peer: Option<Extension<crate::tls::Peer>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let a = match admit_http(
        &ep,
        &cap,
        raw.as_deref(),
        &headers,
        peer.as_deref(),
        "/json/list",
    )
    .await
    {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let s = a.session;
    let echo = a.query.echo();
    let Some(b) = s.browser() else {
        return text(StatusCode::GONE, "chaperone: session has no browser\n");
    };
    let targets = match b.conn.execute(GetTargetsParams::default(), None).await {
        Ok(v) => serde_json::to_value(&v).unwrap_or_default(),
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("chaperone: {e}\n"),
            )
        }
    };
    let base = ws_base(req_host(&headers), &ep);
    let list: Vec<Value> = targets
        .get("targetInfos")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| t.get("type").and_then(Value::as_str) != Some("browser"))
        .map(|t| {
            let id = t.get("targetId").and_then(Value::as_str).unwrap_or("");
            json!({
                "description": "",
                "devtoolsFrontendUrl": "",
                "id": id,
                "title": t.get("title"),
                "type": t.get("type"),
                "url": t.get("url"),
                "webSocketDebuggerUrl": format!("{base}/devtools/page/{cap}/{id}{echo}"),
            })
        })
        .collect();
    Json(list).into_response()
}

async fn protocol(
    State(ep): State<Endpoint>,
    Path(cap): Path<String>,
    RawQuery(raw): RawQuery,
    peer: Option<Extension<crate::tls::Peer>>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(r) = admit_http(
        &ep,
        &cap,
        raw.as_deref(),
        &headers,
        peer.as_deref(),
        "/json/protocol",
    )
    .await
    {
        return *r;
    }
    let pak = crate::browser::protocol::pak_for(&ep.reg.config().browser.path);
    let loaded = ep
        .protocol
        .get_or_init(|| async move {
            tokio::task::spawn_blocking(move || crate::browser::protocol::read_protocol(&pak))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map(bytes::Bytes::from).map_err(|e| e.to_string()))
        })
        .await;
    match loaded {
        Ok(json) => (
            [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
            json.clone(),
        )
            .into_response(),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("chaperone: cannot read the protocol description: {e}\n"),
        ),
    }
}

async fn new_target(
    State(ep): State<Endpoint>,
    Path(cap): Path<String>,
    method: axum::http::Method,
    peer: Option<Extension<crate::tls::Peer>>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    // `/json/new?<url>`: the query is the page's URL, so the agent's own parameters cannot
    // ride on it; a detached session needs a resumed connection first.
    let s = match admit(&ep, &cap, None, &headers, peer.as_deref(), "/json/new").await {
        Ok(a) if a.session.state() == SessionState::Active => a.session,
        Ok(_) => {
            return text(
                StatusCode::CONFLICT,
                "chaperone: the session is detached; resume it over the websocket first\n",
            )
        }
        Err(r) => return *r,
    };
    if method != axum::http::Method::PUT {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "Using unsafe HTTP verb GET to invoke /json/new. This action supports only PUT verb.",
        );
    }
    let Some(b) = s.browser() else {
        return text(StatusCode::GONE, "chaperone: session has no browser\n");
    };
    let url = uri.query().unwrap_or("about:blank").to_string();
    if let Err(refusal) = super::policy::navigable(&url) {
        let message = refusal.message("/json/new");
        crate::gate::GateObserver::denied(
            &crate::gate::AuditGate::new(ep.reg.clone(), s.id.clone()),
            &s.mandate().source.agent,
            "/json/new",
            refusal.reason(),
        );
        return text(StatusCode::FORBIDDEN, format!("{message}\n"));
    }
    match b
        .conn
        .execute(CreateTargetParams::new(url.clone()), None)
        .await
    {
        Ok(v) => Json(json!({
            "description": "",
            "id": v.target_id.as_ref(),
            "title": "",
            "type": "page",
            "url": url,
        }))
        .into_response(),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("chaperone: {e}\n"),
        ),
    }
}

async fn websocket(
    State(ep): State<Endpoint>,
    Path(cap): Path<String>,
    RawQuery(raw): RawQuery,
    peer: Option<Extension<crate::tls::Peer>>,
    headers: axum::http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let peer = peer.map(|Extension(p)| p);
    upgrade_agent(ep, cap, None, raw, peer, headers, upgrade).await
}

/// A websocket bound to one page, as `/json/list` announces it: messages without `sessionId`
/// go to that page.
async fn page_websocket(
    State(ep): State<Endpoint>,
    Path((cap, target)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    peer: Option<Extension<crate::tls::Peer>>,
    headers: axum::http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let peer = peer.map(|Extension(p)| p);
    upgrade_agent(ep, cap, Some(target), raw, peer, headers, upgrade).await
}

/// Where an agent connection's CDP session comes from.
enum LinkSource {
    /// A fresh browser session.
    Fresh,
    /// A resumption: a fresh browser session, with the parked one's replay book.
    Reattach(Option<crate::browser::ParkedLink>),
    /// A resumption of the parked browser session itself.
    Continue(crate::browser::ParkedLink),
}

async fn upgrade_agent(
    ep: Endpoint,
    cap: String,
    page: Option<String>,
    raw: Option<String>,
    peer: Option<crate::tls::Peer>,
    headers: axum::http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Some(origin) = headers.get(header::ORIGIN) {
        ep.reg.metrics().cdp_denied.inc();
        let origin = origin.to_str().unwrap_or("?");
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "Rejected an incoming WebSocket connection from the {origin} origin. \
                 chaperone accepts agent connections only from programs (no Origin header)."
            ),
        );
    }
    let path = if page.is_some() {
        "/devtools/page"
    } else {
        "/devtools/browser"
    };
    let a = match admit(&ep, &cap, raw.as_deref(), &headers, peer.as_ref(), path).await {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let s = a.session.clone();
    let (guard, source) = if s.state() == SessionState::Detached {
        let mode = if a.query.continue_ {
            ResumeMode::Continue
        } else {
            ResumeMode::Reattach
        };
        if mode == ResumeMode::Continue && page.is_some() {
            return text(
                StatusCode::BAD_REQUEST,
                "chaperone: continue=1 resumes the browser-level connection (/devtools/browser/…) only\n",
            );
        }
        match ep
            .reg
            .resume(
                &s,
                a.query.ticket.as_deref(),
                &a.proven,
                mode,
                path,
                a.peer.as_deref(),
            )
            .await
        {
            Ok(r) => {
                let source = match (r.mode, r.parked) {
                    (ResumeMode::Continue, Some(p)) => LinkSource::Continue(p),
                    (_, p) => LinkSource::Reattach(p),
                };
                (r.guard, source)
            }
            Err(r) => return *refused(r),
        }
    } else {
        match ep.reg.admit(&s, path, a.peer.as_deref()).await {
            Ok(g) => (g, LinkSource::Fresh),
            Err(r) => return *refused(r),
        }
    };
    // tungstenite may buffer a little more than our own limit so that an oversized message
    // is answered with a close frame that says why, instead of a dropped connection.
    let hard = ep.max_message.saturating_mul(2);
    let conn = Conn {
        reg: ep.reg.clone(),
        session: s,
        max_message: ep.max_message,
        resume_buffer: ep.resume_buffer,
        ping_every: ep.ping_every,
        page,
        proven: a.proven,
    };
    upgrade
        .max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| agent_connection(socket, conn, guard, source))
}

/// One admitted agent connection.
struct Conn {
    reg: Arc<Registry>,
    session: Arc<Session>,
    max_message: usize,
    resume_buffer: usize,
    ping_every: std::time::Duration,
    page: Option<String>,
    proven: crate::session::identity::Proven,
}

/// How an agent connection ended, and what becomes of its browser session.
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    /// The client went away: keep its browser session for a resumption.
    Park,
    /// The connection was closed on purpose (`Browser.close`, a limit, a page websocket):
    /// detach its browser session.
    Detach,
    /// The session or the browser is gone.
    Nothing,
}

async fn agent_connection(
    socket: WebSocket,
    conn: Conn,
    mut guard: crate::session::AgentGuard,
    source: LinkSource,
) {
    let Conn {
        reg,
        session,
        max_message,
        resume_buffer,
        ping_every,
        page,
        proven,
    } = conn;
    let Some(browser) = session.browser() else {
        return;
    };
    let metrics = reg.metrics().clone();
    metrics.agent_connections.inc();
    let (mut tx, mut rx) = socket.split();
    let observer = Arc::new(crate::gate::AuditGate::new(reg.clone(), session.id.clone()));
    let agent = session.mandate().source.agent.clone();
    let link = match source {
        LinkSource::Continue(parked) => Ok(parked.resume()),
        LinkSource::Fresh => browser.agent_link(&agent, observer).await,
        LinkSource::Reattach(parked) => {
            let link = browser.agent_link(&agent, observer).await;
            match (&link, parked) {
                (Ok(l), Some(p)) => p.drain_into(l),
                // Kept for the next attempt: its in-flight answers are not lost with this one.
                (Err(_), Some(p)) => session.park(p),
                (_, None) => {}
            }
            link
        }
    };
    let link = match link {
        Ok(l) => l,
        Err(e) => {
            let _ = tx
                .send(close(
                    1011,
                    &format!("chaperone: cannot attach to the browser: {e}"),
                ))
                .await;
            metrics.agent_connections.dec();
            return;
        }
    };
    let page = match page {
        None => None,
        Some(target) => match PageBinding::attach(&link, &target).await {
            Ok(p) => Some(p),
            Err(reason) => {
                let _ = tx.send(close(1011, &reason)).await;
                metrics.agent_connections.dec();
                return;
            }
        },
    };
    // What the agent sent that chaperone answers itself (`Chaperone.*`), answered in order.
    let (local_tx, mut local_rx) = tokio::sync::mpsc::unbounded_channel();
    let from_agent = |frame: &str| {
        let call = match page.as_ref() {
            None => link.from_agent(frame),
            Some(p) => link.from_agent(&p.inbound(frame)),
        };
        if let Some(call) = call {
            let _ = local_tx.send(call);
        }
    };
    let mut after = After::Park;
    let mut close_info = json!({"by": "client"});
    // A network that drops silently (no FIN, no RST) shows only as silence: pings make every
    // live client answer, so three intervals without a frame mean the connection is gone.
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = std::time::Instant::now();
    loop {
        tokio::select! {
            // The session's end is checked first: it is signalled before the browser is
            // killed, so the agent learns the real reason, not just that the browser went away.
            biased;
            _ = session.ending.cancelled() => {
                let reason = session.state().end_reason().map_or("chaperone: session ended", |r| r.close_reason());
                let _ = tx.send(close(1001, reason)).await;
                after = After::Nothing;
                break;
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= ping_every * 3 {
                    close_info = json!({"by": "network", "error": format!("no frame, not even a Pong, for {} s", last_heard.elapsed().as_secs())});
                    break;
                }
                if tx.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                    close_info = json!({"by": "network", "error": "send failed"});
                    break;
                }
            }
            Some(call) = local_rx.recv() => {
                let answer = local_call(&reg, &session, &proven, &link, &call).await;
                link.answer_local(&call, answer);
            }
            out = link.next_for_agent() => match out {
                Some(ToAgent::Text(t)) => {
                    let t = match page.as_ref() {
                        None => t,
                        Some(p) => match p.outbound(t) {
                            PageOut::Send(t) => t,
                            PageOut::Skip => continue,
                            PageOut::Closed => {
                                let _ = tx.send(close(1000, "chaperone: the page was closed")).await;
                                after = After::Detach;
                                break;
                            }
                        },
                    };
                    if tx.send(Message::Text(t.into())).await.is_err() {
                        close_info = json!({"by": "network", "error": "send failed"});
                        break;
                    }
                }
                Some(ToAgent::Close { code, reason }) => {
                    let _ = tx.send(close(code, &reason)).await;
                    after = After::Detach;
                    break;
                }
                None => {
                    let _ = tx.send(close(1011, "chaperone: browser connection lost")).await;
                    after = After::Nothing;
                    break;
                }
            },
            msg = rx.next() => {
                last_heard = std::time::Instant::now();
                match msg {
                    Some(Ok(Message::Text(t))) => {
                        session.touch();
                        if t.len() > max_message {
                            let _ = tx.send(close(1009, &format!("chaperone: message of {} bytes exceeds limits.max_agent_message ({max_message} bytes)", t.len()))).await;
                            after = After::Detach;
                            break;
                        }
                        from_agent(t.as_str());
                    }
                    Some(Ok(Message::Binary(b))) => {
                        session.touch();
                        if b.len() > max_message {
                            let _ = tx.send(close(1009, &format!("chaperone: message of {} bytes exceeds limits.max_agent_message ({max_message} bytes)", b.len()))).await;
                            after = After::Detach;
                            break;
                        }
                        // Chromium treats binary frames as text; so do we, invalid UTF-8 included
                        // (the router answers it as a parse error).
                        from_agent(&String::from_utf8_lossy(&b));
                    }
                    Some(Ok(Message::Close(frame))) => {
                        close_info = json!({"by": "client", "code": frame.map(|f| f.code)});
                        break;
                    }
                    None => {
                        close_info = json!({"by": "network"});
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        let _ = tx.send(close(1002, &format!("chaperone: websocket error: {e}"))).await;
                        close_info = json!({"by": "network", "error": e.to_string()});
                        break;
                    }
                }
            }
        }
    }
    if let Some(r) = link.reconciliation() {
        reg.audit()
            .record_detached("session.reconciled", Some(&session.id), r);
    }
    // A page websocket is a view of one page; only the browser-level connection is kept.
    // Only the last connection is kept: a resumption happens only once the session is
    // detached, and while others stay connected nothing would ever take a kept one up.
    if after == After::Park && (page.is_some() || session.mandate().source.revoke_on_disconnect) {
        after = After::Detach;
    }
    match after {
        After::Park => match link.park(resume_buffer) {
            Ok(parked) => {
                close_info["parked"] = json!(parked.summary());
                // Kept only if this turns out to be the session's last connection (the
                // guard's drop decides, under the admission lock).
                guard.set_parked(parked.id().get());
                session.park(parked);
            }
            Err(link) => {
                if let Err(e) = link.detach().await {
                    tracing::debug!(error = %e, "agent detach");
                }
            }
        },
        After::Detach => {
            if let Err(e) = link.detach().await {
                tracing::debug!(error = %e, "agent detach");
            }
        }
        After::Nothing => {}
    }
    guard.set_close(close_info);
    drop(guard);
    metrics.agent_connections.dec();
}

/// Answers a `Chaperone.*` command.
async fn local_call(
    reg: &Arc<Registry>,
    session: &Arc<Session>,
    proven: &crate::session::identity::Proven,
    link: &crate::browser::AgentLink,
    call: &crate::browser::LocalCall,
) -> Result<Value, String> {
    match call.method.as_str() {
        "Chaperone.getResumeTicket" => {
            let t = reg
                .issue_ticket(session, Some(proven), Some(link.id().get()), "cdp")
                .await
                .map_err(|e| format!("chaperone: cannot issue a resume ticket: {e}"))?;
            let q = t.query();
            let urls = reg.urls();
            let cdp = urls.cdp_url(&session.capability);
            let m = session.mandate();
            Ok(json!({
                "ticket": t.ticket,
                "seq": t.seq,
                "expiresAt": crate::session::rfc3339(t.expires_at),
                "validSecsAfterDisconnect": t.valid_after_disconnect.as_secs(),
                "resumeWindowSecs": m.resume.window.as_secs(),
                "resumeUrl": format!("{cdp}?{q}"),
                "continueUrl": format!("{cdp}?{q}&continue=1"),
                "httpUrl": format!("{}?{q}", urls.http_url(&session.capability)),
            }))
        }
        other => Err(format!("'{other}' wasn't found")),
    }
}

/// Id of the supervisor's own `Target.attachToTarget` on a page websocket; its answer is
/// consumed here and never reaches the agent.
const PAGE_ATTACH_ID: i64 = 2_147_483_647;

/// Turns an agent link into a page-level connection: the page's flat session is attached
/// through the agent's own browser session, frames without `sessionId` are sent to it, and
/// its messages reach the agent without `sessionId`, as on Chromium's `/devtools/page/<id>`.
struct PageBinding {
    session: String,
}

enum PageOut {
    Send(String),
    Skip,
    Closed,
}

impl PageBinding {
    async fn attach(link: &crate::browser::AgentLink, target: &str) -> Result<Self, String> {
        link.from_agent(
            &json!({
                "id": PAGE_ATTACH_ID,
                "method": "Target.attachToTarget",
                "params": {"targetId": target, "flatten": true},
            })
            .to_string(),
        );
        loop {
            match link.next_for_agent().await {
                Some(ToAgent::Text(t)) => {
                    let Ok(v) = serde_json::from_str::<Value>(&t) else {
                        continue;
                    };
                    if v.get("id").and_then(Value::as_i64) != Some(PAGE_ATTACH_ID) {
                        continue;
                    }
                    return match v.pointer("/result/sessionId").and_then(Value::as_str) {
                        Some(s) => Ok(PageBinding {
                            session: s.to_string(),
                        }),
                        None => Err(format!(
                            "chaperone: no page {target} in this session: {}",
                            v.pointer("/error/message")
                                .and_then(Value::as_str)
                                .unwrap_or("attach failed")
                        )),
                    };
                }
                Some(ToAgent::Close { reason, .. }) => return Err(reason),
                None => return Err("chaperone: browser connection lost".into()),
            }
        }
    }

    fn inbound(&self, frame: &str) -> String {
        match serde_json::from_str::<Value>(frame) {
            Ok(Value::Object(mut m)) if !m.contains_key("sessionId") => {
                m.insert("sessionId".into(), Value::String(self.session.clone()));
                Value::Object(m).to_string()
            }
            // Anything else goes as it came: the router answers bad frames itself.
            _ => frame.to_string(),
        }
    }

    fn outbound(&self, frame: String) -> PageOut {
        let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(&frame) else {
            return PageOut::Send(frame);
        };
        match m.get("sessionId").and_then(Value::as_str) {
            Some(s) if s == self.session => {
                m.remove("sessionId");
                PageOut::Send(Value::Object(m).to_string())
            }
            Some(_) => PageOut::Send(frame),
            None => {
                let detached = m.get("method").and_then(Value::as_str)
                    == Some("Target.detachedFromTarget")
                    && m.get("params")
                        .and_then(|p| p.get("sessionId"))
                        .and_then(Value::as_str)
                        == Some(self.session.as_str());
                if detached {
                    PageOut::Closed
                } else {
                    // Browser-level traffic of the link's own session is not this client's.
                    PageOut::Skip
                }
            }
        }
    }
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: crate::browser::conn::close_reason(reason).into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn host_rules_match_chromium() {
        for ok in [
            "127.0.0.1:9222",
            "localhost:9222",
            "LOCALHOST",
            "[::1]:9222",
            "10.0.0.5",
            "",
        ] {
            assert!(host_allowed(ok, None), "{ok}");
        }
        for bad in [
            "evil.example:9222",
            "127.0.0.1.nip.io:80",
            "[::1",
            "localhost.evil",
        ] {
            assert!(!host_allowed(bad, None), "{bad}");
        }
        assert!(host_allowed(
            "agents.internal:9222",
            Some("agents.internal")
        ));
    }
}
