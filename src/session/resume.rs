//! Session resumption (AG-374): who may connect, resume tickets, and re-attaching a dropped
//! agent to its detached session under the mandate as it stands now.
//!
//! Everything about a resumed session comes from this registry: the ticket only names a
//! session, an identity, a connection and a freshness value, each checked against what the
//! registry itself recorded. Every attempt is audited with the AG-374 4.7 fields.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use time::OffsetDateTime;

use super::identity::{Presented, Proven};
use super::store::Op;
use super::ticket::{self, Claims, Refusal};
use super::{rfc3339, AgentGuard, EndReason, ParkedLink, Registry, Session, State};

/// How a resumed connection continues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeMode {
    /// A fresh browser session for the agent (what Playwright, Puppeteer and chromiumoxide
    /// need: they start a new conversation on every connect). Answers to commands that were in
    /// flight are replayed to an identical re-send.
    Reattach,
    /// The same browser session, sessions and aliases as before the drop, with the events
    /// buffered during the gap (`continue=1`, for agents that keep their own state).
    Continue,
}

impl ResumeMode {
    fn name(self) -> &'static str {
        match self {
            ResumeMode::Reattach => "reattach",
            ResumeMode::Continue => "continue",
        }
    }
}

/// A refused connection or resumption: the HTTP status, the audit reason and the message the
/// agent reads.
#[derive(Debug)]
pub struct ResumeRefused {
    /// 401, 403, 409, 410 or 503.
    pub status: u16,
    /// The audit record's `reason`.
    pub reason: &'static str,
    /// What the agent reads.
    pub message: String,
}

impl ResumeRefused {
    fn new(status: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ResumeRefused {
            status,
            reason,
            message: message.into(),
        }
    }
}

/// An admitted resumption.
pub struct Resumed {
    /// Counts the resumed connection.
    pub guard: AgentGuard,
    /// The parked CDP session to continue (continue mode) or to drain (reattach mode).
    pub parked: Option<ParkedLink>,
    /// The mode asked for.
    pub mode: ResumeMode,
}

/// A ticket as handed out.
#[derive(Debug)]
pub struct IssuedTicket {
    /// The ticket itself (a bearer credential: never logged).
    pub ticket: String,
    /// Its sequence number.
    pub seq: u64,
    /// Its hard expiry (the session's deadline).
    pub expires_at: OffsetDateTime,
    /// How long it stays valid after the connection drops.
    pub valid_after_disconnect: Duration,
}

impl IssuedTicket {
    /// The query string that presents it: `ticket=…`, for the agent URLs handed out with it.
    pub fn query(&self) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("ticket", &self.ticket)
            .finish()
    }
}

fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn at(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t).map_or_else(|_| t.to_string(), rfc3339)
}

impl Registry {
    fn identity_fp(&self, s: &Session, proven: &Proven, any_cert: bool) -> String {
        if s.mandate().source.identity.is_none() {
            return "none".into();
        }
        self.fingerprints
            .fingerprint(format!("{}|{}", s.id, proven.binding(any_cert)).as_bytes())
    }

    /// Checks what a request to the session's agent endpoint presented against the session's
    /// identity. A refusal is audited (`agent.refused`) and counts toward the anomaly
    /// threshold.
    pub async fn authorize(
        &self,
        s: &Session,
        presented: &Presented,
        path: &str,
        peer: Option<&str>,
    ) -> Result<Proven, ResumeRefused> {
        let identity = s.mandate().source.identity.clone();
        let e = match super::identity::check(identity.as_ref(), presented, &self.keys) {
            Ok(p) => return Ok(p),
            Err(e) => e,
        };
        let r = ResumeRefused::new(403, e.code(), format!("chaperone: {e}"));
        self.record_agent_refused(s, &r, path, peer).await;
        s.refused("agent.refused");
        Err(r)
    }

    /// Admits a new agent connection to an active session, if `max_agent_connections` leaves
    /// room (a detached session is admitted only through [`Registry::resume`]). A refusal is
    /// audited (`agent.refused`, `connection_limit`) but not counted as an anomaly: a second
    /// client of the same agent is no attack.
    pub async fn admit(
        &self,
        s: &Arc<Session>,
        path: &str,
        peer: Option<&str>,
    ) -> Result<AgentGuard, ResumeRefused> {
        if let Some(g) = s.admit(&self.audit, &self.store, State::Active) {
            return Ok(g);
        }
        let max = s.mandate().resume.max_connections;
        let r = ResumeRefused::new(
            409,
            "connection_limit",
            format!(
                "chaperone: the session already has {max} live agent connection(s) (mandate.max_agent_connections = {max})"
            ),
        );
        self.record_agent_refused(s, &r, path, peer).await;
        Err(r)
    }

    /// `agent.refused`, durable before the refusal is answered: nothing an attacker tries
    /// goes unrecorded.
    async fn record_agent_refused(
        &self,
        s: &Session,
        r: &ResumeRefused,
        path: &str,
        peer: Option<&str>,
    ) {
        let m = s.mandate();
        let recorded = self
            .audit
            .record(
                "agent.refused",
                Some(&s.id),
                json!({
                    "agent": m.source.agent,
                    "reason": r.reason,
                    "message": r.message,
                    "path": path,
                    "peer": peer,
                    "state": s.state().name(),
                    "max_agent_connections": m.resume.max_connections,
                }),
            )
            .await;
        if let Err(err) = recorded {
            tracing::error!(error = %err, "could not record agent.refused");
        }
    }

    /// Issues a resume ticket for `s`: to the agent connection `link` that proved `proven`
    /// (`Chaperone.getResumeTicket`), or to an operator (`link` and `proven` `None`). The
    /// issue is recorded in the registry store and audited before the ticket is returned.
    pub async fn issue_ticket(
        &self,
        s: &Session,
        proven: Option<&Proven>,
        link: Option<u64>,
        via: &'static str,
    ) -> Result<IssuedTicket, String> {
        if !s.is_running() {
            return Err(format!("session is {}", s.state().name()));
        }
        let m = s.mandate();
        let now = OffsetDateTime::now_utc();
        let idf = match proven {
            Some(p) => self.identity_fp(s, p, false),
            None => {
                let key = m.source.identity.as_ref().and_then(|i| i.agent_key.clone());
                let p = Proven {
                    agent_key: key,
                    cert_sha256: None,
                };
                self.identity_fp(s, &p, true)
            }
        };
        let (seq, non) =
            s.tickets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .issue(unix(now), via, link);
        let claims = Claims {
            sid: s.id.clone(),
            idf,
            ins: self.instance().to_string(),
            lnk: link,
            seq,
            non,
            iat: unix(now),
            exp: unix(m.expires_at),
        };
        let ticket = self.tickets.seal(&claims);
        let fp = ticket::fingerprint(&ticket);
        self.store
            .record(&s.id, Op::Issued, &json!({"seq": seq, "ticket_fp": fp}))
            .map_err(|e| format!("registry unavailable: {e}"))?;
        self.audit
            .record(
                "session.ticket_issued",
                Some(&s.id),
                json!({
                    "agent": m.source.agent,
                    "seq": seq,
                    "via": via,
                    "ticket_fp": fp,
                    "expires_at": rfc3339(m.expires_at),
                    "valid_secs_after_disconnect": m.resume.ticket_ttl.as_secs(),
                }),
            )
            .await
            .map_err(|e| format!("audit log: {e}"))?;
        Ok(IssuedTicket {
            ticket,
            seq,
            expires_at: m.expires_at,
            valid_after_disconnect: m.resume.ticket_ttl,
        })
    }

    /// Checks a ticket for `s` without using it.
    fn verify(&self, s: &Session, text: &str, proven: &Proven) -> Result<Claims, Refusal> {
        let claims = self.tickets.open(text)?;
        if claims.sid != s.id {
            return Err(Refusal::ForeignSession);
        }
        if claims.idf != self.identity_fp(s, proven, false)
            && claims.idf != self.identity_fp(s, proven, true)
        {
            return Err(Refusal::ForeignIdentity);
        }
        let now = unix(OffsetDateTime::now_utc());
        let m = s.mandate();
        // Good for the ticket ttl after the drop (or after issue, if later), never past the
        // session's own end as signed into the ticket.
        let from = s
            .detached_at()
            .map_or(claims.iat, |(t, _)| unix(t).max(claims.iat));
        let ttl = i64::try_from(m.resume.ticket_ttl.as_secs()).unwrap_or(i64::MAX);
        if now > claims.exp.min(from.saturating_add(ttl)) {
            return Err(Refusal::Expired);
        }
        s.tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(&claims)?;
        Ok(claims)
    }

    fn times(s: &Session) -> Value {
        json!({
            "created_at": rfc3339(s.created_at),
            "interrupted_at": s.detached_at().map(|(t, _)| rfc3339(t)),
            "attempted_at": rfc3339(OffsetDateTime::now_utc()),
        })
    }

    /// Audits a refused resumption and counts it toward the anomaly threshold (except a
    /// missing ticket: an older client that simply reconnects must not end the session).
    async fn refuse(
        &self,
        s: &Session,
        r: ResumeRefused,
        path: &str,
        peer: Option<&str>,
        governance: Value,
    ) -> ResumeRefused {
        // Only what a ticket shows about its holder counts toward the anomaly threshold: a
        // missing ticket (an older client that just reconnects), a full registry or an ended
        // session is no sign of an attack.
        let ticket_refusal = matches!(
            r.reason,
            "tampered"
                | "foreign_instance"
                | "foreign_session"
                | "foreign_identity"
                | "expired"
                | "replayed"
                | "superseded"
        );
        let counted = ticket_refusal;
        let freshness = if ticket_refusal {
            format!("refused:{}", r.reason)
        } else {
            match r.reason {
                "no_ticket" => "missing",
                "ended" | "not_detached" => "not_reached",
                // Every later step runs after the ticket (if one is required) passed.
                _ => "passed",
            }
            .to_string()
        };
        let mut fields = json!({
            "agent": s.mandate().source.agent,
            "reason": r.reason,
            "message": r.message,
            "path": path,
            "peer": peer,
            "freshness": {"result": freshness},
            "governance": if governance.is_null() { json!({"result": "not_reached"}) } else { governance },
            "counted_toward_anomaly": counted,
        });
        if let (Some(f), Value::Object(t)) = (fields.as_object_mut(), Self::times(s)) {
            f.extend(t);
        }
        // Durable before the refusal is answered.
        if let Err(e) = self
            .audit
            .record("session.resume_refused", Some(&s.id), fields)
            .await
        {
            tracing::error!(error = %e, "could not record session.resume_refused");
        }
        self.metrics
            .resume_attempts
            .get_or_create(&crate::metrics::OutcomeLabel {
                outcome: r.reason.to_string(),
            })
            .inc();
        if counted {
            s.refused("session.resume_refused");
        }
        r
    }

    /// Whether a request to a detached session's `/json/*` may proceed: the ticket is checked
    /// but not used (the websocket upgrade uses it).
    pub async fn peek_resume(
        &self,
        s: &Session,
        ticket: Option<&str>,
        proven: &Proven,
        path: &str,
        peer: Option<&str>,
    ) -> Result<(), ResumeRefused> {
        let refusal = match ticket {
            None if s.mandate().resume.requires_ticket => no_ticket(s),
            None => return Ok(()),
            Some(t) => match self.verify(s, t, proven) {
                Ok(_) => return Ok(()),
                Err(e) => ResumeRefused::new(403, e.code(), format!("chaperone: {e}")),
            },
        };
        Err(self.refuse(s, refusal, path, peer, Value::Null).await)
    }

    /// Resumes a detached session (AG-374 4.1–4.7): checks the ticket, the resumption window,
    /// records the ticket's use, re-validates the mandate in force as it stands now, and
    /// admits the connection. `session.resumed` is durable before this returns `Ok`.
    pub async fn resume(
        &self,
        s: &Arc<Session>,
        ticket: Option<&str>,
        proven: &Proven,
        mode: ResumeMode,
        path: &str,
        peer: Option<&str>,
    ) -> Result<Resumed, ResumeRefused> {
        let _one = s.resuming.lock().await;
        // No mandate change can slip in between the re-validation and the admission.
        let _no_change = self.changing.lock().await;
        match self.try_resume(s, ticket, proven, mode, path, peer).await {
            Ok(r) => Ok(r),
            // Recorded (durably) before the refusal is answered.
            Err((r, governance)) => Err(self.refuse(s, r, path, peer, governance).await),
        }
    }

    async fn try_resume(
        &self,
        s: &Arc<Session>,
        ticket: Option<&str>,
        proven: &Proven,
        mode: ResumeMode,
        path: &str,
        peer: Option<&str>,
    ) -> Result<Resumed, (ResumeRefused, Value)> {
        match s.state() {
            State::Detached => {}
            State::Active => return Err((
                ResumeRefused::new(
                    409,
                    "not_detached",
                    "chaperone: the session is active; a resume ticket is for a detached session",
                ),
                Value::Null,
            )),
            st => {
                return Err((
                    ResumeRefused::new(
                        410,
                        "ended",
                        format!("chaperone: session is {}", st.name()),
                    ),
                    Value::Null,
                ))
            }
        }
        let Some((interrupted, since)) = s.detached_at() else {
            return Err((
                ResumeRefused::new(
                    409,
                    "not_detached",
                    "chaperone: the session is not detached",
                ),
                Value::Null,
            ));
        };
        let m = s.mandate();
        // Freshness.
        let claims = match ticket {
            Some(t) => Some(self.verify(s, t, proven).map_err(|e| {
                (
                    ResumeRefused::new(403, e.code(), format!("chaperone: {e}")),
                    Value::Null,
                )
            })?),
            None if m.resume.requires_ticket => return Err((no_ticket(s), Value::Null)),
            None => None,
        };
        // The resumption window (the lifecycle task ends the session at the same moment;
        // this closes the gap between its tick and this request).
        if since.elapsed() >= m.resume.window {
            s.request_end_by(
                EndReason::ResumeExpired,
                "resume_window",
                json!({"interrupted_at": rfc3339(interrupted), "resume_window_secs": m.resume.window.as_secs()}),
            );
            return Err((
                ResumeRefused::new(
                    410,
                    "resume_window_passed",
                    format!(
                        "chaperone: the session was not resumed within resume_window_secs ({}); it is ended and purged",
                        m.resume.window.as_secs()
                    ),
                ),
                Value::Null,
            ));
        }
        let link = claims.as_ref().and_then(|c| c.lnk);
        if mode == ResumeMode::Continue && !s.has_intact_park(link) {
            return Err((
                ResumeRefused::new(
                    409,
                    "no_parked_connection",
                    "chaperone: continue=1 needs the connection this ticket was issued to, and it was not kept (buffer overflow, an operator ticket, or it was replaced); reconnect without continue=1",
                ),
                Value::Null,
            ));
        }
        // The ticket's use is recorded durably before it counts; a store that cannot record
        // it refuses the resumption and leaves the ticket unused (AG-374 4.10).
        let fp = ticket.map(ticket::fingerprint);
        if let Err(e) = self.store.record(
            &s.id,
            Op::Consumed,
            &json!({"seq": claims.as_ref().map(|c| c.seq), "ticket_fp": fp}),
        ) {
            return Err((
                ResumeRefused::new(
                    503,
                    "registry_unavailable",
                    format!("chaperone: the session registry cannot record the resumption ({e}); try again later"),
                ),
                Value::Null,
            ));
        }
        let used = match &claims {
            Some(c) => Some(
                s.tickets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .consume(c)
                    .map_err(|e| {
                        (
                            ResumeRefused::new(403, e.code(), format!("chaperone: {e}")),
                            Value::Null,
                        )
                    })?,
            ),
            None => None,
        };
        let freshness = match (&claims, &used) {
            (Some(c), Some(u)) => json!({
                "result": "ok",
                "ticket_seq": c.seq,
                "ticket_fp": fp,
                "issued_at": at(u.iat),
                "issued_via": u.via,
                "valid_until": at(c.exp.min(unix(interrupted).max(c.iat).saturating_add(i64::try_from(m.resume.ticket_ttl.as_secs()).unwrap_or(i64::MAX)))),
            }),
            _ => json!({"result": "not_required"}),
        };
        // Governance re-validation against the mandate in force now (AG-374 4.4).
        let governance = self.revalidate_for_resume(s);
        if governance["result"] == "refused" {
            let field = governance["failed"]
                .as_str()
                .unwrap_or("mandate")
                .to_string();
            let message = governance["message"].as_str().unwrap_or("").to_string();
            let reason = match field.as_str() {
                "not_after" => EndReason::Expired,
                "window" => EndReason::WindowEnded,
                _ => EndReason::Revoked,
            };
            s.request_end_by(
                reason,
                "resume_revalidation",
                json!({"failed": field, "message": message}),
            );
            let mut g = governance.clone();
            g["freshness"] = freshness;
            return Err((
                ResumeRefused::new(
                    410,
                    "governance_refused",
                    format!("chaperone: the mandate no longer allows this session ({field}: {message}); it is ended and purged"),
                ),
                g,
            ));
        }
        let Some(guard) = s.admit(&self.audit, &self.store, State::Detached) else {
            return Err((
                ResumeRefused::new(
                    409,
                    "connection_limit",
                    "chaperone: another connection resumed first",
                ),
                Value::Null,
            ));
        };
        // The ticket's own connection's park; the newest only for an operator's ticket,
        // which names no connection (another connection's replay book is not this agent's).
        let parked = match (mode, link) {
            (_, Some(id)) => s.unpark(Some(id)),
            (ResumeMode::Reattach, None) => s.unpark(None),
            (ResumeMode::Continue, None) => None,
        };
        let reconciliation = parked.as_ref().map(ParkedLink::summary);
        let now = OffsetDateTime::now_utc();
        let mut fields = json!({
            "agent": m.source.agent,
            "resumed_at": rfc3339(now),
            "gap_secs": since.elapsed().as_secs_f64(),
            "peer": peer,
            "mode": mode.name(),
            "path": path,
            "freshness": freshness,
            "governance": governance,
            "reconciliation": reconciliation,
            "credentials_quiet_secs": m.resume.quiet.as_secs(),
        });
        if let (Some(f), Value::Object(t)) = (fields.as_object_mut(), Self::times(s)) {
            f.extend(t);
            f.remove("attempted_at");
        }
        // Progressive restoration (AG-374 4.11): credentials wait out the quiet period,
        // set before the first resumed request can reach the broker.
        if !m.resume.quiet.is_zero() {
            if let Some(b) = s.broker.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                b.quiet_for(m.resume.quiet);
            }
        }
        let recorded = async {
            self.store
                .record(
                    &s.id,
                    Op::Resumed,
                    &json!({"seq": claims.as_ref().map(|c| c.seq)}),
                )
                .map_err(|e| e.to_string())?;
            self.audit
                .record("session.resumed", Some(&s.id), fields)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = recorded {
            if let Some(p) = parked {
                s.park(p);
            }
            return Err((
                ResumeRefused::new(
                    503,
                    "registry_unavailable",
                    format!(
                        "chaperone: the resumption could not be recorded ({e}); its ticket is used up: once the registry works again, an operator can issue a new one (POST /v1/sessions/{}/resume-ticket)",
                        s.id
                    ),
                ),
                Value::Null,
            ));
        }
        s.reactivate();
        self.metrics
            .resume_attempts
            .get_or_create(&crate::metrics::OutcomeLabel {
                outcome: "resumed".into(),
            })
            .inc();
        Ok(Resumed {
            guard,
            parked,
            mode,
        })
    }

    /// Re-checks a detached session's mandate, as changed during the gap, before it resumes:
    /// its deadline and window, its agent key, and that the broker holds nothing the mandate
    /// no longer lists.
    fn revalidate_for_resume(&self, s: &Session) -> Value {
        let since = s.gov_at_detach.load(std::sync::atomic::Ordering::SeqCst);
        let version = s.governance_version();
        let mut out = json!({
            "result": if version == since { "unchanged" } else { "changed" },
            "version_at_interruption": since,
            "version_now": version,
            "changes": s.changes_since(since),
            "checks": MANDATE_CHECKS,
        });
        if let Err((field, message)) = self.mandate_holds(s) {
            out["result"] = "refused".into();
            out["failed"] = field.into();
            out["message"] = message.into();
        }
        out
    }

    /// Whether the mandate in force still allows the session under the current policy: it
    /// has not ended and its window is open, it passes validation under today's limits, its
    /// agent key exists and is not revoked, and the broker holds no credential it no longer
    /// lists. `Err((field, message))` names the first check that failed, in the order of
    /// [`MANDATE_CHECKS`]. Resumptions and posture checks both ask it.
    pub(super) fn mandate_holds(&self, s: &Session) -> Result<(), (String, String)> {
        let m = s.mandate();
        let now = OffsetDateTime::now_utc();
        m.may_resume(now)
            .map_err(|e| (e.field.to_string(), e.message))?;
        m.source
            .clone()
            .revalidate(now, self.cfg.limits.max_ttl.as_secs())
            .map_err(|e| (e.field, e.message))?;
        if let Some(k) = m
            .source
            .identity
            .as_ref()
            .and_then(|i| i.agent_key.as_deref())
        {
            self.keys
                .usable(k)
                .map_err(|e| ("identity.agent_key".to_string(), e.to_string()))?;
        }
        let held = s
            .broker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(crate::broker::Broker::credential_ids)
            .unwrap_or_default();
        if let Some(extra) = held
            .iter()
            .find(|id| !m.source.credentials.iter().any(|c| &c.id == *id))
        {
            return Err((
                "credentials".into(),
                format!("the broker holds `{extra}`, which the mandate no longer lists"),
            ));
        }
        Ok(())
    }
}

/// The checks of [`Registry::mandate_holds`], as resumption records list them.
const MANDATE_CHECKS: [&str; 5] = ["not_after", "window", "mandate", "agent_key", "credentials"];

fn no_ticket(s: &Session) -> ResumeRefused {
    ResumeRefused::new(
        401,
        "no_ticket",
        format!(
            "chaperone: session {} is detached; reconnect with a resume ticket (?ticket=…, from Chaperone.getResumeTicket or POST /v1/sessions/{}/resume-ticket)",
            s.id, s.id
        ),
    )
}

impl Session {
    /// Whether a parked link of connection `id` is kept and intact.
    fn has_intact_park(&self, id: Option<u64>) -> bool {
        let Some(id) = id else { return false };
        self.parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|l| l.id().get() == id && l.is_intact())
    }
}

/// What a connection presented, from its request.
pub fn presented(
    headers: &axum::http::HeaderMap,
    agent_key_param: Option<&str>,
    cert_sha256: Option<String>,
) -> Presented {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    Presented {
        agent_key: bearer.or_else(|| agent_key_param.map(str::to_string)),
        cert_sha256,
    }
}
