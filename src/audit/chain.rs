//! The chain: how a record is sealed, how a log (one file, or the sequence of files rotation
//! left) is verified, and how its records are read back.
//!
//! A log is a base file (e.g. `audit.jsonl`, the one being written) and its rotated files
//! `audit.jsonl.<first-seq>-<last-seq>` (20 digits each, so that names sort in chain order) in
//! the same directory. A file that continues another begins with an `audit.rotated` record
//! naming it in `previous_file`; its `prev` is the last hash of that file and its `seq`
//! continues.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::key::AuditKey;

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// `alg` of a keyed record: `hash` is HMAC-SHA256 under the key named by `key_id`.
pub const ALG_HMAC: &str = "hmac-sha256";
/// `alg` a plain record may carry; records written without a key carry no `alg` at all.
pub const ALG_PLAIN: &str = "sha256";
/// First record of a file that continues a rotated one.
pub const EVENT_ROTATED: &str = "audit.rotated";
/// Written when opening a log whose last line had been cut off (and was dropped).
pub const EVENT_RECOVERED: &str = "audit.recovered";

/// JSON with object keys sorted at every level and no whitespace: the form that is hashed.
pub fn canonical(v: &Value) -> String {
    // serde_json keeps insertion order when `preserve_order` is on anywhere in the build, so
    // sort explicitly while writing.
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn canonical_map(m: &Map<String, Value>) -> String {
    let mut out = String::new();
    write_map(m, &mut out);
    out
}

fn write_map(m: &Map<String, Value>, out: &mut String) {
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

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => write_map(m, out),
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

fn sha256_hex(body: &str) -> String {
    hex::encode(Sha256::digest(body.as_bytes()))
}

/// Seals a record that has everything but its hash: with a key, adds `alg` and `key_id` and
/// takes the HMAC; without, the plain SHA-256. Returns the line to write (with its newline)
/// and the hash.
pub(crate) fn seal(mut rec: Map<String, Value>, key: Option<&AuditKey>) -> (String, String) {
    rec.remove("hash");
    let hash = match key {
        Some(k) => {
            rec.insert("alg".into(), ALG_HMAC.into());
            rec.insert("key_id".into(), k.id().into());
            k.tag(canonical_map(&rec).as_bytes())
        }
        None => {
            // Plain records look exactly like those of logs written before keys existed.
            rec.remove("alg");
            rec.remove("key_id");
            sha256_hex(&canonical_map(&rec))
        }
    };
    rec.insert("hash".into(), hash.clone().into());
    let mut line = canonical_map(&rec);
    line.push('\n');
    (line, hash)
}

/// Where in a log the chain breaks, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainError {
    /// Name of the file, when the log has (or may have) several.
    pub file: Option<String>,
    /// 1-based line number in that file.
    pub line: usize,
    /// The record's own `seq`, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file} ")?;
        }
        write!(f, "line {}", self.line)?;
        if let Some(s) = self.seq {
            write!(f, " (record seq {s})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ChainError {}

/// Why verification stopped.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file could not be read.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The path does not name one log (no log there, or several in one directory).
    #[error("{0}")]
    Layout(String),
    /// The chain is broken: a record was edited, deleted, inserted or reordered, or a file is
    /// missing from the sequence.
    #[error("{0}")]
    Chain(ChainError),
    /// The log is keyed but no key was given, so nothing was verified.
    #[error("the log is keyed (hmac-sha256, key_id {key_id}) and cannot be verified without its key (at {at})")]
    KeyNeeded {
        /// The key the log names.
        key_id: String,
        /// The first keyed record.
        at: ChainError,
    },
    /// A key was given but the record is plain: written without the key, or rewritten by
    /// someone without it.
    #[error("{0}")]
    NotKeyed(ChainError),
    /// The record names another key than the one given.
    #[error("{0}")]
    WrongKey(ChainError),
}

/// What verification saw in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSummary {
    /// The file.
    pub path: PathBuf,
    /// Complete records in it.
    pub records: u64,
    /// `seq` of its first record.
    pub first_seq: Option<u64>,
    /// Bytes up to the end of its last complete line.
    pub complete_len: u64,
    /// Length of an incomplete last line (a write cut off by a crash), if any.
    pub torn_tail: Option<u64>,
}

/// What a successful verification saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// Records verified, over all files.
    pub records: u64,
    /// `seq` of the last record (0 when there is none).
    pub last_seq: u64,
    /// `hash` of the last record ([`GENESIS`] when there is none).
    pub last_hash: String,
    /// The key the records were sealed with; `None` for a plain chain.
    pub key_id: Option<String>,
    /// The earlier file the first file present continues (its own first record names it),
    /// when that file is not part of what was verified.
    pub continues: Option<String>,
    /// The files, oldest first.
    pub files: Vec<FileSummary>,
}

impl VerifySummary {
    /// Length of the incomplete last line of the newest file, if a crash left one.
    pub fn torn_tail(&self) -> Option<u64> {
        self.files.last().and_then(|f| f.torn_tail)
    }
}

enum Fault {
    Broken(String),
    KeyNeeded(String),
    NotKeyed(String),
    WrongKey(String),
}

/// The verifier's state between records.
struct Chain<'k> {
    key: Option<&'k AuditKey>,
    keyed: Option<bool>,
    /// Expected `seq` and `prev` of the next record; `None` before the first.
    next: Option<(u64, String)>,
    records: u64,
    key_id: Option<String>,
    continues: Option<String>,
}

impl<'k> Chain<'k> {
    fn new(key: Option<&'k AuditKey>) -> Self {
        Chain {
            key,
            keyed: None,
            next: None,
            records: 0,
            key_id: None,
            continues: None,
        }
    }

    /// Checks one record (already parsed) against the chain so far and extends it.
    fn push(&mut self, mut rec: Map<String, Value>) -> Result<u64, (Option<u64>, Fault)> {
        let seq = rec.get("seq").and_then(Value::as_u64);
        let broken = |reason: String| (seq, Fault::Broken(reason));
        let Some(hash) = rec
            .remove("hash")
            .and_then(|h| h.as_str().map(str::to_string))
        else {
            return Err(broken("has no hash".into()));
        };
        let Some(seq) = seq else {
            return Err(broken("has no seq".into()));
        };
        let keyed = match rec.get("alg") {
            None => false,
            Some(Value::String(a)) if a == ALG_PLAIN => false,
            Some(Value::String(a)) if a == ALG_HMAC => true,
            Some(other) => return Err(broken(format!("has an unknown alg {other}"))),
        };
        let kind = |k: bool| if k { "keyed" } else { "not keyed" };
        if let Some(before) = self.keyed.filter(|b| *b != keyed) {
            return Err(broken(format!(
                "is {} but the records before it are {}: one chain cannot mix keyed and unkeyed records (records were added or rewritten by someone without the key)",
                kind(keyed),
                kind(before)
            )));
        }
        self.keyed = Some(keyed);
        if keyed {
            let Some(key_id) = rec.get("key_id").and_then(Value::as_str) else {
                return Err(broken("is keyed but has no key_id".into()));
            };
            match self.key {
                None => return Err((Some(seq), Fault::KeyNeeded(key_id.to_string()))),
                Some(k) if k.id() != key_id => {
                    return Err((
                        Some(seq),
                        Fault::WrongKey(format!(
                            "was sealed with key_id {key_id}, but the given key is key_id {}",
                            k.id()
                        )),
                    ))
                }
                Some(_) => self.key_id = Some(key_id.to_string()),
            }
        } else if self.key.is_some() {
            return Err((
                Some(seq),
                Fault::NotKeyed(
                    "is not keyed, but a key was given: the log was written without the key, or rewritten by someone who does not hold it".into(),
                ),
            ));
        }
        let prev = rec.get("prev").and_then(Value::as_str);
        match &self.next {
            Some((n, _)) if seq != *n => {
                return Err(broken(format!(
                    "seq {seq} where {n} was expected (a record was deleted, inserted or reordered)"
                )))
            }
            Some((_, p)) if prev != Some(p.as_str()) => {
                return Err(broken(
                    "prev does not match the previous record's hash (a record was deleted, inserted or reordered)".into(),
                ))
            }
            Some(_) => {}
            None if seq == 1 => {
                if prev != Some(GENESIS) {
                    return Err(broken(
                        "is the first record but its prev is not the genesis value".into(),
                    ));
                }
            }
            None => {
                let rotated = rec.get("event").and_then(Value::as_str) == Some(EVENT_ROTATED);
                let previous = rec.get("previous_file").and_then(Value::as_str);
                match (rotated, previous, prev) {
                    (true, Some(file), Some(_)) => self.continues = Some(file.to_string()),
                    _ => {
                        return Err(broken(format!(
                            "the log starts at seq {seq}, not 1, and not with an audit.rotated record: its beginning is missing"
                        )))
                    }
                }
            }
        }
        let body = canonical_map(&rec);
        let intact = match self.key.filter(|_| keyed) {
            Some(k) => k.check(body.as_bytes(), &hash),
            None => sha256_hex(&body) == hash,
        };
        if !intact {
            return Err(broken(if keyed {
                "its HMAC does not match the record's contents (the record was edited, and its hash recomputed without the key)".into()
            } else {
                "hash does not match the record's contents (the record was edited)".into()
            }));
        }
        self.next = Some((seq + 1, hash));
        self.records += 1;
        Ok(seq)
    }
}

/// Splits a rotated file's name into its base and seq range.
pub(crate) fn split_rotated(name: &str) -> Option<(&str, u64, u64)> {
    let (base, range) = name.rsplit_once('.')?;
    let (a, b) = range.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if base.is_empty() || !digits(a) || !digits(b) {
        return None;
    }
    Some((base, a.parse().ok()?, b.parse().ok()?))
}

/// The name a file of `base` holding seqs `first..=last` gets when rotated.
pub(crate) fn rotated_name(base: &str, first: u64, last: u64) -> String {
    format!("{base}.{first:020}-{last:020}")
}

/// The files of one log, as found in its directory.
#[derive(Debug, Clone)]
pub(crate) struct Family {
    pub dir: PathBuf,
    pub base: String,
    /// Rotated files, oldest first: (first seq, name).
    pub rotated: Vec<(u64, String)>,
    /// Whether the base file exists.
    pub current: bool,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> VerifyError + '_ {
    move |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Family {
    /// The log in `dir` whose base file is `base` (which need not exist).
    pub fn scan(dir: &Path, base: &str) -> std::io::Result<Family> {
        let mut rotated = Vec::new();
        let mut current = false;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name == base {
                current = true;
            } else if let Some((b, first, _)) = split_rotated(&name) {
                if b == base {
                    rotated.push((first, name));
                }
            }
        }
        rotated.sort();
        Ok(Family {
            dir: dir.to_path_buf(),
            base: base.to_string(),
            rotated,
            current,
        })
    }

    /// The log `path` names: a directory holding one log (`*.jsonl` and its rotated files),
    /// the base file, or any rotated file of it.
    pub fn of(path: &Path) -> Result<Family, VerifyError> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        if meta.is_dir() {
            let mut bases = BTreeSet::new();
            for entry in std::fs::read_dir(path).map_err(io_err(path))? {
                let entry = entry.map_err(io_err(path))?;
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                if let Some((b, _, _)) = split_rotated(&name) {
                    bases.insert(b.to_string());
                } else if name.ends_with(".jsonl") {
                    bases.insert(name);
                }
            }
            let mut it = bases.into_iter();
            return match (it.next(), it.next()) {
                (Some(base), None) => Family::scan(path, &base).map_err(io_err(path)),
                (None, _) => Err(VerifyError::Layout(format!(
                    "{}: no audit log (*.jsonl or its rotated files) in this directory",
                    path.display()
                ))),
                (Some(a), Some(b)) => Err(VerifyError::Layout(format!(
                    "{}: holds more than one log ({a}, {b}, …); name the log file instead",
                    path.display()
                ))),
            };
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| VerifyError::Layout(format!("{}: not a log file", path.display())))?;
        let base = split_rotated(name).map_or(name, |(b, _, _)| b);
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Family::scan(dir, base).map_err(io_err(dir))
    }

    /// Every file, oldest first.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.rotated.iter().map(|(_, n)| self.dir.join(n)).collect();
        if self.current {
            v.push(self.dir.join(&self.base));
        }
        v
    }

    /// Opens every file, so that a rotation after this cannot hide one from the reader.
    pub fn open_all(&self) -> std::io::Result<Vec<(PathBuf, File)>> {
        self.files()
            .into_iter()
            .map(|p| File::open(&p).map(|f| (p, f)))
            .collect()
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Verifies the whole log `path` names (see [`Family::of`]): every file in order, the chain
/// continuous across them. With `key`, every record must be keyed with it.
pub fn verify_log(path: &Path, key: Option<&AuditKey>) -> Result<VerifySummary, VerifyError> {
    let files = Family::of(path)?.files();
    if files.is_empty() {
        return Err(VerifyError::Io {
            path: path.to_path_buf(),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    verify_files(&files, key)
}

/// Verifies an unkeyed log (see [`verify_log`]).
pub fn verify_file(path: &Path) -> Result<VerifySummary, VerifyError> {
    verify_log(path, None)
}

/// Verifies `files` as consecutive parts of one chain, oldest first. Only the last may end in
/// an incomplete line; it is reported, not counted.
pub(crate) fn verify_files(
    files: &[PathBuf],
    key: Option<&AuditKey>,
) -> Result<VerifySummary, VerifyError> {
    let mut chain = Chain::new(key);
    let mut summaries = Vec::new();
    let many = files.len() > 1;
    for (i, path) in files.iter().enumerate() {
        let name = file_name(path);
        let last_file = i + 1 == files.len();
        let at = |line: usize, seq: Option<u64>, reason: String| ChainError {
            file: many.then(|| name.clone()),
            line,
            seq,
            reason,
        };
        let mut r = BufReader::new(File::open(path).map_err(io_err(path))?);
        let mut buf = Vec::new();
        let mut summary = FileSummary {
            path: path.clone(),
            records: 0,
            first_seq: None,
            complete_len: 0,
            torn_tail: None,
        };
        let mut line_no = 0;
        loop {
            buf.clear();
            let n = r.read_until(b'\n', &mut buf).map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            if buf.last() != Some(&b'\n') {
                if last_file {
                    summary.torn_tail = Some(n as u64);
                    break;
                }
                return Err(VerifyError::Chain(at(
                    line_no,
                    None,
                    "is incomplete, in a file that is not the newest (the file was cut short)"
                        .into(),
                )));
            }
            let rec: Map<String, Value> = match serde_json::from_slice(&buf[..n - 1]) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
                    return Err(VerifyError::Chain(at(
                        line_no,
                        None,
                        "is not a JSON object".into(),
                    )))
                }
                Err(e) => {
                    return Err(VerifyError::Chain(at(
                        line_no,
                        None,
                        format!("is not valid JSON ({e})"),
                    )))
                }
            };
            if summary.records == 0 && i > 0 {
                let before = file_name(&files[i - 1]);
                let seq = rec.get("seq").and_then(Value::as_u64);
                let named = rec
                    .get("previous_file")
                    .and_then(Value::as_str)
                    .filter(|_| rec.get("event").and_then(Value::as_str) == Some(EVENT_ROTATED));
                match named {
                    Some(n) if n == before => {}
                    Some(n) => return Err(VerifyError::Chain(at(
                        line_no,
                        seq,
                        format!("this file continues {n}, but the file before it is {before}: {n} is missing (deleted or moved)"),
                    ))),
                    None => return Err(VerifyError::Chain(at(
                        line_no,
                        seq,
                        format!("this file does not begin with an audit.rotated record, so it does not continue {before}"),
                    ))),
                }
            }
            match chain.push(rec) {
                Ok(seq) => {
                    summary.first_seq.get_or_insert(seq);
                    summary.records += 1;
                    summary.complete_len += n as u64;
                }
                Err((seq, fault)) => {
                    return Err(match fault {
                        Fault::Broken(reason) => VerifyError::Chain(at(line_no, seq, reason)),
                        Fault::KeyNeeded(key_id) => VerifyError::KeyNeeded {
                            key_id,
                            at: at(line_no, seq, "keyed record".into()),
                        },
                        Fault::NotKeyed(reason) => VerifyError::NotKeyed(at(line_no, seq, reason)),
                        Fault::WrongKey(reason) => VerifyError::WrongKey(at(line_no, seq, reason)),
                    })
                }
            }
        }
        if summary.records == 0 && !last_file {
            return Err(VerifyError::Chain(at(
                1,
                None,
                "a rotated file holds no record".into(),
            )));
        }
        summaries.push(summary);
    }
    let (last_seq, last_hash) = chain
        .next
        .map(|(n, h)| (n - 1, h))
        .unwrap_or((0, GENESIS.to_string()));
    Ok(VerifySummary {
        records: chain.records,
        last_seq,
        last_hash,
        key_id: chain.key_id,
        continues: chain.continues,
        files: summaries,
    })
}

/// Which records to read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only records of this session.
    pub session: String,
    /// Only events starting with this (e.g. `credential.`).
    pub event_prefix: Option<String>,
}

impl AuditQuery {
    fn matches(&self, rec: &Map<String, Value>) -> bool {
        rec.get("session").and_then(Value::as_str) == Some(self.session.as_str())
            && self.event_prefix.as_deref().is_none_or(|p| {
                rec.get("event")
                    .and_then(Value::as_str)
                    .is_some_and(|e| e.starts_with(p))
            })
    }
}

/// Reads the records `q` selects from the log `path` names (see [`Family::of`]), oldest first.
/// Does not verify; an incomplete last line is skipped.
pub fn read_log(path: &Path, q: &AuditQuery) -> Result<Vec<Value>, VerifyError> {
    // A supervisor rotating between the directory listing and the opens moves a file away;
    // listing again finds it under its new name.
    let mut attempts = 0;
    loop {
        let family = Family::of(path)?;
        match family.open_all() {
            Ok(files) => return select(files, q),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
            Err(source) => {
                return Err(VerifyError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// The records of already opened files that `q` selects.
pub(crate) fn select(
    files: Vec<(PathBuf, File)>,
    q: &AuditQuery,
) -> Result<Vec<Value>, VerifyError> {
    let mut out = Vec::new();
    for (path, f) in files {
        let mut r = BufReader::new(f);
        let mut buf = Vec::new();
        let mut line_no = 0;
        loop {
            buf.clear();
            let n = r.read_until(b'\n', &mut buf).map_err(io_err(&path))?;
            // An incomplete last line is being written right now, or was cut off by a crash.
            if n == 0 || buf.last() != Some(&b'\n') {
                break;
            }
            line_no += 1;
            match serde_json::from_slice(&buf[..n - 1]) {
                Ok(Value::Object(m)) => {
                    if q.matches(&m) {
                        out.push(Value::Object(m));
                    }
                }
                _ => {
                    return Err(VerifyError::Chain(ChainError {
                        file: Some(file_name(&path)),
                        line: line_no,
                        seq: None,
                        reason: "is not a JSON object".into(),
                    }))
                }
            }
        }
    }
    Ok(out)
}
