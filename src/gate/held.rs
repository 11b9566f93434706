//! What the gate keeps from the agent: a per-session view of the vault that the router can
//! consult on every message without touching secret-bearing types.
//!
//! The broker publishes a new [`Held`] whenever the vault changes (a cookie captured from a
//! credential site's response); the router reads the current one through a [`HeldCell`] for each
//! message. A `Held` never prints a secret: its `Debug` shows counts only.

use std::fmt;
use std::sync::{Arc, RwLock};

use crate::broker::leak::LeakDetector;

/// A cookie the supervisor holds: the agent may neither read it nor write over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldCookie {
    /// The credential site (registrable domain) the cookie belongs to.
    pub site: String,
    /// The cookie's name.
    pub name: String,
}

/// The gate's view of one session's vault.
pub struct Held {
    /// Finds any held secret value (raw or encoded) in text bound for the agent; `None` when
    /// the session holds no secret.
    detector: Option<LeakDetector>,
    /// Cookies held, by site and name.
    cookies: Vec<HeldCookie>,
    /// The credential sites (registrable domains).
    sites: Vec<String>,
    /// The only directory (inside the sandbox) downloads and file uploads may use.
    files_dir: String,
}

impl Held {
    /// A view of a vault holding `secrets` (every held value: header values, the token part
    /// of `Bearer …` values, cookie values), `cookies` and `sites`.
    pub fn new(
        secrets: &[&str],
        cookies: Vec<HeldCookie>,
        sites: Vec<String>,
        files_dir: impl Into<String>,
    ) -> Held {
        Held {
            detector: (!secrets.is_empty()).then(|| LeakDetector::new(secrets)),
            cookies,
            sites,
            files_dir: files_dir.into(),
        }
    }

    /// A session that holds nothing (no credentials in its mandate).
    pub fn nothing(files_dir: impl Into<String>) -> Held {
        Held::new(&[], Vec::new(), Vec::new(), files_dir)
    }

    /// Whether the session holds anything at all; when false, scrubbing has nothing to do.
    pub fn holds_anything(&self) -> bool {
        self.detector.is_some() || !self.cookies.is_empty() || !self.sites.is_empty()
    }

    /// The detector for held secret values, if any are held.
    pub fn detector(&self) -> Option<&LeakDetector> {
        self.detector.as_ref()
    }

    /// Held cookies by site and name.
    pub fn cookies(&self) -> &[HeldCookie] {
        &self.cookies
    }

    /// The credential sites.
    pub fn sites(&self) -> &[String] {
        &self.sites
    }

    /// Whether `host` (a host name or a cookie domain such as `.bank.test`) belongs to a
    /// credential site.
    pub fn is_credential_host(&self, host: &str) -> bool {
        let host = host.trim_start_matches('.');
        let site = crate::vault::jar::site_of(host);
        self.sites.contains(&site)
    }

    /// Whether a cookie named `name` for `domain` (as CDP reports it, e.g. `.bank.test` or
    /// `www.bank.test`) is held.
    pub fn is_held_cookie(&self, domain: &str, name: &str) -> bool {
        let site = crate::vault::jar::site_of(domain.trim_start_matches('.'));
        self.cookies
            .iter()
            .any(|c| c.site == site && c.name == name)
    }

    /// The directory downloads and file uploads are confined to.
    pub fn files_dir(&self) -> &str {
        &self.files_dir
    }
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("secrets", &self.detector.is_some())
            .field("cookies", &self.cookies.len())
            .field("sites", &self.sites)
            .finish()
    }
}

/// The current [`Held`] of a session, swapped by the broker, read by the router.
pub struct HeldCell(RwLock<Arc<Held>>);

impl HeldCell {
    /// A cell holding `held`.
    pub fn new(held: Held) -> HeldCell {
        HeldCell(RwLock::new(Arc::new(held)))
    }

    /// The current view.
    pub fn get(&self) -> Arc<Held> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the view; messages routed afterwards see the new one.
    pub fn set(&self, held: Held) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(held);
    }
}

impl fmt::Debug for HeldCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.get().fmt(f)
    }
}
