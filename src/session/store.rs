//! Where the registry's resumption state is recorded (AG-374 4.10): every ticket issued and
//! used, every detach and resumption. The supervisor's memory is the working copy; the store
//! is its durable record, and a resumption whose record cannot be written fails closed.
//!
//! [`MemoryStore`] keeps nothing beyond memory (the default: sessions die with the process).
//! [`JournalStore`] appends one JSON line per operation and syncs it before the operation
//! counts (`[registry] journal` in the server config). The trait is the seam for a shared
//! store when several supervisors serve one fleet.

use std::io::Write as _;
use std::path::PathBuf;

use serde_json::Value;

/// The registry's record could not be written (or read).
#[derive(Debug, thiserror::Error)]
#[error("registry store: {0}")]
pub struct StoreError(pub String);

/// One operation on the resumption state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A ticket was issued.
    Issued,
    /// A ticket was used for a resumption.
    Consumed,
    /// The last agent connection dropped.
    Detached,
    /// The session became active again.
    Resumed,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Issued => "ticket_issued",
            Op::Consumed => "ticket_consumed",
            Op::Detached => "detached",
            Op::Resumed => "resumed",
        }
    }
}

/// Records resumption state. Implementations must be durable when `record` returns `Ok`.
pub trait ResumeStore: Send + Sync {
    /// Records `op` for `session` with its facts (ticket sequence and fingerprint; never a
    /// ticket).
    fn record(&self, session: &str, op: Op, facts: &Value) -> Result<(), StoreError>;
}

/// Memory only.
#[derive(Debug, Default)]
pub struct MemoryStore;

impl ResumeStore for MemoryStore {
    fn record(&self, _: &str, _: Op, _: &Value) -> Result<(), StoreError> {
        Ok(())
    }
}

/// An append-only journal file, synced per record.
#[derive(Debug)]
pub struct JournalStore {
    path: PathBuf,
    lock: std::sync::Mutex<()>,
}

impl JournalStore {
    /// A journal at `path` (created on first write, mode 0600).
    pub fn new(path: PathBuf) -> Self {
        JournalStore {
            path,
            lock: std::sync::Mutex::new(()),
        }
    }
}

impl ResumeStore for JournalStore {
    fn record(&self, session: &str, op: Op, facts: &Value) -> Result<(), StoreError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let line = serde_json::json!({
            "ts": super::rfc3339(time::OffsetDateTime::now_utc()),
            "session": session,
            "op": op.name(),
            "facts": facts,
        });
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // Opened for each record, so a journal that became unwritable fails the very next
        // operation instead of a cached descriptor hiding it.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| StoreError(format!("{}: {e}", self.path.display())))?;
        writeln!(f, "{line}")
            .and_then(|()| f.sync_data())
            .map_err(|e| StoreError(format!("{}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_appends_and_fails_when_its_path_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.journal");
        let j = JournalStore::new(path.clone());
        j.record("s1", Op::Issued, &serde_json::json!({"seq": 1}))
            .unwrap();
        j.record("s1", Op::Consumed, &serde_json::json!({"seq": 1}))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let ops: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["op"].to_string())
            .collect();
        assert_eq!(ops, [r#""ticket_issued""#, r#""ticket_consumed""#]);
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let e = j
            .record("s1", Op::Resumed, &Value::Null)
            .expect_err("a directory is not a journal");
        assert!(e.to_string().contains("registry.journal"), "{e}");
    }
}
