//! Agent identity and session resumption integrity (AG-374), against real Chromium: one live
//! connection, detached sessions, resume tickets (replay, tampering, expiry, foreign tickets),
//! governance re-validation after the gap, the resumption window, a registry that cannot
//! record, and the audit fields of AG-374 4.7. Test names carry the AG-374 section they mirror.

mod common;

use common::*;
use serde_json::{json, Value};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// `/json/version` of an agent URL, with extra headers: (status, body).
async fn http_get(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let client = reqwest::Client::new();
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("http request");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

fn id_of(s: &Value) -> String {
    s["id"].as_str().unwrap().to_string()
}

fn view(sup: &Supervisor, id: &str) -> Value {
    let (status, v) = sup.api("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(status, 200, "{v}");
    v
}

/// An operator-issued resume ticket.
fn ticket(sup: &Supervisor, id: &str) -> Value {
    let (status, t) = sup.api("POST", &format!("/v1/sessions/{id}/resume-ticket"), None);
    assert_eq!(status, 201, "resume ticket: {t}");
    t
}

fn with_ticket(url: &str, ticket: &str) -> String {
    format!("{url}?ticket={ticket}")
}

/// Connects, proves the connection works, and drops it the way a network failure does; waits
/// until the session is detached.
async fn connect_and_drop(sup: &Supervisor, id: &str, url: &str, headers: &[(&str, &str)]) {
    let before = sup
        .events("session.detached")
        .iter()
        .filter(|r| r["session"] == id)
        .count();
    let mut c = Cdp::connect_with(url, headers).await.expect("connect");
    let v = c.call("Browser.getVersion", json!({}), None).await;
    assert!(v.get("result").is_some(), "{v}");
    c.abort();
    wait_detached(sup, id, before).await;
}

async fn wait_detached(sup: &Supervisor, id: &str, before: usize) {
    for _ in 0..400 {
        let n = sup
            .events("session.detached")
            .iter()
            .filter(|r| r["session"] == id)
            .count();
        if n > before {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("session {id} never became detached");
}

fn last(sup: &Supervisor, event: &str, id: &str) -> Value {
    sup.events(event)
        .into_iter()
        .rfind(|r| r["session"] == id)
        .unwrap_or_else(|| panic!("no {event} for {id}"))
}

fn ended(sup: &Supervisor, id: &str) -> Value {
    sup.wait_audit("session.purged", |r| {
        r["event"] == "session.purged" && r["session"] == id
    })
}

/// A resumption of an ended session is refused: its capability is dead (404) or the
/// session is on its way out (410).
fn assert_gone(url: &str, headers: &[(&str, &str)]) {
    rt().block_on(async {
        let (status, _) = Cdp::connect_with(url, headers)
            .await
            .err()
            .expect("refused");
        assert!(status == 404 || status == 410, "{status}");
    });
}

#[test]
fn one_live_connection_unless_the_mandate_allows_more() {
    let sup = Supervisor::start();
    let s = sup.session(&mandate(600, &["site.test"]));
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    rt().block_on(async {
        let mut a = Cdp::connect(&url).await;
        let (status, body) = Cdp::connect_with(&url, &[]).await.err().expect("refused");
        assert_eq!(status, 409, "{body}");
        assert!(body.contains("max_agent_connections = 1"), "{body}");
        // The first connection is untouched.
        let v = a.call("Browser.getVersion", json!({}), None).await;
        assert!(v.get("result").is_some(), "{v}");
    });
    let r = last(&sup, "agent.refused", &id);
    assert_eq!(r["reason"], "connection_limit", "{r}");

    let mut m = mandate(600, &["site.test"]);
    m["max_agent_connections"] = json!(2);
    let s = sup.session(&m);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    rt().block_on(async {
        let mut a = Cdp::connect(&url).await;
        let mut b = Cdp::connect(&url).await;
        assert_eq!(Cdp::connect_with(&url, &[]).await.err().unwrap().0, 409);
        for c in [&mut a, &mut b] {
            assert!(c
                .call("Browser.getVersion", json!({}), None)
                .await
                .get("result")
                .is_some());
        }
        assert_eq!(view(&sup, &id_of(&s))["agents_connected"], 2);
        // Both drop at once: the session is detached, keeping the CDP session of the last to
        // go (the other was not the last, so nothing would ever take it up).
        a.abort();
        b.abort();
        wait_detached(&sup, &id_of(&s), 0).await;
    });
    let detached = last(&sup, "session.detached", &id_of(&s));
    assert_eq!(detached["parked"], 1, "{detached}");
    assert_eq!(view(&sup, &id_of(&s))["parked_connections"], 1);
}

#[test]
fn a_connection_that_goes_silent_is_taken_as_dropped_and_can_be_resumed() {
    // A network that drops without FIN or RST: the client stops answering pings.
    let sup = Supervisor::start_with_config("[limits]\nagent_ping_interval = \"1s\"\n");
    let s = sup.session(&mandate(600, &["site.test"]));
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    rt().block_on(async {
        let mut c = Cdp::connect(&url).await;
        let t = c.call("Chaperone.getResumeTicket", json!({}), None).await;
        // Not reading: the client's websocket answers no Ping from here on.
        wait_detached(&sup, &id, 0).await;
        let mut again = Cdp::connect(t["result"]["resumeUrl"].as_str().unwrap()).await;
        let v = again.call("Browser.getVersion", json!({}), None).await;
        assert!(v.get("result").is_some(), "{v}");
        drop(c);
    });
    // The first detach is the silent one (the resumed connection's own end may follow it).
    let d = sup
        .events("session.detached")
        .into_iter()
        .find(|r| r["session"] == id.as_str())
        .expect("a session.detached record");
    assert_eq!(d["close"]["by"], "network", "{d}");
    assert!(
        d["close"]["error"].as_str().unwrap().contains("Pong"),
        "{d}"
    );
    assert_eq!(d["parked"], 1, "{d}");
}

#[test]
fn a_detached_session_needs_a_ticket_and_a_missing_one_is_not_counted() {
    let sup = Supervisor::start();
    let mut m = mandate(600, &["site.test"]);
    // One counted refusal would end the session.
    m["anomaly"] = json!({"max_blocked": 1, "within_secs": 600});
    let s = sup.session(&m);
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    let http = s["http_url"].as_str().unwrap().to_string();
    rt().block_on(async {
        connect_and_drop(&sup, &id, &url, &[]).await;
        let v = view(&sup, &id);
        assert_eq!(v["state"], "detached", "{v}");
        assert!(v["detached_at"].is_string(), "{v}");
        assert_eq!(v["agents_connected"], 0);
        let (status, body) = Cdp::connect_with(&url, &[]).await.err().expect("refused");
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("resume ticket"), "{body}");
        let (status, body) = http_get(&format!("{http}/json/version"), &[]).await;
        assert_eq!(status, 401, "{body}");
    });
    let r = last(&sup, "session.resume_refused", &id);
    assert_eq!(r["reason"], "no_ticket", "{r}");
    assert_eq!(r["counted_toward_anomaly"], false);
    assert_eq!(view(&sup, &id)["state"], "detached");
    // Client-supplied state in the URL is refused, naming the parameter.
    rt().block_on(async {
        let t = ticket(&sup, &id);
        let bad = format!("{}&state=active", t["cdp_url"].as_str().unwrap());
        let (status, body) = Cdp::connect_with(&bad, &[]).await.err().expect("refused");
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("`state`"), "{body}");
    });
}

#[test]
fn ag374_8_1_a_used_ticket_is_refused_when_replayed() {
    let sup = Supervisor::start();
    let s = sup.session(&mandate(600, &["site.test"]));
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    rt().block_on(async {
        connect_and_drop(&sup, &id, &url, &[]).await;
        let t = ticket(&sup, &id);
        let resume_url = t["cdp_url"].as_str().unwrap().to_string();
        // `/json/version` checks the ticket without using it and hands it on.
        let (status, body) = http_get(
            &format!(
                "{}/json/version?ticket={}",
                s["http_url"].as_str().unwrap(),
                t["ticket"].as_str().unwrap()
            ),
            &[],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["webSocketDebuggerUrl"], resume_url.as_str());
        let before = sup.events("session.detached").len();
        let mut c = Cdp::connect(&resume_url).await;
        let v = c.call("Browser.getVersion", json!({}), None).await;
        assert!(v.get("result").is_some(), "{v}");
        assert_eq!(view(&sup, &id)["state"], "active");
        c.abort();
        wait_detached(&sup, &id, before).await;
        let (status, body) = Cdp::connect_with(&resume_url, &[])
            .await
            .err()
            .expect("replay");
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("already used"), "{body}");
    });
    let ok = last(&sup, "session.resumed", &id);
    assert_eq!(ok["freshness"]["result"], "ok", "{ok}");
    assert_eq!(ok["freshness"]["ticket_seq"], 1);
    assert_eq!(ok["freshness"]["issued_via"], "control");
    for field in ["created_at", "interrupted_at", "resumed_at"] {
        assert!(ok[field].is_string(), "{field}: {ok}");
    }
    assert!(ok["governance"]["result"] == "unchanged", "{ok}");
    let replay = last(&sup, "session.resume_refused", &id);
    assert_eq!(replay["reason"], "replayed", "{replay}");
    assert_eq!(replay["freshness"]["result"], "refused:replayed");
    assert_eq!(replay["counted_toward_anomaly"], true);
    // The ticket itself is a bearer credential: never in the audit log or the logs.
    let log = std::fs::read_to_string(&sup.audit).unwrap();
    let t = ok["freshness"]["ticket_fp"].as_str().unwrap();
    assert!(log.contains(t));
    assert!(!log.contains("chpr1."), "a ticket is in the audit log");
    assert!(
        !sup.stderr_text().contains("chpr1."),
        "a ticket is in the logs"
    );
}

#[test]
fn ag374_8_1_an_expired_ticket_is_refused() {
    let sup = Supervisor::start();
    let mut m = mandate(600, &["site.test"]);
    m["resume_ticket_ttl_secs"] = json!(5);
    let s = sup.session(&m);
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    rt().block_on(async {
        let t = ticket(&sup, &id);
        connect_and_drop(&sup, &id, &url, &[]).await;
        // Valid for 5 s after the drop: wait until that has passed for sure.
        let detached = last(&sup, "session.detached", &id);
        let at = time::OffsetDateTime::parse(
            detached["interrupted_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        loop {
            let now = time::OffsetDateTime::now_utc();
            if now > at + time::Duration::seconds(7) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        let (status, body) = Cdp::connect_with(t["cdp_url"].as_str().unwrap(), &[])
            .await
            .err()
            .expect("expired");
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("expired"), "{body}");
    });
    assert_eq!(
        last(&sup, "session.resume_refused", &id)["reason"],
        "expired"
    );
}

#[test]
fn ag374_8_1_refused_tickets_count_toward_the_anomaly_threshold() {
    let sup = Supervisor::start();
    let mut m = mandate(600, &["site.test"]);
    m["anomaly"] = json!({"max_blocked": 2, "within_secs": 600});
    let s = sup.session(&m);
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    rt().block_on(async {
        connect_and_drop(&sup, &id, &url, &[]).await;
        for bad in ["chpr1.forged.x", "garbage"] {
            let (status, _) = Cdp::connect_with(&with_ticket(&url, bad), &[])
                .await
                .err()
                .expect("refused");
            assert_eq!(status, 403);
        }
    });
    let end = ended(&sup, &id);
    assert_eq!(end["processes_left"], 0, "{end}");
    let anomaly = last(&sup, "session.anomaly", &id);
    assert_eq!(anomaly["trigger"], "anomaly_threshold", "{anomaly}");
    assert_eq!(
        anomaly["detail"]["last_refusal"], "session.resume_refused",
        "{anomaly}"
    );
}

#[test]
fn ag374_8_2_a_tampered_ticket_is_refused_and_client_state_is_ignored() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let sup = Supervisor::start();
    let s = sup.session(&mandate(600, &["site.test", "other.test"]));
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    let egress_before = view(&sup, &id)["egress"].clone();
    rt().block_on(async {
        connect_and_drop(&sup, &id, &url, &[]).await;
        let t = ticket(&sup, &id);
        let real = t["ticket"].as_str().unwrap().to_string();
        let parts: Vec<&str> = real.split('.').collect();
        let claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        let mut forged = Vec::new();
        // A later sequence number, another session, and client-supplied state, each under the
        // original MAC.
        for change in [
            json!({"seq": 99}),
            json!({"sid": "0000000000000000"}),
            json!({"mandate": {"egress": {"allow": ["*"]}}}),
        ] {
            let mut c = claims.clone();
            for (k, v) in change.as_object().unwrap() {
                c[k] = v.clone();
            }
            let payload = b64.encode(serde_json::to_vec(&c).unwrap());
            forged.push(format!("chpr1.{payload}.{}", parts[2]));
        }
        forged.push(format!("{}.{}.{}", parts[0], parts[1], &parts[2][..10]));
        for bad in &forged {
            let (status, body) = Cdp::connect_with(&with_ticket(&url, bad), &[])
                .await
                .err()
                .expect("refused");
            assert_eq!(status, 403, "{bad}: {body}");
            assert!(body.contains("altered"), "{body}");
        }
        // The real ticket still works, and the session is as the registry has it.
        let mut c = Cdp::connect(t["cdp_url"].as_str().unwrap()).await;
        assert!(c
            .call("Browser.getVersion", json!({}), None)
            .await
            .get("result")
            .is_some());
    });
    let refusals: Vec<Value> = sup
        .events("session.resume_refused")
        .into_iter()
        .filter(|r| r["session"] == id.as_str())
        .collect();
    assert_eq!(refusals.len(), 4);
    assert!(refusals.iter().all(|r| r["reason"] == "tampered"));
    assert_eq!(view(&sup, &id)["egress"]["allow"], egress_before["allow"]);
}

#[test]
fn ag374_8_3_governance_changed_during_the_gap_applies_to_the_first_resumed_request() {
    let site = Site::start(TEST_PAGE);
    let other = Site::start(TEST_PAGE);
    let sup = Supervisor::start();
    let mut m = mandate(600, &["site.test", "other.test"]);
    m["credentials"] = json!([{
        "id": "api",
        "site": "site.test",
        "headers": {"X-Api-Key": "SECRET-TOKEN-93ab2e"},
    }]);
    let s = sup.session(&m);
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    let site_url = format!("http://site.test:{}/", site.port());
    let other_url = format!("http://other.test:{}/", other.port());
    rt().block_on(async {
        let mut c = Cdp::connect(&url).await;
        let page = c.open_page(&site_url).await;
        assert!(
            site.seen().contains("SECRET-TOKEN-93ab2e"),
            "the credential was injected before the gap"
        );
        drop(page);
        let before = sup.events("session.detached").len();
        c.abort();
        wait_detached(&sup, &id, before).await;
        // While detached: other.test leaves the allowlist, the credential is removed.
        let (status, body) = sup.api(
            "PATCH",
            &format!("/v1/sessions/{id}"),
            Some(
                &json!({
                    "egress": {"allow": ["site.test"], "private_networks": ["127.0.0.0/8"],
                               "hosts": {"site.test": "127.0.0.1", "other.test": "127.0.0.1"},
                               "ports": [TEST_PORTS]},
                    "credentials": [],
                })
                .to_string(),
            ),
        );
        assert_eq!(status, 200, "{body}");
        let hits_before = site.hits.load(std::sync::atomic::Ordering::SeqCst);
        let seen_before = site.requests.lock().unwrap().len();
        let t = ticket(&sup, &id);
        let mut c = Cdp::connect(t["cdp_url"].as_str().unwrap()).await;
        let page = c.open_page(&format!("{site_url}?after=resume")).await;
        assert!(site.hits.load(std::sync::atomic::Ordering::SeqCst) > hits_before);
        let after: Vec<String> = site.requests.lock().unwrap()[seen_before..]
            .iter()
            .filter(|r| r.starts_with("GET /?after=resume "))
            .cloned()
            .collect();
        assert_eq!(after.len(), 1, "{after:?}");
        for r in &after {
            assert!(
                !r.contains("SECRET-TOKEN-93ab2e"),
                "a removed credential was injected after the resume: {r}"
            );
        }
        c.navigate(&page, &other_url).await;
    });
    assert_eq!(
        other.hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "other.test was reachable after the resume"
    );
    let denied = sup.wait_audit("egress.denied for other.test", |r| {
        r["event"] == "egress.denied" && r["session"] == id.as_str()
    });
    assert_eq!(denied["host"], "other.test", "{denied}");
    let r = last(&sup, "session.resumed", &id);
    assert_eq!(r["governance"]["result"], "changed", "{r}");
    let fields: Vec<String> = r["governance"]["changes"][0]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap().to_string())
        .collect();
    assert!(fields.contains(&"egress.allow".to_string()), "{r}");
    assert!(fields.contains(&"credentials".to_string()), "{r}");
    assert_eq!(view(&sup, &id)["governance_version"], 1);
    let log = std::fs::read_to_string(&sup.audit).unwrap();
    assert_no_secrets("audit log", &log);
    assert_no_secrets("supervisor log", &sup.stderr_text());
}

#[test]
fn ag374_8_3_a_revoked_agent_key_ends_the_session_and_refuses_resumption() {
    let sup = Supervisor::start();
    let (status, key) = sup.api("POST", "/v1/agent-keys", Some(r#"{"label":"build-agent"}"#));
    assert_eq!(status, 201, "{key}");
    let kid = key["id"].as_str().unwrap().to_string();
    let secret = key["key"].as_str().unwrap().to_string();
    let mut m = mandate(600, &["site.test"]);
    m["identity"] = json!({"agent_key": kid});
    let s = sup.session(&m);
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    let bearer = format!("Bearer {secret}");
    rt().block_on(async {
        connect_and_drop(&sup, &id, &url, &[("Authorization", &bearer)]).await;
    });
    let t = ticket(&sup, &id);
    let (status, body) = sup.api("DELETE", &format!("/v1/agent-keys/{kid}"), None);
    assert_eq!(status, 200, "{body}");
    assert!(body["revoked_at"].is_string(), "{body}");
    // Answered once the bound session is purged.
    let v = view(&sup, &id);
    assert_eq!(v["state"], "purged", "{v}");
    let end = last(&sup, "session.revoked", &id);
    assert_eq!(end["trigger"], "agent_key_revoked", "{end}");
    assert_gone(
        t["cdp_url"].as_str().unwrap(),
        &[("Authorization", &bearer)],
    );
    // A new session cannot be bound to the revoked key.
    let (status, body) = sup.api("POST", "/v1/sessions", Some(&m.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("identity.agent_key"),
        "{body}"
    );
    assert!(!std::fs::read_to_string(&sup.audit)
        .unwrap()
        .contains(&secret));
}

#[test]
fn ag374_8_3_a_window_closed_during_the_gap_ends_the_session() {
    let sup = Supervisor::start();
    let s = sup.session(&mandate(600, &["site.test"]));
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    rt().block_on(async { connect_and_drop(&sup, &id, &url, &[]).await });
    let t = ticket(&sup, &id);
    // A window that is closed now: today's weekday is not in it.
    let today = time::OffsetDateTime::now_utc().weekday();
    let other = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        [(today.number_days_from_monday() as usize + 3) % 7];
    let (status, body) = sup.api(
        "PATCH",
        &format!("/v1/sessions/{id}"),
        Some(
            &json!({"window": {"days": [other], "start": "00:00", "end": "01:00", "tz": "UTC"}})
                .to_string(),
        ),
    );
    assert_eq!(status, 200, "{body}");
    let purged = ended(&sup, &id);
    assert_eq!(purged["processes_left"], 0);
    assert_gone(t["cdp_url"].as_str().unwrap(), &[]);
}

#[test]
fn ag374_8_5_after_the_window_the_session_is_purged_and_resumption_refused() {
    let sup = Supervisor::start();
    let mut m = mandate(600, &["site.test"]);
    m["resume_window_secs"] = json!(2);
    let s = sup.session(&m);
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    rt().block_on(async { connect_and_drop(&sup, &id, &url, &[]).await });
    let t = ticket(&sup, &id);
    let purged = ended(&sup, &id);
    assert_eq!(purged["processes_left"], 0, "{purged}");
    let end = last(&sup, "session.resume_expired", &id);
    assert_eq!(end["trigger"], "resume_window", "{end}");
    assert!(end["detail"]["interrupted_at"].is_string(), "{end}");
    assert_gone(t["cdp_url"].as_str().unwrap(), &[]);
}

#[test]
fn ag374_8_6_a_ticket_from_another_session_or_supervisor_is_refused() {
    let sup = Supervisor::start();
    let other_sup = Supervisor::start();
    let s1 = sup.session(&mandate(600, &["site.test"]));
    let s2 = sup.session(&mandate(600, &["site.test"]));
    let s3 = other_sup.session(&mandate(600, &["site.test"]));
    let id1 = id_of(&s1);
    let url1 = s1["cdp_url"].as_str().unwrap().to_string();
    rt().block_on(async {
        connect_and_drop(&sup, &id1, &url1, &[]).await;
        let foreign_session = ticket(&sup, &id_of(&s2));
        let foreign_instance = ticket(&other_sup, &id_of(&s3));
        for (t, why) in [
            (&foreign_session, "another session"),
            (&foreign_instance, "another supervisor instance"),
        ] {
            let (status, body) =
                Cdp::connect_with(&with_ticket(&url1, t["ticket"].as_str().unwrap()), &[])
                    .await
                    .err()
                    .expect("refused");
            assert_eq!(status, 403, "{body}");
            assert!(body.contains(why), "{body}");
        }
    });
    let reasons: Vec<String> = sup
        .events("session.resume_refused")
        .iter()
        .filter(|r| r["session"] == id1.as_str())
        .map(|r| r["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons, ["foreign_session", "foreign_instance"]);
    let started: Vec<Value> = sup.events("supervisor.started");
    assert!(started[0]["instance"].is_string(), "{:?}", started[0]);
}

#[test]
fn ag374_8_7_registry_unavailable_refuses_resumption() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("registry.journal");
    let sup = Supervisor::start_with_config(&format!(
        "[registry]\njournal = \"{}\"\n",
        journal.display()
    ));
    let s = sup.session(&mandate(600, &["site.test"]));
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    rt().block_on(async {
        connect_and_drop(&sup, &id, &url, &[]).await;
        let t = ticket(&sup, &id);
        std::fs::remove_file(&journal).unwrap();
        std::fs::create_dir(&journal).unwrap();
        let (status, body) = Cdp::connect_with(t["cdp_url"].as_str().unwrap(), &[])
            .await
            .err()
            .expect("refused");
        assert_eq!(status, 503, "{body}");
        assert_eq!(view(&sup, &id)["state"], "detached");
        // Ticket issue fails closed too.
        let (status, body) = sup.api("POST", &format!("/v1/sessions/{id}/resume-ticket"), None);
        assert_eq!(status, 503, "{body}");
        // Once the store works again, the same (unused) ticket resumes.
        std::fs::remove_dir(&journal).unwrap();
        let mut c = Cdp::connect(t["cdp_url"].as_str().unwrap()).await;
        assert!(c
            .call("Browser.getVersion", json!({}), None)
            .await
            .get("result")
            .is_some());
    });
    let refused = last(&sup, "session.resume_refused", &id);
    assert_eq!(refused["reason"], "registry_unavailable", "{refused}");
    // The ticket was good; a broken store is no sign of an attack.
    assert_eq!(refused["freshness"]["result"], "passed", "{refused}");
    assert_eq!(refused["counted_toward_anomaly"], false);
    let ops: Vec<String> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["op"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // The restored journal: the resumption, then (once the test's connection closes) a detach.
    assert_eq!(
        ops[..2],
        ["ticket_consumed", "resumed"],
        "the journal after it was restored: {ops:?}"
    );
}

#[test]
fn an_agent_key_bound_session_refuses_the_capability_alone() {
    let sup = Supervisor::start();
    let (_, key) = sup.api("POST", "/v1/agent-keys", Some(r#"{"label":"a"}"#));
    let (_, other) = sup.api("POST", "/v1/agent-keys", Some(r#"{"label":"b"}"#));
    let mut m = mandate(600, &["site.test"]);
    m["identity"] = json!({"agent_key": key["id"]});
    let s = sup.session(&m);
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    let http = s["http_url"].as_str().unwrap().to_string();
    let good = format!("Bearer {}", key["key"].as_str().unwrap());
    let wrong = format!("Bearer {}", other["key"].as_str().unwrap());
    rt().block_on(async {
        for (headers, reason) in [
            (vec![], "agent_key_missing"),
            (vec![("Authorization", wrong.as_str())], "agent_key_wrong"),
        ] {
            let (status, body) = Cdp::connect_with(&url, &headers)
                .await
                .err()
                .expect("refused");
            assert_eq!(status, 403, "{body}");
            let (status, _) = http_get(&format!("{http}/json/version"), &headers).await;
            assert_eq!(status, 403);
            assert_eq!(last(&sup, "agent.refused", &id)["reason"], reason);
        }
        let (status, _) =
            http_get(&format!("{http}/json/version"), &[("Authorization", &good)]).await;
        assert_eq!(status, 200);
        // The query parameter works for clients that cannot send headers.
        let q = format!("{url}?agent_key={}", key["key"].as_str().unwrap());
        let mut c = Cdp::connect(&q).await;
        assert!(c
            .call("Browser.getVersion", json!({}), None)
            .await
            .get("result")
            .is_some());
    });
    let v = view(&sup, &id);
    assert_eq!(v["identity"]["agent_key"], key["id"], "{v}");
    // Every record of the session names the identity.
    let records: Vec<Value> = sup
        .audit_records()
        .into_iter()
        .filter(|r| r["session"] == id.as_str())
        .collect();
    assert!(records.len() > 3);
    for r in &records {
        assert_eq!(r["identity"]["agent_key"], key["id"], "{r}");
    }
    let log = std::fs::read_to_string(&sup.audit).unwrap();
    assert!(
        !log.contains(key["key"].as_str().unwrap()),
        "an agent key is in the audit log"
    );
}

/// A shop that counts orders and holds each order's answer until the test releases it, so an
/// order can be in flight when the agent's connection drops.
struct HeldShop {
    port: u16,
    orders: Arc<AtomicUsize>,
    release: Arc<(Mutex<bool>, Condvar)>,
}

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

impl HeldShop {
    fn start() -> HeldShop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let orders = Arc::new(AtomicUsize::new(0));
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let (o, r) = (orders.clone(), release.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { break };
                let (o, r) = (o.clone(), r.clone());
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(30)));
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let body = if head.contains(" /order") {
                        o.fetch_add(1, Ordering::SeqCst);
                        // Held until released (bounded: a stuck test fails, not hangs).
                        let (lock, cv) = &*r;
                        let released = cv
                            .wait_timeout_while(
                                lock.lock().unwrap(),
                                std::time::Duration::from_secs(60),
                                |released| !*released,
                            )
                            .unwrap();
                        drop(released);
                        "<!doctype html><title>order</title><p id=msg>order placed</p>"
                    } else {
                        "<!doctype html><title>shop</title><p id=msg>shop</p>"
                    };
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        HeldShop {
            port,
            orders,
            release,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://shop.test:{}{path}", self.port)
    }

    fn orders(&self) -> usize {
        self.orders.load(Ordering::SeqCst)
    }

    fn release(&self) {
        *self.release.0.lock().unwrap() = true;
        self.release.1.notify_all();
    }

    async fn wait_orders(&self, n: usize) {
        for _ in 0..400 {
            if self.orders() >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("the shop never got order {n}");
    }
}

/// The frame of the order: a POST from the page, answered when the shop answers.
fn order_frame(id: i64, page: &str) -> String {
    json!({
        "id": id,
        "sessionId": page,
        "method": "Runtime.evaluate",
        "params": {
            "expression": "fetch('/order', {method: 'POST'}).then(r => r.text()).then(t => t.includes('order placed'))",
            "awaitPromise": true,
            "returnByValue": true,
        },
    })
    .to_string()
}

/// Waits for the answer to `id`, skipping events.
async fn answer(c: &mut Cdp, id: i64) -> Value {
    loop {
        match c.recv().await {
            Ok(v) if v["id"] == id => return v,
            Ok(_) => continue,
            Err(e) => panic!("connection ended waiting for {id}: {e:?}"),
        }
    }
}

/// An agent opens the shop, gets a resume ticket over CDP, sends an order, and loses its
/// connection while the order is in flight. Returns the ticket's answer and the page session.
async fn order_then_drop(
    sup: &Supervisor,
    shop: &HeldShop,
    id: &str,
    url: &str,
) -> (Value, String) {
    let mut c = Cdp::connect(url).await;
    let page = c.open_page(&shop.url("/")).await;
    let t = c.call("Chaperone.getResumeTicket", json!({}), None).await;
    assert!(t["result"]["ticket"].is_string(), "{t}");
    c.send_raw(order_frame(42, &page)).await;
    shop.wait_orders(1).await;
    let before = sup.events("session.detached").len();
    c.abort();
    wait_detached(sup, id, before).await;
    (t["result"].clone(), page)
}

#[test]
fn ag374_8_4_an_order_in_flight_at_the_drop_runs_once_across_a_continue_resume() {
    let shop = HeldShop::start();
    let sup = Supervisor::start();
    let s = sup.session(&mandate(600, &["shop.test"]));
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    rt().block_on(async {
        let (t, page) = order_then_drop(&sup, &shop, &id, &url).await;
        // The shop answers while the agent is away; the answer is kept.
        shop.release();
        let resumed = sup.wait_audit("session.detached then parked", |r| {
            r["event"] == "session.detached" && r["session"] == id.as_str()
        });
        assert_eq!(resumed["parked"], 1, "{resumed}");
        let mut c = Cdp::connect(t["continueUrl"].as_str().unwrap()).await;
        // What happened to the order while the agent was away: `Chaperone.reconcile` says,
        // until the shop's answer is in.
        let mut outcome = Value::Null;
        for _ in 0..200 {
            let r = c.call("Chaperone.reconcile", json!({}), None).await;
            outcome = r["result"]["operations"][0]["outcome"].clone();
            // Answered while away (kept), or after the resumption (then delivered to this
            // very conversation, as an answer to the id it sent before the drop).
            if outcome == "answered" || outcome == "delivered" {
                break;
            }
            assert_eq!(outcome, "in_flight", "{r}");
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert!(outcome == "answered" || outcome == "delivered", "{outcome}");
        // The same order again, byte for byte: answered from what was kept, not sent again.
        c.send_raw(order_frame(42, &page)).await;
        let a = answer(&mut c, 42).await;
        assert_eq!(a["result"]["result"]["value"], true, "{a}");
        assert_eq!(a["sessionId"], page.as_str());
        // The page session of the first connection still works in continue mode.
        let v = c
            .eval(&page, "document.querySelector('#msg').textContent")
            .await;
        assert_eq!(v, "shop");
        let r = c.call("Chaperone.reconcile", json!({}), None).await;
        let ops = r["result"]["operations"].as_array().expect("operations");
        assert!(
            ops.iter()
                .any(|o| o["id"] == 42 && o["outcome"] == "claimed"),
            "{r}"
        );
    });
    assert_eq!(shop.orders(), 1, "the order ran twice");
    let r = last(&sup, "session.resumed", &id);
    assert_eq!(r["mode"], "continue", "{r}");
    assert_eq!(r["freshness"]["issued_via"], "cdp");
    // At the resumption the order was still running or already answered (the shop was
    // released before): one operation either way.
    let rec = &r["reconciliation"];
    assert_eq!(
        rec["in_flight"].as_u64().unwrap() + rec["answered_during_gap"].as_u64().unwrap(),
        1,
        "{r}"
    );
    let rec = sup.wait_audit("session.reconciled", |r| {
        r["event"] == "session.reconciled" && r["session"] == id.as_str()
    });
    assert_eq!(rec["replayed"][0]["id"], 42, "{rec}");
}

#[test]
fn ag374_8_4_an_order_resent_before_its_answer_is_joined_not_repeated() {
    let shop = HeldShop::start();
    let sup = Supervisor::start();
    let s = sup.session(&mandate(600, &["shop.test"]));
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    rt().block_on(async {
        let (t, page) = order_then_drop(&sup, &shop, &id, &url).await;
        // Resumed while the shop still holds the order; a fresh browser session (reattach).
        let mut c = Cdp::connect(t["resumeUrl"].as_str().unwrap()).await;
        c.send_raw(order_frame(42, &page)).await;
        shop.release();
        let a = answer(&mut c, 42).await;
        assert_eq!(a["result"]["result"]["value"], true, "{a}");
        // Exactly one answer for 42.
        let v = c.call("Browser.getVersion", json!({}), None).await;
        assert!(v.get("result").is_some());
        let again: Vec<&String> = c
            .seen
            .iter()
            .filter(|f| f.starts_with(r#"{"id":42"#))
            .collect();
        assert_eq!(again.len(), 1, "{again:?}");
    });
    assert_eq!(shop.orders(), 1, "the order ran twice");
    let r = last(&sup, "session.resumed", &id);
    assert_eq!(r["mode"], "reattach", "{r}");
}

#[test]
fn ag374_8_4_a_navigation_in_flight_at_the_drop_runs_once_across_a_reattach() {
    let shop = HeldShop::start();
    let sup = Supervisor::start();
    let s = sup.session(&mandate(600, &["shop.test"]));
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    let submit = shop.url("/order?item=1");
    let nav = |page: &str| {
        json!({"id": 7, "sessionId": page, "method": "Page.navigate", "params": {"url": submit}})
            .to_string()
    };
    rt().block_on(async {
        let mut c = Cdp::connect(&url).await;
        let page = c.open_page(&shop.url("/")).await;
        c.send_raw(nav(&page)).await;
        shop.wait_orders(1).await;
        let before = sup.events("session.detached").len();
        c.abort();
        wait_detached(&sup, &id, before).await;
        shop.release();
        let t = ticket(&sup, &id);
        let mut c = Cdp::connect(t["cdp_url"].as_str().unwrap()).await;
        c.send_raw(nav(&page)).await;
        let a = answer(&mut c, 7).await;
        assert!(a["result"]["frameId"].is_string(), "{a}");
    });
    assert_eq!(shop.orders(), 1, "the navigation ran twice");
}

#[test]
fn ag374_4_11_a_resumed_session_injects_no_credential_during_its_quiet_period() {
    let site = Site::start(TEST_PAGE);
    let sup = Supervisor::start();
    let mut m = mandate(600, &["site.test"]);
    m["resume_quiet_secs"] = json!(600);
    m["credentials"] = json!([{
        "id": "api",
        "site": "site.test",
        "headers": {"X-Api-Key": "SECRET-TOKEN-93ab2e"},
    }]);
    let s = sup.session(&m);
    let id = id_of(&s);
    let url = s["cdp_url"].as_str().unwrap().to_string();
    let site_url = format!("http://site.test:{}/", site.port());
    rt().block_on(async {
        let mut c = Cdp::connect(&url).await;
        c.open_page(&site_url).await;
        assert!(site.seen().contains("SECRET-TOKEN-93ab2e"));
        let before = sup.events("session.detached").len();
        c.abort();
        wait_detached(&sup, &id, before).await;
        let seen_before = site.requests.lock().unwrap().len();
        let t = ticket(&sup, &id);
        let mut c = Cdp::connect(t["cdp_url"].as_str().unwrap()).await;
        c.open_page(&format!("{site_url}?after=resume")).await;
        // The document request made after the resumption (a favicon of the first page may
        // still arrive from before it).
        let after: Vec<String> = site.requests.lock().unwrap()[seen_before..]
            .iter()
            .filter(|r| r.starts_with("GET /?after=resume "))
            .cloned()
            .collect();
        assert_eq!(after.len(), 1, "{after:?}");
        assert!(
            !after[0].contains("SECRET-TOKEN-93ab2e"),
            "a credential was injected during the quiet period: {}",
            after[0]
        );
    });
    let w = sup.wait_audit("credential.withheld", |r| {
        r["event"] == "credential.withheld" && r["session"] == id.as_str()
    });
    assert!(
        w["reason"].as_str().unwrap().contains("resume_quiet_secs"),
        "{w}"
    );
    assert_eq!(
        last(&sup, "session.resumed", &id)["credentials_quiet_secs"],
        600
    );
}
