//! One session's life: launch the sandboxed browser, serve its proxy, wait for the end, kill,
//! purge and verify.

use std::sync::Arc;
use std::time::Duration;

use chaperone_sandbox as sandbox;
use chromiumoxide::cdp::browser_protocol::browser::GetVersionParams;
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{posture, BrowserInfo, EndReason, Registry, Session, State};
use crate::broker::{Broker, BrokerEvents};
use crate::browser::{chromium, BrowserConn};
use crate::egress::{self, Denied, EgressObserver, RequestInfo, Traffic};
use crate::mandate::Deadline;
use crate::metrics::ReasonLabel;

/// How long the kill and the purge checks may take before the purge is declared failed.
const PURGE_DEADLINE: Duration = Duration::from_secs(10);

pub(super) async fn run(
    reg: Arc<Registry>,
    session: Arc<Session>,
    slot: u32,
    mut end_rx: oneshot::Receiver<EndReason>,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let launched = tokio::select! {
        r = launch(&reg, &session, slot) => r,
        reason = &mut end_rx => Err((reason.unwrap_or(EndReason::Shutdown), "ended while launching".to_string(), None)),
    };
    let (browser, launched) = match launched {
        Ok(ok) => ok,
        Err((reason, error, launched)) => {
            reg.metrics.launch_failures.inc();
            tracing::warn!(session = %session.id, %error, "launch failed");
            let _ = end(&reg, &session, reason, launched.as_ref(), Some(&error)).await;
            let _ = ready.send(Err(error));
            return;
        }
    };
    // What is legitimate for this session, read before anyone can drive the browser.
    let baseline = {
        let h = launched.clone();
        let program = reg.cfg.browser.path.clone();
        tokio::task::spawn_blocking(move || posture::Baseline::take(&h, &program))
            .await
            .map_err(|e| e.to_string())
            .and_then(|b| b)
    };
    let baseline = match baseline {
        Ok(b) => b,
        Err(e) => {
            reg.metrics.launch_failures.inc();
            let error = format!("posture baseline: {e}");
            tracing::warn!(session = %session.id, %error, "launch failed");
            let _ = ready.send(Err(abandon(&reg, &session, &launched, error).await));
            return;
        }
    };
    let posture_summary = baseline.summary();
    session.set_posture(Some(Arc::new(posture::Monitor::new(baseline))));
    *session.browser.lock().unwrap_or_else(|p| p.into_inner()) = Some(browser.clone());
    let started = reg
        .audit
        .record(
            "session.active",
            Some(&session.id),
            json!({
                "agent": session.mandate().source.agent,
                "browser": browser.version.get("product"),
                "degraded": browser.degraded,
                "launcher_pid": launched.launcher_pid,
                "posture": posture_summary,
            }),
        )
        .await;
    if let Err(e) = started {
        let error = format!("audit log: {e}");
        let _ = ready.send(Err(abandon(&reg, &session, &launched, error).await));
        return;
    }
    session.state.send_replace(State::Active);
    let _ = ready.send(Ok(()));

    let mut changes = session.mandate_changes();
    let mut states = session.state_changes();
    let every = reg.cfg.posture.interval;
    let mut posture_tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    posture_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        // Every clock is read from the mandate in force; a PATCH wakes the loop to re-read.
        let m = session.mandate();
        let (ends_at, which) = m.next_end(OffsetDateTime::now_utc());
        let idle_left = m
            .idle_timeout
            .map(|limit| limit.saturating_sub(session.idle_for()));
        // A detached session waits at most `resume_window_secs` (AG-374 4.3).
        let detached = session.detached_at();
        let resume_left = detached.map(|(_, at)| m.resume.window.saturating_sub(at.elapsed()));
        tokio::select! {
            r = &mut end_rx => break r.unwrap_or(EndReason::Shutdown),
            _ = deadline(ends_at) => break match which {
                Deadline::Expiry => EndReason::Expired,
                Deadline::WindowEnd => EndReason::WindowEnded,
            },
            // Agent traffic moves the idle deadline; the loop checks again when it is due.
            _ = sleep_or_never(idle_left) => {
                if m.idle_timeout.is_some_and(|limit| session.idle_for() >= limit) {
                    break EndReason::IdleTimeout;
                }
            }
            _ = sleep_or_never(resume_left) => {
                let still = session.detached_at().is_some_and(|(_, at)| at.elapsed() >= m.resume.window);
                if still {
                    session.request_end_by(
                        EndReason::ResumeExpired,
                        "resume_window",
                        json!({
                            "interrupted_at": detached.map(|(t, _)| super::rfc3339(t)),
                            "resume_window_secs": m.resume.window.as_secs(),
                        }),
                    );
                    break EndReason::ResumeExpired;
                }
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    break EndReason::Shutdown;
                }
            }
            // Detach and resumption move the resumption clock.
            changed = states.changed() => {
                if changed.is_err() {
                    break EndReason::Shutdown;
                }
            }
            // The pipe's far end lives only in the browser, and the browser dies with the
            // sandbox's init and launcher: EOF here is how any death of the sandbox shows.
            // Drift asks for the end (after its audit record); the next turn takes it.
            _ = posture_tick.tick() => {
                if let Err(e) = reg.check_posture(&session).await {
                    tracing::debug!(session = %session.id, error = %e, "posture check skipped");
                }
            }
            _ = browser.conn.closed() => break EndReason::Crashed,
            _ = reg.shutdown.cancelled() => break EndReason::Shutdown,
        }
    };
    let _ = end(&reg, &session, reason, Some(&launched), None).await;
}

/// Ends a session whose browser runs but which cannot start (as `crashed`, naming `error`),
/// and returns the error for the caller of the start.
async fn abandon(
    reg: &Arc<Registry>,
    session: &Arc<Session>,
    launched: &sandbox::Handle,
    error: String,
) -> String {
    let _ = end(
        reg,
        session,
        EndReason::Crashed,
        Some(launched),
        Some(&error),
    )
    .await;
    error
}

type LaunchError = (EndReason, String, Option<sandbox::Handle>);

async fn launch(
    reg: &Arc<Registry>,
    session: &Arc<Session>,
    slot: u32,
) -> Result<(BrowserInfo, sandbox::Handle), LaunchError> {
    let cfg = &reg.cfg;
    let root = nix::unistd::geteuid().is_root();
    let host_ids = root.then(|| {
        let id = cfg.sandbox.uid_base + slot;
        (id, id)
    });
    let accept_degraded = cfg
        .sandbox
        .accept_degraded
        .iter()
        .filter_map(|l| l.parse::<sandbox::Layer>().ok())
        .collect();
    let mandate = session.mandate();
    let credential_sites: Vec<String> = mandate
        .source
        .credentials
        .iter()
        .map(|c| crate::vault::jar::site_of(&c.site))
        .collect();
    let policy =
        serde_json::to_vec_pretty(&chromium::managed_policy(&credential_sites)).unwrap_or_default();
    let spec = sandbox::Spec {
        name: format!("chaperone-{}", session.id),
        program: cfg.browser.path.clone(),
        args: chromium::args(),
        env: chromium::env(),
        inner_uid: chromium::INNER_ID,
        inner_gid: chromium::INNER_ID,
        host_ids,
        ro_binds: chromium::ro_binds(&cfg.browser.path),
        symlinks: chromium::symlinks(),
        files: vec![sandbox::FileSpec {
            path: "/etc/chromium/policies/managed/chaperone.json".into(),
            contents: policy,
            mode: 0o644,
        }],
        profile_dir: chromium::PROFILE_DIR.into(),
        extra_writable: vec![],
        proxy_port: chromium::PROXY_PORT,
        output: if cfg.browser.show_output {
            sandbox::Output::Inherit
        } else {
            sandbox::Output::Null
        },
        limits: sandbox::Limits {
            memory_bytes: Some(cfg.sandbox.memory_limit.as_u64()),
            pids: Some(cfg.sandbox.pids_limit),
            nofile: 8192,
        },
        accept_degraded,
    };
    let crashed = |e: String| (EndReason::Crashed, e, None);
    let launched = tokio::task::spawn_blocking(move || sandbox::launch(&spec))
        .await
        .map_err(|e| crashed(format!("launcher task: {e}")))?
        .map_err(|e| crashed(format!("sandbox: {e}")))?;
    let (handle, io) = launched.into_parts();
    let with = |e: String, h: sandbox::Handle| (EndReason::Crashed, e, Some(h));

    let conn = match BrowserConn::start(io.cdp_to_browser, io.cdp_from_browser) {
        Ok(c) => c,
        Err(e) => return Err(with(format!("CDP pipe: {e}"), handle)),
    };
    // The first agent's browser session is attached together with the first command, so
    // the agent does not wait for it after the session is announced.
    let observer: Arc<dyn crate::gate::GateObserver> =
        Arc::new(crate::gate::AuditGate::new(reg.clone(), session.id.clone()));
    let broker_events: Arc<dyn BrokerEvents> = Arc::new(SessionBroker {
        reg: reg.clone(),
        session: session.clone(),
    });
    let needs_upstream = mandate
        .source
        .credentials
        .iter()
        .any(|c| c.oauth.is_some() || c.revoke.is_some());
    let upstream = match &reg.upstream {
        Ok(u) => Some(u.clone()),
        Err(e) if needs_upstream => {
            return Err(with(
                format!(
                "credential broker: the mandate's oauth/revoke calls need the upstream client: {e}"
            ),
                handle,
            ))
        }
        Err(_) => None,
    };
    let first = async {
        tokio::join!(
            conn.execute(GetVersionParams::default(), None),
            conn.attach_agent(&mandate.source.agent, observer),
            Broker::start(
                &conn,
                &mandate,
                std::mem::take(
                    &mut *session
                        .credentials
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                ),
                reg.fingerprints.clone(),
                broker_events,
                upstream,
                cfg.browser.launch_timeout,
            )
        )
    };
    let (version, spare, broker) =
        match tokio::time::timeout(cfg.browser.launch_timeout, first).await {
            Ok((v, spare, broker)) => (Ok(v), spare.ok(), broker),
            Err(e) => (Err(e), None, Ok(None)),
        };
    // Fail closed: credentials without a confirmed interception would ride on nothing.
    let broker = match broker {
        Ok(b) => b,
        Err(e) => return Err(with(format!("credential broker: {e}"), handle)),
    };
    let version = match version {
        Ok(Ok(v)) => serde_json::to_value(&v).unwrap_or_default(),
        Ok(Err(e)) => return Err(with(format!("first CDP reply: {e}"), handle)),
        Err(_) => {
            let e = format!(
                "Chromium did not answer over the pipe within {:?} (browser.launch_timeout)",
                cfg.browser.launch_timeout
            );
            return Err(with(e, handle));
        }
    };

    let listener = std::net::TcpListener::from(io.proxy_listener);
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|_| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => return Err(with(format!("proxy listener: {e}"), handle)),
    };
    let observer = Arc::new(SessionEgress {
        reg: reg.clone(),
        session: session.clone(),
        broker: broker.clone(),
    });
    tokio::spawn(egress::serve(
        listener,
        session.egress_policy(),
        observer,
        session.ending.clone(),
    ));
    let degraded = handle.degraded.iter().map(|l| l.to_string()).collect();
    if broker.is_some() {
        tracing::info!(session = %session.id, "credential interception confirmed");
    }
    *session.broker.lock().unwrap_or_else(|p| p.into_inner()) = broker.clone();
    Ok((BrowserInfo::new(conn, version, degraded, spare), handle))
}

/// Broker events that count toward the mandate's `anomaly` threshold: refusals, not the
/// injections, captures and strips that keep the session working.
const REFUSALS: &[&str] = &[
    "credential.blocked",
    "credential.exfiltration_blocked",
    "credential.scope_escalation_blocked",
    "credential.refresh_rejected",
    // Requests an action rule, a spent budget or the pending limit refused (a human's denial
    // is not the agent's misbehaviour and is not counted).
    "action.denied",
];

/// Audits the broker's decisions and ends the session when it catches a leak.
struct SessionBroker {
    reg: Arc<Registry>,
    session: Arc<Session>,
}

impl BrokerEvents for SessionBroker {
    fn record(&self, event: &'static str, fields: serde_json::Value) {
        if let Some(kind) = event.strip_prefix("action.") {
            self.reg
                .metrics
                .action_events
                .get_or_create(&crate::metrics::EventLabel {
                    event: kind.to_string(),
                })
                .inc();
        }
        if let Some(kind) = event.strip_prefix("credential.") {
            self.reg
                .metrics
                .credential_events
                .get_or_create(&crate::metrics::EventLabel {
                    event: kind.to_string(),
                })
                .inc();
        }
        self.reg
            .audit
            .record_detached(event, Some(&self.session.id), fields);
        if REFUSALS.contains(&event) {
            self.session.refused(event);
        }
    }

    fn who(&self) -> (String, String) {
        (
            self.session.id.clone(),
            self.session.mandate().source.agent.clone(),
        )
    }

    fn ask(
        &self,
        approval: crate::approvals::Approval,
        timeout: Duration,
        abandoned: CancellationToken,
    ) -> futures_util::future::BoxFuture<'static, crate::broker::Asked> {
        let reg = self.reg.clone();
        let session = self.session.clone();
        Box::pin(ask(reg, session, approval, timeout, abandoned))
    }

    fn revoke(&self, reason: &str) {
        tracing::warn!(session = %self.session.id, reason, "revoking the session (on_leak = \"revoke\")");
        self.session.request_end_by(
            EndReason::Anomaly,
            "credential_leak",
            json!({ "on_leak": "revoke", "reason": reason }),
        );
    }
}

/// A request held for a human: recorded durably, listed, then waited for until a decision
/// comes, its time is up, or the page gives the request up (`abandoned`). A decision being
/// recorded at the very moment the time runs out or the page gives up wins (the control API
/// has taken it off the list): the wait goes on briefly for it.
async fn ask(
    reg: Arc<Registry>,
    session: Arc<Session>,
    approval: crate::approvals::Approval,
    timeout: Duration,
    abandoned: CancellationToken,
) -> crate::broker::Asked {
    use crate::approvals::Verdict;
    use crate::broker::Asked;
    let id = approval.id.clone();
    let full = || {
        Asked::Refused(format!(
            "{} requests of this session already wait for a human",
            crate::approvals::MAX_PENDING_PER_SESSION
        ))
    };
    if !reg.approvals.has_room(&session.id) {
        return full();
    }
    let requested = reg
        .audit
        .record(
            "action.approval_requested",
            Some(&session.id),
            json!({
                "approval": id,
                "method": approval.method,
                "url": approval.url,
                "rule": approval.rule,
                "body": approval.body,
                "expires_at": approval.expires_at,
            }),
        )
        .await;
    if let Err(e) = requested {
        return Asked::NotRecorded(e.to_string());
    }
    let Some(mut rx) = reg.approvals.submit(approval) else {
        return full();
    };
    reg.metrics.approvals_pending.inc();
    let mut deadline = tokio::time::Instant::now() + timeout;
    let mut watch_page = true;
    let asked = loop {
        // The session's end cancels its approvals; a wait that began as it ended stops here.
        if session.ending.is_cancelled() {
            // Listed after the end cancelled the session's approvals, or cancelled by it:
            // whoever takes it off the list records it.
            if reg.approvals.cancel(&id).is_some() {
                record_cancelled(&reg, &session.id, &id);
            }
            break Asked::Cancelled;
        }
        let waited = tokio::select! {
            w = tokio::time::timeout_at(deadline, &mut rx) => w,
            _ = session.ending.cancelled() => continue,
            _ = abandoned.cancelled(), if watch_page => {
                if reg.approvals.abandon(&id).is_some() {
                    reg.audit.record_detached(
                        "action.expired",
                        Some(&session.id),
                        json!({"approval": id,
                               "reason": "the page cancelled the request before a decision"}),
                    );
                    break Asked::Abandoned;
                }
                // A decision is being recorded: it is awaited (and its request is gone).
                watch_page = false;
                continue;
            }
        };
        match waited {
            Ok(Ok(Verdict::Approved { by })) => break Asked::Approved(by),
            Ok(Ok(Verdict::Denied { by })) => break Asked::Denied(by),
            Ok(Err(_)) => break Asked::Cancelled,
            Err(_) => {
                if reg.approvals.expire(&id).is_some() {
                    reg.audit.record_detached(
                        "action.expired",
                        Some(&session.id),
                        json!({"approval": id, "after_secs": timeout.as_secs(),
                               "reason": "no decision within approval_timeout_secs"}),
                    );
                    break Asked::Expired;
                }
                deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            }
        }
    };
    reg.metrics.approvals_pending.dec();
    reg.metrics
        .approvals
        .get_or_create(&crate::metrics::OutcomeLabel {
            outcome: match &asked {
                Asked::Approved(_) => "approved",
                Asked::Denied(_) => "denied",
                Asked::Expired => "expired",
                Asked::Abandoned => "abandoned",
                Asked::Cancelled | Asked::NotRecorded(_) | Asked::Refused(_) => "cancelled",
            }
            .to_string(),
        })
        .inc();
    asked
}

/// Records that a request held for a human was given up because its session ended.
fn record_cancelled(reg: &Registry, session: &str, approval: &str) {
    reg.audit.record_detached(
        "action.expired",
        Some(session),
        json!({"approval": approval, "reason": "the session ended before a decision"}),
    );
}

/// Audits what the proxy refuses and counts what it sees.
struct SessionEgress {
    reg: Arc<Registry>,
    session: Arc<Session>,
    broker: Option<Broker>,
}

impl EgressObserver for SessionEgress {
    fn holds_value_in(&self, host: &str, material: &[u8]) -> bool {
        self.broker
            .as_ref()
            .is_some_and(|b| b.egress_leak(host, material))
    }

    fn shown_host(&self, host: &str) -> String {
        self.broker
            .as_ref()
            .map_or_else(|| host.to_string(), |b| b.shown_host(host))
    }

    fn request(&self, _r: &RequestInfo) {
        self.reg.metrics.egress_requests.inc();
    }

    fn traffic(&self) -> Option<&Traffic> {
        let traffic = self.session.egress_traffic();
        if traffic.first_publication() {
            self.reg
                .metrics
                .egress_traffic
                .track(&self.session.id, traffic);
        }
        Some(traffic)
    }

    fn denied(&self, d: &Denied) {
        self.reg.metrics.egress_denied.inc();
        self.reg.audit.record_detached(
            "egress.denied",
            Some(&self.session.id),
            json!({
                "host": d.host,
                "port": d.port,
                "kind": d.kind.to_string(),
                "reason": d.reason.to_string(),
                "code": d.reason.code(),
            }),
        );
        self.session.refused("egress.denied");
    }
}

/// Sleeps for `d`, or forever without one.
async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Resolves at the mandate's deadline by the supervisor's clock. The wall clock is re-read
/// every second, so a `not_after` deadline holds even if the machine's clock is stepped.
async fn deadline(expires_at: OffsetDateTime) {
    loop {
        let left = expires_at - OffsetDateTime::now_utc();
        if left <= time::Duration::ZERO {
            return;
        }
        let step = Duration::try_from(left)
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(1));
        tokio::time::sleep(step).await;
    }
}

/// Ends a session: audit the reason, close agents, kill, purge, verify, audit the purge.
async fn end(
    reg: &Arc<Registry>,
    session: &Arc<Session>,
    reason: EndReason,
    handle: Option<&sandbox::Handle>,
    error: Option<&str>,
) -> Result<(), String> {
    session.state.send_replace(State::Ending(reason));
    let (trigger, detail) = session
        .end_detail()
        .unwrap_or((reason.trigger(), serde_json::Value::Null));
    let mut fields = json!({ "agent": session.mandate().source.agent, "trigger": trigger });
    if !detail.is_null() {
        fields["detail"] = detail;
    }
    if let Some(e) = error {
        fields["error"] = e.into();
    }
    if let Err(e) = reg
        .audit
        .record(reason.event(), Some(&session.id), fields)
        .await
    {
        // The kill goes ahead regardless: a session must not outlive its mandate because
        // the log is full.
        tracing::error!(session = %session.id, error = %e, "could not record the session's end");
    }
    session.ending.cancel();
    // Parked agent sessions go with the browser; dropping them first ends their replay books.
    session.drop_parked();
    // Requests held for a human die with the browser: nobody can decide them any more.
    for a in reg.approvals.cancel_session(&session.id) {
        record_cancelled(reg, &session.id, &a.id);
    }
    // Held values go first: nothing is injected from here on, whatever the kill takes.
    let broker = session
        .broker
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let purged = broker.map(|b| b.purge()).unwrap_or_default();
    let credentials_zeroized = purged.credentials;
    session
        .credentials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    reg.metrics
        .sessions_ended
        .get_or_create(&ReasonLabel {
            reason: reason.name().to_string(),
        })
        .inc();

    // The mandate's upstream revocations (AG-120 4.5) go out while the sandbox is killed: the
    // values they carry were copied out before the purge and are zeroized once sent, and the
    // kill does not wait for them.
    let revoking = reg.send_revocations(purged.revocations);
    // Checks stop here; the monitor still knows the session's namespaces for the purge.
    let monitor = session.set_posture(None);
    let killing = async {
        match handle {
            Some(h) => purge(h, monitor).await,
            None => Ok(json!({"processes_left": 0, "note": "no sandbox was started"})),
        }
    };
    let (verified, revoked) = tokio::join!(killing, revoking);
    reg.record_revocations(&session.id, &revoked).await;
    match verified {
        Ok(mut facts) => {
            facts["credentials_zeroized"] = credentials_zeroized.into();
            if let Err(e) = reg
                .audit
                .record("session.purged", Some(&session.id), facts)
                .await
            {
                tracing::error!(session = %session.id, error = %e, "could not record the purge");
            }
            session.state.send_replace(State::Purged(reason));
            Ok(())
        }
        Err(problem) => {
            tracing::error!(session = %session.id, %problem, "purge could not be verified");
            let _ = reg
                .audit
                .record(
                    "session.purge_failed",
                    Some(&session.id),
                    json!({ "problem": problem }),
                )
                .await;
            session.state.send_replace(State::PurgeFailed(reason));
            Err(problem)
        }
    }
}

/// Kills the session's process tree and checks that nothing of it is left: no process in its
/// namespaces (so its tmpfs profile and downloads, which exist only in its mount namespace,
/// are gone with them), not even one that entered them from outside (`monitor`, whose held
/// namespaces make their inodes safe to compare), and no cgroup.
async fn purge(
    h: &sandbox::Handle,
    monitor: Option<Arc<posture::Monitor>>,
) -> Result<serde_json::Value, String> {
    let started = std::time::Instant::now();
    h.kill().map_err(|e| format!("kill: {e}"))?;
    let h2 = h.clone();
    let check = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, String> {
        let deadline = std::time::Instant::now() + PURGE_DEADLINE;
        if !h2.wait_exit(PURGE_DEADLINE) {
            return Err(format!(
                "the sandbox launcher (pid {}) did not exit after SIGKILL",
                h2.launcher_pid
            ));
        }
        // Someone who entered the session's namespaces from outside its pid namespace keeps
        // them alive and is not killed by the init's death: killed one by one, now and again
        // while the rest goes.
        let kill_intruders = || monitor.as_ref().map_or(Ok(0), |m| m.kill_intruders());
        let mut intruders_killed = kill_intruders()?;
        for round in 1.. {
            let _ = h2.reap();
            let mut left = sandbox::processes_in(&h2.ns);
            if left.is_empty() {
                left = monitor.as_ref().map(|m| m.outsiders()).unwrap_or_default();
            }
            if left.is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("processes still alive after SIGKILL: {left:?}"));
            }
            if round % 25 == 0 {
                intruders_killed += kill_intruders()?;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        sandbox::cleanup_cgroups(&h2.cgroups).map_err(|e| format!("cgroups: {e}"))?;
        Ok(json!({
            "processes_left": 0,
            "namespaces_gone": true,
            "profile": "tmpfs in the session's own mount namespace, gone with it",
            "cgroups_removed": h2.cgroups.len(),
            "intruders_killed": intruders_killed,
        }))
    });
    let mut facts = check
        .await
        .map_err(|e| format!("purge check task: {e}"))??;
    facts["purge_ms"] = (started.elapsed().as_secs_f64() * 1000.0).round().into();
    Ok(facts)
}
