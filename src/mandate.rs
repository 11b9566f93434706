//! The mandate: what one agent session may do, for how long.
//!
//! One serde type serves the control API (JSON) and the files under `profiles/` (TOML). Unknown
//! fields are rejected everywhere, and every validation error names the field at fault, so an
//! operator never has to guess which line of a mandate was refused.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::egress::{EgressPolicy, Host, HostPattern, PortSpec};
use crate::schedule::{Schedule, Window};

/// The longest a mandate may run when the supervisor's config does not say otherwise.
pub const DEFAULT_MAX_TTL_SECS: u64 = 8 * 60 * 60;

/// A mandate as written by an operator. Parse it with [`Mandate::from_json`] or
/// [`Mandate::from_toml`], then turn it into a [`ValidMandate`] with [`Mandate::validate`].
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Mandate {
    /// Label of the agent this mandate is for; appears in the audit log and in logs.
    pub agent: String,
    /// Lifetime in seconds, counted by the supervisor's clock from the moment the session is
    /// created. Exactly one of `ttl_secs` and `not_after` must be given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<i64>,
    /// Absolute deadline (RFC 3339). Exactly one of `ttl_secs` and `not_after` must be given.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_after: Option<OffsetDateTime>,
    /// Earliest moment (RFC 3339) a session may start under this mandate. Default: at once.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_before: Option<OffsetDateTime>,
    /// A recurring time window the session may run in: it cannot start outside, and is ended
    /// (and purged) when the window closes, whatever the sites' own cookie expiry says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// Ends the session when no agent traffic (CDP messages, `/json` requests) arrived for
    /// this many seconds. Counted from the session's creation. Default: no idle limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// Ends the session when the last agent connection closes. Default: false (an agent may
    /// reconnect until the mandate ends).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoke_on_disconnect: bool,
    /// Ends the session (`session.anomaly`) when this many refusals of the credential, egress
    /// or CDP kinds happen within the given seconds. Default: no threshold (`on_leak` still
    /// applies to each leak).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<AnomalyThreshold>,
    /// Who may drive the session (AG-374 4.2): an operator-issued agent key and/or pinned
    /// client certificates. Without it, the session's capability URL is the only credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<AgentIdentity>,
    /// How many agent connections may be open at once. Default 1: a second connection is
    /// refused while one is live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_agent_connections: Option<u32>,
    /// How long a session whose last agent connection dropped (`detached`) waits for a
    /// resumption before it is ended and purged. Default 3600, at most 28800.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_window_secs: Option<u64>,
    /// How long a resume ticket stays valid after the connection drops (or after it is
    /// issued, if later). Default 300, from 5 to 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_ticket_ttl_secs: Option<u64>,
    /// Whether re-attaching to a detached session needs a resume ticket. Default true;
    /// `false` lets the capability (and identity) alone reconnect, audited as such.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_requires_ticket: Option<bool>,
    /// After a resumption, credentials are not injected until this many seconds passed
    /// (AG-374 4.11, progressive restoration). Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_quiet_secs: Option<u64>,
    /// Where the browser may connect. The default allows nothing.
    #[serde(default)]
    pub egress: Egress,
    /// Credentials the session may use (never hold): the supervisor adds them to first-party
    /// requests for their site and keeps them out of the browser, the agent and every log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<Credential>,
    /// What happens to a request for a site without a credential that carries `Cookie`,
    /// `Authorization` or `Proxy-Authorization` headers: stripped (default) or blocked.
    #[serde(default)]
    pub unlisted_credentials: UnlistedCredentials,
    /// What happens when a request carries a held secret somewhere it does not belong: it is
    /// always failed; `revoke` (default) also ends the session.
    #[serde(default)]
    pub on_leak: OnLeak,
    /// Action rules, checked on every request after the credential decisions: the first
    /// that matches allows, denies, or holds the request for a human's approval (see
    /// [`crate::actions`]). No match allows. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<crate::actions::ActionRule>,
    /// How long a request held for approval waits for a human before it is denied. Default
    /// 120, from 1 to 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_timeout_secs: Option<u64>,
}

/// See [`Mandate::identity`]. When both parts are given, both must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentIdentity {
    /// Id of an agent key issued by `POST /v1/agent-keys` (`ak_…`); the agent presents the key
    /// itself as `Authorization: Bearer chak_…` (or the `agent_key` query parameter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_key: Option<String>,
    /// SHA-256 fingerprints (hex, colons allowed) of client certificates accepted on the
    /// agent endpoint's mutual TLS; needs `[tls] client_auth` in the server config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_cert_sha256: Vec<String>,
}

/// Defaults and limits of the resumption fields.
pub const DEFAULT_RESUME_WINDOW_SECS: u64 = 3600;
/// See [`Mandate::resume_window_secs`].
pub const MAX_RESUME_WINDOW_SECS: u64 = 28_800;
/// See [`Mandate::resume_ticket_ttl_secs`].
pub const DEFAULT_RESUME_TICKET_TTL_SECS: u64 = 300;

/// The resumption rules of a mandate, with defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumePolicy {
    /// `max_agent_connections`.
    pub max_connections: usize,
    /// `resume_window_secs`.
    pub window: std::time::Duration,
    /// `resume_ticket_ttl_secs`.
    pub ticket_ttl: std::time::Duration,
    /// `resume_requires_ticket`.
    pub requires_ticket: bool,
    /// `resume_quiet_secs`.
    pub quiet: std::time::Duration,
}

/// See [`Mandate::unlisted_credentials`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnlistedCredentials {
    /// Remove the headers and send the request (audited as `credential.stripped`).
    #[default]
    Strip,
    /// Fail the request (audited as `credential.blocked`).
    Block,
}

/// See [`Mandate::on_leak`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLeak {
    /// Fail the request and revoke the session.
    #[default]
    Revoke,
    /// Fail the request only.
    Block,
}

/// See [`Mandate::anomaly`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyThreshold {
    /// Refusals (`credential.blocked`, `credential.exfiltration_blocked`,
    /// `credential.scope_escalation_blocked`, `credential.refresh_rejected`, `egress.denied`,
    /// `cdp.denied`) that end the session; at least 1.
    pub max_blocked: u32,
    /// Within this many seconds (a sliding window); at least 1.
    pub within_secs: u64,
}

/// The browser's network policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    /// Host patterns the browser may reach: `example.com` (that host), `*.example.com` (its
    /// subdomains, not the apex), `*` (any public host), IP literals. Names are compared as a
    /// browser reads them: any case, one trailing dot, international names in Unicode or
    /// punycode. Default: none.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Host patterns (same syntax as `allow`) refused even when `allow` matches: deny wins.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// CIDRs the browser may reach although they are private, loopback, link-local or
    /// unique-local. Default: none, so the browser can never reach the host's own network.
    #[serde(default)]
    pub private_networks: Vec<String>,
    /// Names resolved by the supervisor to a fixed address, like curl `--resolve`.
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
    /// Destination ports allowed besides 80 and 443: numbers (`8443`) or inclusive ranges
    /// (`"1024-65535"`). Default: none, so only 80 and 443.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
}

/// One credential: material for one site, held by the supervisor.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// Name the audit log uses for this credential.
    pub id: String,
    /// The site (registrable domain) the credential belongs to; requests to it and its
    /// subdomains get the credential when they come from a first-party context.
    pub site: String,
    /// Other sites whose pages may send requests that carry this credential (for example a
    /// shop whose checkout calls the bank's API). Default: none, only the site itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_initiators: Vec<String>,
    /// Cookies to add to requests for `site`.
    #[serde(default)]
    pub cookies: Vec<CredentialCookie>,
    /// Headers to add to requests for `site` (e.g. `Authorization`).
    #[serde(default, serialize_with = "redact_map")]
    pub headers: BTreeMap<String, SecretString>,
    /// An OAuth 2.0 refresh grant the supervisor runs itself: it keeps a short-lived access
    /// token for `site` fresh and injects it; the browser never sees the refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuth>,
    /// An upstream revocation or logout call (e.g. RFC 7009) the supervisor makes with the
    /// held credential when the session ends, before its values are forgotten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke: Option<Revoke>,
    /// Just in time: the credential rides only on a request a human approved (an `approve`
    /// action rule), and only on that one request; every other request to its site goes
    /// without it. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_approval: bool,
}

/// See [`Credential::oauth`]. The access token is refreshed before it is `max_token_age_secs`
/// old (AG-120 4.9) and only ever with the mandate's `scope` (AG-120 4.3).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth {
    /// The token endpoint: `https://`, or `http://` to a loopback address or `localhost`.
    pub token_endpoint: String,
    /// The OAuth client id.
    pub client_id: String,
    /// The client secret, for confidential clients; held like every credential value.
    #[serde(
        default,
        serialize_with = "redact_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_secret: Option<SecretString>,
    /// The granted scope, space-separated (`"read write"`). Refreshes ask for exactly this; a
    /// token granting more is refused, and so is a page asking the token endpoint for more.
    pub scope: String,
    /// The refresh token; held like every credential value, never in the browser.
    #[serde(serialize_with = "redact")]
    pub refresh_token: SecretString,
    /// The oldest an injected access token may get; refreshes start at 80% of the shorter of
    /// this and the token's `expires_in`. Default 900 (15 minutes, AG-120 4.9); at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_token_age_secs: Option<u64>,
    /// The header the access token rides in. Default `Authorization`, as `Bearer <token>`;
    /// any other header carries the bare token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

/// Default of [`OAuth::max_token_age_secs`].
pub const DEFAULT_MAX_TOKEN_AGE_SECS: u64 = 900;

impl OAuth {
    /// The header the access token rides in.
    pub fn header_name(&self) -> &str {
        self.header.as_deref().unwrap_or("Authorization")
    }

    /// [`OAuth::max_token_age_secs`] with its default.
    pub fn max_token_age(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.max_token_age_secs
                .unwrap_or(DEFAULT_MAX_TOKEN_AGE_SECS),
        )
    }
}

/// See [`Credential::revoke`].
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    /// Where to send it: on the credential's site or the token endpoint's host, `https://`
    /// (or `http://` to a loopback address or `localhost`).
    pub url: String,
    /// The HTTP method. Default `POST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// A form body (`application/x-www-form-urlencoded`). Values may name held material:
    /// `{refresh_token}`, `{access_token}`, `{client_id}`, `{client_secret}`; for RFC 7009,
    /// `{token = "{refresh_token}", token_type_hint = "refresh_token"}`. Default none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub form: BTreeMap<String, String>,
}

impl Revoke {
    /// [`Revoke::method`] with its default, upper case.
    pub fn method(&self) -> String {
        self.method
            .as_deref()
            .unwrap_or("POST")
            .to_ascii_uppercase()
    }
}

/// A cookie held for a credential.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialCookie {
    /// Cookie name.
    pub name: String,
    /// Cookie value; never printed, logged or serialized back.
    #[serde(serialize_with = "redact")]
    pub value: SecretString,
    /// Cookie path; default `/`.
    #[serde(default)]
    pub path: Option<String>,
    /// Send only over https; default true.
    #[serde(default)]
    pub secure: Option<bool>,
    /// Hidden from page script; default true.
    #[serde(default)]
    pub http_only: Option<bool>,
}

fn redact<S: serde::Serializer>(_: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("[held by chaperone]")
}

fn redact_option<S: serde::Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("[held by chaperone]"),
        None => s.serialize_none(),
    }
}

fn redact_map<S: serde::Serializer>(
    m: &BTreeMap<String, SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut out = s.serialize_map(Some(m.len()))?;
    for k in m.keys() {
        out.serialize_entry(k, "[held by chaperone]")?;
    }
    out.end()
}

/// A mandate that was refused, with the field at fault.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct MandateError {
    /// Dotted path of the field, e.g. `egress.allow[2]`.
    pub field: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl MandateError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        MandateError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A mandate that passed validation: deadlines resolved, patterns and addresses parsed.
#[derive(Clone, Debug)]
pub struct ValidMandate {
    /// The mandate as given (secrets redacted when serialized).
    pub source: Mandate,
    /// When the session must end, by the supervisor's clock.
    pub expires_at: OffsetDateTime,
    /// The browser's network policy.
    pub egress: EgressPolicy,
    /// The recurring window, checked.
    pub window: Option<Schedule>,
    /// The idle limit.
    pub idle_timeout: Option<std::time::Duration>,
    /// Connection and resumption rules.
    pub resume: ResumePolicy,
    /// The action rules, checked.
    pub actions: std::sync::Arc<crate::actions::ActionPolicy>,
    /// How long a request held for approval waits for a human.
    pub approval_timeout: std::time::Duration,
}

/// Why a valid mandate cannot start a session right now.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct NotNow {
    /// `not_before` or `window`.
    pub field: &'static str,
    /// When it can start, in words.
    pub message: String,
}

impl ValidMandate {
    /// Whether a session may start at `now`: after `not_before`, inside the window.
    pub fn may_start(&self, now: OffsetDateTime) -> Result<(), NotNow> {
        if let Some(nb) = self.source.not_before.filter(|nb| now < *nb) {
            return Err(NotNow {
                field: "not_before",
                message: format!(
                    "the mandate starts at {}; a session cannot start before then",
                    crate::session::rfc3339(nb)
                ),
            });
        }
        if let Some(w) = &self.window {
            if w.open_until(now).is_none() {
                let next = w.next_open(now).map_or_else(
                    || "it does not open in the next week".to_string(),
                    |t| format!("it next opens at {}", crate::session::rfc3339(t)),
                );
                return Err(NotNow {
                    field: "window",
                    message: format!(
                        "the mandate's window ({}) is closed now; {next}",
                        w.tz_name()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether a detached session may resume at `now` under this mandate: before its end and
    /// inside its window (`not_before` does not apply: the session already started).
    pub fn may_resume(&self, now: OffsetDateTime) -> Result<(), NotNow> {
        if now >= self.expires_at {
            return Err(NotNow {
                field: "not_after",
                message: format!(
                    "the mandate ended at {}",
                    crate::session::rfc3339(self.expires_at)
                ),
            });
        }
        match &self.window {
            Some(w) if w.open_until(now).is_none() => Err(NotNow {
                field: "window",
                message: format!("the mandate's window ({}) is closed now", w.tz_name()),
            }),
            _ => Ok(()),
        }
    }

    /// When the session must end if nothing else ends it first, and why: the mandate's
    /// deadline or the close of the window occurrence `now` falls in (a closed window ends
    /// it at once).
    pub fn next_end(&self, now: OffsetDateTime) -> (OffsetDateTime, Deadline) {
        match &self.window {
            Some(w) => match w.open_until(now) {
                Some(close) if close < self.expires_at => (close, Deadline::WindowEnd),
                Some(_) => (self.expires_at, Deadline::Expiry),
                None => (now, Deadline::WindowEnd),
            },
            None => (self.expires_at, Deadline::Expiry),
        }
    }
}

/// Which clock ends a session: see [`ValidMandate::next_end`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// `ttl_secs` / `not_after`.
    Expiry,
    /// The recurring window closed.
    WindowEnd,
}

impl Mandate {
    /// Parses a JSON mandate; the error names the field at fault.
    pub fn from_json(text: &str) -> Result<Mandate, MandateError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." || path.is_empty() {
                "mandate".to_string()
            } else {
                path
            };
            MandateError::new(field, e.into_inner().to_string())
        })
    }

    /// Parses a TOML mandate (a profile file); the error names the field and line at fault.
    pub fn from_toml(text: &str) -> Result<Mandate, MandateError> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().to_string();
            let field = crate::config::toml_error_line(text, &e)
                .map_or_else(|| "mandate".to_string(), |line| format!("line {line}"));
            MandateError::new(field, message)
        })
    }

    /// Checks every field and resolves the deadline against `now`.
    pub fn validate(
        self,
        now: OffsetDateTime,
        max_ttl_secs: u64,
    ) -> Result<ValidMandate, MandateError> {
        self.validate_with(now, max_ttl_secs, true)
    }

    /// [`Mandate::validate`] for a mandate already in force, changed by a PATCH: its
    /// credentials are the value-less copies the session keeps (their values are in the
    /// vault), so only their ids and sites are checked.
    pub fn revalidate(
        self,
        now: OffsetDateTime,
        max_ttl_secs: u64,
    ) -> Result<ValidMandate, MandateError> {
        self.validate_with(now, max_ttl_secs, false)
    }

    fn validate_with(
        self,
        now: OffsetDateTime,
        max_ttl_secs: u64,
        check_values: bool,
    ) -> Result<ValidMandate, MandateError> {
        let agent = self.agent.trim();
        if agent.is_empty() {
            return Err(MandateError::new(
                "agent",
                "must name the agent (non-empty)",
            ));
        }
        if self.agent.len() > 128 || self.agent.chars().any(char::is_control) {
            return Err(MandateError::new(
                "agent",
                "must be at most 128 characters without control characters",
            ));
        }
        let max = time::Duration::seconds(i64::try_from(max_ttl_secs).unwrap_or(i64::MAX));
        let expires_at = match (self.ttl_secs, self.not_after) {
            (Some(_), Some(_)) => {
                return Err(MandateError::new(
                    "ttl_secs",
                    "give either ttl_secs or not_after, not both",
                ))
            }
            (None, None) => {
                return Err(MandateError::new(
                    "ttl_secs",
                    "a mandate needs a lifetime: give ttl_secs or not_after",
                ))
            }
            (Some(ttl), None) => {
                if ttl <= 0 {
                    return Err(MandateError::new(
                        "ttl_secs",
                        format!("must be a positive number of seconds, got {ttl}"),
                    ));
                }
                if ttl as u64 > max_ttl_secs {
                    return Err(MandateError::new(
                        "ttl_secs",
                        format!("{ttl} exceeds this supervisor's limit of {max_ttl_secs} seconds"),
                    ));
                }
                now + time::Duration::seconds(ttl)
            }
            (None, Some(at)) => {
                if at <= now {
                    return Err(MandateError::new("not_after", "is already in the past"));
                }
                if at - now > max {
                    return Err(MandateError::new(
                        "not_after",
                        format!("is further away than this supervisor's limit of {max_ttl_secs} seconds"),
                    ));
                }
                at
            }
        };

        let mut allow = Vec::with_capacity(self.egress.allow.len());
        for (i, p) in self.egress.allow.iter().enumerate() {
            let pat = HostPattern::parse(p)
                .map_err(|e| MandateError::new(format!("egress.allow[{i}]"), e.to_string()))?;
            allow.push(pat);
        }
        let mut deny = Vec::with_capacity(self.egress.deny.len());
        for (i, p) in self.egress.deny.iter().enumerate() {
            let pat = HostPattern::parse(p)
                .map_err(|e| MandateError::new(format!("egress.deny[{i}]"), e.to_string()))?;
            deny.push(pat);
        }
        let mut ports = Vec::with_capacity(self.egress.ports.len());
        for (i, p) in self.egress.ports.iter().enumerate() {
            let range = p
                .range()
                .map_err(|e| MandateError::new(format!("egress.ports[{i}]"), e.to_string()))?;
            ports.push(range);
        }
        let mut private_networks = Vec::with_capacity(self.egress.private_networks.len());
        for (i, n) in self.egress.private_networks.iter().enumerate() {
            let net = parse_net(n).ok_or_else(|| {
                MandateError::new(
                    format!("egress.private_networks[{i}]"),
                    format!("`{n}` is not a CIDR such as 127.0.0.0/8 or ::1/128"),
                )
            })?;
            private_networks.push(net);
        }
        let mut hosts = BTreeMap::new();
        for (name, addr) in &self.egress.hosts {
            let field = format!("egress.hosts.{name}");
            let key = match Host::parse(name) {
                Ok(Host::Name(n)) => Some(n),
                _ => None,
            }
            .ok_or_else(|| {
                MandateError::new(&field, "the key must be a plain host name like site.test")
            })?;
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| MandateError::new(&field, format!("`{addr}` is not an IP address")))?;
            hosts.insert(key, ip);
        }

        if let Some(nb) = self.not_before {
            if nb >= expires_at {
                return Err(MandateError::new(
                    "not_before",
                    format!(
                        "is not before the mandate's end ({}); the session could never run",
                        crate::session::rfc3339(expires_at)
                    ),
                ));
            }
        }
        let window = match &self.window {
            Some(w) => Some(
                w.validate()
                    .map_err(|e| MandateError::new(format!("window.{}", e.field), e.message))?,
            ),
            None => None,
        };
        let idle_timeout = match self.idle_timeout_secs {
            Some(0) => {
                return Err(MandateError::new(
                    "idle_timeout_secs",
                    "must be at least 1 second; leave it out for no idle limit",
                ))
            }
            Some(s) => Some(std::time::Duration::from_secs(s)),
            None => None,
        };
        if let Some(a) = self.anomaly {
            if a.max_blocked == 0 {
                return Err(MandateError::new(
                    "anomaly.max_blocked",
                    "must be at least 1; leave `anomaly` out for no threshold",
                ));
            }
            if a.within_secs == 0 {
                return Err(MandateError::new(
                    "anomaly.within_secs",
                    "must be at least 1 second",
                ));
            }
        }
        if check_values {
            validate_credentials(&self.credentials)?;
        }
        let resume = validate_resume(&self)?;
        let (actions, approval_timeout) = validate_actions(&self)?;
        let mut this = self;
        if let Some(id) = &mut this.identity {
            validate_identity(id)?;
        }
        let this = this;
        Ok(ValidMandate {
            egress: EgressPolicy {
                allow,
                deny,
                private_networks,
                hosts,
                ports,
            },
            expires_at,
            window,
            idle_timeout,
            resume,
            actions: std::sync::Arc::new(actions),
            approval_timeout,
            source: this,
        })
    }
}

impl Mandate {
    /// Moves the credentials' secret values out: returns the credentials as given and leaves
    /// copies whose values are empty, so a mandate kept for display (the registry lists ended
    /// sessions too) holds no secret once the vault has taken them.
    pub fn take_credentials(&mut self) -> Vec<Credential> {
        let mut emptied = self.credentials.clone();
        for c in &mut emptied {
            for k in &mut c.cookies {
                k.value = SecretString::from("");
            }
            for v in c.headers.values_mut() {
                *v = SecretString::from("");
            }
            if let Some(o) = &mut c.oauth {
                o.refresh_token = SecretString::from("");
                if let Some(cs) = &mut o.client_secret {
                    *cs = SecretString::from("");
                }
            }
        }
        std::mem::replace(&mut self.credentials, emptied)
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

/// Shortest secret value a mandate may hold: below it, the leak detector would match ordinary
/// traffic.
pub const MIN_SECRET_LEN: usize = crate::broker::leak::MIN_SECRET_LEN;

/// Header names a credential may not carry: the browser or the proxy owns them, or they belong
/// in `cookies`.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "cookie",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
];

fn validate_actions(
    m: &Mandate,
) -> Result<(crate::actions::ActionPolicy, std::time::Duration), MandateError> {
    use crate::actions::{DEFAULT_APPROVAL_TIMEOUT_SECS, MAX_APPROVAL_TIMEOUT_SECS};
    let policy = crate::actions::ActionPolicy::compile(&m.actions)
        .map_err(|e| MandateError::new(e.field, e.message))?;
    let timeout = match m.approval_timeout_secs {
        None => DEFAULT_APPROVAL_TIMEOUT_SECS,
        Some(s) if (1..=MAX_APPROVAL_TIMEOUT_SECS).contains(&s) => s,
        Some(s) => {
            return Err(MandateError::new(
                "approval_timeout_secs",
                format!("{s} is outside 1 to {MAX_APPROVAL_TIMEOUT_SECS} seconds"),
            ))
        }
    };
    for (i, c) in m
        .credentials
        .iter()
        .enumerate()
        .filter(|(_, c)| c.on_approval)
    {
        let site = c.site.trim().trim_end_matches('.').to_ascii_lowercase();
        if !policy.may_ask_about(&site) && !policy.may_ask_about(&format!("www.{site}")) {
            return Err(MandateError::new(
                format!("credentials[{i}].on_approval"),
                format!(
                    "the credential rides only on approved requests, but no `actions` rule with \
                     `decision = \"approve\"` matches `{site}` or a host below it: it would \
                     never be used"
                ),
            ));
        }
    }
    Ok((policy, std::time::Duration::from_secs(timeout)))
}

fn validate_resume(m: &Mandate) -> Result<ResumePolicy, MandateError> {
    let in_range = |field: &str, v: Option<u64>, default: u64, lo: u64, hi: u64| match v {
        None => Ok(default),
        Some(v) if (lo..=hi).contains(&v) => Ok(v),
        Some(v) => Err(MandateError::new(
            field,
            format!("{v} is out of range; give {lo} to {hi} seconds"),
        )),
    };
    let max_connections = match m.max_agent_connections {
        None => 1,
        Some(n @ 1..=64) => n as usize,
        Some(n) => {
            return Err(MandateError::new(
                "max_agent_connections",
                format!("{n} is out of range; give 1 to 64"),
            ))
        }
    };
    Ok(ResumePolicy {
        max_connections,
        window: std::time::Duration::from_secs(in_range(
            "resume_window_secs",
            m.resume_window_secs,
            DEFAULT_RESUME_WINDOW_SECS,
            1,
            MAX_RESUME_WINDOW_SECS,
        )?),
        ticket_ttl: std::time::Duration::from_secs(in_range(
            "resume_ticket_ttl_secs",
            m.resume_ticket_ttl_secs,
            DEFAULT_RESUME_TICKET_TTL_SECS,
            5,
            3600,
        )?),
        requires_ticket: m.resume_requires_ticket.unwrap_or(true),
        quiet: std::time::Duration::from_secs(in_range(
            "resume_quiet_secs",
            m.resume_quiet_secs,
            0,
            0,
            3600,
        )?),
    })
}

/// Checks the identity and writes its certificate pins in one form (lowercase hex).
fn validate_identity(id: &mut AgentIdentity) -> Result<(), MandateError> {
    if id.agent_key.is_none() && id.client_cert_sha256.is_empty() {
        return Err(MandateError::new(
            "identity",
            "names nothing; give agent_key, client_cert_sha256, or both (or leave identity out)",
        ));
    }
    if let Some(k) = &id.agent_key {
        let ok = k.len() == 11
            && k.starts_with("ak_")
            && k[3..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if !ok {
            return Err(MandateError::new(
                "identity.agent_key",
                "must be the id of an agent key (`ak_` and 8 hex digits, as POST /v1/agent-keys \
                 answers), not the key itself",
            ));
        }
    }
    for (i, pin) in id.client_cert_sha256.iter_mut().enumerate() {
        let hex: String = pin
            .chars()
            .filter(|c| *c != ':')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(MandateError::new(
                format!("identity.client_cert_sha256[{i}]"),
                "must be a SHA-256 fingerprint: 64 hex digits (colons allowed)",
            ));
        }
        *pin = hex;
    }
    Ok(())
}

fn validate_credentials(creds: &[Credential]) -> Result<(), MandateError> {
    let mut ids = std::collections::BTreeSet::new();
    let mut sites = BTreeMap::new();
    for (i, c) in creds.iter().enumerate() {
        validate_credential(i, c)?;
        if !ids.insert(c.id.as_str()) {
            return Err(MandateError::new(
                format!("credentials[{i}].id"),
                format!(
                    "`{}` is used by an earlier credential; ids must be unique",
                    c.id
                ),
            ));
        }
        if let Some(j) = sites.insert(c.site.to_ascii_lowercase(), i) {
            return Err(MandateError::new(
                format!("credentials[{i}].site"),
                format!(
                    "credentials[{j}] already holds `{}`; put one site's cookies and headers \
                     into one credential",
                    c.site
                ),
            ));
        }
    }
    Ok(())
}

/// Checks that `name` is a registrable domain (`bank.test`, not `www.bank.test` or `co.uk`).
fn registrable(field: &str, name: &str) -> Result<(), MandateError> {
    let Ok(Host::Name(host)) = Host::parse(name) else {
        return Err(MandateError::new(
            field,
            "must be a host name such as example.com",
        ));
    };
    let site = crate::vault::jar::site_of(&host);
    if site != host || !host.contains('.') {
        return Err(MandateError::new(
            field,
            format!(
                "`{name}` is not a registrable domain (a site); use `{site}`, which covers \
                 its subdomains too"
            ),
        ));
    }
    Ok(())
}

/// Secret values must survive JSON, headers and cookies byte for byte, so the leak detector
/// and the gate's scrubber see them exactly as they travel.
pub(crate) fn check_secret(
    field: &str,
    value: &str,
    allow_space: bool,
) -> Result<(), MandateError> {
    if value.len() < MIN_SECRET_LEN {
        return Err(MandateError::new(
            field,
            format!(
                "is shorter than {MIN_SECRET_LEN} characters; chaperone cannot tell a value \
                 this short apart from ordinary traffic"
            ),
        ));
    }
    let bad = |ch: char| {
        !(ch.is_ascii_graphic() || (allow_space && ch == ' ')) || matches!(ch, '"' | '\\' | ';')
    };
    if value.chars().any(bad) {
        return Err(MandateError::new(
            field,
            "may hold only printable ASCII without `\"`, `\\` or `;`",
        ));
    }
    Ok(())
}

fn validate_credential(i: usize, c: &Credential) -> Result<(), MandateError> {
    let at = |f: &str| format!("credentials[{i}].{f}");
    if c.id.trim().is_empty() || c.id.len() > 128 || c.id.chars().any(char::is_control) {
        return Err(MandateError::new(
            at("id"),
            "must be a non-empty name of at most 128 characters without control characters",
        ));
    }
    registrable(&at("site"), &c.site)?;
    for (j, s) in c.allowed_initiators.iter().enumerate() {
        registrable(&at(&format!("allowed_initiators[{j}]")), s)?;
    }
    if c.cookies.is_empty() && c.headers.is_empty() && c.oauth.is_none() {
        return Err(MandateError::new(
            at("cookies"),
            "a credential needs at least one cookie, header or `oauth` grant",
        ));
    }
    for (j, k) in c.cookies.iter().enumerate() {
        if k.name.is_empty()
            || k.name
                .chars()
                .any(|ch| !ch.is_ascii_graphic() || "()<>@,;:\\\"/[]?={}".contains(ch))
        {
            return Err(MandateError::new(
                at(&format!("cookies[{j}].name")),
                "must be a cookie name (a token: no spaces, separators or control characters)",
            ));
        }
        check_secret(
            &at(&format!("cookies[{j}].value")),
            k.value.expose_secret(),
            false,
        )?;
        if let Some(path) = &k.path {
            if !path.starts_with('/') || path.chars().any(|ch| ch.is_control() || ch == ';') {
                return Err(MandateError::new(
                    at(&format!("cookies[{j}].path")),
                    "must start with `/` and hold no `;` or control characters",
                ));
            }
        }
    }
    for (name, value) in &c.headers {
        let field = at(&format!("headers.{name}"));
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err(MandateError::new(
                field,
                format!("`{name}` is not a header name"),
            ));
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(MandateError::new(
                field,
                "chaperone does not inject this header (the browser or the proxy owns it; put \
                 cookies under `cookies`)",
            ));
        }
        check_secret(&field, value.expose_secret(), true)?;
    }
    let token_host = match &c.oauth {
        Some(o) => Some(validate_oauth(&at("oauth"), o, c)?),
        None => None,
    };
    if let Some(r) = &c.revoke {
        validate_revoke(&at("revoke"), r, c, token_host.as_deref())?;
    }
    Ok(())
}

fn header_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

/// An address the supervisor itself calls with held material: `https://`, or plain `http://`
/// only where nothing leaves the machine (a loopback address, `localhost`).
pub(crate) fn upstream_url(field: &str, text: &str) -> Result<url::Url, MandateError> {
    let url = url::Url::parse(text)
        .map_err(|e| MandateError::new(field, format!("`{text}` is not a URL: {e}")))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => {
            return Err(MandateError::new(
                field,
                format!("`{text}` has no host; give an https:// URL"),
            ))
        }
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(MandateError::new(
                field,
                format!(
                    "`{text}` is plain http: held credentials travel only over https (plain \
                     http is accepted for loopback addresses and localhost only)"
                ),
            ))
        }
        other => {
            return Err(MandateError::new(
                field,
                format!("`{other}:` is not allowed; give an https:// URL"),
            ))
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(MandateError::new(
            field,
            "must not carry a user name or password (put a client secret in \
             `oauth.client_secret`)",
        ));
    }
    if url.fragment().is_some() {
        return Err(MandateError::new(field, "must not have a `#fragment`"));
    }
    Ok(url)
}

/// Checks `oauth`; returns the token endpoint's host (a revocation may go there).
fn validate_oauth(at: &str, o: &OAuth, c: &Credential) -> Result<String, MandateError> {
    let f = |name: &str| format!("{at}.{name}");
    let endpoint = upstream_url(&f("token_endpoint"), &o.token_endpoint)?;
    if o.client_id.is_empty()
        || o.client_id.len() > 256
        || !o
            .client_id
            .chars()
            .all(|ch| ch.is_ascii_graphic() || ch == ' ')
    {
        return Err(MandateError::new(
            f("client_id"),
            "must be 1 to 256 printable ASCII characters",
        ));
    }
    if let Some(cs) = &o.client_secret {
        check_secret(&f("client_secret"), cs.expose_secret(), false)?;
    }
    check_secret(&f("refresh_token"), o.refresh_token.expose_secret(), false)?;
    crate::broker::oauth::parse_scope(&o.scope).map_err(|e| MandateError::new(f("scope"), e))?;
    if o.max_token_age_secs == Some(0) {
        return Err(MandateError::new(
            f("max_token_age_secs"),
            format!("must be at least 1 second (default {DEFAULT_MAX_TOKEN_AGE_SECS}, AG-120 4.9)"),
        ));
    }
    let header = o.header_name();
    if !header_name_ok(header) {
        return Err(MandateError::new(
            f("header"),
            format!("`{header}` is not a header name"),
        ));
    }
    if RESERVED_HEADERS.contains(&header.to_ascii_lowercase().as_str()) {
        return Err(MandateError::new(
            f("header"),
            "chaperone does not inject this header (the browser or the proxy owns it)",
        ));
    }
    if c.headers.keys().any(|h| h.eq_ignore_ascii_case(header)) {
        return Err(MandateError::new(
            f("header"),
            format!(
                "`{header}` is also in `headers`; the refreshed access token is what rides in \
                 it, so remove it from `headers` (or name another header here)"
            ),
        ));
    }
    Ok(endpoint.host_str().unwrap_or_default().to_string())
}

fn validate_revoke(
    at: &str,
    r: &Revoke,
    c: &Credential,
    token_host: Option<&str>,
) -> Result<(), MandateError> {
    let f = |name: &str| format!("{at}.{name}");
    let url = upstream_url(&f("url"), &r.url)?;
    let host = url.host_str().unwrap_or_default();
    let on_site = crate::vault::jar::site_of(host.trim_matches(['[', ']']))
        == crate::vault::jar::site_of(&c.site);
    if !on_site && token_host != Some(host) {
        return Err(MandateError::new(
            f("url"),
            format!(
                "`{host}` is neither on the credential's site `{}` nor the token endpoint's \
                 host; a revocation carries the held credential, so it may go only there",
                c.site
            ),
        ));
    }
    let method = r.method();
    if !["POST", "PUT", "PATCH", "DELETE", "GET"].contains(&method.as_str()) {
        return Err(MandateError::new(
            f("method"),
            format!("`{method}` is not one of POST, PUT, PATCH, DELETE, GET"),
        ));
    }
    if method == "GET" && !r.form.is_empty() {
        return Err(MandateError::new(
            f("form"),
            "a GET request has no body, and held values do not go into URLs: use POST",
        ));
    }
    for (k, v) in &r.form {
        let field = f(&format!("form.{k}"));
        if k.is_empty() || k.chars().chain(v.chars()).any(char::is_control) {
            return Err(MandateError::new(
                field,
                "keys must be non-empty, and neither keys nor values may hold control characters",
            ));
        }
        let used =
            crate::broker::oauth::placeholders(v).map_err(|e| MandateError::new(&field, e))?;
        for p in used {
            let missing = match (p, &c.oauth) {
                (_, None) => Some("an `oauth` grant"),
                ("client_secret", Some(o)) if o.client_secret.is_none() => {
                    Some("`oauth.client_secret`")
                }
                _ => None,
            };
            if let Some(what) = missing {
                return Err(MandateError::new(
                    field,
                    format!("`{{{p}}}` needs {what} in this credential"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn check(json: &str) -> Result<ValidMandate, MandateError> {
        Mandate::from_json(json)?.validate(now(), DEFAULT_MAX_TTL_SECS)
    }

    #[test]
    fn minimal_mandate_expires_after_ttl() {
        let m = check(r#"{"agent":"a","ttl_secs":60}"#).unwrap();
        assert_eq!(m.expires_at, now() + time::Duration::seconds(60));
        assert!(m.egress.allow.is_empty());
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = check(r#"{"agent":"a","ttl_secs":60,"egress":{"alow":[]}}"#).unwrap_err();
        assert_eq!(e.field, "egress.alow");
        assert!(e.message.contains("unknown field"), "{e}");
        let e = check(r#"{"agent":"a","ttl_secs":60,"extra":1}"#).unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
    }

    #[test]
    fn lifetime_rules() {
        for (json, field) in [
            (r#"{"agent":"a","ttl_secs":0}"#, "ttl_secs"),
            (r#"{"agent":"a","ttl_secs":-5}"#, "ttl_secs"),
            (r#"{"agent":"a"}"#, "ttl_secs"),
            (r#"{"agent":"a","ttl_secs":999999}"#, "ttl_secs"),
            (
                r#"{"agent":"a","ttl_secs":5,"not_after":"2027-01-15T08:00:00Z"}"#,
                "ttl_secs",
            ),
            (
                r#"{"agent":"a","not_after":"2020-01-01T00:00:00Z"}"#,
                "not_after",
            ),
            (r#"{"agent":"a","ttl_secs":"10"}"#, "ttl_secs"),
            (r#"{"agent":"","ttl_secs":10}"#, "agent"),
        ] {
            let e = check(json).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
        let m = check(r#"{"agent":"a","not_after":"2027-01-15T08:30:00Z"}"#).unwrap();
        assert_eq!(m.expires_at, now() + time::Duration::seconds(1_800));
    }

    #[test]
    fn resumption_fields_default_and_are_bounded() {
        let m = check(r#"{"agent":"a","ttl_secs":60}"#).unwrap();
        assert_eq!(m.resume.max_connections, 1);
        assert_eq!(m.resume.window.as_secs(), DEFAULT_RESUME_WINDOW_SECS);
        assert_eq!(
            m.resume.ticket_ttl.as_secs(),
            DEFAULT_RESUME_TICKET_TTL_SECS
        );
        assert!(m.resume.requires_ticket);
        assert!(m.resume.quiet.is_zero());
        for (json, field) in [
            (r#""max_agent_connections":0"#, "max_agent_connections"),
            (r#""max_agent_connections":65"#, "max_agent_connections"),
            (r#""resume_window_secs":0"#, "resume_window_secs"),
            (r#""resume_window_secs":28801"#, "resume_window_secs"),
            (r#""resume_ticket_ttl_secs":4"#, "resume_ticket_ttl_secs"),
            (r#""resume_quiet_secs":3601"#, "resume_quiet_secs"),
            (r#""identity":{}"#, "identity"),
            (
                r#""identity":{"agent_key":"chak_secretvalue"}"#,
                "identity.agent_key",
            ),
            (
                r#""identity":{"client_cert_sha256":["abc"]}"#,
                "identity.client_cert_sha256[0]",
            ),
            (
                r#""identity":{"agent_key":"ak_0123abcd","x":1}"#,
                "identity.x",
            ),
        ] {
            let e = check(&format!(r#"{{"agent":"a","ttl_secs":60,{json}}}"#)).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
        let pin = "AB:".repeat(31) + "AB";
        let m = check(&format!(
            r#"{{"agent":"a","ttl_secs":60,"max_agent_connections":3,"resume_window_secs":28800,
                "identity":{{"agent_key":"ak_0123abcd","client_cert_sha256":["{pin}"]}}}}"#
        ))
        .unwrap();
        assert_eq!(m.resume.max_connections, 3);
        let id = m.source.identity.unwrap();
        assert_eq!(id.client_cert_sha256, ["ab".repeat(32)]);
    }

    #[test]
    fn a_session_may_resume_only_before_its_end_and_inside_its_window() {
        let m = check(r#"{"agent":"a","ttl_secs":60}"#).unwrap();
        assert!(m.may_resume(now()).is_ok());
        let e = m
            .may_resume(now() + time::Duration::seconds(60))
            .unwrap_err();
        assert_eq!(e.field, "not_after");
    }

    #[test]
    fn egress_fields_are_checked_and_named() {
        let e =
            check(r#"{"agent":"a","ttl_secs":5,"egress":{"allow":["ok.test","*."]}}"#).unwrap_err();
        assert_eq!(e.field, "egress.allow[1]");
        let e =
            check(r#"{"agent":"a","ttl_secs":5,"egress":{"private_networks":["10.0.0.0/33"]}}"#)
                .unwrap_err();
        assert_eq!(e.field, "egress.private_networks[0]");
        let e = check(r#"{"agent":"a","ttl_secs":5,"egress":{"hosts":{"site.test":"nope"}}}"#)
            .unwrap_err();
        assert_eq!(e.field, "egress.hosts.site.test");
        let m = check(
            r#"{"agent":"a","ttl_secs":5,"egress":{"allow":["*.test"],"private_networks":["127.0.0.1/8"],"hosts":{"Site.Test":"127.0.0.1"}}}"#,
        )
        .unwrap();
        assert_eq!(m.egress.private_networks[0].to_string(), "127.0.0.0/8");
        assert_eq!(
            m.egress.hosts.get("site.test"),
            Some(&"127.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn egress_deny_and_ports_are_checked_and_named() {
        let m = check(
            r#"{"agent":"a","ttl_secs":5,"egress":{"allow":["*"],"deny":["Bücher.example.","*.internal.example"],
                "ports":[8443,"9000-9100"],"hosts":{"bücher.test":"127.0.0.1"}}}"#,
        )
        .unwrap();
        let shown: Vec<String> = m.egress.deny.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown, ["xn--bcher-kva.example", "*.internal.example"]);
        let ports: Vec<String> = m.egress.ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(ports, ["8443", "9000-9100"]);
        assert!(
            m.egress.hosts.contains_key("xn--bcher-kva.test"),
            "hosts keys are normalised like requests: {:?}",
            m.egress.hosts
        );
        assert_eq!(
            serde_json::to_value(&m.source.egress).unwrap()["ports"],
            serde_json::json!([8443, "9000-9100"]),
            "the mandate serializes back as written"
        );
        let toml = Mandate::from_toml(
            "agent = \"ci\"\nttl_secs = 30\n[egress]\nallow = [\"*.test\"]\nports = [8080, \"1024-65535\"]\n",
        )
        .unwrap()
        .validate(now(), DEFAULT_MAX_TTL_SECS)
        .unwrap();
        assert_eq!(toml.egress.ports.len(), 2);

        for (json, field, message) in [
            (
                r#"{"deny":["ok.test","*."]}"#,
                "egress.deny[1]",
                "`*.` needs a domain after it",
            ),
            (
                r#"{"ports":[0]}"#,
                "egress.ports[0]",
                "`0` is not a port; ports are 1 to 65535",
            ),
            (
                r#"{"ports":[443,70000]}"#,
                "egress.ports[1]",
                "`70000` is not a port",
            ),
            (
                r#"{"ports":["9000-80"]}"#,
                "egress.ports[0]",
                "the range ends before it starts",
            ),
            (
                r#"{"ports":["https"]}"#,
                "egress.ports[0]",
                "is not a port or a range",
            ),
            (
                r#"{"ports":[true]}"#,
                "egress.ports[0]",
                "a port number such as 8443",
            ),
            (
                r#"{"allow":["p\u0430ypal.example"]}"#,
                "egress.allow[0]",
                "mixes scripts",
            ),
            (
                r#"{"hosts":{"2130706433":"127.0.0.1"}}"#,
                "egress.hosts.2130706433",
                "plain host name",
            ),
        ] {
            let e = check(&format!(r#"{{"agent":"a","ttl_secs":5,"egress":{json}}}"#)).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(e.message.contains(message), "{json}: {e}");
        }
    }

    #[test]
    fn credentials_are_checked_without_echoing_secrets() {
        let good = r#"{"agent":"a","ttl_secs":5,"on_leak":"block","unlisted_credentials":"block",
            "credentials":[{"id":"c","site":"bank.test","allowed_initiators":["shop.test"],
            "cookies":[{"name":"sid","value":"SECRET-COOKIE-123"}],"headers":{"Authorization":"Bearer SECRET-TOKEN-456"}}]}"#;
        let m = check(good).unwrap();
        assert_eq!(m.source.on_leak, OnLeak::Block);
        assert_eq!(m.source.unlisted_credentials, UnlistedCredentials::Block);
        let shown = format!("{m:?} {}", serde_json::to_string(&m.source).unwrap());
        assert!(!shown.contains("SECRET-COOKIE-123"), "{shown}");
        assert!(!shown.contains("SECRET-TOKEN-456"), "{shown}");
        let defaults = check(r#"{"agent":"a","ttl_secs":5}"#).unwrap();
        assert_eq!(defaults.source.on_leak, OnLeak::Revoke);
        assert_eq!(
            defaults.source.unlisted_credentials,
            UnlistedCredentials::Strip
        );

        let cred = |c: &str| format!(r#"{{"agent":"a","ttl_secs":5,"credentials":[{c}]}}"#);
        for (c, field) in [
            (
                r#"{"id":"c","site":"www.bank.test","headers":{"X-K":"SECRET-TOKEN-456"}}"#,
                "credentials[0].site",
            ),
            (
                r#"{"id":"c","site":"test","headers":{"X-K":"SECRET-TOKEN-456"}}"#,
                "credentials[0].site",
            ),
            (r#"{"id":"c","site":"bank.test"}"#, "credentials[0].cookies"),
            (
                r#"{"id":"","site":"bank.test","headers":{"X-K":"SECRET-TOKEN-456"}}"#,
                "credentials[0].id",
            ),
            (
                r#"{"id":"c","site":"bank.test","headers":{"X-K":"short"}}"#,
                "credentials[0].headers.X-K",
            ),
            (
                r#"{"id":"c","site":"bank.test","headers":{"Cookie":"SECRET-TOKEN-456"}}"#,
                "credentials[0].headers.Cookie",
            ),
            (
                r#"{"id":"c","site":"bank.test","headers":{"X-K":"SECRET\u0007TOKEN-456"}}"#,
                "credentials[0].headers.X-K",
            ),
            (
                r#"{"id":"c","site":"bank.test","cookies":[{"name":"s id","value":"SECRET-COOKIE-123"}]}"#,
                "credentials[0].cookies[0].name",
            ),
            (
                r#"{"id":"c","site":"bank.test","cookies":[{"name":"sid","value":"SECRET COOKIE-123"}]}"#,
                "credentials[0].cookies[0].value",
            ),
            (
                r#"{"id":"c","site":"bank.test","cookies":[{"name":"sid","value":"SECRET-COOKIE-123","path":"x"}]}"#,
                "credentials[0].cookies[0].path",
            ),
            (
                r#"{"id":"c","site":"bank.test","allowed_initiators":["*.shop.test"],"headers":{"X-K":"SECRET-TOKEN-456"}}"#,
                "credentials[0].allowed_initiators[0]",
            ),
            (
                r#"{"id":"c","site":"bank.test","headers":{"X-K":"SECRET-TOKEN-456"}},{"id":"c","site":"mail.test","headers":{"X-K":"SECRET-TOKEN-789"}}"#,
                "credentials[1].id",
            ),
            (
                r#"{"id":"c","site":"bank.test","headers":{"X-K":"SECRET-TOKEN-456"}},{"id":"d","site":"bank.test","headers":{"X-K":"SECRET-TOKEN-789"}}"#,
                "credentials[1].site",
            ),
        ] {
            let e = check(&cred(c)).unwrap_err();
            assert_eq!(e.field, field, "{c}: {e}");
            for secret in [
                "SECRET-TOKEN-456",
                "SECRET-COOKIE-123",
                "SECRET\"TOKEN-456",
                "SECRET COOKIE-123",
            ] {
                assert!(!e.to_string().contains(secret), "{e}");
            }
        }
        let e = check(r#"{"agent":"a","ttl_secs":5,"on_leak":"ignore"}"#).unwrap_err();
        assert_eq!(e.field, "on_leak");
    }

    /// A credential with an `oauth` grant and a `revoke` call, changed by `tweak`.
    fn oauth_mandate(tweak: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut c = serde_json::json!({
            "id": "api", "site": "bank.test",
            "oauth": {
                "token_endpoint": "https://auth.bank.test/oauth/token",
                "client_id": "agent-client",
                "client_secret": "SECRET-CLIENT-1234",
                "scope": "read write",
                "refresh_token": "SECRET-REFRESH-5678",
            },
            "revoke": {
                "url": "https://auth.bank.test/oauth/revoke",
                "form": {"token": "{refresh_token}", "token_type_hint": "refresh_token"},
            },
        });
        tweak(&mut c);
        serde_json::json!({"agent": "a", "ttl_secs": 5, "credentials": [c]}).to_string()
    }

    #[test]
    fn oauth_and_revoke_validate_and_hide_their_secrets() {
        let m = check(&oauth_mandate(|_| {})).unwrap();
        let c = &m.source.credentials[0];
        let o = c.oauth.as_ref().unwrap();
        assert_eq!(o.max_token_age(), std::time::Duration::from_secs(900));
        assert_eq!(o.header_name(), "Authorization");
        assert_eq!(c.revoke.as_ref().unwrap().method(), "POST");
        let shown = format!("{m:?} {}", serde_json::to_string(&m.source).unwrap());
        for secret in ["SECRET-CLIENT-1234", "SECRET-REFRESH-5678"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        // What the registry keeps for display holds no value either.
        let mut kept = m.source.clone();
        let taken = kept.take_credentials();
        let o = kept.credentials[0].oauth.as_ref().unwrap();
        assert!(o.refresh_token.expose_secret().is_empty());
        assert!(o.client_secret.as_ref().unwrap().expose_secret().is_empty());
        let o = taken[0].oauth.as_ref().unwrap();
        assert_eq!(o.refresh_token.expose_secret(), "SECRET-REFRESH-5678");
        // Loopback may be plain http; the revocation may go to the token endpoint's host.
        check(&oauth_mandate(|c| {
            c["site"] = "api.test".into();
            c["oauth"]["token_endpoint"] = "http://127.0.0.1:8080/token".into();
            c["oauth"]["max_token_age_secs"] = 60.into();
            c["oauth"]["header"] = "X-Access-Token".into();
            c["revoke"]["url"] = "http://127.0.0.1:9/revoke".into();
            c["revoke"]["method"] = "delete".into();
        }))
        .unwrap();
        check(&oauth_mandate(|c| {
            c["oauth"]["token_endpoint"] = "http://localhost:8080/token".into();
            c["revoke"] = serde_json::json!({"url": "https://www.bank.test/logout"});
        }))
        .unwrap();
        // A revocation on its own, with the credential's cookies.
        check(&oauth_mandate(|c| {
            c.as_object_mut().unwrap().remove("oauth");
            c["cookies"] = serde_json::json!([{"name": "sid", "value": "SECRET-COOKIE-123"}]);
            c["revoke"] = serde_json::json!({"url": "https://bank.test/logout", "method": "GET"});
        }))
        .unwrap();
    }

    #[test]
    fn oauth_and_revoke_errors_name_the_field() {
        type Tweak = fn(&mut serde_json::Value);
        let cases: &[(Tweak, &str)] = &[
            (
                |c| c["oauth"]["token_endpoint"] = "http://auth.bank.test/token".into(),
                "credentials[0].oauth.token_endpoint",
            ),
            (
                |c| c["oauth"]["token_endpoint"] = "ftp://auth.bank.test/token".into(),
                "credentials[0].oauth.token_endpoint",
            ),
            (
                |c| c["oauth"]["token_endpoint"] = "not a url".into(),
                "credentials[0].oauth.token_endpoint",
            ),
            (
                |c| c["oauth"]["token_endpoint"] = "https://u:p@auth.bank.test/token".into(),
                "credentials[0].oauth.token_endpoint",
            ),
            (
                |c| c["oauth"]["token_endpoint"] = "http://localhost.evil.test/token".into(),
                "credentials[0].oauth.token_endpoint",
            ),
            (
                |c| c["oauth"]["client_id"] = "".into(),
                "credentials[0].oauth.client_id",
            ),
            (
                |c| c["oauth"]["client_secret"] = "short".into(),
                "credentials[0].oauth.client_secret",
            ),
            (
                |c| c["oauth"]["refresh_token"] = "SECRET REFRESH-5678".into(),
                "credentials[0].oauth.refresh_token",
            ),
            (
                |c| c["oauth"]["scope"] = " ".into(),
                "credentials[0].oauth.scope",
            ),
            (
                |c| c["oauth"]["scope"] = "read \"admin\"".into(),
                "credentials[0].oauth.scope",
            ),
            (
                |c| c["oauth"]["max_token_age_secs"] = 0.into(),
                "credentials[0].oauth.max_token_age_secs",
            ),
            (
                |c| c["oauth"]["header"] = "Cookie".into(),
                "credentials[0].oauth.header",
            ),
            (
                |c| c["oauth"]["header"] = "X K".into(),
                "credentials[0].oauth.header",
            ),
            (
                |c| c["headers"] = serde_json::json!({"authorization": "Bearer SECRET-STATIC-1"}),
                "credentials[0].oauth.header",
            ),
            (
                |c| c["oauth"]["extra"] = 1.into(),
                "credentials[0].oauth.extra",
            ),
            (
                |c| c["revoke"]["url"] = "https://evil.test/revoke".into(),
                "credentials[0].revoke.url",
            ),
            (
                |c| c["revoke"]["url"] = "http://auth.bank.test/revoke".into(),
                "credentials[0].revoke.url",
            ),
            (
                |c| c["revoke"]["method"] = "TRACE".into(),
                "credentials[0].revoke.method",
            ),
            (
                |c| c["revoke"]["method"] = "GET".into(),
                "credentials[0].revoke.form",
            ),
            (
                |c| c["revoke"]["form"]["token"] = "{refresh}".into(),
                "credentials[0].revoke.form.token",
            ),
            (
                |c| {
                    c["oauth"].as_object_mut().unwrap().remove("client_secret");
                    c["revoke"]["form"]["secret"] = "{client_secret}".into();
                },
                "credentials[0].revoke.form.secret",
            ),
            (
                |c| {
                    c.as_object_mut().unwrap().remove("oauth");
                    c["headers"] = serde_json::json!({"X-K": "SECRET-STATIC-1"});
                },
                "credentials[0].revoke.form.token",
            ),
            (
                |c| {
                    c.as_object_mut().unwrap().remove("oauth");
                    c["revoke"] = serde_json::json!({"url": "https://bank.test/logout"});
                },
                "credentials[0].cookies",
            ),
        ];
        for (tweak, field) in cases {
            let json = oauth_mandate(tweak);
            let e = check(&json).unwrap_err();
            assert_eq!(&e.field, field, "{json}: {e}");
            for secret in [
                "SECRET-CLIENT-1234",
                "SECRET-REFRESH-5678",
                "SECRET REFRESH",
            ] {
                assert!(!e.to_string().contains(secret), "{e}");
            }
        }
    }

    #[test]
    fn toml_and_json_are_the_same_type() {
        let m =
            Mandate::from_toml("agent = \"ci\"\nttl_secs = 30\n[egress]\nallow = [\"*.test\"]\n")
                .unwrap();
        assert_eq!(m.agent, "ci");
        let e = Mandate::from_toml("agent = \"ci\"\nttl_secs = 30\nbogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        assert_eq!(e.field, "line 3");
    }

    #[test]
    fn shipped_profiles_are_valid() {
        for (name, text) in [
            ("default", include_str!("../profiles/default.toml")),
            ("ci", include_str!("../profiles/ci.toml")),
            ("research", include_str!("../profiles/research.toml")),
        ] {
            Mandate::from_toml(text)
                .and_then(|m| m.validate(now(), DEFAULT_MAX_TTL_SECS))
                .unwrap_or_else(|e| panic!("profiles/{name}.toml: {e}"));
        }
    }

    proptest::proptest! {
        /// Untrusted input: arbitrary text never panics, and a refusal always names a field.
        #[test]
        fn arbitrary_text_is_refused_cleanly(text in ".{0,200}") {
            if let Err(e) = Mandate::from_json(&text) {
                proptest::prop_assert!(!e.field.is_empty());
            }
            let _ = Mandate::from_toml(&text);
        }

        /// Structurally plausible mandates with arbitrary values validate or name a field.
        #[test]
        fn arbitrary_values_validate_or_name_the_field(
            agent in ".{0,40}",
            ttl in proptest::num::i64::ANY,
            allow in proptest::collection::vec(".{0,30}", 0..4),
            nets in proptest::collection::vec(".{0,20}", 0..3),
        ) {
            let json = serde_json::json!({
                "agent": agent, "ttl_secs": ttl,
                "egress": {"allow": allow, "private_networks": nets},
            });
            match Mandate::from_json(&json.to_string()).and_then(|m| m.validate(now(), DEFAULT_MAX_TTL_SECS)) {
                Ok(m) => {
                    proptest::prop_assert!(m.expires_at > now());
                    proptest::prop_assert!(m.expires_at <= now() + time::Duration::seconds(DEFAULT_MAX_TTL_SECS as i64));
                }
                Err(e) => proptest::prop_assert!(
                    ["agent", "ttl_secs", "egress.allow[", "egress.private_networks["]
                        .iter()
                        .any(|f| e.field.starts_with(f)),
                    "{}", e
                ),
            }
        }
    }
}
