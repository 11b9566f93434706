//! Which CDP methods an agent may send, per session kind.
//!
//! [`check`] runs for every well-formed agent request after the router has resolved the
//! session (so `kind` is trustworthy) and before anything reaches the pipe. It has two layers:
//!
//! 1. [`allowlist`]: the per-kind method allowlist. **This is where the method allowlist plugs
//!    in.** The pipe client is more privileged than a DevTools websocket client
//!    (`AllowUnsafeOperations`), so the finished gate must allow only what it knows, per
//!    [`SessionKind`]. Until then it lets everything through.
//! 2. [`router_integrity`]: refusals that keep the router itself sound. Each refused method
//!    would let the agent exchange CDP messages the router never sees (non-flat sessions,
//!    page-script bindings) or take a browser-wide hook that belongs to the supervisor. These
//!    stay whatever the allowlist says.
//!
//! A refusal reaches the agent as `-32000 "chaperone: <method> refused: <reason>"`. The text must
//! never contain "wasn't found" or "Not supported": Puppeteer silently swallows errors
//! containing those, and a refusal must be loud.

use std::borrow::Cow;

use serde_json::Value;

use super::SessionKind;

/// Why the gate refused a message; the text is shown to the agent and written to the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    reason: Cow<'static, str>,
}

impl Refusal {
    /// A refusal with the given reason (a sentence fragment that tells the agent what to do).
    pub fn new(reason: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal {
            reason: reason.into(),
        }
    }

    /// The reason, without the `chaperone: <method> refused:` prefix.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The error message the agent receives for `method`.
    pub fn message(&self, method: &str) -> String {
        format!("chaperone: {method} refused: {}", self.reason)
    }
}

/// Decides whether an agent may send `method` with `params` on a session of `kind`.
///
/// `params` is the value that will be forwarded (the router re-serialises it, so duplicate keys
/// cannot make Chromium see something else than this check saw); the only change made after the
/// check is the translation of `Target.detachFromTarget`'s session alias to the real id. An
/// absent `params` is passed as an empty object.
pub fn check(kind: SessionKind, method: &str, params: &Value) -> Result<(), Refusal> {
    router_integrity(kind, method, params)?;
    allowlist(kind, method, params)
}

/// The per-kind method allowlist. Currently allows everything: the allowlist is the next issue.
/// Replace the body with a lookup of `(kind, method)` that refuses anything unknown.
pub fn allowlist(_kind: SessionKind, _method: &str, _params: &Value) -> Result<(), Refusal> {
    Ok(())
}

/// Refusals that keep every agent message and event flowing through the router.
pub fn router_integrity(kind: SessionKind, method: &str, params: &Value) -> Result<(), Refusal> {
    const FLAT_ONLY: &str = "chaperone serves flat sessions only: pass \"flatten\": true and \
                             address the session with the sessionId member of each message";
    let flatten = params.get("flatten");
    match method {
        // Both default to non-flat sessions, whose traffic travels inside
        // Target.sendMessageToTarget / receivedMessageFromTarget where the router cannot see it.
        "Target.setAutoAttach" | "Target.attachToTarget" if flatten != Some(&Value::Bool(true)) => {
            return Err(Refusal::new(FLAT_ONLY))
        }
        // Always flat in Chromium 156 (measured); refuse an explicit request for anything else.
        "Target.attachToBrowserTarget" | "Target.autoAttachRelated"
            if flatten.is_some_and(|f| f != &Value::Bool(true)) =>
        {
            return Err(Refusal::new(FLAT_ONLY))
        }
        "Target.sendMessageToTarget" => return Err(Refusal::new(FLAT_ONLY)),
        "Target.exposeDevToolsProtocol" => {
            return Err(Refusal::new(
                "it would give page script a CDP connection that bypasses chaperone's gate",
            ))
        }
        _ => {}
    }
    // Browser-level Fetch from two clients pauses requests in no defined order, and the
    // supervisor's credential broker relies on browser-level Fetch; a page or worker session's
    // Fetch runs before the broker, which is what Playwright's route() needs.
    if method.starts_with("Fetch.") && !matches!(kind, SessionKind::Page | SessionKind::Worker) {
        return Err(Refusal::new(
            "request interception is available on page, frame and worker sessions only; \
             browser-level interception belongs to the supervisor",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(kind: SessionKind, method: &str, params: Value) -> bool {
        check(kind, method, &params).is_err()
    }

    #[test]
    fn non_flat_attachment_is_refused() {
        use SessionKind::*;
        assert!(refused(
            Browser,
            "Target.setAutoAttach",
            json!({"autoAttach": true, "waitForDebuggerOnStart": false})
        ));
        assert!(refused(
            Page,
            "Target.setAutoAttach",
            json!({"autoAttach": true, "waitForDebuggerOnStart": false, "flatten": false})
        ));
        assert!(refused(
            Browser,
            "Target.attachToTarget",
            json!({"targetId": "T"})
        ));
        assert!(refused(
            Browser,
            "Target.attachToTarget",
            json!({"targetId": "T", "flatten": "true"})
        ));
        assert!(refused(
            Browser,
            "Target.attachToBrowserTarget",
            json!({"flatten": false})
        ));
        assert!(refused(
            Browser,
            "Target.autoAttachRelated",
            json!({"targetId": "T", "waitForDebuggerOnStart": false, "flatten": 0})
        ));
        assert!(refused(
            Browser,
            "Target.sendMessageToTarget",
            json!({"message": "{}", "sessionId": "S"})
        ));
        assert!(refused(
            Page,
            "Target.exposeDevToolsProtocol",
            json!({"targetId": "T"})
        ));

        assert!(!refused(
            Browser,
            "Target.setAutoAttach",
            json!({"autoAttach": true, "waitForDebuggerOnStart": true, "flatten": true})
        ));
        assert!(!refused(
            Tab,
            "Target.setAutoAttach",
            json!({"autoAttach": true, "waitForDebuggerOnStart": true, "flatten": true})
        ));
        assert!(!refused(
            Browser,
            "Target.attachToTarget",
            json!({"targetId": "T", "flatten": true})
        ));
        assert!(!refused(Browser, "Target.attachToBrowserTarget", json!({})));
        assert!(!refused(
            Browser,
            "Target.autoAttachRelated",
            json!({"targetId": "T", "waitForDebuggerOnStart": false})
        ));
    }

    #[test]
    fn fetch_only_on_page_and_worker_sessions() {
        use SessionKind::*;
        for kind in [Browser, Tab, Other] {
            assert!(refused(kind, "Fetch.enable", json!({})), "{kind:?}");
            assert!(
                refused(kind, "Fetch.continueRequest", json!({"requestId": "1"})),
                "{kind:?}"
            );
        }
        for kind in [Page, Worker] {
            assert!(
                !refused(
                    kind,
                    "Fetch.enable",
                    json!({"patterns": [{"urlPattern": "*"}]})
                ),
                "{kind:?}"
            );
        }
        // A domain whose name merely starts with "Fetch" is not Fetch.
        assert!(!refused(Browser, "FetchX.enable", json!({})));
    }

    #[test]
    fn ordinary_methods_pass() {
        use SessionKind::*;
        assert!(!refused(Browser, "Browser.getVersion", json!({})));
        assert!(!refused(
            Page,
            "Runtime.evaluate",
            json!({"expression": "1+1"})
        ));
        assert!(!refused(Browser, "No.suchMethod", json!({})));
    }

    #[test]
    fn refusal_text_is_never_swallowed_by_puppeteer() {
        let cases = [
            (SessionKind::Browser, "Target.setAutoAttach", json!({})),
            (
                SessionKind::Browser,
                "Target.sendMessageToTarget",
                json!({}),
            ),
            (
                SessionKind::Browser,
                "Target.exposeDevToolsProtocol",
                json!({}),
            ),
            (SessionKind::Browser, "Fetch.enable", json!({})),
        ];
        for (kind, method, params) in cases {
            let message = check(kind, method, &params).unwrap_err().message(method);
            assert!(message.starts_with(&format!("chaperone: {method} refused: ")));
            let lower = message.to_lowercase();
            assert!(
                !lower.contains("wasn't found") && !lower.contains("not supported"),
                "{message}"
            );
        }
    }
}
