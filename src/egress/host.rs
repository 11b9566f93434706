//! Host names, IP literals and the allow-list patterns that match them.
//!
//! One parser serves both the mandate (patterns written by an operator) and the proxy (hosts
//! written by the browser, or by whatever runs inside it), so both sides agree on what a host is.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The longest host name DNS can carry (RFC 1035, without the trailing dot).
const MAX_NAME_LEN: usize = 253;
/// The longest single DNS label.
const MAX_LABEL_LEN: usize = 63;

/// Why a host or a host pattern was rejected. The text names the input and what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Nothing was given.
    #[error("the host is empty")]
    Empty,
    /// `*.` with nothing after it.
    #[error("`*.` needs a domain after it")]
    WildcardNeedsDomain,
    /// A `*` anywhere but alone or as a leading `*.`.
    #[error("`{0}`: `*` is only allowed alone or as a leading `*.` (e.g. `*.example.com`)")]
    MisplacedWildcard(String),
    /// `host:port` where only a host belongs.
    #[error("`{0}`: a port is not allowed here, give the host alone")]
    PortNotAllowed(String),
    /// A URL (scheme or path) where only a host belongs.
    #[error("`{0}`: give a host name, not a URL")]
    NotAHostButUrl(String),
    /// A name that breaks DNS syntax.
    #[error("`{input}` is not a host name: {why}")]
    NotAHostName {
        /// The text as given.
        input: String,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// A name ending in a number that is not a dotted-quad IPv4 address. Browsers and
    /// `getaddrinfo` read such names (`2130706433`, `0x7f.1`) as IPv4 addresses, so accepting
    /// them as names would let an address slip past a name-based check.
    #[error("`{0}` ends in a number but is not an IPv4 address in dotted-quad form (`a.b.c.d`)")]
    NumericName(String),
    /// Brackets that do not hold an IPv6 address.
    #[error("`{0}` is not an IPv6 address in brackets (e.g. `[2001:db8::1]`)")]
    BadIpv6(String),
}

/// A host as a request names it: a DNS name (lowercase, no trailing dot) or an IP address.
///
/// IPv4-mapped IPv6 addresses (`[::ffff:10.0.0.1]`) are stored as the IPv4 address they carry,
/// so that one destination has one spelling.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lowercase ASCII (punycode for international names), no trailing dot.
    Name(String),
    /// An IP literal.
    Ip(IpAddr),
}

impl Host {
    /// Parses and normalises a host: `Example.COM.` → `example.com`, `[::1]` → `::1`,
    /// `10.0.0.1` → an IPv4 address. A port, a URL, a wildcard or a malformed name is an error.
    pub fn parse(input: &str) -> Result<Host, HostError> {
        if input.is_empty() {
            return Err(HostError::Empty);
        }
        if input.contains("://") || input.contains('/') {
            return Err(HostError::NotAHostButUrl(input.to_owned()));
        }
        if input.contains('*') {
            return Err(HostError::MisplacedWildcard(input.to_owned()));
        }
        if let Some(inner) = input.strip_prefix('[') {
            let Some((addr, rest)) = inner.split_once(']') else {
                return Err(HostError::BadIpv6(input.to_owned()));
            };
            if !rest.is_empty() {
                return Err(if rest.starts_with(':') {
                    HostError::PortNotAllowed(input.to_owned())
                } else {
                    HostError::BadIpv6(input.to_owned())
                });
            }
            return addr
                .parse::<Ipv6Addr>()
                .map(|a| Host::Ip(IpAddr::V6(a).to_canonical()))
                .map_err(|_| HostError::BadIpv6(input.to_owned()));
        }
        match input.matches(':').count() {
            0 => {}
            1 => return Err(HostError::PortNotAllowed(input.to_owned())),
            // Several colons can only be a bare IPv6 address.
            _ => {
                return input
                    .parse::<Ipv6Addr>()
                    .map(|a| Host::Ip(IpAddr::V6(a).to_canonical()))
                    .map_err(|_| HostError::BadIpv6(input.to_owned()));
            }
        }
        if let Ok(v4) = input.parse::<Ipv4Addr>() {
            return Ok(Host::Ip(IpAddr::V4(v4)));
        }
        parse_name(input).map(Host::Name)
    }

    /// The name, if this is a DNS name.
    pub fn name(&self) -> Option<&str> {
        match self {
            Host::Name(n) => Some(n),
            Host::Ip(_) => None,
        }
    }
}

impl fmt::Display for Host {
    /// The form used in URLs and `host:port`: IPv6 in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(a)) => write!(f, "{a}"),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
        }
    }
}

impl FromStr for Host {
    type Err = HostError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Host::parse(s)
    }
}

/// Checks DNS syntax and returns the normalised (lowercase, no trailing dot) name.
fn parse_name(input: &str) -> Result<String, HostError> {
    let bad = |why| HostError::NotAHostName {
        input: input.to_owned(),
        why,
    };
    if !input.is_ascii() {
        return Err(bad(
            "it has non-ASCII characters; use the punycode (`xn--`) form",
        ));
    }
    let name = input
        .strip_suffix('.')
        .unwrap_or(input)
        .to_ascii_lowercase();
    if name.is_empty() {
        return Err(bad("it has no labels"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("it is longer than 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad(
                "it has an empty label (`..`, or a leading or doubled dot)",
            ));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(bad("a label is longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad("only letters, digits, `-`, `_` and `.` are allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label starts or ends with `-`"));
        }
    }
    if ends_in_number(&name) {
        return Err(HostError::NumericName(input.to_owned()));
    }
    Ok(name)
}

/// The WHATWG URL "ends in a number" test: such hosts are IPv4 addresses to a browser, and
/// `inet_aton`-style parsers accept them too.
fn ends_in_number(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    match last.strip_prefix("0x") {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

/// One entry of a mandate's `egress.allow` list.
///
/// - `example.com`: exactly that host;
/// - `*.example.com`: any subdomain at any depth (`a.example.com`, `a.b.example.com`), not
///   `example.com` itself;
/// - `*`: any host, IP literals included (private addresses are still filtered separately);
/// - `10.1.2.3`, `[::1]` (or `::1`): exactly that IP literal, as written in the URL.
///
/// Names are compared lowercase without a trailing dot. The pattern never matches by resolved
/// address: a name pattern does not allow the IP literal the name resolves to, and vice versa.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPattern(Pattern);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Pattern {
    Any,
    Exact(Host),
    /// The parent domain; matches names strictly below it.
    Subdomains(String),
}

impl HostPattern {
    /// Parses an allow-list entry; the error says what is wrong with it.
    pub fn parse(input: &str) -> Result<HostPattern, HostError> {
        if input == "*" {
            return Ok(HostPattern(Pattern::Any));
        }
        if let Some(domain) = input.strip_prefix("*.") {
            if domain.is_empty() || domain == "." {
                return Err(HostError::WildcardNeedsDomain);
            }
            return match Host::parse(domain) {
                Ok(Host::Name(d)) => Ok(HostPattern(Pattern::Subdomains(d))),
                // `*.10.0.0.1` reads as a wildcard over an address, which means nothing.
                Ok(Host::Ip(_)) => Err(HostError::MisplacedWildcard(input.to_owned())),
                Err(HostError::MisplacedWildcard(_)) => {
                    Err(HostError::MisplacedWildcard(input.to_owned()))
                }
                Err(e) => Err(e),
            };
        }
        Host::parse(input).map(|h| HostPattern(Pattern::Exact(h)))
    }

    /// Whether a (normalised) host is allowed by this pattern.
    pub fn matches(&self, host: &Host) -> bool {
        match (&self.0, host) {
            (Pattern::Any, _) => true,
            (Pattern::Exact(p), h) => p == h,
            (Pattern::Subdomains(parent), Host::Name(name)) => name
                .strip_suffix(parent.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            (Pattern::Subdomains(_), Host::Ip(_)) => false,
        }
    }

    /// Whether every host `other` matches, this pattern matches too; a mandate change that
    /// only swaps patterns for covered ones narrows the allow list.
    pub fn covers(&self, other: &HostPattern) -> bool {
        match (&self.0, &other.0) {
            (Pattern::Any, _) => true,
            (_, Pattern::Any) => false,
            (_, Pattern::Exact(h)) => self.matches(h),
            (Pattern::Exact(_), Pattern::Subdomains(_)) => false,
            (Pattern::Subdomains(p), Pattern::Subdomains(o)) => {
                o == p || self.matches(&Host::Name(o.clone()))
            }
        }
    }
}

impl fmt::Display for HostPattern {
    /// The canonical spelling, which parses back to the same pattern.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(h) => write!(f, "{h}"),
            Pattern::Subdomains(d) => write!(f, "*.{d}"),
        }
    }
}

impl FromStr for HostPattern {
    type Err = HostError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostPattern::parse(s)
    }
}

impl TryFrom<String> for HostPattern {
    type Error = HostError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        HostPattern::parse(&s)
    }
}

impl From<HostPattern> for String {
    fn from(p: HostPattern) -> String {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        Host::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn pat(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn host_normalises_case_trailing_dot_and_ip_forms() {
        assert_eq!(host("Example.COM."), Host::Name("example.com".into()));
        assert_eq!(host("a-b_c.example"), Host::Name("a-b_c.example".into()));
        assert_eq!(host("10.1.2.3"), Host::Ip("10.1.2.3".parse().unwrap()));
        assert_eq!(host("[::1]"), Host::Ip("::1".parse().unwrap()));
        assert_eq!(host("::1"), Host::Ip("::1".parse().unwrap()));
        assert_eq!(
            host("[::ffff:10.0.0.1]"),
            Host::Ip("10.0.0.1".parse().unwrap()),
            "a mapped address is the IPv4 address it carries"
        );
        assert_eq!(host("[2001:DB8::1]").to_string(), "[2001:db8::1]");
        assert_eq!(
            host("xn--bcher-kva.example").to_string(),
            "xn--bcher-kva.example"
        );
    }

    #[test]
    fn numeric_names_that_browsers_read_as_addresses_are_refused() {
        for s in [
            "2130706433",
            "0x7f.1",
            "127.1",
            "1.2.3.4.5",
            "017.0.0.1",
            "example.0x10",
            "example.123",
        ] {
            assert!(
                matches!(Host::parse(s), Err(HostError::NumericName(_))),
                "{s}: {:?}",
                Host::parse(s)
            );
        }
        // A number inside a name is fine, only the last label matters.
        assert_eq!(host("123.example"), Host::Name("123.example".into()));
        assert_eq!(host("0xcafe.example"), Host::Name("0xcafe.example".into()));
        assert_eq!(host("example.0xz"), Host::Name("example.0xz".into()));
    }

    #[test]
    fn valid_patterns_parse_and_round_trip() {
        for (input, canonical) in [
            ("example.com", "example.com"),
            ("Example.COM.", "example.com"),
            ("*.example.com", "*.example.com"),
            ("*.Example.com.", "*.example.com"),
            ("*", "*"),
            ("10.1.2.3", "10.1.2.3"),
            ("[::1]", "[::1]"),
            ("::1", "[::1]"),
            ("*.com", "*.com"),
        ] {
            let p = pat(input);
            assert_eq!(p.to_string(), canonical, "{input}");
            assert_eq!(pat(canonical), p, "{input} round trip");
        }
    }

    #[test]
    fn invalid_patterns_say_what_is_wrong() {
        for (input, message) in [
            ("", "the host is empty"),
            ("*.", "`*.` needs a domain after it"),
            ("*..", "`*.` needs a domain after it"),
            (
                "ex ample.com",
                "`ex ample.com` is not a host name: only letters, digits, `-`, `_` and `.` are allowed",
            ),
            ("example.com:443", "`example.com:443`: a port is not allowed here, give the host alone"),
            ("[::1]:443", "`[::1]:443`: a port is not allowed here, give the host alone"),
            ("10.0.0.1:80", "`10.0.0.1:80`: a port is not allowed here, give the host alone"),
            ("https://example.com", "`https://example.com`: give a host name, not a URL"),
            ("example.com/path", "`example.com/path`: give a host name, not a URL"),
            (
                "a.*.example.com",
                "`a.*.example.com`: `*` is only allowed alone or as a leading `*.` (e.g. `*.example.com`)",
            ),
            (
                "*example.com",
                "`*example.com`: `*` is only allowed alone or as a leading `*.` (e.g. `*.example.com`)",
            ),
            (
                "*.*.example.com",
                "`*.*.example.com`: `*` is only allowed alone or as a leading `*.` (e.g. `*.example.com`)",
            ),
            (
                "*.10.0.0.1",
                "`*.10.0.0.1`: `*` is only allowed alone or as a leading `*.` (e.g. `*.example.com`)",
            ),
            (
                "a..example.com",
                "`a..example.com` is not a host name: it has an empty label (`..`, or a leading or doubled dot)",
            ),
            (
                ".example.com",
                "`.example.com` is not a host name: it has an empty label (`..`, or a leading or doubled dot)",
            ),
            (
                "-a.example.com",
                "`-a.example.com` is not a host name: a label starts or ends with `-`",
            ),
            (
                "bücher.example",
                "`bücher.example` is not a host name: it has non-ASCII characters; use the punycode (`xn--`) form",
            ),
            ("[::1", "`[::1` is not an IPv6 address in brackets (e.g. `[2001:db8::1]`)"),
            ("[10.0.0.1]", "`[10.0.0.1]` is not an IPv6 address in brackets (e.g. `[2001:db8::1]`)"),
            (
                "[fe80::1%eth0]",
                "`[fe80::1%eth0]` is not an IPv6 address in brackets (e.g. `[2001:db8::1]`)",
            ),
            (
                "2130706433",
                "`2130706433` ends in a number but is not an IPv4 address in dotted-quad form (`a.b.c.d`)",
            ),
        ] {
            match HostPattern::parse(input) {
                Ok(p) => panic!("`{input}` parsed as {p}"),
                Err(e) => assert_eq!(e.to_string(), message, "{input}"),
            }
        }
        let long_label = format!("{}.example", "a".repeat(64));
        assert!(HostPattern::parse(&long_label).is_err());
        let long_name = ["abcdefghi"; 26].join(".");
        assert!(long_name.len() > 253);
        assert!(HostPattern::parse(&long_name).is_err());
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let p = pat("*.example.com");
        assert!(p.matches(&host("a.example.com")));
        assert!(p.matches(&host("a.b.example.com")));
        assert!(p.matches(&host("A.Example.COM.")));
        assert!(!p.matches(&host("example.com")), "not the apex");
        assert!(!p.matches(&host("badexample.com")));
        assert!(!p.matches(&host("example.com.evil")));
        assert!(!p.matches(&host("aexample.com")));
        assert!(!p.matches(&host("10.0.0.1")));
    }

    #[test]
    fn exact_matches_only_that_host() {
        let p = pat("example.com");
        assert!(p.matches(&host("example.com")));
        assert!(p.matches(&host("EXAMPLE.com.")));
        assert!(!p.matches(&host("a.example.com")));
        assert!(!p.matches(&host("badexample.com")));
        assert!(!p.matches(&host("example.co")));

        let ip = pat("10.1.2.3");
        assert!(ip.matches(&host("10.1.2.3")));
        assert!(ip.matches(&host("[::ffff:10.1.2.3]")));
        assert!(!ip.matches(&host("10.1.2.4")));
        assert!(!pat("example.com").matches(&host("10.1.2.3")));

        let v6 = pat("[::1]");
        assert!(v6.matches(&host("[0:0::1]")));
        assert!(!v6.matches(&host("127.0.0.1")));
    }

    #[test]
    fn star_matches_everything() {
        let p = pat("*");
        for h in ["example.com", "a.b.c", "10.0.0.1", "[::1]"] {
            assert!(p.matches(&host(h)), "{h}");
        }
    }

    #[test]
    fn patterns_deserialize_from_strings() {
        #[derive(serde::Deserialize, serde::Serialize)]
        struct Allow {
            allow: Vec<HostPattern>,
        }
        let a: Allow = serde_json::from_str(r#"{"allow":["*.Example.com","10.0.0.1"]}"#).unwrap();
        assert_eq!(a.allow, vec![pat("*.example.com"), pat("10.0.0.1")]);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"allow":["*.example.com","10.0.0.1"]}"#
        );
        let err = serde_json::from_str::<Allow>(r#"{"allow":["*."]}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("`*.` needs a domain after it"), "{err}");
    }

    #[test]
    fn covers_tells_a_narrower_pattern() {
        let p = |s: &str| HostPattern::parse(s).unwrap();
        assert!(p("*").covers(&p("*.example.com")));
        assert!(p("*.example.com").covers(&p("a.example.com")));
        assert!(p("*.example.com").covers(&p("*.a.example.com")));
        assert!(p("*.example.com").covers(&p("*.example.com")));
        assert!(p("a.example.com").covers(&p("a.example.com")));
        assert!(!p("*.example.com").covers(&p("example.com")));
        assert!(!p("*.example.com").covers(&p("*")));
        assert!(!p("a.example.com").covers(&p("*.a.example.com")));
        assert!(!p("*.a.example.com").covers(&p("*.example.com")));
        assert!(!p("example.com").covers(&p("other.com")));
    }
}
