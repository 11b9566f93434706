//! Prometheus metrics for `GET /metrics`.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::egress::Traffic;

/// Label for why a session ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `expired`, `revoked`, `crashed`, `shutdown`, `anomaly`.
    pub reason: String,
}

/// Label for what the credential broker did.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// The audit event without its `credential.` prefix: `injected`, `captured`, `stripped`,
    /// `blocked`, `withheld`, `exfiltration_blocked`.
    pub event: String,
}

/// All of the supervisor's metrics.
pub struct Metrics {
    registry: Registry,
    /// Sessions not yet purged.
    pub sessions_live: Gauge,
    /// Sessions created.
    pub sessions_created: Counter,
    /// Sessions ended, by reason.
    pub sessions_ended: Family<ReasonLabel, Counter>,
    /// Launches that failed.
    pub launch_failures: Counter,
    /// Agent websocket connections open.
    pub agent_connections: Gauge,
    /// Requests through the egress proxy.
    pub egress_requests: Counter,
    /// Requests the egress proxy refused.
    pub egress_denied: Counter,
    /// CDP messages from agents refused by the gate.
    pub cdp_denied: Counter,
    /// Credential broker decisions that were audited, by kind (repeats of an injection into
    /// the same host are coalesced in the audit log and counted once here too).
    pub credential_events: Family<EventLabel, Counter>,
    /// Per-session, per-destination egress traffic, read from the sessions' own counters at
    /// each scrape.
    pub egress_traffic: EgressTrafficSeries,
    /// Resumption attempts of detached sessions, by outcome (`resumed` or the refusal reason).
    pub resume_attempts: Family<OutcomeLabel, Counter>,
    /// Requests held for a human's approval now.
    pub approvals_pending: Gauge,
    /// Requests held for a human's approval, by outcome (`approved`, `denied`, `expired`,
    /// `abandoned` by the page, `cancelled`).
    pub approvals: Family<OutcomeLabel, Counter>,
    /// Action rule decisions recorded in the audit log, by event without its `action.` prefix
    /// (`denied`, `sent`, …).
    pub action_events: Family<EventLabel, Counter>,
    /// Posture checks of live sessions.
    pub posture_checks: Counter,
    /// Sessions revoked for posture drift, once per broken rule.
    pub posture_drift: Family<CheckLabel, Counter>,
}

/// Label for which posture rule a session broke.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabel {
    /// `namespace`, `cgroup`, `uid`, `capabilities`, `seccomp`, … (see
    /// [`crate::session::posture::Check`]).
    pub check: String,
}

/// Label for how a resumption attempt ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `resumed`, or the refusal reason (`replayed`, `expired`, …).
    pub outcome: String,
}

/// The `chaperone_egress_host_*` series: each live session's [`Traffic`], by destination host.
///
/// The counts live in the session (the control API shows the same numbers); this only reads
/// them when scraped. A session's series disappear once its proxy has stopped (the session is
/// ending), so ended sessions do not pile up series; Prometheus sees the counters end.
#[derive(Clone, Debug, Default)]
pub struct EgressTrafficSeries {
    sessions: Arc<Mutex<Vec<TrackedSession>>>,
}

/// A session id and its counters, for as long as the session keeps them.
type TrackedSession = (String, Weak<Traffic>);

impl EgressTrafficSeries {
    /// Publishes one session's counters under its id.
    pub fn track(&self, session: &str, traffic: &Arc<Traffic>) {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.retain(|(_, t)| t.upgrade().is_some_and(|t| !t.is_finished()));
        sessions.push((session.to_owned(), Arc::downgrade(traffic)));
    }

    fn live(&self) -> Vec<(String, Arc<Traffic>)> {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.retain(|(_, t)| t.upgrade().is_some_and(|t| !t.is_finished()));
        sessions
            .iter()
            .filter_map(|(id, t)| Some((id.clone(), t.upgrade()?)))
            .collect()
    }
}

/// Labels of one session's traffic to one host.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    session: String,
    host: String,
}

/// [`HostLabels`] plus which way the bytes went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostDirectionLabels {
    session: String,
    host: String,
    /// `sent` (to the destination) or `received` (from it).
    direction: &'static str,
}

impl Collector for EgressTrafficSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows: Vec<(String, String, crate::egress::HostTraffic)> = self
            .live()
            .into_iter()
            .flat_map(|(id, t)| {
                t.snapshot()
                    .into_iter()
                    .map(move |(host, c)| (id.clone(), host, c))
            })
            .collect();
        let mut counter = |name: &str,
                           help: &str,
                           value: &dyn Fn(&crate::egress::HostTraffic) -> u64|
         -> Result<(), std::fmt::Error> {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (session, host, c) in &rows {
                let labels = HostLabels {
                    session: session.clone(),
                    host: host.clone(),
                };
                ConstCounter::new(value(c)).encode(family.encode_family(&labels)?)?;
            }
            Ok(())
        };
        counter(
            "egress_host_requests",
            "Requests through the egress proxy, by session and destination host",
            &|c| c.requests,
        )?;
        counter(
            "egress_host_refused",
            "Requests (and open tunnels) the egress proxy refused, by session and destination host",
            &|c| c.refused,
        )?;
        let mut bytes = encoder.encode_descriptor(
            "egress_host_bytes",
            "Bytes through the egress proxy, by session, destination host and direction",
            None,
            MetricType::Counter,
        )?;
        for (session, host, c) in &rows {
            for (direction, n) in [("sent", c.bytes_sent), ("received", c.bytes_received)] {
                let labels = HostDirectionLabels {
                    session: session.clone(),
                    host: host.clone(),
                    direction,
                };
                ConstCounter::new(n).encode(bytes.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("chaperone");
        let m = Metrics {
            sessions_live: Gauge::default(),
            sessions_created: Counter::default(),
            sessions_ended: Family::default(),
            launch_failures: Counter::default(),
            agent_connections: Gauge::default(),
            egress_requests: Counter::default(),
            egress_denied: Counter::default(),
            cdp_denied: Counter::default(),
            credential_events: Family::default(),
            egress_traffic: EgressTrafficSeries::default(),
            resume_attempts: Family::default(),
            approvals_pending: Gauge::default(),
            approvals: Family::default(),
            action_events: Family::default(),
            posture_checks: Counter::default(),
            posture_drift: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sessions_live",
            "Sessions not yet purged",
            m.sessions_live.clone(),
        );
        registry.register(
            "sessions_created",
            "Sessions created",
            m.sessions_created.clone(),
        );
        registry.register(
            "sessions_ended",
            "Sessions ended, by reason",
            m.sessions_ended.clone(),
        );
        registry.register(
            "launch_failures",
            "Browser launches that failed",
            m.launch_failures.clone(),
        );
        registry.register(
            "agent_connections",
            "Agent CDP connections open",
            m.agent_connections.clone(),
        );
        registry.register(
            "egress_requests",
            "Requests through the egress proxy",
            m.egress_requests.clone(),
        );
        registry.register(
            "egress_denied",
            "Requests refused by the egress proxy",
            m.egress_denied.clone(),
        );
        registry.register(
            "cdp_denied",
            "Agent CDP messages refused",
            m.cdp_denied.clone(),
        );
        registry.register(
            "credential_events",
            "Credential broker decisions recorded in the audit log, by kind",
            m.credential_events.clone(),
        );
        registry.register(
            "resume_attempts",
            "Resumption attempts of detached sessions, by outcome",
            m.resume_attempts.clone(),
        );
        registry.register(
            "approvals_pending",
            "Requests held for a human's approval now",
            m.approvals_pending.clone(),
        );
        registry.register(
            "approvals",
            "Requests held for a human's approval, by outcome",
            m.approvals.clone(),
        );
        registry.register(
            "action_events",
            "Action rule decisions recorded in the audit log, by kind",
            m.action_events.clone(),
        );
        registry.register(
            "posture_checks",
            "Posture checks of live sessions",
            m.posture_checks.clone(),
        );
        registry.register(
            "posture_drift",
            "Sessions revoked for posture drift, by broken rule",
            m.posture_drift.clone(),
        );
        registry.register_collector(Box::new(m.egress_traffic.clone()));
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::default();
        m.sessions_created.inc();
        m.sessions_ended
            .get_or_create(&ReasonLabel {
                reason: "expired".into(),
            })
            .inc();
        m.posture_checks.inc();
        m.posture_drift
            .get_or_create(&CheckLabel {
                check: "cgroup".into(),
            })
            .inc();
        let text = m.render();
        assert!(text.contains("chaperone_posture_checks_total 1"), "{text}");
        assert!(
            text.contains("chaperone_posture_drift_total{check=\"cgroup\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("chaperone_sessions_created_total 1"),
            "{text}"
        );
        assert!(
            text.contains("chaperone_sessions_ended_total{reason=\"expired\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn renders_egress_traffic_per_session_and_host_until_the_proxy_stops() {
        let m = Metrics::default();
        let traffic = Arc::new(Traffic::default());
        m.egress_traffic.track("s1", &traffic);
        let other = Arc::new(Traffic::default());
        m.egress_traffic.track("s2", &other);
        assert!(
            !m.render().contains("chaperone_egress_host_requests_total{"),
            "no host, no series"
        );
        let host = traffic.host("site.test");
        host.request();
        host.request();
        host.refusal();
        other.host("evil.test").request();
        let text = m.render();
        for line in [
            "chaperone_egress_host_requests_total{session=\"s1\",host=\"site.test\"} 2",
            "chaperone_egress_host_refused_total{session=\"s1\",host=\"site.test\"} 1",
            "chaperone_egress_host_bytes_total{session=\"s1\",host=\"site.test\",direction=\"sent\"} 0",
            "chaperone_egress_host_bytes_total{session=\"s1\",host=\"site.test\",direction=\"received\"} 0",
            "chaperone_egress_host_requests_total{session=\"s2\",host=\"evil.test\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        traffic.finish();
        let text = m.render();
        assert!(!text.contains("session=\"s1\""), "{text}");
        assert!(text.contains("session=\"s2\""), "{text}");
        drop(other);
        assert!(!m.render().contains("session=\"s2\""));
    }
}
