//! Lifecycle (AG-120 4.1, 4.5, 4.6): ttl expiry, revocation, SIGTERM and SIGKILL of the
//! supervisor, and Chromium killed from outside each end with no process left, the right
//! audit records, and the agent seeing a close frame rather than a hang.

mod common;

use common::*;
use serde_json::{json, Value};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn events_of(sup: &Supervisor, session: &str) -> Vec<String> {
    sup.audit_records()
        .into_iter()
        .filter(|r| r["session"] == json!(session))
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect()
}

/// Connects an agent, proves it works, and returns it.
async fn agent(url: &str) -> Cdp {
    let mut c = Cdp::connect(url).await;
    let v = c.call("Browser.getVersion", json!({}), None).await;
    assert!(
        v["result"]["product"].as_str().unwrap().contains("Chrome"),
        "{v}"
    );
    c
}

#[test]
fn ag120_4_1_ttl_expiry_closes_kills_and_purges() {
    let sup = Supervisor::start();
    let s = sup.session(&mandate(3, &["site.test"]));
    let id = s["id"].as_str().unwrap();
    let procs = chromium_under(sup.pid());
    assert!(!procs.is_empty(), "no Chromium under the supervisor");
    let ended = rt().block_on(async {
        let mut c = agent(s["cdp_url"].as_str().unwrap()).await;
        c.wait_end().await
    });
    match ended {
        Ended::Close(1001, reason) => assert!(reason.contains("expired"), "{reason}"),
        other => panic!("agent saw {other:?}, not a close frame"),
    }
    sup.wait_audit("session.purged", |r| {
        r["event"] == "session.purged" && r["session"] == id
    });
    assert_eq!(
        wait_gone(&procs),
        Vec::<i32>::new(),
        "Chromium outlived its mandate"
    );
    let ev = events_of(&sup, id);
    assert_eq!(
        ev,
        [
            "session.created",
            "session.active",
            "session.expired",
            "session.purged"
        ],
        "{ev:?}"
    );
    let expired = sup.events("session.expired").pop().unwrap();
    assert_eq!(expired["trigger"], "mandate_expiry", "{expired}");
    // `session.purged` is on disk before the registry's state says so (a transition is
    // recorded before it is acknowledged): wait (bounded) for the state.
    let mut body = Value::Null;
    for _ in 0..200 {
        body = sup.api("GET", &format!("/v1/sessions/{id}"), None).1;
        if body["state"] == "purged" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert_eq!(body["state"], "purged", "{body}");
    assert_eq!(body["end_reason"], "expired");
}

#[test]
fn ag120_4_5_revocation_purges_before_answering() {
    let sup = Supervisor::start();
    let s = sup.session(&mandate(300, &["site.test"]));
    let id = s["id"].as_str().unwrap().to_string();
    let procs = chromium_under(sup.pid());
    let url = s["cdp_url"].as_str().unwrap().to_string();
    let rt = rt();
    let mut c = rt.block_on(agent(&url));
    let (status, body) = sup.api("DELETE", &format!("/v1/sessions/{id}"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["state"], "purged",
        "DELETE answered before the purge: {body}"
    );
    // Answered after the purge: nothing may be left already, without waiting.
    let alive: Vec<i32> = procs.iter().copied().filter(|p| alive(*p)).collect();
    assert!(
        alive.is_empty(),
        "processes alive after DELETE answered: {alive:?}"
    );
    match rt.block_on(c.wait_end()) {
        Ended::Close(1001, reason) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("agent saw {other:?}"),
    }
    assert_eq!(
        events_of(&sup, &id),
        [
            "session.created",
            "session.active",
            "session.revoked",
            "session.purged"
        ]
    );
    let purged = sup.wait_audit("purged", |r| r["event"] == "session.purged");
    assert_eq!(purged["processes_left"], 0);
    let revoked = sup.events("session.revoked").pop().unwrap();
    assert_eq!(revoked["trigger"], "operator_revoke", "{revoked}");
    // The capability is dead.
    let (status, _) = sup.api("DELETE", "/v1/sessions/nonexistent", None);
    assert_eq!(status, 404);
}

#[test]
fn sigterm_of_the_supervisor_purges_every_session() {
    let mut sup = Supervisor::start();
    let a = sup.session(&mandate(300, &["site.test"]));
    let b = sup.session(&mandate(300, &["site.test"]));
    let procs = chromium_under(sup.pid());
    let rt = rt();
    let mut ca = rt.block_on(agent(a["cdp_url"].as_str().unwrap()));
    let mut cb = rt.block_on(agent(b["cdp_url"].as_str().unwrap()));
    let status = sup.stop();
    assert!(status.success(), "supervisor exit: {status:?}");
    for c in [&mut ca, &mut cb] {
        match rt.block_on(c.wait_end()) {
            Ended::Close(1001, reason) => assert!(reason.contains("shutting down"), "{reason}"),
            other => panic!("agent saw {other:?}"),
        }
    }
    assert_eq!(wait_gone(&procs), Vec::<i32>::new());
    for s in [&a, &b] {
        let id = s["id"].as_str().unwrap();
        assert_eq!(
            events_of(&sup, id),
            [
                "session.created",
                "session.active",
                "session.shutdown",
                "session.purged"
            ]
        );
    }
    for r in sup.events("session.shutdown") {
        assert_eq!(r["trigger"], "supervisor_shutdown", "{r}");
    }
    let last = sup.audit_records().pop().unwrap();
    assert_eq!(last["event"], "supervisor.stopped");
    assert!(chaperone::audit::verify_file(&sup.audit).is_ok());
}

#[test]
fn sigkill_of_the_supervisor_leaves_no_chromium() {
    let mut sup = Supervisor::start();
    let _s = sup.session(&mandate(300, &["site.test"]));
    let all = descendants(sup.pid());
    let procs = chromium_under(sup.pid());
    assert!(!procs.is_empty());
    let mut child = sup.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        wait_gone(&all),
        Vec::<i32>::new(),
        "processes survived SIGKILL of the supervisor"
    );
}

#[test]
fn chromium_killed_from_outside_ends_the_session_as_crashed() {
    let sup = Supervisor::start();
    let s = sup.session(&mandate(300, &["site.test"]));
    let id = s["id"].as_str().unwrap().to_string();
    let procs = chromium_under(sup.pid());
    // The browser process is the Chromium whose command line has no --type=.
    let browser = *procs
        .iter()
        .find(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            !String::from_utf8_lossy(&cmd).contains("--type=")
        })
        .expect("browser process");
    let rt = rt();
    let mut c = rt.block_on(agent(s["cdp_url"].as_str().unwrap()));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(browser),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    match rt.block_on(c.wait_end()) {
        Ended::Close(code, reason) => {
            assert!(code == 1001 || code == 1011, "{code}");
            assert!(
                reason.contains("crash") || reason.contains("browser is gone"),
                "{reason}"
            );
        }
        other => panic!("agent saw {other:?}"),
    }
    sup.wait_audit("purged", |r| {
        r["event"] == "session.purged" && r["session"] == json!(id)
    });
    assert_eq!(wait_gone(&procs), Vec::<i32>::new());
    assert_eq!(
        events_of(&sup, &id),
        [
            "session.created",
            "session.active",
            "session.crashed",
            "session.purged"
        ]
    );
    let (_, body) = sup.api("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(body["end_reason"], "crashed");
}

#[test]
fn chaperone_run_gives_the_command_a_session_and_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let out = std::process::Command::new(bin())
        .args(["run", "--profile"])
        .arg(repo().join("profiles/ci.toml"))
        .arg("--audit-log")
        .arg(&audit)
        .args([
            "--",
            "sh",
            "-c",
            "case \"$CHAPERONE_CDP_URL\" in ws://*/devtools/browser/*) exit 7;; *) exit 1;; esac",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<String> = read_audit(&audit)
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect();
    assert!(events.contains(&"session.purged".to_string()), "{events:?}");
    assert_eq!(events.last().unwrap(), "supervisor.stopped");
}

#[test]
fn chaperone_run_purges_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut child = std::process::Command::new(bin())
        .args(["run", "--audit-log"])
        .arg(&audit)
        .args(["--", "sleep", "120"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded) until the session is active, then press Ctrl-C.
    sup_wait(&audit, "session.active");
    let procs = chromium_under(child.id() as i32);
    assert!(!procs.is_empty());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_eq!(wait_gone(&procs), Vec::<i32>::new());
    let events: Vec<String> = read_audit(&audit)
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect();
    assert!(events.contains(&"session.purged".to_string()), "{events:?}");
}

fn sup_wait(audit: &std::path::Path, event: &str) {
    for _ in 0..600 {
        if read_audit(audit).iter().any(|r| r["event"] == event) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{event} never appeared in {}", audit.display());
}
