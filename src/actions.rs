//! Action-level authorization: the mandate's `actions` rules, checked on every request the
//! broker sees, after its credential decisions (a session is a poor proxy for intent: one
//! approval must not cover browsing, filling a cart and paying).
//!
//! A rule matches on the method, the host (a pattern of the egress allow list's form) and the
//! path (a glob where `*` is any run of characters and `?` any one), and optionally on fields
//! of the request: form and JSON body fields and query parameters. The first rule that matches
//! decides: `allow`, `deny` or `approve` (held for a human, see [`crate::approvals`]); no
//! match allows. A rule may carry `max_count`, a budget over the session's life counted in
//! requests actually sent.
//!
//! Matching is written for an agent that tries to slip past a rule:
//! - the path is matched percent-decoded, with repeated slashes folded (`//check%6Fut` is
//!   `/checkout`), and the host after the browser's own normalisation (case, trailing dot,
//!   IDN, IP forms);
//! - a field condition holds only when it holds for *every* occurrence of the field: query
//!   and body, repeated form pairs, duplicate JSON keys, each element of an array on the way;
//! - a condition the request cannot be shown to meet (field absent, not a number, a body that
//!   is not form or JSON) does not hold, so the rule does not match and the next one decides.
//!   A rule with conditions therefore wants a catch-all after it, e.g. `approve` orders up to
//!   100 then `deny` every other order.

use std::collections::BTreeMap;
use std::sync::Mutex;

use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use url::Url;
use wildmatch::WildMatch;

use crate::egress::{Host, HostPattern};

/// Longest `approval_timeout_secs`.
pub const MAX_APPROVAL_TIMEOUT_SECS: u64 = 3600;
/// `approval_timeout_secs` when the mandate does not say.
pub const DEFAULT_APPROVAL_TIMEOUT_SECS: u64 = 120;
/// Most rules a mandate may hold.
const MAX_RULES: usize = 256;

/// One rule of a mandate's `actions`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActionRule {
    /// What the rule applies to; an empty match applies to every request.
    #[serde(rename = "match", default)]
    pub matches: ActionMatch,
    /// What happens to a request it matches.
    pub decision: ActionDecision,
    /// At most this many matching requests are sent over the session's life; the next is
    /// denied. Not for `deny` rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_count: Option<u64>,
}

/// See [`ActionRule::matches`]. Every part given must hold.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActionMatch {
    /// `"POST"` or `["POST", "PUT"]`, any case. Default: every method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Methods>,
    /// `[http://|https://]host[/path-glob]`, e.g. `shop.test/checkout*` or
    /// `*.shop.test/api/*/pay`. Default: every URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Conditions on form or JSON body fields and query parameters, by name (`order.total`
    /// for a nested JSON member).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, FieldCondition>,
}

/// One method or several.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Methods {
    /// A single method.
    One(String),
    /// Any of these.
    Many(Vec<String>),
}

/// A condition on one field; every part given must hold for every occurrence.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldCondition {
    /// The value is a number no smaller than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// The value is a number no larger than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The value is exactly this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<Scalar>,
    /// The value is one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Scalar>>,
    /// `true`: the field must be there; `false`: it must not be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// A value a field is compared with.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Scalar {
    /// `true` / `false`.
    Bool(bool),
    /// A number (a numeric string in a form matches it too).
    Number(f64),
    /// Text, compared exactly.
    Text(String),
}

/// What a rule does with a request it matches.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ActionDecision {
    /// Send it.
    Allow,
    /// Fail it (blocked by client), audited.
    Deny,
    /// Hold it until a human approves or denies it, or the approval times out (denied).
    Approve,
}

impl ActionDecision {
    /// `allow`, `deny`, `approve`.
    pub fn name(self) -> &'static str {
        match self {
            ActionDecision::Allow => "allow",
            ActionDecision::Deny => "deny",
            ActionDecision::Approve => "approve",
        }
    }
}

/// A rule that failed validation: which part (relative to the rule) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// E.g. `match.url` or `fields.amount.max`.
    pub field: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

fn rule_error(field: impl Into<String>, message: impl Into<String>) -> RuleError {
    RuleError {
        field: field.into(),
        message: message.into(),
    }
}

/// The checked rules of one mandate.
#[derive(Clone, Debug, Default)]
pub struct ActionPolicy {
    rules: Vec<Compiled>,
    /// Every field name a condition names, folded: the only fields read from a request.
    field_names: std::collections::HashSet<String>,
}

#[derive(Clone, Debug)]
struct Compiled {
    source: ActionRule,
    methods: Option<Vec<String>>,
    scheme: Option<&'static str>,
    host: Option<HostPattern>,
    /// The path glob as written (decoded, slashes folded)...
    path: Option<WildMatch>,
    /// ...and lowercased, for the spellings servers commonly treat alike.
    loose_path: Option<WildMatch>,
    /// The field conditions by folded name.
    fields: Vec<(String, FieldCondition)>,
}

/// A request as the rules see it.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// The method as sent.
    pub method: &'a str,
    /// The URL.
    pub url: &'a Url,
    /// The request headers (for `Content-Type` and method overrides).
    pub headers: &'a [(String, String)],
    /// The body bytes the broker can see.
    pub body: &'a [u8],
}

/// The rule that decides a request.
#[derive(Clone, Copy, Debug)]
pub struct Matched<'a> {
    /// Its position in `actions`.
    pub index: usize,
    /// The rule.
    pub rule: &'a ActionRule,
    /// Whether it matches every reading of the request; `false` when it was chosen because
    /// some reading matches it and its decision is the strictest of those readings.
    pub certain: bool,
}

impl Matched<'_> {
    /// The rule as audit records and approvals show it.
    pub fn describe(&self) -> Value {
        json!({
            "index": self.index,
            "decision": self.rule.decision.name(),
            "match": self.rule.matches,
            "max_count": self.rule.max_count,
            "certain": self.certain,
        })
    }
}

/// Whether a part of a rule holds for a request: for every reading, for some, or for none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Tri {
    No,
    Maybe,
    Sure,
}

impl Tri {
    fn of(all: bool, any: bool) -> Tri {
        match (all, any) {
            (true, _) => Tri::Sure,
            (false, true) => Tri::Maybe,
            (false, false) => Tri::No,
        }
    }
}

impl ActionDecision {
    /// deny > approve > allow.
    fn strictness(self) -> u8 {
        match self {
            ActionDecision::Allow => 0,
            ActionDecision::Approve => 1,
            ActionDecision::Deny => 2,
        }
    }
}

impl ActionPolicy {
    /// Checks `rules`; the error names the rule (`actions[2].match.url`) and what is wrong.
    pub fn compile(rules: &[ActionRule]) -> Result<ActionPolicy, RuleError> {
        if rules.len() > MAX_RULES {
            return Err(rule_error(
                "actions",
                format!("holds {} rules; at most {MAX_RULES}", rules.len()),
            ));
        }
        let compiled = rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                compile_rule(r)
                    .map_err(|e| rule_error(format!("actions[{i}].{}", e.field), e.message))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let field_names = compiled
            .iter()
            .flat_map(|r| r.fields.iter().map(|(n, _)| n.clone()))
            .collect();
        Ok(ActionPolicy {
            rules: compiled,
            field_names,
        })
    }

    /// Whether there are no rules (every request allowed).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule asks a human.
    pub fn asks_humans(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.source.decision == ActionDecision::Approve)
    }

    /// Whether an `approve` rule could match requests to `host` (any path, method, fields).
    pub fn may_ask_about(&self, host: &str) -> bool {
        let Ok(host) = Host::parse(host) else {
            return false;
        };
        self.rules.iter().any(|r| {
            r.source.decision == ActionDecision::Approve
                && r.host.as_ref().is_none_or(|h| h.matches(&host))
        })
    }

    /// How many rules there are.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// The rule that decides `req`, if any (`None`: allowed, no rule).
    ///
    /// A request can often be read more than one way: a field given twice or under spellings
    /// servers take for the same name, a method override, a path spelling some servers treat
    /// alike, a body chaperone cannot read. Every reading is decided and the strictest
    /// decision wins (deny, then approve, then allow): going down the rules, a rule that
    /// matches some readings is a candidate, one that matches all of them ends the walk, and
    /// without such a rule "no rule" (allow) is a candidate too. The first candidate with the
    /// strictest decision is the one returned.
    pub fn first_match(&self, req: &Subject<'_>) -> Option<Matched<'_>> {
        let prep = Prepared::new(req);
        let mut fields: Option<Fields> = None;
        let mut best: Option<Matched<'_>> = None;
        for (index, rule) in self.rules.iter().enumerate() {
            let mut t = rule.head(&prep);
            if t != Tri::No && !rule.fields.is_empty() {
                let f = fields.get_or_insert_with(|| Fields::of(req, Some(&self.field_names)));
                for (name, cond) in &rule.fields {
                    t = t.min(cond.holds(f.get(name), f.unreadable));
                    if t == Tri::No {
                        break;
                    }
                }
            }
            if t == Tri::No {
                continue;
            }
            let certain = t == Tri::Sure;
            let m = Matched {
                index,
                rule: &rule.source,
                certain,
            };
            if best.is_none_or(|b| m.rule.decision.strictness() > b.rule.decision.strictness()) {
                best = Some(m);
            }
            if certain {
                return best;
            }
        }
        // No rule matched every reading: "no rule" (allow) is one more candidate, and it is
        // never stricter than one already found.
        best
    }
}

fn compile_rule(r: &ActionRule) -> Result<Compiled, RuleError> {
    if let (Some(n), decision) = (r.max_count, r.decision) {
        if decision == ActionDecision::Deny {
            return Err(rule_error(
                "max_count",
                "a `deny` rule sends nothing, so it has no budget; leave max_count out",
            ));
        }
        if n == 0 {
            return Err(rule_error(
                "max_count",
                "must be at least 1; use `decision = \"deny\"` to send none",
            ));
        }
    }
    let methods = match &r.matches.method {
        None => None,
        Some(Methods::One(m)) => Some(vec![check_method(m, "match.method")?]),
        Some(Methods::Many(ms)) if ms.is_empty() => {
            return Err(rule_error(
                "match.method",
                "an empty list matches nothing; leave `method` out to match every method",
            ))
        }
        Some(Methods::Many(ms)) => Some(
            ms.iter()
                .enumerate()
                .map(|(i, m)| check_method(m, &format!("match.method[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
    };
    let (scheme, host, path) = match &r.matches.url {
        None => (None, None, None),
        Some(u) => parse_url_pattern(u).map_err(|m| rule_error("match.url", m))?,
    };
    for (name, cond) in &r.matches.fields {
        let at = |part: &str| format!("match.fields.{name}{part}");
        if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
            return Err(rule_error(
                at(""),
                "a field name is 1 to 256 characters without control characters",
            ));
        }
        if *cond == FieldCondition::default() {
            return Err(rule_error(
                at(""),
                "names no condition; give one or more of min, max, equals, one_of, present",
            ));
        }
        for (part, v) in [(".min", cond.min), (".max", cond.max)] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(rule_error(at(part), "must be a finite number"));
            }
        }
        if let (Some(lo), Some(hi)) = (cond.min, cond.max) {
            if lo > hi {
                return Err(rule_error(
                    at(".min"),
                    format!("{lo} is above max {hi}: no value could match"),
                ));
            }
        }
        if cond.one_of.as_ref().is_some_and(Vec::is_empty) {
            return Err(rule_error(at(".one_of"), "an empty list matches nothing"));
        }
        if cond.present == Some(false)
            && (cond.min.is_some()
                || cond.max.is_some()
                || cond.equals.is_some()
                || cond.one_of.is_some())
        {
            return Err(rule_error(
                at(".present"),
                "`present = false` says the field is absent; it cannot also have a value condition",
            ));
        }
    }
    let mut fields: Vec<(String, FieldCondition)> = Vec::new();
    for (name, cond) in &r.matches.fields {
        let folded = fold_name(name);
        if folded.is_empty() {
            return Err(rule_error(
                format!("match.fields.{name}"),
                "names no field once brackets, `_` and array indices are read as servers read them",
            ));
        }
        if let Some((other, _)) = r
            .matches
            .fields
            .iter()
            .find(|(o, _)| *o != name && fold_name(o) == folded)
        {
            return Err(rule_error(
                format!("match.fields.{name}"),
                format!("is the same field as `{other}` to servers that fold case, brackets or `_`; give one condition"),
            ));
        }
        fields.push((folded, cond.clone()));
    }
    let loose_path = r
        .matches
        .url
        .as_ref()
        .and(path.as_ref())
        .map(|_| WildMatch::new(&loose_paths(&path_pattern(r))[0]));
    Ok(Compiled {
        source: r.clone(),
        methods,
        scheme,
        host,
        path,
        loose_path,
        fields,
    })
}

fn check_method(m: &str, field: &str) -> Result<String, RuleError> {
    // RFC 9110 token characters.
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if m.is_empty() || m.len() > 32 || !m.chars().all(token) {
        return Err(rule_error(
            field,
            format!("`{m}` is not an HTTP method; write e.g. \"POST\""),
        ));
    }
    Ok(m.to_ascii_uppercase())
}

type UrlPattern = (Option<&'static str>, Option<HostPattern>, Option<WildMatch>);

/// The path part of a rule's `url`, normalized as request paths are.
fn path_pattern(r: &ActionRule) -> String {
    let u = r.matches.url.as_deref().unwrap_or("");
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .unwrap_or(u);
    rest.find('/')
        .map_or_else(|| "/*".to_string(), |i| normalize_path(&rest[i..]))
}

fn parse_url_pattern(u: &str) -> Result<UrlPattern, String> {
    let (scheme, rest) = if let Some(r) = u.strip_prefix("https://") {
        (Some("https"), r)
    } else if let Some(r) = u.strip_prefix("http://") {
        (Some("http"), r)
    } else if u.contains("://") {
        return Err(format!(
            "`{u}`: only http:// and https:// are matched; leave the scheme out for both"
        ));
    } else {
        (None, u)
    };
    if rest.contains('?') || rest.contains('#') {
        return Err(format!(
            "`{u}`: a URL pattern has no query or fragment; match query parameters with `fields`"
        ));
    }
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i..])),
        None => (rest, None),
    };
    if host.is_empty() {
        return Err(format!(
            "`{u}`: names no host; write e.g. `shop.test/checkout*` or `*/checkout*`"
        ));
    }
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "`{u}`: ports are not matched; leave `:{}` out",
            host.rsplit(':').next().unwrap_or("")
        ));
    }
    let host = HostPattern::parse(host).map_err(|e| format!("`{u}`: host: {e}"))?;
    let path = path.map(|p| WildMatch::new(&normalize_path(p)));
    Ok((scheme, Some(host), path))
}

/// The path as a server reads it: percent-decoded (lossily), repeated slashes folded.
fn normalize_path(p: &str) -> String {
    let decoded = percent_decode_str(p).decode_utf8_lossy();
    let mut out = String::with_capacity(decoded.len());
    let mut last_slash = false;
    for c in decoded.chars() {
        if c == '/' && last_slash {
            continue;
        }
        last_slash = c == '/';
        out.push(c);
    }
    out
}

/// Spellings of a path that common servers route alike: any case (Express, ASP.NET, IIS),
/// `;parameters` in a segment dropped (Tomcat, Spring), with or without a trailing slash.
fn loose_paths(normalized: &str) -> [String; 2] {
    let lower = normalized.to_lowercase();
    let no_params: String = lower
        .split('/')
        .map(|seg| seg.split(';').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("/");
    let trimmed = match no_params.trim_end_matches('/') {
        "" => "/".to_string(),
        t => t.to_string(),
    };
    let slashed = if trimmed.ends_with('/') {
        trimmed.clone()
    } else {
        format!("{trimmed}/")
    };
    [trimmed, slashed]
}

/// Headers and form fields that frameworks (Rails, Laravel, Symfony, ASP.NET) take as the
/// real method of a `POST`.
const METHOD_OVERRIDE_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

impl Compiled {
    /// Method, scheme, host and path.
    fn head(&self, req: &Prepared<'_>) -> Tri {
        if self.scheme.is_some_and(|s| s != req.subject.url.scheme()) {
            return Tri::No;
        }
        if let Some(h) = &self.host {
            match req.host() {
                Some(host) if h.matches(host) => {}
                _ => return Tri::No,
            }
        }
        let mut t = Tri::Sure;
        if let Some(ms) = &self.methods {
            let effective = req.methods();
            let listed = |m: &String| ms.contains(m);
            t = t.min(Tri::of(
                effective.iter().all(listed),
                effective.iter().any(listed),
            ));
            if t == Tri::No {
                return t;
            }
        }
        if let (Some(p), Some(loose)) = (&self.path, &self.loose_path) {
            let exact = p.matches(req.path());
            let alike = exact || req.loose_paths().iter().any(|l| loose.matches(l));
            t = t.min(Tri::of(exact, alike));
        }
        t
    }
}

/// What the rules read of a request, each worked out once, when first needed.
struct Prepared<'a> {
    subject: &'a Subject<'a>,
    host: std::cell::OnceCell<Option<Host>>,
    methods: std::cell::OnceCell<Vec<String>>,
    path: std::cell::OnceCell<String>,
    loose: std::cell::OnceCell<[String; 2]>,
}

impl<'a> Prepared<'a> {
    fn new(subject: &'a Subject<'a>) -> Self {
        Prepared {
            subject,
            host: Default::default(),
            methods: Default::default(),
            path: Default::default(),
            loose: Default::default(),
        }
    }

    fn host(&self) -> Option<&Host> {
        self.host
            .get_or_init(|| {
                let host = self.subject.url.host_str().unwrap_or("");
                Host::parse(host.trim_start_matches('[').trim_end_matches(']')).ok()
            })
            .as_ref()
    }

    /// The method sent and every override of it.
    fn methods(&self) -> &[String] {
        self.methods.get_or_init(|| {
            let req = self.subject;
            let mut effective: Vec<String> = vec![req.method.to_ascii_uppercase()];
            for (name, value) in req.headers {
                if METHOD_OVERRIDE_HEADERS
                    .iter()
                    .any(|h| name.eq_ignore_ascii_case(h))
                {
                    effective.push(value.trim().to_ascii_uppercase());
                }
            }
            if req.method.eq_ignore_ascii_case("POST") {
                let query = req.url.query_pairs();
                let form = matches!(
                    body_kind(content_type(req.headers), req.body),
                    BodyKind::Form
                )
                .then(|| url::form_urlencoded::parse(req.body));
                for (k, v) in query.chain(form.into_iter().flatten()) {
                    if k == "_method" {
                        effective.push(v.trim().to_ascii_uppercase());
                    }
                }
            }
            effective
        })
    }

    fn path(&self) -> &str {
        self.path
            .get_or_init(|| normalize_path(self.subject.url.path()))
    }

    fn loose_paths(&self) -> &[String; 2] {
        self.loose.get_or_init(|| loose_paths(self.path()))
    }
}

fn content_type(headers: &[(String, String)]) -> Option<&str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.as_str())
}

/// A field name as servers commonly read it: case folded (Go and .NET bind `AMOUNT` to
/// `amount`), brackets read as nesting (`order[total]`, `amount[]`, `items[0][price]`),
/// `_` and spaces taken for `.` (PHP turns `.` into `_`), array indices dropped.
fn fold_name(name: &str) -> String {
    let mut flat = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '[' | '_' | ' ' => flat.push('.'),
            ']' => {}
            // Go's case folding also takes the long s for `s`.
            'ſ' => flat.push('s'),
            c => flat.extend(c.to_lowercase()),
        }
    }
    flat.split('.')
        .filter(|seg| !seg.is_empty() && !seg.bytes().all(|b| b.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join(".")
}

/// One occurrence of a field.
#[derive(Clone, Debug, PartialEq)]
enum FieldValue {
    Text(String),
    Number(f64),
    Bool(bool),
    /// `null`, an object: nothing a condition can hold for.
    Other,
}

impl FieldValue {
    /// The number it is, `Err(())` when servers may read it as a number differently (or
    /// not at all): only plain decimals (`-12`, `3.50`) count as numbers in text, since
    /// `500e-2` is 5 to some servers and 500 to others.
    fn number(&self) -> Result<f64, ()> {
        let n = match self {
            FieldValue::Number(n) => *n,
            FieldValue::Text(t) => {
                let t = t.trim();
                let digits = t.strip_prefix('-').unwrap_or(t);
                let (int, frac) = digits.split_once('.').unwrap_or((digits, "0"));
                let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                if !plain(int) || !plain(frac) {
                    return Err(());
                }
                t.parse::<f64>().map_err(|_| ())?
            }
            _ => return Err(()),
        };
        if n.is_finite() {
            Ok(n)
        } else {
            Err(())
        }
    }

    /// Whether it equals `s`; `None` when that depends on how a server reads it.
    fn equals(&self, s: &Scalar) -> Option<bool> {
        match (s, self) {
            (Scalar::Text(a), FieldValue::Text(b)) => Some(a == b),
            (Scalar::Number(a), v) => v.number().ok().map(|b| b == *a),
            (Scalar::Bool(a), FieldValue::Bool(b)) => Some(a == b),
            (Scalar::Bool(a), FieldValue::Text(t)) => match t.as_str() {
                "true" => Some(*a),
                "false" => Some(!*a),
                _ => None,
            },
            (Scalar::Text(_) | Scalar::Bool(_), FieldValue::Number(_)) => Some(false),
            (Scalar::Text(_), FieldValue::Bool(_)) => Some(false),
            (_, FieldValue::Other) => Some(false),
        }
    }
}

impl FieldCondition {
    /// Over every occurrence of the field; `unreadable` says the body may hold more.
    fn holds(&self, values: &[FieldValue], unreadable: bool) -> Tri {
        let t = if values.is_empty() {
            Tri::of(self.present == Some(false), self.present == Some(false))
        } else if self.present == Some(false) {
            Tri::No
        } else {
            let verdicts: Vec<Option<bool>> = values.iter().map(|v| self.one(v)).collect();
            Tri::of(
                verdicts.iter().all(|v| *v == Some(true)),
                verdicts.iter().any(|v| *v != Some(false)),
            )
        };
        // A body chaperone cannot read may hold occurrences it did not see: whatever those
        // seen say, some reading may go either way.
        if unreadable {
            Tri::Maybe
        } else {
            t
        }
    }

    /// One occurrence: `Some(holds)`, or `None` when it depends on the server.
    fn one(&self, v: &FieldValue) -> Option<bool> {
        let mut all = Some(true);
        let mut and = |x: Option<bool>| {
            all = match (all, x) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            }
        };
        if let Some(lo) = self.min {
            and(v.number().ok().map(|n| n >= lo));
        }
        if let Some(hi) = self.max {
            and(v.number().ok().map(|n| n <= hi));
        }
        if let Some(e) = &self.equals {
            and(v.equals(e));
        }
        if let Some(set) = &self.one_of {
            let each: Vec<Option<bool>> = set.iter().map(|e| v.equals(e)).collect();
            and(if each.contains(&Some(true)) {
                Some(true)
            } else if each.iter().all(|x| *x == Some(false)) {
                Some(false)
            } else {
                None
            });
        }
        all
    }
}

/// Every occurrence of every field of a request: by folded name, and in body order with
/// the names as sent (for people).
#[derive(Debug, Default)]
struct Fields<'w> {
    by_name: BTreeMap<String, Vec<FieldValue>>,
    in_order: Vec<(String, FieldValue)>,
    /// The body is there but is not form or JSON chaperone could read.
    unreadable: bool,
    /// Keep only these (folded) names, and nothing in order; `None`: everything.
    wanted: Option<&'w std::collections::HashSet<String>>,
}

impl<'w> Fields<'w> {
    /// The fields of `req`; only those named in `wanted`, when given (matching), else all of
    /// them, in order too (for people).
    fn of(req: &Subject<'_>, wanted: Option<&'w std::collections::HashSet<String>>) -> Self {
        let mut f = Fields {
            wanted,
            ..Fields::default()
        };
        for (k, v) in req.url.query_pairs() {
            f.push(k.into_owned(), FieldValue::Text(v.into_owned()));
        }
        f.read_body(content_type(req.headers), req.body);
        f
    }

    fn read_body(&mut self, content_type: Option<&str>, body: &[u8]) {
        match body_kind(content_type, body) {
            BodyKind::Json => {
                use serde::de::DeserializeSeed;
                let mut de = serde_json::Deserializer::from_slice(body);
                let read = Collect {
                    path: String::new(),
                    out: self,
                }
                .deserialize(&mut de)
                .and_then(|()| de.end());
                if read.is_err() {
                    self.unreadable = true;
                }
            }
            BodyKind::Form => {
                for (k, v) in url::form_urlencoded::parse(body) {
                    self.push(k.into_owned(), FieldValue::Text(v.into_owned()));
                }
            }
            BodyKind::Other => self.unreadable = true,
            BodyKind::Empty => {}
        }
    }

    fn push(&mut self, name: String, v: FieldValue) {
        let folded = fold_name(&name);
        match &self.wanted {
            Some(w) if !w.contains(&folded) => {}
            Some(_) => self.by_name.entry(folded).or_default().push(v),
            None => {
                self.by_name.entry(folded).or_default().push(v.clone());
                self.in_order.push((name, v));
            }
        }
    }

    /// Whether a field at `path`, or below it, may be wanted.
    fn may_want(&self, path: &str) -> bool {
        let Some(w) = self.wanted else {
            return true;
        };
        let folded = fold_name(path);
        // A name of array indices or brackets alone folds to nothing: what is below it can
        // still be wanted.
        if folded.is_empty() {
            return true;
        }
        w.iter().any(|n| {
            n == &folded
                || (n.starts_with(folded.as_str()) && n.as_bytes().get(folded.len()) == Some(&b'.'))
        })
    }

    fn get(&self, folded: &str) -> &[FieldValue] {
        self.by_name.get(folded).map_or(&[], Vec::as_slice)
    }
}

enum BodyKind {
    Empty,
    Json,
    Form,
    Other,
}

/// How a body is read: by its declared type; without a usable one, JSON if it looks like it,
/// else form pairs (reading more occurrences only ever makes conditions harder to meet).
fn body_kind(content_type: Option<&str>, body: &[u8]) -> BodyKind {
    if body.is_empty() {
        return BodyKind::Empty;
    }
    let ct = content_type.unwrap_or("").to_ascii_lowercase();
    if ct.contains("json") {
        return BodyKind::Json;
    }
    if ct.contains("x-www-form-urlencoded") {
        return BodyKind::Form;
    }
    if ct.starts_with("multipart/") {
        return BodyKind::Other;
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b'{') | Some(b'[')) {
        BodyKind::Json
    } else {
        BodyKind::Form
    }
}

/// Reads a JSON body into [`Fields`] as it is parsed: every member of an object is kept,
/// duplicates included (`serde_json::Value` keeps only the last, while a server may read the
/// first), an array adds no name (`items.price` is every item's price), and a subtree no
/// wanted name lies in is skipped unread.
struct Collect<'f, 'w> {
    path: String,
    out: &'f mut Fields<'w>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Collect<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Collect<'_, '_> {
    fn leaf(self, v: FieldValue) {
        self.out.push(self.path, v);
    }
}

impl<'de> serde::de::Visitor<'de> for Collect<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.leaf(FieldValue::Bool(v));
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.leaf(FieldValue::Number(v as f64));
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.leaf(FieldValue::Number(v as f64));
        Ok(())
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.leaf(FieldValue::Number(v));
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.leaf(FieldValue::Text(v.to_string()));
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.leaf(FieldValue::Other);
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        while a
            .next_element_seed(Collect {
                path: self.path.clone(),
                out: &mut *self.out,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        if !self.path.is_empty() {
            self.out.push(self.path.clone(), FieldValue::Other);
        }
        while let Some(k) = a.next_key::<std::borrow::Cow<'de, str>>()? {
            let path = if self.path.is_empty() {
                k.into_owned()
            } else {
                format!("{}.{k}", self.path)
            };
            if self.out.may_want(&path) {
                a.next_value_seed(Collect {
                    path,
                    out: &mut *self.out,
                })?;
            } else {
                a.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(())
    }
}
/// The `max_count` budgets of one session's rules: requests sent and requests on their way.
#[derive(Debug)]
pub struct Budgets {
    /// Per rule: (sent, reserved).
    counts: Mutex<Vec<(u64, u64)>>,
    limits: Vec<Option<u64>>,
}

/// A place in a rule's budget, held while its request is on its way: [`Reservation::commit`]
/// once the request is sent; dropped uncommitted, the place is given back.
#[derive(Debug)]
pub struct Reservation {
    budgets: std::sync::Arc<Budgets>,
    rule: usize,
    done: bool,
}

impl Budgets {
    /// Empty budgets for `policy`'s rules.
    pub fn new(policy: &ActionPolicy) -> Budgets {
        Budgets {
            counts: Mutex::new(vec![(0, 0); policy.rules.len()]),
            limits: policy.rules.iter().map(|r| r.source.max_count).collect(),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether rule `rule` has room for one more request (sent and reserved counted).
    pub fn has_room(&self, rule: usize) -> bool {
        match self.limits.get(rule).copied().flatten() {
            None => true,
            Some(max) => self.counts().get(rule).is_some_and(|(s, r)| s + r < max),
        }
    }

    /// Reserves one request of rule `rule`'s budget, or `None` when it is spent. A rule
    /// without `max_count` always has room (and its reservation counts nothing against it).
    pub fn reserve(self: &std::sync::Arc<Self>, rule: usize) -> Option<Reservation> {
        let max = self.limits.get(rule).copied().flatten();
        let mut counts = self.counts();
        let slot = counts.get_mut(rule)?;
        if max.is_some_and(|max| slot.0 + slot.1 >= max) {
            return None;
        }
        slot.1 += 1;
        Some(Reservation {
            budgets: self.clone(),
            rule,
            done: false,
        })
    }

    /// Requests sent under rule `rule`.
    pub fn sent(&self, rule: usize) -> u64 {
        self.counts().get(rule).map_or(0, |c| c.0)
    }
}

impl Reservation {
    /// The request was sent: the place is used for good. Returns how many requests the rule
    /// has sent now and its `max_count`.
    pub fn commit(mut self) -> (u64, Option<u64>) {
        self.done = true;
        let mut counts = self.budgets.counts();
        let slot = &mut counts[self.rule];
        slot.1 -= 1;
        slot.0 += 1;
        (slot.0, self.budgets.limits[self.rule])
    }

    /// The rule's position.
    pub fn rule(&self) -> usize {
        self.rule
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            let mut counts = self.budgets.counts();
            counts[self.rule].1 -= 1;
        }
    }
}

/// A body's fields as a human deciding on it sees them: the fields `first` names (the matched
/// rule's) first, then the others in body order, at most `max_fields`, names and values cut to
/// 120 characters, invisible and direction-changing characters shown as `\u{…}`. Returns
/// them and how many fields the body has in all; `None` for a body that is not form or JSON.
pub fn body_fields(
    content_type: Option<&str>,
    body: &[u8],
    first: &[String],
    max_fields: usize,
) -> Option<(Vec<(String, String)>, usize)> {
    let mut f = Fields::default();
    f.read_body(content_type, body);
    if f.unreadable {
        return None;
    }
    let first: Vec<String> = first.iter().map(|n| fold_name(n)).collect();
    let total = f.in_order.len();
    let (mut named, rest): (Vec<_>, Vec<_>) = f
        .in_order
        .into_iter()
        .partition(|(k, _)| first.contains(&fold_name(k)));
    named.extend(rest);
    let shown = named
        .into_iter()
        .take(max_fields)
        .map(|(k, v)| {
            let text = match v {
                FieldValue::Text(t) => t,
                FieldValue::Number(n) => n.to_string(),
                FieldValue::Bool(b) => b.to_string(),
                FieldValue::Other => "(object or null)".to_string(),
            };
            (visible(&k), visible(&text))
        })
        .collect();
    Some((shown, total))
}

/// `s` cut to 120 characters, with control, invisible and bidirectional-formatting characters
/// written as `\u{…}` so that what a person reads is what the request holds.
pub fn visible(s: &str) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c,
                '\u{00ad}' | '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}'
                | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}')
    };
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 120 {
            out.push('…');
            break;
        }
        if hidden(c) {
            out.push_str(&format!("\\u{{{:04x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Doc {
        actions: Vec<ActionRule>,
    }

    fn rules(toml_text: &str) -> ActionPolicy {
        let d: Doc = toml::from_str(toml_text).unwrap();
        ActionPolicy::compile(&d.actions).unwrap()
    }

    fn error(toml_text: &str) -> RuleError {
        let d: Doc = toml::from_str(toml_text).unwrap();
        ActionPolicy::compile(&d.actions).unwrap_err()
    }

    fn hit_with(
        p: &ActionPolicy,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Option<(usize, bool)> {
        let url = Url::parse(url).unwrap();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        p.first_match(&Subject {
            method,
            url: &url,
            headers: &headers,
            body: body.as_bytes(),
        })
        .map(|m| (m.index, m.certain))
    }

    fn hit(
        p: &ActionPolicy,
        method: &str,
        url: &str,
        ct: Option<&str>,
        body: &str,
    ) -> Option<usize> {
        let headers: Vec<(&str, &str)> = ct.map(|c| ("Content-Type", c)).into_iter().collect();
        hit_with(p, method, url, &headers, body).map(|(i, _)| i)
    }

    const SHOP: &str = r#"
        actions = [
          { match = { method = "POST", url = "shop.test/checkout*", fields = { amount = { max = 100 } } }, decision = "approve" },
          { match = { method = "POST", url = "shop.test/checkout*" }, decision = "deny" },
          { match = { url = "*.shop.test/api/*/pay" }, decision = "approve", max_count = 2 },
        ]
    "#;
    const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

    #[test]
    fn the_first_matching_rule_decides_and_no_match_allows() {
        let p = rules(SHOP);
        assert_eq!(
            hit(&p, "POST", "http://shop.test/checkout", FORM, "amount=40"),
            Some(0)
        );
        assert_eq!(
            hit(
                &p,
                "post",
                "http://shop.test:8080/checkout/now",
                FORM,
                "amount=100"
            ),
            Some(0)
        );
        assert_eq!(
            hit(
                &p,
                "POST",
                "http://shop.test/checkout",
                FORM,
                "amount=100.01"
            ),
            Some(1)
        );
        assert_eq!(hit(&p, "GET", "http://shop.test/checkout", None, ""), None);
        assert_eq!(
            hit(&p, "POST", "http://shop.test/cart", FORM, "amount=1"),
            None
        );
        assert_eq!(
            hit(&p, "GET", "https://eu.shop.test/api/v2/pay", None, ""),
            Some(2)
        );
        // `*.shop.test` is below shop.test, as in the egress allow list.
        assert_eq!(
            hit(&p, "GET", "https://shop.test/api/v2/pay", None, ""),
            None
        );
        assert_eq!(
            hit(&p, "POST", "http://other.test/checkout", FORM, "amount=1"),
            None
        );
    }

    #[test]
    fn encoded_paths_and_hosts_do_not_slip_past() {
        let p = rules(SHOP);
        for url in [
            "http://shop.test/check%6Fut",
            "http://shop.test//checkout",
            "http://SHOP.test./checkout",
            "http://shop.test/x/../checkout",
        ] {
            assert_eq!(
                hit_with(
                    &p,
                    "POST",
                    url,
                    &[("content-type", "application/x-www-form-urlencoded")],
                    "amount=500"
                ),
                Some((1, true)),
                "{url}"
            );
        }
        // Spellings some servers route alike: deny and approve rules catch them, as a reading.
        for url in [
            "http://shop.test/CHECKOUT",
            "http://shop.test/checkout;jsessionid=1",
            "https://eu.shop.test/API/v2/pay/",
            "https://eu.shop.test/api/v2/pay;x=1",
        ] {
            let got = hit_with(&p, "POST", url, &[], "amount=500");
            assert!(matches!(got, Some((1 | 2, _))), "{url}: {got:?}");
        }
        // An allow rule never widens to them.
        let allow = rules(
            r#"actions = [
            { match = { url = "shop.test/public*" }, decision = "allow", max_count = 1 },
            { match = {}, decision = "deny" },
        ]"#,
        );
        assert_eq!(
            hit_with(&allow, "GET", "http://shop.test/PUBLIC", &[], ""),
            Some((1, true))
        );
        assert_eq!(
            hit_with(&allow, "GET", "http://shop.test/public/x", &[], ""),
            Some((0, true))
        );
    }

    #[test]
    fn every_reading_is_decided_and_the_strictest_wins() {
        let p = rules(SHOP);
        let json = Some("application/json");
        let u = "http://shop.test/checkout";
        // Repeated pairs, a query parameter besides the body, duplicate JSON keys, arrays,
        // names servers fold together: one reading over the limit means the order is denied.
        for (ct, body) in [
            (FORM, "amount=5&amount=500"),
            (FORM, "amount=5&AMOUNT=500"),
            (FORM, "amount=5&amount[]=500"),
            (json, r#"{"amount": 5, "amount": 500}"#),
            (json, r#"{"amount": 5, "Amount": 500}"#),
            (json, r#"{"amount": [5, 500]}"#),
        ] {
            assert_eq!(hit(&p, "POST", u, ct, body), Some(1), "{body}");
        }
        assert_eq!(
            hit(&p, "POST", &format!("{u}?amount=500"), FORM, "amount=5"),
            Some(1)
        );
        assert_eq!(hit(&p, "POST", u, json, r#"{"amount": [5, 50]}"#), Some(0));
        assert_eq!(hit(&p, "POST", u, json, r#"{"amount": "42"}"#), Some(0));
        // Not shown to hold: absent, not a plain number, a body that cannot be read.
        assert_eq!(hit(&p, "POST", u, FORM, "total=5"), Some(1));
        for odd in [
            "amount=inf",
            "amount=NaN",
            "amount=0x10",
            "amount=500e-2",
            "amount=1e999",
            "amount=",
        ] {
            assert_eq!(hit(&p, "POST", u, FORM, odd), Some(1), "{odd}");
        }
        assert_eq!(
            hit(
                &p,
                "POST",
                u,
                Some("multipart/form-data; boundary=x"),
                "amount=5"
            ),
            Some(1)
        );
        assert_eq!(hit(&p, "POST", u, json, r#"{"amount": 5,}"#), Some(1));
        // Without a type: JSON when it looks like it, else form pairs.
        assert_eq!(
            hit(&p, "POST", u, Some("text/plain"), r#"{"amount": 7}"#),
            Some(0)
        );
        assert_eq!(hit(&p, "POST", u, None, "amount=7"), Some(0));

        // A rule that asks about big orders, with nothing after it: a reading that is a big
        // order is enough to ask, and so is a body that cannot be read.
        let big = rules(
            r#"actions = [
            { match = { method = "POST", fields = { amount = { min = 1000 } } }, decision = "approve" },
        ]"#,
        );
        assert_eq!(
            hit_with(&big, "POST", u, &[], "amount=5&AMOUNT=5000"),
            Some((0, false))
        );
        assert_eq!(
            hit_with(
                &big,
                "POST",
                u,
                &[("Content-Type", "multipart/form-data")],
                "x"
            ),
            Some((0, false))
        );
        assert_eq!(
            hit_with(&big, "POST", u, &[], "amount=5000"),
            Some((0, true))
        );
        assert_eq!(hit_with(&big, "POST", u, &[], "amount=5"), None);
    }

    #[test]
    fn json_subtrees_no_rule_names_are_skipped_but_still_checked() {
        let p = rules(SHOP);
        let json = Some("application/json");
        let u = "http://shop.test/checkout";
        // The wanted field under keys that fold away, and a big unwanted subtree.
        assert_eq!(
            hit(&p, "POST", u, json, r#"{"0": {"amount": 500}}"#),
            Some(1)
        );
        assert_eq!(
            hit(
                &p,
                "POST",
                u,
                json,
                r#"{"items": [{"x": {"y": [1, 2, {"z": 3}]}}], "amount": 7}"#
            ),
            Some(0)
        );
        // A syntax error in a skipped subtree still makes the body unreadable.
        assert_eq!(
            hit(&p, "POST", u, json, r#"{"items": [1, 2,, 3], "amount": 7}"#),
            Some(1)
        );
        assert_eq!(
            hit(&p, "POST", u, json, r#"{"amount": 7} trailing"#),
            Some(1)
        );
    }

    #[test]
    fn method_overrides_are_readings_of_the_method() {
        let p = rules(
            r#"actions = [
            { match = { method = "DELETE", url = "shop.test/account*" }, decision = "deny" },
            { match = { method = "POST", url = "shop.test/account*" }, decision = "allow" },
        ]"#,
        );
        let u = "http://shop.test/account/1";
        assert_eq!(hit_with(&p, "POST", u, &[], "x=1"), Some((1, true)));
        assert_eq!(
            hit_with(&p, "POST", u, &[], "_method=DELETE"),
            Some((0, false))
        );
        assert_eq!(
            hit_with(&p, "POST", &format!("{u}?_method=delete"), &[], ""),
            Some((0, false))
        );
        for h in [
            "X-HTTP-Method-Override",
            "X-HTTP-Method",
            "X-Method-Override",
        ] {
            assert_eq!(
                hit_with(&p, "POST", u, &[(h, "DELETE")], ""),
                Some((0, false)),
                "{h}"
            );
        }
        // The allow rule only holds when every reading is a POST.
        let allow_only = rules(
            r#"actions = [
            { match = { method = "POST" }, decision = "allow", max_count = 5 },
            { match = {}, decision = "deny" },
        ]"#,
        );
        assert_eq!(
            hit_with(&allow_only, "POST", u, &[("X-HTTP-Method", "PUT")], ""),
            Some((1, true))
        );
    }

    #[test]
    fn nested_fields_and_other_conditions() {
        let p = rules(
            r#"actions = [
              { match = { fields = { "order.total" = { min = 1, max = 10 }, currency = { one_of = ["EUR", "USD"] }, gift = { present = false } } }, decision = "allow" },
              { match = { fields = { express = { equals = true } } }, decision = "deny" },
              { match = {}, decision = "approve" },
            ]"#,
        );
        let json = Some("application/json");
        let u = "http://any.test/";
        assert_eq!(
            hit(
                &p,
                "POST",
                u,
                json,
                r#"{"order":{"total":5},"currency":"EUR"}"#
            ),
            Some(0)
        );
        assert_eq!(
            hit(&p, "POST", u, FORM, "order[total]=5&currency=USD"),
            Some(0)
        );
        assert_eq!(
            hit(
                &p,
                "POST",
                u,
                json,
                r#"{"order":{"total":5},"currency":"GBP"}"#
            ),
            Some(2)
        );
        assert_eq!(
            hit(
                &p,
                "POST",
                u,
                json,
                r#"{"order":{"total":5},"currency":"EUR","gift":1}"#
            ),
            Some(2)
        );
        assert_eq!(
            hit(
                &p,
                "POST",
                u,
                json,
                r#"{"order":[{"total":5},{"total":50}],"currency":"USD"}"#
            ),
            Some(2)
        );
        assert_eq!(hit(&p, "POST", u, json, r#"{"express":true}"#), Some(1));
        assert_eq!(hit(&p, "POST", u, None, "express=true"), Some(1));
        assert_eq!(hit(&p, "POST", u, None, "express=false"), Some(2));
        // "yes" is true to some servers: that reading is denied.
        assert_eq!(hit(&p, "POST", u, None, "express=yes"), Some(1));
        // PHP reads `order.total` as `order_total`: one field.
        assert_eq!(
            hit(&p, "POST", u, FORM, "order_total=50&currency=EUR"),
            Some(2)
        );
    }

    #[test]
    fn bad_rules_are_refused_naming_the_part() {
        let cases = [
            (
                r#"actions = [{ match = { url = "ftp://shop.test/" }, decision = "deny" }]"#,
                "actions[0].match.url",
            ),
            (
                r#"actions = [{ match = { url = "shop.test:8080/x" }, decision = "deny" }]"#,
                "actions[0].match.url",
            ),
            (
                r#"actions = [{ match = { url = "shop.test/x?y=1" }, decision = "deny" }]"#,
                "actions[0].match.url",
            ),
            (
                r#"actions = [{ match = { url = "/checkout" }, decision = "deny" }]"#,
                "actions[0].match.url",
            ),
            (
                r#"actions = [{ match = { url = "shop..test/" }, decision = "deny" }]"#,
                "actions[0].match.url",
            ),
            (
                r#"actions = [{ match = { method = "PO ST" }, decision = "deny" }]"#,
                "actions[0].match.method",
            ),
            (
                r#"actions = [{ match = { method = [] }, decision = "deny" }]"#,
                "actions[0].match.method",
            ),
            (
                r#"actions = [{ decision = "deny", max_count = 3 }]"#,
                "actions[0].max_count",
            ),
            (
                r#"actions = [{ decision = "allow", max_count = 0 }]"#,
                "actions[0].max_count",
            ),
            (
                r#"actions = [{ match = { fields = { a = {} } }, decision = "deny" }]"#,
                "actions[0].match.fields.a",
            ),
            (
                r#"actions = [{ match = { fields = { a = { min = 5, max = 1 } } }, decision = "deny" }]"#,
                "actions[0].match.fields.a.min",
            ),
            (
                r#"actions = [{ match = { fields = { a = { present = false, max = 1 } } }, decision = "deny" }]"#,
                "actions[0].match.fields.a.present",
            ),
            (
                r#"actions = [{ match = { fields = { a = { one_of = [] } } }, decision = "deny" }]"#,
                "actions[0].match.fields.a.one_of",
            ),
            (
                r#"actions = [{ match = { fields = { "[]" = { max = 1 } } }, decision = "deny" }]"#,
                "actions[0].match.fields.[]",
            ),
            (
                r#"actions = [{ match = { fields = { amount = { max = 1 }, AMOUNT = { max = 2 } } }, decision = "deny" }]"#,
                "actions[0].match.fields.amount",
            ),
        ];
        for (text, field) in cases {
            let e = error(text);
            assert!(
                e.field == field || (field.ends_with("amount") && e.field.ends_with("AMOUNT")),
                "{text}: {e:?}"
            );
        }
        // Unknown keys are refused by the types themselves.
        assert!(toml::from_str::<Doc>(
            r#"actions = [{ match = { path = "/x" }, decision = "deny" }]"#
        )
        .is_err());
        assert!(toml::from_str::<Doc>(r#"actions = [{ decision = "maybe" }]"#).is_err());
        assert!(toml::from_str::<Doc>(
            r#"actions = [{ match = { fields = { a = { below = 1 } } }, decision = "deny" }]"#
        )
        .is_err());
    }

    #[test]
    fn budgets_count_sent_requests_only() {
        let p = rules(SHOP);
        let b = std::sync::Arc::new(Budgets::new(&p));
        let first = b.reserve(2).unwrap();
        let second = b.reserve(2).unwrap();
        // Two on their way fill a budget of two.
        assert!(b.reserve(2).is_none());
        assert!(!b.has_room(2));
        drop(second); // not sent: its place comes back
        assert!(b.has_room(2));
        assert_eq!(first.commit(), (1, Some(2)));
        assert_eq!(b.reserve(2).unwrap().commit(), (2, Some(2)));
        assert!(b.reserve(2).is_none());
        assert_eq!(b.sent(2), 2);
        // Rules without a budget always have room.
        for _ in 0..5 {
            b.reserve(0).unwrap().commit();
        }
        assert!(b.has_room(0));
    }

    #[test]
    fn what_a_human_sees_of_a_body() {
        let (f, total) = body_fields(
            Some("application/json"),
            br#"{"note": "hi", "amount": 40}"#,
            &[],
            10,
        )
        .unwrap();
        assert_eq!(
            f,
            vec![("note".into(), "hi".into()), ("amount".into(), "40".into())]
        );
        assert_eq!(total, 2);
        // Padding cannot push the rule's own fields out of view.
        let mut padded: String = (0..40).map(|i| format!("a{i:02}=x&")).collect();
        padded.push_str("amount=500");
        let (f, total) = body_fields(None, padded.as_bytes(), &["amount".into()], 32).unwrap();
        assert_eq!(f[0], ("amount".into(), "500".into()));
        assert_eq!((f.len(), total), (32, 41));
        let long = format!("a={}", "x".repeat(500));
        let (f, _) = body_fields(None, long.as_bytes(), &[], 10).unwrap();
        assert_eq!(f[0].1.chars().count(), 121);
        assert!(body_fields(Some("multipart/form-data"), b"--x", &[], 10).is_none());
        assert_eq!(
            visible("pay\u{202e}001\u{200b}"),
            "pay\\u{202e}001\\u{200b}"
        );
    }
}
