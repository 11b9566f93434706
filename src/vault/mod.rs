//! Secret material held for a session. Values are zeroized when dropped and never printed:
//! `Debug` and `Display` show a keyed fingerprint, which is also how the audit log names a
//! token (AG-120 4.6: token identifiers, not token values).
//!
//! A [`Vault`] holds one session's credentials: per credential its headers and a cookie jar
//! for its site ([`jar`]), filled from the mandate and from the site's own `Set-Cookie`
//! responses. The broker reads it for every request; nothing else sees a value.

pub mod jar;

use std::fmt;
use std::time::{Duration, Instant};

use url::Url;
use zeroize::Zeroizing;

use crate::broker::leak::{LeakDetector, MIN_SECRET_LEN};
use crate::broker::upstream::Revocation;
use crate::gate::{Held, HeldCookie};
use crate::mandate::Credential;
use jar::{site_of, JarError, SiteJar};

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

/// Key for fingerprints: random per supervisor, so a fingerprint cannot be checked against a
/// guessed value by anyone without the key, and fingerprints from two supervisors never match.
#[derive(Clone)]
pub struct FingerprintKey(secrecy::SecretSlice<u8>);

impl FingerprintKey {
    /// A fresh random key.
    pub fn random() -> Self {
        let mut k = vec![0u8; 32];
        rand::fill(&mut k[..]);
        FingerprintKey(k.into())
    }

    /// The fingerprint of `value`: `fp:` and 16 hex digits of HMAC-SHA256.
    pub fn fingerprint(&self, value: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.0.expose_secret())
            .expect("HMAC takes keys of any length");
        mac.update(value);
        let out = mac.finalize().into_bytes();
        format!("fp:{}", hex::encode(&out[..8]))
    }
}

impl fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerprintKey([held])")
    }
}

/// One secret value (a cookie value, a header value).
pub struct Secret {
    value: SecretString,
    fingerprint: String,
}

impl Secret {
    /// Wraps `value`, fingerprinted with `key`.
    pub fn new(value: SecretString, key: &FingerprintKey) -> Self {
        let fingerprint = key.fingerprint(value.expose_secret().as_bytes());
        Secret { value, fingerprint }
    }

    /// The token identifier for audit records and logs.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The value, for the broker's injection and leak detection only.
    pub(crate) fn expose(&self) -> &str {
        self.value.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.fingerprint)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint)
    }
}

/// One credential as the vault holds it.
pub struct HeldCredential {
    /// The mandate's id for it (what the audit log names).
    pub id: String,
    /// Its site (registrable domain).
    pub site: String,
    /// Sites (registrable domains) whose pages may send requests that carry it.
    pub initiators: Vec<String>,
    /// Rides only on a request a human approved (see [`crate::mandate::Credential::on_approval`]).
    pub on_approval: bool,
    headers: Vec<(String, Secret)>,
    jar: SiteJar,
    oauth: Option<OAuthHeld>,
    revoke: Option<RevokeTemplate>,
    /// Taken away by a mandate change: its values are gone and its site has no credential.
    removed: bool,
}

/// How many replaced tokens stay detectable per credential.
const MAX_RETIRED: usize = 16;

/// How long a replaced token whose lifetime nobody told stays detectable.
const RETIRED_UNKNOWN_LIFETIME: Duration = Duration::from_secs(3600);

/// A credential's OAuth grant as the vault holds it: the material the supervisor refreshes
/// with, and the access token it injects.
pub struct OAuthHeld {
    endpoint: Url,
    client_id: String,
    scope: Vec<String>,
    /// What the last refresh granted (never more than `scope`); `scope` before the first.
    granted: Vec<String>,
    max_age: Duration,
    header: String,
    refresh_token: Secret,
    client_secret: Option<Secret>,
    access: Option<Access>,
    /// Replaced access and refresh tokens, each detectable until it would have expired
    /// upstream: a page may have copied one earlier and try to send it out later.
    retired: Vec<(Secret, Instant)>,
}

struct Access {
    token: Secret,
    /// What rides in the header (`Bearer <token>`).
    header_value: Secret,
    /// Until when it is valid upstream, by its `expires_in`.
    expires: Option<Instant>,
}

impl OAuthHeld {
    /// The token endpoint.
    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    /// The mandate's scope.
    pub fn scope(&self) -> &[String] {
        &self.scope
    }

    /// The scope the current grant holds (the mandate's until the first refresh says less).
    pub fn granted(&self) -> &[String] {
        &self.granted
    }

    /// `max_token_age_secs`.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Whether an access token is being injected now.
    pub fn has_access_token(&self) -> bool {
        self.access.is_some()
    }

    fn secrets(&self) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.refresh_token)
            .chain(self.client_secret.iter())
            .chain(self.access.iter().flat_map(|a| [&a.token, &a.header_value]))
            .chain(self.retired.iter().map(|(s, _)| s))
    }

    fn retire(&mut self, s: Secret, until: Instant) {
        let now = Instant::now();
        self.retired.retain(|(_, t)| *t > now);
        self.retired.push((s, until));
        while self.retired.len() > MAX_RETIRED {
            self.retired.remove(0);
        }
    }
}

/// A credential's `revoke` call, values not yet filled in.
struct RevokeTemplate {
    url: Url,
    method: String,
    form: Vec<(String, String)>,
}

/// What the supervisor needs for one refresh of a credential's access token.
pub struct RefreshMaterial {
    /// The credential's id.
    pub credential: String,
    /// The token endpoint.
    pub endpoint: Url,
    /// The encoded refresh grant, values included.
    pub form: Zeroizing<String>,
    /// The mandate's scope.
    pub scope: Vec<String>,
    /// `max_token_age_secs`.
    pub max_age: Duration,
}

impl HeldCredential {
    /// The headers to add (name as the mandate wrote it), the current access token included.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &Secret)> {
        self.headers
            .iter()
            .map(|(n, v)| (n.as_str(), v))
            .chain(self.oauth.as_ref().and_then(|o| {
                o.access
                    .as_ref()
                    .map(|a| (o.header.as_str(), &a.header_value))
            }))
    }

    /// The credential's OAuth grant, if it has one.
    pub fn oauth(&self) -> Option<&OAuthHeld> {
        self.oauth.as_ref()
    }

    /// The credential's cookie jar.
    pub fn jar(&self) -> &SiteJar {
        &self.jar
    }

    /// Whether a narrowed mandate took it away (its values are gone).
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// The fingerprints of every value held for this credential (its token identifiers in
    /// the audit log), without duplicates.
    pub fn token_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .secrets()
            .map(|s| s.fingerprint().to_string())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Every value held for this credential.
    fn secrets(&self) -> impl Iterator<Item = &Secret> {
        self.headers
            .iter()
            .map(|(_, v)| v)
            .chain(self.jar.secrets())
            .chain(self.oauth.iter().flat_map(OAuthHeld::secrets))
    }
}

/// What taking a credential away ([`Vault::remove`]) dropped.
pub struct Removed {
    /// How many held values were dropped and zeroized.
    pub values: usize,
    /// Its upstream revocation, filled in before the values were dropped.
    pub revocation: Option<Revocation>,
}

/// A session's credentials. Built from the mandate once, then grown only by cookies the
/// credential sites set; dropped (and zeroized) with the session.
pub struct Vault {
    key: FingerprintKey,
    creds: Vec<HeldCredential>,
    /// `detectors[i]`: the values that must not travel to credential `i`'s site (everyone
    /// else's); `detectors[creds.len()]`: every value, for any other destination.
    detectors: Vec<Option<(LeakDetector, Vec<usize>)>>,
}

impl Vault {
    /// Takes the mandate's credentials in (validated already: one credential per site).
    pub fn new(credentials: &[Credential], key: FingerprintKey) -> Result<Vault, JarError> {
        use secrecy::ExposeSecret;
        let mut creds = Vec::with_capacity(credentials.len());
        for c in credentials {
            let site = site_of(&c.site);
            let mut jar = SiteJar::new(&site);
            for k in &c.cookies {
                let value = Secret::new(k.value.expose_secret().to_string().into(), &key);
                jar.hold(
                    &k.name,
                    value,
                    k.path.as_deref().unwrap_or("/"),
                    k.secure.unwrap_or(true),
                    k.http_only.unwrap_or(true),
                )?;
            }
            let headers = c
                .headers
                .iter()
                .map(|(n, v)| {
                    let value = Secret::new(v.expose_secret().to_string().into(), &key);
                    (n.clone(), value)
                })
                .collect();
            let bad = |field: &str, e: String| JarError::Refused(format!("{}.{field}: {e}", c.id));
            let oauth = match &c.oauth {
                Some(o) => {
                    let scope = crate::broker::oauth::parse_scope(&o.scope)
                        .map_err(|e| bad("oauth.scope", e))?;
                    Some(OAuthHeld {
                        endpoint: Url::parse(&o.token_endpoint)
                            .map_err(|e| bad("oauth.token_endpoint", e.to_string()))?,
                        client_id: o.client_id.clone(),
                        granted: scope.clone(),
                        scope,
                        max_age: o.max_token_age(),
                        header: o.header_name().to_string(),
                        refresh_token: Secret::new(
                            o.refresh_token.expose_secret().to_string().into(),
                            &key,
                        ),
                        client_secret: o
                            .client_secret
                            .as_ref()
                            .map(|v| Secret::new(v.expose_secret().to_string().into(), &key)),
                        access: None,
                        retired: Vec::new(),
                    })
                }
                None => None,
            };
            let revoke = match &c.revoke {
                Some(r) => Some(RevokeTemplate {
                    url: Url::parse(&r.url).map_err(|e| bad("revoke.url", e.to_string()))?,
                    method: r.method(),
                    form: r.form.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                }),
                None => None,
            };
            creds.push(HeldCredential {
                id: c.id.clone(),
                site,
                initiators: c.allowed_initiators.iter().map(|s| site_of(s)).collect(),
                on_approval: c.on_approval,
                headers,
                jar,
                oauth,
                revoke,
                removed: false,
            });
        }
        let mut vault = Vault {
            key,
            creds,
            detectors: Vec::new(),
        };
        vault.rebuild();
        Ok(vault)
    }

    /// A vault that holds nothing (what a purged session's broker is left with).
    pub fn empty() -> Vault {
        Vault {
            key: FingerprintKey::random(),
            creds: Vec::new(),
            detectors: vec![None],
        }
    }

    /// Whether the mandate gave any credential.
    pub fn is_empty(&self) -> bool {
        self.creds.is_empty()
    }

    /// The credentials, in mandate order.
    pub fn credentials(&self) -> &[HeldCredential] {
        &self.creds
    }

    /// Index of the credential for `site` (a registrable domain).
    pub fn credential_for_site(&self, site: &str) -> Option<usize> {
        self.creds.iter().position(|c| c.site == site && !c.removed)
    }

    /// Takes a credential away (a narrowed mandate): its values are dropped, and so zeroized,
    /// at once; its site is a site without a credential from the next request on. Indices of
    /// the other credentials do not move. Returns how many values were dropped and its upstream
    /// revocation, filled in from them first (the caller sends it), or `None` when no
    /// credential has that id (or it was removed before).
    pub fn remove(&mut self, id: &str) -> Option<Removed> {
        let c = self.creds.iter_mut().find(|c| c.id == id && !c.removed)?;
        let revocation = Self::revocation(c);
        let dropped = c.secrets().count();
        c.headers = Vec::new();
        c.jar = SiteJar::new(&c.site);
        c.oauth = None;
        c.revoke = None;
        c.removed = true;
        self.rebuild();
        Some(Removed {
            values: dropped,
            revocation,
        })
    }

    /// The detector for material travelling to credential `home`'s site (`None`: to any other
    /// site). It finds every held value that does not belong there; `None` when there is none.
    pub fn detector_for(&self, home: Option<usize>) -> Option<&LeakDetector> {
        self.detectors
            .get(home.unwrap_or(self.creds.len()))
            .and_then(Option::as_ref)
            .map(|(d, _)| d)
    }

    /// The id of the credential whose value a finding of `detector_for(home)` (index
    /// `secret`) is.
    pub fn owner_of_finding(&self, home: Option<usize>, secret: usize) -> Option<&str> {
        let (_, owners) = self
            .detectors
            .get(home.unwrap_or(self.creds.len()))?
            .as_ref()?;
        let i = *owners.get(secret)?;
        self.creds.get(i).map(|c| c.id.as_str())
    }

    /// Takes a `Set-Cookie` header received from `url` into credential `cred`'s jar.
    /// Returns the held value's fingerprint and the cookie's name.
    pub fn capture(
        &mut self,
        cred: usize,
        set_cookie: &str,
        url: &Url,
    ) -> Result<(String, String), JarError> {
        let c = self
            .creds
            .get_mut(cred)
            .filter(|c| !c.removed)
            .ok_or_else(|| JarError::Refused("no such credential (or it was removed)".into()))?;
        let name = set_cookie
            .split(';')
            .next()
            .and_then(|p| p.split_once('='))
            .map(|(n, _)| n.trim().to_string())
            .unwrap_or_default();
        let fp = c
            .jar
            .capture(set_cookie, url, &self.key)?
            .fingerprint()
            .to_string();
        self.rebuild();
        Ok((fp, name))
    }

    /// The fingerprint of `value` under this vault's key (for a token that is refused and
    /// never held).
    pub fn fingerprint(&self, value: &str) -> String {
        self.key.fingerprint(value.as_bytes())
    }

    /// The credential whose token endpoint `url` is, if any.
    pub fn token_endpoint_credential(&self, url: &Url) -> Option<usize> {
        self.creds.iter().position(|c| {
            !c.removed
                && c.oauth
                    .as_ref()
                    .is_some_and(|o| crate::broker::oauth::same_endpoint(url, &o.endpoint))
        })
    }

    /// Indices of the credentials with an OAuth grant.
    pub fn oauth_credentials(&self) -> Vec<usize> {
        (0..self.creds.len())
            .filter(|&i| !self.creds[i].removed && self.creds[i].oauth.is_some())
            .collect()
    }

    /// The refresh grant for credential `cred` (RFC 6749 section 6): always the mandate's
    /// scope, so a refresh can never widen it. `None` when it has no grant (or was removed).
    pub fn refresh_material(&self, cred: usize) -> Option<RefreshMaterial> {
        let c = self.creds.get(cred).filter(|c| !c.removed)?;
        let o = c.oauth.as_ref()?;
        let scope = o.scope.join(" ");
        // Reserved up front: a growing buffer would leave unzeroized copies behind.
        let mut buf = Zeroizing::new(String::with_capacity(8192));
        {
            let mut form = url::form_urlencoded::Serializer::new(&mut *buf);
            form.append_pair("grant_type", "refresh_token")
                .append_pair("refresh_token", o.refresh_token.expose())
                .append_pair("client_id", &o.client_id);
            if let Some(cs) = &o.client_secret {
                form.append_pair("client_secret", cs.expose());
            }
            form.append_pair("scope", &scope);
            form.finish();
        }
        Some(RefreshMaterial {
            credential: c.id.clone(),
            endpoint: o.endpoint.clone(),
            form: buf,
            scope: o.scope.clone(),
            max_age: o.max_age,
        })
    }

    /// Puts a freshly granted access token in force for credential `cred` (the caller checked
    /// its scope), and a rotated refresh token if the server sent one. The tokens replaced stay
    /// detectable. Returns the new token's fingerprint, or `None` when the credential is gone.
    pub fn set_access_token(
        &mut self,
        cred: usize,
        token: secrecy::SecretString,
        expires_in: Option<Duration>,
        granted: Vec<String>,
        rotated: Option<secrecy::SecretString>,
    ) -> Option<String> {
        let key = self.key.clone();
        let c = self.creds.get_mut(cred).filter(|c| !c.removed)?;
        let o = c.oauth.as_mut()?;
        let now = Instant::now();
        let header_value = if o.header.eq_ignore_ascii_case("authorization") {
            format!("Bearer {}", token.expose_secret())
        } else {
            token.expose_secret().to_string()
        };
        let access = Access {
            token: Secret::new(token, &key),
            header_value: Secret::new(header_value.into(), &key),
            expires: expires_in.map(|d| now + d),
        };
        let fingerprint = access.token.fingerprint().to_string();
        if let Some(old) = o.access.replace(access) {
            let until = old.expires.unwrap_or(now + RETIRED_UNKNOWN_LIFETIME);
            o.retire(old.token, until);
            o.retire(old.header_value, until);
        }
        if let Some(rt) = rotated {
            let old = std::mem::replace(&mut o.refresh_token, Secret::new(rt, &key));
            o.retire(old, now + RETIRED_UNKNOWN_LIFETIME);
        }
        o.granted = granted;
        self.rebuild();
        Some(fingerprint)
    }

    /// Stops injecting credential `cred`'s access token (it got older than
    /// `max_token_age_secs` without a refresh). It stays detectable. Returns whether one was
    /// injected.
    pub fn expire_access_token(&mut self, cred: usize) -> bool {
        let Some(o) = self
            .creds
            .get_mut(cred)
            .filter(|c| !c.removed)
            .and_then(|c| c.oauth.as_mut())
        else {
            return false;
        };
        let Some(old) = o.access.take() else {
            return false;
        };
        let until = old
            .expires
            .unwrap_or(Instant::now() + RETIRED_UNKNOWN_LIFETIME);
        o.retire(old.token, until);
        o.retire(old.header_value, until);
        self.rebuild();
        true
    }

    /// The upstream revocations of every credential that has one, values filled in: the form's
    /// placeholders, the credential's cookies for the URL, its access token's header, and its
    /// other headers when the URL is on its own site (never to another site's host).
    pub fn revocations(&self) -> Vec<Revocation> {
        self.creds
            .iter()
            .filter(|c| !c.removed)
            .filter_map(Self::revocation)
            .collect()
    }

    /// Credential `c`'s upstream revocation, if it has one (see [`Vault::revocations`]).
    fn revocation(c: &HeldCredential) -> Option<Revocation> {
        let r = c.revoke.as_ref()?;
        let o = c.oauth.as_ref();
        let value = |name: &str| -> Option<&str> {
            let o = o?;
            match name {
                "refresh_token" => Some(o.refresh_token.expose()),
                "access_token" => o.access.as_ref().map(|a| a.token.expose()),
                "client_id" => Some(o.client_id.as_str()),
                "client_secret" => o.client_secret.as_ref().map(Secret::expose),
                _ => None,
            }
        };
        let form = (!r.form.is_empty()).then(|| {
            let mut buf = Zeroizing::new(String::with_capacity(8192));
            let mut f = url::form_urlencoded::Serializer::new(&mut *buf);
            for (k, v) in &r.form {
                let filled = crate::broker::oauth::fill(v, value);
                f.append_pair(k, &filled);
            }
            f.finish();
            buf
        });
        let on_site = r
            .url
            .host_str()
            .is_some_and(|h| site_of(h.trim_matches(['[', ']'])) == c.site);
        let mut headers: Vec<(String, Zeroizing<String>)> = Vec::new();
        if on_site {
            headers.extend(
                c.headers
                    .iter()
                    .map(|(n, v)| (n.clone(), Zeroizing::new(v.expose().to_string()))),
            );
            // Reserved up front: a growing buffer would leave unzeroized copies behind.
            let mut cookie = Zeroizing::new(String::with_capacity(4096));
            for (n, v) in c.jar.request_cookies(&r.url) {
                if !cookie.is_empty() {
                    cookie.push_str("; ");
                }
                cookie.push_str(n);
                cookie.push('=');
                cookie.push_str(v.expose());
            }
            if !cookie.is_empty() {
                headers.push(("Cookie".to_string(), cookie));
            }
        }
        if let Some((name, a)) = o.and_then(|o| o.access.as_ref().map(|a| (&o.header, a))) {
            headers.push((
                name.clone(),
                Zeroizing::new(a.header_value.expose().to_string()),
            ));
        }
        Some(Revocation {
            credential: c.id.clone(),
            url: r.url.clone(),
            method: r.method.clone(),
            headers,
            form,
        })
    }

    /// The gate's view: every detectable value, the held cookies, the sites.
    pub fn held(&self, files_dir: &str) -> Held {
        let mut values = Vec::new();
        let mut cookies = Vec::new();
        for c in self.creds.iter().filter(|c| !c.removed) {
            values.extend(c.secrets().filter(detectable).flat_map(forms));
            cookies.extend(c.jar.names().into_iter().map(|name| HeldCookie {
                site: c.site.clone(),
                name,
            }));
        }
        let sites = self
            .creds
            .iter()
            .filter(|c| !c.removed)
            .map(|c| c.site.clone())
            .collect();
        Held::new(&values, cookies, sites, files_dir)
    }

    fn rebuild(&mut self) {
        let n = self.creds.len();
        self.detectors = (0..=n)
            .map(|home| {
                let mut values = Vec::new();
                let mut owners = Vec::new();
                for (i, c) in self.creds.iter().enumerate().filter(|(i, _)| *i != home) {
                    for form in c.secrets().filter(detectable).flat_map(forms) {
                        values.push(form);
                        owners.push(i);
                    }
                }
                (!values.is_empty()).then(|| (LeakDetector::new(&values), owners))
            })
            .collect();
    }
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field(
                "credentials",
                &self.creds.iter().map(|c| &c.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Values shorter than the detector's minimum (a captured `lang=en`) are held and injected
/// but not searched for: they would match ordinary traffic.
fn detectable(s: &&Secret) -> bool {
    s.expose().len() >= MIN_SECRET_LEN
}

/// The forms of a value the gate scrubs: the value, and the token of `Scheme token` values
/// (`Bearer abc…`), so the bare token is caught as well.
fn forms(s: &Secret) -> Vec<&str> {
    let v = s.expose();
    let mut out = vec![v];
    if let Some((_, token)) = v.split_once(' ') {
        if token.len() >= MIN_SECRET_LEN {
            out.push(token);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUE: &str = "SECRET-COOKIE-7d1f0c";

    #[test]
    fn printing_shows_the_fingerprint_never_the_value() {
        let key = FingerprintKey::random();
        let s = Secret::new(VALUE.into(), &key);
        let shown = format!("{s} {s:?} {:?} {key:?}", Some(&s));
        assert!(!shown.contains(VALUE), "{shown}");
        assert!(shown.contains(s.fingerprint()));
        assert_eq!(s.expose(), VALUE);
        let panic = std::panic::catch_unwind(|| panic!("lost {s:?}")).unwrap_err();
        let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("fp:") && !text.contains(VALUE), "{text}");
    }

    fn oauth_vault() -> Vault {
        let m = crate::mandate::Mandate::from_json(
            r#"{"agent":"a","ttl_secs":60,"credentials":[
              {"id":"api","site":"bank.test",
               "cookies":[{"name":"sid","value":"SECRET-COOKIE-7d1f0c","secure":false}],
               "headers":{"X-Static":"SECRET-STATIC-0a0a0a"},
               "oauth":{"token_endpoint":"https://idp.test/token","client_id":"cid",
                        "client_secret":"SECRET-CLIENT-1b2b3b","scope":"read write",
                        "refresh_token":"SECRET-REFRESH-4c4c4c","max_token_age_secs":60},
               "revoke":{"url":"https://idp.test/revoke",
                         "form":{"token":"{refresh_token}","hint":"refresh_token","c":"{client_id}"}}},
              {"id":"site","site":"mail.test","headers":{"X-K":"SECRET-MAIL-5d5d5d"},
               "revoke":{"url":"https://mail.test/logout","method":"DELETE"}}]}"#,
        )
        .unwrap();
        Vault::new(&m.credentials, FingerprintKey::random()).unwrap()
    }

    fn caught(v: &Vault, home: Option<usize>, value: &str) -> bool {
        v.detector_for(home)
            .is_some_and(|d| d.find(value.as_bytes()).is_some())
    }

    #[test]
    fn oauth_material_is_held_detected_and_refreshed_with_the_mandates_scope() {
        let mut v = oauth_vault();
        assert_eq!(v.oauth_credentials(), vec![0]);
        // The refresh and client secrets are held values from the start: a request that
        // carries them anywhere else is an exfiltration.
        for secret in ["SECRET-REFRESH-4c4c4c", "SECRET-CLIENT-1b2b3b"] {
            assert!(caught(&v, None, secret) && caught(&v, Some(1), secret));
        }
        let m = v.refresh_material(0).unwrap();
        let form: Vec<(String, String)> = url::form_urlencoded::parse(m.form.as_bytes())
            .into_owned()
            .collect();
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("grant_type"), Some("refresh_token"));
        assert_eq!(get("refresh_token"), Some("SECRET-REFRESH-4c4c4c"));
        assert_eq!(get("client_id"), Some("cid"));
        assert_eq!(get("client_secret"), Some("SECRET-CLIENT-1b2b3b"));
        assert_eq!(get("scope"), Some("read write"));
        assert_eq!(m.max_age, Duration::from_secs(60));
        assert!(v.refresh_material(1).is_none());

        // No token yet: only the static header rides.
        let names = |v: &Vault| -> Vec<String> {
            v.credentials()[0]
                .headers()
                .map(|(n, _)| n.to_string())
                .collect()
        };
        assert_eq!(names(&v), vec!["X-Static"]);
        let fp = v
            .set_access_token(
                0,
                "SECRET-ACCESS-111111".into(),
                Some(Duration::from_secs(30)),
                vec!["read".into()],
                None,
            )
            .unwrap();
        assert!(fp.starts_with("fp:"));
        assert_eq!(names(&v), vec!["X-Static", "Authorization"]);
        let (_, bearer) = v.credentials()[0].headers().nth(1).unwrap();
        assert_eq!(bearer.expose(), "Bearer SECRET-ACCESS-111111");
        assert_eq!(v.credentials()[0].oauth().unwrap().granted(), ["read"]);
        assert!(caught(&v, None, "SECRET-ACCESS-111111"));
        assert!(!caught(&v, Some(0), "SECRET-ACCESS-111111"));

        // A new token and a rotated refresh token: the old ones stay detectable.
        v.set_access_token(
            0,
            "SECRET-ACCESS-222222".into(),
            None,
            vec!["read".into(), "write".into()],
            Some("SECRET-REFRESH-7e7e7e".into()),
        )
        .unwrap();
        let (_, bearer) = v.credentials()[0].headers().nth(1).unwrap();
        assert_eq!(bearer.expose(), "Bearer SECRET-ACCESS-222222");
        for old in [
            "SECRET-ACCESS-111111",
            "SECRET-REFRESH-4c4c4c",
            "SECRET-REFRESH-7e7e7e",
        ] {
            assert!(caught(&v, None, old), "{old}");
        }
        let m = v.refresh_material(0).unwrap();
        assert!(m.form.contains("SECRET-REFRESH-7e7e7e"));
        // Gone stale: no longer injected, still detected.
        assert!(v.expire_access_token(0));
        assert!(!v.expire_access_token(0));
        assert_eq!(names(&v), vec!["X-Static"]);
        assert!(caught(&v, None, "SECRET-ACCESS-222222"));
        // Removed: nothing left to refresh or revoke.
        v.remove("api").unwrap();
        assert!(v.refresh_material(0).is_none());
        assert!(v
            .set_access_token(0, "SECRET-ACCESS-333333".into(), None, vec![], None)
            .is_none());
        assert_eq!(v.revocations().len(), 1);
    }

    #[test]
    fn token_endpoints_are_matched_by_url() {
        let v = oauth_vault();
        let u = |s: &str| Url::parse(s).unwrap();
        assert_eq!(
            v.token_endpoint_credential(&u("https://idp.test/token?x=1")),
            Some(0)
        );
        assert_eq!(
            v.token_endpoint_credential(&u("https://idp.test/revoke")),
            None
        );
        assert_eq!(
            v.token_endpoint_credential(&u("http://idp.test/token")),
            None
        );
    }

    #[test]
    fn revocations_carry_what_the_mandate_names_and_only_to_its_place() {
        let mut v = oauth_vault();
        v.set_access_token(0, "SECRET-ACCESS-111111".into(), None, vec![], None)
            .unwrap();
        let rs = v.revocations();
        assert_eq!(rs.len(), 2);
        let r = &rs[0];
        assert_eq!((r.credential.as_str(), r.method.as_str()), ("api", "POST"));
        assert_eq!(r.url.as_str(), "https://idp.test/revoke");
        let form: Vec<(String, String)> =
            url::form_urlencoded::parse(r.form.as_ref().unwrap().as_bytes())
                .into_owned()
                .collect();
        assert!(form.contains(&("token".into(), "SECRET-REFRESH-4c4c4c".into())));
        assert!(form.contains(&("hint".into(), "refresh_token".into())));
        assert!(form.contains(&("c".into(), "cid".into())));
        // The token endpoint's host is another site: the access token's header goes, the
        // site's own cookies and static headers do not.
        let headers: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            headers,
            vec![("Authorization", "Bearer SECRET-ACCESS-111111")]
        );
        assert!(!format!("{r:?}").contains("SECRET"), "{r:?}");
        // On its own site: its headers and cookies, no form.
        let r = &rs[1];
        assert_eq!(
            (r.credential.as_str(), r.method.as_str()),
            ("site", "DELETE")
        );
        assert!(r.form.is_none());
        let headers: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(headers, vec![("X-K", "SECRET-MAIL-5d5d5d")]);
    }

    #[test]
    fn fingerprints_are_stable_per_key_and_differ_across_keys() {
        let (a, b) = (FingerprintKey::random(), FingerprintKey::random());
        assert_eq!(
            a.fingerprint(VALUE.as_bytes()),
            a.fingerprint(VALUE.as_bytes())
        );
        assert_ne!(a.fingerprint(VALUE.as_bytes()), a.fingerprint(b"other"));
        assert_ne!(
            a.fingerprint(VALUE.as_bytes()),
            b.fingerprint(VALUE.as_bytes())
        );
        assert_eq!(a.fingerprint(b"x").len(), "fp:".len() + 16);
    }
}
