//! Host names, IP literals and the allow-list patterns that match them.
//!
//! One parser serves both the mandate (patterns written by an operator) and the proxy (hosts
//! written by the browser, or by whatever runs inside it), so both sides agree on what a host is.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
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
    /// A name ending in a number that is not a valid IPv4 address. Browsers read a host whose
    /// last label is a number as an IPv4 address (`2130706433`, `0x7f.1`, `127.1`); those that
    /// parse as one are taken as that address, those that do not (`1.2.3.4.5`,
    /// `example.123`) are refused, as a browser refuses them.
    #[error("`{0}` ends in a number, so it is read as an IPv4 address, but it is not a valid one")]
    NumericName(String),
    /// An international name that IDNA (UTS #46) processing refuses: bad punycode, a
    /// disallowed character, a label that breaks the bidi or joiner rules.
    #[error("`{input}` is not a valid international domain name: {why}")]
    BadIdn {
        /// The text as given.
        input: String,
        /// What IDNA processing objected to.
        why: String,
    },
    /// A label that mixes scripts (Latin with Cyrillic, Greek with Latin, …), the stuff of
    /// look-alike names. Latin may go with Han, Hiragana, Katakana, Hangul or Bopomofo.
    #[error("`{input}`: the label `{label}` mixes scripts; a label must be written in one script (Latin may go with Chinese, Japanese or Korean)")]
    MixedScript {
        /// The text as given.
        input: String,
        /// The offending label, in Unicode.
        label: String,
    },
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
    /// Parses and normalises a host the way a browser's URL parser reads it (WHATWG URL host
    /// parsing, which Chromium follows), then checks DNS syntax:
    /// - case and one trailing dot: `Example.COM.` → `example.com`;
    /// - international names (IDNA, UTS #46): `Bücher.example` → `xn--bcher-kva.example`;
    ///   invalid punycode and labels that mix scripts are refused;
    /// - IPv6 in brackets: `[::1]` → `::1`; IPv4-mapped `[::ffff:7f00:1]` → `127.0.0.1`;
    /// - IPv4 in any form a browser accepts: `2130706433`, `0x7f.0.0.1`, `0177.0.0.1`,
    ///   `127.1` → `127.0.0.1`; names ending in a number that is not an address are refused;
    /// - percent-encoding is decoded first (`127%2e0.0.1` is `127.0.0.1`).
    ///
    /// Encoded IPv4 literals become the address they mean rather than being refused: that
    /// address is where a browser, `inet_aton` or `getaddrinfo` would connect, so allow, deny
    /// and the private-range filter all judge the destination the connection would really
    /// have, and a client talking to the proxy directly gets exactly the browser's reading.
    /// An allow entry `127.0.0.1` therefore also allows `http://2130706433/`, and nothing
    /// else can reach 127.0.0.1 by spelling it differently.
    ///
    /// A port, a URL, a wildcard or a malformed name is an error.
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
        parse_name_or_ipv4(input)
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

/// The WHATWG host parser for anything that is not an IPv6 literal, followed by DNS syntax
/// and script checks on the name it yields.
fn parse_name_or_ipv4(input: &str) -> Result<Host, HostError> {
    let bad = |why| HostError::NotAHostName {
        input: input.to_owned(),
        why,
    };
    // One trailing dot names the DNS root and changes nothing; the URL parser would keep it.
    let trimmed = input.strip_suffix('.').unwrap_or(input);
    if trimmed.is_empty() {
        return Err(bad("it has no labels"));
    }
    if trimmed.ends_with('.') {
        // The URL parser would drop this dot too before reading an address (`127.0.0.1..`).
        return Err(bad(
            "it has an empty label (`..`, or a leading or doubled dot)",
        ));
    }
    let ascii = match url::Host::parse(trimmed) {
        Ok(url::Host::Ipv4(a)) => return Ok(Host::Ip(IpAddr::V4(a))),
        // Only reachable through brackets, which were handled before; kept total anyway.
        Ok(url::Host::Ipv6(a)) => return Ok(Host::Ip(IpAddr::V6(a).to_canonical())),
        Ok(url::Host::Domain(d)) => d,
        Err(url::ParseError::InvalidIpv4Address) => {
            return Err(HostError::NumericName(input.to_owned()))
        }
        Err(url::ParseError::EmptyHost) => return Err(bad("it has no labels")),
        Err(e) => {
            // Say which rule an ASCII name broke; IDNA's own verdict for the rest.
            if trimmed.is_ascii() {
                if !trimmed.bytes().all(is_name_byte_or_percent) {
                    return Err(bad("only letters, digits, `-`, `_` and `.` are allowed"));
                }
                if trimmed.split('.').any(str::is_empty) {
                    return Err(bad(
                        "it has an empty label (`..`, or a leading or doubled dot)",
                    ));
                }
            }
            return Err(HostError::BadIdn {
                input: input.to_owned(),
                why: idn_why(e),
            });
        }
    };
    check_name_syntax(&ascii).map_err(bad)?;
    check_scripts(input, &ascii)?;
    Ok(Host::Name(ascii))
}

fn is_name_byte_or_percent(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'%')
}

fn idn_why(e: url::ParseError) -> String {
    match e {
        url::ParseError::IdnaError => {
            "IDNA processing refused it (bad punycode in an `xn--` label, or a character names \
             may not hold)"
                .to_owned()
        }
        other => other.to_string(),
    }
}

/// DNS syntax of a name the URL parser produced (lowercase ASCII, punycode).
fn check_name_syntax(name: &str) -> Result<(), &'static str> {
    if name.len() > MAX_NAME_LEN {
        return Err("it is longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (`..`, or a leading or doubled dot)");
        }
        if label.len() > MAX_LABEL_LEN {
            return Err("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("only letters, digits, `-`, `_` and `.` are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with `-`");
        }
    }
    Ok(())
}

/// Refuses names with a label that mixes scripts (UTS #39 "highly restrictive"): every
/// character of a label, ignoring those common to all scripts (digits, `-`), must belong to
/// one script, or the label must keep to Latin with Han and Hiragana/Katakana (Japanese),
/// Hangul (Korean) or Bopomofo (Chinese). Allow and deny lists are compared on the punycode,
/// so a look-alike never matches an entry it imitates; this keeps such names out of mandates
/// and off the wire altogether.
fn check_scripts(input: &str, ascii: &str) -> Result<(), HostError> {
    if !ascii.split('.').any(|l| l.starts_with("xn--")) {
        return Ok(());
    }
    let unicode = url::quirks::domain_to_unicode(ascii);
    for label in unicode.split('.').filter(|l| !l.is_ascii()) {
        if !single_script(label) {
            return Err(HostError::MixedScript {
                input: input.to_owned(),
                label: label.to_owned(),
            });
        }
    }
    Ok(())
}

fn single_script(label: &str) -> bool {
    use icu_properties::props::Script;
    use icu_properties::script::ScriptWithExtensions;
    const COMBINATIONS: &[&[Script]] = &[
        &[
            Script::Latin,
            Script::Han,
            Script::Hiragana,
            Script::Katakana,
        ],
        &[Script::Latin, Script::Han, Script::Hangul],
        &[Script::Latin, Script::Han, Script::Bopomofo],
    ];
    let swe = ScriptWithExtensions::new();
    // Each character's script extensions; characters of every script count for none.
    let sets: Vec<Vec<Script>> = label
        .chars()
        .map(|c| swe.get_script_extensions_val(c).iter().collect::<Vec<_>>())
        .filter(|set| {
            !set.iter()
                .all(|s| *s == Script::Common || *s == Script::Inherited)
        })
        .collect();
    let Some(first) = sets.first() else {
        return true;
    };
    let one_script = first.iter().any(|s| sets.iter().all(|set| set.contains(s)));
    one_script
        || COMBINATIONS
            .iter()
            .any(|combo| sets.iter().all(|set| set.iter().any(|s| combo.contains(s))))
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
    fn encoded_ipv4_literals_are_the_address_they_mean() {
        let loopback = Host::Ip("127.0.0.1".parse().unwrap());
        for s in [
            "2130706433",
            "0x7f000001",
            "0X7F000001",
            "0x7f.0.0.1",
            "0x7f.1",
            "0177.0.0.1",
            "0177.0.0.01",
            "017700000001",
            "127.1",
            "127.0.1",
            "127.0.0.1.",
            "127%2e0.0.1",
            "１２７．０．０．１",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "::ffff:7f00:1",
        ] {
            assert_eq!(host(s), loopback, "{s}");
        }
        assert_eq!(host("017.0.0.1"), Host::Ip("15.0.0.1".parse().unwrap()));
        assert_eq!(host("0x"), Host::Ip("0.0.0.0".parse().unwrap()));
        assert_eq!(host("0"), Host::Ip("0.0.0.0".parse().unwrap()));
        assert_eq!(host("10.1"), Host::Ip("10.0.0.1".parse().unwrap()));
        assert_eq!(
            host("4294967295"),
            Host::Ip("255.255.255.255".parse().unwrap())
        );
    }

    #[test]
    fn names_ending_in_a_number_that_is_no_address_are_refused() {
        for s in [
            "1.2.3.4.5",
            "example.123",
            "example.0x10",
            "4294967296",
            "256.0.0.1",
            "0x100000000",
            "08.0.0.1",
            "127.0.0.1..",
        ] {
            assert!(
                matches!(
                    Host::parse(s),
                    Err(HostError::NumericName(_) | HostError::NotAHostName { .. })
                ),
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
    fn international_names_become_punycode() {
        for (s, ascii) in [
            ("bücher.example", "xn--bcher-kva.example"),
            ("BÜCHER.Example.", "xn--bcher-kva.example"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
            ("bücher。example", "xn--bcher-kva.example"),
            ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
            ("日本語abc.example", "xn--abc-s08fl0dtz6h.example"),
            ("한국.example", "xn--3e0b707e.example"),
            ("пример.испытание", "xn--e1afmkfd.xn--80akhbyknj4f"),
            ("ﬁle.example", "file.example"),
        ] {
            assert_eq!(host(s), Host::Name(ascii.into()), "{s}");
        }
    }

    #[test]
    fn invalid_and_mixed_script_international_names_are_refused() {
        for s in [
            "xn--",
            "xn--a.example",
            "xn--abc.example",
            "xn--abc-.example",
            "xn--bcher-kva.xn--",
            // A zero-width joiner outside the context that allows it.
            "a\u{200d}b.example",
            // A right-to-left override.
            "\u{202e}abc.example",
            "%00.example",
        ] {
            let got = Host::parse(s);
            assert!(matches!(got, Err(HostError::BadIdn { .. })), "{s}: {got:?}");
        }
        for s in [
            // Latin `p`, `y`, `p`, `l` with Cyrillic `а` (U+0430).
            "p\u{430}ypal.example",
            // The same, as a browser sends it.
            "xn--pypal-4ve.example",
            // Greek omicron in a Latin word.
            "g\u{3bf}ogle.example",
            // Cyrillic with Greek.
            "\u{43f}\u{3b1}.example",
        ] {
            let got = Host::parse(s);
            assert!(
                matches!(got, Err(HostError::MixedScript { .. })),
                "{s}: {got:?}"
            );
        }
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
            ("*.Bücher.example", "*.xn--bcher-kva.example"),
            ("bücher.example.", "xn--bcher-kva.example"),
            ("2130706433", "127.0.0.1"),
            ("[::ffff:7f00:1]", "127.0.0.1"),
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
                "p\u{430}ypal.example",
                "`p\u{430}ypal.example`: the label `p\u{430}ypal` mixes scripts; a label must be written in one script (Latin may go with Chinese, Japanese or Korean)",
            ),
            ("[::1", "`[::1` is not an IPv6 address in brackets (e.g. `[2001:db8::1]`)"),
            ("[10.0.0.1]", "`[10.0.0.1]` is not an IPv6 address in brackets (e.g. `[2001:db8::1]`)"),
            (
                "[fe80::1%eth0]",
                "`[fe80::1%eth0]` is not an IPv6 address in brackets (e.g. `[2001:db8::1]`)",
            ),
            (
                "1.2.3.4.5",
                "`1.2.3.4.5` ends in a number, so it is read as an IPv4 address, but it is not a valid one",
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
