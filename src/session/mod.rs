//! Sessions: one mandate, one sandboxed browser, from launch to verified purge.
//!
//! `requested → launching → active → ending(expired | revoked | anomaly | shutdown | crashed)
//! → purged`. Each transition is in the audit log before it is acknowledged. The supervisor's
//! own clock ends the session at the mandate's deadline, whatever the agent or the sites do.

pub mod identity;
mod launch;
pub mod patch;
pub mod posture;
mod registry;
mod resume;
pub mod store;
pub mod ticket;

pub use registry::{Registry, RegistryError};

use crate::browser::ParkedLink;
pub use resume::{presented, IssuedTicket, ResumeMode, ResumeRefused, Resumed};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::browser::{AgentLink, BrowserConn, CdpError};
use crate::egress::{EgressPolicy, Traffic};
use crate::gate::GateObserver;
use crate::mandate::ValidMandate;

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The mandate's deadline passed.
    Expired,
    /// The mandate's recurring window closed.
    WindowEnded,
    /// No agent traffic for `idle_timeout_secs`.
    IdleTimeout,
    /// The last agent connection closed and the mandate says `revoke_on_disconnect`.
    AgentDisconnected,
    /// An operator revoked it.
    Revoked,
    /// An anomaly: a leak with `on_leak = "revoke"`, or the mandate's `anomaly` threshold.
    Anomaly,
    /// The supervisor is stopping.
    Shutdown,
    /// The browser died on its own, or a launch failed.
    Crashed,
    /// The session stayed detached longer than `resume_window_secs`.
    ResumeExpired,
}

impl EndReason {
    /// The audit event for this ending, e.g. `session.expired`.
    pub fn event(self) -> &'static str {
        match self {
            EndReason::Expired => "session.expired",
            EndReason::WindowEnded => "session.window_ended",
            EndReason::IdleTimeout => "session.idle_timeout",
            EndReason::AgentDisconnected => "session.agent_disconnected",
            EndReason::Revoked => "session.revoked",
            EndReason::Anomaly => "session.anomaly",
            EndReason::Shutdown => "session.shutdown",
            EndReason::Crashed => "session.crashed",
            EndReason::ResumeExpired => "session.resume_expired",
        }
    }

    /// `expired`, `revoked`, … (the event name without its `session.` prefix).
    pub fn name(self) -> &'static str {
        self.event().trim_start_matches("session.")
    }

    /// Which revocation trigger this is, for the audit record's `trigger` field, when the
    /// one who ended the session did not name a more precise one.
    pub fn trigger(self) -> &'static str {
        match self {
            EndReason::Expired => "mandate_expiry",
            EndReason::WindowEnded => "window_end",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::AgentDisconnected => "agent_disconnect",
            EndReason::Revoked => "operator_revoke",
            EndReason::Anomaly => "anomaly",
            EndReason::Shutdown => "supervisor_shutdown",
            EndReason::Crashed => "browser_exit",
            EndReason::ResumeExpired => "resume_window",
        }
    }

    /// What the agent reads in the websocket close frame.
    pub fn close_reason(self) -> &'static str {
        match self {
            EndReason::Expired => "chaperone: session expired (mandate deadline reached)",
            EndReason::WindowEnded => "chaperone: session ended (the mandate's time window closed)",
            EndReason::IdleTimeout => {
                "chaperone: session ended (idle_timeout_secs without agent traffic)"
            }
            EndReason::AgentDisconnected => "chaperone: session ended (agent disconnected)",
            EndReason::Revoked => "chaperone: session revoked by an operator",
            EndReason::Anomaly => "chaperone: session ended by a revocation trigger",
            EndReason::Shutdown => "chaperone: supervisor shutting down",
            EndReason::Crashed => "chaperone: browser crashed; session ended",
            EndReason::ResumeExpired => {
                "chaperone: session ended (not resumed within resume_window_secs)"
            }
        }
    }
}

/// An open agent connection; see [`Session::admit`].
pub struct AgentGuard {
    session: Arc<Session>,
    audit: crate::audit::Audit,
    store: Arc<dyn store::ResumeStore>,
    /// Facts about the end of the connection for `session.detached`.
    close: Option<serde_json::Value>,
    /// The connection's CDP session, parked in the session when the connection dropped.
    parked: Option<u64>,
}

impl AgentGuard {
    /// How the connection ended, for the `session.detached` record if it was the last one.
    pub fn set_close(&mut self, close: serde_json::Value) {
        self.close = Some(close);
    }

    /// Names the link this connection parked: it is kept only if this was the session's last
    /// connection (a resumption happens only once the session is detached).
    pub fn set_parked(&mut self, link: u64) {
        self.parked = Some(link);
    }
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let s = &self.session;
        s.touch();
        // Counting down and becoming detached are one step for admissions (`Session::admit`).
        let _admissions = s.admissions.lock().unwrap_or_else(|p| p.into_inner());
        let left = s.agents.fetch_sub(1, Ordering::SeqCst) - 1;
        if left > 0 || s.state() != State::Active {
            // Others stay connected: nothing would ever take this connection's park up.
            if let Some(id) = self.parked {
                drop(s.unpark(Some(id)));
            }
            return;
        }
        // A connection that ended because the browser died is not a detach: the session is
        // ending as crashed.
        let browser_alive = s.browser().is_some_and(|b| b.conn.close_reason().is_none());
        if !browser_alive {
            return;
        }
        if s.mandate().source.revoke_on_disconnect {
            s.request_end(EndReason::AgentDisconnected);
            return;
        }
        // The last connection is gone: the session waits, detached, for a resumption.
        let now = OffsetDateTime::now_utc();
        let m = s.mandate();
        *s.detached_at.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, Instant::now()));
        s.gov_at_detach
            .store(s.governance.load(Ordering::SeqCst), Ordering::SeqCst);
        s.state.send_replace(State::Detached);
        let deadline = now + m.resume.window;
        let facts = serde_json::json!({"interrupted_at": rfc3339(now), "parked": s.parked_count()});
        if let Err(e) = self.store.record(&s.id, store::Op::Detached, &facts) {
            // The session is detached either way; a resumption records through the same store
            // and is refused while it fails.
            tracing::error!(session = %s.id, error = %e, "registry store: could not record the detach");
        }
        self.audit.record_detached(
            "session.detached",
            Some(&s.id),
            serde_json::json!({
                "agent": m.source.agent,
                "interrupted_at": rfc3339(now),
                "close": self.close.take(),
                "parked": s.parked_count(),
                "governance_version": s.governance.load(Ordering::SeqCst),
                "resume_deadline": rfc3339(deadline.min(m.expires_at)),
                "resume_requires_ticket": m.resume.requires_ticket,
            }),
        );
    }
}

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The sandbox and browser are starting.
    Launching,
    /// Agents may connect.
    Active,
    /// The last agent connection dropped; the session waits for a resumption (with a ticket)
    /// until `resume_window_secs` passes.
    Detached,
    /// The session is being torn down.
    Ending(EndReason),
    /// Nothing of the session is left; checked.
    Purged(EndReason),
    /// The purge could not be verified (`session.purge_failed` in the audit log names what is
    /// left); an operator must look at the host.
    PurgeFailed(EndReason),
}

impl State {
    /// `launching`, `active`, `ending` or `purged`.
    pub fn name(self) -> &'static str {
        match self {
            State::Launching => "launching",
            State::Active => "active",
            State::Detached => "detached",
            State::Ending(_) => "ending",
            State::Purged(_) => "purged",
            State::PurgeFailed(_) => "purge_failed",
        }
    }

    /// Why it ended, once it is ending.
    pub fn end_reason(self) -> Option<EndReason> {
        match self {
            State::Ending(r) | State::Purged(r) | State::PurgeFailed(r) => Some(r),
            _ => None,
        }
    }
}

/// One session.
pub struct Session {
    /// Public id (control API, audit log).
    pub id: String,
    /// Secret part of the agent URLs; whoever has it can drive the browser.
    pub capability: String,
    /// The mandate in force; `PATCH /v1/sessions/{id}` replaces it.
    mandate: watch::Sender<Arc<ValidMandate>>,
    /// The egress part of the mandate in force, as the proxy reads it for every request.
    egress: watch::Sender<Arc<EgressPolicy>>,
    /// What the proxy let through and refused, by destination host.
    egress_traffic: Arc<Traffic>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// The monotonic clock at creation: agent activity is counted from here.
    started: Instant,
    /// Milliseconds after `started` of the last agent traffic.
    last_activity: AtomicU64,
    /// Agent websocket connections open now.
    agents: AtomicUsize,
    /// Serializes admissions with the last connection's departure.
    admissions: Mutex<()>,
    /// When the last connection dropped, while detached.
    detached_at: Mutex<Option<(OffsetDateTime, Instant)>>,
    /// Bumped by every change of the mandate in force.
    governance: AtomicU64,
    /// `governance` when the session was last detached.
    gov_at_detach: AtomicU64,
    /// Recent mandate changes by governance version, for the resumption record.
    mandate_log: Mutex<VecDeque<(u64, serde_json::Value)>>,
    /// Successful resumptions.
    resumptions: AtomicU64,
    /// Resume tickets issued and used.
    pub(crate) tickets: Mutex<ticket::TicketBook>,
    /// Agent connections whose CDP session was kept alive when they dropped.
    parked: Mutex<Vec<ParkedLink>>,
    /// One resumption at a time.
    pub(crate) resuming: tokio::sync::Mutex<()>,
    /// Recent refusals, for the mandate's `anomaly` threshold.
    refusals: Mutex<VecDeque<Instant>>,
    /// The revocation trigger and its facts, set by whoever asked for the end.
    end_detail: Mutex<Option<(&'static str, serde_json::Value)>>,
    state: watch::Sender<State>,
    /// Cancelled when the session starts ending: agent connections and the proxy stop.
    pub ending: CancellationToken,
    browser: Mutex<Option<BrowserInfo>>,
    end_request: Mutex<Option<tokio::sync::oneshot::Sender<EndReason>>>,
    /// The mandate's credentials with their values, until the broker's vault takes them (the
    /// copy in `mandate` has empty values).
    pub(crate) credentials: Mutex<Vec<crate::mandate::Credential>>,
    /// The credential broker, while the session holds credentials.
    pub(crate) broker: Mutex<Option<crate::broker::Broker>>,
    /// The posture checks, from the baseline taken after launch until the purge.
    posture: Mutex<Option<Arc<posture::Monitor>>>,
}

/// What the supervisor knows about a running browser.
#[derive(Clone)]
pub struct BrowserInfo {
    /// The CDP connection over the pipe.
    pub conn: BrowserConn,
    /// `Browser.getVersion` as Chromium answered it (for `/json/version`).
    pub version: serde_json::Value,
    /// Sandbox layers this session runs without (accepted by the config).
    pub degraded: Vec<String>,
    /// A browser-level CDP session attached ahead of time for the next agent connection.
    /// Chromium takes tens of milliseconds to attach one; this keeps that off the agent's
    /// first command.
    spare: Arc<tokio::sync::Mutex<Option<AgentLink>>>,
}

impl BrowserInfo {
    pub(crate) fn new(
        conn: BrowserConn,
        version: serde_json::Value,
        degraded: Vec<String>,
        spare: Option<AgentLink>,
    ) -> Self {
        BrowserInfo {
            conn,
            version,
            degraded,
            spare: Arc::new(tokio::sync::Mutex::new(spare)),
        }
    }

    /// The browser's link for a new agent connection: the spare one when it is ready,
    /// a freshly attached one otherwise. A new spare is prepared in the background.
    pub async fn agent_link(
        &self,
        label: &str,
        observer: Arc<dyn GateObserver>,
    ) -> Result<AgentLink, CdpError> {
        let spare = self.spare.lock().await.take();
        let link = match spare {
            Some(l) => l,
            None => self.conn.attach_agent(label, observer.clone()).await?,
        };
        let this = self.clone();
        let label = label.to_string();
        tokio::spawn(async move {
            let mut slot = this.spare.lock().await;
            if slot.is_none() {
                *slot = this.conn.attach_agent(&label, observer).await.ok();
            }
        });
        Ok(link)
    }
}

impl Session {
    /// Current state.
    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// Waits until the session's end is settled: `purged`, or `purge_failed`.
    pub async fn finished(&self) -> State {
        let mut rx = self.state.subscribe();
        let settled = rx
            .wait_for(|s| matches!(s, State::Purged(_) | State::PurgeFailed(_)))
            .await
            .map(|s| *s);
        settled.unwrap_or_else(|_| self.state())
    }

    /// Whether the browser runs: the session is active or detached.
    pub fn is_running(&self) -> bool {
        matches!(self.state(), State::Active | State::Detached)
    }

    /// The browser, while the session is active or detached.
    pub fn browser(&self) -> Option<BrowserInfo> {
        if !self.is_running() {
            return None;
        }
        self.browser
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Asks the lifecycle task to end the session (first request wins).
    pub fn request_end(&self, reason: EndReason) {
        self.request_end_by(reason, reason.trigger(), serde_json::Value::Null);
    }

    /// [`Session::request_end`] naming the trigger that fired and its facts, for the audit
    /// record of the end.
    pub fn request_end_by(
        &self,
        reason: EndReason,
        trigger: &'static str,
        detail: serde_json::Value,
    ) {
        {
            let mut d = self.end_detail.lock().unwrap_or_else(|p| p.into_inner());
            if d.is_none() {
                *d = Some((trigger, detail));
            }
        }
        if let Some(tx) = self
            .end_request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = tx.send(reason);
        }
    }

    /// The mandate in force.
    pub fn mandate(&self) -> Arc<ValidMandate> {
        self.mandate.borrow().clone()
    }

    /// Follows changes of the mandate in force.
    pub fn mandate_changes(&self) -> watch::Receiver<Arc<ValidMandate>> {
        self.mandate.subscribe()
    }

    /// The egress policy in force, as the proxy reads it.
    pub fn egress_policy(&self) -> watch::Receiver<Arc<EgressPolicy>> {
        self.egress.subscribe()
    }

    /// The session's egress counters, by destination host.
    pub fn egress_traffic(&self) -> &Arc<Traffic> {
        &self.egress_traffic
    }

    /// Puts a changed mandate in force: the proxy, the lifecycle's clocks and the anomaly
    /// threshold read it from their next request or tick on.
    pub(crate) fn replace_mandate(&self, m: ValidMandate, changes: serde_json::Value) {
        self.egress.send_replace(Arc::new(m.egress.clone()));
        self.mandate.send_replace(Arc::new(m));
        let version = self.governance.fetch_add(1, Ordering::SeqCst) + 1;
        let mut log = self.mandate_log.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() == 64 {
            log.pop_front();
        }
        log.push_back((version, changes));
    }

    /// The governance version: how many times the mandate in force changed.
    pub fn governance_version(&self) -> u64 {
        self.governance.load(Ordering::SeqCst)
    }

    /// The mandate changes made after governance version `since` (at most the last 64).
    pub(crate) fn changes_since(&self, since: u64) -> Vec<serde_json::Value> {
        self.mandate_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(v, _)| *v > since)
            .map(|(v, c)| serde_json::json!({"version": v, "changes": c}))
            .collect()
    }

    /// When the last connection dropped, while the session is detached.
    pub fn detached_at(&self) -> Option<(OffsetDateTime, Instant)> {
        if self.state() != State::Detached {
            return None;
        }
        *self.detached_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a dropped connection's CDP session for a resumption. The oldest is dropped (and
    /// detached) beyond `max_agent_connections`.
    pub fn park(&self, link: ParkedLink) {
        if self.ending.is_cancelled() || !self.is_running() {
            // Too late: the session's end already dropped the parked links.
            return;
        }
        let max = self.mandate().resume.max_connections;
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        parked.push(link);
        while parked.len() > max {
            parked.remove(0);
        }
    }

    /// Takes the parked link of agent connection `id`, or the newest one.
    pub fn unpark(&self, id: Option<u64>) -> Option<ParkedLink> {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let at = match id {
            Some(id) => parked.iter().position(|l| l.id().get() == id)?,
            None => parked.len().checked_sub(1)?,
        };
        Some(parked.remove(at))
    }

    fn parked_count(&self) -> usize {
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Drops every parked link (their CDP sessions are detached).
    pub(crate) fn drop_parked(&self) {
        let gone = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|p| p.into_inner()));
        drop(gone);
    }

    /// Notes agent traffic (a CDP message, a `/json` request): the idle clock starts over.
    pub fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long since the last agent traffic (or since creation, without any).
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Counts an agent connection until the returned guard is dropped, if the session is in
    /// state `expect` and the mandate's `max_agent_connections` leaves room. When the last one
    /// closes, the session ends (`revoke_on_disconnect`) or becomes detached.
    pub(crate) fn admit(
        self: &Arc<Self>,
        audit: &crate::audit::Audit,
        store: &Arc<dyn store::ResumeStore>,
        expect: State,
    ) -> Option<AgentGuard> {
        let _admissions = self.admissions.lock().unwrap_or_else(|p| p.into_inner());
        // A fresh connection needs an active session, a resumption a detached one: checked
        // under the same lock the last connection's departure takes.
        if self.state() != expect {
            return None;
        }
        let max = self.mandate().resume.max_connections;
        self.agents
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.touch();
        Some(AgentGuard {
            session: self.clone(),
            audit: audit.clone(),
            store: store.clone(),
            close: None,
            parked: None,
        })
    }

    /// Agent connections open now.
    pub fn agents_connected(&self) -> usize {
        self.agents.load(Ordering::SeqCst)
    }

    /// Marks a detached session active again (a resumption was admitted).
    pub(crate) fn reactivate(&self) -> bool {
        let mut done = false;
        self.state.send_if_modified(|st| {
            if *st == State::Detached {
                *st = State::Active;
                done = true;
            }
            done
        });
        if done {
            self.resumptions.fetch_add(1, Ordering::SeqCst);
            *self.detached_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        done
    }

    /// Follows the session's state.
    pub fn state_changes(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    /// Counts one refusal (credential, egress or CDP) toward the mandate's `anomaly`
    /// threshold, and ends the session when the threshold is reached.
    pub fn refused(&self, event: &str) {
        let Some(t) = self.mandate().source.anomaly else {
            return;
        };
        let now = Instant::now();
        let window = Duration::from_secs(t.within_secs);
        let count = {
            let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            r.push_back(now);
            while r.front().is_some_and(|at| now.duration_since(*at) > window) {
                r.pop_front();
            }
            r.len()
        };
        if count >= t.max_blocked as usize {
            tracing::warn!(session = %self.id, count, event, "anomaly threshold reached; revoking the session");
            self.request_end_by(
                EndReason::Anomaly,
                "anomaly_threshold",
                serde_json::json!({
                    "refusals": count,
                    "max_blocked": t.max_blocked,
                    "within_secs": t.within_secs,
                    "last_refusal": event,
                }),
            );
        }
    }

    /// The posture checks of the running session.
    pub fn posture(&self) -> Option<Arc<posture::Monitor>> {
        self.posture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Installs (`Some`) or takes away (`None`, after the purge) the posture checks.
    pub(crate) fn set_posture(
        &self,
        monitor: Option<Arc<posture::Monitor>>,
    ) -> Option<Arc<posture::Monitor>> {
        std::mem::replace(
            &mut *self.posture.lock().unwrap_or_else(|p| p.into_inner()),
            monitor,
        )
    }

    /// The trigger and facts recorded by [`Session::request_end_by`].
    pub(crate) fn end_detail(&self) -> Option<(&'static str, serde_json::Value)> {
        self.end_detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The session as the control API shows it.
    pub fn view(&self, urls: &AgentUrls) -> serde_json::Value {
        let st = self.state();
        let degraded = self
            .browser
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|b| b.degraded.clone())
            .unwrap_or_default();
        let m = self.mandate();
        let now = OffsetDateTime::now_utc();
        let (ends_at, _) = m.next_end(now);
        let mut view = serde_json::json!({
            "id": self.id,
            "agent": m.source.agent,
            "state": st.name(),
            "end_reason": st.end_reason(),
            "cdp_url": urls.cdp_url(&self.capability),
            "http_url": urls.http_url(&self.capability),
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(m.expires_at),
            // The earlier of `expires_at` and the close of the current window.
            "ends_at": st.end_reason().is_none().then(|| rfc3339(ends_at)),
            "not_before": m.source.not_before.map(rfc3339),
            "window": m.source.window,
            "idle_timeout_secs": m.source.idle_timeout_secs,
            "idle_secs": st.end_reason().is_none().then(|| self.idle_for().as_secs()),
            "agents_connected": self.agents.load(Ordering::Relaxed),
            "revoke_on_disconnect": m.source.revoke_on_disconnect,
            "anomaly": m.source.anomaly,
            "degraded": degraded,
            "egress": {
                "allow": m.source.egress.allow,
                "deny": m.source.egress.deny,
                "private_networks": m.source.egress.private_networks,
                "hosts": m.source.egress.hosts,
                "ports": m.source.egress.ports,
                // By destination host as the audit log names it (held values redacted).
                "traffic": self.egress_traffic.snapshot(),
            },
            // Names and sites only: values never leave the vault.
            "credentials": m.source.credentials.iter().map(|c| serde_json::json!({
                "id": c.id,
                "site": c.site,
                "allowed_initiators": c.allowed_initiators,
                "cookies": c.cookies.iter().map(|k| &k.name).collect::<Vec<_>>(),
                "headers": c.headers.keys().collect::<Vec<_>>(),
                "oauth": c.oauth.as_ref().map(|o| serde_json::json!({
                    "token_endpoint": o.token_endpoint,
                    "client_id": o.client_id,
                    "scope": o.scope,
                    "max_token_age_secs": o.max_token_age_secs
                        .unwrap_or(crate::mandate::DEFAULT_MAX_TOKEN_AGE_SECS),
                    "header": o.header.as_deref().unwrap_or("Authorization"),
                })),
                "revoke": c.revoke.as_ref().map(|r| serde_json::json!({
                    "url": r.url,
                    "method": r.method(),
                    "form": r.form.keys().collect::<Vec<_>>(),
                })),
            })).collect::<Vec<_>>(),
            "unlisted_credentials": m.source.unlisted_credentials,
            "on_leak": m.source.on_leak,
        });
        let detached = self.detached_at();
        let resumption = serde_json::json!({
            "max_agent_connections": m.resume.max_connections,
            "identity": m.source.identity,
            "detached_at": detached.map(|(t, _)| rfc3339(t)),
            "resume_deadline": detached.map(|(t, _)| rfc3339((t + m.resume.window).min(m.expires_at))),
            "resume_window_secs": m.resume.window.as_secs(),
            "resume_ticket_ttl_secs": m.resume.ticket_ttl.as_secs(),
            "resume_requires_ticket": m.resume.requires_ticket,
            "resume_quiet_secs": m.resume.quiet.as_secs(),
            "resumptions": self.resumptions.load(Ordering::Relaxed),
            "governance_version": self.governance.load(Ordering::Relaxed),
            "parked_connections": self.parked_count(),
        });
        if let (Some(v), serde_json::Value::Object(r)) = (view.as_object_mut(), resumption) {
            v.extend(r);
        }
        view
    }
}

/// How agent URLs are built for this supervisor.
#[derive(Clone, Debug)]
pub struct AgentUrls {
    /// `host:port` agents connect to.
    pub authority: String,
    /// Whether the endpoint serves TLS.
    pub tls: bool,
}

impl AgentUrls {
    /// The websocket URL for Playwright `connectOverCDP`, Puppeteer `browserWSEndpoint`,
    /// chromiumoxide `Browser::connect`.
    pub fn cdp_url(&self, capability: &str) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!(
            "{scheme}://{}/devtools/browser/{capability}",
            self.authority
        )
    }

    /// The HTTP base whose `/json/version` works.
    pub fn http_url(&self, capability: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/session/{capability}", self.authority)
    }
}

/// RFC 3339 text of a timestamp.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Fresh random hex of `bytes` bytes.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

pub(crate) fn new_session(
    mut mandate: ValidMandate,
    now: OffsetDateTime,
) -> (Arc<Session>, tokio::sync::oneshot::Receiver<EndReason>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let credentials = mandate.source.take_credentials();
    let s = Session {
        credentials: Mutex::new(credentials),
        broker: Mutex::new(None),
        posture: Mutex::new(None),
        id: random_hex(8),
        capability: random_hex(32),
        egress: watch::Sender::new(Arc::new(mandate.egress.clone())),
        egress_traffic: Arc::default(),
        mandate: watch::Sender::new(Arc::new(mandate)),
        created_at: now,
        started: Instant::now(),
        last_activity: AtomicU64::new(0),
        agents: AtomicUsize::new(0),
        admissions: Mutex::new(()),
        detached_at: Mutex::new(None),
        governance: AtomicU64::new(0),
        gov_at_detach: AtomicU64::new(0),
        mandate_log: Mutex::new(VecDeque::new()),
        resumptions: AtomicU64::new(0),
        tickets: Mutex::new(ticket::TicketBook::default()),
        parked: Mutex::new(Vec::new()),
        resuming: tokio::sync::Mutex::new(()),
        refusals: Mutex::new(VecDeque::new()),
        end_detail: Mutex::new(None),
        state: watch::Sender::new(State::Launching),
        ending: CancellationToken::new(),
        browser: Mutex::new(None),
        end_request: Mutex::new(Some(tx)),
    };
    (Arc::new(s), rx)
}
