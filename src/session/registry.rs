//! The set of sessions this supervisor runs, and the per-session host uids.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::json;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{launch, new_session, rfc3339, AgentUrls, EndReason, Session, State};
use crate::audit::{Audit, AuditError};
use crate::broker::upstream::{Revocation, Revoked};
use crate::config::Config;
use crate::mandate::ValidMandate;
use crate::metrics::Metrics;

/// Purged sessions kept for `GET /v1/sessions/{id}` before they are forgotten.
const KEEP_PURGED: usize = 256;

/// A live mandate changed ([`Registry::change`]).
pub struct Changed {
    pub session: Arc<Session>,
    pub changes: Vec<super::patch::Change>,
    /// The `credential.revoked_upstream` fields of each removed credential's revocation.
    pub revoked_upstream: Vec<serde_json::Value>,
}

/// Why a registry operation failed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// `limits.max_sessions` sessions are alive.
    #[error("limits.max_sessions: {0} sessions are already running; revoke one or try later")]
    Full(usize),
    /// No session with that id.
    #[error("no session with id `{0}`")]
    NotFound(String),
    /// The browser could not be started; the message names the step.
    #[error("launch failed: {0}")]
    Launch(String),
    /// The audit log could not record the step, so the step was not taken.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// The session was killed but its purge could not be verified.
    #[error("session `{0}` was ended but its purge could not be verified; see session.purge_failed in the audit log")]
    PurgeFailed(String),
    /// The supervisor is stopping.
    #[error("the supervisor is shutting down")]
    ShuttingDown,
    /// The mandate does not allow a session now (`not_before`, `window`).
    #[error("{0}")]
    NotNow(String),
    /// The session is not running (still launching, or ending), so its mandate cannot change.
    #[error(
        "session `{0}` is {1}; only a running (active or detached) session's mandate can change"
    )]
    NotActive(String, &'static str),
    /// The change was refused.
    #[error("{0}")]
    Patch(#[from] super::patch::PatchError),
    /// The mandate names an identity this supervisor cannot check.
    #[error("{0}")]
    Identity(String),
    /// An agent key operation failed.
    #[error("{0}")]
    AgentKey(super::identity::KeyError),
}

/// All sessions of this supervisor.
pub struct Registry {
    pub(super) cfg: Arc<Config>,
    pub(super) audit: Audit,
    pub(super) metrics: Arc<Metrics>,
    /// Keys the fingerprints that name held values in audit records; random per supervisor.
    pub(super) fingerprints: crate::vault::FingerprintKey,
    /// The supervisor's client for OAuth refreshes and upstream revocations (`[upstream]`),
    /// or why it could not be built (then sessions that need it are refused).
    pub(super) upstream: Result<crate::broker::upstream::Upstream, String>,
    urls: AgentUrls,
    inner: Mutex<Inner>,
    tasks: TaskTracker,
    pub(super) shutdown: CancellationToken,
    /// Serializes mandate changes and resumptions.
    pub(super) changing: tokio::sync::Mutex<()>,
    /// Operator-issued agent keys.
    pub(super) keys: super::identity::AgentKeys,
    /// Signs resume tickets; names this supervisor instance.
    pub(super) tickets: super::ticket::TicketKey,
    /// The durable record of resumption state.
    pub(super) store: Arc<dyn super::store::ResumeStore>,
    /// Requests held for a human's approval, across sessions.
    pub(super) approvals: Arc<crate::approvals::Approvals>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<String, Arc<Session>>,
    by_capability: HashMap<String, String>,
    purged_order: std::collections::VecDeque<String>,
    uid_slots: BTreeSet<u32>,
}

impl Registry {
    /// A registry for this config, writing to `audit`.
    pub fn new(cfg: Arc<Config>, audit: Audit, metrics: Arc<Metrics>, urls: AgentUrls) -> Self {
        let upstream =
            crate::broker::upstream::Upstream::new(&cfg.upstream).map_err(|e| e.to_string());
        if let Err(e) = &upstream {
            tracing::error!(error = %e, "no upstream client: sessions with `oauth` or `revoke` credentials will be refused");
        }
        let webhook = match (cfg.webhook_url(), &upstream) {
            (Ok(Some(url)), Ok(client)) => Some(crate::approvals::Webhook {
                url,
                client: client.clone(),
            }),
            (Ok(Some(_)), Err(e)) => {
                tracing::error!(error = %e, "no upstream client: the approval webhook cannot be called");
                None
            }
            _ => None,
        };
        let approvals = Arc::new(crate::approvals::Approvals::new(webhook, audit.clone()));
        Registry {
            approvals,
            audit,
            metrics,
            fingerprints: crate::vault::FingerprintKey::random(),
            upstream,
            urls,
            inner: Mutex::new(Inner::default()),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            changing: tokio::sync::Mutex::new(()),
            keys: super::identity::AgentKeys::default(),
            tickets: super::ticket::TicketKey::random(),
            store: match &cfg.registry.journal {
                Some(path) => Arc::new(super::store::JournalStore::new(path.clone())),
                None => Arc::new(super::store::MemoryStore),
            },
            cfg,
        }
    }

    /// This supervisor instance's id (random per process; resume tickets are bound to it).
    pub fn instance(&self) -> &str {
        self.tickets.instance()
    }

    /// The operator-issued agent keys.
    pub fn agent_keys(&self) -> &super::identity::AgentKeys {
        &self.keys
    }

    /// Revokes an agent key: it stops working at once, and every live session bound to it is
    /// ended (trigger `agent_key_revoked`) and purged before this returns.
    pub async fn revoke_agent_key(
        &self,
        id: &str,
    ) -> Result<super::identity::KeyInfo, RegistryError> {
        let info = self.keys.get(id).ok_or_else(|| {
            RegistryError::AgentKey(super::identity::KeyError::NotFound(id.into()))
        })?;
        let bound: Vec<_> = self
            .list()
            .into_iter()
            .filter(|s| s.state().end_reason().is_none())
            .filter(|s| {
                s.mandate()
                    .source
                    .identity
                    .as_ref()
                    .and_then(|i| i.agent_key.as_deref())
                    == Some(id)
            })
            .collect();
        self.audit
            .record(
                "agent_key.revoked",
                None,
                json!({
                    "agent_key": id,
                    "label": info.label,
                    "sessions": bound.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
                }),
            )
            .await?;
        let info = self.keys.revoke(id).map_err(RegistryError::AgentKey)?;
        for s in &bound {
            s.request_end_by(
                EndReason::Revoked,
                "agent_key_revoked",
                json!({ "agent_key": id }),
            );
        }
        for s in &bound {
            s.finished().await;
        }
        Ok(info)
    }

    /// The supervisor's config.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// How agent URLs look.
    pub fn urls(&self) -> &AgentUrls {
        &self.urls
    }

    /// Requests held for a human's approval.
    pub fn approvals(&self) -> &Arc<crate::approvals::Approvals> {
        &self.approvals
    }

    /// The audit log.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session for `mandate`; returns once the browser answered its first CDP
    /// command (state `active`), or with the launch error after everything was cleaned up.
    pub async fn create(
        self: &Arc<Self>,
        mandate: ValidMandate,
    ) -> Result<Arc<Session>, RegistryError> {
        if self.shutdown.is_cancelled() {
            return Err(RegistryError::ShuttingDown);
        }
        let now = OffsetDateTime::now_utc();
        mandate
            .may_start(now)
            .map_err(|e| RegistryError::NotNow(format!("mandate.{e}")))?;
        if let Some(id) = &mandate.source.identity {
            let mtls = self
                .cfg
                .tls
                .as_ref()
                .is_some_and(|t| t.client_auth != crate::config::ClientAuth::None);
            if !id.client_cert_sha256.is_empty() && !mtls {
                return Err(RegistryError::Identity(
                    "mandate.identity.client_cert_sha256: this supervisor's agent endpoint does not ask for client certificates; set [tls] client_auth = \"optional\" or \"required\" in its config".into(),
                ));
            }
            if let Some(k) = &id.agent_key {
                self.keys.usable(k).map_err(|e| {
                    RegistryError::Identity(format!("mandate.identity.agent_key: `{k}`: {e}"))
                })?;
            }
        }
        let (session, end_rx) = new_session(mandate, now);
        let slot = {
            let mut inner = self.lock();
            let live = inner
                .sessions
                .values()
                .filter(|s| !matches!(s.state(), State::Purged(_)))
                .count();
            if live >= self.cfg.limits.max_sessions {
                return Err(RegistryError::Full(self.cfg.limits.max_sessions));
            }
            let slot = (0..self.cfg.sandbox.uid_count)
                .find(|n| !inner.uid_slots.contains(n))
                .ok_or(RegistryError::Full(self.cfg.limits.max_sessions))?;
            inner.uid_slots.insert(slot);
            inner.sessions.insert(session.id.clone(), session.clone());
            inner
                .by_capability
                .insert(session.capability.clone(), session.id.clone());
            slot
        };
        let m = session.mandate();
        if let Some(id) = &m.source.identity {
            // Every record of the session names who may drive it (AG-374 4.2).
            self.audit
                .tag_session(&session.id, super::identity::audit_tag(id));
        }
        let created = self
            .audit
            .record(
                "session.created",
                Some(&session.id),
                json!({
                    "agent": m.source.agent,
                    "expires_at": rfc3339(m.expires_at),
                    "egress_allow": m.source.egress.allow,
                    "egress_deny": m.source.egress.deny,
                    "egress_ports": m.source.egress.ports,
                    "private_networks": m.source.egress.private_networks,
                    "hosts": m.source.egress.hosts,
                }),
            )
            .await;
        if let Err(e) = created {
            self.forget(&session, slot);
            return Err(e.into());
        }
        self.metrics.sessions_created.inc();
        self.metrics.sessions_live.inc();

        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        let s = session.clone();
        self.tasks.spawn(async move {
            launch::run(this.clone(), s.clone(), slot, end_rx, ready_tx).await;
            this.release(&s, slot);
        });
        match ready_rx.await {
            Ok(Ok(())) => Ok(session),
            Ok(Err(e)) => Err(RegistryError::Launch(e)),
            Err(_) => Err(RegistryError::Launch(
                "the launch task stopped without an answer".into(),
            )),
        }
    }

    fn forget(&self, s: &Session, slot: u32) {
        self.audit.untag_session(&s.id);
        let mut inner = self.lock();
        inner.sessions.remove(&s.id);
        inner.by_capability.remove(&s.capability);
        inner.uid_slots.remove(&slot);
    }

    /// Called when a session is purged: its uid slot is free again, its capability dead.
    fn release(&self, s: &Session, slot: u32) {
        self.audit.untag_session(&s.id);
        let mut inner = self.lock();
        inner.by_capability.remove(&s.capability);
        if matches!(s.state(), State::Purged(_)) {
            // A slot whose purge could not be verified stays taken: its uid may still own
            // something on this host.
            inner.uid_slots.remove(&slot);
        }
        inner.purged_order.push_back(s.id.clone());
        while inner.purged_order.len() > KEEP_PURGED {
            if let Some(old) = inner.purged_order.pop_front() {
                inner.sessions.remove(&old);
            }
        }
        self.metrics.sessions_live.dec();
    }

    /// A session by id (live or recently purged).
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().sessions.get(id).cloned()
    }

    /// A live session by the capability in its agent URL.
    pub fn by_capability(&self, cap: &str) -> Option<Arc<Session>> {
        let inner = self.lock();
        let id = inner.by_capability.get(cap)?;
        inner.sessions.get(id).cloned()
    }

    /// All known sessions, oldest first.
    pub fn list(&self) -> Vec<Arc<Session>> {
        let mut v: Vec<_> = self.lock().sessions.values().cloned().collect();
        v.sort_by_key(|s| s.created_at);
        v
    }

    /// Changes a live session's mandate (`PATCH /v1/sessions/{id}`, see [`super::patch`]).
    /// A narrowing is put in force first and then audited (`mandate.narrowed`); a widening is
    /// audited first (`mandate.widened`, with `approved_by`) and then put in force. Both records
    /// carry `caller`, the control connection the change came over. Either way the record is
    /// durable before this returns, and the change holds from the session's next request on.
    pub async fn change(
        &self,
        id: &str,
        body: &str,
        caller: serde_json::Value,
    ) -> Result<Changed, RegistryError> {
        let s = self
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        // One change at a time, so each is judged against the mandate the one before left.
        let one = self.changing.lock().await;
        // A detached session's mandate can change too: the change holds from the first
        // request after a resumption (AG-374 4.4).
        if !s.is_running() {
            return Err(RegistryError::NotActive(s.id.clone(), s.state().name()));
        }
        let patched = super::patch::prepare(
            &s.mandate(),
            body,
            OffsetDateTime::now_utc(),
            self.cfg.limits.max_ttl.as_secs(),
        )?;
        let changes_json: Vec<_> = patched.changes.iter().map(|c| c.to_json()).collect();
        let record = json!({
            "agent": s.mandate().source.agent,
            "approved_by": patched.approved_by,
            "caller": caller,
            "changes": changes_json,
            "governance_version": s.governance_version() + 1,
        });
        let widens = patched.widens();
        if widens {
            self.audit
                .record("mandate.widened", Some(&s.id), record.clone())
                .await?;
        }
        let broker = s.broker.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut revocations = Vec::new();
        for id in &patched.removed_credentials {
            let removed = broker.as_ref().and_then(|b| b.remove_credential(id));
            let zeroized = removed.as_ref().map_or(0, |r| r.values);
            self.audit.record_detached(
                "credential.removed",
                Some(&s.id),
                json!({ "credential": id, "values_zeroized": zeroized }),
            );
            revocations.extend(removed.and_then(|r| r.revocation));
        }
        if let Some(b) = &broker {
            b.set_rules(
                patched.mandate.source.unlisted_credentials,
                patched.mandate.source.on_leak,
            );
        }
        let changes = patched.changes;
        s.replace_mandate(patched.mandate, json!(changes_json));
        if !widens {
            self.audit
                .record("mandate.narrowed", Some(&s.id), record)
                .await?;
        }
        drop(one);
        // A removed credential's grant is revoked upstream as the session's end would
        // (AG-120 4.5), once the change is in force and recorded.
        let revoked = self.send_revocations(revocations).await;
        self.record_revocations(&s.id, &revoked).await;
        Ok(Changed {
            session: s,
            changes,
            revoked_upstream: revoked.iter().map(|r| r.audit_fields()).collect(),
        })
    }

    /// Sends credential revocations upstream over the `[upstream]` client; each that cannot be
    /// sent says why.
    pub(super) async fn send_revocations(&self, revocations: Vec<Revocation>) -> Vec<Revoked> {
        match &self.upstream {
            _ if revocations.is_empty() => Vec::new(),
            Ok(u) => u.revoke_all(revocations).await,
            Err(e) => revocations
                .iter()
                .map(|r| Revoked::not_sent(r, e))
                .collect(),
        }
    }

    /// Records each revocation's outcome (`credential.revoked_upstream`, durable).
    pub(super) async fn record_revocations(&self, session: &str, revoked: &[Revoked]) {
        for r in revoked {
            if !r.ok() {
                tracing::warn!(%session, credential = %r.credential, error = r.error.as_deref().unwrap_or(""), "upstream revocation failed");
            }
            let recorded = self
                .audit
                .record(
                    "credential.revoked_upstream",
                    Some(session),
                    r.audit_fields(),
                )
                .await;
            if let Err(e) = recorded {
                tracing::error!(%session, error = %e, "could not record an upstream revocation");
            }
        }
    }

    /// Revokes a session and waits until it is purged.
    pub async fn revoke(&self, id: &str) -> Result<Arc<Session>, RegistryError> {
        let s = self
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        s.request_end(EndReason::Revoked);
        match s.finished().await {
            State::PurgeFailed(_) => Err(RegistryError::PurgeFailed(s.id.clone())),
            _ => Ok(s),
        }
    }

    /// Ends every session (`shutdown`) and waits until all are purged.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        for s in self.list() {
            s.request_end(EndReason::Shutdown);
        }
        self.tasks.close();
        self.tasks.wait().await;
    }
}
