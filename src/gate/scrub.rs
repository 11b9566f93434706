//! What an agent may see: scrubbing of events and answers on agent-owned sessions.
//!
//! **This is where event scrubbing plugs in.** The router calls [`scrub_event`] for every event
//! on an agent-owned session for which [`event_needs_scrub`] is true, and [`scrub_reply`] for
//! every successful answer to an agent request for which [`reply_needs_scrub`] is true, always
//! before the message is queued for the agent. The two `needs` functions are a cheap filter on
//! the method name, so the bulk of the traffic (including multi-megabyte screenshots and
//! screencast frames) is never decoded.
//!
//! For now both scrubbers are no-ops; the filters already name the messages that, measured on
//! Chromium 156, can carry credential material the supervisor injected or holds:
//! `Network.requestWillBeSentExtraInfo` (injected headers), `Network.responseReceivedExtraInfo`
//! (raw `Set-Cookie`), `Network.responseReceived` (request headers and header texts), WebSocket
//! handshake events, `Audits.issueAdded` (cookie lines) and cookie reads. Scrub in place, never
//! drop: clients pair `responseReceived` with its `ExtraInfo` and hang if one vanishes.
//!
//! If params that need scrubbing cannot be decoded (text `serde_json` cannot represent, such as a
//! lone UTF-16 surrogate escape), the router fails closed: it drops the event or answers the
//! request with an error rather than forward unscrubbed material.

use serde_json::Value;

use super::SessionKind;

/// Whether events named `method` on a session of `kind` go through [`scrub_event`].
pub fn event_needs_scrub(_kind: SessionKind, method: &str) -> bool {
    matches!(
        method,
        "Network.requestWillBeSentExtraInfo"
            | "Network.responseReceivedExtraInfo"
            | "Network.responseReceived"
            | "Network.webSocketWillSendHandshakeRequest"
            | "Network.webSocketHandshakeResponseReceived"
            | "Audits.issueAdded"
    )
}

/// Removes credential material from the `params` of an event before it reaches an agent.
/// Currently a no-op: scrubbing is the next issue.
pub fn scrub_event(_kind: SessionKind, _method: &str, _params: &mut Value) {}

/// Whether answers to `method` on a session of `kind` go through [`scrub_reply`].
pub fn reply_needs_scrub(_kind: SessionKind, method: &str) -> bool {
    matches!(
        method,
        "Storage.getCookies" | "Network.getCookies" | "Network.getAllCookies"
    )
}

/// Removes credential material from the `result` of an answer before it reaches an agent.
/// Currently a no-op: scrubbing is the next issue.
pub fn scrub_reply(_kind: SessionKind, _method: &str, _result: &mut Value) {}

/// Replaces held values in a frame bound for the agent; `None` when there is nothing to
/// replace. (Minimal version; the full scrubber replaces this.)
pub fn scrub_text(text: &str, held: &super::Held) -> Option<String> {
    let detector = held.detector()?;
    detector.find(text.as_bytes())?;
    let mut value: Value = serde_json::from_str(text).ok()?;
    fn walk(v: &mut Value, d: &crate::broker::leak::LeakDetector) {
        match v {
            Value::String(s) if d.find(s.as_bytes()).is_some() => {
                *s = "[held by chaperone]".into();
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, d)),
            Value::Object(o) => o.values_mut().for_each(|x| walk(x, d)),
            _ => {}
        }
    }
    walk(&mut value, detector);
    Some(value.to_string())
}
