//! Destination ports: 80 and 443 always, others only when the mandate lists them.
//!
//! A browser can be pointed at any port of an allowed host (`http://allowed.example:25/`), and
//! many services speak something close enough to HTTP to be abused that way, so the set of
//! ports is as much part of the policy as the set of hosts.

use std::fmt;
use std::ops::RangeInclusive;

/// Ports every session may reach on an allowed host: http and https.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

/// Why an `egress.ports` entry was refused. The text says what to write instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// A number outside 1–65535.
    #[error("`{0}` is not a port; ports are 1 to 65535")]
    OutOfRange(String),
    /// Text that is neither a number nor `first-last`.
    #[error("`{0}` is not a port or a range; write a number such as 8443 or a range such as \"1024-65535\"")]
    Malformed(String),
    /// `first-last` with `first` above `last`.
    #[error("`{0}`: the range ends before it starts; write the lower port first")]
    Backwards(String),
}

/// One `egress.ports` entry as written: a port (`8443`) or an inclusive range
/// (`"1024-65535"`); a single port may also be written as a string (`"8443"`). Kept as given so
/// the mandate serializes back the way the operator wrote it; [`PortSpec::range`] checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// A number, unchecked.
    Number(i64),
    /// A string, unchecked.
    Text(String),
}

impl PortSpec {
    /// The ports this entry stands for.
    pub fn range(&self) -> Result<PortRange, PortError> {
        match self {
            PortSpec::Number(n) => port(*n).map(|p| PortRange { first: p, last: p }),
            PortSpec::Text(t) => PortRange::parse(t),
        }
    }
}

fn port(n: i64) -> Result<u16, PortError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| PortError::OutOfRange(n.to_string()))
}

impl serde::Serialize for PortSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PortSpec::Number(n) => s.serialize_i64(*n),
            PortSpec::Text(t) => s.serialize_str(t),
        }
    }
}

impl<'de> serde::Deserialize<'de> for PortSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number such as 8443 or a range such as \"1024-65535\"")
            }
            fn visit_i64<E>(self, v: i64) -> Result<PortSpec, E> {
                Ok(PortSpec::Number(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<PortSpec, E> {
                // Beyond i64 it is out of range all the same.
                Ok(PortSpec::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E>(self, v: &str) -> Result<PortSpec, E> {
                Ok(PortSpec::Text(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// An inclusive range of ports, `first..=last`; a single port has `first == last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// One port.
    pub fn single(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// Parses `8443` or `1024-65535` (spaces around the numbers are allowed).
    pub fn parse(text: &str) -> Result<PortRange, PortError> {
        let number = |s: &str| {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(PortError::Malformed(text.to_owned()));
            }
            s.parse::<i64>()
                .map_err(|_| PortError::OutOfRange(s.to_owned()))
                .and_then(port)
        };
        match text.split_once('-') {
            None => number(text).map(PortRange::single),
            Some((a, b)) => {
                let (first, last) = (number(a)?, number(b)?);
                if first > last {
                    return Err(PortError::Backwards(text.to_owned()));
                }
                Ok(PortRange { first, last })
            }
        }
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// The range as a standard range.
    pub fn as_range(&self) -> RangeInclusive<u16> {
        self.first..=self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Whether `port` is one every session may reach or one the listed ranges open.
pub fn port_allowed(listed: &[PortRange], port: u16) -> bool {
    DEFAULT_PORTS.contains(&port) || listed.iter().any(|r| r.contains(port))
}

/// Whether every port `wider` would refuse, `narrower` refuses too: a change from `wider` to
/// `narrower` opens no port.
pub fn ports_within(narrower: &[PortRange], wider: &[PortRange]) -> bool {
    // Each listed range must sit inside the defaults and `wider`'s ranges taken together.
    // Ranges are few: walk each one, jumping over whatever covers the current port.
    narrower.iter().all(|r| {
        let mut p = u32::from(r.first);
        while p <= u32::from(r.last) {
            let Ok(port) = u16::try_from(p) else {
                return true;
            };
            if DEFAULT_PORTS.contains(&port) {
                p += 1;
                continue;
            }
            match wider
                .iter()
                .filter(|w| w.contains(port))
                .map(|w| w.last)
                .max()
            {
                Some(end) => p = u32::from(end) + 1,
                None => return false,
            }
        }
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> PortRange {
        PortRange::parse(s).unwrap()
    }

    #[test]
    fn entries_parse_from_numbers_and_strings() {
        #[derive(serde::Deserialize, serde::Serialize)]
        struct P {
            ports: Vec<PortSpec>,
        }
        let p: P = serde_json::from_str(r#"{"ports":[8443,"1024-65535"," 9000 - 9001 ","8080"]}"#)
            .unwrap();
        let ranges: Vec<PortRange> = p.ports.iter().map(|s| s.range().unwrap()).collect();
        assert_eq!(
            ranges,
            vec![
                PortRange::single(8443),
                r("1024-65535"),
                r("9000-9001"),
                PortRange::single(8080)
            ]
        );
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"ports":[8443,"1024-65535"," 9000 - 9001 ","8080"]}"#,
            "entries serialize back as written"
        );
        let t: P = toml::from_str("ports = [8443, \"1024-2047\"]").unwrap();
        assert_eq!(t.ports[1].range().unwrap(), r("1024-2047"));
        let err = serde_json::from_str::<P>(r#"{"ports":[true]}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("a port number such as 8443"), "{err}");
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        for (spec, message) in [
            (PortSpec::Number(0), "`0` is not a port; ports are 1 to 65535"),
            (PortSpec::Number(65536), "`65536` is not a port; ports are 1 to 65535"),
            (PortSpec::Number(-1), "`-1` is not a port; ports are 1 to 65535"),
            (
                PortSpec::Text("http".into()),
                "`http` is not a port or a range; write a number such as 8443 or a range such as \"1024-65535\"",
            ),
            (
                PortSpec::Text("1024-".into()),
                "`1024-` is not a port or a range; write a number such as 8443 or a range such as \"1024-65535\"",
            ),
            (
                PortSpec::Text("+80".into()),
                "`+80` is not a port or a range; write a number such as 8443 or a range such as \"1024-65535\"",
            ),
            (
                PortSpec::Text("2000-1000".into()),
                "`2000-1000`: the range ends before it starts; write the lower port first",
            ),
            (PortSpec::Text("0-80".into()), "`0` is not a port; ports are 1 to 65535"),
        ] {
            assert_eq!(spec.range().unwrap_err().to_string(), message, "{spec:?}");
        }
    }

    #[test]
    fn only_80_443_and_listed_ports_are_allowed() {
        assert!(port_allowed(&[], 80));
        assert!(port_allowed(&[], 443));
        for p in [1, 22, 25, 81, 442, 444, 8080, 8443, 65535] {
            assert!(!port_allowed(&[], p), "{p}");
        }
        let listed = [PortRange::single(8443), r("9000-9002")];
        assert!(port_allowed(&listed, 8443));
        assert!(port_allowed(&listed, 9000) && port_allowed(&listed, 9002));
        assert!(!port_allowed(&listed, 9003));
        assert!(!port_allowed(&listed, 8444));
    }

    #[test]
    fn within_tells_a_narrower_port_list() {
        let wide = [r("1024-65535")];
        assert!(ports_within(&[], &wide));
        assert!(ports_within(&[r("8443")], &wide));
        assert!(
            ports_within(&[r("80"), r("443")], &[]),
            "the defaults open nothing new"
        );
        assert!(ports_within(
            &[r("2000-3000")],
            &[r("1000-2500"), r("2501-4000")]
        ));
        assert!(ports_within(&[r("65535")], &wide));
        assert!(!ports_within(&[r("22")], &wide));
        assert!(!ports_within(
            &[r("2000-3000")],
            &[r("1000-2500"), r("2502-4000")]
        ));
        assert!(!ports_within(&[r("8443")], &[]));
        assert!(ports_within(&[r("79-81")], &[r("79"), r("81")]));
    }
}
