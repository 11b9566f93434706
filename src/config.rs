//! The supervisor's own configuration (`chaperone serve --config FILE`, TOML).
//!
//! Every field has a safe default, so `chaperone serve` with no file runs on the embedded
//! default. Unknown fields are rejected and errors name the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the control API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlAddr {
    /// A Unix socket (mode 0600: only the supervisor's user may use it).
    Unix(PathBuf),
    /// TCP; every request must carry the operator token.
    Tcp(SocketAddr),
}

impl std::str::FromStr for ControlAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("`unix:` needs a socket path after it".into());
            }
            return Ok(ControlAddr::Unix(PathBuf::from(p)));
        }
        s.parse::<SocketAddr>().map(ControlAddr::Tcp).map_err(|_| {
            format!("`{s}` is neither unix:PATH nor an address such as 127.0.0.1:9230")
        })
    }
}

impl std::fmt::Display for ControlAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ControlAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

impl Serialize for ControlAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ControlAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `chaperone serve` configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Agent CDP endpoint. Default `127.0.0.1:9222` (loopback only).
    pub listen: SocketAddr,
    /// Host name put into `cdp_url`/`http_url` instead of the listen address (e.g. when agents
    /// reach the supervisor by a DNS name). It is also accepted in the `Host` header.
    pub public_host: Option<String>,
    /// Control API. Default: a Unix socket under the runtime directory.
    pub control: ControlAddr,
    /// File holding the operator token; required when `control` is TCP.
    pub control_token_file: Option<PathBuf>,
    /// The audit log (JSON Lines, hash-chained).
    pub audit_log: PathBuf,
    /// Keying and rotation of the audit log.
    pub audit: AuditConfig,
    /// Serve the agent endpoint over TLS (`wss://`) with this certificate chain and key (PEM).
    pub tls: Option<TlsConfig>,
    /// Browser settings.
    pub browser: BrowserConfig,
    /// Sandbox settings.
    pub sandbox: SandboxConfig,
    /// Limits on what operators may ask for.
    pub limits: LimitsConfig,
    /// Calls the supervisor itself makes upstream with held credentials (OAuth refresh,
    /// revocation at session end).
    pub upstream: UpstreamConfig,
    /// Where the registry records resumption state.
    pub registry: RegistryConfig,
    /// Told of every request held for a human's approval: a JSON `POST` (`http://` or
    /// `https://`; `[upstream]`'s CA file and timeout apply). Default: none.
    pub approval_webhook: Option<String>,
    /// Continuous integrity checks of live sessions.
    pub posture: PostureConfig,
}

/// `[posture]`: how often the supervisor re-verifies each live session (its processes'
/// namespaces, cgroups, uid, capabilities, `no_new_privs`, seccomp, executables and parent
/// chain, and its mandate under the current policy; see [`crate::session::posture`]). Always
/// on; drift revokes the session.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostureConfig {
    /// Time between two checks of a session (e.g. `"5s"`). Default 5 s; 1 s to 5 min.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for PostureConfig {
    fn default() -> Self {
        PostureConfig {
            interval: Duration::from_secs(5),
        }
    }
}

/// The bounds of `posture.interval`: below a second the scans cost CPU for nothing Chromium
/// can do faster; beyond five minutes drift would stand too long.
pub const POSTURE_INTERVAL: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(300);

/// `[registry]`: the durable record of resume tickets, detaches and resumptions.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Append every ticket issued and used, every detach and resumption to this file (JSON
    /// Lines, synced per line). A resumption whose record cannot be written is refused.
    /// Default none: memory only.
    pub journal: Option<PathBuf>,
}

/// `[upstream]`: the supervisor's own HTTPS client, which refreshes OAuth access tokens and
/// revokes credentials upstream at session end (never the browser, which never holds them).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Extra trusted roots (PEM), for private or test CAs, on top of the system's roots.
    /// Default none: the system's roots only.
    pub ca_file: Option<PathBuf>,
    /// How long one upstream call may take, connection included (e.g. `"10s"`).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            ca_file: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// `[tls]`: TLS for the agent endpoint, and whether agents must present a client certificate.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Whether the endpoint asks agents for a client certificate. Default `"none"`: it never
    /// asks. Without `client_ca`, any certificate is accepted at the handshake once the client
    /// has proven it holds the certificate's private key; which certificate may use a session
    /// is decided by the session's mandate, which pins it by SHA-256.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// PEM roots that client certificates must chain to; a certificate that does not fails the
    /// handshake. Default none: no chain is required (the mandate's pin decides). Needs
    /// `client_auth` `"optional"` or `"required"`.
    pub client_ca: Option<PathBuf>,
}

/// `tls.client_auth`: whether the agent endpoint asks for a client certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Never asks (the default).
    #[default]
    None,
    /// Asks; a client without a certificate still connects, one with a certificate must prove
    /// it holds the key.
    Optional,
    /// Asks; a client without a certificate fails the TLS handshake.
    Required,
}

impl TlsConfig {
    /// Checks the client-certificate fields and reads `client_ca`.
    fn check(&self) -> Result<(), String> {
        let Some(ca) = &self.client_ca else {
            return Ok(());
        };
        if self.client_auth == ClientAuth::None {
            return Err(format!(
                "tls.client_ca: {} is set but client certificates are not requested; set \
                 tls.client_auth = \"optional\" or \"required\", or remove client_ca",
                ca.display()
            ));
        }
        crate::tls::read_client_ca(ca)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// `[audit]`: keying and rotation of the audit log.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// A file of at least 32 random bytes, readable by its owner only. With it, records are
    /// sealed with HMAC-SHA256, so someone who can write the log but lacks the key cannot
    /// recompute the chain. Default none: plain SHA-256 (tamper-evident only against someone
    /// who cannot also recompute hashes).
    pub key_file: Option<PathBuf>,
    /// Rotate the log once it is larger than this (e.g. `"64MiB"`). Default none: never.
    pub rotate_bytes: Option<bytesize::ByteSize>,
}

/// Browser settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrowserConfig {
    /// The Chromium binary, run directly (not Debian's `/usr/bin/chromium` wrapper).
    pub path: PathBuf,
    /// How long a launch may take before the session is refused.
    #[serde(with = "humantime_serde")]
    pub launch_timeout: Duration,
    /// Pass Chromium's own stdout/stderr through to the supervisor's (for debugging; off by
    /// default because Chromium logs URLs).
    pub show_output: bool,
}

/// Sandbox settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Layers this host may lack without refusing sessions (e.g. `["cgroup"]`). Default none:
    /// a missing layer refuses every session. Sessions that run degraded say so.
    pub accept_degraded: Vec<String>,
    /// Memory limit per session (cgroup).
    pub memory_limit: bytesize::ByteSize,
    /// Process limit per session (cgroup).
    pub pids_limit: u64,
    /// When the supervisor runs as root, session N runs as host uid/gid `uid_base + N`.
    pub uid_base: u32,
    /// Size of the per-session uid range.
    pub uid_count: u32,
}

/// Limits on what operators may ask for.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Sessions alive at once; more are refused with 503.
    pub max_sessions: usize,
    /// The longest mandate accepted.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Largest mandate body accepted by the control API.
    pub max_mandate_bytes: usize,
    /// Largest websocket message accepted from an agent.
    pub max_agent_message: bytesize::ByteSize,
    /// What a dropped agent connection may keep for its resumption: the events buffered and
    /// the answers kept for replay, each (default 16 MiB). Beyond it the connection is not
    /// kept and a `continue=1` resumption is refused.
    pub resume_buffer: bytesize::ByteSize,
    /// How often the endpoint pings an agent connection (websocket Ping). A connection that
    /// sends nothing, not even a Pong, for three of these is taken as dropped by the network:
    /// the session is detached and the connection's CDP session kept for a resumption, as
    /// when the socket closes. Default 15 s; at least 1 s.
    #[serde(with = "humantime_serde")]
    pub agent_ping_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        let root = nix::unistd::geteuid().is_root();
        let runtime = if root {
            PathBuf::from("/run/chaperone")
        } else {
            std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir)
                .join("chaperone")
        };
        let state = if root {
            PathBuf::from("/var/lib/chaperone")
        } else {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".local/state/chaperone"))
                .unwrap_or_else(|| std::env::temp_dir().join("chaperone-state"))
        };
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 9222)),
            public_host: None,
            control: ControlAddr::Unix(runtime.join("control.sock")),
            control_token_file: None,
            audit_log: state.join("audit.jsonl"),
            audit: AuditConfig::default(),
            tls: None,
            browser: BrowserConfig::default(),
            sandbox: SandboxConfig::default(),
            limits: LimitsConfig::default(),
            upstream: UpstreamConfig::default(),
            registry: RegistryConfig::default(),
            approval_webhook: None,
            posture: PostureConfig::default(),
        }
    }
}

impl Default for BrowserConfig {
    fn default() -> Self {
        BrowserConfig {
            path: PathBuf::from("/usr/lib/chromium/chromium"),
            launch_timeout: Duration::from_secs(30),
            show_output: false,
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            accept_degraded: Vec::new(),
            memory_limit: bytesize::ByteSize::gib(2),
            pids_limit: 1024,
            uid_base: 1_500_000,
            uid_count: 65_536,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sessions: 16,
            max_ttl: Duration::from_secs(crate::mandate::DEFAULT_MAX_TTL_SECS),
            max_mandate_bytes: 256 * 1024,
            max_agent_message: bytesize::ByteSize::mib(16),
            resume_buffer: bytesize::ByteSize::mib(16),
            agent_ping_interval: Duration::from_secs(15),
        }
    }
}

/// A config that could not be used, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// The config file (or `config` for the built-in one).
    pub path: String,
    /// What is wrong, with the field.
    pub message: String,
}

/// The 1-based line a TOML error points at, for messages that name where the problem is.
pub(crate) fn toml_error_line(text: &str, e: &toml::de::Error) -> Option<usize> {
    e.span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Config = toml::from_str(&text).map_err(|e| {
            err(match toml_error_line(&text, &e) {
                Some(l) => format!("line {l}: {}", e.message()),
                None => e.message().to_string(),
            })
        })?;
        cfg.check().map_err(err)?;
        Ok(cfg)
    }

    /// Checks relations between fields.
    pub fn check(&self) -> Result<(), String> {
        if self.limits.agent_ping_interval < Duration::from_secs(1) {
            return Err("limits.agent_ping_interval: must be at least 1 s (e.g. \"15s\")".into());
        }
        if !POSTURE_INTERVAL.contains(&self.posture.interval) {
            return Err(format!(
                "posture.interval: must be between 1s and 5m (e.g. \"5s\"), got {}",
                humantime::format_duration(self.posture.interval)
            ));
        }
        if matches!(self.control, ControlAddr::Tcp(_)) && self.control_token_file.is_none() {
            return Err(
                "control: a TCP control API needs control_token_file (operator token)".into(),
            );
        }
        if self.limits.max_sessions == 0 {
            return Err("limits.max_sessions: must be at least 1".into());
        }
        if self.sandbox.uid_count == 0 {
            return Err("sandbox.uid_count: must be at least 1".into());
        }
        if self.audit.rotate_bytes.is_some_and(|b| b.as_u64() == 0) {
            return Err(
                "audit.rotate_bytes: must be at least 1 byte (leave it out to never rotate)".into(),
            );
        }
        if self.upstream.timeout.is_zero() {
            return Err("upstream.timeout: must be longer than 0 (e.g. \"10s\")".into());
        }
        if let Some(ca) = &self.upstream.ca_file {
            crate::broker::upstream::read_roots(ca)
                .map_err(|e| format!("upstream.ca_file: {e}"))?;
        }
        if let Some(tls) = &self.tls {
            tls.check()?;
        }
        if let Some(w) = &self.approval_webhook {
            self.webhook_url()
                .map_err(|e| format!("approval_webhook: `{w}`: {e}"))?;
        }
        Ok(())
    }

    /// `approval_webhook`, parsed: an `http` or `https` URL without credentials in it.
    pub fn webhook_url(&self) -> Result<Option<url::Url>, String> {
        let Some(w) = &self.approval_webhook else {
            return Ok(None);
        };
        let u = url::Url::parse(w).map_err(|e| e.to_string())?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err("must be an http:// or https:// URL".into());
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err(
                "must not carry a user name or password; the webhook is sent without credentials"
                    .into(),
            );
        }
        Ok(Some(u))
    }

    /// The host name agents use in URLs.
    pub fn advertised_host(&self, bound: SocketAddr) -> String {
        match &self.public_host {
            Some(h) => format!("{h}:{}", bound.port()),
            None => bound.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_and_unix_socket() {
        let c = Config::default();
        assert!(c.listen.ip().is_loopback());
        assert!(matches!(c.control, ControlAddr::Unix(_)));
        assert!(c.check().is_ok());
    }

    #[test]
    fn unknown_and_bad_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:1\"\n[sandbox]\nmemory_limt = \"1GiB\"\n",
        )
        .unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("memory_limt") && e.contains("line 3"), "{e}");
        std::fs::write(&p, "control = \"127.0.0.1:9000\"\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("control_token_file"), "{e}");
        std::fs::write(
            &p,
            "[limits]\nmax_ttl = \"2h\"\n[sandbox]\nmemory_limit = \"512MiB\"\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.limits.max_ttl, Duration::from_secs(7200));
        assert!(c.audit.key_file.is_none() && c.audit.rotate_bytes.is_none());
        assert_eq!(c.sandbox.memory_limit.as_u64(), 512 * 1024 * 1024);
    }

    #[test]
    fn audit_section_reads_key_file_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[audit]\nkey_file = \"/etc/chaperone/audit.key\"\nrotate_bytes = \"64MiB\"\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(
            c.audit.key_file.as_deref(),
            Some(Path::new("/etc/chaperone/audit.key"))
        );
        assert_eq!(c.audit.rotate_bytes.unwrap().as_u64(), 64 << 20);
        std::fs::write(&p, "[audit]\nrotate_bytes = 0\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("audit.rotate_bytes"), "{e}");
        std::fs::write(&p, "[audit]\nkey = \"x\"\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("key") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn upstream_section_reads_ca_file_and_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let c = Config::default();
        assert_eq!(c.upstream.timeout, Duration::from_secs(10));
        assert!(c.upstream.ca_file.is_none());
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        std::fs::write(
            &p,
            format!(
                "[upstream]\nca_file = \"{}\"\ntimeout = \"3s\"\n",
                ca.display()
            ),
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.upstream.timeout, Duration::from_secs(3));
        assert_eq!(c.upstream.ca_file.as_deref(), Some(ca.as_path()));
        for (text, field) in [
            ("[upstream]\ntimeout = \"0s\"\n", "upstream.timeout"),
            (
                "[upstream]\nca_file = \"/nonexistent/ca.pem\"\n",
                "upstream.ca_file",
            ),
            ("[upstream]\nca = \"x\"\n", "line 2"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = Config::load(&p).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
        std::fs::write(&ca, "not a certificate").unwrap();
        std::fs::write(&p, format!("[upstream]\nca_file = \"{}\"\n", ca.display())).unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("upstream.ca_file") && e.contains("no certificate"),
            "{e}"
        );
    }

    #[test]
    fn tls_section_reads_client_auth_and_client_ca() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let tls = "[tls]\ncert = \"/etc/c.pem\"\nkey = \"/etc/k.pem\"\n";
        std::fs::write(&p, tls).unwrap();
        let c = Config::load(&p).unwrap().tls.unwrap();
        assert_eq!((c.client_auth, c.client_ca), (ClientAuth::None, None));
        for (extra, auth) in [
            ("client_auth = \"optional\"\n", ClientAuth::Optional),
            ("client_auth = \"required\"\n", ClientAuth::Required),
        ] {
            std::fs::write(&p, format!("{tls}{extra}")).unwrap();
            assert_eq!(Config::load(&p).unwrap().tls.unwrap().client_auth, auth);
            std::fs::write(
                &p,
                format!("{tls}{extra}client_ca = \"{}\"\n", ca.display()),
            )
            .unwrap();
            let c = Config::load(&p).unwrap().tls.unwrap();
            assert_eq!(c.client_ca.as_deref(), Some(ca.as_path()));
        }
        let bad_ca = dir.path().join("bad.pem");
        std::fs::write(&bad_ca, "not a certificate").unwrap();
        for (text, wanted) in [
            // client_ca while client certificates are not asked for.
            (
                format!("{tls}client_ca = \"{}\"\n", ca.display()),
                "tls.client_ca: ",
            ),
            (
                format!(
                    "{tls}client_auth = \"none\"\nclient_ca = \"{}\"\n",
                    ca.display()
                ),
                "client_auth = \"optional\" or \"required\"",
            ),
            (
                format!(
                    "{tls}client_auth = \"required\"\nclient_ca = \"{}\"\n",
                    bad_ca.display()
                ),
                "tls.client_ca: ",
            ),
            (
                format!("{tls}client_auth = \"required\"\nclient_ca = \"/nonexistent.pem\"\n"),
                "tls.client_ca: cannot read /nonexistent.pem",
            ),
            (format!("{tls}client_auth = \"always\"\n"), "line 4"),
            (format!("{tls}client_cert = \"x\"\n"), "client_cert"),
            // Client authentication without a server certificate and key.
            ("[tls]\nclient_auth = \"required\"\n".into(), "`cert`"),
            (
                "[tls]\ncert = \"/etc/c.pem\"\nclient_auth = \"optional\"\n".into(),
                "`key`",
            ),
        ] {
            std::fs::write(&p, &text).unwrap();
            let e = Config::load(&p).unwrap_err().to_string();
            assert!(e.contains(wanted), "{text}: {e}");
        }
    }

    #[test]
    fn posture_interval_is_read_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        assert_eq!(Config::default().posture.interval, Duration::from_secs(5));
        std::fs::write(&p, "[posture]\ninterval = \"2s\"\n").unwrap();
        assert_eq!(
            Config::load(&p).unwrap().posture.interval,
            Duration::from_secs(2)
        );
        for (text, wanted) in [
            (
                "[posture]\ninterval = \"500ms\"\n",
                "posture.interval: must be between 1s and 5m",
            ),
            ("[posture]\ninterval = \"1h\"\n", "got 1h"),
            ("[posture]\ninterval = \"often\"\n", "line 2"),
            ("[posture]\nenabled = false\n", "enabled"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = Config::load(&p).unwrap_err().to_string();
            assert!(e.contains(wanted), "{text}: {e}");
        }
    }

    #[test]
    fn control_addr_parses_both_forms() {
        assert_eq!(
            "unix:/tmp/x.sock".parse::<ControlAddr>().unwrap(),
            ControlAddr::Unix("/tmp/x.sock".into())
        );
        assert!(matches!(
            "127.0.0.1:9".parse::<ControlAddr>().unwrap(),
            ControlAddr::Tcp(_)
        ));
        assert!("unix:".parse::<ControlAddr>().is_err());
        assert!("nonsense".parse::<ControlAddr>().is_err());
    }
}
