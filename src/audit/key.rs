//! The operator's audit key. With it, a record's `hash` is HMAC-SHA256 under the key instead
//! of a plain SHA-256, so someone who can write the log but does not hold the key cannot
//! recompute the chain after editing it.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Shortest key accepted: HMAC-SHA256 is only as strong as its key, and 32 bytes match the
/// hash's own size.
pub const MIN_KEY_BYTES: usize = 32;

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be opened or read.
    #[error("audit key file {path}: cannot read it: {source}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Others than its owner may read or change the key, so it proves nothing.
    #[error("audit key file {path} is accessible by group or others (mode {mode:03o}); run `chmod 600 {path}`", path = .path.display())]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Too little key material.
    #[error("audit key file {path} holds {len} bytes; it needs at least {MIN_KEY_BYTES} bytes of random key material (e.g. `head -c 32 /dev/urandom > {path}`)", path = .path.display())]
    Short {
        /// The key file.
        path: PathBuf,
        /// How many bytes it holds.
        len: usize,
    },
}

/// Key material for a keyed chain. `Debug` shows only the key id.
pub struct AuditKey {
    material: Zeroizing<Vec<u8>>,
    id: String,
}

impl AuditKey {
    /// Reads a key file: its bytes, verbatim, are the key. The file must be readable by its
    /// owner only and hold at least [`MIN_KEY_BYTES`] bytes.
    pub fn load(path: &Path) -> Result<AuditKey, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        // The mode of the file actually opened, not of whatever the path names a moment later.
        let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut material = Zeroizing::new(Vec::new());
        file.read_to_end(&mut material).map_err(read_err)?;
        if material.len() < MIN_KEY_BYTES {
            return Err(KeyError::Short {
                path: path.to_path_buf(),
                len: material.len(),
            });
        }
        Ok(AuditKey::new(material))
    }

    /// A key from bytes already in memory; `None` when shorter than [`MIN_KEY_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Option<AuditKey> {
        (bytes.len() >= MIN_KEY_BYTES).then(|| AuditKey::new(Zeroizing::new(bytes.to_vec())))
    }

    fn new(material: Zeroizing<Vec<u8>>) -> AuditKey {
        let id = hex::encode(&Sha256::digest(material.as_slice())[..8]);
        AuditKey { material, id }
    }

    /// Names the key without revealing it: the first 16 hex digits of its SHA-256. Every keyed
    /// record carries it as `key_id`, so a verifier can tell which key a log needs.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.material)
            .expect("HMAC accepts keys of any length")
    }

    /// HMAC-SHA256 of `body`, hex.
    pub(crate) fn tag(&self, body: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `tag_hex` is the HMAC of `body`, compared in constant time.
    pub(crate) fn check(&self, body: &[u8], tag_hex: &str) -> bool {
        let Ok(tag) = hex::decode(tag_hex) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_slice(&tag).is_ok()
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey").field("id", &self.id).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_file(dir: &Path, bytes: &[u8], mode: u32) -> PathBuf {
        let p = dir.join("audit.key");
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_private_key_file_loads_and_is_named_not_shown() {
        let dir = tempfile::tempdir().unwrap();
        let k = AuditKey::load(&key_file(dir.path(), &[7u8; 32], 0o600)).unwrap();
        assert_eq!(k.id().len(), 16);
        assert_eq!(k.id(), AuditKey::from_bytes(&[7u8; 32]).unwrap().id());
        assert!(!format!("{k:?}").contains("0707"), "{k:?}");
        let t = k.tag(b"body");
        assert!(k.check(b"body", &t));
        assert!(!k.check(b"bodY", &t));
        assert!(!k.check(b"body", "not hex"));
        let other = AuditKey::from_bytes(&[8u8; 32]).unwrap();
        assert!(!other.check(b"body", &t));
    }

    #[test]
    fn readable_by_others_or_short_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o620] {
            let p = key_file(dir.path(), &[7u8; 32], mode);
            let e = AuditKey::load(&p).unwrap_err().to_string();
            assert!(
                e.contains(&p.display().to_string()) && e.contains("chmod 600"),
                "{e}"
            );
        }
        let p = key_file(dir.path(), &[7u8; 31], 0o600);
        let e = AuditKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("31 bytes") && e.contains("at least 32"), "{e}");
        assert!(AuditKey::from_bytes(&[1u8; 31]).is_none());
        let e = AuditKey::load(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing") && e.contains("cannot read"), "{e}");
    }
}
