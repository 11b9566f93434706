//! Changing a live mandate (`PATCH /v1/sessions/{id}`): what may change, and whether a change
//! narrows or widens what the session may do.
//!
//! The body names the fields to change, with the mandate's own names and forms:
//!
//! - `ttl_secs` (counted from now) or `not_after`: the new end;
//! - `window`, `idle_timeout_secs`, `anomaly` (each `null` to remove), `revoke_on_disconnect`;
//! - `egress`: the whole new `egress` section;
//! - `credentials`: the ids of the credentials to keep, e.g. `["bank"]` (the others are
//!   removed and zeroized at once);
//! - `unlisted_credentials`, `on_leak`;
//! - `max_agent_connections`, `resume_window_secs`, `resume_ticket_ttl_secs`,
//!   `resume_requires_ticket`, `resume_quiet_secs` (each `null` for its default);
//! - `approved_by`: who approved a widening (required when anything widens).
//!
//! Narrowing needs no approval. Anything that is not provably narrower (a later end, a new
//! host, a wider window, a removed limit, a changed `hosts` entry) is widening. Credentials
//! cannot be added to a live session: the browser's cookie block for a credential's site is
//! fixed at launch, so a new site's cookies could land in the browser; start a new session.
//! `agent`, `not_before` and `identity` cannot change (revoke an agent key instead), nor can
//! `actions` and `approval_timeout_secs` (their budgets count over the session's life).

use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use crate::mandate::{Mandate, OnLeak, UnlistedCredentials, ValidMandate};

/// One changed field, as the audit record shows it (values never: credential ids only).
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The mandate field, e.g. `egress.allow`.
    pub field: String,
    /// Whether it lets the session do more than before.
    pub widened: bool,
    /// The value before.
    pub from: Value,
    /// The value after.
    pub to: Value,
}

impl Change {
    /// The change as an audit record's list entry.
    pub fn to_json(&self) -> Value {
        json!({
            "field": self.field,
            "widened": self.widened,
            "from": self.from,
            "to": self.to,
        })
    }
}

/// A checked change, ready to be put in force.
#[derive(Debug)]
pub struct Patched {
    /// The mandate after the change.
    pub mandate: ValidMandate,
    /// What changed.
    pub changes: Vec<Change>,
    /// Credentials to remove (and zeroize).
    pub removed_credentials: Vec<String>,
    /// Who approved it, when the body said.
    pub approved_by: Option<String>,
}

impl Patched {
    /// Whether any change widens the mandate.
    pub fn widens(&self) -> bool {
        self.changes.iter().any(|c| c.widened)
    }
}

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The body is wrong; the field and what to do.
    #[error("{field}: {message}")]
    Invalid {
        /// The field at fault.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The change widens the mandate and nobody approved it.
    #[error(
        "approved_by: this change widens the mandate ({0}); widening needs the approval of a \
         control process independent of the agent: send \"approved_by\" naming who approved it"
    )]
    NeedsApproval(String),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> PatchError {
    PatchError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

const FIELDS: &[&str] = &[
    "approved_by",
    "ttl_secs",
    "not_after",
    "window",
    "idle_timeout_secs",
    "revoke_on_disconnect",
    "anomaly",
    "egress",
    "credentials",
    "unlisted_credentials",
    "on_leak",
    "max_agent_connections",
    "resume_window_secs",
    "resume_ticket_ttl_secs",
    "resume_requires_ticket",
    "resume_quiet_secs",
];

/// Checks `body` against the mandate in force and builds the changed mandate. Nothing is put
/// in force here.
pub fn prepare(
    current: &ValidMandate,
    body: &str,
    now: OffsetDateTime,
    max_ttl_secs: u64,
) -> Result<Patched, PatchError> {
    let body: Map<String, Value> = serde_json::from_str(body)
        .map_err(|e| invalid("body", format!("expected a JSON object: {e}")))?;
    if body.is_empty() {
        return Err(invalid(
            "body",
            format!(
                "names nothing to change; give one or more of {}",
                FIELDS.join(", ")
            ),
        ));
    }
    for key in body.keys() {
        match key.as_str() {
            "agent" | "not_before" | "identity" | "actions" | "approval_timeout_secs" => {
                return Err(invalid(
                    key,
                    "cannot change while the session runs; start a new session",
                ))
            }
            k if !FIELDS.contains(&k) => {
                return Err(invalid(
                    key,
                    format!("unknown field; a change may name {}", FIELDS.join(", ")),
                ))
            }
            _ => {}
        }
    }
    let approved_by = match body.get("approved_by") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_str()
                .and_then(crate::approvals::person)
                .ok_or_else(|| {
                    invalid(
                        "approved_by",
                        "must name who approved the change: 1 to 128 characters, no control \
                         characters",
                    )
                })?,
        ),
    };

    // The changed mandate, built on the one in force through its own serde forms, so every
    // field is parsed and checked exactly as at creation.
    let old = &current.source;
    let mut doc = serde_json::to_value(old).map_err(|e| invalid("mandate", e.to_string()))?;
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| invalid("mandate", "the mandate in force is not an object"))?;
    // The end is always carried as an absolute `not_after`.
    obj.remove("ttl_secs");
    let end = match (body.get("ttl_secs"), body.get("not_after")) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "ttl_secs",
                "give either ttl_secs or not_after, not both",
            ))
        }
        (Some(v), None) => {
            let secs = v.as_i64().filter(|s| *s > 0).ok_or_else(|| {
                invalid(
                    "ttl_secs",
                    "must be a positive whole number of seconds, counted from now",
                )
            })?;
            now + time::Duration::seconds(secs)
        }
        (None, Some(v)) => {
            let text = v
                .as_str()
                .ok_or_else(|| invalid("not_after", "must be an RFC 3339 time"))?;
            OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).map_err(
                |e| {
                    invalid(
                        "not_after",
                        format!("`{text}` is not an RFC 3339 time: {e}"),
                    )
                },
            )?
        }
        (None, None) => current.expires_at,
    };
    obj.insert("not_after".into(), json!(crate::session::rfc3339(end)));
    for key in [
        "window",
        "idle_timeout_secs",
        "anomaly",
        "revoke_on_disconnect",
        "egress",
        "unlisted_credentials",
        "on_leak",
        "max_agent_connections",
        "resume_window_secs",
        "resume_ticket_ttl_secs",
        "resume_requires_ticket",
        "resume_quiet_secs",
    ] {
        match body.get(key) {
            None => {}
            Some(Value::Null) => {
                obj.remove(key);
            }
            Some(v) => {
                obj.insert(key.into(), v.clone());
            }
        }
    }
    let mut removed_credentials = Vec::new();
    if let Some(keep) = body.get("credentials") {
        let ids = keep.as_array().ok_or_else(|| {
            invalid(
                "credentials",
                "must list the ids of the credentials to keep, e.g. [\"bank\"]",
            )
        })?;
        let mut kept = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let field = format!("credentials[{i}]");
            let Some(id) = id.as_str() else {
                return Err(invalid(
                    field,
                    "must be the id of a credential the session holds; credentials cannot be \
                     added to a live session (the browser's cookie block for a site is fixed \
                     at launch): start a new session",
                ));
            };
            if !old.credentials.iter().any(|c| c.id == id) {
                return Err(invalid(
                    field,
                    format!(
                        "the session holds no credential `{id}`; credentials cannot be added to \
                         a live session (the browser's cookie block for a site is fixed at \
                         launch): start a new session"
                    ),
                ));
            }
            if kept.contains(&id) {
                return Err(invalid(field, format!("`{id}` is listed twice")));
            }
            kept.push(id);
        }
        removed_credentials = old
            .credentials
            .iter()
            .filter(|c| !kept.contains(&c.id.as_str()))
            .map(|c| c.id.clone())
            .collect();
        let creds: Vec<Value> = obj
            .get("credentials")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| {
                c.get("id")
                    .and_then(Value::as_str)
                    .is_some_and(|id| kept.contains(&id))
            })
            .collect();
        obj.insert("credentials".into(), Value::Array(creds));
    }

    // Serialized credentials carry placeholders instead of values; the kept copies (and
    // their empty values) are put back after parsing.
    let mut source: Mandate =
        serde_json::from_value(doc).map_err(|e| invalid("body", e.to_string()))?;
    source.credentials = old
        .credentials
        .iter()
        .filter(|c| !removed_credentials.contains(&c.id))
        .cloned()
        .collect();
    let gave_ttl = body.contains_key("ttl_secs");
    let mandate = source.revalidate(now, max_ttl_secs).map_err(|e| {
        // The end travels as `not_after`; name the field the body used.
        let field = if e.field == "not_after" && gave_ttl {
            "ttl_secs".to_string()
        } else {
            e.field
        };
        invalid(field, e.message)
    })?;
    let changes = diff(current, &mandate, &removed_credentials);
    let patched = Patched {
        mandate,
        changes,
        removed_credentials,
        approved_by,
    };
    if patched.changes.is_empty() {
        return Err(invalid(
            "body",
            "changes nothing: every field given equals the mandate in force",
        ));
    }
    if patched.widens() && patched.approved_by.is_none() {
        let fields: Vec<&str> = patched
            .changes
            .iter()
            .filter(|c| c.widened)
            .map(|c| c.field.as_str())
            .collect();
        return Err(PatchError::NeedsApproval(fields.join(", ")));
    }
    Ok(patched)
}

/// The fields that differ, each marked widened unless it provably narrows.
fn diff(old: &ValidMandate, new: &ValidMandate, removed: &[String]) -> Vec<Change> {
    let (o, n) = (&old.source, &new.source);
    let mut out = Vec::new();
    let mut push = |field: &str, widened: bool, from: Value, to: Value| {
        out.push(Change {
            field: field.into(),
            widened,
            from,
            to,
        })
    };
    if new.expires_at != old.expires_at {
        push(
            "not_after",
            new.expires_at > old.expires_at,
            json!(crate::session::rfc3339(old.expires_at)),
            json!(crate::session::rfc3339(new.expires_at)),
        );
    }
    if o.window != n.window {
        let widened = match (&old.window, &new.window) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(b)) => !b.within(a),
        };
        push("window", widened, json!(o.window), json!(n.window));
    }
    if o.idle_timeout_secs != n.idle_timeout_secs {
        let widened = match (o.idle_timeout_secs, n.idle_timeout_secs) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(b)) => b > a,
        };
        push(
            "idle_timeout_secs",
            widened,
            json!(o.idle_timeout_secs),
            json!(n.idle_timeout_secs),
        );
    }
    if o.revoke_on_disconnect != n.revoke_on_disconnect {
        push(
            "revoke_on_disconnect",
            !n.revoke_on_disconnect,
            json!(o.revoke_on_disconnect),
            json!(n.revoke_on_disconnect),
        );
    }
    if o.anomaly != n.anomaly {
        let widened = match (o.anomaly, n.anomaly) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(b)) => b.max_blocked > a.max_blocked || b.within_secs < a.within_secs,
        };
        push("anomaly", widened, json!(o.anomaly), json!(n.anomaly));
    }
    let (a, b) = (old.resume, new.resume);
    if a.max_connections != b.max_connections {
        push(
            "max_agent_connections",
            b.max_connections > a.max_connections,
            json!(a.max_connections),
            json!(b.max_connections),
        );
    }
    if a.window != b.window {
        push(
            "resume_window_secs",
            b.window > a.window,
            json!(a.window.as_secs()),
            json!(b.window.as_secs()),
        );
    }
    if a.ticket_ttl != b.ticket_ttl {
        push(
            "resume_ticket_ttl_secs",
            b.ticket_ttl > a.ticket_ttl,
            json!(a.ticket_ttl.as_secs()),
            json!(b.ticket_ttl.as_secs()),
        );
    }
    if a.requires_ticket != b.requires_ticket {
        push(
            "resume_requires_ticket",
            !b.requires_ticket,
            json!(a.requires_ticket),
            json!(b.requires_ticket),
        );
    }
    if a.quiet != b.quiet {
        push(
            "resume_quiet_secs",
            b.quiet < a.quiet,
            json!(a.quiet.as_secs()),
            json!(b.quiet.as_secs()),
        );
    }
    if o.egress.allow != n.egress.allow {
        let widened = !new
            .egress
            .allow
            .iter()
            .all(|p| old.egress.allow.iter().any(|q| q.covers(p)));
        push(
            "egress.allow",
            widened,
            json!(o.egress.allow),
            json!(n.egress.allow),
        );
    }
    if o.egress.deny != n.egress.deny {
        push(
            "egress.deny",
            !new.egress.keeps_denials_of(&old.egress),
            json!(o.egress.deny),
            json!(n.egress.deny),
        );
    }
    if old.egress.ports != new.egress.ports {
        push(
            "egress.ports",
            !new.egress.ports_within(&old.egress),
            json!(o.egress.ports),
            json!(n.egress.ports),
        );
    }
    if o.egress.private_networks != n.egress.private_networks {
        let widened = !new.egress.private_networks.iter().all(|net| {
            old.egress
                .private_networks
                .iter()
                .any(|wide| wide.contains(net))
        });
        push(
            "egress.private_networks",
            widened,
            json!(o.egress.private_networks),
            json!(n.egress.private_networks),
        );
    }
    if old.egress.hosts != new.egress.hosts {
        // A fixed answer sends a name somewhere else: any change of one is a widening.
        push(
            "egress.hosts",
            true,
            json!(o.egress.hosts),
            json!(n.egress.hosts),
        );
    }
    if !removed.is_empty() {
        let ids = |m: &Mandate| {
            m.credentials
                .iter()
                .map(|c| c.id.clone())
                .collect::<Vec<_>>()
        };
        push("credentials", false, json!(ids(o)), json!(ids(n)));
    }
    if o.unlisted_credentials != n.unlisted_credentials {
        push(
            "unlisted_credentials",
            n.unlisted_credentials == UnlistedCredentials::Strip,
            json!(o.unlisted_credentials),
            json!(n.unlisted_credentials),
        );
    }
    if o.on_leak != n.on_leak {
        push(
            "on_leak",
            n.on_leak == OnLeak::Block,
            json!(o.on_leak),
            json!(n.on_leak),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-07-06 10:00:00 UTC);

    fn current() -> ValidMandate {
        let mut m = Mandate::from_json(
            r#"{"agent":"a","ttl_secs":3600,
                "idle_timeout_secs":600,
                "anomaly":{"max_blocked":5,"within_secs":60},
                "egress":{"allow":["*.example.com","bank.test"],
                          "deny":["*.x.example.com"],
                          "ports":[8443],
                          "private_networks":["127.0.0.0/8"],
                          "hosts":{"bank.test":"127.0.0.1"}},
                "credentials":[
                  {"id":"bank","site":"bank.test","headers":{"Authorization":"Bearer SECRET-123456"}},
                  {"id":"mail","site":"mail.test","headers":{"X-Key":"MAILKEY-123456"}}]}"#,
        )
        .unwrap();
        let _values = m.take_credentials();
        m.revalidate(NOW, 8 * 3600).unwrap()
    }

    fn patch(body: &str) -> Result<Patched, PatchError> {
        prepare(&current(), body, NOW, 8 * 3600)
    }

    fn field_of(e: PatchError) -> String {
        match e {
            PatchError::Invalid { field, .. } => field,
            PatchError::NeedsApproval(_) => "approved_by".into(),
        }
    }

    #[test]
    fn narrowing_needs_no_approval() {
        let p = patch(
            r#"{"ttl_secs":60,"egress":{"allow":["a.example.com"],"deny":["*.example.com"],"private_networks":["127.0.0.1/32"],"hosts":{"bank.test":"127.0.0.1"}},
                "credentials":["mail"],"idle_timeout_secs":30,"revoke_on_disconnect":true,
                "anomaly":{"max_blocked":2,"within_secs":120},"unlisted_credentials":"block",
                "window":{"days":["mon"],"start":"09:00","end":"17:00","tz":"UTC"}}"#,
        )
        .unwrap();
        assert!(!p.widens(), "{:?}", p.changes);
        assert_eq!(p.removed_credentials, vec!["bank".to_string()]);
        assert_eq!(p.mandate.expires_at, NOW + time::Duration::seconds(60));
        let fields: Vec<&str> = p.changes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "not_after",
                "window",
                "idle_timeout_secs",
                "revoke_on_disconnect",
                "anomaly",
                "egress.allow",
                "egress.deny",
                "egress.ports",
                "egress.private_networks",
                "credentials",
                "unlisted_credentials"
            ]
        );
        assert_eq!(p.mandate.source.credentials.len(), 1);
    }

    #[test]
    fn widening_needs_approved_by() {
        for body in [
            r#"{"ttl_secs":7200}"#,
            r#"{"egress":{"allow":["*.example.com","bank.test","evil.test"],"deny":["*.x.example.com"],"ports":[8443],"private_networks":["127.0.0.0/8"],"hosts":{"bank.test":"127.0.0.1"}}}"#,
            r#"{"egress":{"allow":["*.example.com","bank.test"],"deny":["*.x.example.com"],"ports":[8443],"private_networks":["0.0.0.0/0"],"hosts":{"bank.test":"127.0.0.1"}}}"#,
            r#"{"egress":{"allow":["*.example.com","bank.test"],"deny":["*.x.example.com"],"ports":[8443],"private_networks":["127.0.0.0/8"],"hosts":{"bank.test":"127.0.0.2"}}}"#,
            r#"{"idle_timeout_secs":null}"#,
            r#"{"idle_timeout_secs":601}"#,
            r#"{"anomaly":null}"#,
            r#"{"anomaly":{"max_blocked":6,"within_secs":60}}"#,
            r#"{"on_leak":"block"}"#,
            r#"{"egress":{"allow":["*.example.com","bank.test"],"deny":[],"private_networks":["127.0.0.0/8"],"hosts":{"bank.test":"127.0.0.1"}}}"#,
            r#"{"egress":{"allow":["*.example.com","bank.test"],"deny":["*.x.example.com"],"ports":[8443, 9000],"private_networks":["127.0.0.0/8"],"hosts":{"bank.test":"127.0.0.1"}}}"#,
            r#"{"max_agent_connections":2}"#,
            r#"{"resume_window_secs":7200}"#,
            r#"{"resume_ticket_ttl_secs":600}"#,
            r#"{"resume_requires_ticket":false}"#,
        ] {
            let e = patch(body).expect_err(body);
            assert!(matches!(e, PatchError::NeedsApproval(_)), "{body}: {e}");
            let with = body.replacen('{', r#"{"approved_by":"sec-oncall","#, 1);
            let p = patch(&with).unwrap_or_else(|e| panic!("{with}: {e}"));
            assert!(p.widens());
            assert_eq!(p.approved_by.as_deref(), Some("sec-oncall"));
        }
    }

    #[test]
    fn resumption_rules_narrow_when_smaller_or_stricter() {
        let p = patch(
            r#"{"resume_window_secs":60,"resume_ticket_ttl_secs":30,"resume_requires_ticket":true,
                "resume_quiet_secs":10}"#,
        )
        .unwrap();
        assert!(!p.widens(), "{:?}", p.changes);
        let fields: Vec<&str> = p.changes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "resume_window_secs",
                "resume_ticket_ttl_secs",
                "resume_quiet_secs"
            ]
        );
        assert_eq!(p.mandate.resume.window.as_secs(), 60);
        // Back to the default with null: a longer window again, so a widening.
        let back = prepare(&p.mandate, r#"{"resume_window_secs":null}"#, NOW, 8 * 3600);
        assert!(matches!(back, Err(PatchError::NeedsApproval(_))));
    }

    #[test]
    fn what_cannot_change_is_refused_naming_the_field() {
        let cases = [
            (r#"{"agent":"b"}"#, "agent"),
            (r#"{"not_before":"2026-07-06T11:00:00Z"}"#, "not_before"),
            (r#"{"identity":{"agent_key":"ak_00000000"}}"#, "identity"),
            (r#"{"resume_window_secs":28801}"#, "resume_window_secs"),
            (r#"{"max_agent_connections":0}"#, "max_agent_connections"),
            (r#"{"credentials":["bank","new"]}"#, "credentials[1]"),
            (
                r#"{"credentials":[{"id":"x","site":"x.test","headers":{"A":"SECRET-99999"}}]}"#,
                "credentials[0]",
            ),
            (r#"{"credentials":["bank","bank"]}"#, "credentials[1]"),
            (r#"{"bogus":1}"#, "bogus"),
            (r#"{}"#, "body"),
            (r#"[]"#, "body"),
            (
                r#"{"ttl_secs":1,"not_after":"2026-07-06T11:00:00Z"}"#,
                "ttl_secs",
            ),
            (r#"{"ttl_secs":-5}"#, "ttl_secs"),
            (r#"{"not_after":"2026-07-06T09:00:00Z"}"#, "not_after"),
            (r#"{"idle_timeout_secs":0}"#, "idle_timeout_secs"),
            (
                r#"{"window":{"days":["moon"],"start":"09:00","end":"10:00","tz":"UTC"}}"#,
                "window.days[0]",
            ),
            (r#"{"egress":{"allow":["http://x"]}}"#, "egress.allow[0]"),
            (r#"{"approved_by":"","ttl_secs":60}"#, "approved_by"),
            (r#"{"ttl_secs":3600}"#, "body"),
        ];
        for (body, field) in cases {
            let e = patch(body).expect_err(body);
            assert_eq!(field_of(e), field, "{body}");
        }
    }

    #[test]
    fn a_changed_mandate_keeps_no_credential_value() {
        let p = patch(r#"{"credentials":["bank"]}"#).unwrap();
        let shown = format!(
            "{:?} {}",
            p,
            serde_json::to_string(&p.mandate.source).unwrap()
        );
        assert!(!shown.contains("SECRET-123456") && !shown.contains("MAILKEY-123456"));
        let audit: Vec<Value> = p.changes.iter().map(Change::to_json).collect();
        assert_eq!(audit[0]["to"], json!(["bank"]));
    }
}
