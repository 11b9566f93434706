//! The per-request decision: what credentials ride on a request the browser is about to send.
//!
//! Pure: a [`Request`] as the Fetch Request stage shows it (plus what the broker knows about
//! the frame that sent it) and the session's [`Vault`] in, a [`Decision`] out. The CDP I/O
//! around it lives in the broker's session task.
//!
//! The order matters and is fixed:
//! 1. the leak check over URL (host labels included), headers and body, against every held
//!    value that does not belong to the destination's site;
//! 2. a request to a credential's OAuth token endpoint that asks for scope beyond the grant
//!    (AG-120 4.3): blocked, wherever the endpoint lives;
//! 3. for a credential's site: injection, if the request comes from a first-party context;
//! 4. for any other site: `Cookie`, `Authorization` and `Proxy-Authorization` stripped or
//!    blocked, as the mandate says.

use url::Url;

use crate::broker::leak::{Encoding, LeakDetector};
use crate::mandate::UnlistedCredentials;
use crate::vault::jar::site_of;
use crate::vault::Vault;

/// Request headers that carry authentication material.
pub const AUTH_HEADERS: &[&str] = &["cookie", "authorization", "proxy-authorization"];

/// What the broker knows about the context a request was sent from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// Fetch's `resourceType` is `Document` (a navigation of a frame or of a page).
    pub document: bool,
    /// The request belongs to a page's main frame (its `frameId` is a page target's id).
    pub main_frame: bool,
    /// Chromium's own verdict (`Network.requestWillBeSent` `request.isSameSite`): whether the
    /// request is same-site with the top-level page, the rule SameSite cookies follow. `None`
    /// when the broker could not correlate the request with that event.
    pub same_site: Option<bool>,
    /// A human approved this very request (an `approve` action rule): credentials marked
    /// `on_approval` may ride on it.
    pub approved: bool,
}

/// A request paused at the Fetch Request stage.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// The URL, fragment excluded.
    pub url: &'a Url,
    /// The HTTP method.
    pub method: &'a str,
    /// The headers as Fetch shows them (the browser adds its own cookies later).
    pub headers: &'a [(String, String)],
    /// The body bytes Fetch could show (`postDataEntries`).
    pub body: &'a [u8],
    /// Where it came from.
    pub context: Context,
}

/// Where a held value was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// In the URL (path, query, userinfo).
    Url,
    /// In the host name (a DNS label).
    Host,
    /// In the named header.
    Header(String),
    /// In the body.
    Body,
    /// In the HTTP method (a page may send any token as its method).
    Method,
}

impl Location {
    /// A short name for audit records: `url`, `host`, `header:<name>`, `body`.
    pub fn name(&self) -> String {
        match self {
            Location::Url => "url".into(),
            Location::Host => "host".into(),
            Location::Header(h) => format!("header:{}", h.to_ascii_lowercase()),
            Location::Body => "body".into(),
            Location::Method => "method".into(),
        }
    }
}

/// Credentials that rode on a request, for the audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injected {
    /// Index of the credential in the vault.
    pub credential: usize,
    /// Fingerprints of the values added (cookies and headers), sorted.
    pub tokens: Vec<String>,
}

/// Why a credential did not ride on a request to its site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Withheld {
    /// The request does not come from a first-party context.
    NotFirstParty,
    /// The credential is `on_approval` and no human approved this request.
    AwaitsApproval,
    /// The session resumed recently (`resume_quiet_secs`); set by the broker.
    Quiet,
}

impl Withheld {
    /// The reason an audit record gives.
    pub fn reason(self) -> &'static str {
        match self {
            Withheld::NotFirstParty => "the request does not come from a first-party context",
            Withheld::AwaitsApproval => {
                "the credential rides only on a request a human approved (on_approval)"
            }
            Withheld::Quiet => "the session resumed recently (resume_quiet_secs)",
        }
    }
}

/// The broker's answer for one request. Its `Debug` shows header names only: the header list
/// carries injected values.
#[derive(Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send it; with `headers`, replace the request's headers by these.
    Continue {
        /// The full new header list, or `None` to leave the request untouched.
        headers: Option<Vec<(String, String)>>,
        /// Credentials added.
        injected: Option<Injected>,
        /// Authentication headers removed from a request to a site without a credential.
        stripped: Vec<String>,
        /// A credential's site was requested without it, and why.
        withheld: Option<(usize, Withheld)>,
    },
    /// Fail it: it carries authentication headers to a site without a credential and the
    /// mandate says `unlisted_credentials = "block"`.
    Block {
        /// The headers at fault (names only).
        headers: Vec<String>,
    },
    /// Fail it: it asks a credential's token endpoint for scope beyond what was granted.
    ScopeEscalation {
        /// The id of the credential whose token endpoint it is.
        credential: String,
        /// The scope values asked for beyond the grant (bounded, held values cut out).
        requested_extra: Vec<String>,
    },
    /// Fail it: it carries a held value where it does not belong.
    Exfiltration {
        /// The id of the credential whose value it is.
        credential: String,
        /// Where it was found.
        location: Location,
        /// How it was encoded.
        encoding: Encoding,
    },
}

impl std::fmt::Debug for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Continue {
                headers,
                injected,
                stripped,
                withheld,
            } => f
                .debug_struct("Continue")
                .field(
                    "headers",
                    &headers
                        .as_ref()
                        .map(|h| h.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()),
                )
                .field("injected", injected)
                .field("stripped", stripped)
                .field("withheld", withheld)
                .finish(),
            Decision::Block { headers } => {
                f.debug_struct("Block").field("headers", headers).finish()
            }
            Decision::ScopeEscalation {
                credential,
                requested_extra,
            } => f
                .debug_struct("ScopeEscalation")
                .field("credential", credential)
                .field("requested_extra", requested_extra)
                .finish(),
            Decision::Exfiltration {
                credential,
                location,
                encoding,
            } => f
                .debug_struct("Exfiltration")
                .field("credential", credential)
                .field("location", location)
                .field("encoding", encoding)
                .finish(),
        }
    }
}

/// Decides `req` against `vault` under the mandate's `unlisted` rule.
pub fn decide(req: &Request<'_>, vault: &Vault, unlisted: UnlistedCredentials) -> Decision {
    let host = req.url.host_str().unwrap_or("");
    let site = site_of(host.trim_start_matches('[').trim_end_matches(']'));
    let home = vault.credential_for_site(&site);
    // A just-in-time credential's values belong to its site only on the request a human
    // approved: anywhere else, its own site included, a copy the page made of them is a leak.
    let exempt = home.filter(|&i| !vault.credentials()[i].on_approval || req.context.approved);

    if let Some(detector) = vault.detector_for(exempt) {
        if let Some((location, finding)) = find_leak(detector, req) {
            let credential = vault
                .owner_of_finding(exempt, finding.secret)
                .unwrap_or("?")
                .to_string();
            return Decision::Exfiltration {
                credential,
                location,
                encoding: finding.encoding,
            };
        }
    }

    if let Some(d) = scope_escalation(req, vault) {
        return d;
    }

    let Some(cred_index) = home else {
        let auth: Vec<String> = req
            .headers
            .iter()
            .filter(|(n, _)| is_auth_header(n))
            .map(|(n, _)| n.clone())
            .collect();
        if auth.is_empty() {
            return Decision::Continue {
                headers: None,
                injected: None,
                stripped: Vec::new(),
                withheld: None,
            };
        }
        return match unlisted {
            UnlistedCredentials::Block => Decision::Block { headers: auth },
            UnlistedCredentials::Strip => Decision::Continue {
                headers: Some({
                    let mut kept: Vec<(String, String)> = req
                        .headers
                        .iter()
                        .filter(|(n, _)| !is_auth_header(n))
                        .cloned()
                        .collect();
                    // Without a Cookie header of its own the browser would attach its cookies
                    // again; an empty one replaces them.
                    if auth.iter().any(|h| h.eq_ignore_ascii_case("cookie")) {
                        kept.push(("Cookie".to_string(), String::new()));
                    }
                    kept
                }),
                injected: None,
                stripped: auth,
                withheld: None,
            },
        };
    };

    let cred = &vault.credentials()[cred_index];
    let withheld = if !first_party(req, &cred.site, &cred.initiators) {
        Some(Withheld::NotFirstParty)
    } else if cred.on_approval && !req.context.approved {
        Some(Withheld::AwaitsApproval)
    } else {
        None
    };
    if let Some(why) = withheld {
        return Decision::Continue {
            headers: None,
            injected: None,
            stripped: Vec::new(),
            withheld: Some((cred_index, why)),
        };
    }

    let mut tokens = Vec::new();
    let mut headers: Vec<(String, String)> = Vec::with_capacity(req.headers.len() + 2);
    let held_names: Vec<&str> = cred.headers().map(|(n, _)| n).collect();
    let jar_cookies: Vec<(&str, &crate::vault::Secret)> =
        cred.jar().request_cookies(req.url).collect();
    // The browser's own cookies for a credential site are blocked, so a `Cookie` header seen
    // here was set by the page or the agent: keep its pairs that do not collide with held
    // ones (the header the broker sets replaces the browser's cookies for this request).
    let mut cookie_pairs: Vec<String> = Vec::new();
    for (name, value) in req.headers {
        if name.eq_ignore_ascii_case("cookie") {
            for pair in value.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                let pname = pair.split_once('=').map_or(pair, |(n, _)| n).trim();
                if !jar_cookies.iter().any(|(n, _)| *n == pname) {
                    cookie_pairs.push(pair.to_string());
                }
            }
        } else if !held_names.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            headers.push((name.clone(), value.clone()));
        }
    }
    for (name, secret) in &jar_cookies {
        cookie_pairs.push(format!("{name}={}", secret.expose()));
        tokens.push(secret.fingerprint().to_string());
    }
    if !cookie_pairs.is_empty() {
        headers.push(("Cookie".to_string(), cookie_pairs.join("; ")));
    }
    for (name, secret) in cred.headers() {
        headers.push((name.to_string(), secret.expose().to_string()));
        tokens.push(secret.fingerprint().to_string());
    }
    if tokens.is_empty() {
        // Nothing held applies to this URL (say, a Secure cookie over http).
        return Decision::Continue {
            headers: None,
            injected: None,
            stripped: Vec::new(),
            withheld: None,
        };
    }
    tokens.sort();
    tokens.dedup();
    Decision::Continue {
        headers: Some(headers),
        injected: Some(Injected {
            credential: cred_index,
            tokens,
        }),
        stripped: Vec::new(),
        withheld: None,
    }
}

/// A request to a credential's token endpoint asking for scope its grant does not hold. The
/// values asked for are the page's own text: any that carries a held value is shown as
/// `[held value]`, so the audit record cannot become a way out.
fn scope_escalation(req: &Request<'_>, vault: &Vault) -> Option<Decision> {
    let cred = vault.token_endpoint_credential(req.url)?;
    let c = &vault.credentials()[cred];
    let granted = c.oauth()?.granted();
    let asked = crate::broker::oauth::requested_scopes(req.url, req.body);
    let extra = crate::broker::oauth::beyond(&asked, granted);
    if extra.is_empty() {
        return None;
    }
    Some(Decision::ScopeEscalation {
        credential: c.id.clone(),
        requested_extra: crate::broker::oauth::shown(vault.detector_for(None), extra),
    })
}

/// The value of the first header named `name` (any case).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn is_auth_header(name: &str) -> bool {
    AUTH_HEADERS.iter().any(|h| name.eq_ignore_ascii_case(h))
}

fn find_leak(
    detector: &LeakDetector,
    req: &Request<'_>,
) -> Option<(Location, crate::broker::leak::Finding)> {
    // One pass over everything first (joined by a byte no held value contains); the places are
    // only searched one by one when something turned up.
    let mut all = Vec::with_capacity(
        req.url.as_str().len()
            + req.body.len()
            + req
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 2)
                .sum::<usize>()
            + 8,
    );
    let host = req.url.host_str().unwrap_or("");
    all.extend(host.bytes().filter(|&b| b != b'.'));
    all.push(b'\n');
    all.extend_from_slice(req.method.as_bytes());
    all.push(b'\n');
    all.extend_from_slice(req.url.as_str().as_bytes());
    for (name, value) in req.headers {
        all.push(b'\n');
        all.extend_from_slice(name.as_bytes());
        all.push(b'\n');
        all.extend_from_slice(value.as_bytes());
    }
    all.push(b'\n');
    all.extend_from_slice(req.body);
    // Percent-encoding is undone per place, and only where there is any: undoing it over the
    // joined whole would copy every body for nothing.
    let encoded = |b: &[u8]| b.iter().any(|&c| c == b'%' || c == b'+');
    let found = detector.find_plain(&all).or_else(|| {
        let mut parts = std::iter::once(req.url.as_str().as_bytes())
            .chain(req.headers.iter().map(|(_, v)| v.as_bytes()))
            .chain(std::iter::once(req.body));
        parts.find_map(|p| {
            if encoded(p) {
                detector.find_percent_encoded(p)
            } else {
                None
            }
        })
    })?;
    // The joined pass cannot see more than the places do (the separator is in no held value);
    // should it ever, the request is still stopped.
    locate_leak(detector, req).or(Some((Location::Url, found)))
}

fn locate_leak(
    detector: &LeakDetector,
    req: &Request<'_>,
) -> Option<(Location, crate::broker::leak::Finding)> {
    if let Some(host) = req.url.host_str() {
        // Host labels arrive punycoded or dotted: look at the labels joined too, so a secret
        // split across labels (`SECRET-CO.OKIE-7d1f0c.evil.test`) is still found.
        let joined: String = host.split('.').collect();
        if let Some(f) = detector
            .find(host.as_bytes())
            .or_else(|| detector.find(joined.as_bytes()))
        {
            return Some((Location::Host, f));
        }
    }
    if let Some(f) = detector.find(req.url.as_str().as_bytes()) {
        return Some((Location::Url, f));
    }
    if let Some(f) = detector.find(req.method.as_bytes()) {
        return Some((Location::Method, f));
    }
    for (name, value) in req.headers {
        if let Some(f) = detector
            .find(value.as_bytes())
            .or_else(|| detector.find(name.as_bytes()))
        {
            return Some((Location::Header(name.clone()), f));
        }
    }
    if !req.body.is_empty() {
        if let Some(f) = detector.find(req.body) {
            return Some((Location::Body, f));
        }
    }
    None
}

/// Whether `req` comes from a context that may use a credential for `site`: the top-level page
/// is on that site, or the request's initiator is one of `initiators`.
///
/// Chromium's `isSameSite` is the top-level test (it is what SameSite cookies follow); it is
/// true for every main-frame navigation, so a navigation with an unsafe method also needs an
/// acceptable `Origin` (a cross-site form POST is the classic CSRF). Top-level navigations with
/// safe methods are first-party, as for `SameSite=Lax` cookies: the response goes to a page of
/// the site itself, which the initiator cannot read.
pub fn first_party(req: &Request<'_>, site: &str, initiators: &[String]) -> bool {
    let allowed = |s: &str| s == site || initiators.iter().any(|i| i == s);
    let header = |name: &str| header(req.headers, name);
    let site_of_url = |v: &str| {
        Url::parse(v)
            .ok()
            .and_then(|u| u.host_str().map(|h| site_of(h.trim_matches(['[', ']']))))
    };
    let origin = header("origin");
    let origin_site = match origin {
        // An opaque origin (sandboxed frame, data: document) vouches for nothing.
        Some("null") => return false,
        Some(o) => match site_of_url(o) {
            Some(s) => Some(s),
            None => return false,
        },
        None => None,
    };
    if let Some(o) = &origin_site {
        if !allowed(o) {
            return false;
        }
    }
    let initiator = origin_site.or_else(|| header("referer").and_then(site_of_url));
    let safe = matches!(
        req.method.to_ascii_uppercase().as_str(),
        "GET" | "HEAD" | "OPTIONS"
    );
    match req.context.same_site {
        Some(true) => true,
        // The top-level page is on another site: only a listed initiator's own document may
        // send it (a framed copy of the site itself may not).
        Some(false) => initiator.is_some_and(|i| i != site && initiators.contains(&i)),
        // Not correlated: only what needs no knowledge of the top-level page.
        None => {
            (req.context.document && req.context.main_frame && safe)
                || (req.context.main_frame && initiator.is_some_and(|i| allowed(&i)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mandate::Mandate;
    use crate::vault::FingerprintKey;

    const COOKIE: &str = "SECRET-COOKIE-7d1f0c";
    const TOKEN: &str = "SECRET-TOKEN-93ab2e";

    pub(crate) fn vault() -> Vault {
        let m = Mandate::from_json(&format!(
            r#"{{"agent":"a","ttl_secs":60,"credentials":[
              {{"id":"bank","site":"bank.test","allowed_initiators":["shop.test"],
                "cookies":[{{"name":"sid","value":"{COOKIE}","secure":false}}],
                "headers":{{"Authorization":"Bearer {TOKEN}"}}}},
              {{"id":"mail","site":"mail.test","headers":{{"X-Api-Key":"MAILKEY-0123456789"}}}}]}}"#
        ))
        .unwrap();
        Vault::new(&m.credentials, FingerprintKey::random()).unwrap()
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn same_site() -> Context {
        Context {
            document: false,
            main_frame: true,
            same_site: Some(true),
            approved: false,
        }
    }

    fn req<'a>(u: &'a Url, headers: &'a [(String, String)], ctx: Context) -> Request<'a> {
        Request {
            url: u,
            method: "GET",
            headers,
            body: b"",
            context: ctx,
        }
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn first_party_requests_get_cookies_and_headers() {
        let v = vault();
        let u = url("http://www.bank.test/account");
        let hs = h(&[("Accept", "*/*"), ("Cookie", "theme=dark; sid=forged")]);
        let Decision::Continue {
            headers: Some(out),
            injected: Some(inj),
            ..
        } = decide(&req(&u, &hs, same_site()), &v, UnlistedCredentials::Strip)
        else {
            panic!("not injected");
        };
        assert_eq!(inj.credential, 0);
        assert_eq!(inj.tokens.len(), 2);
        let cookie = &out.iter().find(|(n, _)| n == "Cookie").unwrap().1;
        assert_eq!(cookie, &format!("theme=dark; sid={COOKIE}"));
        assert!(out
            .iter()
            .any(|(n, v)| n == "Authorization" && v == &format!("Bearer {TOKEN}")));
        assert!(out.iter().any(|(n, _)| n == "Accept"));
    }

    /// A vault with one just-in-time credential for shop.test.
    fn jit_vault() -> Vault {
        let m = Mandate::from_json(
            r#"{"agent":"a","ttl_secs":60,"credentials":[
              {"id":"pay","site":"shop.test","on_approval":true,
               "headers":{"X-Pay-Token":"PAYTOKEN-55aa77bb"}}]}"#,
        )
        .unwrap();
        Vault::new(&m.credentials, FingerprintKey::random()).unwrap()
    }

    #[test]
    fn an_on_approval_credential_rides_only_on_an_approved_request() {
        let v = jit_vault();
        let u = url("http://shop.test/checkout");
        let browsing = decide(&req(&u, &[], same_site()), &v, UnlistedCredentials::Strip);
        assert_eq!(
            browsing,
            Decision::Continue {
                headers: None,
                injected: None,
                stripped: Vec::new(),
                withheld: Some((0, Withheld::AwaitsApproval)),
            }
        );
        let mut ctx = same_site();
        ctx.approved = true;
        let Decision::Continue {
            headers: Some(out),
            injected: Some(_),
            ..
        } = decide(&req(&u, &[], ctx.clone()), &v, UnlistedCredentials::Strip)
        else {
            panic!("not injected into the approved request");
        };
        assert!(out
            .iter()
            .any(|(n, v)| n == "X-Pay-Token" && v == "PAYTOKEN-55aa77bb"));
        // Approval does not make a cross-site request first-party.
        ctx.same_site = Some(false);
        let cross = decide(&req(&u, &[], ctx), &v, UnlistedCredentials::Strip);
        assert!(matches!(
            cross,
            Decision::Continue {
                injected: None,
                withheld: Some((0, Withheld::NotFirstParty)),
                ..
            }
        ));
    }

    #[test]
    fn a_held_value_as_the_method_is_exfiltration() {
        let v = vault();
        let u = url("http://attacker.test/m");
        let mut r = req(&u, &[], same_site());
        let method = format!("X{COOKIE}");
        r.method = &method;
        assert!(matches!(
            decide(&r, &v, UnlistedCredentials::Strip),
            Decision::Exfiltration {
                location: Location::Method,
                ..
            }
        ));
    }

    #[test]
    fn a_page_made_copy_of_a_just_in_time_value_is_a_leak_unless_approved() {
        let v = jit_vault();
        let u = url("http://shop.test/checkout");
        // Reflected to the page once, set by the page on a request nobody approved.
        let hs = h(&[("X-Pay-Token", "PAYTOKEN-55aa77bb")]);
        assert!(matches!(
            decide(&req(&u, &hs, same_site()), &v, UnlistedCredentials::Strip),
            Decision::Exfiltration { .. }
        ));
        let mut ctx = same_site();
        ctx.approved = true;
        assert!(matches!(
            decide(&req(&u, &hs, ctx), &v, UnlistedCredentials::Strip),
            Decision::Continue {
                injected: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn a_removed_credential_is_neither_injected_nor_held() {
        let mut v = vault();
        assert_eq!(
            v.remove("bank").map(|r| r.values),
            Some(2),
            "the cookie and the header value dropped"
        );
        assert!(v.remove("bank").is_none(), "removed twice");
        assert!(v.remove("nope").is_none());
        let u = url("http://bank.test/account");
        let hs = h(&[("Cookie", "theme=dark")]);
        // bank.test is now a site without a credential: its cookies are stripped.
        let d = decide(&req(&u, &hs, same_site()), &v, UnlistedCredentials::Strip);
        assert!(
            matches!(&d, Decision::Continue { injected: None, stripped, .. } if stripped == &["Cookie".to_string()]),
            "{d:?}"
        );
        // Its old value is no longer a held value anywhere; the other credential's still is.
        let hs = h(&[("X-Leak", COOKIE)]);
        let to = url("http://attacker.test/");
        assert!(matches!(
            decide(&req(&to, &hs, same_site()), &v, UnlistedCredentials::Strip),
            Decision::Continue { .. }
        ));
        let hs = h(&[("X-Leak", "MAILKEY-0123456789")]);
        assert!(matches!(
            decide(&req(&to, &hs, same_site()), &v, UnlistedCredentials::Strip),
            Decision::Exfiltration { .. }
        ));
        assert!(
            v.capture(0, "sid=new-value-1234567; Path=/", &u).is_err(),
            "a response still in flight filled the removed credential's jar"
        );
        let held = v.held("/x");
        assert!(held.cookies().iter().all(|c| c.site != "bank.test"));
        assert!(!held.is_credential_host("bank.test"));
        assert!(held.is_credential_host("mail.test"));
    }

    #[test]
    fn cross_site_contexts_get_nothing() {
        let v = vault();
        let u = url("http://bank.test/transfer");
        // An image or fetch from the attacker's page: Chromium says not same-site.
        let hs = h(&[("Referer", "http://attacker.test/")]);
        let ctx = Context {
            same_site: Some(false),
            ..Context::default()
        };
        assert!(matches!(
            decide(&req(&u, &hs, ctx.clone()), &v, UnlistedCredentials::Strip),
            Decision::Continue {
                injected: None,
                withheld: Some((0, Withheld::NotFirstParty)),
                ..
            }
        ));
        // The bank framed by the attacker: its own Referer does not make it first-party.
        let hs = h(&[("Referer", "http://bank.test/page")]);
        assert!(matches!(
            decide(&req(&u, &hs, ctx.clone()), &v, UnlistedCredentials::Strip),
            Decision::Continue { injected: None, .. }
        ));
        // A form POST navigating the attacker's tab to the bank: top-level, but Origin is the
        // attacker's.
        let hs = h(&[("Origin", "http://attacker.test")]);
        let mut r = req(
            &u,
            &hs,
            Context {
                document: true,
                main_frame: true,
                same_site: Some(true),
                approved: false,
            },
        );
        r.method = "POST";
        assert!(matches!(
            decide(&r, &v, UnlistedCredentials::Strip),
            Decision::Continue {
                injected: None,
                withheld: Some((0, Withheld::NotFirstParty)),
                ..
            }
        ));
        let hs = h(&[("Origin", "null")]);
        r.headers = &hs;
        assert!(!first_party(&r, "bank.test", &[]));
    }

    #[test]
    fn listed_initiators_and_lax_navigations_are_first_party() {
        let v = vault();
        let u = url("http://bank.test/api/pay");
        let hs = h(&[("Origin", "http://www.shop.test")]);
        let mut r = req(
            &u,
            &hs,
            Context {
                same_site: Some(false),
                ..Context::default()
            },
        );
        r.method = "POST";
        assert!(matches!(
            decide(&r, &v, UnlistedCredentials::Strip),
            Decision::Continue {
                injected: Some(_),
                ..
            }
        ));
        // A GET navigation of a main frame (the agent's Page.navigate, a link) without
        // correlation.
        let r = req(
            &u,
            &[],
            Context {
                document: true,
                main_frame: true,
                same_site: None,
                approved: false,
            },
        );
        assert!(first_party(&r, "bank.test", &[]));
        // Without correlation a subframe or a subresource gets nothing.
        let r = req(
            &u,
            &[],
            Context {
                document: true,
                main_frame: false,
                same_site: None,
                approved: false,
            },
        );
        assert!(!first_party(&r, "bank.test", &[]));
    }

    #[test]
    fn unlisted_sites_are_stripped_or_blocked() {
        let v = vault();
        let u = url("https://news.test/");
        let hs = h(&[("Authorization", "Basic abc"), ("Accept", "*/*")]);
        match decide(&req(&u, &hs, same_site()), &v, UnlistedCredentials::Strip) {
            Decision::Continue {
                headers: Some(out),
                stripped,
                ..
            } => {
                assert_eq!(stripped, ["Authorization"]);
                assert_eq!(out, h(&[("Accept", "*/*")]));
            }
            d => panic!("{d:?}"),
        }
        assert_eq!(
            decide(&req(&u, &hs, same_site()), &v, UnlistedCredentials::Block),
            Decision::Block {
                headers: vec!["Authorization".into()]
            }
        );
        let plain = h(&[("Accept", "*/*")]);
        assert!(matches!(
            decide(
                &req(&u, &plain, same_site()),
                &v,
                UnlistedCredentials::Block
            ),
            Decision::Continue {
                headers: None,
                injected: None,
                ..
            }
        ));
    }

    #[test]
    fn held_values_going_elsewhere_are_exfiltration() {
        let v = vault();
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(COOKIE);
        for (u, body, hs, loc) in [
            (format!("http://evil.test/?q={COOKIE}"), "", vec![], "url"),
            (
                format!("http://{}.evil.test/", COOKIE.to_lowercase()),
                "",
                vec![],
                "host",
            ),
            (
                "http://evil.test/".into(),
                "",
                vec![("X-Data", b64.as_str())],
                "header:x-data",
            ),
            ("http://evil.test/".into(), TOKEN, vec![], "body"),
            // A secret of one credential is foreign on the other credential's site.
            ("http://mail.test/".into(), COOKIE, vec![], "body"),
        ] {
            let u = url(&u);
            let hs = h(&hs);
            let mut r = req(&u, &hs, same_site());
            r.body = body.as_bytes();
            match decide(&r, &v, UnlistedCredentials::Strip) {
                Decision::Exfiltration {
                    credential,
                    location,
                    ..
                } => {
                    assert_eq!(credential, "bank");
                    assert_eq!(location.name(), loc);
                }
                d => panic!("{u}: {d:?}"),
            }
        }
        // At home, the value is not a leak.
        let u = url("http://bank.test/");
        let mut r = req(&u, &[], same_site());
        r.body = COOKIE.as_bytes();
        assert!(matches!(
            decide(&r, &v, UnlistedCredentials::Strip),
            Decision::Continue { .. }
        ));
    }

    #[test]
    fn decisions_never_print_secrets() {
        let v = vault();
        let u = url("http://bank.test/");
        let d = decide(&req(&u, &[], same_site()), &v, UnlistedCredentials::Strip);
        assert!(matches!(
            &d,
            Decision::Continue {
                injected: Some(_),
                ..
            }
        ));
        let shown = format!("{d:?} {v:?}");
        assert!(!shown.contains(COOKIE) && !shown.contains(TOKEN), "{shown}");
    }

    /// A bank whose API takes an OAuth access token from `auth.bank.test` (its own site) and a
    /// shop whose token endpoint is on another site (`idp.test`).
    fn oauth_vault() -> Vault {
        let m = Mandate::from_json(
            r#"{"agent":"a","ttl_secs":60,"credentials":[
              {"id":"bank","site":"bank.test",
               "oauth":{"token_endpoint":"https://auth.bank.test/oauth/token","client_id":"cid",
                        "scope":"read","refresh_token":"SECRET-REFRESH-4c4c4c"}},
              {"id":"shop","site":"shop.test",
               "oauth":{"token_endpoint":"https://idp.test/token","client_id":"cid",
                        "scope":"read write","refresh_token":"SECRET-REFRESH-8f8f8f"}}]}"#,
        )
        .unwrap();
        let mut v = Vault::new(&m.credentials, FingerprintKey::random()).unwrap();
        v.set_access_token(
            0,
            "SECRET-ACCESS-111111".into(),
            None,
            vec!["read".into()],
            None,
        )
        .unwrap();
        v
    }

    fn post<'a>(u: &'a Url, body: &'a [u8]) -> Request<'a> {
        Request {
            url: u,
            method: "POST",
            headers: &[],
            body,
            context: same_site(),
        }
    }

    #[test]
    fn ag120_4_3_asking_a_token_endpoint_for_more_scope_is_blocked() {
        let v = oauth_vault();
        let bank = url("https://auth.bank.test/oauth/token");
        let d = decide(
            &post(&bank, b"grant_type=refresh_token&scope=read+admin"),
            &v,
            UnlistedCredentials::Strip,
        );
        assert_eq!(
            d,
            Decision::ScopeEscalation {
                credential: "bank".into(),
                requested_extra: vec!["admin".into()],
            }
        );
        let idp = url("https://idp.test/token?scope=write%20delete");
        let d = decide(&post(&idp, b""), &v, UnlistedCredentials::Strip);
        assert!(
            matches!(&d, Decision::ScopeEscalation { credential, requested_extra }
                if credential == "shop" && requested_extra == &["delete".to_string()]),
            "{d:?}"
        );
        let d = decide(
            &post(&idp, br#"{"scope":["read","write","admin"]}"#),
            &v,
            UnlistedCredentials::Strip,
        );
        assert!(matches!(d, Decision::ScopeEscalation { .. }), "{d:?}");
        // Within the grant, or no scope at all: not an escalation (the usual rules apply).
        for body in [
            &b"scope=read"[..],
            b"grant_type=authorization_code&code=x",
            b"",
        ] {
            let d = decide(&post(&bank, body), &v, UnlistedCredentials::Strip);
            assert!(matches!(d, Decision::Continue { .. }), "{d:?}");
        }
        // Another path on the same host is not the token endpoint.
        let other = url("https://auth.bank.test/oauth/authorize?scope=admin");
        let d = decide(&post(&other, b""), &v, UnlistedCredentials::Strip);
        assert!(matches!(d, Decision::Continue { .. }), "{d:?}");
    }

    #[test]
    fn a_held_value_to_a_token_endpoint_is_an_exfiltration_first() {
        let v = oauth_vault();
        // The bank's refresh token sent to the shop's token endpoint, asking for more scope:
        // the leak is what is reported.
        let idp = url("https://idp.test/token");
        let d = decide(
            &post(
                &idp,
                b"grant_type=refresh_token&refresh_token=SECRET-REFRESH-4c4c4c&scope=admin",
            ),
            &v,
            UnlistedCredentials::Strip,
        );
        assert!(
            matches!(&d, Decision::Exfiltration { credential, .. } if credential == "bank"),
            "{d:?}"
        );
        // A held value named as a scope (its own site's endpoint, so not a leak there) is not
        // written into the audit record.
        let bank = url("https://auth.bank.test/oauth/token");
        let d = decide(
            &post(&bank, b"scope=read+SECRET-ACCESS-111111"),
            &v,
            UnlistedCredentials::Strip,
        );
        assert_eq!(
            d,
            Decision::ScopeEscalation {
                credential: "bank".into(),
                requested_extra: vec!["[held value]".into()],
            }
        );
    }

    #[test]
    fn the_access_token_is_injected_once_refreshed() {
        let v = oauth_vault();
        let u = url("https://api.bank.test/me");
        let Decision::Continue {
            headers: Some(out),
            injected: Some(inj),
            ..
        } = decide(&req(&u, &[], same_site()), &v, UnlistedCredentials::Strip)
        else {
            panic!("not injected");
        };
        assert_eq!(
            header(&out, "authorization"),
            Some("Bearer SECRET-ACCESS-111111")
        );
        assert_eq!(inj.tokens.len(), 1);
        // The shop has no token yet: nothing rides.
        let u = url("https://shop.test/");
        let d = decide(&req(&u, &[], same_site()), &v, UnlistedCredentials::Strip);
        assert!(
            matches!(
                d,
                Decision::Continue {
                    injected: None,
                    headers: None,
                    ..
                }
            ),
            "{d:?}"
        );
    }

    proptest::proptest! {
        /// Arbitrary requests never panic; a request carrying a held value to a foreign host
        /// is always caught, whatever surrounds it.
        #[test]
        fn decide_is_total_and_catches_planted_secrets(
            host in "[a-z]{1,10}\\.(test|example|bank\\.test)",
            path in "[a-zA-Z0-9/._~%-]{0,40}",
            method in "(GET|POST|PUT|DELETE|OPTIONS)",
            names in proptest::collection::vec("[A-Za-z-]{1,12}", 0..5),
            values in proptest::collection::vec("[ -~]{0,30}", 0..5),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            same in proptest::option::of(proptest::bool::ANY),
            document in proptest::bool::ANY,
            plant in 0usize..4,
        ) {
            let v = vault();
            let u = Url::parse(&format!("http://{host}/{path}")).unwrap();
            let mut hs: Vec<(String, String)> =
                names.into_iter().zip(values).collect();
            let mut body = body;
            let foreign = site_of(&host) != "bank.test";
            let u = match plant {
                1 => Url::parse(&format!("{u}?x={COOKIE}")).unwrap(),
                _ => u,
            };
            if plant == 2 { hs.push(("X-Leak".into(), format!("a{TOKEN}b"))); }
            if plant == 3 { body.extend_from_slice(COOKIE.as_bytes()); }
            let r = Request {
                url: &u, method: &method, headers: &hs, body: &body,
                context: Context { document, main_frame: document, same_site: same, approved: false },
            };
            let d = decide(&r, &v, UnlistedCredentials::Strip);
            if plant > 0 && foreign {
                let is_exfiltration = matches!(d, Decision::Exfiltration { .. });
                proptest::prop_assert!(is_exfiltration, "{:?}", d);
            }
            if let Decision::Continue { injected: Some(_), .. } = &d {
                proptest::prop_assert!(!foreign);
            }
        }
    }
}
