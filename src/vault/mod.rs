//! Secret material held for a session. Values are zeroized when dropped and never printed:
//! `Debug` and `Display` show a keyed fingerprint, which is also how the audit log names a
//! token (AG-120 4.6: token identifiers, not token values).
//!
//! A [`Vault`] holds one session's credentials: per credential its headers and a cookie jar
//! for its site ([`jar`]), filled from the mandate and from the site's own `Set-Cookie`
//! responses. The broker reads it for every request; nothing else sees a value.

pub mod jar;

use std::fmt;

use url::Url;

use crate::broker::leak::{LeakDetector, MIN_SECRET_LEN};
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
    headers: Vec<(String, Secret)>,
    jar: SiteJar,
    /// Taken away by a mandate change: its values are gone and its site has no credential.
    removed: bool,
}

impl HeldCredential {
    /// The headers to add (name as the mandate wrote it).
    pub fn headers(&self) -> impl Iterator<Item = (&str, &Secret)> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// The credential's cookie jar.
    pub fn jar(&self) -> &SiteJar {
        &self.jar
    }

    /// Every value held for this credential.
    fn secrets(&self) -> impl Iterator<Item = &Secret> {
        self.headers
            .iter()
            .map(|(_, v)| v)
            .chain(self.jar.secrets())
    }
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
            creds.push(HeldCredential {
                id: c.id.clone(),
                site,
                initiators: c.allowed_initiators.iter().map(|s| site_of(s)).collect(),
                headers,
                jar,
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
    /// the other credentials do not move. Returns how many values were dropped, or `None`
    /// when no credential has that id (or it was removed before).
    pub fn remove(&mut self, id: &str) -> Option<usize> {
        let c = self.creds.iter_mut().find(|c| c.id == id && !c.removed)?;
        let dropped = c.secrets().count();
        c.headers = Vec::new();
        c.jar = SiteJar::new(&c.site);
        c.removed = true;
        self.rebuild();
        Some(dropped)
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
