//! Sandbox posture, read from /proc for every process of a session (the way gVisor checks its
//! own): namespaces, capabilities, no_new_privs, Chromium's own seccomp sandbox, the network
//! namespace's interfaces and sockets, per-session host uids, and files that must not be
//! reachable from inside. Then the supervisor's own continuous checks of the same: a normal
//! session never drifts, and a process placed into a session's namespaces from outside gets
//! it revoked and purged.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{json, Value};

fn status_field(pid: i32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or("")
        .trim()
        .to_string()
}

fn ns(pid: i32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn cmdline(pid: i32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

#[test]
fn every_session_process_is_confined() {
    let site = Site::start(TEST_PAGE);
    let sup = Supervisor::start();
    let a = sup.session(&mandate(300, &["site.test"]));
    let b = sup.session(&mandate(300, &["site.test"]));
    // A page, so that renderers exist; and an attempt to read a host file from inside.
    let shadow = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = Cdp::connect(a["cdp_url"].as_str().unwrap()).await;
        let p = c
            .open_page(&format!("http://site.test:{}/", site.port()))
            .await;
        // The gate refuses the navigation; the page stays where it was.
        let refused = c
            .call(
                "Page.navigate",
                json!({"url": "file:///etc/shadow"}),
                Some(&p),
            )
            .await;
        assert_eq!(refused["error"]["code"], -32000, "{refused}");
        let reason = refused["error"]["message"].as_str().unwrap_or("");
        assert!(reason.contains("`file:` URLs"), "{refused}");
        c.eval(&p, "document.body ? document.body.innerText : ''")
            .await
    });
    assert!(
        !shadow.as_str().unwrap_or("").contains("root:"),
        "/etc/shadow was readable from inside: {shadow}"
    );

    let me = std::process::id() as i32;
    let all = chromium_under(sup.pid());
    assert!(
        all.len() >= 4,
        "expected browser, zygotes and renderers: {all:?}"
    );
    let browser = *all
        .iter()
        .find(|p| !cmdline(**p).contains("--type="))
        .expect("the browser process");
    let mut renderers = 0;
    for &p in &all {
        let what = format!("pid {p} ({})", cmdline(p));
        for kind in ["user", "pid", "net", "mnt"] {
            assert_ne!(
                ns(p, kind),
                ns(me, kind),
                "{what}: shares the {kind} namespace"
            );
        }
        // Chromium's zygote nests a user namespace of its own below ours and keeps
        // capabilities inside it (its sandbox needs them there); in our namespace, none.
        if ns(p, "user") == ns(browser, "user") {
            assert_eq!(status_field(p, "CapEff"), "0000000000000000", "{what}");
        }
        assert_eq!(status_field(p, "NoNewPrivs"), "1", "{what}");
        let uid = status_field(p, "Uid");
        assert!(
            !uid.starts_with("0\t") && !uid.starts_with("0 "),
            "{what}: runs as host root: {uid}"
        );
        if cmdline(p).contains("--type=renderer") {
            renderers += 1;
            assert_eq!(
                status_field(p, "Seccomp"),
                "2",
                "{what}: Chromium's sandbox is off"
            );
        }
        // Nothing of the host's filesystem beyond the allowed binds.
        let root = format!("/proc/{p}/root");
        for secret in ["etc/shadow", "etc/passwd", "root/.cargo", "work", "var/lib"] {
            let path = format!("{root}/{secret}");
            assert!(
                std::fs::metadata(&path).is_err(),
                "{what}: /{secret} visible inside"
            );
        }
        assert!(
            std::fs::metadata(format!(
                "{root}{}",
                sup.dir.path().join("config.toml").display()
            ))
            .is_err(),
            "{what}: the supervisor's config is visible inside"
        );
    }
    assert!(renderers >= 1, "no renderer found among {all:?}");

    // The browser's network namespace: only lo, and the only listening socket is the proxy's.
    let dev = std::fs::read_to_string(format!("/proc/{browser}/net/dev")).unwrap();
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "{dev}");
    let mut listening = Vec::new();
    for f in ["tcp", "tcp6"] {
        let t = std::fs::read_to_string(format!("/proc/{browser}/net/{f}")).unwrap();
        for l in t.lines().skip(1) {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.get(3) == Some(&"0A") {
                listening.push(cols[1].to_string());
            }
        }
    }
    assert_eq!(
        listening,
        ["0100007F:0C38"],
        "listening sockets: {listening:?}"
    );
    assert!(
        std::fs::read_to_string(format!("/proc/{browser}/net/udp"))
            .unwrap()
            .lines()
            .count()
            <= 1
    );

    // Per-session host uids when the supervisor is root: the supervisor's children are the
    // sessions' launchers; everything below one launcher is one session.
    if nix::unistd::geteuid().is_root() {
        let parent_of = |p: i32| -> Option<i32> {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            stat.rsplit_once(") ")?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        let launchers: Vec<i32> = descendants(sup.pid())
            .into_iter()
            .filter(|p| parent_of(*p) == Some(sup.pid()))
            .collect();
        assert_eq!(launchers.len(), 2, "{launchers:?}");
        let uid_sets: Vec<BTreeSet<String>> = launchers
            .iter()
            .map(|l| {
                descendants(*l)
                    .iter()
                    .filter(|p| alive(**p))
                    .map(|p| {
                        let uid = status_field(*p, "Uid");
                        uid.split_whitespace().next().unwrap_or("").to_string()
                    })
                    .collect()
            })
            .collect();
        for set in &uid_sets {
            assert_eq!(set.len(), 1, "one session runs under several uids: {set:?}");
            assert!(!set.contains("0"), "{set:?}");
        }
        assert_ne!(uid_sets[0], uid_sets[1], "two sessions share a host uid");
    }
    let view = sup
        .api(
            "GET",
            &format!("/v1/sessions/{}", b["id"].as_str().unwrap()),
            None,
        )
        .1;
    assert_eq!(view["degraded"], json!([]), "{view}");
}

// ---- Continuous integrity: the supervisor re-verifies live sessions ----

const POSTURE_EVERY_SECOND: &str = "[posture]\ninterval = \"1s\"\n";

/// A counter from `GET /metrics` (text, which the client hands back as `{"error": text}`).
fn metric(sup: &Supervisor, name: &str) -> u64 {
    let (_, m) = sup.api("GET", "/metrics", None);
    m["error"]
        .as_str()
        .unwrap_or("")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

fn state(sup: &Supervisor, id: &str) -> String {
    let (_, v) = sup.api("GET", &format!("/v1/sessions/{id}"), None);
    v["state"].as_str().unwrap_or("").to_string()
}

/// The session's browser process (the Chromium process without `--type=`).
fn browser_pid(sup: &Supervisor) -> i32 {
    *chromium_under(sup.pid())
        .iter()
        .find(|p| !cmdline(**p).contains("--type="))
        .expect("the browser process")
}

fn am_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Waits (bounded) until the session's drift record names `pid`; then the session's end and
/// purge. Returns (posture_drift, end, purged).
fn revoked_for_drift(sup: &Supervisor, id: &str, pid: i32) -> (Value, Value, Value) {
    let drift = sup.wait_audit("session.posture_drift", |r| {
        r["event"] == "session.posture_drift" && r["session"] == id
    });
    assert!(
        drift["pids"].as_array().unwrap().contains(&json!(pid)),
        "the drift record does not name the intruder {pid}: {drift}"
    );
    let end = sup.wait_audit("the session's end", |r| {
        r["session"] == id && r["trigger"].is_string()
    });
    let purged = sup.wait_audit("session.purged", |r| {
        r["event"] == "session.purged" && r["session"] == id
    });
    assert!(
        drift["seq"].as_u64() < end["seq"].as_u64(),
        "{drift}\n{end}"
    );
    assert!(
        end["seq"].as_u64() < purged["seq"].as_u64(),
        "{end}\n{purged}"
    );
    (drift, end, purged)
}

/// The checks the drift record names for `pid`.
fn checks_for(drift: &Value, pid: i32) -> BTreeSet<String> {
    drift["drift"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["pid"] == json!(pid))
        .map(|d| d["check"].as_str().unwrap().to_string())
        .collect()
}

/// Spawns `nsenter -t TARGET <flags> sleep 300` from outside the session.
fn nsenter_sleep(target: i32, flags: &[&str]) -> std::process::Child {
    std::process::Command::new("nsenter")
        .arg("-t")
        .arg(target.to_string())
        .args(flags)
        .args(["sleep", "300"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("run nsenter")
}

/// The `sleep` running under (or as) the nsenter process `root`, waited for (bounded).
fn sleep_of(root: i32) -> i32 {
    for _ in 0..400 {
        let candidates = std::iter::once(root).chain(descendants(root));
        for p in candidates {
            let exe = std::fs::read_link(format!("/proc/{p}/exe")).unwrap_or_default();
            if exe.ends_with("sleep") && alive(p) {
                return p;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("nsenter (pid {root}) never ran sleep");
}

#[test]
fn posture_a_normal_session_with_pages_coming_and_going_does_not_drift() {
    let site = Site::start(TEST_PAGE);
    let sup = Supervisor::start_with_config(POSTURE_EVERY_SECOND);
    let s = sup.session(&mandate(300, &["site.test"]));
    let id = s["id"].as_str().unwrap();
    let url = format!("http://site.test:{}/", site.port());
    let path = format!("/v1/sessions/{id}/posture");
    let mut asked = 0;
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        // Renderers start and exit, over several check intervals; the posture is asked for
        // while they do.
        for _ in 0..4 {
            let mut targets = Vec::new();
            for _ in 0..2 {
                let t = c
                    .call("Target.createTarget", json!({"url": "about:blank"}), None)
                    .await;
                let target = t["result"]["targetId"].as_str().unwrap().to_string();
                let a = c
                    .call(
                        "Target.attachToTarget",
                        json!({"targetId": target, "flatten": true}),
                        None,
                    )
                    .await;
                let session = a["result"]["sessionId"].as_str().unwrap().to_string();
                c.call("Page.enable", json!({}), Some(&session)).await;
                c.navigate(&session, &url).await;
                targets.push(target);
            }
            let (status, report) = sup.api("GET", &path, None);
            asked += 1;
            assert_eq!(status, 200, "{report}");
            assert_eq!(report["ok"], true, "drift in a normal session: {report}");
            assert!(report["processes"].as_u64() > Some(0), "{report}");
            assert_eq!(report["session"], id);
            assert!(report["checked_at"].is_string(), "{report}");
            for t in targets {
                c.call("Target.closeTarget", json!({"targetId": t}), None)
                    .await;
            }
        }
        // The lifecycle checked on its own too: wait (bounded) for three periodic checks.
        let mut periodic = 0;
        for _ in 0..200 {
            periodic = metric(&sup, "chaperone_posture_checks_total").saturating_sub(asked);
            if periodic >= 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(periodic >= 3, "the lifecycle ran {periodic} posture checks");
        assert_eq!(state(&sup, id), "active");
        let alive = c.call("Target.getTargets", json!({}), None).await;
        assert!(alive["result"].is_object(), "{alive}");
    });
    // Detached (or about to be) once the agent's connection closed; not ended.
    let after = state(&sup, id);
    assert!(["active", "detached"].contains(&after.as_str()), "{after}");
    assert!(sup.events("session.posture_drift").is_empty());
    let (status, report) = sup.api("GET", &path, None);
    assert_eq!((status, &report["ok"]), (200, &json!(true)), "{report}");
    assert_eq!(report["drift"], json!([]), "{report}");
    // An ended session has no posture to check.
    sup.api("DELETE", &format!("/v1/sessions/{id}"), None);
    let (status, body) = sup.api("GET", &path, None);
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("purged"), "{body}");
}

#[test]
fn posture_drift_a_process_nsentered_into_the_session_gets_it_revoked_and_purged() {
    assert!(
        am_root(),
        "entering the session's namespaces with nsenter needs root"
    );
    let sup = Supervisor::start_with_config(POSTURE_EVERY_SECOND);
    let s = sup.session(&mandate(300, &["site.test"]));
    let id = s["id"].as_str().unwrap();
    let (status, before) = sup.api("GET", &format!("/v1/sessions/{id}/posture"), None);
    assert_eq!((status, &before["ok"]), (200, &json!(true)), "{before}");

    // The attack: a process placed into the session's user, pid, network and mount
    // namespaces from outside (host root, keeping its own credentials, cgroup and parent).
    let mut nsenter = nsenter_sleep(
        browser_pid(&sup),
        &["-U", "-p", "-n", "-m", "--preserve-credentials"],
    );
    let intruder = sleep_of(nsenter.id() as i32);
    let (drift, end, purged) = revoked_for_drift(&sup, id, intruder);

    let caught = checks_for(&drift, intruder);
    for check in [
        "unexpected_process",
        "cgroup",
        "uid",
        "no_new_privs",
        "capabilities",
        "executable",
        "namespace",
    ] {
        assert!(
            caught.contains(check),
            "{check} did not catch {intruder}: {drift}"
        );
    }
    assert_eq!(end["event"], "session.revoked", "{end}");
    assert_eq!(end["trigger"], "posture", "{end}");
    for check in ["unexpected_process", "cgroup", "uid"] {
        assert!(
            end["detail"]["checks"]
                .as_array()
                .unwrap()
                .contains(&json!(check)),
            "{end}"
        );
    }
    assert_eq!(purged["processes_left"], 0, "{purged}");
    // The intruder was in the session's pid namespace: its init's death took it along.
    assert_eq!(
        wait_gone(&[intruder]),
        Vec::<i32>::new(),
        "the intruder survived"
    );
    let _ = nsenter.wait();
    assert_eq!(state(&sup, id), "purged");
}

#[test]
fn posture_drift_a_process_in_only_the_session_network_namespace_is_caught() {
    assert!(
        am_root(),
        "entering the session's namespaces with nsenter needs root"
    );
    let sup = Supervisor::start_with_config(POSTURE_EVERY_SECOND);
    let s = sup.session(&mandate(300, &["site.test"]));
    let id = s["id"].as_str().unwrap();

    // The attack: a host process that joins the browser's network namespace only (it could
    // reach the browser's sockets and the supervisor's proxy from there).
    let mut nsenter = nsenter_sleep(browser_pid(&sup), &["-n"]);
    let intruder = sleep_of(nsenter.id() as i32);
    let (drift, end, purged) = revoked_for_drift(&sup, id, intruder);

    let caught = checks_for(&drift, intruder);
    for check in [
        "namespace",
        "unexpected_process",
        "cgroup",
        "uid",
        "no_new_privs",
    ] {
        assert!(
            caught.contains(check),
            "{check} did not catch {intruder}: {drift}"
        );
    }
    let namespace = drift["drift"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["pid"] == json!(intruder) && d["check"] == "namespace")
        .unwrap();
    assert!(
        namespace["detail"]
            .as_str()
            .unwrap()
            .contains("net namespace"),
        "{namespace}"
    );
    assert_eq!(end["event"], "session.revoked", "{end}");
    assert_eq!(end["trigger"], "posture", "{end}");
    // Outside the session's pid namespace, the init's death does not take it: the purge
    // kills it.
    assert!(purged["intruders_killed"].as_u64() >= Some(1), "{purged}");
    let status = nsenter.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(!alive(intruder));
}

#[test]
fn posture_of_an_unknown_session_is_404() {
    let sup = Supervisor::start();
    let (status, body) = sup.api("GET", "/v1/sessions/0123456789abcdef/posture", None);
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("0123456789abcdef"),
        "{body}"
    );
}
