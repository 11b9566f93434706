//! Sessions: one mandate, one sandboxed browser, from launch to verified purge.
//!
//! `requested → launching → active → ending(expired | revoked | anomaly | shutdown | crashed)
//! → purged`. Each transition is in the audit log before it is acknowledged. The supervisor's
//! own clock ends the session at the mandate's deadline, whatever the agent or the sites do.

mod launch;
mod registry;

pub use registry::{Registry, RegistryError};

use std::sync::{Arc, Mutex};

use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::browser::{AgentLink, BrowserConn, CdpError};
use crate::gate::GateObserver;
use crate::mandate::ValidMandate;

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The mandate's deadline passed.
    Expired,
    /// An operator revoked it.
    Revoked,
    /// A revocation trigger fired (reserved for anomaly detection).
    Anomaly,
    /// The supervisor is stopping.
    Shutdown,
    /// The browser died on its own, or a launch failed.
    Crashed,
}

impl EndReason {
    /// The audit event for this ending, e.g. `session.expired`.
    pub fn event(self) -> &'static str {
        match self {
            EndReason::Expired => "session.expired",
            EndReason::Revoked => "session.revoked",
            EndReason::Anomaly => "session.anomaly",
            EndReason::Shutdown => "session.shutdown",
            EndReason::Crashed => "session.crashed",
        }
    }

    /// `expired`, `revoked`, … (the event name without its `session.` prefix).
    pub fn name(self) -> &'static str {
        self.event().trim_start_matches("session.")
    }

    /// What the agent reads in the websocket close frame.
    pub fn close_reason(self) -> &'static str {
        match self {
            EndReason::Expired => "chaperone: session expired (mandate deadline reached)",
            EndReason::Revoked => "chaperone: session revoked by an operator",
            EndReason::Anomaly => "chaperone: session ended by a revocation trigger",
            EndReason::Shutdown => "chaperone: supervisor shutting down",
            EndReason::Crashed => "chaperone: browser crashed; session ended",
        }
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
    /// The mandate.
    pub mandate: ValidMandate,
    /// When it was created.
    pub created_at: OffsetDateTime,
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

    /// The browser, when the session is active.
    pub fn browser(&self) -> Option<BrowserInfo> {
        if self.state() != State::Active {
            return None;
        }
        self.browser
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Asks the lifecycle task to end the session (first request wins).
    pub fn request_end(&self, reason: EndReason) {
        if let Some(tx) = self
            .end_request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = tx.send(reason);
        }
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
        serde_json::json!({
            "id": self.id,
            "agent": self.mandate.source.agent,
            "state": st.name(),
            "end_reason": st.end_reason(),
            "cdp_url": urls.cdp_url(&self.capability),
            "http_url": urls.http_url(&self.capability),
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.mandate.expires_at),
            "degraded": degraded,
            "egress": {
                "allow": self.mandate.source.egress.allow,
                "private_networks": self.mandate.source.egress.private_networks,
                "hosts": self.mandate.source.egress.hosts,
            },
            // Names and sites only: values never leave the vault.
            "credentials": self.mandate.source.credentials.iter().map(|c| serde_json::json!({
                "id": c.id,
                "site": c.site,
                "allowed_initiators": c.allowed_initiators,
                "cookies": c.cookies.iter().map(|k| &k.name).collect::<Vec<_>>(),
                "headers": c.headers.keys().collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "unlisted_credentials": self.mandate.source.unlisted_credentials,
            "on_leak": self.mandate.source.on_leak,
        })
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
        id: random_hex(8),
        capability: random_hex(32),
        mandate,
        created_at: now,
        state: watch::Sender::new(State::Launching),
        ending: CancellationToken::new(),
        browser: Mutex::new(None),
        end_request: Mutex::new(Some(tx)),
    };
    (Arc::new(s), rx)
}
