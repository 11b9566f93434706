//! How chaperone starts Chromium: the command line, the managed policy, and the minimal
//! filesystem the sandbox gives it.
//!
//! Chromium's own background traffic is silenced twice: by flags (some of which point the
//! updater and sign-in at an address that goes nowhere) and by machine-wide managed policy
//! written into the sandbox's private `/etc`. Whatever slips through still meets the egress
//! proxy, which refuses hosts the mandate does not list.

use std::path::{Path, PathBuf};

use serde_json::json;

/// Where the profile lives inside the sandbox (a tmpfs: it dies with the session).
pub const PROFILE_DIR: &str = "/home/chaperone";
/// Where downloads land inside the sandbox (a tmpfs too).
pub const DOWNLOAD_DIR: &str = "/home/chaperone/Downloads";
/// The proxy port inside the sandbox's network namespace.
pub const PROXY_PORT: u16 = 3128;
/// The uid/gid Chromium runs as inside its user namespace.
pub const INNER_ID: u32 = 1000;

/// Chromium's command line. Never contains flags that switch Chromium's own sandbox off.
pub fn args() -> Vec<String> {
    let mut a: Vec<String> = [
        "--headless",
        "--remote-debugging-pipe",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-breakpad",
        "--disable-crash-reporter",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--disable-quic",
        "--password-store=basic",
        "--use-mock-keychain",
        "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
        // Measured on this machine: without these, an idle browser still talks to the
        // updater, the time service and sign-in through the proxy.
        "--disable-features=NetworkTimeServiceQuerying,MediaRouter,OptimizationHints,Translate,AutofillServerCommunication,CertificateTransparencyComponentUpdater",
        "--component-updater=url-source=http://127.0.0.1:1",
        "--gaia-url=http://127.0.0.1:1",
        // Loopback too goes through the proxy: the browser has no other way out anyway, and
        // the proxy is where policy is enforced.
        "--proxy-bypass-list=<-loopback>",
    ]
    .map(String::from)
    .to_vec();
    a.push(format!("--proxy-server=http://127.0.0.1:{PROXY_PORT}"));
    a.push(format!("--user-data-dir={PROFILE_DIR}/profile"));
    a
}

/// The same flags for a Chromium outside chaperone, the baseline benchmarks and tests compare
/// against: no proxy (it reaches `127.0.0.1` directly, names mapped by `--host-resolver-rules`)
/// and no profile directory (the caller gives one, with `--user-data-dir`).
pub fn direct_args() -> Vec<String> {
    args()
        .into_iter()
        .filter(|a| {
            !a.starts_with("--user-data-dir=")
                && !a.starts_with("--proxy-server=")
                && !a.starts_with("--proxy-bypass-list=")
        })
        .chain(std::iter::once("--no-proxy-server".to_string()))
        .collect()
}

/// The environment Chromium starts with (nothing is inherited from the supervisor).
pub fn env() -> Vec<(String, String)> {
    [
        ("HOME", PROFILE_DIR.to_string()),
        ("TMPDIR", PROFILE_DIR.to_string()),
        ("PATH", "/usr/bin:/bin".to_string()),
        ("LANG", "C.UTF-8".to_string()),
        ("FONTCONFIG_PATH", "/etc/fonts".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Machine-wide managed policy, written to the sandbox's own `/etc/chromium`.
///
/// `credential_sites` (registrable domains) get their cookies blocked: the browser stores no
/// cookie for them, from any response or script, in any browser context, so a session cookie a
/// credential site sets can only live in the supervisor's vault (measured on Chromium 156:
/// `Set-Cookie` is not stored, `document.cookie` stays empty, script writes are ignored, and a
/// `Cookie` header the broker adds still reaches the site). The cost: storage APIs
/// (localStorage, IndexedDB) throw on those sites.
pub fn managed_policy(credential_sites: &[String]) -> serde_json::Value {
    let blocked: Vec<String> = credential_sites
        .iter()
        .map(|s| format!("[*.]{s}"))
        .collect();
    json!({
        "CookiesBlockedForUrls": blocked,
        "BackgroundModeEnabled": false,
        "MetricsReportingEnabled": false,
        "UrlKeyedAnonymizedDataCollectionEnabled": false,
        "SafeBrowsingProtectionLevel": 0,
        "SearchSuggestEnabled": false,
        "SyncDisabled": true,
        "BrowserSignin": 0,
        "PasswordManagerEnabled": false,
        "AutofillAddressEnabled": false,
        "AutofillCreditCardEnabled": false,
        "TranslateEnabled": false,
        "SpellcheckEnabled": false,
        "AlternateErrorPagesEnabled": false,
        "NetworkPredictionOptions": 2,
        "ComponentUpdatesEnabled": false,
        "DnsOverHttpsMode": "off",
        "BuiltInDnsClientEnabled": false,
        "QuicAllowed": false,
        "WebRtcIPHandling": "disable_non_proxied_udp",
        "DefaultBrowserSettingEnabled": false,
        "PromotionsEnabled": false,
        // Debian's Chromium preconnects to its default search engine at start.
        "DefaultSearchProviderEnabled": false,
    })
}

/// Host paths bound read-only into the sandbox. Everything else of the host is absent.
pub fn ro_binds(chromium: &Path) -> Vec<PathBuf> {
    // The fontconfig cache saves every session from rebuilding it.
    let mut v: Vec<PathBuf> = [
        "/usr",
        "/etc/fonts",
        "/etc/ld.so.cache",
        "/etc/localtime",
        "/var/cache/fontconfig",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.exists())
    .collect();
    // A Chromium outside /usr (a custom build) needs its own directory too.
    if !chromium.starts_with("/usr") {
        if let Some(dir) = chromium.parent() {
            v.push(dir.to_path_buf());
        }
    }
    v
}

/// Debian is usr-merged: these top-level names are links into /usr.
pub fn symlinks() -> Vec<(PathBuf, PathBuf)> {
    ["bin", "sbin", "lib", "lib64"]
        .iter()
        .filter(|n| Path::new("/").join(n).exists())
        .map(|n| (Path::new("/").join(n), PathBuf::from(format!("usr/{n}"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chromium_sandbox_is_never_switched_off() {
        for a in args() {
            for bad in [
                "--no-sandbox",
                "--no-zygote",
                "--single-process",
                "--remote-debugging-port",
            ] {
                assert!(!a.starts_with(bad), "{a}");
            }
        }
        assert!(args().iter().any(|a| a == "--remote-debugging-pipe"));
        let direct = direct_args();
        assert!(direct.iter().any(|a| a == "--no-proxy-server"));
        assert!(!direct
            .iter()
            .any(|a| a.starts_with("--proxy-server=") || a.starts_with("--user-data-dir=")));
    }

    #[test]
    fn policy_is_an_object() {
        assert!(managed_policy(&[])
            .as_object()
            .is_some_and(|m| m.len() > 10));
    }
}
