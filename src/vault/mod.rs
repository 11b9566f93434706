//! Secret material held for a session. Values are zeroized when dropped and never printed:
//! `Debug` and `Display` show a keyed fingerprint, which is also how the audit log names a
//! token (AG-120 4.6: token identifiers, not token values).
//!
//! Built so far: the secret type, its fingerprint, and the per-site cookie jar ([`jar`]). The
//! broker that fills and uses the jars comes next.

pub mod jar;

use std::fmt;

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
