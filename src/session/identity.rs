//! Agent identity (AG-374 4.2): operator-issued agent keys and pinned client certificates,
//! checked on every request to a session's agent endpoint.
//!
//! A key is `chak_` and 32 random bytes (base64url). The supervisor keeps only its SHA-256,
//! under an id `ak_` + 8 hex digits that mandates name (`identity.agent_key`). The key itself
//! is shown once, when it is issued. Revoking a key ends every session bound to it.

use std::collections::BTreeMap;
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::mandate::AgentIdentity;

/// Longest label an operator may give a key.
const MAX_LABEL: usize = 128;
/// Most keys one supervisor keeps (revoked ones included).
const MAX_KEYS: usize = 10_000;

/// What the supervisor knows of one agent key (never the key).
#[derive(Clone, Debug, Serialize)]
pub struct KeyInfo {
    /// `ak_…`, the name mandates use.
    pub id: String,
    /// The operator's label.
    pub label: String,
    /// When it was issued (RFC 3339).
    pub created_at: String,
    /// When it was revoked, if it was.
    pub revoked_at: Option<String>,
}

struct Stored {
    info: KeyInfo,
    digest: [u8; 32],
}

/// Why an agent key operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// A bad label.
    #[error("label: must be 1 to {MAX_LABEL} characters without control characters")]
    Label,
    /// No key with that id.
    #[error("no agent key with id `{0}`")]
    NotFound(String),
    /// The store is full.
    #[error("agent keys: {MAX_KEYS} keys are kept already; revoke and restart, or use fewer keys")]
    Full,
}

/// The supervisor's agent keys, in memory (they die with the process, like its sessions).
#[derive(Default)]
pub struct AgentKeys {
    keys: Mutex<BTreeMap<String, Stored>>,
}

impl AgentKeys {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Stored>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issues a key; returns what is kept and the key itself (shown this once).
    pub fn issue(&self, label: &str) -> Result<(KeyInfo, String), KeyError> {
        let label = label.trim();
        if label.is_empty() || label.len() > MAX_LABEL || label.chars().any(char::is_control) {
            return Err(KeyError::Label);
        }
        let mut raw = [0u8; 32];
        rand::fill(&mut raw[..]);
        let key = format!("chak_{}", URL_SAFE_NO_PAD.encode(raw));
        let mut keys = self.lock();
        if keys.len() >= MAX_KEYS {
            return Err(KeyError::Full);
        }
        let id = loop {
            let id = format!("ak_{}", super::random_hex(4));
            if !keys.contains_key(&id) {
                break id;
            }
        };
        let info = KeyInfo {
            id: id.clone(),
            label: label.to_string(),
            created_at: super::rfc3339(OffsetDateTime::now_utc()),
            revoked_at: None,
        };
        keys.insert(
            id,
            Stored {
                info: info.clone(),
                digest: Sha256::digest(key.as_bytes()).into(),
            },
        );
        Ok((info, key))
    }

    /// Every key, oldest id first.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.lock().values().map(|s| s.info.clone()).collect()
    }

    /// One key.
    pub fn get(&self, id: &str) -> Option<KeyInfo> {
        self.lock().get(id).map(|s| s.info.clone())
    }

    /// Marks a key revoked; it stops working at once. Revoking twice keeps the first time.
    pub fn revoke(&self, id: &str) -> Result<KeyInfo, KeyError> {
        let mut keys = self.lock();
        let s = keys
            .get_mut(id)
            .ok_or_else(|| KeyError::NotFound(id.to_string()))?;
        if s.info.revoked_at.is_none() {
            s.info.revoked_at = Some(super::rfc3339(OffsetDateTime::now_utc()));
        }
        Ok(s.info.clone())
    }

    /// Whether the key `id` exists and is not revoked.
    pub fn usable(&self, id: &str) -> Result<(), Refusal> {
        match self.lock().get(id) {
            None => Err(Refusal::AgentKeyUnknown),
            Some(s) if s.info.revoked_at.is_some() => Err(Refusal::AgentKeyRevoked),
            Some(_) => Ok(()),
        }
    }

    fn matches(&self, id: &str, presented: &str) -> Result<(), Refusal> {
        let keys = self.lock();
        let s = keys.get(id).ok_or(Refusal::AgentKeyUnknown)?;
        let given: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Digests of equal length compared without an early exit.
        let same = s
            .digest
            .iter()
            .zip(given.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if !same {
            return Err(Refusal::AgentKeyWrong);
        }
        if s.info.revoked_at.is_some() {
            return Err(Refusal::AgentKeyRevoked);
        }
        Ok(())
    }
}

/// What a connection presented.
#[derive(Clone, Debug, Default)]
pub struct Presented {
    /// The agent key from `Authorization: Bearer` or the `agent_key` query parameter.
    pub agent_key: Option<String>,
    /// SHA-256 (hex) of the verified client certificate, on mutual TLS.
    pub cert_sha256: Option<String>,
}

/// Why a connection's identity was refused; [`Refusal::code`] is the audit `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The session is bound to a key and none was sent.
    #[error("this session is bound to an agent key: send `Authorization: Bearer chak_…` (or the agent_key query parameter)")]
    AgentKeyMissing,
    /// The key sent is not the session's.
    #[error("the agent key is not the one this session is bound to")]
    AgentKeyWrong,
    /// The session's key was revoked.
    #[error("the session's agent key was revoked")]
    AgentKeyRevoked,
    /// The session's key is unknown to this supervisor.
    #[error("the session's agent key is unknown to this supervisor")]
    AgentKeyUnknown,
    /// The session pins client certificates and the connection presented none.
    #[error("this session needs a client certificate (mutual TLS) and none was presented")]
    ClientCertificateMissing,
    /// The client certificate is not one the session pins.
    #[error("the client certificate is not one this session accepts")]
    ClientCertificateMismatch,
}

impl Refusal {
    /// The audit record's `reason`.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::AgentKeyMissing => "agent_key_missing",
            Refusal::AgentKeyWrong => "agent_key_wrong",
            Refusal::AgentKeyRevoked => "agent_key_revoked",
            Refusal::AgentKeyUnknown => "agent_key_unknown",
            Refusal::ClientCertificateMissing => "client_certificate_missing",
            Refusal::ClientCertificateMismatch => "client_certificate_mismatch",
        }
    }
}

/// The identity a connection proved, as tickets bind it: the key id and the certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proven {
    /// The session's key id, when it is bound to one.
    pub agent_key: Option<String>,
    /// The certificate presented, when the session pins certificates.
    pub cert_sha256: Option<String>,
}

impl Proven {
    /// The text a ticket's identity fingerprint is computed from. `any_cert` stands for an
    /// operator-issued ticket, which is good for any certificate the session pins.
    pub fn binding(&self, any_cert: bool) -> String {
        let cert = if any_cert {
            "*"
        } else {
            self.cert_sha256.as_deref().unwrap_or("-")
        };
        format!(
            "key:{}|cert:{cert}",
            self.agent_key.as_deref().unwrap_or("-")
        )
    }
}

/// Checks what a connection presented against the session's identity. A session without
/// one proves nothing (the capability alone admits).
pub fn check(
    identity: Option<&AgentIdentity>,
    presented: &Presented,
    keys: &AgentKeys,
) -> Result<Proven, Refusal> {
    let Some(id) = identity else {
        return Ok(Proven {
            agent_key: None,
            cert_sha256: None,
        });
    };
    if let Some(kid) = &id.agent_key {
        let given = presented
            .agent_key
            .as_deref()
            .ok_or(Refusal::AgentKeyMissing)?;
        keys.matches(kid, given)?;
    }
    let cert = if id.client_cert_sha256.is_empty() {
        None
    } else {
        let given = presented
            .cert_sha256
            .as_deref()
            .ok_or(Refusal::ClientCertificateMissing)?;
        if !id.client_cert_sha256.iter().any(|p| p == given) {
            return Err(Refusal::ClientCertificateMismatch);
        }
        Some(given.to_string())
    };
    Ok(Proven {
        agent_key: id.agent_key.clone(),
        cert_sha256: cert,
    })
}

/// The fields every audit record of a bound session carries.
pub fn audit_tag(identity: &AgentIdentity) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("identity".into(), serde_json::json!(identity));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(key: Option<&str>, pins: &[&str]) -> AgentIdentity {
        AgentIdentity {
            agent_key: key.map(str::to_string),
            client_cert_sha256: pins.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn keys_are_shown_once_and_checked_by_digest() {
        let keys = AgentKeys::default();
        let (info, key) = keys.issue("build agent").unwrap();
        assert!(key.starts_with("chak_") && key.len() > 40);
        assert!(info.id.starts_with("ak_") && info.id.len() == 11);
        assert!(!format!("{:?}", keys.list()).contains(&key));
        let id = bound(Some(&info.id), &[]);
        let ok = Presented {
            agent_key: Some(key.clone()),
            cert_sha256: None,
        };
        assert_eq!(
            check(Some(&id), &ok, &keys).unwrap().agent_key.as_deref(),
            Some(info.id.as_str())
        );
        let wrong = Presented {
            agent_key: Some(format!("{key}x")),
            cert_sha256: None,
        };
        assert_eq!(check(Some(&id), &wrong, &keys), Err(Refusal::AgentKeyWrong));
        assert_eq!(
            check(Some(&id), &Presented::default(), &keys),
            Err(Refusal::AgentKeyMissing)
        );
        keys.revoke(&info.id).unwrap();
        assert_eq!(check(Some(&id), &ok, &keys), Err(Refusal::AgentKeyRevoked));
        assert_eq!(keys.usable(&info.id), Err(Refusal::AgentKeyRevoked));
        assert_eq!(keys.usable("ak_00000000"), Err(Refusal::AgentKeyUnknown));
        assert_eq!(keys.issue(" ").err(), Some(KeyError::Label));
    }

    #[test]
    fn certificates_must_be_pinned_and_both_parts_must_match() {
        let keys = AgentKeys::default();
        let (info, key) = keys.issue("a").unwrap();
        let pin = "ab".repeat(32);
        let id = bound(Some(&info.id), &[&pin]);
        let both = Presented {
            agent_key: Some(key.clone()),
            cert_sha256: Some(pin.clone()),
        };
        let p = check(Some(&id), &both, &keys).unwrap();
        assert_eq!(p.cert_sha256.as_deref(), Some(pin.as_str()));
        assert_ne!(p.binding(false), p.binding(true));
        let no_cert = Presented {
            cert_sha256: None,
            ..both.clone()
        };
        assert_eq!(
            check(Some(&id), &no_cert, &keys),
            Err(Refusal::ClientCertificateMissing)
        );
        let other = Presented {
            cert_sha256: Some("cd".repeat(32)),
            ..both.clone()
        };
        assert_eq!(
            check(Some(&id), &other, &keys),
            Err(Refusal::ClientCertificateMismatch)
        );
        let key_only = Presented {
            agent_key: None,
            ..both
        };
        assert_eq!(
            check(Some(&id), &key_only, &keys),
            Err(Refusal::AgentKeyMissing)
        );
        assert!(check(None, &Presented::default(), &keys).is_ok());
    }
}
