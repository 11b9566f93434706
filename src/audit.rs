//! The audit log: append-only JSON Lines, each record chained to the one before by a hash.
//!
//! Every record carries `seq` (1, 2, 3 …), `ts` (RFC 3339, UTC), `event` (dotted, e.g.
//! `session.created`), `session` (or null), the event's own fields, `prev` (the previous
//! record's `hash`, 64 zeros for the first) and `hash` = SHA-256 over the record's canonical
//! JSON (keys sorted, no whitespace) without `hash`. Editing, deleting or reordering any record
//! breaks the chain at that record, which `chaperone audit verify FILE` reports.
//!
//! A record is on disk (`fsync`) before [`Audit::record`] returns, so a lifecycle step is
//! durable before the action it records is acknowledged.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What can go wrong writing or reading the log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log file could not be opened, written or synced.
    #[error("audit log {path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The existing log does not verify; appending to it would hide the damage.
    #[error("audit log {path} is damaged, refusing to append to it: {problem}")]
    Damaged {
        /// The log file.
        path: PathBuf,
        /// The first bad record.
        problem: ChainError,
    },
    /// The writer task went away (the runtime is shutting down).
    #[error("audit writer stopped")]
    Stopped,
}

/// Where audit records go. The embedded implementation is [`FileSink`]; a fleet would put a
/// shared sink (a SIEM, a database) behind the same trait.
pub trait AuditSink: Send + Sync + 'static {
    /// Appends one event and makes it durable before returning. Returns the record's `seq`.
    fn append(
        &self,
        event: &str,
        session: Option<&str>,
        fields: Map<String, Value>,
    ) -> Result<u64, AuditError>;
}

/// A cheap handle to the audit sink, usable from async code.
#[derive(Clone)]
pub struct Audit {
    sink: Arc<dyn AuditSink>,
}

impl Audit {
    /// Wraps a sink.
    pub fn new(sink: Arc<dyn AuditSink>) -> Audit {
        Audit { sink }
    }

    /// Opens (or creates) the file log at `path`.
    pub fn open_file(path: &Path) -> Result<Audit, AuditError> {
        Ok(Audit::new(Arc::new(FileSink::open(path)?)))
    }

    /// Records an event durably. `fields` must be a JSON object (other values are wrapped as
    /// `{"detail": …}`).
    pub async fn record(
        &self,
        event: &str,
        session: Option<&str>,
        fields: Value,
    ) -> Result<u64, AuditError> {
        let sink = self.sink.clone();
        let event = event.to_string();
        let session = session.map(str::to_string);
        let fields = match fields {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            other => Map::from_iter([("detail".to_string(), other)]),
        };
        tokio::task::spawn_blocking(move || sink.append(&event, session.as_deref(), fields))
            .await
            .map_err(|_| AuditError::Stopped)?
    }

    /// Records an event from code that cannot wait (e.g. a synchronous observer). The record
    /// is still written in order with the others; a failure is logged.
    pub fn record_detached(&self, event: &str, session: Option<&str>, fields: Value) {
        let this = self.clone();
        let event = event.to_string();
        let session = session.map(str::to_string);
        tokio::spawn(async move {
            if let Err(e) = this.record(&event, session.as_deref(), fields).await {
                tracing::error!(error = %e, event, "audit record lost");
            }
        });
    }
}

/// The single-host sink: one JSON Lines file, fsynced per record.
pub struct FileSink {
    path: PathBuf,
    state: Mutex<FileState>,
}

struct FileState {
    file: File,
    seq: u64,
    prev: String,
}

impl FileSink {
    /// Opens `path` for appending, creating it (mode 0600) if needed. An existing log is
    /// verified first: a damaged log is refused rather than extended.
    pub fn open(path: &Path) -> Result<FileSink, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let (seq, prev) = match File::open(path) {
            Ok(f) => match verify_reader(BufReader::new(f)) {
                Ok(summary) => (summary.records, summary.last_hash),
                Err(VerifyError::Chain(problem)) => {
                    return Err(AuditError::Damaged {
                        path: path.to_path_buf(),
                        problem,
                    })
                }
                Err(VerifyError::Io(e)) => return Err(io(e)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, GENESIS.to_string()),
            Err(e) => return Err(io(e)),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The file's directory entry must be durable too, or a crash can lose the log.
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(FileSink {
            path: path.to_path_buf(),
            state: Mutex::new(FileState { file, seq, prev }),
        })
    }
}

impl AuditSink for FileSink {
    fn append(
        &self,
        event: &str,
        session: Option<&str>,
        fields: Map<String, Value>,
    ) -> Result<u64, AuditError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let seq = st.seq + 1;
        let ts = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_else(|_| "unknown".into());
        let mut rec = fields;
        rec.insert("seq".into(), seq.into());
        rec.insert("ts".into(), ts.into());
        rec.insert("event".into(), event.into());
        rec.insert(
            "session".into(),
            session.map_or(Value::Null, |s| Value::String(s.into())),
        );
        rec.insert("prev".into(), st.prev.clone().into());
        rec.remove("hash");
        let body = canonical(&Value::Object(rec.clone()));
        let hash = hex::encode(Sha256::digest(body.as_bytes()));
        rec.insert("hash".into(), hash.clone().into());
        let mut line = canonical(&Value::Object(rec));
        line.push('\n');
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        st.file.write_all(line.as_bytes()).map_err(io)?;
        st.file.sync_data().map_err(io)?;
        st.seq = seq;
        st.prev = hash;
        Ok(seq)
    }
}

/// JSON with object keys sorted at every level and no whitespace: the form that is hashed.
pub fn canonical(v: &Value) -> String {
    // serde_json keeps insertion order when `preserve_order` is on anywhere in the build, so
    // sort explicitly while writing.
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The first record at which the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {reason}", seq.map(|s| format!(" (record seq {s})")).unwrap_or_default())]
pub struct ChainError {
    /// 1-based line number in the file.
    pub line: usize,
    /// The record's own `seq`, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong with it.
    pub reason: String,
}

/// Why verification stopped.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The file could not be read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The chain is broken.
    #[error(transparent)]
    Chain(ChainError),
}

/// What a successful verification saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// Number of records.
    pub records: u64,
    /// `hash` of the last record (GENESIS for an empty log).
    pub last_hash: String,
}

/// Verifies a whole log file.
pub fn verify_file(path: &Path) -> Result<VerifySummary, VerifyError> {
    verify_reader(BufReader::new(File::open(path)?))
}

/// Verifies a log read from `r`: every line parses, `seq` counts up from 1, `prev` is the
/// previous `hash`, and `hash` matches the record's contents.
pub fn verify_reader(r: impl BufRead) -> Result<VerifySummary, VerifyError> {
    let mut expected_seq = 1u64;
    let mut prev = GENESIS.to_string();
    for (i, line) in r.lines().enumerate() {
        let line_no = i + 1;
        let line = line?;
        let bad = |seq: Option<u64>, reason: String| {
            VerifyError::Chain(ChainError {
                line: line_no,
                seq,
                reason,
            })
        };
        let mut rec: Map<String, Value> = match serde_json::from_str(&line) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(bad(None, "is not a JSON object".into())),
            Err(e) => return Err(bad(None, format!("is not valid JSON ({e})"))),
        };
        let seq = rec.get("seq").and_then(Value::as_u64);
        let Some(hash) = rec
            .remove("hash")
            .and_then(|h| h.as_str().map(str::to_string))
        else {
            return Err(bad(seq, "has no hash".into()));
        };
        match seq {
            Some(s) if s == expected_seq => {}
            Some(s) => {
                return Err(bad(
                    seq,
                    format!("seq {s} where {expected_seq} was expected (a record was deleted, inserted or reordered)"),
                ))
            }
            None => return Err(bad(None, "has no seq".into())),
        }
        if rec.get("prev").and_then(Value::as_str) != Some(prev.as_str()) {
            return Err(bad(
                seq,
                "prev does not match the previous record's hash (a record was deleted, inserted or reordered)".into(),
            ));
        }
        let actual = hex::encode(Sha256::digest(canonical(&Value::Object(rec)).as_bytes()));
        if actual != hash {
            return Err(bad(
                seq,
                "hash does not match the record's contents (the record was edited)".into(),
            ));
        }
        prev = hash;
        expected_seq += 1;
    }
    Ok(VerifySummary {
        records: expected_seq - 1,
        last_hash: prev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write_log(dir: &Path, n: u64) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let sink = FileSink::open(&path).unwrap();
        for i in 0..n {
            let fields = json!({"agent": "a", "n": i});
            let Value::Object(m) = fields else {
                unreachable!()
            };
            sink.append("session.created", Some("s1"), m).unwrap();
        }
        path
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn verify_lines(l: &[String]) -> Result<VerifySummary, VerifyError> {
        verify_reader(std::io::Cursor::new(l.join("\n")))
    }

    #[test]
    fn a_written_log_verifies_and_reopens_where_it_left_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 3);
        assert_eq!(verify_file(&path).unwrap().records, 3);
        let sink = FileSink::open(&path).unwrap();
        assert_eq!(sink.append("x.y", None, Map::new()).unwrap(), 4);
        assert_eq!(verify_file(&path).unwrap().records, 4);
        let first: Value = serde_json::from_str(&lines(&path)[0]).unwrap();
        assert_eq!(first["prev"], GENESIS);
        assert_eq!(first["event"], "session.created");
        assert_eq!(first["session"], "s1");
    }

    #[test]
    fn editing_a_record_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 4);
        let mut l = lines(&path);
        l[2] = l[2].replace("\"agent\":\"a\"", "\"agent\":\"b\"");
        let Err(VerifyError::Chain(e)) = verify_lines(&l) else {
            panic!("edit not detected")
        };
        assert_eq!((e.line, e.seq), (3, Some(3)));
        assert!(e.reason.contains("edited"), "{e}");
    }

    #[test]
    fn deleting_or_reordering_a_record_names_where_the_chain_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 4);
        let mut deleted = lines(&path);
        deleted.remove(1);
        let Err(VerifyError::Chain(e)) = verify_lines(&deleted) else {
            panic!("deletion not detected")
        };
        assert_eq!((e.line, e.seq), (2, Some(3)));
        let mut swapped = lines(&path);
        swapped.swap(1, 2);
        let Err(VerifyError::Chain(e)) = verify_lines(&swapped) else {
            panic!("reorder not detected")
        };
        assert_eq!(e.line, 2);
        // Deleting the last record leaves a valid, shorter chain; that is what an
        // append-only file can prove, and why the count is reported.
        let mut truncated = lines(&path);
        truncated.pop();
        assert_eq!(verify_lines(&truncated).unwrap().records, 3);
    }

    #[test]
    fn a_damaged_log_is_not_extended() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 2);
        let mut l = lines(&path);
        l[0] = l[0].replace("\"n\":0", "\"n\":9");
        std::fs::write(&path, l.join("\n") + "\n").unwrap();
        assert!(matches!(
            FileSink::open(&path),
            Err(AuditError::Damaged { .. })
        ));
    }

    #[test]
    fn canonical_form_sorts_keys_at_every_level() {
        let v = json!({"b": 1, "a": {"d": [ {"z": 1, "y": 2} ], "c": null}});
        assert_eq!(
            canonical(&v),
            r#"{"a":{"c":null,"d":[{"y":2,"z":1}]},"b":1}"#
        );
    }
}
