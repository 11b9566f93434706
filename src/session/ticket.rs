//! Resume tickets (AG-374 4.2, 4.6, 4.8): what a dropped agent presents to re-attach to its
//! detached session.
//!
//! A ticket is `chpr1.<payload>.<mac>`, both parts unpadded base64url. The payload is compact
//! JSON naming the session, the agent identity it was issued to (as a keyed fingerprint),
//! this supervisor instance, the agent connection that asked, a per-session sequence number,
//! a random nonce, and its issue and hard-expiry times. The MAC is HMAC-SHA256 under a key
//! that lives only in this supervisor process, so a ticket is worthless to any other
//! instance and any change to it is detected. Single use is enforced by the session's
//! [`TicketBook`], not by the ticket.

use std::collections::VecDeque;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const PREFIX: &str = "chpr1.";
const MAC_CONTEXT: &[u8] = b"chaperone resume ticket v1\n";
/// Tickets issued but not yet used, per session; an older one is superseded by a newer.
const MAX_OUTSTANDING: usize = 4;
/// A ticket longer than this is refused before it is decoded.
pub const MAX_TICKET_LEN: usize = 1024;

/// What a ticket says. Everything in it is checked against the supervisor's own registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Session id.
    pub sid: String,
    /// Fingerprint of the agent identity it was issued to (`none` without an identity).
    pub idf: String,
    /// The issuing supervisor instance.
    pub ins: String,
    /// The agent connection that asked for it (`None` when an operator did).
    pub lnk: Option<u64>,
    /// Per-session sequence number (freshness).
    pub seq: u64,
    /// Random nonce, hex (freshness).
    pub non: String,
    /// Issue time, unix seconds.
    pub iat: i64,
    /// Hard expiry, unix seconds: the session's own deadline.
    pub exp: i64,
}

/// Why a ticket was refused; [`Refusal::code`] is the audit record's `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a ticket, or its MAC does not match its payload.
    #[error("the ticket is malformed or was altered")]
    Tampered,
    /// Issued by another supervisor instance.
    #[error("the ticket was issued by another supervisor instance")]
    ForeignInstance,
    /// Issued for another session.
    #[error("the ticket was issued for another session")]
    ForeignSession,
    /// Issued to another agent identity.
    #[error("the ticket was issued to another agent identity")]
    ForeignIdentity,
    /// Past its validity.
    #[error("the ticket has expired")]
    Expired,
    /// Already used.
    #[error("the ticket was already used")]
    Replayed,
    /// A newer ticket was issued (or used) after it.
    #[error("a newer ticket replaced this one")]
    Superseded,
}

impl Refusal {
    /// The audit record's `reason`.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Tampered => "tampered",
            Refusal::ForeignInstance => "foreign_instance",
            Refusal::ForeignSession => "foreign_session",
            Refusal::ForeignIdentity => "foreign_identity",
            Refusal::Expired => "expired",
            Refusal::Replayed => "replayed",
            Refusal::Superseded => "superseded",
        }
    }
}

/// The supervisor's ticket key and instance id, random per process.
pub struct TicketKey {
    key: SecretBox<[u8; 32]>,
    instance: String,
}

impl TicketKey {
    /// A fresh key and instance id.
    pub fn random() -> Self {
        let mut key = Box::new([0u8; 32]);
        rand::fill(&mut key[..]);
        TicketKey {
            key: SecretBox::new(key),
            instance: super::random_hex(16),
        }
    }

    /// This supervisor instance's id (in `supervisor.started` and in every ticket).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn mac(&self) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.key.expose_secret())
            .expect("HMAC takes any key length");
        m.update(MAC_CONTEXT);
        m
    }

    /// The ticket text for `claims`.
    pub fn seal(&self, claims: &Claims) -> String {
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let mut mac = self.mac();
        mac.update(&payload);
        let tag = mac.finalize().into_bytes();
        format!(
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Decodes and authenticates a ticket. Only checks what the ticket alone can show (form,
    /// instance, MAC); the caller checks it against the session.
    pub fn open(&self, ticket: &str) -> Result<Claims, Refusal> {
        if ticket.len() > MAX_TICKET_LEN {
            return Err(Refusal::Tampered);
        }
        let rest = ticket.strip_prefix(PREFIX).ok_or(Refusal::Tampered)?;
        let (payload, tag) = rest.split_once('.').ok_or(Refusal::Tampered)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| Refusal::Tampered)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| Refusal::Tampered)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| Refusal::Tampered)?;
        // Another instance's key is unknown here, so its MAC cannot verify either way; the
        // instance is read first only to give the refusal its precise name.
        if claims.ins != self.instance {
            return Err(Refusal::ForeignInstance);
        }
        let mut mac = self.mac();
        mac.update(&payload);
        mac.verify_slice(&tag).map_err(|_| Refusal::Tampered)?;
        Ok(claims)
    }
}

/// A short, non-reversible name for a ticket in audit records (the ticket itself is a
/// bearer credential and is never logged).
pub fn fingerprint(ticket: &str) -> String {
    hex::encode(&Sha256::digest(ticket.as_bytes())[..8])
}

/// One issued, unused ticket.
#[derive(Clone, Debug)]
struct Outstanding {
    seq: u64,
    nonce: String,
    iat: i64,
    via: &'static str,
    /// The agent connection it was issued to.
    link: Option<u64>,
}

/// What the book knew of a consumed ticket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumed {
    /// Its sequence number.
    pub seq: u64,
    /// Its issue time, unix seconds.
    pub iat: i64,
    /// `cdp` or `control`.
    pub via: &'static str,
}

/// A session's tickets: which are outstanding, which was used last. Each ticket works once;
/// using one also retires every older one.
#[derive(Debug, Default)]
pub struct TicketBook {
    next_seq: u64,
    last_consumed: u64,
    outstanding: VecDeque<Outstanding>,
}

impl TicketBook {
    /// Registers a new ticket for agent connection `link` (`None`: an operator's) and returns
    /// its sequence number and nonce. The connection's older tickets stop working: an agent
    /// holds one good ticket at a time, so a copy of an older one (say, from a log) is dead.
    pub fn issue(&mut self, iat: i64, via: &'static str, link: Option<u64>) -> (u64, String) {
        self.next_seq += 1;
        let nonce = super::random_hex(16);
        if link.is_some() {
            self.outstanding.retain(|t| t.link != link);
        }
        if self.outstanding.len() == MAX_OUTSTANDING {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back(Outstanding {
            seq: self.next_seq,
            nonce: nonce.clone(),
            iat,
            via,
            link,
        });
        (self.next_seq, nonce)
    }

    /// Whether `claims` names a ticket that may be used now, without using it.
    pub fn check(&self, claims: &Claims) -> Result<Consumed, Refusal> {
        if claims.seq <= self.last_consumed {
            return Err(if self.consumed_exactly(claims.seq) {
                Refusal::Replayed
            } else {
                Refusal::Superseded
            });
        }
        let t = self
            .outstanding
            .iter()
            .find(|t| t.seq == claims.seq)
            .ok_or(if claims.seq <= self.next_seq {
                Refusal::Superseded
            } else {
                // A sequence number never issued, under a valid MAC: the key is not ours.
                Refusal::Tampered
            })?;
        if t.nonce != claims.non {
            return Err(Refusal::Tampered);
        }
        Ok(Consumed {
            seq: t.seq,
            iat: t.iat,
            via: t.via,
        })
    }

    fn consumed_exactly(&self, seq: u64) -> bool {
        seq == self.last_consumed
    }

    /// Uses the ticket: it and every older one stop working.
    pub fn consume(&mut self, claims: &Claims) -> Result<Consumed, Refusal> {
        let c = self.check(claims)?;
        self.last_consumed = c.seq;
        self.outstanding.retain(|t| t.seq > c.seq);
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(book: &mut TicketBook, key: &TicketKey) -> Claims {
        let (seq, non) = book.issue(100, "control", None);
        Claims {
            sid: "s1".into(),
            idf: "none".into(),
            ins: key.instance().into(),
            lnk: Some(1),
            seq,
            non,
            iat: 100,
            exp: 1000,
        }
    }

    #[test]
    fn a_sealed_ticket_opens_with_its_own_key_only() {
        let key = TicketKey::random();
        let mut book = TicketBook::default();
        let c = claims(&mut book, &key);
        let t = key.seal(&c);
        assert!(t.starts_with("chpr1."));
        assert_eq!(key.open(&t).unwrap(), c);
        let other = TicketKey::random();
        assert_eq!(other.open(&t), Err(Refusal::ForeignInstance));
        // The same instance id under another key (a forged instance field) fails the MAC.
        let forged = TicketKey {
            key: SecretBox::new(Box::new([7u8; 32])),
            instance: key.instance().to_string(),
        };
        assert_eq!(forged.open(&t), Err(Refusal::Tampered));
    }

    #[test]
    fn any_change_to_a_ticket_is_detected() {
        let key = TicketKey::random();
        let mut book = TicketBook::default();
        let c = claims(&mut book, &key);
        let t = key.seal(&c);
        let (head, tag) = t.rsplit_once('.').unwrap();
        // A payload with a changed field and the original MAC.
        for changed in [
            Claims {
                seq: c.seq + 1,
                ..c.clone()
            },
            Claims {
                sid: "s2".into(),
                ..c.clone()
            },
            Claims {
                exp: i64::MAX,
                ..c.clone()
            },
        ] {
            let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&changed).unwrap());
            let bad = format!("chpr1.{payload}.{tag}");
            assert_eq!(key.open(&bad), Err(Refusal::Tampered), "{changed:?}");
        }
        for bad in [
            format!("{head}.{}", &tag[..tag.len() - 2]),
            format!("{head}.x{tag}"),
            "chpr1.".into(),
            "garbage".into(),
            t.replacen("chpr1", "chpr2", 1),
            format!("{t}{}", "A".repeat(MAX_TICKET_LEN)),
        ] {
            assert_eq!(key.open(&bad), Err(Refusal::Tampered), "{bad}");
        }
        // An extra member in the payload (client-supplied state) is refused, even MAC'd.
        let mut v = serde_json::to_value(&c).unwrap();
        v["mandate"] = serde_json::json!({"egress": {"allow": ["*"]}});
        let payload = serde_json::to_vec(&v).unwrap();
        let mut mac = key.mac();
        mac.update(&payload);
        let t2 = format!(
            "chpr1.{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(key.open(&t2), Err(Refusal::Tampered));
    }

    #[test]
    fn a_ticket_works_once_and_retires_older_ones() {
        let key = TicketKey::random();
        let mut book = TicketBook::default();
        let old = claims(&mut book, &key);
        let new = claims(&mut book, &key);
        assert!(book.check(&new).is_ok());
        assert_eq!(book.consume(&new).unwrap().seq, 2);
        assert_eq!(book.consume(&new), Err(Refusal::Replayed));
        assert_eq!(book.consume(&old), Err(Refusal::Superseded));
        let wrong_nonce = Claims {
            non: "00".into(),
            ..claims(&mut book, &key)
        };
        assert_eq!(book.consume(&wrong_nonce), Err(Refusal::Tampered));
        let never = Claims {
            seq: 99,
            ..new.clone()
        };
        assert_eq!(book.check(&never), Err(Refusal::Tampered));
    }

    #[test]
    fn a_connections_new_ticket_retires_its_older_one() {
        let key = TicketKey::random();
        let mut book = TicketBook::default();
        let for_link = |book: &mut TicketBook, link| {
            let (seq, non) = book.issue(100, "cdp", Some(link));
            Claims {
                lnk: Some(link),
                seq,
                non,
                ..claims(&mut TicketBook::default(), &key)
            }
        };
        let old = for_link(&mut book, 7);
        let other = for_link(&mut book, 8);
        let new = for_link(&mut book, 7);
        assert_eq!(book.check(&old), Err(Refusal::Superseded));
        assert!(book.check(&other).is_ok());
        assert!(book.check(&new).is_ok());
    }

    #[test]
    fn only_the_newest_tickets_stay_outstanding() {
        let key = TicketKey::random();
        let mut book = TicketBook::default();
        let first = claims(&mut book, &key);
        let rest: Vec<_> = (0..MAX_OUTSTANDING)
            .map(|_| claims(&mut book, &key))
            .collect();
        assert_eq!(book.check(&first), Err(Refusal::Superseded));
        assert!(rest.iter().all(|c| book.check(c).is_ok()));
    }
}
