//! The agent-facing CDP gate: what an agent connection may send (see [`policy`]) and what it may
//! see (see [`scrub`]).
//!
//! The router in [`crate::browser::conn`] calls both for every agent message and every event or
//! answer on an agent-owned session; this module holds the decisions, the router the plumbing.

pub mod endpoint;
pub mod held;
mod methods;
pub mod policy;
pub mod scrub;

pub use held::{Held, HeldCell, HeldCookie};
pub use policy::Refusal;

/// What kind of target a CDP session is attached to. Policy and scrubbing differ per kind: a
/// browser-level session can reach every tab and the network stack, a page session one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionKind {
    /// The browser target (`Target.attachToBrowserTarget`), including the agent's own root session.
    Browser,
    /// A tab target (Puppeteer's tab → page attachment model).
    Tab,
    /// A page or an out-of-process iframe.
    Page,
    /// A dedicated, shared or service worker.
    Worker,
    /// Anything else Chromium reports (`browser_ui`, `webview`, worklets, types added later).
    Other,
}

impl SessionKind {
    /// Maps `targetInfo.type` from `Target.attachedToTarget`. Unknown types are [`Other`], the
    /// most restricted kind, so a type Chromium adds later is never treated as a page.
    ///
    /// [`Other`]: SessionKind::Other
    pub fn from_target_type(target_type: &str) -> SessionKind {
        match target_type {
            "browser" => SessionKind::Browser,
            "tab" => SessionKind::Tab,
            "page" | "iframe" => SessionKind::Page,
            "worker" | "shared_worker" | "service_worker" => SessionKind::Worker,
            _ => SessionKind::Other,
        }
    }
}

/// Told about every agent message the gate refuses, so the supervisor can write the `cdp.denied`
/// audit record. Called on the task that handed the frame to
/// [`AgentLink::from_agent`](crate::browser::AgentLink::from_agent), after the refusal has been
/// queued for the agent: keep it quick and non-blocking (e.g. push into a channel).
pub trait GateObserver: Send + Sync {
    /// `agent` is the label given to `attach_agent`, `method` the refused CDP method, `reason`
    /// the text the agent also received.
    fn denied(&self, agent: &str, method: &str, reason: &str);
}

/// An observer that records nothing, for callers without an audit log (tests, tools).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl GateObserver for NoObserver {
    fn denied(&self, _agent: &str, _method: &str, _reason: &str) {}
}

/// The supervisor's observer: each refusal becomes a `cdp.denied` audit record and a metric.
pub struct AuditGate {
    reg: std::sync::Arc<crate::session::Registry>,
    session: String,
}

impl AuditGate {
    /// An observer for one session's agent connections.
    pub fn new(reg: std::sync::Arc<crate::session::Registry>, session: String) -> Self {
        AuditGate { reg, session }
    }
}

impl GateObserver for AuditGate {
    fn denied(&self, agent: &str, method: &str, reason: &str) {
        self.reg.metrics().cdp_denied.inc();
        self.reg.audit().record_detached(
            "cdp.denied",
            Some(&self.session),
            serde_json::json!({ "agent": agent, "method": method, "reason": reason }),
        );
        if let Some(s) = self.reg.get(&self.session) {
            s.refused("cdp.denied");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_types_map_to_kinds() {
        assert_eq!(
            SessionKind::from_target_type("browser"),
            SessionKind::Browser
        );
        assert_eq!(SessionKind::from_target_type("tab"), SessionKind::Tab);
        assert_eq!(SessionKind::from_target_type("page"), SessionKind::Page);
        assert_eq!(SessionKind::from_target_type("iframe"), SessionKind::Page);
        for worker in ["worker", "shared_worker", "service_worker"] {
            assert_eq!(SessionKind::from_target_type(worker), SessionKind::Worker);
        }
        for other in ["browser_ui", "webview", "auction_worklet", "", "Page"] {
            assert_eq!(SessionKind::from_target_type(other), SessionKind::Other);
        }
    }
}
