//! The operator API: JSON over HTTP/1.1 on a Unix socket (default) or TCP with a token.
//!
//! `POST /v1/sessions` (body: a mandate) → 201 with `id`, `state`, `cdp_url`, `http_url`,
//! `expires_at`; `GET /v1/sessions`; `GET /v1/sessions/{id}`; `PATCH /v1/sessions/{id}`
//! (change the live mandate, see [`crate::session::patch`]); `DELETE /v1/sessions/{id}`
//! (revoke, answers once purged); `POST /v1/sessions/{id}/resume-ticket` (a resume ticket for
//! a dropped agent); `GET /v1/sessions/{id}/posture` (check the session's integrity now);
//! `POST|GET /v1/agent-keys`, `DELETE /v1/agent-keys/{id}` (agent keys; revoking one ends its
//! sessions); `GET /v1/approvals[?session=ID]` (requests held for a human),
//! `GET /v1/approvals/{id}` (one, with its whole body),
//! `POST /v1/approvals/{id}` `{"decision": "approve"|"deny", "by": NAME}` (decide one);
//! `GET /v1/audit?session=ID[&event=PREFIX]` (the session's audit records); `GET /healthz`;
//! `GET /metrics`. Errors are
//! `{"error": "<what and which field>"}` with a 4xx/5xx status; bad input launches nothing.
//!
//! A decision a person claims (`by` on an approval, `approved_by` on a widening) is recorded
//! with the [`Caller`] the kernel reports for the connection that carried it, so the audit log
//! holds who sent it as well as whom it names.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use serde_json::json;
use time::OffsetDateTime;

use crate::mandate::Mandate;
use crate::session::{Registry, RegistryError};

#[derive(Clone)]
struct Ctl {
    reg: Arc<Registry>,
    token: Option<Arc<str>>,
}

/// The control API's routes. With `token`, every request must carry
/// `Authorization: Bearer <token>`.
pub fn router(reg: Arc<Registry>, token: Option<String>) -> Router {
    let ctl = Ctl {
        reg,
        token: token.map(Arc::from),
    };
    Router::new()
        .route("/v1/sessions", get(list).post(create))
        .route("/v1/sessions/{id}", get(show).delete(revoke).patch(change))
        .route("/v1/sessions/{id}/resume-ticket", post(resume_ticket))
        .route("/v1/sessions/{id}/posture", get(posture))
        .route("/v1/agent-keys", get(list_keys).post(issue_key))
        .route("/v1/agent-keys/{id}", axum::routing::delete(revoke_key))
        .route("/v1/approvals", get(list_approvals))
        .route(
            "/v1/approvals/{id}",
            get(show_approval).post(decide_approval),
        )
        .route("/v1/audit", get(audit))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint; see /v1/sessions") })
        .layer(axum::middleware::from_fn_with_state(ctl.clone(), auth))
        .with_state(ctl)
}

/// Who is at the other end of a control connection, as the kernel reports it rather than as the
/// caller claims: on the Unix socket the peer's credentials (`SO_PEERCRED`), over TCP its
/// address (every TCP caller has shown the operator token when one is configured). Serve the
/// router with `into_make_service_with_connect_info::<Caller>()`.
#[derive(Clone, Debug)]
pub enum Caller {
    /// `None` when the kernel would not say (it always does on Linux).
    Unix {
        uid: Option<u32>,
        pid: Option<i32>,
    },
    Tcp {
        addr: std::net::SocketAddr,
    },
}

impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(c) => Caller::Unix {
                uid: Some(c.uid()),
                // 0 when the peer sits in a PID namespace this one cannot see into.
                pid: c.pid().filter(|p| *p > 0),
            },
            Err(e) => {
                tracing::warn!(error = %e, "control socket: the peer's credentials are unknown");
                Caller::Unix {
                    uid: None,
                    pid: None,
                }
            }
        }
    }
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Caller::Tcp {
            addr: *stream.remote_addr(),
        }
    }
}

impl Caller {
    /// `{"transport": "unix", "uid", "user", "pid"}` or `{"transport": "tcp", "addr", "token"}`.
    fn to_json(&self, token: bool) -> serde_json::Value {
        match self {
            Caller::Unix { uid, pid } => {
                let user = uid.and_then(|u| {
                    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(u))
                        .ok()
                        .flatten()
                        .map(|u| u.name)
                });
                json!({"transport": "unix", "uid": uid, "user": user, "pid": pid})
            }
            Caller::Tcp { addr } => {
                json!({"transport": "tcp", "addr": addr.to_string(), "token": token})
            }
        }
    }
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": msg.to_string() }))).into_response()
}

async fn auth(State(ctl): State<Ctl>, req: Request, next: Next) -> Response {
    if let Some(token) = &ctl.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "authorization: send `Authorization: Bearer <operator token>`",
            );
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    // Comparing digests keeps the time independent of where the inputs differ and of the
    // secret's length.
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

fn registry_error(e: RegistryError) -> Response {
    let status = match e {
        RegistryError::Full(_) | RegistryError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
        RegistryError::NotNow(_) | RegistryError::NotActive(..) => StatusCode::CONFLICT,
        RegistryError::Patch(crate::session::patch::PatchError::NeedsApproval(_)) => {
            StatusCode::FORBIDDEN
        }
        RegistryError::Patch(_) | RegistryError::Identity(_) => StatusCode::BAD_REQUEST,
        RegistryError::AgentKey(crate::session::identity::KeyError::NotFound(_)) => {
            StatusCode::NOT_FOUND
        }
        RegistryError::AgentKey(_) => StatusCode::BAD_REQUEST,
        RegistryError::Launch(_) | RegistryError::Audit(_) | RegistryError::PurgeFailed(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    error(status, e)
}

async fn create(State(ctl): State<Ctl>, req: Request<Body>) -> Response {
    let limit = ctl.reg.config().limits.max_mandate_bytes;
    let bytes = match axum::body::to_bytes(req.into_body(), limit).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("mandate: larger than limits.max_mandate_bytes ({limit} bytes)"),
            )
        }
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return error(StatusCode::BAD_REQUEST, "mandate: body is not UTF-8 JSON");
    };
    let max_ttl = ctl.reg.config().limits.max_ttl.as_secs();
    let mandate = match Mandate::from_json(text)
        .and_then(|m| m.validate(OffsetDateTime::now_utc(), max_ttl))
    {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("mandate.{e}")),
    };
    match ctl.reg.create(mandate).await {
        Ok(s) => (StatusCode::CREATED, Json(s.view(ctl.reg.urls()))).into_response(),
        Err(e) => registry_error(e),
    }
}

async fn change(
    State(ctl): State<Ctl>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Path(id): Path<String>,
    req: Request<Body>,
) -> Response {
    let limit = ctl.reg.config().limits.max_mandate_bytes;
    let Ok(bytes) = axum::body::to_bytes(req.into_body(), limit).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("change: larger than limits.max_mandate_bytes ({limit} bytes)"),
        );
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return error(StatusCode::BAD_REQUEST, "change: body is not UTF-8 JSON");
    };
    let caller = caller.to_json(ctl.token.is_some());
    match ctl.reg.change(&id, text, caller).await {
        Ok(changed) => {
            let mut view = changed.session.view(ctl.reg.urls());
            view["changes"] = changed.changes.iter().map(|c| c.to_json()).collect();
            view["revoked_upstream"] = changed.revoked_upstream.into();
            Json(view).into_response()
        }
        Err(e) => registry_error(e),
    }
}

async fn list(State(ctl): State<Ctl>) -> Response {
    let v: Vec<_> = ctl
        .reg
        .list()
        .iter()
        .map(|s| s.view(ctl.reg.urls()))
        .collect();
    Json(json!({ "sessions": v })).into_response()
}

async fn show(State(ctl): State<Ctl>, Path(id): Path<String>) -> Response {
    match ctl.reg.get(&id) {
        Some(s) => Json(s.view(ctl.reg.urls())).into_response(),
        None => registry_error(RegistryError::NotFound(id)),
    }
}

async fn revoke(State(ctl): State<Ctl>, Path(id): Path<String>) -> Response {
    match ctl.reg.revoke(&id).await {
        Ok(s) => Json(s.view(ctl.reg.urls())).into_response(),
        Err(e) => registry_error(e),
    }
}

/// `GET /v1/sessions/{id}/posture`: checks the session's posture now (see
/// [`crate::session::posture`]) and answers `{"session", "checked_at", "ok", "processes",
/// "took_ms", "drift": [{"check", "pid", "command", "detail"}]}`. Drift found here revokes the
/// session as a periodic check would. `404` unknown session, `409` not active or detached.
async fn posture(State(ctl): State<Ctl>, Path(id): Path<String>) -> Response {
    let Some(s) = ctl.reg.get(&id) else {
        return registry_error(RegistryError::NotFound(id));
    };
    match ctl.reg.check_posture(&s).await {
        Ok(report) => Json(report.to_json(&s.id)).into_response(),
        Err(e @ crate::session::posture::PostureError::NotLive(..)) => {
            error(StatusCode::CONFLICT, e)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `POST /v1/sessions/{id}/resume-ticket`: a resume ticket for the session's agent, issued by
/// an operator (e.g. for an agent that restarted and lost its own). 201 with the ticket and
/// the agent URLs that carry it.
async fn resume_ticket(State(ctl): State<Ctl>, Path(id): Path<String>) -> Response {
    let Some(s) = ctl.reg.get(&id) else {
        return registry_error(RegistryError::NotFound(id));
    };
    if !s.is_running() {
        return error(
            StatusCode::CONFLICT,
            format!(
                "session `{id}` is {}; tickets are issued for active or detached sessions",
                s.state().name()
            ),
        );
    }
    match ctl.reg.issue_ticket(&s, None, None, "control").await {
        Ok(t) => {
            let q = t.query();
            let urls = ctl.reg.urls();
            (
                StatusCode::CREATED,
                Json(json!({
                    "session": s.id,
                    "ticket": t.ticket,
                    "seq": t.seq,
                    "expires_at": crate::session::rfc3339(t.expires_at),
                    "valid_secs_after_disconnect": t.valid_after_disconnect.as_secs(),
                    "cdp_url": format!("{}?{q}", urls.cdp_url(&s.capability)),
                    "http_url": format!("{}?{q}", urls.http_url(&s.capability)),
                })),
            )
                .into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("resume ticket: {e}"),
        ),
    }
}

/// `GET /v1/approvals[?session=ID]`: `{"approvals": [...]}`, the requests held for a human
/// now, oldest first.
async fn list_approvals(State(ctl): State<Ctl>, RawQuery(q): RawQuery) -> Response {
    let mut session = None;
    for (k, v) in url::form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "session" => session = Some(v.into_owned()),
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{other}: unknown query parameter; only `session` filters approvals"),
                )
            }
        }
    }
    let list = ctl.reg.approvals().list(session.as_deref());
    Json(json!({ "approvals": list })).into_response()
}

/// `GET /v1/approvals/{id}`: one pending approval as the list shows it, but with up to 64 KiB
/// of its URL and its whole body (up to 4096 fields or 64 KiB of text), held values cut out.
/// `404` unknown, `409` settled (saying how).
async fn show_approval(State(ctl): State<Ctl>, Path(id): Path<String>) -> Response {
    match ctl.reg.approvals().show(&id) {
        Ok(v) => Json(v).into_response(),
        Err(e @ crate::approvals::NotPending::Unknown(_)) => error(StatusCode::NOT_FOUND, e),
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

/// `POST /v1/approvals/{id}` `{"decision": "approve" | "deny", "by": "<name>"}`: decides a held
/// request. The decision is recorded (`action.approved` / `action.denied`, durable) before the
/// request is released or failed; if it cannot be recorded the request stays held (503).
async fn decide_approval(
    State(ctl): State<Ctl>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Decision {
        decision: String,
        by: String,
    }
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let d: Decision = match serde_path_to_error::deserialize(de) {
        Ok(d) => d,
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." {
                "body".to_string()
            } else {
                path
            };
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "{field}: {}; send {{\"decision\": \"approve\" | \"deny\", \"by\": \"<name>\"}}",
                    e.into_inner()
                ),
            );
        }
    };
    let Some(by) = crate::approvals::person(&d.by) else {
        return error(
            StatusCode::BAD_REQUEST,
            "by: must name who decides: 1 to 128 characters, no control characters",
        );
    };
    let verdict = match d.decision.as_str() {
        "approve" => crate::approvals::Verdict::Approved { by: by.clone() },
        "deny" => crate::approvals::Verdict::Denied { by: by.clone() },
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("decision: `{other}` is neither \"approve\" nor \"deny\""),
            )
        }
    };
    // On its own task: a client that goes away while the decision is recorded must not
    // leave it half applied (recorded, but its request neither sent nor failed).
    let reg = ctl.reg.clone();
    let decided = Decided {
        verdict,
        by,
        caller: caller.to_json(ctl.token.is_some()),
        decision: d.decision,
    };
    tokio::spawn(apply_decision(reg, id, decided))
        .await
        .unwrap_or_else(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("deciding the approval failed: {e}"),
            )
        })
}

/// A person's decision on a held request, and the connection that carried it.
struct Decided {
    verdict: crate::approvals::Verdict,
    by: String,
    caller: serde_json::Value,
    decision: String,
}

/// Takes approval `id` off the pending list, records the decision durably, then delivers it.
async fn apply_decision(reg: Arc<Registry>, id: String, decided: Decided) -> Response {
    let Decided {
        verdict,
        by,
        caller,
        decision,
    } = decided;
    let approvals = reg.approvals();
    let taken = match approvals.take(&id) {
        Ok(t) => t,
        Err(e @ crate::approvals::NotPending::Unknown(_)) => {
            return error(StatusCode::NOT_FOUND, e)
        }
        Err(e) => return error(StatusCode::CONFLICT, e),
    };
    let view = taken.view().clone();
    let event = match verdict {
        crate::approvals::Verdict::Approved { .. } => "action.approved",
        crate::approvals::Verdict::Denied { .. } => "action.denied",
    };
    let recorded = reg
        .audit()
        .record(
            event,
            Some(&view.session),
            json!({"approval": view.id, "by": by, "caller": caller, "decided_by": "human",
                   "method": view.method, "url": view.url, "rule": view.rule}),
        )
        .await;
    if let Err(e) = recorded {
        approvals.put_back(taken);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("audit log: {e}; the decision was not applied and the request is still held"),
        );
    }
    let delivered = approvals.settle(taken, verdict);
    if !delivered {
        return error(
            StatusCode::CONFLICT,
            format!("approval `{id}`: its session ended before the decision arrived"),
        );
    }
    Json(json!({"approval": view, "decision": decision, "by": by, "caller": caller}))
        .into_response()
}

/// `POST /v1/agent-keys` `{"label": "…"}`: 201 with `id`, `label`, `created_at` and `key`, the
/// only time the key is shown.
async fn issue_key(State(ctl): State<Ctl>, body: axum::body::Bytes) -> Response {
    let label = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) => match v.get("label").and_then(|l| l.as_str()) {
            Some(l) => l.to_string(),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "label: required, a string naming the agent",
                )
            }
        },
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body: expected a JSON object: {e}"),
            )
        }
    };
    match ctl.reg.agent_keys().issue(&label) {
        Ok((info, key)) => {
            let recorded = ctl
                .reg
                .audit()
                .record(
                    "agent_key.issued",
                    None,
                    json!({"agent_key": info.id, "label": info.label}),
                )
                .await;
            if let Err(e) = recorded {
                // A key that is not in the audit log is not handed out.
                let _ = ctl.reg.agent_keys().revoke(&info.id);
                return error(StatusCode::INTERNAL_SERVER_ERROR, format!("audit log: {e}"));
            }
            let mut v = json!(info);
            v["key"] = key.into();
            (StatusCode::CREATED, Json(v)).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// `GET /v1/agent-keys`: `{"keys": [...]}`, never the keys themselves.
async fn list_keys(State(ctl): State<Ctl>) -> Response {
    Json(json!({ "keys": ctl.reg.agent_keys().list() })).into_response()
}

/// `DELETE /v1/agent-keys/{id}`: revokes the key and ends (purges) every session bound to it
/// before answering.
async fn revoke_key(State(ctl): State<Ctl>, Path(id): Path<String>) -> Response {
    match ctl.reg.revoke_agent_key(&id).await {
        Ok(info) => Json(json!(info)).into_response(),
        Err(e) => registry_error(e),
    }
}

/// `GET /v1/audit?session=ID[&event=PREFIX]`: `{"records": [...]}`, oldest first, across
/// rotated files.
async fn audit(State(ctl): State<Ctl>, RawQuery(query): RawQuery) -> Response {
    let mut q = crate::audit::AuditQuery::default();
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "session" => q.session = v.into_owned(),
            "event" => q.event_prefix = Some(v.into_owned()),
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{other}: unknown query parameter (known: session, event)"),
                )
            }
        }
    }
    if q.session.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "session: query parameter required, e.g. /v1/audit?session=ID",
        );
    }
    match ctl.reg.audit().query(q).await {
        Ok(records) => Json(json!({ "records": records })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn healthz(State(ctl): State<Ctl>) -> Response {
    let live = ctl
        .reg
        .list()
        .iter()
        .filter(|s| s.state().end_reason().is_none())
        .count();
    Json(json!({ "status": "ok", "sessions_live": live })).into_response()
}

async fn metrics(State(ctl): State<Ctl>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ctl.reg.metrics().render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
