//! OAuth 2.0 as the supervisor runs it for a credential (AG-120 4.3, 4.9): scope lists and
//! the scope-invariance check, the scope a browser request asks a token endpoint for, the
//! refresh exchange itself, and the placeholders of an upstream revocation's form.
//!
//! The refresh grant (RFC 6749 section 6) is sent by the supervisor, never the browser: the
//! refresh token and client secret stay in the vault, and only the access token is injected.
//! Everything here is pure except [`exchange`], the one upstream call.

use std::collections::BTreeSet;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;
use zeroize::Zeroizing;

use super::upstream::{Upstream, UpstreamError};

/// The held values a revocation form may name, as `{name}`.
pub const PLACEHOLDERS: &[&str] = &[
    "refresh_token",
    "access_token",
    "client_id",
    "client_secret",
];

/// Largest token endpoint answer read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// How many scope values a refused request's audit record lists.
const MAX_LISTED: usize = 16;

/// Splits a space-separated scope (RFC 6749 section 3.3) into its values, in order, without
/// repeats. Refuses an empty scope and characters a scope value may not hold.
pub fn parse_scope(scope: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for v in scope
        .split([' ', '\t', '\n', '\r'])
        .filter(|v| !v.is_empty())
    {
        if !v.bytes().all(scope_char) {
            return Err(format!(
                "`{}` is not a scope value (printable ASCII without spaces, `\"` or `\\`)",
                v.escape_default()
            ));
        }
        if !out.iter().any(|o| o == v) {
            out.push(v.to_string());
        }
    }
    if out.is_empty() {
        return Err(
            "must name at least one scope value (space-separated); without one, scope \
             invariance cannot be checked"
                .into(),
        );
    }
    Ok(out)
}

/// RFC 6749 section 3.3: `%x21 / %x23-5B / %x5D-7E`.
fn scope_char(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E)
}

/// The values of `asked` that `granted` does not hold, in the order asked.
pub fn beyond(asked: &[String], granted: &[String]) -> Vec<String> {
    let granted: BTreeSet<&str> = granted.iter().map(String::as_str).collect();
    let mut out: Vec<String> = Vec::new();
    for a in asked {
        if !granted.contains(a.as_str()) && !out.contains(a) {
            out.push(a.clone());
        }
    }
    out
}

/// Whether `url` is the token endpoint `endpoint`: same scheme, host, port and path (a
/// trailing `/` aside). Query and fragment do not matter: a token request may carry its
/// parameters in either place.
pub fn same_endpoint(url: &Url, endpoint: &Url) -> bool {
    url.scheme() == endpoint.scheme()
        && url.host_str().map(str::to_ascii_lowercase)
            == endpoint.host_str().map(str::to_ascii_lowercase)
        && url.port_or_known_default() == endpoint.port_or_known_default()
        && url.path().trim_end_matches('/') == endpoint.path().trim_end_matches('/')
}

/// What a request whose `scope` could not be read is taken to ask for (never granted).
pub const UNREADABLE_SCOPE: &str = "[a scope the broker could not read]";

/// Every scope value a request asks for: `scope` in the query, and in the body as a form
/// (`application/x-www-form-urlencoded`), as `multipart/form-data`, or as JSON
/// (`"scope": "a b"` or `["a", "b"]`). Keys match without regard to case, as lenient servers
/// read them. Values that do not parse as scope values are returned too: asking for one is
/// asking for something beyond any grant. Fails closed: a request that mentions `scope` where
/// none of these finds a value asks for [`UNREADABLE_SCOPE`].
pub fn requested_scopes(url: &Url, body: &[u8]) -> Vec<String> {
    let is_scope = |k: &str| k.eq_ignore_ascii_case("scope");
    let mut raw: Vec<String> = url
        .query_pairs()
        .filter(|(k, _)| is_scope(k))
        .map(|(_, v)| v.into_owned())
        .collect();
    let trimmed = body.trim_ascii_start();
    let json = trimmed
        .first()
        .is_some_and(|b| *b == b'{')
        .then(|| serde_json::from_slice::<serde_json::Value>(body).ok())
        .flatten();
    if let Some(serde_json::Value::Object(o)) = &json {
        for (_, v) in o.iter().filter(|(k, _)| is_scope(k)) {
            match v {
                serde_json::Value::String(s) => raw.push(s.clone()),
                serde_json::Value::Array(a) => raw.extend(
                    a.iter()
                        .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string)),
                ),
                serde_json::Value::Null => {}
                other => raw.push(other.to_string()),
            }
        }
    } else if trimmed.starts_with(b"--") {
        raw.extend(multipart_values(trimmed, is_scope));
    } else {
        raw.extend(
            url::form_urlencoded::parse(body)
                .filter(|(k, _)| is_scope(k))
                .map(|(_, v)| v.into_owned()),
        );
    }
    let mut out: Vec<String> = Vec::new();
    for v in raw.iter().flat_map(|s| s.split_ascii_whitespace()) {
        if !out.iter().any(|o| o == v) {
            out.push(v.to_string());
        }
    }
    if out.is_empty() && raw.is_empty() {
        let mentions = |b: &[u8]| b.windows(5).any(|w| w.eq_ignore_ascii_case(b"scope"));
        let decoded: Vec<u8> = percent_encoding::percent_decode(body).collect();
        if mentions(url.query().unwrap_or("").as_bytes()) || mentions(body) || mentions(&decoded) {
            out.push(UNREADABLE_SCOPE.to_string());
        }
    }
    out
}

/// The values of the `multipart/form-data` fields of `body` whose name passes `wanted`. The
/// boundary is the body's first line.
fn multipart_values(body: &[u8], wanted: impl Fn(&str) -> bool) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    let Some(boundary) = text.lines().next().map(str::trim_end) else {
        return Vec::new();
    };
    text.split(boundary)
        .filter_map(|part| {
            let (head, value) = part
                .split_once("\r\n\r\n")
                .or_else(|| part.split_once("\n\n"))?;
            let named = head.lines().any(|l| {
                let l = l.to_ascii_lowercase();
                l.starts_with("content-disposition:")
                    && l.split(';').any(|p| {
                        p.trim()
                            .strip_prefix("name=")
                            .is_some_and(|n| wanted(n.trim_matches('"')))
                    })
            });
            named.then(|| {
                value
                    .strip_suffix("\r\n")
                    .or_else(|| value.strip_suffix('\n'))
                    .unwrap_or(value)
                    .to_string()
            })
        })
        .collect()
}

/// Scope values from a page or a server as an audit record may show them: any that carries a
/// held value (found by `detector`) as `[held value]`, then [`for_the_record`].
pub fn shown(
    detector: Option<&crate::broker::leak::LeakDetector>,
    values: Vec<String>,
) -> Vec<String> {
    for_the_record(
        values
            .into_iter()
            .map(|v| match detector {
                Some(d) if d.find(v.as_bytes()).is_some() => "[held value]".to_string(),
                _ => v,
            })
            .collect(),
    )
}

/// Shortens what a page asked for to what an audit record may show: at most
/// [`MAX_LISTED`] values of at most 64 characters each.
pub fn for_the_record(values: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = values
        .into_iter()
        .take(MAX_LISTED)
        .map(|v| match v.char_indices().nth(64) {
            Some((i, _)) => format!("{}…", &v[..i]),
            None => v,
        })
        .collect();
    out.dedup();
    out
}

/// The placeholders `template` names (see [`PLACEHOLDERS`]); an unknown `{name}` is an error,
/// so a typo cannot send the literal text upstream.
pub fn placeholders(template: &str) -> Result<Vec<&'static str>, String> {
    let mut used = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let name_len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        if name_len > 0 && after[name_len..].starts_with('}') {
            let name = &after[..name_len];
            match PLACEHOLDERS.iter().find(|p| **p == name) {
                Some(p) => used.push(*p),
                None => {
                    return Err(format!(
                        "`{{{name}}}` is not a placeholder; use one of {}",
                        PLACEHOLDERS
                            .iter()
                            .map(|p| format!("{{{p}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
            rest = &after[name_len + 1..];
        } else {
            rest = after;
        }
    }
    Ok(used)
}

/// `template` with its placeholders replaced by `value(name)`; a placeholder without a value
/// becomes empty.
pub fn fill<'a>(template: &str, value: impl Fn(&str) -> Option<&'a str>) -> Zeroizing<String> {
    // Reserved up front: a growing buffer would leave unzeroized copies behind.
    let mut out = Zeroizing::new(String::with_capacity(template.len() + 8192));
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let name = PLACEHOLDERS
            .iter()
            .find(|p| after.starts_with(**p) && after[p.len()..].starts_with('}'));
        match name {
            Some(p) => {
                out.push_str(value(p).unwrap_or(""));
                rest = &after[p.len() + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// What a token endpoint granted.
pub struct Grant {
    /// The new access token.
    pub access_token: SecretString,
    /// Its lifetime in seconds, when the answer said.
    pub expires_in: Option<u64>,
    /// The scope granted, when the answer said (RFC 6749 section 5.1: otherwise the scope
    /// asked for).
    pub scope: Option<Vec<String>>,
    /// A rotated refresh token, when the server issued one.
    pub refresh_token: Option<SecretString>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .field("rotated", &self.refresh_token.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a refresh brought no usable token. The text never holds a value.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The call itself failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The endpoint refused (RFC 6749 section 5.2).
    #[error("the token endpoint answered {status}{}", .error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    Refused {
        /// HTTP status.
        status: u16,
        /// The OAuth `error` code, when it is one.
        error: Option<String>,
    },
    /// The answer is not a bearer token response.
    #[error("the token endpoint's answer is not a usable token response: {0}")]
    Malformed(String),
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: SecretString,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    scope: Option<serde_json::Value>,
    #[serde(default)]
    refresh_token: Option<SecretString>,
}

/// Runs the refresh grant: POSTs `form` (already encoded, values included) to `endpoint`.
pub async fn exchange(
    upstream: &Upstream,
    endpoint: &Url,
    form: &Zeroizing<String>,
) -> Result<Grant, RefreshError> {
    let headers = [(
        "Accept".to_string(),
        Zeroizing::new("application/json".to_string()),
    )];
    let answer = upstream
        .send("POST", endpoint, &headers, Some(form), MAX_TOKEN_RESPONSE)
        .await?;
    if !(200..300).contains(&answer.status) {
        let error = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .filter(|e| {
                e.len() <= 64
                    && e.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            });
        return Err(RefreshError::Refused {
            status: answer.status,
            error,
        });
    }
    // serde_json's messages quote offending values: only the category and place are kept.
    let parsed: TokenResponse = serde_json::from_slice(&answer.body).map_err(|e| {
        RefreshError::Malformed(format!(
            "{:?} error at line {} column {} (JSON with access_token expected)",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    if let Some(t) = &parsed.token_type {
        if !t.eq_ignore_ascii_case("bearer") {
            return Err(RefreshError::Malformed(format!(
                "token_type `{}` is not Bearer; chaperone injects bearer tokens only",
                t.chars().take(32).collect::<String>().escape_default()
            )));
        }
    }
    let expires_in = match parsed.expires_in {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => Some(n.as_u64().ok_or_else(|| {
            RefreshError::Malformed("expires_in is not a whole number of seconds".into())
        })?),
        // Some servers send it as a string.
        Some(serde_json::Value::String(s)) => Some(s.trim().parse().map_err(|_| {
            RefreshError::Malformed("expires_in is not a whole number of seconds".into())
        })?),
        Some(_) => {
            return Err(RefreshError::Malformed(
                "expires_in is not a whole number of seconds".into(),
            ))
        }
    };
    let scope = match parsed.scope {
        None | Some(serde_json::Value::Null) => None,
        // A scope value that does not parse is still a value beyond the mandate's: kept, so
        // the check refuses it.
        Some(serde_json::Value::String(s)) => Some(
            s.split_ascii_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>(),
        ),
        Some(other) => {
            return Err(RefreshError::Malformed(format!(
                "scope is a JSON {} instead of a space-separated string",
                match other {
                    serde_json::Value::Array(_) => "array",
                    serde_json::Value::Object(_) => "object",
                    _ => "scalar",
                }
            )))
        }
    };
    Ok(Grant {
        access_token: parsed.access_token,
        expires_in,
        scope,
        refresh_token: parsed.refresh_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    /// A token endpoint on loopback that answers every request with `status` and `body`.
    async fn endpoint(status: u16, body: &'static str) -> Url {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        Url::parse(&format!("http://127.0.0.1:{port}/token")).unwrap()
    }

    #[tokio::test]
    async fn exchange_reads_grants_and_never_repeats_a_value_in_an_error() {
        let up = Upstream::new(&crate::config::UpstreamConfig::default()).unwrap();
        let form = Zeroizing::new("grant_type=refresh_token".to_string());
        let url = endpoint(
            200,
            r#"{"access_token":"SECRET-ACCESS-1","token_type":"bearer","expires_in":"60","scope":"read","refresh_token":"SECRET-R-2","id_token":"x"}"#,
        )
        .await;
        let g = exchange(&up, &url, &form).await.unwrap();
        assert_eq!(g.access_token.expose_secret(), "SECRET-ACCESS-1");
        assert_eq!(g.expires_in, Some(60));
        assert_eq!(g.scope, Some(v(&["read"])));
        assert!(g.refresh_token.is_some());
        assert!(!format!("{g:?}").contains("SECRET"));
        let url = endpoint(200, r#"{"access_token":"SECRET-ACCESS-1"}"#).await;
        let g = exchange(&up, &url, &form).await.unwrap();
        assert_eq!((g.expires_in, g.scope), (None, None));

        for (status, body, expect) in [
            (
                400,
                r#"{"error":"invalid_grant","error_description":"SECRET-R-2 is bad"}"#,
                "400 (invalid_grant)",
            ),
            (
                401,
                r#"{"error":"SECRET-ACCESS-1 with spaces"}"#,
                "answered 401",
            ),
            (
                200,
                r#"{"access_token":"SECRET-ACCESS-1","token_type":"mac"}"#,
                "not Bearer",
            ),
            (
                200,
                r#"{"access_token":"SECRET-ACCESS-1","expires_in":"SECRET-X"}"#,
                "expires_in",
            ),
            (
                200,
                r#"{"access_token":"SECRET-ACCESS-1","scope":["read"]}"#,
                "array",
            ),
            (
                200,
                r#"{"access_token":7,"refresh":"SECRET-R-2"}"#,
                "usable token response",
            ),
            (200, r#"SECRET-ACCESS-1"#, "usable token response"),
        ] {
            let url = endpoint(status, body).await;
            let e = exchange(&up, &url, &form).await.unwrap_err().to_string();
            assert!(e.contains(expect), "{body}: {e}");
            assert!(!e.contains("SECRET"), "{body}: {e}");
        }
        // Nothing listening: the error says so without the URL.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = Url::parse(&format!("http://127.0.0.1:{closed}/token?t=SECRET-Q")).unwrap();
        let e = exchange(&up, &url, &form).await.unwrap_err().to_string();
        assert!(!e.contains("SECRET") && !e.contains("/token"), "{e}");
    }

    #[test]
    fn scopes_parse_and_refuse_bad_values() {
        assert_eq!(
            parse_scope(" read  write read ").unwrap(),
            v(&["read", "write"])
        );
        assert_eq!(
            parse_scope("https://api.test/x.read openid").unwrap(),
            v(&["https://api.test/x.read", "openid"])
        );
        assert!(parse_scope("").is_err());
        assert!(parse_scope("   ").is_err());
        assert!(parse_scope("read \"admin\"").is_err());
        assert!(parse_scope("read a\\b").is_err());
        assert!(parse_scope("read é").is_err());
    }

    #[test]
    fn beyond_lists_what_the_grant_lacks() {
        let granted = v(&["read", "write"]);
        assert!(beyond(&v(&["read"]), &granted).is_empty());
        assert!(beyond(&v(&["write", "read"]), &granted).is_empty());
        assert_eq!(
            beyond(&v(&["read", "admin", "delete", "admin"]), &granted),
            v(&["admin", "delete"])
        );
        assert_eq!(beyond(&v(&["READ"]), &granted), v(&["READ"]));
    }

    #[test]
    fn endpoints_compare_by_scheme_host_port_and_path() {
        let e = Url::parse("https://idp.test/oauth/token").unwrap();
        for (u, same) in [
            ("https://idp.test/oauth/token", true),
            ("https://IDP.test:443/oauth/token/", true),
            ("https://idp.test/oauth/token?scope=x", true),
            ("http://idp.test/oauth/token", false),
            ("https://idp.test:8443/oauth/token", false),
            ("https://idp.test/oauth/token2", false),
            ("https://other.test/oauth/token", false),
            ("https://idp.test/OAUTH/token", false),
        ] {
            assert_eq!(same_endpoint(&Url::parse(u).unwrap(), &e), same, "{u}");
        }
    }

    #[test]
    fn requested_scope_is_read_from_query_form_and_json() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert_eq!(
            requested_scopes(&u("https://i.test/t?scope=read+admin"), b""),
            v(&["read", "admin"])
        );
        assert_eq!(
            requested_scopes(
                &u("https://i.test/t"),
                b"grant_type=refresh_token&scope=read%20admin&refresh_token=x"
            ),
            v(&["read", "admin"])
        );
        assert_eq!(
            requested_scopes(&u("https://i.test/t?scope=read"), b"scope=write&scope=read"),
            v(&["read", "write"])
        );
        assert_eq!(
            requested_scopes(&u("https://i.test/t"), br#" {"scope": "read admin"}"#),
            v(&["read", "admin"])
        );
        assert_eq!(
            requested_scopes(&u("https://i.test/t"), br#"{"scope": ["read", "admin"]}"#),
            v(&["read", "admin"])
        );
        assert_eq!(
            requested_scopes(&u("https://i.test/t"), br#"{"scope": 7}"#),
            v(&["7"])
        );
        assert!(requested_scopes(&u("https://i.test/t"), b"grant_type=refresh_token").is_empty());
        assert!(requested_scopes(&u("https://i.test/t"), b"\x00\xff").is_empty());
        // Keys in any case, percent-encoded keys.
        assert_eq!(
            requested_scopes(
                &u("https://i.test/t?Scope=admin"),
                b"SCOPE=read&sc%6Fpe=write"
            ),
            v(&["admin", "read", "write"])
        );
        // multipart/form-data, as a page's FormData sends it.
        let multipart = b"------WebKitFormBoundaryx\r\nContent-Disposition: form-data; name=\"grant_type\"\r\n\r\nrefresh_token\r\n------WebKitFormBoundaryx\r\nContent-Disposition: form-data; name=\"scope\"\r\n\r\nread admin\r\n------WebKitFormBoundaryx--\r\n";
        assert_eq!(
            requested_scopes(&u("https://i.test/t"), multipart),
            v(&["read", "admin"])
        );
        // Mentioned but not readable: taken as asking for something never granted.
        for body in [
            &b"{\"scope\": null}"[..],
            b"<scope>admin</scope>",
            b"%73cope: admin",
        ] {
            assert_eq!(
                requested_scopes(&u("https://i.test/t"), body),
                v(&[UNREADABLE_SCOPE]),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn records_are_bounded() {
        let long = "x".repeat(200);
        let r = for_the_record(vec![long; 40]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].chars().count(), 65);
        let many: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
        assert_eq!(for_the_record(many).len(), MAX_LISTED);
    }

    #[test]
    fn placeholders_are_found_and_unknown_ones_refused() {
        assert_eq!(
            placeholders("{refresh_token}").unwrap(),
            vec!["refresh_token"]
        );
        assert_eq!(
            placeholders("a {client_id}:{client_secret} {").unwrap(),
            vec!["client_id", "client_secret"]
        );
        assert!(placeholders("plain text, {} and { spaced }")
            .unwrap()
            .is_empty());
        let e = placeholders("{refresh}").unwrap_err();
        assert!(
            e.contains("{refresh}") && e.contains("{refresh_token}"),
            "{e}"
        );
    }

    #[test]
    fn fill_replaces_placeholders_only() {
        let value = |name: &str| match name {
            "refresh_token" => Some("RT-123"),
            "client_id" => Some("cid"),
            _ => None,
        };
        assert_eq!(*fill("{refresh_token}", value), "RT-123");
        assert_eq!(
            *fill("x{client_id}y{client_id}{ {}{access_token}}", value),
            "xcidycid{ {}}"
        );
        assert_eq!(*fill("refresh_token", value), "refresh_token");
    }
}
