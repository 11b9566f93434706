//! The audit log as operators and attackers meet it (AG-120 4.6): a keyed chain that an edit
//! with recomputed plain hashes cannot fool, rotation that `audit verify` follows across
//! files, group commit under concurrent writers, a writer killed with SIGKILL mid-write, the
//! `audit show` and `audit verify` commands, and `GET /v1/audit` on a running supervisor.
//! None of this needs Chromium: `serve` starts without a browser.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chaperone::audit::{
    canonical, read_log, verify_log, Audit, AuditKey, AuditQuery, FileOptions, FileSink,
    VerifyError,
};
use serde_json::{json, Map, Value};

const KEY: [u8; 32] = [0x5a; 32];

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chaperone"))
}

fn key() -> Arc<AuditKey> {
    Arc::new(AuditKey::from_bytes(&KEY).unwrap())
}

fn key_file(dir: &Path, bytes: &[u8], mode: u32) -> PathBuf {
    let p = dir.join(format!("audit-{mode:o}.key"));
    std::fs::write(&p, bytes).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// `n` records alternating between sessions s1 and s2.
fn write_log(path: &Path, n: u64, opts: FileOptions) {
    let sink = FileSink::open_with(path, opts).unwrap();
    for i in 0..n {
        let (session, event) = if i % 2 == 0 {
            ("s1", "credential.injected")
        } else {
            ("s2", "session.created")
        };
        sink.append(
            event,
            Some(session),
            fields(json!({"credential": "bank", "host": "bank.test", "token": "fp:0011", "i": i})),
        )
        .unwrap();
    }
}

/// Runs `chaperone` with `args`; returns (exit code, stdout, stderr).
fn chaperone(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn ag120_4_6_with_a_key_an_edited_record_with_recomputed_plain_hashes_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    write_log(
        &log,
        6,
        FileOptions {
            key: Some(key()),
            rotate_bytes: None,
        },
    );
    let kf = key_file(dir.path(), &KEY, 0o600);
    let (code, out, _) = chaperone(&["audit", "verify", s(&log), "--key-file", s(&kf)]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("6 records, chain intact") && out.contains(key().id()),
        "{out}"
    );

    // Without the key a keyed log is not reported as verified.
    let (code, out, _) = chaperone(&["audit", "verify", s(&log)]);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains("NOT verified") && out.contains("keyed") && !out.contains("intact"),
        "{out}"
    );

    // Another key is named as such.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let wrong = key_file(&other, &[0x11; 32], 0o600);
    let (code, out, _) = chaperone(&["audit", "verify", s(&log), "--key-file", s(&wrong)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("key_id"), "{out}");

    // The attack: rewrite record 3 (a credential use now names another host) and recompute
    // every hash from there on with plain SHA-256, as anyone who can write the file can.
    let mut l = lines(&log);
    let mut prev = serde_json::from_str::<Value>(&l[1]).unwrap()["hash"]
        .as_str()
        .unwrap()
        .to_string();
    l[2] = l[2].replace("bank.test", "elsewhere.test");
    for line in l.iter_mut().skip(2) {
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
    std::fs::write(&log, l.join("\n") + "\n").unwrap();
    let (code, out, _) = chaperone(&["audit", "verify", s(&log), "--key-file", s(&kf)]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("line 3") && out.contains("seq 3") && out.contains("edited"),
        "{out}"
    );
}

#[test]
fn a_key_file_others_can_read_or_too_short_is_refused_by_verify_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    write_log(&log, 1, FileOptions::default());
    let open = key_file(dir.path(), &KEY, 0o644);
    let (code, _, err) = chaperone(&["audit", "verify", s(&log), "--key-file", s(&open)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(s(&open)) && err.contains("chmod 600"), "{err}");

    let short = key_file(dir.path(), &KEY[..20], 0o600);
    let fresh = dir.path().join("fresh.jsonl");
    let mut serve = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--control")
        .arg(format!("unix:{}", dir.path().join("c.sock").display()))
        .args(["--audit-log", s(&fresh), "--audit-key-file", s(&short)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_bounded(&mut serve, Duration::from_secs(60));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status, Some(1), "serve with a short key: {err}");
    assert!(
        err.contains("audit.key_file") && err.contains(s(&short)) && err.contains("at least 32"),
        "{err}"
    );
    assert!(!fresh.exists(), "a log was started without its key");
}

/// Waits for `child` to exit, at most `limit` (then kills it); returns its exit code.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn rotation_across_three_files_verifies_and_a_deleted_middle_file_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let logdir = dir.path().join("log");
    let log = logdir.join("audit.jsonl");
    write_log(
        &log,
        20,
        FileOptions {
            key: Some(key()),
            rotate_bytes: Some(1200),
        },
    );
    let kf = key_file(dir.path(), &KEY, 0o600);
    let sum = verify_log(&log, Some(&key())).unwrap();
    assert!(sum.files.len() >= 4, "{:?}", sum.files);
    let rotated: Vec<PathBuf> = sum.files[..sum.files.len() - 1]
        .iter()
        .map(|f| f.path.clone())
        .collect();

    // The directory, the base file and any rotated file all name the whole log.
    for target in [&logdir, &log, &rotated[1]] {
        let (code, out, err) = chaperone(&["audit", "verify", s(target), "--key-file", s(&kf)]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("chain intact") && out.contains(&format!("{} files", sum.files.len())),
            "{out}"
        );
    }

    // The newest file alone (older ones shipped elsewhere) verifies from where it starts,
    // and says it continues an earlier file.
    let alone = dir.path().join("alone");
    std::fs::create_dir(&alone).unwrap();
    std::fs::copy(&log, alone.join("audit.jsonl")).unwrap();
    let (code, out, _) = chaperone(&[
        "audit",
        "verify",
        s(&alone.join("audit.jsonl")),
        "--key-file",
        s(&kf),
    ]);
    assert_eq!(code, 0, "{out}");
    let previous = rotated
        .last()
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        out.contains("continues an earlier file") && out.contains(previous),
        "{out}"
    );

    // A middle file deleted: the next file names it as missing.
    let middle = rotated[1]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(&rotated[1]).unwrap();
    let (code, out, _) = chaperone(&["audit", "verify", s(&logdir), "--key-file", s(&kf)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(&middle) && out.contains("missing"), "{out}");
    // And the supervisor refuses to extend a log whose newest link is gone.
    std::fs::remove_file(rotated.last().unwrap()).unwrap();
    let e = FileSink::open_with(
        &log,
        FileOptions {
            key: Some(key()),
            rotate_bytes: Some(1200),
        },
    )
    .err()
    .expect("opened a log with a missing file");
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn concurrent_records_get_distinct_consecutive_seqs_and_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let seqs = rt.block_on(async {
        let audit = Audit::open(
            &log,
            FileOptions {
                key: Some(key()),
                rotate_bytes: Some(16 * 1024),
            },
        )
        .unwrap();
        let mut tasks = Vec::new();
        for t in 0..32u64 {
            let audit = audit.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..25u64 {
                    let session = format!("s{t}");
                    mine.push(
                        audit
                            .record("x.load", Some(&session), json!({ "i": i }))
                            .await
                            .unwrap(),
                    );
                }
                mine
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            let mine = t.await.unwrap();
            // One task's records are in the order it wrote them.
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
            all.extend(mine);
        }
        all
    });
    let sum = verify_log(&log, Some(&key())).unwrap();
    // Rotation adds its own audit.rotated records between the others.
    let all: Vec<Value> = sum
        .files
        .iter()
        .flat_map(|f| lines(&f.path))
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    let mut expected: Vec<u64> = all
        .iter()
        .filter(|r| r["event"] == "x.load")
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    let mut got = seqs.clone();
    got.sort();
    expected.sort();
    assert_eq!(got.len(), 800);
    assert_eq!(got, expected, "every acknowledged seq is a record on disk");
    got.dedup();
    assert_eq!(got.len(), 800, "seqs are distinct");
    let on_disk: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(on_disk, (1..=sum.last_seq).collect::<Vec<_>>());
    assert!(sum.files.len() > 1, "rotation happened under load");
}

const CRASH_CHILD: &str = "CHAPERONE_AUDIT_CRASH_CHILD";
const CRASH_TEST: &str =
    "ag120_4_6_a_writer_killed_mid_write_leaves_a_log_that_verifies_to_its_last_complete_record";

/// The child side of the crash test: writes from many tasks until killed (or a bound).
fn write_until_killed(log: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let audit = Audit::open(
            log,
            FileOptions {
                key: Some(key()),
                rotate_bytes: Some(128 * 1024),
            },
        )
        .unwrap();
        let pad = "x".repeat(1500);
        let mut tasks = Vec::new();
        for t in 0..8 {
            let (audit, pad) = (audit.clone(), pad.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..5000u64 {
                    let seq = audit
                        .record(
                            "credential.injected",
                            Some("s-crash"),
                            json!({ "task": t, "i": i, "pad": pad }),
                        )
                        .await
                        .unwrap();
                    println!("acked {seq}");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ag120_4_6_a_writer_killed_mid_write_leaves_a_log_that_verifies_to_its_last_complete_record() {
    if let Ok(log) = std::env::var(CRASH_CHILD) {
        write_until_killed(Path::new(&log));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", CRASH_TEST, "--nocapture", "--test-threads", "1"])
        .env(CRASH_CHILD, &log)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let acked = Arc::new(AtomicU64::new(0));
    let reader = {
        let acked = acked.clone();
        let out = child.0.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("acked ").and_then(|n| n.parse().ok()) {
                    acked.fetch_max(n, Ordering::SeqCst);
                }
            }
        })
    };
    // Kill it once at least half a megabyte is on disk, across several rotated files.
    let on_disk = || -> u64 {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while on_disk() < 512 * 1024 {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the writer exited before it was killed"
        );
        assert!(Instant::now() < deadline, "the writer wrote too little");
        std::thread::sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = child.0.wait();
    reader.join().unwrap();
    let acked = acked.load(Ordering::SeqCst);
    assert!(acked > 0, "the writer acknowledged nothing");

    let sum = match verify_log(&log, Some(&key())) {
        Ok(sum) => sum,
        Err(e) => panic!("the log left by SIGKILL does not verify: {e}"),
    };
    assert!(
        sum.last_seq >= acked,
        "record {acked} was acknowledged but is not in the log (last {})",
        sum.last_seq
    );
    assert!(sum.files.len() > 1, "{:?}", sum.files);
    let kf = key_file(dir.path(), &KEY, 0o600);
    let (code, out, _) = chaperone(&["audit", "verify", s(&log), "--key-file", s(&kf)]);
    eprintln!("after SIGKILL (last acknowledged seq {acked}): {out}");
    let torn = sum.torn_tail();
    match torn {
        None => assert_eq!(code, 0, "{out}"),
        Some(_) => {
            assert_eq!(code, 3, "{out}");
            assert!(
                out.contains(&format!("{} records verified", sum.records))
                    && out.contains("the last line is incomplete (a write was cut off)"),
                "{out}"
            );
        }
    }

    // The next supervisor continues the chain (after dropping a torn line, if there was one).
    let sink = FileSink::open_with(
        &log,
        FileOptions {
            key: Some(key()),
            rotate_bytes: Some(128 * 1024),
        },
    )
    .unwrap();
    let next = sink.append("supervisor.started", None, Map::new()).unwrap();
    drop(sink);
    let after = verify_log(&log, Some(&key())).unwrap();
    assert_eq!(after.torn_tail(), None);
    assert!(after.last_seq >= next && next > sum.last_seq);
    let recovered = lines(&log)
        .iter()
        .any(|l| l.contains("\"event\":\"audit.recovered\""));
    assert_eq!(
        recovered,
        torn.is_some(),
        "audit.recovered iff a line was cut"
    );
}

#[test]
fn a_torn_last_line_is_reported_distinctly_and_recovered_by_the_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    write_log(&log, 3, FileOptions::default());
    let whole = std::fs::read(&log).unwrap();
    let mut torn = whole.clone();
    torn.extend_from_slice(br#"{"event":"session.revoked","hash":"ab"#);
    std::fs::write(&log, &torn).unwrap();
    let (code, out, _) = chaperone(&["audit", "verify", s(&log)]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("3 records verified; the last line is incomplete (a write was cut off)"),
        "{out}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let running = chaperone::server::start(config(dir.path(), &log, None, None))
            .await
            .unwrap();
        running.stop().await;
    });
    let (code, out, _) = chaperone(&["audit", "verify", s(&log)]);
    assert_eq!(code, 0, "{out}");
    let recs: Vec<Value> = lines(&log)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs[3]["event"], "audit.recovered");
    assert_eq!(recs[3]["dropped_bytes"], 37);
    assert_eq!(recs[4]["event"], "supervisor.started");
    assert!(std::fs::read(&log).unwrap().starts_with(&whole));
}

fn config(
    dir: &Path,
    log: &Path,
    key_file: Option<&Path>,
    rotate: Option<u64>,
) -> chaperone::config::Config {
    chaperone::config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        control: chaperone::config::ControlAddr::Unix(dir.join("control.sock")),
        audit_log: log.to_path_buf(),
        audit: chaperone::config::AuditConfig {
            key_file: key_file.map(Path::to_path_buf),
            rotate_bytes: rotate.map(bytesize::ByteSize::b),
        },
        ..Default::default()
    }
}

#[test]
fn ag120_4_6_get_v1_audit_and_audit_show_return_one_sessions_records_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let kf = key_file(dir.path(), &KEY, 0o600);
    write_log(
        &log,
        10,
        FileOptions {
            key: Some(key()),
            rotate_bytes: Some(900),
        },
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let running = chaperone::server::start(config(dir.path(), &log, Some(&kf), Some(900)))
            .await
            .unwrap();
        let api = |path: String| {
            let control = running.control.clone();
            async move {
                chaperone::client::request(&control, None, "GET", &path, None)
                    .await
                    .unwrap()
            }
        };
        let (status, body) = api("/v1/audit?session=s1".into()).await;
        assert_eq!(status, 200, "{body}");
        let recs = body["records"].as_array().unwrap();
        let is: Vec<u64> = recs.iter().map(|r| r["i"].as_u64().unwrap()).collect();
        assert_eq!(is, [0, 2, 4, 6, 8], "{body}");
        assert!(recs.iter().all(|r| r["session"] == "s1"
            && r["host"] == "bank.test"
            && r["token"] == "fp:0011"
            && r["ts"].is_string()));

        let (status, body) = api("/v1/audit?session=s2&event=credential.".into()).await;
        assert_eq!(
            (status, body["records"].as_array().unwrap().len()),
            (200, 0)
        );
        let (status, body) = api("/v1/audit?session=s2&event=session.".into()).await;
        assert_eq!(
            (status, body["records"].as_array().unwrap().len()),
            (200, 5)
        );
        let (status, body) = api("/v1/audit?session=nobody".into()).await;
        assert_eq!(
            (status, body["records"].as_array().unwrap().len()),
            (200, 0)
        );

        let (status, body) = api("/v1/audit".into()).await;
        assert_eq!(status, 400);
        assert!(
            body["error"].as_str().unwrap().contains("session"),
            "{body}"
        );
        let (status, body) = api("/v1/audit?sesion=s1".into()).await;
        assert_eq!(status, 400);
        assert!(body["error"].as_str().unwrap().contains("sesion"), "{body}");

        // The route sits behind the same operator-token check as every other one.
        use tower::ServiceExt;
        let app = chaperone::control::router(running.registry.clone(), Some("t".repeat(32)));
        let req = |auth: Option<String>| {
            let mut b = axum::http::Request::get("/v1/audit?session=s1");
            if let Some(a) = auth {
                b = b.header("authorization", a);
            }
            b.body(axum::body::Body::empty()).unwrap()
        };
        let resp = app.clone().oneshot(req(None)).await.unwrap();
        assert_eq!(resp.status(), 401);
        let resp = app
            .oneshot(req(Some(format!("Bearer {}", "t".repeat(32)))))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        running.stop().await;
    });

    // The same, from the files, with no supervisor running.
    let (code, out, err) = chaperone(&["audit", "show", "--session", "s1", "--file", s(&log)]);
    assert_eq!(code, 0, "{err}");
    let shown: Vec<&str> = out.lines().collect();
    assert_eq!(shown.len(), 5, "{out}");
    assert!(
        shown.iter().all(|l| l.contains("credential.injected")
            && l.contains("host=bank.test")
            && l.contains("token=fp:0011")
            && !l.contains("hash=")),
        "{out}"
    );
    let (code, out, _) = chaperone(&[
        "audit",
        "show",
        "--session",
        "s2",
        "--event",
        "session.",
        "--json",
        "--file",
        s(&dir.path().join("audit.jsonl")),
    ]);
    assert_eq!(code, 0);
    let recs: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 5, "{out}");
    assert!(recs
        .iter()
        .all(|r| r["session"] == "s2" && r["event"] == "session.created"));
    let (code, out, _) = chaperone(&["audit", "verify", s(&log), "--key-file", s(&kf)]);
    assert_eq!(code, 0, "{out}");
    // The library reads the same records.
    let q = AuditQuery {
        session: "s1".into(),
        event_prefix: None,
    };
    assert_eq!(read_log(&log, &q).unwrap().len(), 5);
    assert!(matches!(
        verify_log(&log, None),
        Err(VerifyError::KeyNeeded { .. })
    ));
}
