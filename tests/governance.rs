//! Governance (AG-120 4.1, 4.3, 4.5; tests 8.1, 8.4, 8.5): the mandate's own clock (not_before,
//! a recurring window, idle timeout), revocation triggers (anomaly threshold, agent
//! disconnect), and changing a live mandate, each with real Chromium behind a real
//! `chaperone serve`: sessions are refused or ended at the right moments, with a verified
//! purge and an audit record naming the trigger, and a change holds from the next request on.

mod common;

use common::bank::{World, SID, TOKEN};
use common::*;
use serde_json::{json, Value};
use time::OffsetDateTime;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn hms(t: OffsetDateTime) -> String {
    format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
}

const EVERY_DAY: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// The end record of `id` (`session.<reason>`), once the purge is recorded.
fn ended(sup: &Supervisor, id: &str) -> (Value, Value) {
    let purged = sup.wait_audit("session.purged", |r| {
        r["event"] == "session.purged" && r["session"] == id
    });
    let end = sup
        .audit_records()
        .into_iter()
        .filter(|r| r["session"] == id)
        .find(|r| r.get("trigger").is_some())
        .expect("an end record with a trigger");
    (end, purged)
}

fn ids_of_sessions_created(sup: &Supervisor) -> usize {
    sup.events("session.created").len()
}

#[test]
fn ag120_4_1_not_before_refuses_a_session_until_its_time() {
    let sup = Supervisor::start();
    let mut m = mandate(1200, &["site.test"]);
    let later = OffsetDateTime::now_utc() + time::Duration::minutes(10);
    m["not_before"] = json!(later
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap());
    let (status, body) = sup.api("POST", "/v1/sessions", Some(&m.to_string()));
    assert_eq!(status, 409, "{body}");
    let e = body["error"].as_str().unwrap();
    assert!(e.starts_with("mandate.not_before:"), "{e}");
    assert_eq!(
        ids_of_sessions_created(&sup),
        0,
        "a refused mandate left a record"
    );
    assert!(
        chromium_under(sup.pid()).is_empty(),
        "a browser was launched"
    );

    // A not_before that lies after the end can never run: refused as invalid.
    m["ttl_secs"] = json!(60);
    let (status, body) = sup.api("POST", "/v1/sessions", Some(&m.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not_before"),
        "{body}"
    );
}

#[test]
fn ag120_4_1_outside_its_window_a_session_cannot_start() {
    let sup = Supervisor::start();
    let now = OffsetDateTime::now_utc();
    let mut m = mandate(300, &["site.test"]);
    // A window that closed a minute ago (every day, so only the time of day matters).
    m["window"] = json!({
        "days": EVERY_DAY,
        "start": hms(now - time::Duration::minutes(3)),
        "end": hms(now - time::Duration::minutes(1)),
        "tz": "Europe/London",
    });
    let (status, body) = sup.api("POST", "/v1/sessions", Some(&m.to_string()));
    assert_eq!(status, 409, "{body}");
    let e = body["error"].as_str().unwrap();
    assert!(
        e.starts_with("mandate.window:") && e.contains("next opens at"),
        "{e}"
    );
    assert_eq!(ids_of_sessions_created(&sup), 0);

    m["window"]["tz"] = json!("Mars/Olympus_Mons");
    let (status, body) = sup.api("POST", "/v1/sessions", Some(&m.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("mandate.window.tz:"),
        "{body}"
    );
}

#[test]
fn ag120_scenario_b_the_window_end_purges_whatever_the_cookie_expiry_says() {
    // The bank's login sets a session cookie valid for a year; the mandate's window closes a
    // few seconds after the login. The window wins.
    let now = OffsetDateTime::now_utc();
    let w = World::start(|m| {
        m["window"] = json!({
            "days": EVERY_DAY,
            "start": hms(now - time::Duration::minutes(1)),
            "end": hms(now + time::Duration::seconds(12)),
            "tz": "UTC",
        });
    });
    let sup = w.sup().expect("chaperone");
    let id = w.session_id().unwrap();
    let (_, s) = sup.api("GET", &format!("/v1/sessions/{id}"), None);
    assert!(
        s["ends_at"].as_str().unwrap() < s["expires_at"].as_str().unwrap(),
        "the window's close is the session's end: {s}"
    );
    let procs = chromium_under(sup.pid());
    let close = rt().block_on(async {
        let mut c = w.connect().await;
        let p = w.open(&mut c, &w.bank("/")).await;
        common::bank::login(&w, &mut c, &p).await;
        c.wait_end().await
    });
    match close {
        Ended::Close(1001, reason) => assert!(reason.contains("time window"), "{reason}"),
        other => panic!("the agent saw {other:?}, not a close frame"),
    }
    let captured = sup.wait_audit("credential.captured", |r| {
        r["event"] == "credential.captured" && r["session"] == id
    });
    assert_eq!(captured["credential"], "bank", "{captured}");
    let (end, purged) = ended(sup, &id);
    assert_eq!(end["event"], "session.window_ended", "{end}");
    assert_eq!(end["trigger"], "window_end", "{end}");
    assert_eq!(purged["processes_left"], 0, "{purged}");
    assert!(
        purged["credentials_zeroized"].as_u64() >= Some(1),
        "{purged}"
    );
    assert_eq!(
        wait_gone(&procs),
        Vec::<i32>::new(),
        "Chromium outlived the window"
    );
    let (_, view) = sup.api("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(view["end_reason"], "window_ended", "{view}");
}

#[test]
fn ag120_4_5_idle_timeout_ends_a_session_once_the_agent_goes_quiet() {
    let sup = Supervisor::start();
    let mut m = mandate(600, &["site.test"]);
    m["idle_timeout_secs"] = json!(3);
    let s = sup.session(&m);
    let id = s["id"].as_str().unwrap().to_string();
    let close = rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        // Busy for twice the idle limit: traffic keeps the session alive.
        for _ in 0..12 {
            let v = c.call("Browser.getVersion", json!({}), None).await;
            assert!(
                v.get("result").is_some(),
                "the session ended while the agent was busy: {v}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        // Then quiet.
        c.wait_end().await
    });
    match close {
        Ended::Close(1001, reason) => assert!(reason.contains("idle"), "{reason}"),
        other => panic!("the agent saw {other:?}, not a close frame"),
    }
    let (end, purged) = ended(&sup, &id);
    assert_eq!(end["event"], "session.idle_timeout", "{end}");
    assert_eq!(end["trigger"], "idle_timeout");
    assert_eq!(purged["processes_left"], 0);
}

#[test]
fn ag120_4_5_agent_disconnect_ends_the_session_only_when_the_mandate_says_so() {
    let sup = Supervisor::start();
    // Default: an agent may leave and come back (with a resume ticket, see tests/resume.rs).
    let s = sup.session(&mandate(600, &["site.test"]));
    let url = s["cdp_url"].as_str().unwrap().to_string();
    let first = s["id"].as_str().unwrap().to_string();
    rt().block_on(async {
        let mut c = Cdp::connect(&url).await;
        c.call("Browser.getVersion", json!({}), None).await;
        drop(c);
    });
    sup.wait_audit("session.detached", |r| {
        r["event"] == "session.detached" && r["session"] == first.as_str()
    });
    let (_, t) = sup.api("POST", &format!("/v1/sessions/{first}/resume-ticket"), None);
    rt().block_on(async {
        let mut again = Cdp::connect(t["cdp_url"].as_str().unwrap()).await;
        let v = again.call("Browser.getVersion", json!({}), None).await;
        assert!(v.get("result").is_some(), "reconnecting failed: {v}");
    });

    let mut m = mandate(600, &["site.test"]);
    m["revoke_on_disconnect"] = json!(true);
    m["max_agent_connections"] = json!(2);
    let s = sup.session(&m);
    let id = s["id"].as_str().unwrap().to_string();
    let procs_before = chromium_under(sup.pid()).len();
    rt().block_on(async {
        // Two connections: the session lives until the last one closes.
        let mut a = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let mut b = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        a.call("Browser.getVersion", json!({}), None).await;
        b.call("Browser.getVersion", json!({}), None).await;
        drop(a);
        let v = b.call("Browser.getVersion", json!({}), None).await;
        assert!(
            v.get("result").is_some(),
            "one of two agents leaving ended the session: {v}"
        );
        drop(b);
    });
    let (end, _) = ended(&sup, &id);
    assert_eq!(end["event"], "session.agent_disconnected", "{end}");
    assert_eq!(end["trigger"], "agent_disconnect");
    assert!(chromium_under(sup.pid()).len() < procs_before);
    let (_, first) = sup.api("GET", "/v1/sessions", None);
    let states: Vec<&str> = first["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert!(
        ["active", "detached"].contains(&states[0]) && states[1] == "purged",
        "{first}"
    );
}

#[test]
fn ag120_4_5_anomaly_threshold_revokes_after_n_refusals() {
    let sup = Supervisor::start();
    let mut m = mandate(600, &["site.test"]);
    m["anomaly"] = json!({"max_blocked": 3, "within_secs": 60});
    let s = sup.session(&m);
    let id = s["id"].as_str().unwrap().to_string();
    let close = rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        for i in 0..2 {
            let r = c
                .call("Browser.getBrowserCommandLine", json!({}), None)
                .await;
            assert_eq!(r["error"]["code"], -32000, "refusal {i}: {r}");
        }
        // Two refusals: below the threshold, the session still works.
        let v = c.call("Browser.getVersion", json!({}), None).await;
        assert!(v.get("result").is_some(), "{v}");
        let r = c
            .call("Browser.getBrowserCommandLine", json!({}), None)
            .await;
        assert_eq!(r["error"]["code"], -32000, "{r}");
        c.wait_end().await
    });
    assert!(matches!(close, Ended::Close(1001, _)), "{close:?}");
    let (end, purged) = ended(&sup, &id);
    assert_eq!(end["event"], "session.anomaly", "{end}");
    assert_eq!(end["trigger"], "anomaly_threshold");
    assert_eq!(end["detail"]["refusals"], 3, "{end}");
    assert_eq!(end["detail"]["last_refusal"], "cdp.denied");
    assert_eq!(purged["processes_left"], 0);
    assert_eq!(
        sup.events("cdp.denied")
            .iter()
            .filter(|r| r["session"] == id)
            .count(),
        3
    );
}

/// `PATCH /v1/sessions/{id}` on the control API.
fn patch(sup: &Supervisor, id: &str, body: Value) -> (u16, Value) {
    sup.api(
        "PATCH",
        &format!("/v1/sessions/{id}"),
        Some(&body.to_string()),
    )
}

/// [`patch`] from async code (while an agent connection is open).
async fn patch_now(sup: &Supervisor, id: &str, body: Value) -> (u16, Value) {
    let control = chaperone::config::ControlAddr::Unix(sup.control.clone());
    chaperone::client::request(
        &control,
        None,
        "PATCH",
        &format!("/v1/sessions/{id}"),
        Some(body.to_string()),
    )
    .await
    .expect("control API request")
}

#[test]
fn ag120_4_3_narrowing_egress_holds_from_the_next_request() {
    let a = Site::start(TEST_PAGE);
    let b = Site::start(TEST_PAGE);
    let sup = Supervisor::start();
    let s = sup.session(&mandate(600, &["a.test", "b.test"]));
    let id = s["id"].as_str().unwrap().to_string();
    let url_a = format!("http://a.test:{}/", a.port());
    let url_b = format!("http://b.test:{}/", b.port());
    rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let p = c.open_page(&url_b).await;
        assert!(b.seen().contains("GET / "), "{}", b.seen());

        let (status, view) = patch_now(
            &sup,
            &id,
            json!({"egress": {"allow": ["a.test"], "private_networks": ["127.0.0.0/8"], "ports": ["1024-65535"],
                              "hosts": {"a.test": "127.0.0.1", "b.test": "127.0.0.1"}}}),
        )
        .await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["egress"]["allow"], json!(["a.test"]), "{view}");
        assert_eq!(view["changes"][0]["field"], "egress.allow");
        assert_eq!(view["changes"][0]["widened"], false);

        // The same page, the same browser, its kept-alive proxy connection: refused. (The
        // first load's favicon request may still reach b.test around the change, so the
        // check is on the request made after it.)
        c.navigate(&p, &format!("{url_b}again")).await;
        assert!(
            !b.seen().contains("GET /again"),
            "b.test got a request after the mandate dropped it:\n{}",
            b.seen()
        );
        c.navigate(&p, &url_a).await;
        let text = c.eval(&p, "document.body.innerText").await;
        assert_eq!(
            text, "hello from site",
            "a.test, still allowed, did not load"
        );
    });
    let narrowed = sup.wait_audit("mandate.narrowed", |r| {
        r["event"] == "mandate.narrowed" && r["session"] == id
    });
    assert_eq!(narrowed["approved_by"], Value::Null);
    assert_eq!(narrowed["caller"], this_process_as_caller());
    sup.wait_audit("egress.denied for b.test", |r| {
        r["event"] == "egress.denied" && r["host"] == "b.test" && r["code"] == "not_allowed"
    });
    assert!(sup.events("mandate.widened").is_empty());
}

#[test]
fn ag120_4_3_widening_needs_approved_by_and_the_agent_has_no_path_to_it() {
    let a = Site::start(TEST_PAGE);
    let b = Site::start(TEST_PAGE);
    let sup = Supervisor::start();
    let mut m = mandate(600, &["a.test"]);
    m["egress"]["hosts"]["b.test"] = json!("127.0.0.1");
    let s = sup.session(&m);
    let id = s["id"].as_str().unwrap().to_string();
    let wider = json!({"allow": ["a.test", "b.test"], "private_networks": ["127.0.0.0/8"], "ports": ["1024-65535"],
                       "hosts": {"a.test": "127.0.0.1", "b.test": "127.0.0.1"}});

    let (status, body) = patch(&sup, &id, json!({"egress": wider}));
    assert_eq!(status, 403, "{body}");
    let e = body["error"].as_str().unwrap();
    assert!(
        e.starts_with("approved_by:") && e.contains("egress.allow"),
        "{e}"
    );
    let (status, body) = patch(&sup, &id, json!({"ttl_secs": 7200}));
    assert_eq!(status, 403, "{body}");
    let (_, view) = sup.api("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(
        view["egress"]["allow"],
        json!(["a.test"]),
        "a refused change took effect"
    );
    assert_eq!(view["expires_at"], s["expires_at"]);

    // The agent's side: its HTTP endpoint has no control API, whatever the path or verb.
    let agent_base = s["http_url"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let agent_root = {
        let u = url::Url::parse(&agent_base).unwrap();
        format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
    };
    for path in [
        format!("/v1/sessions/{id}"),
        format!(
            "{}/v1/sessions/{id}",
            url::Url::parse(&agent_base).unwrap().path()
        ),
    ] {
        let status = raw_http(
            &agent_root,
            "PATCH",
            &path,
            &json!({"egress": wider, "approved_by": "agent"}).to_string(),
        );
        assert!(
            matches!(status, 404 | 405),
            "PATCH {path} on the agent endpoint answered {status}"
        );
    }
    let (_, view) = sup.api("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(view["egress"]["allow"], json!(["a.test"]));
    assert!(sup.events("mandate.widened").is_empty());

    let (status, view) = patch(
        &sup,
        &id,
        json!({"egress": wider, "approved_by": "sec-oncall@example.com"}),
    );
    assert_eq!(status, 200, "{view}");
    let widened = sup.wait_audit("mandate.widened", |r| {
        r["event"] == "mandate.widened" && r["session"] == id
    });
    assert_eq!(widened["approved_by"], "sec-oncall@example.com");
    assert_eq!(widened["caller"], this_process_as_caller());
    assert_eq!(widened["changes"][0]["field"], "egress.allow");
    assert_eq!(widened["changes"][0]["widened"], true);
    rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let p = c.open_page(&format!("http://b.test:{}/", b.port())).await;
        assert_eq!(
            c.eval(&p, "document.body.innerText").await,
            "hello from site"
        );
    });
    drop(a);
}

/// One HTTP/1.1 request with a body; returns the status.
fn raw_http(authority: &str, method: &str, path: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(authority).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn ag120_4_3_removing_a_credential_zeroizes_it_and_stops_injection_at_once() {
    let w = World::start(|_| {});
    let sup = w.sup().expect("chaperone");
    let id = w.session_id().unwrap();
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = w.open(&mut c, &w.bank("/echo")).await;
        let before = w.sites.bank.requests_to("/echo");
        assert!(
            before.last().is_some_and(|r| r.authenticated()),
            "the credential was not injected before the change"
        );
        let (status, view) = patch_now(sup, &id, json!({"credentials": []})).await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["credentials"], json!([]), "{view}");
        c.navigate(&p, &w.bank("/echo?after")).await;
        let after = w.sites.bank.requests_to("/echo");
        let last = after.last().expect("the bank got the request");
        assert_eq!(
            last.query("after").as_deref(),
            Some(""),
            "{}",
            w.sites.bank.dump()
        );
        assert!(
            !last.authenticated() && last.header("authorization").is_none(),
            "the removed credential was still injected"
        );
    });
    let removed = sup.wait_audit("credential.removed", |r| {
        r["event"] == "credential.removed" && r["session"] == id
    });
    assert_eq!(removed["credential"], "bank");
    assert_eq!(removed["values_zeroized"], 2, "{removed}");
    // Adding one back is not a thing a live session can do.
    let (status, body) = patch(
        sup,
        &id,
        json!({"credentials": ["bank"], "approved_by": "x"}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("credentials[0]:"),
        "{body}"
    );
    let audit = std::fs::read(&sup.audit).unwrap();
    for secret in [SID, TOKEN] {
        assert!(
            !String::from_utf8_lossy(&audit).contains(secret),
            "the audit log holds a credential value"
        );
    }
}

#[test]
fn ag120_4_3_an_earlier_end_ends_the_session_then() {
    let sup = Supervisor::start();
    let s = sup.session(&mandate(600, &["site.test"]));
    let id = s["id"].as_str().unwrap().to_string();
    let (status, view) = patch(&sup, &id, json!({"ttl_secs": 2}));
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["changes"][0]["field"], "not_after");
    let (end, purged) = ended(&sup, &id);
    assert_eq!(end["event"], "session.expired", "{end}");
    assert_eq!(end["trigger"], "mandate_expiry");
    assert_eq!(purged["processes_left"], 0);
    // A purged session's mandate cannot change.
    let (status, body) = patch(&sup, &id, json!({"ttl_secs": 1}));
    assert_eq!(status, 409, "{body}");
}
