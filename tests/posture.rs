//! Sandbox posture, read from /proc for every process of a session (the way gVisor checks its
//! own): namespaces, capabilities, no_new_privs, Chromium's own seccomp sandbox, the network
//! namespace's interfaces and sockets, per-session host uids, and files that must not be
//! reachable from inside.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::json;

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
