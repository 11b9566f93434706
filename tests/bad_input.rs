//! Bad input gets a clear error, launches nothing, and leaves other sessions alone: malformed,
//! oversized and unknown-field mandates, zero or negative ttl, garbage, oversized and
//! unknown-method frames on the agent websocket, a wrong capability, a foreign Origin or Host.

mod common;

use common::*;
use serde_json::json;

#[test]
fn bad_mandates_are_refused_naming_the_field_and_launch_nothing() {
    let sup = Supervisor::start();
    let big = format!(
        r#"{{"agent":"a","ttl_secs":5,"egress":{{"allow":["{}"]}}}}"#,
        "a".repeat(300 * 1024)
    );
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "mandate"),
        (r#"{"agent":"a","ttl_secs":5,"colour":"red"}"#.into(), 400, "colour"),
        (r#"{"agent":"a","ttl_secs":5,"egress":{"allow":["*."]}}"#.into(), 400, "egress.allow[0]"),
        (r#"{"agent":"a","ttl_secs":0}"#.into(), 400, "ttl_secs"),
        (r#"{"agent":"a","ttl_secs":-30}"#.into(), 400, "ttl_secs"),
        (r#"{"agent":"a"}"#.into(), 400, "ttl_secs"),
        (r#"{"agent":"a","ttl_secs":5,"egress":{"private_networks":["everything"]}}"#.into(), 400, "private_networks[0]"),
        (r#"{"agent":"a","ttl_secs":5,"credentials":[{"id":"c","site":"www.bank.test","headers":{"Authorization":"Bearer SECRET-TOKEN-93ab2e"}}]}"#.into(), 400, "credentials[0].site"),
        (r#"{"agent":"a","ttl_secs":5,"credentials":[{"id":"c","site":"bank.test","headers":{"Authorization":"SECRET-TOKEN-93ab2e\u0001"}}]}"#.into(), 400, "credentials[0].headers.Authorization"),
        (big, 413, "max_mandate_bytes"),
    ];
    for (body, status, field) in cases {
        let (got, err) = sup.api("POST", "/v1/sessions", Some(&body));
        let shown = &body[..body.len().min(80)];
        assert_eq!(got, status, "{shown}: {err}");
        let msg = err["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(field),
            "{shown}: error does not name {field}: {msg}"
        );
        assert_no_secrets("control API error", msg);
    }
    let (_, list) = sup.api("GET", "/v1/sessions", None);
    assert_eq!(list["sessions"], json!([]));
    assert!(
        chromium_under(sup.pid()).is_empty(),
        "a refused mandate launched Chromium"
    );
    let audit = std::fs::read_to_string(&sup.audit).unwrap();
    assert!(!audit.contains("session.created"));
    assert_no_secrets("audit log", &audit);
    assert_no_secrets("supervisor log", &sup.stderr_text());
}

#[test]
fn bad_agent_frames_get_errors_and_spare_other_sessions() {
    let sup = Supervisor::start();
    let a = sup.session(&mandate(300, &["site.test"]));
    let b = sup.session(&mandate(300, &["site.test"]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = Cdp::connect(a["cdp_url"].as_str().unwrap()).await;
        c.send_raw("this is not json".into()).await;
        let e = c.recv().await.expect("an answer to garbage");
        assert_eq!(e["error"]["code"], -32700, "{e}");
        c.send_raw(r#"{"method":"Browser.getVersion"}"#.into())
            .await;
        let e = c.recv().await.expect("an answer to a frame without id");
        assert_eq!(e["error"]["code"], -32600, "{e}");
        // Off the gate's allowlist: refused by chaperone, loudly, before the browser sees it.
        let e = c.call("Nonexistent.method", json!({}), None).await;
        assert_eq!(e["error"]["code"], -32000, "{e}");
        let e = c
            .call(
                "Target.sendMessageToTarget",
                json!({"message": "{}", "targetId": "x"}),
                None,
            )
            .await;
        assert_eq!(e["error"]["code"], -32000, "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("chaperone"),
            "{e}"
        );
        let e = c
            .call(
                "Runtime.evaluate",
                json!({"expression": "1"}),
                Some("FOREIGN-SESSION"),
            )
            .await;
        assert_eq!(e["error"]["code"], -32001, "{e}");
        // The connection survived all of that.
        let v = c.call("Browser.getVersion", json!({}), None).await;
        assert!(v["result"]["product"].is_string(), "{v}");
        // An oversized frame ends the connection with a close frame that says why.
        c.send_raw(format!(
            r#"{{"id":99,"method":"Runtime.evaluate","params":{{"expression":"'{}'"}}}}"#,
            "x".repeat(17 * 1024 * 1024)
        ))
        .await;
        match c.wait_end().await {
            Ended::Close(1009, reason) => assert!(reason.contains("max_agent_message"), "{reason}"),
            other => panic!("oversized frame: {other:?}"),
        }
        // The other session does not notice.
        let mut other = Cdp::connect(b["cdp_url"].as_str().unwrap()).await;
        let v = other.call("Browser.getVersion", json!({}), None).await;
        assert!(v["result"]["product"].is_string(), "{v}");
    });
    let denied = sup.wait_audit("cdp.denied", |r| {
        r["event"] == "cdp.denied" && r["method"] == "Target.sendMessageToTarget"
    });
    assert_eq!(denied["method"], "Target.sendMessageToTarget");
    for id in [&a["id"], &b["id"]] {
        let (_, v) = sup.api(
            "GET",
            &format!("/v1/sessions/{}", id.as_str().unwrap()),
            None,
        );
        // Still running: the agents left, so the sessions wait (detached) for a resumption.
        assert!(v["state"] == "active" || v["state"] == "detached", "{v}");
    }
}

/// A raw HTTP/1.1 request to the agent endpoint; returns the status code and the body.
fn http(addr: std::net::SocketAddr, req: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(req.as_bytes()).unwrap();
    // Read one response (head, then Content-Length bytes): a refused upgrade may leave the
    // connection open.
    let mut out = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(usize::MAX);
            if len != usize::MAX && out.len() >= end + 4 + len {
                break;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[test]
fn wrong_capability_foreign_origin_and_host_are_refused() {
    let sup = Supervisor::start();
    let s = sup.session(&mandate(300, &["site.test"]));
    let cdp = s["cdp_url"].as_str().unwrap();
    let path = &cdp[cdp.find("/devtools").unwrap()..];
    let cap = path.rsplit('/').next().unwrap();
    let upgrade = |path: &str, extra: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n",
            sup.listen
        )
    };
    let wrong = path.replace(cap, &"0".repeat(cap.len()));
    let (st, body) = http(sup.listen, &upgrade(&wrong, ""));
    assert_eq!(st, 404, "{body}");
    assert!(body.contains("no live session"), "{body}");
    let (st, body) = http(
        sup.listen,
        &upgrade(path, "Origin: https://evil.example\r\n"),
    );
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("evil.example"), "{body}");
    let (st, body) = http(
        sup.listen,
        &format!("GET /session/{cap}/json/version HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(st, 500, "{body}");
    assert!(
        !body.contains(cap),
        "the capability leaked to a foreign Host: {body}"
    );
    // The right URL still works, and /json/version names the websocket by the Host used.
    let (st, body) = http(
        sup.listen,
        &format!("GET /session/{cap}/json/version/ HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\r\n", sup.listen.port()),
    );
    assert_eq!(st, 200, "{body}");
    assert!(
        body.contains(&format!(
            "ws://localhost:{}/devtools/browser/{cap}",
            sup.listen.port()
        )),
        "{body}"
    );
    // The rest of Chromium's HTTP surface.
    let get = |path: &str| {
        http(
            sup.listen,
            &format!(
                "GET /session/{cap}{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                sup.listen
            ),
        )
    };
    let (st, body) = get("/json/protocol");
    assert_eq!(st, 200);
    assert!(
        body.contains("\"domains\"") && body.contains("\"Target\""),
        "no protocol"
    );
    let (st, body) = get("/json/list");
    assert_eq!(st, 200, "{body}");
    assert!(
        body.contains("\"type\": \"page\"") || body.contains("\"type\":\"page\""),
        "{body}"
    );
    let (st, _) = get("/json/new?about:blank");
    assert_eq!(st, 405);
    // A page's own websocket, as /json/list announces it: no sessionId needed.
    let json_start = body.find("\r\n\r\n").unwrap() + 4;
    let list: serde_json::Value = serde_json::from_str(body[json_start..].trim()).unwrap();
    let page_url = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "page")
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .expect("a page with a websocket URL")
        .to_string();
    assert!(page_url.contains(cap), "{page_url}");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut page = Cdp::connect(&page_url).await;
        let r = page
            .call(
                "Runtime.evaluate",
                json!({"expression": "6*7", "returnByValue": true}),
                None,
            )
            .await;
        assert_eq!(r["result"]["result"]["value"], 42, "{r}");
        assert!(r.get("sessionId").is_none(), "{r}");
        let wrong = page_url.replace(cap, &"f".repeat(cap.len()));
        let refused = tokio_tungstenite::connect_async(wrong.as_str()).await;
        assert!(refused.is_err());
    });
}
