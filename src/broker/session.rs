//! The broker's CDP side for one session: browser-level Fetch interception on the supervisor's
//! own pipe session, and the per-target `Network` sessions that tell it what Fetch cannot.
//!
//! - **Request stage** (every URL): [`decide`] says continue (maybe with injected or stripped
//!   headers), block, or fail as exfiltration.
//! - **Response stage** (credential sites' navigations, fetch and XHR; see `fetch_patterns`): a
//!   credential site's `Set-Cookie` is taken into the vault. Fetch does not show `Set-Cookie`;
//!   `Network.responseReceivedExtraInfo` on the requesting target's session does, and arrives
//!   first (measured 400/400 on Chromium 156), so the broker holds those responses until that
//!   event is in; the site's other responses are captured as the event arrives. The browser
//!   itself stores nothing for a credential site: its cookies are blocked by policy (see
//!   [`crate::browser::chromium::managed_policy`]).
//! - Every target is auto-attached with `waitForDebuggerOnStart`, given `Network.enable` and
//!   only then resumed, so no request of any page, frame or worker goes out before the broker
//!   can see its `isSameSite` verdict and its response headers.
//!
//! - **Action rules** (the mandate's `actions`, see [`crate::actions`]) are checked at the
//!   Request stage after the credential decision: a request is sent, failed, or held paused
//!   until a human decides ([`BrokerEvents::ask`]). A credential marked `on_approval` rides
//!   only on the one request a human approved.
//!
//! A session without credentials and without action rules is not intercepted at all: there
//! is nothing to protect, and the agent's browser then behaves exactly like a bare Chromium.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use base64::Engine;
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use url::Url;

use super::decide::{decide, header, Context, Decision, Request, Withheld};
use super::oauth;
use super::upstream::{Revocation, Upstream};
use crate::actions::{
    body_fields, visible, ActionDecision, ActionPolicy, Budgets, Reservation, Subject,
};
use crate::approvals::{Approval, Whole};
use crate::browser::conn::FILES_DIR;
use crate::browser::BrowserConn;
use crate::gate::HeldCell;
use crate::mandate::{Credential, OnLeak, UnlistedCredentials, ValidMandate};
use crate::vault::jar::site_of;
use crate::vault::{FingerprintKey, Vault};
use futures_util::future::BoxFuture;

/// How long the broker waits for the `Network` event that belongs to a paused request or
/// response before deciding without it (fail closed: no credentials without a verdict).
pub const CORRELATE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a request held for a human is checked for still being there. Chromium reports an
/// abort as `Network.loadingFailed`, but not a navigation away or a closed tab: for those, the
/// interception itself is gone, which `Fetch.getResponseBody` tells without touching a live one.
const HELD_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How many `Network` facts are kept waiting for their Fetch pause.
const CORRELATION_CAPACITY: usize = 8192;

/// Host of the request that proves the interception works before the agent gets the session.
const PROBE_SUFFIX: &str = ".probe.chaperone.invalid";

/// Where the broker's decisions go: audit records, the session's end on a leak, and requests
/// held for a human.
pub trait BrokerEvents: Send + Sync + 'static {
    /// Writes one audit record for the session.
    fn record(&self, event: &'static str, fields: Value);
    /// A held value was caught leaving and the mandate says `on_leak = "revoke"`.
    fn revoke(&self, reason: &str);
    /// The session's id and its mandate's `agent` label.
    fn who(&self) -> (String, String);
    /// Holds a request for a human (an `approve` rule matched): records
    /// `action.approval_requested` durably, lists `approval` as pending, and resolves with
    /// the decision, or [`Asked::Expired`] once `timeout` passed without one, or
    /// [`Asked::Abandoned`] once `abandoned` is cancelled (the page gave the request up).
    fn ask(
        &self,
        approval: Approval,
        timeout: Duration,
        abandoned: CancellationToken,
    ) -> BoxFuture<'static, Asked>;
}

/// How a request held for a human ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Asked {
    /// Approved by this person: send it, once.
    Approved(String),
    /// Denied by this person.
    Denied(String),
    /// No decision within the mandate's `approval_timeout_secs`.
    Expired,
    /// The session ended while it waited.
    Cancelled,
    /// The page cancelled the request while it waited.
    Abandoned,
    /// The request could not be recorded, so it was never listed.
    NotRecorded(String),
    /// Not listed: why (too many of the session's requests already wait).
    Refused(String),
}

/// A running broker. Dropping it does not stop the interception: that ends with the browser.
#[derive(Clone)]
pub struct Broker {
    state: Arc<State>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

struct State {
    conn: BrowserConn,
    vault: Mutex<Vault>,
    held: Arc<HeldCell>,
    /// The mandate's `unlisted_credentials` and `on_leak`, as in force (a PATCH may change them).
    rules: Mutex<(UnlistedCredentials, OnLeak)>,
    /// No credential is injected before this (a resumed session's quiet period, AG-374 4.11).
    quiet_until: Mutex<Option<std::time::Instant>>,
    events: Arc<dyn BrokerEvents>,
    corr: Mutex<Correlation>,
    /// Coalescing keys of audit records already written.
    recorded: Mutex<HashSet<String>>,
    probe: Mutex<Option<(String, oneshot::Sender<()>)>>,
    /// The supervisor's client for OAuth refreshes.
    upstream: Option<Upstream>,
    /// Cancelled by the purge: the refresh tasks stop.
    stop: CancellationToken,
    /// The mandate's action rules (fixed for the session's life).
    actions: Arc<ActionPolicy>,
    /// Their `max_count` budgets.
    budgets: Arc<Budgets>,
    /// How long a request waits for a human.
    approval_timeout: Duration,
}

/// What the purge leaves to do: how many credentials were dropped, and the upstream
/// revocations built from them just before (their values are zeroized when dropped).
#[derive(Debug, Default)]
pub struct Purged {
    /// Credentials held until the purge.
    pub credentials: usize,
    /// The mandate's `revoke` calls, values filled in, to send now.
    pub revocations: Vec<Revocation>,
}

/// Facts from the per-target `Network` sessions, by network request id.
#[derive(Default)]
struct Correlation {
    same_site: Bounded<bool>,
    extra_info: Bounded<Vec<String>>,
    /// `wss://` sockets by network request id, with their host.
    secure_sockets: Bounded<String>,
    /// Requests to a credential site by network request id: the credential and the URL.
    credential_requests: Bounded<(usize, Url)>,
    waiters: HashMap<String, Vec<oneshot::Sender<()>>>,
    /// Page targets: a request whose `frameId` is one of these comes from a main frame.
    pages: HashSet<String>,
    /// Requests held for a human, by network request id: cancelled when the page gives the
    /// request up. At most `approvals::MAX_PENDING_PER_SESSION` (each removed by its [`Held`]).
    held: HashMap<String, CancellationToken>,
}

/// The ids of a paused request: Fetch's, and the network request's (what `Network` events
/// name), when Chromium gives one.
#[derive(Clone, Copy)]
struct HeldIds<'a> {
    fetch: &'a str,
    network: Option<&'a str>,
}

/// A request held for a human, watched for the page giving it up until this is dropped.
struct Held<'a> {
    corr: &'a Mutex<Correlation>,
    network_id: String,
}

impl<'a> Held<'a> {
    fn watch(
        corr: &'a Mutex<Correlation>,
        network_id: &str,
        abandoned: &CancellationToken,
    ) -> Self {
        lock(corr)
            .held
            .insert(network_id.to_string(), abandoned.clone());
        Held {
            corr,
            network_id: network_id.to_string(),
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        lock(self.corr).held.remove(&self.network_id);
    }
}

impl Correlation {
    fn wake(&mut self, id: &str) {
        for w in self.waiters.remove(id).unwrap_or_default() {
            let _ = w.send(());
        }
    }
}

/// A map that forgets its oldest entries beyond [`CORRELATION_CAPACITY`].
struct Bounded<V> {
    map: HashMap<String, V>,
    order: VecDeque<String>,
}

impl<V> Default for Bounded<V> {
    fn default() -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V> Bounded<V> {
    fn insert(&mut self, k: String, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
        }
        while self.order.len() > CORRELATION_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

/// Every request at the Request stage. At the Response stage, the responses whose cookies the
/// page may use at once (navigations, redirects, fetch and XHR) of the credential sites, held
/// until their `Set-Cookie` is in the vault; the other responses of those sites (images,
/// scripts…) are captured as their headers arrive, without holding them (measured: holding
/// every response doubled the load time of a page with 100 images).
fn fetch_patterns(sites: &[String]) -> Vec<Value> {
    let mut patterns = vec![json!({"urlPattern": "*", "requestStage": "Request"})];
    for site in sites {
        for url in [
            format!("*://{site}/*"),
            format!("*://{site}:*"),
            format!("*://*.{site}/*"),
            format!("*://*.{site}:*"),
        ] {
            for kind in ["Document", "XHR", "Fetch"] {
                patterns.push(json!({
                    "urlPattern": url,
                    "resourceType": kind,
                    "requestStage": "Response",
                }));
            }
        }
    }
    patterns
}

fn wanted(method: &str) -> bool {
    matches!(
        method,
        "Fetch.requestPaused"
            | "Target.attachedToTarget"
            | "Target.detachedFromTarget"
            | "Network.requestWillBeSent"
            | "Network.responseReceivedExtraInfo"
            | "Network.webSocketCreated"
            | "Network.webSocketFrameSent"
            | "Network.loadingFailed"
    )
}

impl Broker {
    /// Starts the broker for `mandate` on `conn`, if the mandate holds credentials or action
    /// rules: enables
    /// browser-level Fetch, auto-attaches every target, and proves the interception works with
    /// a probe request that never leaves the browser. Meanwhile it obtains a first access
    /// token for every `oauth` credential over `upstream`, and then keeps each fresh on its own
    /// task until the purge. Returns `Ok(None)` for a mandate without either, and an
    /// error naming the step when interception cannot be confirmed or a first refresh fails
    /// (the session must not start then).
    pub async fn start(
        conn: &BrowserConn,
        mandate: &ValidMandate,
        credentials: Vec<Credential>,
        key: FingerprintKey,
        events: Arc<dyn BrokerEvents>,
        upstream: Option<Upstream>,
        confirm_within: Duration,
    ) -> Result<Option<Broker>, String> {
        if credentials.is_empty() && mandate.actions.is_empty() {
            return Ok(None);
        }
        let sites: Vec<String> = credentials.iter().map(|c| site_of(&c.site)).collect();
        // The vault copies the values into its own secrets; `credentials` (zeroizing) is
        // dropped at the end of this function.
        let vault = Vault::new(&credentials, key)
            .map_err(|e| format!("vault: a mandate credential was refused: {e}"))?;
        let oauth_creds = vault.oauth_credentials();
        if !oauth_creds.is_empty() && upstream.is_none() {
            return Err(
                "an `oauth` credential needs the supervisor's upstream client, which \
                        could not be set up (see [upstream] in the config)"
                    .into(),
            );
        }
        let held = conn.held();
        held.set(vault.held(FILES_DIR));
        let rx = conn
            .supervisor_sink(wanted)
            .ok_or("the browser connection already has a broker")?;
        let state = Arc::new(State {
            conn: conn.clone(),
            vault: Mutex::new(vault),
            held,
            rules: Mutex::new((mandate.source.unlisted_credentials, mandate.source.on_leak)),
            quiet_until: Mutex::new(None),
            events,
            corr: Mutex::new(Correlation::default()),
            recorded: Mutex::new(HashSet::new()),
            probe: Mutex::new(None),
            upstream,
            stop: CancellationToken::new(),
            budgets: Arc::new(Budgets::new(&mandate.actions)),
            actions: mandate.actions.clone(),
            approval_timeout: mandate.approval_timeout,
        });
        tokio::spawn(event_loop(state.clone(), rx));

        let first_tokens = async {
            let mut due = Vec::with_capacity(oauth_creds.len());
            for &cred in &oauth_creds {
                match state.refresh(cred, true).await {
                    Ok(d) => due.push((cred, d)),
                    Err(e) => {
                        let id = id_of(&state, cred);
                        return Err(format!("oauth refresh for `{id}` failed: {e}"));
                    }
                }
            }
            Ok(due)
        };
        let (intercepting, first_tokens) =
            tokio::join!(state.intercept(conn, &sites, confirm_within), first_tokens);
        let first_tokens = match (intercepting, first_tokens) {
            (Ok(()), Ok(due)) => due,
            (Err(e), _) | (_, Err(e)) => {
                state.stop.cancel();
                return Err(e);
            }
        };
        for (cred, due) in first_tokens {
            tokio::spawn(refresh_loop(
                Arc::downgrade(&state),
                state.stop.clone(),
                cred,
                due,
            ));
        }
        // AG-120 4.6, creation: what the session holds from its start, by token identifier.
        let loaded: Vec<(String, String, Vec<String>)> = lock(&state.vault)
            .credentials()
            .iter()
            .map(|c| (c.id.clone(), c.site.clone(), c.token_ids()))
            .collect();
        for (credential, site, tokens) in loaded {
            state.events.record(
                "credential.loaded",
                json!({ "credential": credential, "site": site, "tokens": tokens }),
            );
        }
        Ok(Some(Broker { state }))
    }

    /// What the gate keeps from agents (kept current by the broker).
    pub fn held(&self) -> Arc<HeldCell> {
        self.state.held.clone()
    }

    /// Puts a changed mandate's `unlisted_credentials` and `on_leak` in force from the next
    /// request on.
    pub fn set_rules(&self, unlisted: UnlistedCredentials, on_leak: OnLeak) {
        *lock(&self.state.rules) = (unlisted, on_leak);
    }

    /// Injects no credential for `quiet` from now on (a resumed session's quiet period):
    /// requests to credential sites go without them, audited as `credential.withheld`.
    /// Stripping and leak checks go on as always.
    pub fn quiet_for(&self, quiet: std::time::Duration) {
        *lock(&self.state.quiet_until) = Some(std::time::Instant::now() + quiet);
    }

    /// The ids of the credentials the vault holds now (not those a narrowed mandate removed).
    pub fn credential_ids(&self) -> Vec<String> {
        lock(&self.state.vault)
            .credentials()
            .iter()
            .filter(|c| !c.is_removed())
            .map(|c| c.id.clone())
            .collect()
    }

    /// Takes a credential away (a narrowed mandate): its values are dropped and zeroized at
    /// once, the gate stops treating its cookies as held, and its site is handled as a site
    /// without a credential from the next request on. Returns how many values were dropped
    /// and its upstream revocation (for the caller to send), or `None` when the session holds
    /// no such credential.
    pub fn remove_credential(&self, id: &str) -> Option<crate::vault::Removed> {
        let mut vault = lock(&self.state.vault);
        let dropped = vault.remove(id)?;
        self.state.held.set(vault.held(FILES_DIR));
        Some(dropped)
    }

    /// Part of the purge: stops the refreshes, builds the mandate's upstream revocations from
    /// the values still held, then drops (and so zeroizes) every held value, in the vault and
    /// in the gate's view, and stops injecting. All under one lock, so no refresh lands in
    /// between. The caller sends the revocations (their copies are zeroized when dropped).
    pub fn purge(&self) -> Purged {
        self.state.stop.cancel();
        let mut vault = lock(&self.state.vault);
        let purged = Purged {
            credentials: vault.credentials().len(),
            revocations: vault.revocations(),
        };
        *vault = Vault::empty();
        self.state.held.set(crate::gate::Held::nothing(FILES_DIR));
        purged
    }

    /// `host` with held values cut out, for logs and audit records.
    pub fn shown_host(&self, host: &str) -> String {
        self.state.shown_host(host)
    }

    /// The egress proxy's check for traffic Fetch never sees (WebSocket handshakes in
    /// tunnels, CONNECT host names, Chromium's own requests): whether `material` bound for
    /// `host` carries a held value that does not belong to `host`'s site. A finding is audited
    /// and handled like one at the Request stage (`on_leak`).
    pub fn egress_leak(&self, host: &str, material: &[u8]) -> bool {
        let finding = {
            let vault = lock(&self.state.vault);
            let home = vault.credential_for_site(&site_of(host.trim_matches(['[', ']'])));
            vault.detector_for(home).and_then(|d| {
                let f = d.find(material)?;
                Some((
                    vault
                        .owner_of_finding(home, f.secret)
                        .unwrap_or("?")
                        .to_string(),
                    f,
                ))
            })
        };
        match finding {
            Some((credential, f)) => {
                self.state.leak(
                    host,
                    &credential,
                    "egress",
                    &format!("{:?}", f.encoding),
                    lock(&self.state.rules).1,
                );
                true
            }
            None => false,
        }
    }
}

impl State {
    /// Enables browser-level Fetch for every URL (and the credential `sites`' responses),
    /// auto-attaches every target, and proves it works with a probe request that only an
    /// active interception can answer.
    async fn intercept(
        &self,
        conn: &BrowserConn,
        sites: &[String],
        confirm_within: Duration,
    ) -> Result<(), String> {
        let step = |what: &'static str| move |e| format!("{what}: {e}");
        conn.call(
            "Fetch.enable",
            json!({ "patterns": fetch_patterns(sites) }),
            None,
        )
        .await
        .map_err(step("Fetch.enable"))?;
        conn.call(
            "Target.setAutoAttach",
            json!({"autoAttach": true, "waitForDebuggerOnStart": true, "flatten": true}),
            None,
        )
        .await
        .map_err(step("Target.setAutoAttach"))?;

        // The probe: a request that only an active interception can answer.
        let nonce = hex::encode(rand::random::<[u8; 8]>());
        let (tx, rx) = oneshot::channel();
        *lock(&self.probe) = Some((nonce.clone(), tx));
        let created = conn
            .call(
                "Target.createTarget",
                json!({"url": format!("http://{nonce}{PROBE_SUFFIX}/"), "background": true}),
                None,
            )
            .await
            .map_err(step("the interception probe's target"))?;
        let confirmed = tokio::time::timeout(confirm_within, rx).await;
        if let Some(target) = created.get("targetId").and_then(Value::as_str) {
            let _ = conn
                .call("Target.closeTarget", json!({"targetId": target}), None)
                .await;
        }
        match confirmed {
            Ok(Ok(())) => Ok(()),
            _ => Err(format!(
                "request interception could not be confirmed within {confirm_within:?}: the \
                 probe request never reached the broker"
            )),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn event_loop(state: Arc<State>, mut rx: mpsc::UnboundedReceiver<Arc<Value>>) {
    while let Some(event) = rx.recv().await {
        let method = event.get("method").and_then(Value::as_str).unwrap_or("");
        let params = event.get("params").cloned().unwrap_or(Value::Null);
        match method {
            "Fetch.requestPaused" => {
                // Never from an agent: agents' sessions are routed to them, and browser-level
                // Fetch is refused to agents. Each pause is handled on its own task so a wait
                // for its Network facts never holds up the events that bring them.
                let state = state.clone();
                tokio::spawn(async move { state.paused(params).await });
            }
            "Target.attachedToTarget" => state.attached(params),
            "Target.detachedFromTarget" => {
                if let Some(t) = params
                    .pointer("/targetInfo/targetId")
                    .or_else(|| params.get("targetId"))
                    .and_then(Value::as_str)
                {
                    lock(&state.corr).pages.remove(t);
                }
            }
            "Network.requestWillBeSent" => {
                let Some(id) = params.get("requestId").and_then(Value::as_str) else {
                    continue;
                };
                // Remember which requests go to a credential site, so that their cookies can
                // be captured from the response headers whenever those come.
                if let Some(Ok(url)) = params
                    .pointer("/request/url")
                    .and_then(Value::as_str)
                    .map(Url::parse)
                {
                    let site = site_of(url.host_str().unwrap_or(""));
                    if let Some(cred) = lock(&state.vault).credential_for_site(&site) {
                        lock(&state.corr)
                            .credential_requests
                            .insert(id.to_string(), (cred, url));
                    }
                }
                let Some(same) = params
                    .pointer("/request/isSameSite")
                    .and_then(Value::as_bool)
                else {
                    continue;
                };
                let mut corr = lock(&state.corr);
                corr.same_site.insert(id.to_string(), same);
                corr.wake(id);
            }
            "Network.responseReceivedExtraInfo" => {
                let Some(id) = params.get("requestId").and_then(Value::as_str) else {
                    continue;
                };
                let mut lines = set_cookie_lines(params.get("headers"));
                let known = lock(&state.corr).credential_requests.map.get(id).cloned();
                if let (false, Some((cred, url))) = (lines.is_empty(), known) {
                    // Captured here, before anyone waiting on this response is woken.
                    state.capture(cred, &url, &lines);
                    lines.clear();
                }
                let mut corr = lock(&state.corr);
                corr.extra_info.insert(id.to_string(), lines);
                corr.wake(id);
            }
            "Network.webSocketCreated" | "Network.webSocketFrameSent" => {
                state.websocket(method, &params)
            }
            "Network.loadingFailed" => {
                let id = params.get("requestId").and_then(Value::as_str);
                if let Some(held) = id.and_then(|id| lock(&state.corr).held.get(id).cloned()) {
                    held.cancel();
                }
            }
            _ => {}
        }
    }
}

/// The `Set-Cookie` lines of a raw header object (several cookies arrive joined by `\n`).
fn set_cookie_lines(headers: Option<&Value>) -> Vec<String> {
    let Some(Value::Object(h)) = headers else {
        return Vec::new();
    };
    h.iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .filter_map(|(_, v)| v.as_str())
        .flat_map(|v| v.split('\n'))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

impl State {
    fn record(&self, event: &'static str, fields: Value) {
        self.events.record(event, fields);
    }

    /// Records once per `key`: repeats of the same fact are coalesced.
    fn record_once(&self, key: String, event: &'static str, fields: Value) {
        if lock(&self.recorded).insert(key) {
            self.record(event, fields);
        }
    }

    /// A new target (or worker, or frame) on a supervisor session: give it `Network`, attach
    /// its children the same way, then let it run.
    fn attached(self: &Arc<Self>, params: Value) {
        let Some(session) = params.get("sessionId").and_then(Value::as_str) else {
            return;
        };
        let kind = params
            .pointer("/targetInfo/type")
            .and_then(Value::as_str)
            .unwrap_or("");
        // Browser-target sessions announced on the root are agents' own connections
        // (`attachToBrowserTarget`), announced before the router knows whose they are.
        if kind == "browser" {
            return;
        }
        if kind == "page" {
            if let Some(t) = params
                .pointer("/targetInfo/targetId")
                .and_then(Value::as_str)
            {
                lock(&self.corr).pages.insert(t.to_string());
            }
        }
        let waiting = params
            .get("waitingForDebugger")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let session = session.to_string();
        let conn = self.conn.clone();
        // A tab target only holds its page; the page, frames and workers make the requests.
        let network_kind = kind != "tab";
        let kind = kind.to_string();
        tokio::spawn(async move {
            let s = Some(session.as_str());
            // Sent in this order on one session, and Chromium handles a session's commands in
            // order: Network is on before the target runs.
            let (network, children, run) = tokio::join!(
                async {
                    if network_kind {
                        let (enabled, _) = tokio::join!(
                            conn.call(
                                "Network.enable",
                                json!({"maxTotalBufferSize": 0, "maxResourceBufferSize": 0, "maxPostDataSize": 0}),
                                s,
                            ),
                            // The broker never reads initiator stacks; collecting them for every
                            // request is the costliest part of Network events.
                            conn.call("Network.setAttachDebugStack", json!({"enabled": false}), s),
                        );
                        enabled.map(|_| ())
                    } else {
                        Ok(())
                    }
                },
                conn.call(
                    "Target.setAutoAttach",
                    json!({"autoAttach": true, "waitForDebuggerOnStart": true, "flatten": true}),
                    s
                ),
                async {
                    if waiting {
                        conn.call("Runtime.runIfWaitingForDebugger", json!({}), s)
                            .await
                            .map(|_| ())
                    } else {
                        Ok(())
                    }
                }
            );
            if let Err(e) = network {
                tracing::warn!(error = %e, %kind, "Network.enable on a new target failed");
            }
            // Workers without children answer "not supported" here; that is fine.
            let _ = children;
            if let Err(e) = run {
                tracing::warn!(error = %e, %kind, "resuming a new target failed");
            }
        });
    }

    async fn paused(self: Arc<Self>, p: Value) {
        let Some(id) = p
            .get("requestId")
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            return;
        };
        let response_stage =
            p.get("responseStatusCode").is_some() || p.get("responseErrorReason").is_some();
        let outcome = if response_stage {
            self.response(&p).await;
            self.conn
                .call("Fetch.continueResponse", json!({"requestId": id}), None)
                .await
        } else {
            match self.request(&p).await {
                Action::Continue(headers, sent) => {
                    let params = match headers {
                        None => json!({"requestId": id}),
                        Some(headers) => {
                            let headers: Vec<Value> = headers
                                .into_iter()
                                .map(|(name, value)| json!({"name": name, "value": value}))
                                .collect();
                            json!({"requestId": id, "headers": headers})
                        }
                    };
                    let outcome = self.conn.call("Fetch.continueRequest", params, None).await;
                    // Counted only once sent; a request cancelled meanwhile gives its place back.
                    if let (Ok(_), Some(r)) = (&outcome, sent) {
                        let rule = r.rule();
                        let (count, max_count) = r.commit();
                        if max_count.is_some() {
                            self.record(
                                "action.sent",
                                json!({"rule": rule, "count": count, "max_count": max_count}),
                            );
                        }
                    }
                    outcome
                }
                Action::Fail => {
                    self.conn
                        .call(
                            "Fetch.failRequest",
                            json!({"requestId": id, "errorReason": "BlockedByClient"}),
                            None,
                        )
                        .await
                }
            }
        };
        if let Err(e) = outcome {
            // The request was cancelled meanwhile (tab closed, navigation replaced it).
            tracing::info!(error = %e, "a paused request could not be resumed");
        }
    }

    /// Waits until `ready` holds for network request `id`, at most [`CORRELATE_TIMEOUT`].
    async fn wait_for(&self, id: &str, ready: impl Fn(&Correlation) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + CORRELATE_TIMEOUT;
        loop {
            let rx = {
                let mut corr = lock(&self.corr);
                if ready(&corr) {
                    return true;
                }
                let (tx, rx) = oneshot::channel();
                corr.waiters.entry(id.to_string()).or_default().push(tx);
                rx
            };
            if tokio::time::timeout_at(deadline, rx).await.is_err() {
                lock(&self.corr).waiters.remove(id);
                return false;
            }
        }
    }

    async fn request(&self, p: &Value) -> Action {
        let raw_url = p
            .pointer("/request/url")
            .and_then(Value::as_str)
            .unwrap_or("");
        let Ok(url) = Url::parse(raw_url) else {
            // Nothing can vouch for a request whose URL cannot be read.
            self.record(
                "credential.blocked",
                json!({"host": "", "reason": "the request's URL could not be parsed"}),
            );
            return Action::Fail;
        };
        if !matches!(url.scheme(), "http" | "https") {
            return Action::Continue(None, None);
        }
        let host = url.host_str().unwrap_or("").to_string();
        if let Some(nonce) = host.strip_suffix(PROBE_SUFFIX) {
            let mut probe = lock(&self.probe);
            if probe.as_ref().is_some_and(|(n, _)| n == nonce) {
                if let Some((_, tx)) = probe.take() {
                    let _ = tx.send(());
                }
            }
            return Action::Fail;
        }
        let method = p
            .pointer("/request/method")
            .and_then(Value::as_str)
            .unwrap_or("GET");
        let headers: Vec<(String, String)> = match p.pointer("/request/headers") {
            Some(Value::Object(h)) => h
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect(),
            _ => Vec::new(),
        };
        let (body, opaque) = request_body(p);
        let site = site_of(host.trim_matches(['[', ']']));
        let credential_site = lock(&self.vault).credential_for_site(&site).is_some();
        let frame = p.get("frameId").and_then(Value::as_str).unwrap_or("");
        let mut context = Context {
            document: p.get("resourceType").and_then(Value::as_str) == Some("Document"),
            main_frame: lock(&self.corr).pages.contains(frame),
            same_site: None,
            approved: false,
        };
        if credential_site {
            if p.get("networkId").is_none() {
                tracing::info!(%site, main_frame = context.main_frame, "a credential site's request has no network id: deciding without Chromium's same-site verdict");
            }
            if let Some(nid) = p.get("networkId").and_then(Value::as_str) {
                self.wait_for(nid, |c| c.same_site.map.contains_key(nid))
                    .await;
                context.same_site = lock(&self.corr).same_site.map.get(nid).copied();
            }
        }

        if opaque {
            // A streamed upload, or a form upload with a file part: Fetch does not show all of
            // it, so nothing can vouch that it carries no held value, or what a rule would say.
            self.record(
                "credential.blocked",
                json!({"host": host, "reason": "the request body is a stream, or has a part (a file), the broker cannot inspect"}),
            );
            return Action::Fail;
        }

        let first = self.decide_now(&url, method, &headers, &body, context.clone());
        // Rules are checked after the credential decisions: what those refuse stays refused,
        // without asking anyone.
        if self.actions.is_empty() || !matches!(first.decision, Decision::Continue { .. }) {
            return self.act_on(first, &host, &headers, None);
        }
        let held = HeldIds {
            fetch: p.get("requestId").and_then(Value::as_str).unwrap_or(""),
            network: p.get("networkId").and_then(Value::as_str),
        };
        match self
            .check_actions(&url, method, &headers, &body, held)
            .await
        {
            Gate::Pass(sent) => self.act_on(first, &host, &headers, sent),
            Gate::Fail => Action::Fail,
            Gate::Approved(sent) => {
                // Decided again as the request now stands: the vault may have changed while it
                // waited, and an `on_approval` credential may ride on this one request.
                context.approved = true;
                let second = self.decide_now(&url, method, &headers, &body, context);
                self.act_on(second, &host, &headers, Some(sent))
            }
        }
    }

    /// The credential decision for a request, with the names its audit records need.
    fn decide_now(
        &self,
        url: &Url,
        method: &str,
        headers: &[(String, String)],
        body: &[u8],
        context: Context,
    ) -> Decided {
        let vault = lock(&self.vault);
        let req = Request {
            url,
            method,
            headers,
            body,
            context,
        };
        let d = decide(&req, &vault, lock(&self.rules).0);
        let quiet = lock(&self.quiet_until).is_some_and(|t| std::time::Instant::now() < t);
        // During a quiet period an injection becomes a withholding: the request goes as
        // the browser made it, which for a credential site means without credentials.
        let d = match d {
            Decision::Continue {
                injected: Some(inj),
                ..
            } if quiet => Decision::Continue {
                headers: None,
                injected: None,
                stripped: Vec::new(),
                withheld: Some((inj.credential, Withheld::Quiet)),
            },
            d => d,
        };
        // Names for the audit record, read while the vault is at hand.
        let name_of = |i: usize| vault.credentials()[i].id.clone();
        let (injected_name, withheld) = match &d {
            Decision::Continue {
                injected, withheld, ..
            } => (
                injected.as_ref().map(|i| name_of(i.credential)),
                withheld.map(|(i, why)| (name_of(i), why.reason())),
            ),
            _ => (None, None),
        };
        Decided {
            decision: d,
            injected_name,
            withheld,
        }
    }

    /// Audits a credential decision and turns it into what the Fetch pause gets. `sent` is
    /// the action rule's budget place, committed once the request is sent.
    fn act_on(
        &self,
        decided: Decided,
        host: &str,
        headers: &[(String, String)],
        sent: Option<Reservation>,
    ) -> Action {
        let Decided {
            decision,
            injected_name,
            withheld,
        } = decided;
        match decision {
            Decision::Continue {
                headers: new_headers,
                injected,
                stripped,
                ..
            } => {
                if let (Some(inj), Some(name)) = (&injected, &injected_name) {
                    self.record_once(
                        format!("inj|{name}|{host}|{}", inj.tokens.join(",")),
                        "credential.injected",
                        json!({"credential": name, "host": host, "tokens": inj.tokens}),
                    );
                }
                if let Some((name, why_withheld)) = withheld {
                    let initiator = header(headers, "origin")
                        .or_else(|| header(headers, "referer"))
                        .and_then(|v| Url::parse(v).ok())
                        .and_then(|u| u.host_str().map(site_of))
                        .unwrap_or_default();
                    self.record_once(
                        format!("wh|{name}|{host}|{initiator}|{why_withheld}"),
                        "credential.withheld",
                        json!({"credential": name, "host": host, "initiator": initiator,
                               "reason": why_withheld}),
                    );
                }
                if !stripped.is_empty() {
                    self.record_once(
                        format!("st|{host}|{}", stripped.join(",")),
                        "credential.stripped",
                        json!({"host": host, "headers": stripped}),
                    );
                }
                Action::Continue(new_headers, sent)
            }
            Decision::ScopeEscalation {
                credential,
                requested_extra,
            } => {
                self.record(
                    "credential.scope_escalation_blocked",
                    json!({"credential": credential, "host": host,
                           "requested_extra": requested_extra,
                           "reason": "a request to the credential's token endpoint asked for scope beyond the grant"}),
                );
                Action::Fail
            }
            Decision::Block { headers: names } => {
                self.record(
                    "credential.blocked",
                    json!({"host": host, "headers": names,
                           "reason": "authentication headers to a site without a credential (unlisted_credentials = \"block\")"}),
                );
                Action::Fail
            }
            Decision::Exfiltration {
                credential,
                location,
                encoding,
            } => {
                self.leak(
                    host,
                    &credential,
                    &location.name(),
                    &format!("{encoding:?}"),
                    lock(&self.rules).1,
                );
                Action::Fail
            }
        }
    }

    /// The mandate's action rules for a request the credential decision lets through.
    async fn check_actions(
        &self,
        url: &Url,
        method: &str,
        headers: &[(String, String)],
        body: &[u8],
        held: HeldIds<'_>,
    ) -> Gate {
        // A CORS preflight is the browser asking, not the page acting: no rule is asked
        // about it and it is not counted (it carries no body, and no credential rides on it
        // unless a human approved it, which nobody can).
        if method.eq_ignore_ascii_case("OPTIONS")
            && header(headers, "access-control-request-method").is_some()
        {
            return Gate::Pass(None);
        }
        let subject = Subject {
            method,
            url,
            headers,
            body,
        };
        let Some(m) = self.actions.first_match(&subject) else {
            return Gate::Pass(None);
        };
        let rule = m.describe();
        // Held values are cut out before the text is cut short, so no part of one can show.
        let shown_url = capped(&self.shown_text(url.as_str())).into_owned();
        let shown_method = capped(&self.shown_text(method)).into_owned();
        let denied = |by: &str, reason: String| {
            self.record(
                "action.denied",
                json!({"decided_by": by, "rule": rule, "method": shown_method,
                       "url": shown_url, "url_bytes": url.as_str().len(), "reason": reason}),
            );
            Gate::Fail
        };
        let spent = |max: Option<u64>| {
            format!(
                "the rule's budget is spent: max_count = {} requests over the session's life",
                max.unwrap_or(0)
            )
        };
        match m.rule.decision {
            ActionDecision::Deny => denied("rule", "an action rule denies it".into()),
            ActionDecision::Allow => match self.budgets.reserve(m.index) {
                Some(r) => Gate::Pass(Some(r)),
                None => denied("budget", spent(m.rule.max_count)),
            },
            ActionDecision::Approve => {
                // Nobody is asked about a request that could not be sent anyway.
                if !self.budgets.has_room(m.index) {
                    return denied("budget", spent(m.rule.max_count));
                }
                let (session, agent) = self.events.who();
                let now = time::OffsetDateTime::now_utc();
                let first: Vec<String> = m.rule.matches.fields.keys().cloned().collect();
                let initiator = header(headers, "origin")
                    .or_else(|| header(headers, "referer"))
                    .and_then(|v| Url::parse(v).ok())
                    .map(|u| u.origin().ascii_serialization())
                    .unwrap_or_default();
                // The just-in-time credential that would ride on it, if approved.
                let credential = {
                    let vault = lock(&self.vault);
                    let host = url.host_str().unwrap_or("");
                    vault
                        .credential_for_site(&site_of(host.trim_matches(['[', ']'])))
                        .map(|i| &vault.credentials()[i])
                        .filter(|c| c.on_approval)
                        .map(|c| c.id.clone())
                };
                let approval = Approval {
                    id: crate::approvals::new_id(),
                    session,
                    agent,
                    method: shown_method.clone(),
                    url: shown_url.clone(),
                    url_bytes: url.as_str().len(),
                    initiator: self.shown_text(&initiator),
                    credential,
                    rule: rule.clone(),
                    body: self.body_view(header(headers, "content-type"), body, &first, LISTED),
                    requested_at: crate::session::rfc3339(now),
                    expires_at: crate::session::rfc3339(now + self.approval_timeout),
                    whole: Some(Whole {
                        url: capped_to(&self.shown_text(url.as_str()), WHOLE.url).into_owned(),
                        body: self.body_view(header(headers, "content-type"), body, &first, WHOLE),
                    }),
                };
                let approval = self.scrubbed(approval);
                // The page may give the request up while it waits (an abort, a navigation, a
                // closed tab): the wait then ends, and the human is no longer asked.
                let abandoned = CancellationToken::new();
                let _watch = held
                    .network
                    .map(|nid| Held::watch(&self.corr, nid, &abandoned));
                let asked = self
                    .events
                    .ask(approval, self.approval_timeout, abandoned.clone());
                tokio::pin!(asked);
                let mut probe = tokio::time::interval(HELD_PROBE_INTERVAL);
                probe.tick().await;
                let asked = loop {
                    tokio::select! {
                        a = &mut asked => break a,
                        _ = probe.tick(), if !abandoned.is_cancelled() => {
                            if self.is_gone(held.fetch).await {
                                abandoned.cancel();
                            }
                        }
                    }
                };
                match asked {
                    Asked::Approved(_) => match self.budgets.reserve(m.index) {
                        Some(r) => Gate::Approved(r),
                        // Another approved request took the last place meanwhile.
                        None => denied("budget", spent(m.rule.max_count)),
                    },
                    // Recorded where they happened (the decision, the expiry).
                    Asked::Denied(_) | Asked::Expired | Asked::Cancelled | Asked::Abandoned => {
                        Gate::Fail
                    }
                    Asked::Refused(why) => denied("limit", why),
                    Asked::NotRecorded(e) => {
                        tracing::error!(error = %e, "a request for approval could not be audited; it is failed");
                        Gate::Fail
                    }
                }
            }
        }
    }

    /// Whether the paused request `fetch_id` is gone (the page gave it up). Asking for the
    /// body of a request not yet answered fails either way, and says which: a live one is in
    /// the wrong state, a gone one is unknown. Any other answer counts as still there.
    async fn is_gone(&self, fetch_id: &str) -> bool {
        let probe = json!({ "requestId": fetch_id });
        match self.conn.call("Fetch.getResponseBody", probe, None).await {
            Err(crate::browser::CdpError::Protocol { message, .. }) => {
                message.contains("Invalid InterceptionId")
            }
            _ => false,
        }
    }

    /// `text` with every held value cut out.
    fn shown_text(&self, text: &str) -> String {
        let vault = lock(&self.vault);
        vault
            .detector_for(None)
            .and_then(|d| d.redact(text))
            .unwrap_or_else(|| text.to_string())
    }

    /// What a human deciding on a request sees of its body, up to `shown`'s limits: form or
    /// JSON fields (the rule's own first), or the start of any other body; held values cut
    /// out, hidden characters shown.
    fn body_view(
        &self,
        content_type: Option<&str>,
        body: &[u8],
        first: &[String],
        shown: Shown,
    ) -> Value {
        let mut out = json!({"content_type": content_type.map(visible), "bytes": body.len()});
        match body_fields(content_type, body, first, shown.fields) {
            Some((fields, total)) => {
                out["fields_total"] = total.into();
                out["truncated"] = (total > fields.len()).into();
                out["fields"] = fields
                    .into_iter()
                    .map(
                        |(k, v)| json!({"name": self.shown_text(&k), "value": self.shown_text(&v)}),
                    )
                    .collect();
            }
            None if body.is_empty() => {}
            None => {
                // Cut out before cut short, so no part of a held value can show.
                let whole = self.shown_text(&visible(&String::from_utf8_lossy(body)));
                let text: String = whole.chars().take(shown.text).collect();
                out["truncated"] = (whole.len() > text.len()).into();
                out["text"] = text.into();
                out["readable"] = false.into();
            }
        }
        out
    }

    /// The last word on what an approval may show: if its text still carries a held value
    /// in any form the detector knows, method, URL, initiator and body are replaced by markers.
    fn scrubbed(&self, mut a: Approval) -> Approval {
        let vault = lock(&self.vault);
        let Some(d) = vault.detector_for(None) else {
            return a;
        };
        let text = serde_json::to_string(&a).unwrap_or_default();
        let whole = serde_json::to_string(&a.whole).unwrap_or_default();
        if d.find(text.as_bytes()).is_some() || d.find(whole.as_bytes()).is_some() {
            a.method = "[held value]".into();
            a.url = "[held value]".into();
            a.initiator = "[held value]".into();
            a.body = json!({"redacted": "the request carried a held value"});
            a.whole = None;
        }
        a
    }

    fn leak(&self, host: &str, credential: &str, location: &str, encoding: &str, on_leak: OnLeak) {
        let action = match on_leak {
            OnLeak::Revoke => "revoke",
            OnLeak::Block => "block",
        };
        // The host itself may be the carrier (a secret as a DNS label): never record it as is.
        let host = self.shown_host(host);
        self.record(
            "credential.exfiltration_blocked",
            json!({"host": host, "credential": credential, "where": location,
                   "encoding": encoding.to_ascii_lowercase(), "action": action}),
        );
        if on_leak == OnLeak::Revoke {
            self.events.revoke(&format!(
                "a held value of credential `{credential}` was sent towards {host}"
            ));
        }
    }

    /// `host` as audit records and logs may show it: with every held value in it replaced.
    fn shown_host(&self, host: &str) -> String {
        let vault = lock(&self.vault);
        vault
            .detector_for(None)
            .map_or_else(|| host.to_string(), |d| shown_host(d, host))
    }

    async fn response(&self, p: &Value) {
        let raw_url = p
            .pointer("/request/url")
            .and_then(Value::as_str)
            .unwrap_or("");
        let Ok(url) = Url::parse(raw_url) else {
            return;
        };
        let host = url.host_str().unwrap_or("").to_string();
        let Some(cred) = lock(&self.vault).credential_for_site(&site_of(&host)) else {
            return;
        };
        let Some(nid) = p.get("networkId").and_then(Value::as_str) else {
            tracing::warn!(site = %site_of(&host), "a credential site's response has no network id; its cookies cannot be captured");
            return;
        };
        if !self
            .wait_for(nid, |c| c.extra_info.map.contains_key(nid))
            .await
        {
            tracing::warn!(site = %site_of(&host), "no response headers arrived for a credential site's response; its cookies were not captured");
            return;
        }
        let lines = lock(&self.corr)
            .extra_info
            .map
            .remove(nid)
            .unwrap_or_default();
        if lines.is_empty() {
            return;
        }
        self.capture(cred, &url, &lines);
    }

    /// Takes `Set-Cookie` lines received from `url` into credential `cred`'s jar.
    fn capture(&self, cred: usize, url: &Url, lines: &[String]) {
        let host = url.host_str().unwrap_or("").to_string();
        let mut captured = Vec::new();
        {
            let mut vault = lock(&self.vault);
            if cred >= vault.credentials().len() {
                return;
            }
            for line in lines {
                match vault.capture(cred, line, url) {
                    Ok((token, cookie)) => {
                        captured.push((vault.credentials()[cred].id.clone(), cookie, token))
                    }
                    Err(e) => {
                        tracing::info!(site = %site_of(&host), error = %e, "a Set-Cookie was not captured")
                    }
                }
            }
            if !captured.is_empty() {
                self.held.set(vault.held(FILES_DIR));
            }
        }
        for (credential, cookie, token) in captured {
            self.record(
                "credential.captured",
                json!({"credential": credential, "host": host, "cookie": cookie, "token": token}),
            );
        }
    }

    /// WebSocket handshakes and frames never reach Fetch. Over `ws://` the egress proxy sees
    /// the handshake and the (masked, not encrypted) frames and stops a held value before it
    /// leaves, as `on_leak` says; a `wss://` host name is checked by the proxy before the
    /// tunnel opens. What nobody can hold back is a `wss://` URL path or frame: these events
    /// arrive as the socket opens or the frame is sent, so a held value there ends the session
    /// at once, whatever `on_leak` says.
    fn websocket(&self, method: &str, params: &Value) {
        let Some(id) = params.get("requestId").and_then(Value::as_str) else {
            return;
        };
        let (host, material, location) = if method == "Network.webSocketCreated" {
            let Some(Ok(url)) = params.get("url").and_then(Value::as_str).map(Url::parse) else {
                return;
            };
            if url.scheme() != "wss" {
                return;
            }
            let host = url.host_str().unwrap_or("").to_string();
            lock(&self.corr)
                .secure_sockets
                .insert(id.to_string(), host.clone());
            let mut rest = url.clone();
            let _ = rest.set_host(Some("h.invalid"));
            (host, rest.to_string().into_bytes(), "websocket_url")
        } else {
            let Some(host) = lock(&self.corr).secure_sockets.map.get(id).cloned() else {
                return;
            };
            let payload = params
                .pointer("/response/payloadData")
                .and_then(Value::as_str)
                .unwrap_or("");
            (host, payload.as_bytes().to_vec(), "websocket_frame")
        };
        let finding = {
            let vault = lock(&self.vault);
            let home = vault.credential_for_site(&site_of(&host));
            vault.detector_for(home).and_then(|d| {
                let f = d.find(&material)?;
                Some((
                    vault
                        .owner_of_finding(home, f.secret)
                        .unwrap_or("?")
                        .to_string(),
                    f,
                ))
            })
        };
        if let Some((credential, f)) = finding {
            tracing::warn!(%location, "a held value went into a wss:// WebSocket, which cannot be held back: revoking the session");
            self.leak(
                &host,
                &credential,
                location,
                &format!("{:?}", f.encoding),
                OnLeak::Revoke,
            );
        }
    }
}

/// When a credential's access token is due for a refresh, and when it gets too old to inject.
#[derive(Clone, Copy, Debug)]
struct Due {
    refresh_at: Instant,
    stale_at: Instant,
    lifetime: Duration,
}

/// Why a refresh brought no token.
#[derive(Debug)]
enum RefreshFailure {
    /// The credential is gone (purged or removed): stop refreshing.
    Gone,
    /// The token endpoint granted more scope than the mandate holds (audited as a refusal).
    Rejected(String),
    /// Any other failure.
    Failed(String),
}

impl std::fmt::Display for RefreshFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefreshFailure::Gone => f.write_str("the credential is no longer held"),
            RefreshFailure::Rejected(e) | RefreshFailure::Failed(e) => f.write_str(e),
        }
    }
}

impl State {
    /// One refresh of credential `cred`'s access token: the grant with the mandate's scope, a
    /// check that the answer grants no more (AG-120 4.3), then the new token in force and
    /// audited by fingerprint (AG-120 4.6).
    async fn refresh(&self, cred: usize, initial: bool) -> Result<Due, RefreshFailure> {
        let Some(m) = lock(&self.vault).refresh_material(cred) else {
            return Err(RefreshFailure::Gone);
        };
        let upstream = self
            .upstream
            .as_ref()
            .ok_or_else(|| RefreshFailure::Failed("no upstream client".into()))?;
        let host = m.endpoint.host_str().unwrap_or_default().to_string();
        let grant = oauth::exchange(upstream, &m.endpoint, &m.form)
            .await
            .map_err(|e| RefreshFailure::Failed(e.to_string()))?;
        let granted = grant.scope.clone().unwrap_or_else(|| m.scope.clone());
        let extra = oauth::beyond(&granted, &m.scope);
        if !extra.is_empty() {
            let (token, extra) = {
                let vault = lock(&self.vault);
                let token = vault.fingerprint(grant.access_token.expose_secret());
                (token, oauth::shown(vault.detector_for(None), extra))
            };
            self.record(
                "credential.refresh_rejected",
                json!({"credential": m.credential, "host": host, "token": token,
                       "granted_extra": extra, "scope": m.scope.join(" "),
                       "reason": "the token endpoint granted scope beyond the mandate's; the token was not used"}),
            );
            return Err(RefreshFailure::Rejected(format!(
                "the token endpoint granted scope beyond the mandate's ({}); the token was not used",
                extra.join(" ")
            )));
        }
        crate::mandate::check_secret("access_token", grant.access_token.expose_secret(), false)
            .map_err(|e| {
                RefreshFailure::Failed(format!("the token endpoint's access token {}", e.message))
            })?;
        if let Some(rt) = &grant.refresh_token {
            crate::mandate::check_secret("refresh_token", rt.expose_secret(), false).map_err(
                |e| {
                    RefreshFailure::Failed(format!(
                        "the token endpoint's rotated refresh token {}",
                        e.message
                    ))
                },
            )?;
        }
        let expires_in = grant.expires_in;
        let rotated = grant.refresh_token.is_some();
        let token = {
            let mut vault = lock(&self.vault);
            let token = vault.set_access_token(
                cred,
                grant.access_token,
                expires_in.map(Duration::from_secs),
                granted.clone(),
                grant.refresh_token,
            );
            if token.is_some() {
                self.held.set(vault.held(FILES_DIR));
            }
            token
        };
        let Some(token) = token else {
            return Err(RefreshFailure::Gone);
        };
        self.record(
            "credential.refreshed",
            json!({"credential": m.credential, "host": host, "token": token,
                   "expires_in": expires_in, "scope": granted.join(" "),
                   "initial": initial, "refresh_token_rotated": rotated}),
        );
        // A token the server says lives 0 s is still given a second, so a refresh loop can
        // never spin.
        let lifetime = expires_in
            .map(Duration::from_secs)
            .unwrap_or(m.max_age)
            .min(m.max_age)
            .max(Duration::from_secs(1));
        let now = Instant::now();
        Ok(Due {
            refresh_at: now + lifetime.mul_f64(0.8),
            stale_at: now + lifetime,
            lifetime,
        })
    }

    /// Audits a failed refresh of credential `cred`; with `stale` (its token got older than it
    /// may without a refresh), first stops injecting the token.
    fn refresh_failed(&self, cred: usize, error: &str, attempts: u32, stale: bool) {
        let (id, host, stopped) = {
            let mut vault = lock(&self.vault);
            let Some(c) = vault.credentials().get(cred) else {
                return;
            };
            let id = c.id.clone();
            let host = c
                .oauth()
                .and_then(|o| o.endpoint().host_str())
                .unwrap_or_default()
                .to_string();
            let stopped = stale && vault.expire_access_token(cred);
            if stopped {
                self.held.set(vault.held(FILES_DIR));
            }
            (id, host, stopped)
        };
        if stopped {
            tracing::warn!(credential = %id, error, "an access token got older than max_token_age_secs without a refresh; it is no longer injected");
        }
        self.record(
            "credential.refresh_failed",
            json!({"credential": id, "host": host, "error": error, "attempts": attempts,
                   "stopped_injecting": stopped}),
        );
    }
}

/// Keeps credential `cred`'s access token fresh until the purge: refreshes at `due`, retries
/// with backoff, and stops injecting a token that outlived its age without a refresh (each
/// attempt is bounded by `upstream.timeout`, and a hung one does not delay that).
async fn refresh_loop(state: Weak<State>, stop: CancellationToken, cred: usize, mut due: Due) {
    let mut failures: u32 = 0;
    let mut stale = false;
    let mut next = due.refresh_at;
    let id = match state.upgrade() {
        Some(s) => id_of(&s, cred),
        None => return,
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
        let Some(s) = state.upgrade() else { return };
        let attempt = s.refresh(cred, false);
        tokio::pin!(attempt);
        let result = loop {
            tokio::select! {
                r = &mut attempt => break r,
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(due.stale_at.into()), if !stale => {
                    stale = true;
                    s.refresh_failed(cred, "no refresh completed before the token got too old", failures + 1, true);
                }
            }
        };
        match result {
            Ok(d) => {
                due = d;
                next = d.refresh_at;
                failures = 0;
                stale = false;
            }
            Err(RefreshFailure::Gone) => return,
            Err(e) => {
                failures += 1;
                tracing::warn!(credential = %id, attempt = failures, error = %e, "an OAuth refresh failed; retrying");
                let now_stale = !stale && Instant::now() >= due.stale_at;
                // A rejection is audited as such; a failure of a token already stale was.
                if now_stale || (matches!(e, RefreshFailure::Failed(_)) && !stale) {
                    s.refresh_failed(cred, &e.to_string(), failures, now_stale);
                }
                stale |= now_stale;
                next = Instant::now() + backoff(due.lifetime, failures);
            }
        }
    }
}

fn id_of(s: &State, cred: usize) -> String {
    lock(&s.vault)
        .credentials()
        .get(cred)
        .map(|c| c.id.clone())
        .unwrap_or_default()
}

/// The wait before retry `failures`: from an eighth of the token's lifetime (within 250 ms and
/// 2 s), doubling, at most a minute.
fn backoff(lifetime: Duration, failures: u32) -> Duration {
    let base = (lifetime / 8).clamp(Duration::from_millis(250), Duration::from_secs(2));
    base.saturating_mul(1 << failures.saturating_sub(1).min(8))
        .min(Duration::from_secs(60))
}

/// `host` with held values cut out. A value split across labels or percent-encoded cannot be
/// cut out: then only the site is kept, and if even that carries one, nothing.
pub fn shown_host(detector: &crate::broker::leak::LeakDetector, host: &str) -> String {
    let joined: String = host.split('.').collect();
    let clean = |s: &str| {
        let joined: String = s.split('.').collect();
        detector.find(s.as_bytes()).is_none() && detector.find(joined.as_bytes()).is_none()
    };
    if clean(host) {
        return host.to_string();
    }
    if detector.find(joined.as_bytes()).is_some() && detector.find(host.as_bytes()).is_none() {
        // Split across labels: nothing positional to cut.
    } else if let Some(r) = detector.redact(host) {
        if clean(&r) {
            return r;
        }
    }
    let site = format!("[held value].{}", site_of(host));
    if clean(&site) {
        site
    } else {
        "[held value]".to_string()
    }
}

enum Action {
    /// Send it, with these headers if given; commit the budget place once sent.
    Continue(Option<Vec<(String, String)>>, Option<Reservation>),
    Fail,
}

/// What the action rules say about a request.
enum Gate {
    /// No rule objects (with the matched rule's budget place, if one matched).
    Pass(Option<Reservation>),
    /// A rule denies it, its budget is spent, or a human did not approve it.
    Fail,
    /// A human approved it.
    Approved(Reservation),
}

/// A credential decision and the names its audit records need.
struct Decided {
    decision: Decision,
    injected_name: Option<String>,
    /// The credential withheld and the reason.
    withheld: Option<(String, &'static str)>,
}

/// How much of a held request the approvals list (and the webhook) shows, and how much
/// `GET /v1/approvals/{id}` shows: body fields, characters of any other body, bytes of the
/// URL.
const LISTED: Shown = Shown {
    fields: 32,
    text: 256,
    url: SHOWN_LIMIT,
};
const WHOLE: Shown = Shown {
    fields: 4096,
    text: 64 * 1024,
    url: 64 * 1024,
};

#[derive(Clone, Copy)]
struct Shown {
    fields: usize,
    text: usize,
    url: usize,
}

/// Longest URL or method an approval or an action record shows (Chromium sends URLs of up to
/// 2 MiB; the record says how long the whole was).
const SHOWN_LIMIT: usize = 2048;

/// `s` cut to [`SHOWN_LIMIT`] bytes (at a character boundary), marked when cut.
fn capped(s: &str) -> std::borrow::Cow<'_, str> {
    capped_to(s, SHOWN_LIMIT)
}

/// `s` cut to `limit` bytes (at a character boundary), marked when cut.
fn capped_to(s: &str, limit: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= limit {
        return s.into();
    }
    let mut end = limit;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

/// The body as Fetch shows it: `postDataEntries` hold the exact bytes (`postData` is lossy for
/// binary bodies). The flag is set when the request has a body Fetch shows nothing of, or a
/// part of which it shows nothing (measured on Chromium 156: a disk-backed `File` in a
/// `FormData` is an entry without `bytes`).
fn request_body(p: &Value) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    let mut any = false;
    if let Some(Value::Array(entries)) = p.pointer("/request/postDataEntries") {
        for e in entries {
            if let Some(b) = e.get("bytes").and_then(Value::as_str) {
                any = true;
                if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b) {
                    body.extend_from_slice(&bytes);
                }
            }
        }
    }
    if !any {
        if let Some(data) = p.pointer("/request/postData").and_then(Value::as_str) {
            any = true;
            body.extend_from_slice(data.as_bytes());
        }
    }
    let has = p
        .pointer("/request/hasPostData")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // An entry without bytes is a part Fetch does not show (a file from disk in a form
    // upload): the body seen is not the body sent.
    let hidden_part = matches!(
        p.pointer("/request/postDataEntries"),
        Some(Value::Array(entries)) if entries.iter().any(|e| e.get("bytes").and_then(Value::as_str).is_none())
    );
    (body, (has && !any) || hidden_part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_with_a_part_fetch_does_not_show_is_opaque() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let whole = json!({"request": {"hasPostData": true, "postDataEntries": [
            {"bytes": b64("amount=5")}, {"bytes": b64("&x=1")}]}});
        assert_eq!(request_body(&whole), (b"amount=5&x=1".to_vec(), false));
        // A file part from disk: `{}` in the middle.
        let hidden = json!({"request": {"hasPostData": true, "postDataEntries": [
            {"bytes": b64("x=&amount=5&z=")}, {}, {"bytes": b64("&y=2")}]}});
        assert!(request_body(&hidden).1);
        let stream = json!({"request": {"hasPostData": true}});
        assert!(request_body(&stream).1);
        let none = json!({"request": {"method": "GET"}});
        assert_eq!(request_body(&none), (Vec::new(), false));
    }
}
