//! OAuth credentials (issue 4; AG-120 4.3, 4.5, 4.6, 4.9) with real Chromium behind a real
//! `chaperone serve`: the supervisor runs the refresh grant itself against a fake authorization
//! server over TLS (a CA made for the run, trusted through `[upstream] ca_file`), injects the
//! fresh access token into a bank-like API's requests, refuses a token that grants more scope
//! than the mandate, blocks a page that asks the token endpoint for more, and revokes the
//! refresh token upstream when the session ends.
//!
//! The fixtures (`common/oauth.rs`): the fake server issues tokens with a short `expires_in`
//! and remembers which are valid; the API on `bank.test` lets a request in only with a token
//! the server considers valid at that moment, so "still authenticated" means a refreshed token
//! really rode on the request.

mod common;

use std::time::Duration;

use common::bank::{values_in, wait_eval, wait_for, Request};
use common::oauth::*;
use common::*;
use serde_json::{json, Value};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// Asserts that `text` holds none of `values` in any form.
fn assert_none_of(what: &str, text: &[u8], values: &[String]) {
    let found = values_in(text, values);
    assert!(found.is_empty(), "{what} contains {found:?}");
}

/// The audit log and the supervisor's stderr show no token, refresh token or client secret.
fn assert_logs_clean(sup: &Supervisor, oauth: &OAuthServer) {
    let values = oauth.values();
    assert_none_of(
        "the audit log",
        &std::fs::read(&sup.audit).unwrap_or_default(),
        &values,
    );
    assert_none_of(
        "the supervisor's stderr",
        sup.stderr_text().as_bytes(),
        &values,
    );
    for r in sup.audit_records() {
        if let Some(t) = r.get("token").and_then(Value::as_str) {
            assert!(
                t.starts_with("fp:"),
                "token identifier is not a fingerprint: {r}"
            );
        }
    }
}

/// The bearer token of an API request, if any.
fn bearer(r: &Request) -> Option<String> {
    r.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
}

/// `me()` in tab `p`: the status and which token the API saw (by index).
async fn me(c: &mut Cdp, p: &str) -> (u16, Value) {
    let v = c.eval(p, "me()").await;
    let text = v.as_str().unwrap_or_default();
    let (status, body) = text.split_once(' ').unwrap_or(("0", "null"));
    (
        status.parse().unwrap_or(0),
        serde_json::from_str::<Value>(body).unwrap_or(Value::Null)["token"].clone(),
    )
}

/// `me()` in tab `p` until the API lets the page in (bounded); the token it was let in with.
/// With 2-second tokens on a loaded machine, a request can reach the API just after its token
/// died there, while the refreshed one is on its way: that is the test's short lifetime, not a
/// refusal.
async fn let_in(c: &mut Cdp, p: &str) -> Value {
    let v = wait_eval(c, p, "me()", "the API to let the page in", |v| {
        v.as_str().is_some_and(|t| t.starts_with("200 "))
    })
    .await;
    let (_, body) = v.as_str().unwrap().split_once(' ').unwrap();
    serde_json::from_str::<Value>(body).unwrap()["token"].clone()
}

fn session_events(sup: &Supervisor, id: &str, event: &str) -> Vec<Value> {
    sup.events(event)
        .into_iter()
        .filter(|r| r["session"] == id)
        .collect()
}

#[test]
fn ag120_4_9_managed_refresh_keeps_the_page_authenticated_past_the_first_tokens_lifetime() {
    let oauth = OAuthServer::start(true, 2);
    let api = api(&oauth);
    let sup = Supervisor::start_with_config(&oauth.supervisor_config());
    let s = sup.session(&oauth_mandate(&oauth, 2));
    let id = s["id"].as_str().unwrap().to_string();
    rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let p = c
            .open_page(&format!("http://bank.test:{}/", api.port()))
            .await;
        let first = let_in(&mut c, &p).await.as_u64().unwrap() as usize;
        let first_token = oauth.lock().issued[first].token.clone();
        // Two more token lifetimes: the first token is dead at the server, and the
        // supervisor has refreshed at least twice since.
        wait_for("the first token to expire and two more refreshes", || {
            oauth.lock().valid(&first_token).is_none() && oauth.refreshes().len() >= first + 3
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; the server saw {} refreshes", oauth.refreshes().len()));
        // A refresh may be under way at this instant; the page is asked again until the
        // API answers (bounded), and must then be let in with a later token.
        let later = wait_eval(
            &mut c,
            &p,
            "me()",
            "the page to be authenticated again",
            |v| v.as_str().is_some_and(|t| t.starts_with("200 ")),
        )
        .await;
        let (_, later) = {
            let t = later.as_str().unwrap();
            let (s, b) = t.split_once(' ').unwrap();
            (
                s.to_string(),
                serde_json::from_str::<Value>(b).unwrap()["token"].clone(),
            )
        };
        assert!(
            later.as_u64().unwrap() as usize >= first + 2,
            "the page was let in with token {later}, not a refreshed one (first {first})"
        );
        assert!(oauth.lock().valid(&first_token).is_none());
    });

    // Every refresh was the supervisor's: the held refresh token, client id and secret, and
    // exactly the mandate's scope.
    let refreshes = oauth.refreshes();
    assert!(refreshes.len() >= 3, "{} refreshes", refreshes.len());
    for r in &refreshes {
        assert_eq!(form(r, "grant_type").as_deref(), Some("refresh_token"));
        assert_eq!(form(r, "client_id").as_deref(), Some(CLIENT_ID));
        assert_eq!(form(r, "client_secret").as_deref(), Some(CLIENT_SECRET));
        assert_eq!(form(r, "scope").as_deref(), Some(SCOPE));
    }
    // The API only ever saw tokens the server issued (never the refresh token).
    for r in api.requests_to("/api/me") {
        let t = bearer(&r).expect("an API request without the token");
        assert!(oauth.lock().issued.iter().any(|i| i.token == t));
    }
    // AG-120 4.6: creation and every refresh audited by fingerprint, with the domain.
    let refreshed = session_events(&sup, &id, "credential.refreshed");
    assert!(refreshed.len() >= 3, "{refreshed:?}");
    assert_eq!(refreshed[0]["initial"], true, "{}", refreshed[0]);
    let mut fps = std::collections::BTreeSet::new();
    for r in &refreshed {
        assert_eq!(r["credential"], "bank-api", "{r}");
        assert_eq!(r["host"], "localhost", "{r}");
        assert_eq!(r["scope"], SCOPE, "{r}");
        assert_eq!(r["expires_in"], 2, "{r}");
        fps.insert(r["token"].as_str().unwrap().to_string());
    }
    assert_eq!(
        fps.len(),
        refreshed.len(),
        "each refresh names its own token"
    );
    assert!(!session_events(&sup, &id, "credential.injected").is_empty());
    assert_logs_clean(&sup, &oauth);
}

#[test]
fn ag120_4_3_a_refresh_granting_more_scope_is_rejected_and_its_token_never_used() {
    let oauth = OAuthServer::start(true, 2);
    let api = api(&oauth);
    let sup = Supervisor::start_with_config(&oauth.supervisor_config());
    let s = sup.session(&oauth_mandate(&oauth, 2));
    let id = s["id"].as_str().unwrap().to_string();
    rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let p = c
            .open_page(&format!("http://bank.test:{}/", api.port()))
            .await;
        let_in(&mut c, &p).await;
        // From now on every grant adds `admin` (an identity provider that does not hold scope
        // on refresh, AG-120 scenario C).
        {
            let mut st = oauth.lock();
            st.widen_after = Some(st.issued.len());
        }
        let rejected = sup.wait_audit("credential.refresh_rejected", |r| {
            r["event"] == "credential.refresh_rejected" && r["session"] == id
        });
        assert_eq!(rejected["credential"], "bank-api", "{rejected}");
        assert_eq!(rejected["granted_extra"], json!(["admin"]), "{rejected}");
        assert!(rejected["token"].as_str().unwrap().starts_with("fp:"));
        // Without an acceptable refresh, the first token is withdrawn once too old.
        let stale = sup.wait_audit("credential.refresh_failed (stopped injecting)", |r| {
            r["event"] == "credential.refresh_failed"
                && r["session"] == id
                && r["stopped_injecting"] == true
        });
        eprintln!("[stale] {stale}");
        let v = wait_eval(&mut c, &p, "me()", "the API to refuse the page", |v| {
            v.as_str().is_some_and(|t| t.starts_with("401 "))
        })
        .await;
        eprintln!("[after] {v}");
    });
    // The widened tokens were issued but never reached the API; only earlier ones did.
    let (kept, widened): (Vec<_>, Vec<_>) = {
        let st = oauth.lock();
        st.issued.iter().cloned().partition(|i| i.scope == SCOPE)
    };
    assert!(!widened.is_empty(), "no widened grant was ever issued");
    assert!(widened.iter().all(|i| i.scope == "read admin"));
    for r in api.requests() {
        if let Some(t) = bearer(&r) {
            assert!(
                kept.iter().any(|k| k.token == t),
                "a widened token reached the API"
            );
        }
    }
    assert_eq!(
        session_events(&sup, &id, "credential.refreshed").len(),
        kept.len()
    );
    assert_logs_clean(&sup, &oauth);

    // A first grant that widens the scope fails the launch, naming the credential.
    oauth.lock().widen_after = Some(0);
    let (status, body) = sup.api(
        "POST",
        "/v1/sessions",
        Some(&oauth_mandate(&oauth, 2).to_string()),
    );
    assert_eq!(status, 500, "{body}");
    let e = body["error"].as_str().unwrap();
    assert!(
        e.contains("credential broker: oauth refresh for `bank-api` failed") && e.contains("admin"),
        "{e}"
    );
    assert_logs_clean(&sup, &oauth);
}

#[test]
fn ag120_4_3_a_page_asking_the_token_endpoint_for_more_scope_is_blocked_and_counted() {
    // Plain http on localhost, so the browser can reach the token endpoint as well: the
    // request within the grant that goes first proves the page's channel works.
    let oauth = OAuthServer::start(false, 900);
    let api = api(&oauth);
    let sup = Supervisor::start_with_config(&oauth.supervisor_config());
    let mut m = oauth_mandate(&oauth, 900);
    m["anomaly"] = json!({"max_blocked": 1, "within_secs": 60});
    let s = sup.session(&m);
    let id = s["id"].as_str().unwrap().to_string();
    let asked_more = |r: &Request| {
        form(r, "scope").is_some_and(|s| s.contains("admin"))
            || r.query("scope").is_some_and(|s| s.contains("admin"))
    };
    rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let p = c
            .open_page(&format!("http://bank.test:{}/", api.port()))
            .await;
        assert_eq!(me(&mut c, &p).await.0, 200);
        let before = oauth.lock().token_requests.len();
        let r = c.eval(&p, "ask('read')").await;
        assert_eq!(
            r, "sent",
            "the page could not reach the token endpoint at all"
        );
        wait_for("the page's request within the grant to arrive", || {
            oauth.lock().token_requests.len() > before
        })
        .await
        .unwrap();
        // The escalation ends the session (anomaly threshold of 1): not awaited.
        let r = c
            .call(
                "Runtime.evaluate",
                json!({"expression": "ask('read admin'); 'asked'"}),
                Some(&p),
            )
            .await;
        assert_eq!(r["result"]["result"]["value"], "asked", "{r}");
        let _ = tokio::time::timeout(Duration::from_secs(30), c.wait_end()).await;
    });
    let blocked = sup.wait_audit("credential.scope_escalation_blocked", |r| {
        r["event"] == "credential.scope_escalation_blocked" && r["session"] == id
    });
    assert_eq!(blocked["credential"], "bank-api", "{blocked}");
    assert_eq!(blocked["host"], "localhost", "{blocked}");
    assert_eq!(blocked["requested_extra"], json!(["admin"]), "{blocked}");
    let end = sup.wait_audit("session.anomaly", |r| {
        r["event"] == "session.anomaly" && r["session"] == id
    });
    assert_eq!(end["trigger"], "anomaly_threshold", "{end}");
    assert_eq!(
        end["detail"]["last_refusal"], "credential.scope_escalation_blocked",
        "{end}"
    );
    sup.wait_audit("session.purged", |r| {
        r["event"] == "session.purged" && r["session"] == id
    });
    let requests = oauth.lock().token_requests.clone();
    assert!(
        !requests.iter().any(asked_more),
        "the token endpoint received the request for more scope: {requests:?}"
    );
    // The page's request within the grant did arrive (with its own guess, not the held token).
    assert!(requests
        .iter()
        .any(|r| form(r, "refresh_token").as_deref() == Some("page-own-guess-0000")));
    assert_logs_clean(&sup, &oauth);
}

/// Opens the API's page in session `s` and asserts the page is let in with the held token.
fn signed_in(s: &Value, api: &common::bank::Server) {
    rt().block_on(async {
        let mut c = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let p = c
            .open_page(&format!("http://bank.test:{}/", api.port()))
            .await;
        assert_eq!(me(&mut c, &p).await.0, 200);
    });
}

/// A credential taken away from a live mandate (a narrowing PATCH) has its grant revoked
/// upstream then, not only at the session's end, and only once.
#[test]
fn ag120_4_5_a_credential_removed_from_a_live_mandate_is_revoked_upstream_at_once() {
    let oauth = OAuthServer::start(true, 900);
    let api = api(&oauth);
    let sup = Supervisor::start_with_config(&oauth.supervisor_config());
    let mut m = oauth_mandate(&oauth, 900);
    m["credentials"][0]["revoke"] = json!({
        "url": oauth.revocation_endpoint(),
        "form": {"token": "{refresh_token}", "token_type_hint": "refresh_token"},
    });
    let s = sup.session(&m);
    let id = s["id"].as_str().unwrap().to_string();
    signed_in(&s, &api);
    assert!(oauth.lock().revocations.is_empty());

    let (status, view) = sup.api(
        "PATCH",
        &format!("/v1/sessions/{id}"),
        Some(&json!({"credentials": []}).to_string()),
    );
    assert_eq!(status, 200, "{view}");
    // Answered once the revocation went out and was recorded.
    let revoked = &view["revoked_upstream"];
    assert_eq!(revoked.as_array().map(Vec::len), Some(1), "{view}");
    assert_eq!(revoked[0]["credential"], "bank-api", "{view}");
    assert_eq!(revoked[0]["outcome"], "ok", "{view}");
    let revocations = oauth.lock().revocations.clone();
    assert_eq!(revocations.len(), 1, "{revocations:?}");
    assert_eq!(form(&revocations[0], "token").as_deref(), Some(REFRESH));
    let records = session_events(&sup, &id, "credential.revoked_upstream");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["status"], 200);
    let removed = session_events(&sup, &id, "credential.removed");
    assert!(removed[0]["seq"].as_u64() < records[0]["seq"].as_u64());

    // The session's end has nothing left to revoke.
    let (status, body) = sup.api("DELETE", &format!("/v1/sessions/{id}"), None);
    assert_eq!(status, 200, "{body}");
    sup.wait_audit("session.purged", |r| {
        r["event"] == "session.purged" && r["session"] == id
    });
    assert_eq!(oauth.lock().revocations.len(), 1);
    assert_eq!(
        session_events(&sup, &id, "credential.revoked_upstream").len(),
        1
    );
    assert_logs_clean(&sup, &oauth);
}

#[test]
fn ag120_4_5_the_session_end_revokes_the_refresh_token_upstream() {
    let oauth = OAuthServer::start(true, 900);
    let api = api(&oauth);
    let sup = Supervisor::start_with_config(&oauth.supervisor_config());
    let with_revoke = |url: String| {
        let mut m = oauth_mandate(&oauth, 900);
        m["credentials"][0]["revoke"] = json!({
            "url": url,
            "form": {"token": "{refresh_token}", "token_type_hint": "refresh_token"},
        });
        m
    };
    let s = sup.session(&with_revoke(oauth.revocation_endpoint()));
    let id = s["id"].as_str().unwrap().to_string();
    signed_in(&s, &api);
    assert!(
        oauth.lock().revocations.is_empty(),
        "revoked before the end"
    );
    let (status, body) = sup.api("DELETE", &format!("/v1/sessions/{id}"), None);
    assert_eq!(status, 200, "{body}");

    let revocations = oauth.lock().revocations.clone();
    assert_eq!(revocations.len(), 1, "{revocations:?}");
    let r = &revocations[0];
    assert_eq!(form(r, "token").as_deref(), Some(REFRESH));
    assert_eq!(form(r, "token_type_hint").as_deref(), Some("refresh_token"));
    let current = oauth.lock().issued.last().unwrap().token.clone();
    assert_eq!(bearer(r).as_deref(), Some(current.as_str()), "{r:?}");
    let records: Vec<Value> = sup
        .audit_records()
        .into_iter()
        .filter(|r| r["session"] == id)
        .collect();
    let seq_of = |event: &str| {
        records
            .iter()
            .find(|r| r["event"] == event)
            .unwrap_or_else(|| panic!("no {event}: {records:?}"))
    };
    let revoked = seq_of("credential.revoked_upstream");
    assert_eq!(revoked["credential"], "bank-api", "{revoked}");
    assert_eq!(revoked["host"], "localhost", "{revoked}");
    assert_eq!(revoked["outcome"], "ok", "{revoked}");
    assert_eq!(revoked["status"], 200, "{revoked}");
    let purged = seq_of("session.purged");
    assert!(
        revoked["seq"].as_u64() < purged["seq"].as_u64(),
        "the revocation was recorded after the purge"
    );
    assert!(revoked["seq"].as_u64() > seq_of("session.revoked")["seq"].as_u64());
    assert_logs_clean(&sup, &oauth);

    // A revocation endpoint that is down: the failure is recorded, the purge happens anyway.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = sup.session(&with_revoke(format!("https://localhost:{down}/revoke")));
    let id = s["id"].as_str().unwrap().to_string();
    let (status, body) = sup.api("DELETE", &format!("/v1/sessions/{id}"), None);
    assert_eq!(status, 200, "{body}");
    let revoked = sup.wait_audit("credential.revoked_upstream (failed)", |r| {
        r["event"] == "credential.revoked_upstream" && r["session"] == id
    });
    assert_eq!(revoked["outcome"], "failed", "{revoked}");
    assert!(revoked["status"].is_null(), "{revoked}");
    let error = revoked["error"].as_str().unwrap();
    assert!(
        !error.contains("/revoke"),
        "the error names the URL: {error}"
    );
    eprintln!("[down] {error}");
    let purged = sup.wait_audit("session.purged", |r| {
        r["event"] == "session.purged" && r["session"] == id
    });
    assert_eq!(purged["processes_left"], 0);
    assert!(revoked["seq"].as_u64() < purged["seq"].as_u64());
    assert_eq!(oauth.lock().revocations.len(), 1);
    assert_logs_clean(&sup, &oauth);
}
