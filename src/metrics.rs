//! Prometheus metrics for `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
        let text = m.render();
        assert!(
            text.contains("chaperone_sessions_created_total 1"),
            "{text}"
        );
        assert!(
            text.contains("chaperone_sessions_ended_total{reason=\"expired\"} 1"),
            "{text}"
        );
    }
}
