//! The audit log: append-only JSON Lines, each record chained to the one before by a hash.
//!
//! Every record carries `seq` (1, 2, 3 …), `ts` (RFC 3339, UTC), `event` (dotted, e.g.
//! `session.created`), `session` (or null), the event's own fields, `prev` (the previous
//! record's `hash`, 64 zeros for the first) and `hash` over the record's canonical JSON (keys
//! sorted, no whitespace) without `hash`. Editing, deleting or reordering any record breaks
//! the chain at that record, which `chaperone audit verify` reports.
//!
//! Without a key, `hash` is SHA-256, which anyone who can write the file can recompute. With
//! the operator's key (`[audit] key_file`), every record also carries `alg = "hmac-sha256"`
//! and `key_id` (see [`AuditKey::id`]) and `hash` is HMAC-SHA256 under the key, so an edit
//! cannot be hidden without the key. One chain never mixes the two. The names `seq`, `ts`,
//! `event`, `session`, `prev`, `hash`, `alg` and `key_id` are reserved: an event's field by
//! one of these names is overwritten.
//!
//! A record is on disk (`fsync`) before [`Audit::record`] returns, so a lifecycle step is
//! durable before the action it records is acknowledged; [`FileSink`] groups concurrent
//! records into one fsync.
//!
//! Rotation (`[audit] rotate_bytes`): once a commit leaves the file larger than that, it is
//! renamed to `<name>.<first-seq>-<last-seq>` (20 digits each, so names sort in chain order;
//! the directory is fsynced after the rename) and a new file starts with an `audit.rotated`
//! record whose `previous_file` names it, whose `prev` is its last hash and whose `seq`
//! continues. A crash can cut off the last line being written; opening the log drops that
//! line and records `audit.recovered` with `dropped_bytes`.

mod chain;
mod file;
mod key;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

pub use chain::{
    canonical, read_log, verify_file, verify_log, AuditQuery, ChainError, FileSummary, VerifyError,
    VerifySummary, ALG_HMAC, ALG_PLAIN, EVENT_RECOVERED, EVENT_ROTATED, GENESIS,
};
pub use file::{FileOptions, FileSink};
pub use key::{AuditKey, KeyError, MIN_KEY_BYTES};

/// What can go wrong writing or reading the log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log file could not be opened, written or synced.
    #[error("audit log {path}: {source}", path = .path.display())]
    Io {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The existing log does not verify; appending to it would hide the damage.
    #[error("audit log {path} is damaged, refusing to append to it: {problem} (check it with `chaperone audit verify`)", path = .path.display())]
    Damaged {
        /// The log file.
        path: PathBuf,
        /// The first bad record.
        problem: String,
    },
    /// The existing log is keyed, and no key is configured.
    #[error("audit log {path} is keyed (key_id {key_id}) but no audit.key_file is configured; set it to the key the log was written with, or move the log and its rotated files away to start a new one", path = .path.display())]
    KeyRequired {
        /// The log file.
        path: PathBuf,
        /// The key the log names.
        key_id: String,
    },
    /// A key is configured, and the existing log is not keyed.
    #[error("audit log {path} is not keyed (plain SHA-256) but audit.key_file is set, and one chain cannot mix keyed and unkeyed records; move the log and its rotated files away to start a keyed one, or remove audit.key_file", path = .path.display())]
    Unkeyed {
        /// The log file.
        path: PathBuf,
    },
    /// The existing log was keyed with another key than the configured one.
    #[error("audit log {path}: {problem}; configure the key it was written with", path = .path.display())]
    WrongKey {
        /// The log file.
        path: PathBuf,
        /// Which record, which key ids.
        problem: String,
    },
    /// The key file was refused.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// An earlier write failed, so the sink appends nothing more.
    #[error("audit log {path}: {reason}", path = .path.display())]
    Failed {
        /// The log file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The writer went away (the supervisor is shutting down).
    #[error("audit writer stopped")]
    Stopped,
    /// This sink cannot be queried.
    #[error("this audit sink cannot be queried; read the records where it sends them")]
    QueryUnsupported,
}

/// One event on its way into the log.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Dotted event name, e.g. `session.created`.
    pub event: String,
    /// The session it concerns.
    pub session: Option<String>,
    /// The event's own fields.
    pub fields: Map<String, Value>,
}

/// Told the record's `seq` once it is durable, or why it is not.
pub type Ack = Box<dyn FnOnce(Result<u64, AuditError>) + Send>;

/// Where audit records go. The embedded implementation is [`FileSink`]; a fleet would put a
/// shared sink (a SIEM, a database) behind the same trait.
pub trait AuditSink: Send + Sync + 'static {
    /// Queues `entry` behind every entry submitted before it and returns without blocking;
    /// `ack` is called once the record is durable (with its `seq`) or has failed.
    fn submit(&self, entry: Entry, ack: Ack);

    /// The records `q` selects, oldest first.
    fn query(&self, q: &AuditQuery) -> Result<Vec<Value>, AuditError> {
        let _ = q;
        Err(AuditError::QueryUnsupported)
    }
}

/// A cheap handle to the audit sink, usable from async code.
#[derive(Clone)]
pub struct Audit {
    sink: Arc<dyn AuditSink>,
    /// Fields added to every record of a session (e.g. its bound agent identity).
    tags: Arc<std::sync::RwLock<std::collections::HashMap<String, Map<String, Value>>>>,
}

fn as_fields(fields: Value) -> Map<String, Value> {
    match fields {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        other => Map::from_iter([("detail".to_string(), other)]),
    }
}

impl Audit {
    /// Wraps a sink.
    pub fn new(sink: Arc<dyn AuditSink>) -> Audit {
        Audit {
            sink,
            tags: Arc::default(),
        }
    }

    /// From now on, every record of `session` carries `fields` (a field the record sets
    /// itself wins). [`Audit::untag_session`] ends it.
    pub fn tag_session(&self, session: &str, fields: Map<String, Value>) {
        self.tags
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session.to_string(), fields);
    }

    /// Stops tagging `session`'s records.
    pub fn untag_session(&self, session: &str) {
        self.tags
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session);
    }

    fn entry(&self, event: &str, session: Option<&str>, fields: Value) -> Entry {
        let mut fields = as_fields(fields);
        if let Some(id) = session {
            let tags = self.tags.read().unwrap_or_else(|p| p.into_inner());
            for (k, v) in tags.get(id).into_iter().flatten() {
                fields.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        Entry {
            event: event.to_string(),
            session: session.map(str::to_string),
            fields,
        }
    }

    /// Opens (or creates) the file log at `path`, plain and never rotated.
    pub fn open_file(path: &Path) -> Result<Audit, AuditError> {
        Audit::open(path, FileOptions::default())
    }

    /// Opens (or creates) the file log at `path` (see [`FileSink::open_with`]).
    pub fn open(path: &Path, opts: FileOptions) -> Result<Audit, AuditError> {
        Ok(Audit::new(Arc::new(FileSink::open_with(path, opts)?)))
    }

    /// Records an event and returns once it is durable. `fields` must be a JSON object (other
    /// values are wrapped as `{"detail": …}`).
    pub async fn record(
        &self,
        event: &str,
        session: Option<&str>,
        fields: Value,
    ) -> Result<u64, AuditError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.sink.submit(
            self.entry(event, session, fields),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// Records an event from code that cannot wait (e.g. a synchronous observer). It is queued
    /// at once, so records keep the order of the calls; a failure is logged.
    pub fn record_detached(&self, event: &str, session: Option<&str>, fields: Value) {
        let name = event.to_string();
        self.sink.submit(
            self.entry(event, session, fields),
            Box::new(move |r| {
                if let Err(e) = r {
                    tracing::error!(error = %e, event = name, "audit record lost");
                }
            }),
        );
    }

    /// The records of one session (optionally only events starting with `event_prefix`),
    /// oldest first, across rotated files.
    pub async fn query(&self, q: AuditQuery) -> Result<Vec<Value>, AuditError> {
        let sink = self.sink.clone();
        tokio::task::spawn_blocking(move || sink.query(&q))
            .await
            .map_err(|_| AuditError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> Map<String, Value> {
        as_fields(v)
    }

    fn write_log(path: &Path, n: u64, opts: FileOptions) {
        let sink = FileSink::open_with(path, opts).unwrap();
        for i in 0..n {
            sink.append(
                "session.created",
                Some("s1"),
                fields(json!({"agent": "a", "n": i})),
            )
            .unwrap();
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn rewrite(path: &Path, l: &[String]) {
        std::fs::write(path, l.join("\n") + "\n").unwrap();
    }

    fn key(b: u8) -> Arc<AuditKey> {
        Arc::new(AuditKey::from_bytes(&[b; 32]).unwrap())
    }

    fn keyed(b: u8) -> FileOptions {
        FileOptions {
            key: Some(key(b)),
            rotate_bytes: None,
        }
    }

    fn chain_err(r: Result<VerifySummary, VerifyError>) -> ChainError {
        match r {
            Err(VerifyError::Chain(e)) => e,
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[test]
    fn a_written_log_verifies_and_reopens_where_it_left_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 3, FileOptions::default());
        assert_eq!(verify_file(&path).unwrap().records, 3);
        let sink = FileSink::open(&path).unwrap();
        assert_eq!(sink.append("x.y", None, Map::new()).unwrap(), 4);
        drop(sink);
        let s = verify_file(&path).unwrap();
        assert_eq!((s.records, s.last_seq, s.key_id), (4, 4, None));
        let first: Value = serde_json::from_str(&lines(&path)[0]).unwrap();
        assert_eq!(first["prev"], GENESIS);
        assert_eq!(first["event"], "session.created");
        assert_eq!(first["session"], "s1");
        assert!(first.get("alg").is_none(), "plain records stay as before");
    }

    #[test]
    fn a_log_written_before_keys_existed_still_verifies() {
        // Two records in the format of the first release (no `alg`, plain SHA-256).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut out = String::new();
        let mut prev = GENESIS.to_string();
        for seq in 1..=2u64 {
            let mut rec = fields(json!({
                "seq": seq, "ts": "2025-01-01T00:00:00Z", "event": "supervisor.started",
                "session": null, "prev": prev, "pid": 1
            }));
            let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                canonical(&Value::Object(rec.clone())).as_bytes(),
            ));
            rec.insert("hash".into(), hash.clone().into());
            out += &canonical(&Value::Object(rec));
            out.push('\n');
            prev = hash;
        }
        std::fs::write(&path, out).unwrap();
        assert_eq!(verify_file(&path).unwrap().records, 2);
        let sink = FileSink::open(&path).unwrap();
        assert_eq!(sink.append("x.y", None, Map::new()).unwrap(), 3);
    }

    #[test]
    fn editing_a_record_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 4, FileOptions::default());
        let mut l = lines(&path);
        l[2] = l[2].replace("\"agent\":\"a\"", "\"agent\":\"b\"");
        rewrite(&path, &l);
        let e = chain_err(verify_file(&path));
        assert_eq!((e.line, e.seq), (3, Some(3)));
        assert!(e.reason.contains("edited"), "{e}");
    }

    #[test]
    fn deleting_or_reordering_a_record_names_where_the_chain_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 4, FileOptions::default());
        let all = lines(&path);
        let mut deleted = all.clone();
        deleted.remove(1);
        rewrite(&path, &deleted);
        let e = chain_err(verify_file(&path));
        assert_eq!((e.line, e.seq), (2, Some(3)));
        let mut swapped = all.clone();
        swapped.swap(1, 2);
        rewrite(&path, &swapped);
        assert_eq!(chain_err(verify_file(&path)).line, 2);
        let mut headless = all.clone();
        headless.remove(0);
        rewrite(&path, &headless);
        let e = chain_err(verify_file(&path));
        assert!(e.reason.contains("beginning is missing"), "{e}");
        // Deleting the last record leaves a valid, shorter chain; that is what an
        // append-only file can prove, and why the count is reported.
        let mut truncated = all.clone();
        truncated.pop();
        rewrite(&path, &truncated);
        assert_eq!(verify_file(&path).unwrap().records, 3);
    }

    #[test]
    fn a_damaged_log_is_not_extended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 2, FileOptions::default());
        let mut l = lines(&path);
        l[0] = l[0].replace("\"n\":0", "\"n\":9");
        rewrite(&path, &l);
        assert!(matches!(
            FileSink::open(&path),
            Err(AuditError::Damaged { .. })
        ));
    }

    /// Recomputes every plain hash from line `from` on, as someone without the key would after
    /// an edit.
    fn recompute_plain(l: &mut [String], from: usize) {
        let mut prev = if from == 0 {
            GENESIS.to_string()
        } else {
            serde_json::from_str::<Value>(&l[from - 1]).unwrap()["hash"]
                .as_str()
                .unwrap()
                .to_string()
        };
        for line in l.iter_mut().skip(from) {
            let mut rec = fields(serde_json::from_str(line).unwrap());
            rec.remove("hash");
            rec.insert("prev".into(), prev.clone().into());
            let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                canonical(&Value::Object(rec.clone())).as_bytes(),
            ));
            rec.insert("hash".into(), hash.clone().into());
            *line = canonical(&Value::Object(rec));
            prev = hash;
        }
    }

    #[test]
    fn ag120_4_6_with_a_key_an_edit_with_recomputed_plain_hashes_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 5, keyed(1));
        let k = key(1);
        let s = verify_log(&path, Some(&k)).unwrap();
        assert_eq!((s.records, s.key_id.as_deref()), (5, Some(k.id())));
        let first: Value = serde_json::from_str(&lines(&path)[0]).unwrap();
        assert_eq!(first["alg"], ALG_HMAC);
        assert_eq!(first["key_id"], k.id());

        // The attacker edits record 3 and recomputes every hash after it as plain SHA-256,
        // keeping `alg` and `key_id` as they were.
        let mut l = lines(&path);
        l[2] = l[2].replace("\"agent\":\"a\"", "\"agent\":\"x\"");
        recompute_plain(&mut l, 2);
        rewrite(&path, &l);
        let e = chain_err(verify_log(&path, Some(&k)));
        assert_eq!((e.line, e.seq), (3, Some(3)));
        assert!(
            e.reason.contains("HMAC") && e.reason.contains("edited"),
            "{e}"
        );

        // … or drops `alg`/`key_id` everywhere, so the log looks like a plain one.
        let mut l = lines(&path);
        for line in l.iter_mut() {
            let mut rec = fields(serde_json::from_str(line).unwrap());
            rec.remove("alg");
            rec.remove("key_id");
            *line = canonical(&Value::Object(rec));
        }
        recompute_plain(&mut l, 0);
        rewrite(&path, &l);
        assert!(
            verify_log(&path, None).is_ok(),
            "a rewrite is a valid plain chain"
        );
        assert!(matches!(
            verify_log(&path, Some(&k)),
            Err(VerifyError::NotKeyed(_))
        ));
    }

    #[test]
    fn a_keyed_log_needs_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 2, keyed(1));
        let Err(VerifyError::KeyNeeded { key_id, .. }) = verify_log(&path, None) else {
            panic!("a keyed log verified without its key")
        };
        assert_eq!(key_id, key(1).id());
        let Err(VerifyError::WrongKey(e)) = verify_log(&path, Some(&key(2))) else {
            panic!("a keyed log verified with another key")
        };
        assert!(e.reason.contains(key(2).id()), "{e}");
        // Opening follows the same rules, each with its own message.
        assert!(matches!(
            FileSink::open(&path),
            Err(AuditError::KeyRequired { .. })
        ));
        assert!(matches!(
            FileSink::open_with(&path, keyed(2)),
            Err(AuditError::WrongKey { .. })
        ));
        let plain = dir.path().join("plain.jsonl");
        write_log(&plain, 1, FileOptions::default());
        let e = FileSink::open_with(&plain, keyed(1))
            .err()
            .expect("a plain log was extended with keyed records");
        assert!(matches!(e, AuditError::Unkeyed { .. }), "{e}");
        assert!(e.to_string().contains("mix"), "{e}");
    }

    #[test]
    fn a_plain_record_appended_to_a_keyed_chain_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 2, keyed(1));
        // Someone without the key appends a record chained with plain SHA-256.
        let mut l = lines(&path);
        let last: Value = serde_json::from_str(&l[1]).unwrap();
        let mut rec = fields(json!({
            "seq": 3, "ts": "2025-01-01T00:00:00Z", "event": "session.revoked",
            "session": "s1", "prev": last["hash"]
        }));
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            canonical(&Value::Object(rec.clone())).as_bytes(),
        ));
        rec.insert("hash".into(), hash.into());
        l.push(canonical(&Value::Object(rec)));
        rewrite(&path, &l);
        let e = chain_err(verify_log(&path, Some(&key(1))));
        assert!(e.reason.contains("mix"), "{e}");
    }

    #[test]
    fn rotation_keeps_one_chain_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let opts = FileOptions {
            key: Some(key(3)),
            rotate_bytes: Some(600),
        };
        write_log(&path, 12, opts.clone());
        let s = verify_log(&path, Some(&key(3))).unwrap();
        assert!(s.files.len() >= 3, "{s:?}");
        assert_eq!(s.continues, None);
        // Names sort in chain order and say which seqs they hold.
        let names: Vec<String> = s
            .files
            .iter()
            .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let mut sorted = names[..names.len() - 1].to_vec();
        sorted.sort();
        assert_eq!(sorted, names[..names.len() - 1]);
        assert!(
            names[0].starts_with("audit.jsonl.00000000000000000001-"),
            "{names:?}"
        );
        let newest = lines(&path);
        let first: Value = serde_json::from_str(&newest[0]).unwrap();
        assert_eq!(first["event"], EVENT_ROTATED);
        assert_eq!(first["previous_file"], names[names.len() - 2].as_str());
        // Reopening continues the chain.
        let sink = FileSink::open_with(&path, opts).unwrap();
        let before = verify_log(&path, Some(&key(3))).unwrap().last_seq;
        let seq = sink.append("x.y", None, Map::new()).unwrap();
        assert_eq!(seq, before + 1);
        drop(sink);
        // The commit may have rotated again, adding its audit.rotated record.
        let s = verify_log(&path, Some(&key(3))).unwrap();
        assert!(s.last_seq == seq || s.last_seq == seq + 1, "{s:?}");
        // The query finds a session's records in every file, in order.
        let recs = read_log(
            &path,
            &AuditQuery {
                session: "s1".into(),
                event_prefix: Some("session.".into()),
            },
        )
        .unwrap();
        let ns: Vec<u64> = recs.iter().map(|r| r["n"].as_u64().unwrap()).collect();
        assert_eq!(ns, (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_last_line_is_reported_then_dropped_and_recorded_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 3, keyed(1));
        let full = std::fs::read(&path).unwrap();
        let next_line = lines(&path)[2].clone();
        // A crash cut the write of a fourth record after 25 bytes.
        let mut torn = full.clone();
        torn.extend_from_slice(&next_line.as_bytes()[..25]);
        std::fs::write(&path, &torn).unwrap();
        let s = verify_log(&path, Some(&key(1))).unwrap();
        assert_eq!((s.records, s.torn_tail()), (3, Some(25)));

        let sink = FileSink::open_with(&path, keyed(1)).unwrap();
        assert_eq!(sink.append("x.y", None, Map::new()).unwrap(), 5);
        drop(sink);
        let s = verify_log(&path, Some(&key(1))).unwrap();
        assert_eq!((s.records, s.torn_tail()), (5, None));
        let rec: Value = serde_json::from_str(&lines(&path)[3]).unwrap();
        assert_eq!(rec["event"], EVENT_RECOVERED);
        assert_eq!(rec["dropped_bytes"], 25);
        assert_eq!(rec["after_seq"], 3);
        assert!(std::fs::read(&path).unwrap().starts_with(&full));
    }

    #[test]
    fn a_crash_between_rename_and_the_new_file_is_continued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 3, FileOptions::default());
        let rotated = dir.path().join(chain::rotated_name("audit.jsonl", 1, 3));
        std::fs::rename(&path, &rotated).unwrap();
        let sink = FileSink::open(&path).unwrap();
        assert_eq!(sink.append("x.y", None, Map::new()).unwrap(), 5);
        drop(sink);
        let s = verify_file(&path).unwrap();
        assert_eq!((s.records, s.files.len()), (5, 2));
    }

    #[test]
    fn canonical_form_sorts_keys_at_every_level() {
        let v = json!({"b": 1, "a": {"d": [ {"z": 1, "y": 2} ], "c": null}});
        assert_eq!(
            canonical(&v),
            r#"{"a":{"c":null,"d":[{"y":2,"z":1}]},"b":1}"#
        );
    }

    #[test]
    fn rotated_names_parse_back() {
        let n = chain::rotated_name("audit.jsonl", 7, 1234);
        assert_eq!(chain::split_rotated(&n), Some(("audit.jsonl", 7, 1234)));
        assert_eq!(chain::split_rotated("audit.jsonl"), None);
        assert_eq!(chain::split_rotated("audit.jsonl.tmp"), None);
        assert_eq!(chain::split_rotated(".1-2"), None);
    }
}
