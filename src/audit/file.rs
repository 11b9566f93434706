//! The single-host sink: a JSON Lines file written by one thread with group commit, rotated
//! by size, recovered after a crash.
//!
//! Appenders queue their record and wait; the writer thread takes everything queued, writes
//! it, calls `sync_data` once and only then acknowledges every record of the batch. Many
//! concurrent records therefore cost one fsync, and each is still durable before its
//! appender hears back.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::chain::{
    rotated_name, seal, select, verify_files, AuditQuery, Family, VerifyError, EVENT_RECOVERED,
    EVENT_ROTATED, GENESIS,
};
use super::key::AuditKey;
use super::{Ack, AuditError, AuditSink, Entry};

/// Most records written by one commit; the rest wait for the next.
const MAX_BATCH_RECORDS: usize = 4096;
/// Most bytes written by one commit.
const MAX_BATCH_BYTES: usize = 4 << 20;

/// How a [`FileSink`] seals and rotates.
#[derive(Clone, Debug, Default)]
pub struct FileOptions {
    /// Seal records with HMAC-SHA256 under this key; `None`: plain SHA-256.
    pub key: Option<Arc<AuditKey>>,
    /// Rotate the file once a commit leaves it larger than this; `None`: never.
    pub rotate_bytes: Option<u64>,
}

struct Job {
    entry: Entry,
    ack: Ack,
}

/// The single-host sink: one JSON Lines file (plus its rotated predecessors).
pub struct FileSink {
    path: PathBuf,
    dir: PathBuf,
    base: String,
    tx: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Held while the writer renames the file and while a reader lists and opens the files,
    /// so that a reader never sees a file in neither place.
    rotation: Arc<Mutex<()>>,
}

struct Writer {
    path: PathBuf,
    dir: PathBuf,
    base: String,
    file: File,
    /// Bytes in the current file.
    len: u64,
    /// `seq` of the current file's first record.
    first_seq: Option<u64>,
    seq: u64,
    prev: String,
    key: Option<Arc<AuditKey>>,
    rotate_bytes: Option<u64>,
    /// After a failed rename, the next try waits until the file has grown this far.
    rotate_retry_at: u64,
    rotation: Arc<Mutex<()>>,
    /// Set once a write or sync failed: what is on disk after `seq` is then unknown, so
    /// nothing more is appended until a restart has checked the file.
    failed: Option<String>,
    /// Commits (fsyncs of a batch) so far.
    commits: u64,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

impl FileSink {
    /// Opens `path` with plain SHA-256 sealing and no rotation (see [`FileSink::open_with`]).
    pub fn open(path: &Path) -> Result<FileSink, AuditError> {
        FileSink::open_with(path, FileOptions::default())
    }

    /// Opens `path` for appending, creating it (mode 0600) if needed.
    ///
    /// The existing file (and the rotated file it continues, if present) is verified first
    /// with `opts.key`: a damaged log, a keyed log without its key, or a plain log with a key
    /// is refused rather than extended. An incomplete last line (a write cut off by a crash)
    /// is truncated, and an `audit.recovered` record with `dropped_bytes` says so. A missing
    /// or empty file next to rotated ones starts with `audit.rotated`.
    pub fn open_with(path: &Path, opts: FileOptions) -> Result<FileSink, AuditError> {
        let writer = Writer::open(path, opts)?;
        let (dir, base, rotation) = (
            writer.dir.clone(),
            writer.base.clone(),
            writer.rotation.clone(),
        );
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("chaperone-audit".into())
            .spawn(move || {
                writer.run(rx);
            })
            .map_err(|source| AuditError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(FileSink {
            path: path.to_path_buf(),
            dir,
            base,
            tx: Some(tx),
            writer: Some(handle),
            rotation,
        })
    }

    /// Appends one event and waits until it is durable; for code outside an async runtime.
    pub fn append(
        &self,
        event: &str,
        session: Option<&str>,
        fields: Map<String, Value>,
    ) -> Result<u64, AuditError> {
        let (tx, rx) = mpsc::channel();
        self.submit(
            Entry {
                event: event.to_string(),
                session: session.map(str::to_string),
                fields,
            },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().map_err(|_| AuditError::Stopped)?
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AuditSink for FileSink {
    fn submit(&self, entry: Entry, ack: Ack) {
        let Some(tx) = &self.tx else {
            return ack(Err(AuditError::Stopped));
        };
        if let Err(mpsc::SendError(job)) = tx.send(Job { entry, ack }) {
            (job.ack)(Err(AuditError::Stopped));
        }
    }

    fn query(&self, q: &AuditQuery) -> Result<Vec<Value>, AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let files = {
            let _rotation = self.rotation.lock().unwrap_or_else(|p| p.into_inner());
            Family::scan(&self.dir, &self.base)
                .and_then(|f| f.open_all())
                .map_err(io)?
        };
        select(files, q).map_err(|e| AuditError::Damaged {
            path: self.path.clone(),
            problem: e.to_string(),
        })
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and stop.
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            // An acknowledgement that dropped the last handle runs on the writer itself.
            if w.thread().id() != std::thread::current().id() {
                let _ = w.join();
            }
        }
    }
}

fn open_error(path: &Path, e: VerifyError) -> AuditError {
    let path = path.to_path_buf();
    match e {
        VerifyError::Io { source, .. } => AuditError::Io { path, source },
        VerifyError::KeyNeeded { key_id, .. } => AuditError::KeyRequired { path, key_id },
        VerifyError::NotKeyed(_) => AuditError::Unkeyed { path },
        VerifyError::WrongKey(at) => AuditError::WrongKey {
            path,
            problem: at.to_string(),
        },
        VerifyError::Chain(_) | VerifyError::Layout(_) => AuditError::Damaged {
            path,
            problem: e.to_string(),
        },
    }
}

impl Writer {
    fn open(path: &Path, opts: FileOptions) -> Result<Writer, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let base = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io(std::io::ErrorKind::InvalidInput.into()))?
            .to_string();
        let family = Family::scan(&dir, &base).map_err(io)?;
        // The current file and the one it continues: enough to know where the chain stands
        // and that it links up, without rereading every rotated file at each start.
        let mut check = Vec::new();
        if let Some((_, newest)) = family.rotated.last() {
            check.push(dir.join(newest));
        }
        if family.current {
            check.push(path.to_path_buf());
        }
        let summary = if check.is_empty() {
            None
        } else {
            Some(verify_files(&check, opts.key.as_deref()).map_err(|e| open_error(path, e))?)
        };
        let current = summary
            .as_ref()
            .and_then(|s| s.files.last())
            .filter(|_| family.current);
        let torn = current.and_then(|c| c.torn_tail.map(|t| (t, c.complete_len)));
        if let Some((_, keep)) = torn {
            let f = OpenOptions::new().write(true).open(path).map_err(io)?;
            f.set_len(keep).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        // The file's directory entry must be durable too, or a crash can lose the log.
        sync_dir(&dir).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let (seq, prev) = summary.as_ref().map_or((0, GENESIS.to_string()), |s| {
            (s.last_seq, s.last_hash.clone())
        });
        let mut w = Writer {
            path: path.to_path_buf(),
            dir,
            base,
            file,
            len,
            first_seq: current.and_then(|c| c.first_seq),
            seq,
            prev,
            key: opts.key,
            rotate_bytes: opts.rotate_bytes,
            rotate_retry_at: 0,
            rotation: Arc::new(Mutex::new(())),
            failed: None,
            commits: 0,
        };
        if w.first_seq.is_none() {
            if let Some((_, newest)) = family.rotated.last() {
                // A crash between renaming the full file and starting the new one.
                w.commit(&[rotated_entry(newest)]).map_err(io)?;
            }
        }
        if let Some((dropped, _)) = torn {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = dropped,
                "audit log ended in an incomplete record (a write cut off by a crash); dropped it"
            );
            let fields = Map::from_iter([
                ("file".to_string(), Value::from(w.base.clone())),
                ("dropped_bytes".to_string(), Value::from(dropped)),
                ("after_seq".to_string(), Value::from(seq)),
            ]);
            w.commit(&[Entry {
                event: EVENT_RECOVERED.into(),
                session: None,
                fields,
            }])
            .map_err(io)?;
        }
        Ok(w)
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) -> Writer {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            let mut bytes = 0;
            while batch.len() < MAX_BATCH_RECORDS && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(job) => {
                        // A rough size: the fields dominate a record.
                        bytes += 256 + job.entry.fields.len() * 64;
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
        self
    }

    fn commit_batch(&mut self, batch: Vec<Job>) {
        let path = self.path.clone();
        let failed = move |reason: &str| AuditError::Failed {
            path: path.clone(),
            reason: reason.to_string(),
        };
        if let Some(reason) = &self.failed {
            for job in batch {
                (job.ack)(Err(failed(reason)));
            }
            return;
        }
        let (entries, acks): (Vec<Entry>, Vec<Ack>) =
            batch.into_iter().map(|j| (j.entry, j.ack)).unzip();
        match self.commit(&entries) {
            Ok(first) => {
                for (i, ack) in acks.into_iter().enumerate() {
                    ack(Ok(first + i as u64));
                }
                self.maybe_rotate();
            }
            Err(e) => {
                let reason = format!(
                    "writing failed ({e}); nothing more is appended until a restart has checked the log"
                );
                tracing::error!(path = %self.path.display(), error = %e, "audit log write failed");
                for ack in acks {
                    (ack)(Err(failed(&reason)));
                }
                self.failed = Some(reason);
            }
        }
    }

    /// Writes `entries` as consecutive records with one `sync_data`; returns the first seq.
    fn commit(&mut self, entries: &[Entry]) -> std::io::Result<u64> {
        let mut buf = String::new();
        let mut seq = self.seq;
        let mut prev = self.prev.clone();
        for e in entries {
            seq += 1;
            let ts = OffsetDateTime::now_utc()
                .format(&Rfc3339)
                .unwrap_or_else(|_| "unknown".into());
            let mut rec = e.fields.clone();
            rec.insert("seq".into(), seq.into());
            rec.insert("ts".into(), ts.into());
            rec.insert("event".into(), e.event.clone().into());
            rec.insert(
                "session".into(),
                e.session.clone().map_or(Value::Null, Value::String),
            );
            rec.insert("prev".into(), prev.into());
            let (line, hash) = seal(rec, self.key.as_deref());
            buf.push_str(&line);
            prev = hash;
        }
        self.file.write_all(buf.as_bytes())?;
        self.file.sync_data()?;
        self.commits += 1;
        let first = self.seq + 1;
        self.first_seq.get_or_insert(first);
        self.len += buf.len() as u64;
        self.seq = seq;
        self.prev = prev;
        Ok(first)
    }

    fn maybe_rotate(&mut self) {
        let Some(limit) = self.rotate_bytes else {
            return;
        };
        if self.len <= limit || self.len < self.rotate_retry_at {
            return;
        }
        if let Err(e) = self.rotate() {
            tracing::error!(path = %self.path.display(), error = %e, "audit log rotation failed");
            if self.failed.is_none() {
                // Still appending to the same file, which is safe; try again later.
                self.rotate_retry_at = self.len + limit;
            }
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let Some(first) = self.first_seq else {
            return Ok(());
        };
        let name = rotated_name(&self.base, first, self.seq);
        let target = self.dir.join(&name);
        {
            let _rotation = self.rotation.lock().unwrap_or_else(|p| p.into_inner());
            if target.exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists; not overwriting it", target.display()),
                ));
            }
            std::fs::rename(&self.path, &target)?;
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)
                .and_then(|f| sync_dir(&self.dir).map(|()| f));
            match file {
                Ok(f) => self.file = f,
                Err(e) => {
                    // The old file is renamed: there is nowhere left to append.
                    self.failed = Some(format!(
                        "starting a new file after rotating to {name} failed ({e})"
                    ));
                    return Err(e);
                }
            }
        }
        self.len = 0;
        self.first_seq = None;
        if let Err(e) = self.commit(&[rotated_entry(&name)]) {
            self.failed = Some(format!("writing audit.rotated failed ({e})"));
            return Err(e);
        }
        Ok(())
    }
}

fn rotated_entry(previous: &str) -> Entry {
    Entry {
        event: EVENT_ROTATED.into(),
        session: None,
        fields: Map::from_iter([("previous_file".to_string(), Value::from(previous))]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::verify_log;
    use serde_json::json;

    fn fields(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn everything_queued_is_written_by_one_commit_and_acknowledged_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let w = Writer::open(&path, FileOptions::default()).unwrap();
        let (tx, rx) = mpsc::channel();
        let (ack_tx, ack_rx) = mpsc::channel();
        for i in 0..100u64 {
            let ack_tx = ack_tx.clone();
            tx.send(Job {
                entry: Entry {
                    event: "x.y".into(),
                    session: Some("s".into()),
                    fields: fields(json!({ "i": i })),
                },
                ack: Box::new(move |r| ack_tx.send((i, r.unwrap())).unwrap()),
            })
            .unwrap();
        }
        drop((tx, ack_tx));
        // Everything was queued before the writer looked: one batch, one fsync.
        let w = w.run(rx);
        assert_eq!(w.commits, 1);
        let acks: Vec<(u64, u64)> = ack_rx.iter().collect();
        assert_eq!(acks, (0..100).map(|i| (i, i + 1)).collect::<Vec<_>>());
        assert_eq!(verify_log(&path, None).unwrap().records, 100);
    }

    #[test]
    fn a_failed_write_stops_all_later_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut w = Writer::open(&path, FileOptions::default()).unwrap();
        // A read-only handle makes the next write fail the way a full disk would.
        w.file = File::open(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        let run = std::thread::spawn(move || w.run(rx));
        let sink_like = |tx: &mpsc::Sender<Job>| {
            let (a, b) = mpsc::channel();
            tx.send(Job {
                entry: Entry {
                    event: "x.y".into(),
                    session: None,
                    fields: Map::new(),
                },
                ack: Box::new(move |r| a.send(r).unwrap()),
            })
            .unwrap();
            b.recv().unwrap()
        };
        let e = sink_like(&tx).unwrap_err().to_string();
        assert!(e.contains("writing failed"), "{e}");
        let e = sink_like(&tx).unwrap_err().to_string();
        assert!(e.contains("restart"), "{e}");
        drop(tx);
        assert_eq!(run.join().unwrap().seq, 0);
    }
}
