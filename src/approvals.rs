//! Requests held for a human's decision (step-up approval): an `approve` action rule matched a
//! request, the broker keeps it paused at the Fetch stage and asks here.
//!
//! Operators see and decide pending requests over the control API (`GET /v1/approvals`,
//! `POST /v1/approvals/{id}`) or `chaperone approvals`; an optional webhook
//! (`approval_webhook` in the server config) is told of each new one. Agents have no way in:
//! nothing here is reachable over CDP, and the browser only sees its request wait.
//!
//! A decision takes effect only once its audit record is durable; until then, or when no one
//! decides within the mandate's `approval_timeout_secs`, the request stays held and then fails.
//! What an approval shows never carries a held value: URL and body fields are redacted by the
//! broker before they get here, and the whole view is checked again.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use url::Url;

use crate::audit::Audit;
use crate::broker::upstream::Upstream;

/// How many settled approvals are remembered, to tell "already decided" from "unknown".
const SETTLED_MEMORY: usize = 1024;
/// Most requests one session may have waiting for a human: beyond, they are denied at once
/// (an agent cannot pile up held requests, each of which Chromium keeps open).
pub const MAX_PENDING_PER_SESSION: usize = 64;
/// Webhook attempts per pending request.
const WEBHOOK_ATTEMPTS: u32 = 3;

/// A pending request as operators see it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Approval {
    /// `apr_` and 24 hex digits.
    pub id: String,
    /// The session whose browser made the request.
    pub session: String,
    /// The mandate's `agent` label.
    pub agent: String,
    /// HTTP method.
    pub method: String,
    /// The URL, held values cut out, at most 2 KiB of it.
    pub url: String,
    /// How long the whole URL is, in bytes.
    pub url_bytes: usize,
    /// Where the request comes from: the origin of its `Origin` or `Referer` header, or
    /// empty when it has neither.
    pub initiator: String,
    /// The just-in-time credential (`on_approval`) that rides on the request if it is
    /// approved.
    pub credential: Option<String>,
    /// The rule that matched: `index`, `decision`, `match`, `max_count`.
    pub rule: Value,
    /// `content_type`, `bytes`, and `fields` (name/value pairs of a form or JSON body) or
    /// `text` (the start of any other body), held values cut out.
    pub body: Value,
    /// When the request was held (RFC 3339).
    pub requested_at: String,
    /// When it is denied if no one decides (RFC 3339).
    pub expires_at: String,
    /// More of the URL and the body, for [`Approvals::show`]: not in the list or the webhook.
    #[serde(skip)]
    pub whole: Option<Whole>,
}

/// What `GET /v1/approvals/{id}` shows in place of the list's `url` and `body`: up to 64 KiB
/// of the URL, and up to 4096 fields or 64 KiB of text of the body, held values cut out.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Whole {
    pub url: String,
    pub body: Value,
}

/// A human's decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send the request (once).
    Approved {
        /// Who approved it.
        by: String,
    },
    /// Fail it.
    Denied {
        /// Who denied it.
        by: String,
    },
}

/// How an approval ended, for a late `POST /v1/approvals/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Settled {
    /// A human approved it.
    Approved {
        /// Who.
        by: String,
    },
    /// A human denied it.
    Denied {
        /// Who.
        by: String,
    },
    /// No one decided in time.
    Expired,
    /// Its session ended first.
    Cancelled,
    /// The page cancelled the request first (an abort, a navigation, a closed tab).
    Abandoned,
}

/// Why an approval cannot be decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotPending {
    /// No such approval was ever pending (or it was settled long ago).
    #[error("no pending approval `{0}`; see GET /v1/approvals")]
    Unknown(String),
    /// It was settled already.
    #[error("approval `{id}` is no longer pending: {how}")]
    Settled {
        /// The approval.
        id: String,
        /// How it ended, in words.
        how: String,
    },
}

struct Entry {
    view: Approval,
    tx: oneshot::Sender<Verdict>,
}

/// A pending approval taken out for deciding: [`Approvals::settle`] delivers the verdict,
/// [`Approvals::put_back`] returns it to the pending list (its decision could not be recorded).
pub struct Taken {
    entry: Entry,
}

impl Taken {
    /// The approval.
    pub fn view(&self) -> &Approval {
        &self.entry.view
    }
}

/// Where new pending requests are announced.
#[derive(Clone, Debug)]
pub struct Webhook {
    /// The URL POSTed to.
    pub url: Url,
    /// The supervisor's HTTP client (`[upstream]`: its CA file and timeout apply).
    pub client: Upstream,
}

/// Every pending approval of this supervisor.
pub struct Approvals {
    pending: Mutex<HashMap<String, Entry>>,
    settled: Mutex<VecDeque<(String, Settled)>>,
    webhook: Option<Webhook>,
    audit: Audit,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals")
            .field("webhook", &self.webhook.as_ref().map(|w| w.url.as_str()))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `s` as the name of a person the audit log records (an approver): trimmed, 1 to 128
/// characters, no control characters; `None` otherwise.
pub fn person(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control)).then(|| s.to_string())
}

/// A fresh approval id.
pub fn new_id() -> String {
    format!("apr_{}", hex::encode(rand::random::<[u8; 12]>()))
}

impl Approvals {
    /// No pending approvals; `webhook` is told of each new one; webhook failures are audited.
    pub fn new(webhook: Option<Webhook>, audit: Audit) -> Approvals {
        Approvals {
            pending: Mutex::new(HashMap::new()),
            settled: Mutex::new(VecDeque::new()),
            webhook,
            audit,
        }
    }

    /// Whether `session` may have one more request waiting (see [`MAX_PENDING_PER_SESSION`]).
    pub fn has_room(&self, session: &str) -> bool {
        self.pending_of(&lock(&self.pending), session) < MAX_PENDING_PER_SESSION
    }

    fn pending_of(&self, pending: &HashMap<String, Entry>, session: &str) -> usize {
        pending
            .values()
            .filter(|e| e.view.session == session)
            .count()
    }

    /// Lists `view` as pending and announces it; the receiver gets the human's verdict.
    /// `None` when its session already has [`MAX_PENDING_PER_SESSION`] waiting.
    pub fn submit(&self, view: Approval) -> Option<oneshot::Receiver<Verdict>> {
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if self.pending_of(&pending, &view.session) >= MAX_PENDING_PER_SESSION {
                return None;
            }
            if let Some(w) = &self.webhook {
                tokio::spawn(announce(w.clone(), self.audit.clone(), view.clone()));
            }
            pending.insert(view.id.clone(), Entry { view, tx });
        }
        Some(rx)
    }

    /// Pending approvals, oldest first; only `session`'s when given.
    pub fn list(&self, session: Option<&str>) -> Vec<Approval> {
        let mut out: Vec<Approval> = lock(&self.pending)
            .values()
            .filter(|e| session.is_none_or(|s| e.view.session == s))
            .map(|e| e.view.clone())
            .collect();
        out.sort_by(|a, b| (&a.requested_at, &a.id).cmp(&(&b.requested_at, &b.id)));
        out
    }

    /// Pending approval `id` as the list shows it, with its [`Whole`] URL and body in place
    /// of the list's.
    pub fn show(&self, id: &str) -> Result<Value, NotPending> {
        if let Some(entry) = lock(&self.pending).get(id) {
            let mut v = serde_json::to_value(&entry.view).unwrap_or_default();
            if let Some(w) = &entry.view.whole {
                v["url"] = w.url.clone().into();
                v["body"] = w.body.clone();
            }
            return Ok(v);
        }
        Err(self.not_pending(id))
    }

    /// Takes approval `id` out of the pending list to decide it.
    pub fn take(&self, id: &str) -> Result<Taken, NotPending> {
        if let Some(entry) = lock(&self.pending).remove(id) {
            return Ok(Taken { entry });
        }
        Err(self.not_pending(id))
    }

    /// Why `id` is not pending: settled (and how), or never known.
    fn not_pending(&self, id: &str) -> NotPending {
        let settled = lock(&self.settled)
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, s)| s.clone());
        match settled {
            Some(s) => NotPending::Settled {
                id: id.to_string(),
                how: match s {
                    Settled::Approved { by } => format!("approved by {by}"),
                    Settled::Denied { by } => format!("denied by {by}"),
                    Settled::Expired => "expired (no decision within approval_timeout_secs)".into(),
                    Settled::Cancelled => "its session ended".into(),
                    Settled::Abandoned => "the page cancelled the request before a decision".into(),
                },
            },
            None => NotPending::Unknown(id.to_string()),
        }
    }

    /// Delivers `verdict` for a taken approval. Returns false when the request no longer
    /// waits (its session ended meanwhile).
    pub fn settle(&self, taken: Taken, verdict: Verdict) -> bool {
        let settled = match &verdict {
            Verdict::Approved { by } => Settled::Approved { by: by.clone() },
            Verdict::Denied { by } => Settled::Denied { by: by.clone() },
        };
        self.remember(taken.entry.view.id.clone(), settled);
        taken.entry.tx.send(verdict).is_ok()
    }

    /// Returns a taken approval to the pending list undecided.
    pub fn put_back(&self, taken: Taken) {
        let id = taken.entry.view.id.clone();
        lock(&self.pending).insert(id, taken.entry);
    }

    /// Ends approval `id` undecided (its time is up). Returns it, or `None` when a decision
    /// took it first.
    pub fn expire(&self, id: &str) -> Option<Approval> {
        self.end(id, Settled::Expired)
    }

    /// Ends approval `id` undecided because its session ended. Returns it, or `None` when
    /// something else settled it first.
    pub fn cancel(&self, id: &str) -> Option<Approval> {
        self.end(id, Settled::Cancelled)
    }

    /// Ends approval `id` undecided because the page cancelled its request. Returns it, or
    /// `None` when something else settled it first.
    pub fn abandon(&self, id: &str) -> Option<Approval> {
        self.end(id, Settled::Abandoned)
    }

    fn end(&self, id: &str, how: Settled) -> Option<Approval> {
        let entry = lock(&self.pending).remove(id)?;
        self.remember(id.to_string(), how);
        Some(entry.view)
    }

    /// Ends every pending approval of `session` (it ended); returns them.
    pub fn cancel_session(&self, session: &str) -> Vec<Approval> {
        let gone: Vec<Entry> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<String> = pending
                .iter()
                .filter(|(_, e)| e.view.session == session)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        gone.into_iter()
            .map(|e| {
                self.remember(e.view.id.clone(), Settled::Cancelled);
                e.view
            })
            .collect()
    }

    fn remember(&self, id: String, how: Settled) {
        let mut settled = lock(&self.settled);
        settled.push_back((id, how));
        while settled.len() > SETTLED_MEMORY {
            settled.pop_front();
        }
    }
}

/// POSTs `{"event": "action.approval_requested", "approval": …}` to the webhook, a few times
/// if it fails; a final failure is audited (`action.webhook_failed`).
async fn announce(w: Webhook, audit: Audit, view: Approval) {
    let body = json!({"event": "action.approval_requested", "approval": view});
    let mut last = String::new();
    for attempt in 0..WEBHOOK_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(500 << attempt)).await;
        }
        match w.client.post_json(&w.url, &body).await {
            Ok(status) if (200..300).contains(&status) => return,
            Ok(status) => last = format!("the webhook answered HTTP {status}"),
            Err(e) => last = e.to_string(),
        }
    }
    tracing::warn!(approval = %view.id, error = %last, "approval webhook failed");
    audit.record_detached(
        "action.webhook_failed",
        Some(&view.session),
        json!({"approval": view.id, "attempts": WEBHOOK_ATTEMPTS, "error": last}),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str, session: &str, at: &str) -> Approval {
        Approval {
            id: id.into(),
            session: session.into(),
            agent: "a".into(),
            method: "POST".into(),
            url: "http://shop.test/checkout".into(),
            url_bytes: 25,
            initiator: String::new(),
            credential: None,
            rule: json!({"index": 0}),
            body: json!({}),
            requested_at: at.into(),
            expires_at: at.into(),
            whole: None,
        }
    }

    fn approvals() -> Approvals {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open_file(&dir.path().join("a.jsonl")).unwrap();
        Approvals::new(None, audit)
    }

    #[tokio::test]
    async fn a_decision_reaches_the_waiting_request_once() {
        let a = approvals();
        let rx = a
            .submit(view("apr_1", "s1", "2026-01-01T00:00:02Z"))
            .unwrap();
        let _rx2 = a
            .submit(view("apr_2", "s2", "2026-01-01T00:00:01Z"))
            .unwrap();
        let ids: Vec<String> = a.list(None).into_iter().map(|v| v.id).collect();
        assert_eq!(ids, ["apr_2", "apr_1"]);
        assert_eq!(a.list(Some("s1")).len(), 1);
        let t = a.take("apr_1").unwrap();
        assert!(a.settle(t, Verdict::Approved { by: "ana".into() }));
        assert_eq!(rx.await.unwrap(), Verdict::Approved { by: "ana".into() });
        match a.take("apr_1") {
            Err(NotPending::Settled { how, .. }) => assert_eq!(how, "approved by ana"),
            other => panic!("{:?}", other.err()),
        }
        assert!(matches!(a.take("apr_9"), Err(NotPending::Unknown(_))));
        // Expiry and a decision race: whoever takes it first wins.
        assert!(a.expire("apr_2").is_some());
        assert!(a.take("apr_2").is_err());
        assert!(a.expire("apr_2").is_none());
    }

    #[tokio::test]
    async fn a_session_cannot_pile_up_held_requests() {
        let a = approvals();
        let mut held = Vec::new();
        for i in 0..MAX_PENDING_PER_SESSION {
            held.push(a.submit(view(&format!("apr_{i}"), "s1", "t")).unwrap());
        }
        assert!(!a.has_room("s1"));
        assert!(a.submit(view("apr_x", "s1", "t")).is_none());
        // Other sessions are not held back by it.
        assert!(a.has_room("s2"));
        assert!(a.submit(view("apr_y", "s2", "t")).is_some());
        assert!(a.expire("apr_0").is_some());
        assert!(a.has_room("s1"));
    }

    #[tokio::test]
    async fn a_put_back_approval_is_pending_again_and_sessions_cancel_theirs() {
        let a = approvals();
        let mut rx = a.submit(view("apr_1", "s1", "t")).unwrap();
        let t = a.take("apr_1").unwrap();
        assert!(a.list(None).is_empty());
        a.put_back(t);
        assert_eq!(a.list(None).len(), 1);
        assert!(rx.try_recv().is_err());
        let gone = a.cancel_session("s1");
        assert_eq!(gone.len(), 1);
        assert!(a.list(None).is_empty());
        assert!(rx.await.is_err());
    }
}
