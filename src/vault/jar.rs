//! Per-site cookie jars. A site is a registrable domain (public suffix list), so a session's
//! cookies for one site never ride to another (AG-120 4.8).
//!
//! RFC 6265 matching (domain, path, secure, expiry) is `cookie_store`'s. Values are not: the
//! store only ever sees an opaque handle per cookie, and the value lives in a [`Secret`]
//! (zeroized on drop, printed as a fingerprint), so the crate's own `String`s never hold
//! secret material.

use cookie_store::{CookieStore, RawCookie};
use url::Url;

use super::{FingerprintKey, Secret};

/// The site (registrable domain) of a host: `www.bank.co.uk` → `bank.co.uk`. Names under
/// suffixes the list does not know (`bank.test`) count their last two labels; an IP address
/// or a single label is its own site.
pub fn site_of(host: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return host;
    }
    psl::domain_str(&host).map_or(host.clone(), str::to_string)
}

/// Why a cookie was not taken into a jar.
#[derive(Debug, thiserror::Error)]
pub enum JarError {
    /// The response came from another site.
    #[error("a response from {host} cannot set cookies in the jar of {site}")]
    OtherSite {
        /// The responding host.
        host: String,
        /// The jar's site.
        site: String,
    },
    /// The cookie is malformed or not allowed for that URL (RFC 6265).
    #[error("cookie refused: {0}")]
    Refused(String),
}

/// The cookies held for one site.
pub struct SiteJar {
    site: String,
    store: CookieStore,
    values: Vec<Secret>,
}

impl SiteJar {
    /// An empty jar for `site` (a registrable domain, see [`site_of`]).
    pub fn new(site: &str) -> Self {
        SiteJar {
            site: site_of(site),
            store: CookieStore::default(),
            values: Vec::new(),
        }
    }

    /// The jar's site.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// Takes one `Set-Cookie` header value received from `url` into the jar.
    pub fn capture(
        &mut self,
        set_cookie: &str,
        url: &Url,
        key: &FingerprintKey,
    ) -> Result<&Secret, JarError> {
        let host = url.host_str().unwrap_or("");
        if site_of(host) != self.site {
            return Err(JarError::OtherSite {
                host: host.to_string(),
                site: self.site.clone(),
            });
        }
        let mut raw = RawCookie::parse(set_cookie.to_string())
            .map_err(|e| JarError::Refused(e.to_string()))?;
        let secret = Secret::new(raw.value().to_string().into(), key);
        // Erase the value from the parsed copy before it goes anywhere near the store.
        raw.set_value(format!("h{}", self.values.len()));
        self.store
            .insert_raw(&raw, url)
            .map_err(|e| JarError::Refused(e.to_string()))?;
        self.values.push(secret);
        Ok(self.values.last().expect("just pushed"))
    }

    /// Holds a cookie given by the mandate (not received from a response): host-wide on the
    /// jar's site and its subdomains.
    pub fn hold(
        &mut self,
        name: &str,
        value: Secret,
        path: &str,
        secure: bool,
        http_only: bool,
    ) -> Result<(), JarError> {
        let raw = RawCookie::build((name.to_string(), format!("h{}", self.values.len())))
            .domain(self.site.clone())
            .path(path.to_string())
            .secure(secure)
            .http_only(http_only)
            .build();
        let origin = Url::parse(&format!("https://{}/", self.site))
            .map_err(|e| JarError::Refused(e.to_string()))?;
        self.store
            .insert_raw(&raw, &origin)
            .map_err(|e| JarError::Refused(e.to_string()))?;
        self.values.push(value);
        Ok(())
    }

    /// Names of every cookie in the jar, whatever its path or subdomain.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .store
            .iter_any()
            .map(|c| c.name().to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The `Cookie` header value this jar adds to a request for `url`, if any.
    pub fn cookie_header(&self, url: &Url) -> Option<String> {
        let pairs: Vec<String> = self
            .request_cookies(url)
            .map(|(name, s)| format!("{name}={}", s.expose()))
            .collect();
        (!pairs.is_empty()).then(|| pairs.join("; "))
    }

    /// The cookies (name and held value) that ride on a request for `url`.
    pub fn request_cookies<'a>(
        &'a self,
        url: &'a Url,
    ) -> impl Iterator<Item = (&'a str, &'a Secret)> + 'a {
        self.store
            .get_request_values(url)
            .filter_map(|(name, handle)| {
                let i: usize = handle.strip_prefix('h')?.parse().ok()?;
                Some((name, self.values.get(i)?))
            })
    }

    /// Names of the cookies held for requests to `url` (what the gate must hide from the
    /// agent and keep it from overwriting).
    pub fn names_for(&self, url: &Url) -> Vec<String> {
        self.store
            .get_request_values(url)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// Every value held, for the leak detector.
    pub fn secrets(&self) -> impl Iterator<Item = &Secret> {
        self.values.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn sites_are_registrable_domains() {
        assert_eq!(site_of("www.bank.co.uk"), "bank.co.uk");
        assert_eq!(site_of("a.b.bank.test"), "bank.test");
        assert_eq!(site_of("Bank.Example.COM."), "example.com");
        assert_eq!(site_of("127.0.0.1"), "127.0.0.1");
        assert_ne!(site_of("evil-bank.test"), site_of("bank.test"));
        // Two customers of one hosting suffix are two sites.
        assert_ne!(site_of("alice.github.io"), site_of("bob.github.io"));
    }

    #[test]
    fn cookies_follow_rfc6265_and_stay_on_their_site() {
        let key = FingerprintKey::random();
        let mut jar = SiteJar::new("bank.test");
        let origin = url("https://login.bank.test/session");
        let held = jar
            .capture(
                "sid=SECRET-COOKIE-7d1f0c; Domain=bank.test; Path=/; Secure; HttpOnly",
                &origin,
                &key,
            )
            .unwrap();
        assert!(!format!("{held:?}").contains("SECRET"));
        jar.capture("pref=dark; Path=/app", &url("https://www.bank.test/"), &key)
            .unwrap();
        let header = jar
            .cookie_header(&url("https://www.bank.test/app/x"))
            .unwrap();
        let mut pairs: Vec<&str> = header.split("; ").collect();
        pairs.sort();
        assert_eq!(pairs, ["pref=dark", "sid=SECRET-COOKIE-7d1f0c"], "{header}");
        // Secure cookies never go over http; paths and hosts are respected.
        assert_eq!(jar.cookie_header(&url("http://www.bank.test/")), None);
        assert_eq!(
            jar.cookie_header(&url("https://api.bank.test/")).as_deref(),
            Some("sid=SECRET-COOKIE-7d1f0c")
        );
        assert_eq!(jar.cookie_header(&url("https://evil.test/")), None);
        assert_eq!(jar.names_for(&url("https://api.bank.test/")), ["sid"]);
        // Another site cannot write into this jar.
        assert!(matches!(
            jar.capture("sid=x", &url("https://evil.test/"), &key),
            Err(JarError::OtherSite { .. })
        ));
        // Nor can a response claim a domain outside its own.
        assert!(jar
            .capture("x=1; Domain=evil.test", &url("https://bank.test/"), &key)
            .is_err());
        assert_eq!(jar.secrets().count(), 2);
    }
}
