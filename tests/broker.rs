//! The credential broker end to end, the basic flow: a first-party navigation to the
//! credential's site arrives with the held cookie and header; the agent's CDP traffic, the
//! audit log and the supervisor's output never show them; a page on another site gets nothing.
//! (The adversarial suite is `tests/credentials.rs`.)

mod common;

use common::*;
use serde_json::json;

fn credential_mandate(sites: &[&str]) -> serde_json::Value {
    let mut m = mandate(300, sites);
    m["on_leak"] = json!("block");
    m["credentials"] = json!([{
        "id": "bank",
        "site": "bank.test",
        "cookies": [{"name": "sid", "value": FAKE_SECRETS[0], "secure": false}],
        "headers": {"Authorization": format!("Bearer {}", FAKE_SECRETS[1])},
    }]);
    m
}

#[test]
fn first_party_requests_arrive_authenticated_and_nothing_else_does() {
    let bank = Site::start(TEST_PAGE);
    let other = Site::start(TEST_PAGE);
    let sup = Supervisor::start();
    let s = sup.session(&credential_mandate(&["bank.test", "other.test"]));
    let bank_url = format!("http://bank.test:{}/account", bank.port());
    let other_url = format!("http://other.test:{}/", other.port());
    let cdp_url = s["cdp_url"].as_str().unwrap().to_string();
    let seen = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut cdp = Cdp::connect(&cdp_url).await;
        let page = cdp.open_page(&bank_url).await;
        cdp.call("Network.enable", json!({}), Some(&page)).await;
        // A page on another site asks the bank for an image: no credentials.
        cdp.navigate(&page, &other_url).await;
        cdp.eval(
            &page,
            &format!(
                "new Promise(r => {{ const i = new Image(); i.onload = i.onerror = () => r(1); \
                 i.src = 'http://bank.test:{}/from-other.png'; }})",
                bank.port()
            ),
        )
        .await;
        // And the agent asks for the cookie directly.
        let cookies = cdp
            .call(
                "Network.getCookies",
                json!({"urls": [bank_url]}),
                Some(&page),
            )
            .await;
        let doc_cookie = cdp.eval(&page, "document.cookie").await;
        (cdp.seen.join("\n"), cookies, doc_cookie)
    });
    let (traffic, cookies, _) = seen;
    let got = bank.seen();
    let account = got
        .split("\n---\n")
        .find(|r| r.starts_with("GET /account"))
        .expect("the bank got the navigation");
    assert!(
        account.contains(&format!("sid={}", FAKE_SECRETS[0])),
        "{account}"
    );
    assert!(
        account.contains(&format!("Bearer {}", FAKE_SECRETS[1])),
        "{account}"
    );
    let image = got
        .split("\n---\n")
        .find(|r| r.starts_with("GET /from-other.png"))
        .expect("the image request reached the bank");
    assert_no_secrets("a cross-site request to the bank", image);
    assert_no_secrets("the other site", &other.seen());
    assert_no_secrets("the agent's CDP traffic", &traffic);
    assert_no_secrets("Network.getCookies", &cookies.to_string());
    let audit = std::fs::read_to_string(&sup.audit).unwrap();
    assert_no_secrets("the audit log", &audit);
    assert_no_secrets("the supervisor's output", &sup.stderr_text());
    let injected = sup.wait_audit("credential.injected", |r| {
        r["event"] == "credential.injected" && r["host"] == "bank.test"
    });
    assert_eq!(injected["credential"], "bank");
    assert_eq!(injected["tokens"].as_array().unwrap().len(), 2);
    assert!(injected["tokens"][0].as_str().unwrap().starts_with("fp:"));
    // What was sent is named by the identifiers the session was given at its start.
    let loaded = sup.wait_audit("credential.loaded", |r| {
        r["event"] == "credential.loaded" && r["credential"] == "bank"
    });
    assert_eq!(loaded["site"], "bank.test");
    let loaded_tokens = loaded["tokens"].as_array().unwrap();
    assert_eq!(loaded_tokens.len(), 2, "{loaded}");
    for t in injected["tokens"].as_array().unwrap() {
        assert!(
            loaded_tokens.contains(t),
            "{t} was sent but never loaded: {loaded}"
        );
    }
    sup.wait_audit("credential.withheld", |r| {
        r["event"] == "credential.withheld" && r["host"] == "bank.test"
    });
}

const SESSION_VALUE: &str = "SECRET-SESSION-5e7a11";

/// A bank whose `/login` sets an HttpOnly session cookie and redirects to `/account`, which
/// answers "welcome" only with that cookie. Records every request head.
fn login_bank() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { break };
            let log = log.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk) else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        log.lock().unwrap().push(head.clone());
                        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                        let authed = head.contains(&format!("bank_session={SESSION_VALUE}"));
                        let resp = match path.as_str() {
                            "/login" => format!(
                                "HTTP/1.1 302 Found\r\nSet-Cookie: bank_session={SESSION_VALUE}; HttpOnly; Path=/\r\n\
                                 Set-Cookie: lang=en; Path=/\r\nLocation: /account\r\nContent-Length: 0\r\n\r\n"
                            ),
                            _ => {
                                let body = if authed { "welcome" } else { "denied" };
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{body}",
                                    body.len()
                                )
                            }
                        };
                        if s.write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, seen)
}

#[test]
fn a_login_cookie_is_captured_into_the_vault_and_never_reaches_the_browser() {
    let (port, seen) = login_bank();
    let sup = Supervisor::start();
    let s = sup.session(&credential_mandate(&["bank.test"]));
    let cdp_url = s["cdp_url"].as_str().unwrap().to_string();
    let (traffic, text, cookies, doc_cookie) =
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let mut cdp = Cdp::connect(&cdp_url).await;
            let page = cdp
                .open_page(&format!("http://bank.test:{port}/login"))
                .await;
            let text = cdp.eval(&page, "document.body.innerText").await;
            let cookies = cdp.call("Storage.getCookies", json!({}), None).await;
            let doc_cookie = cdp.eval(&page, "document.cookie").await;
            (cdp.seen.join("\n"), text, cookies, doc_cookie)
        });
    assert_eq!(
        text, "welcome",
        "the captured cookie rode on the redirect's target"
    );
    assert_eq!(
        doc_cookie, "",
        "page script sees no cookie of the credential site"
    );
    let cookies = cookies.to_string();
    assert!(!cookies.contains("bank_session"), "{cookies}");
    assert!(!cookies.contains(SESSION_VALUE), "{cookies}");
    assert!(
        !traffic.contains(SESSION_VALUE),
        "the agent saw the captured value"
    );
    assert_no_secrets("the agent's CDP traffic", &traffic);
    let audit = std::fs::read_to_string(&sup.audit).unwrap();
    assert!(!audit.contains(SESSION_VALUE));
    assert!(!sup.stderr_text().contains(SESSION_VALUE));
    let captured = sup.wait_audit("credential.captured", |r| {
        r["event"] == "credential.captured" && r["cookie"] == "bank_session"
    });
    assert_eq!(captured["credential"], "bank");
    assert!(captured["token"].as_str().unwrap().starts_with("fp:"));
    let account = seen
        .lock()
        .unwrap()
        .iter()
        .find(|h| h.starts_with("GET /account"))
        .cloned()
        .unwrap();
    assert!(
        account.contains("lang=en"),
        "non-secret cookies of the site ride too: {account}"
    );
    // The session view names credentials, never their values.
    let id = s["id"].as_str().unwrap();
    let (_, view) = sup.api("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(view["credentials"][0]["id"], "bank");
    assert_no_secrets("the session view", &view.to_string());
    // The purge zeroizes the vault and says so.
    let (status, _) = sup.api("DELETE", &format!("/v1/sessions/{id}"), None);
    assert_eq!(status, 200);
    let purged = sup.wait_audit("session.purged", |r| {
        r["event"] == "session.purged" && r["session"] == id
    });
    assert_eq!(purged["credentials_zeroized"], 1, "{purged}");
}

/// chromiumoxide asks to ignore certificate errors by default; a session holding credentials
/// refuses that (audited), chromiumoxide carries on, and its requests arrive authenticated.
#[test]
fn chromiumoxide_works_in_a_session_holding_credentials() {
    use futures_util::StreamExt;
    let bank = Site::start(TEST_PAGE);
    let sup = Supervisor::start();
    let s = sup.session(&credential_mandate(&["bank.test"]));
    let url = s["cdp_url"].as_str().unwrap().to_string();
    let bank_url = format!("http://bank.test:{}/oxide", bank.port());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let msg = rt.block_on(async move {
        let run = async {
            let (browser, mut handler) = chromiumoxide::Browser::connect(url).await?;
            let h = tokio::spawn(async move { while handler.next().await.is_some() {} });
            let page = browser.new_page(bank_url.as_str()).await?;
            page.wait_for_navigation().await?;
            let msg: String = page
                .evaluate("document.querySelector('#msg').textContent")
                .await?
                .into_value()?;
            drop(browser);
            h.abort();
            Ok::<_, Box<dyn std::error::Error>>(msg)
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), run)
            .await
            .expect("chromiumoxide hung")
            .expect("chromiumoxide failed")
    });
    assert_eq!(msg, "hello from site");
    let got = bank.seen();
    let oxide = got
        .split("\n---\n")
        .find(|r| r.starts_with("GET /oxide"))
        .expect("the bank got the page request");
    assert!(
        oxide.contains(&format!("Bearer {}", FAKE_SECRETS[1])),
        "{oxide}"
    );
    sup.wait_audit("cdp.denied", |r| {
        r["method"] == "Security.setIgnoreCertificateErrors"
    });
}

/// `allowed_initiators`: a listed site's page may use the credential (a shop calling the bank's
/// API); any other site's page may not, and the refusal is audited.
#[test]
fn allowed_initiators_may_use_the_credential_and_others_may_not() {
    let bank = Site::start(TEST_PAGE);
    let shop = Site::start(TEST_PAGE);
    let other = Site::start(TEST_PAGE);
    let sup = Supervisor::start();
    let mut m = credential_mandate(&["bank.test", "shop.test", "other.test"]);
    m["credentials"][0]["allowed_initiators"] = json!(["shop.test"]);
    let s = sup.session(&m);
    let cdp_url = s["cdp_url"].as_str().unwrap().to_string();
    let call = |from: &str| {
        format!(
            "fetch('http://bank.test:{}/api?from={from}', {{method: 'POST', mode: 'no-cors', \
             body: 'x'}}).then(() => 'sent', e => String(e))",
            bank.port()
        )
    };
    let traffic = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut cdp = Cdp::connect(&cdp_url).await;
        let page = cdp
            .open_page(&format!("http://shop.test:{}/", shop.port()))
            .await;
        assert_eq!(cdp.eval(&page, &call("shop")).await, "sent");
        cdp.navigate(&page, &format!("http://other.test:{}/", other.port()))
            .await;
        assert_eq!(cdp.eval(&page, &call("other")).await, "sent");
        cdp.seen.join("\n")
    });
    let got = bank.seen();
    let request = |from: &str| {
        got.split("\n---\n")
            .find(|r| r.starts_with(&format!("POST /api?from={from}")))
            .unwrap_or_else(|| panic!("the bank got no call from {from}: {got}"))
            .to_string()
    };
    assert!(
        request("shop").contains(&format!("Bearer {}", FAKE_SECRETS[1])),
        "the listed initiator's call carries the credential"
    );
    assert_no_secrets("a call from an unlisted site", &request("other"));
    assert_no_secrets("the agent's CDP traffic", &traffic);
    let withheld = sup.wait_audit("credential.withheld", |r| {
        r["event"] == "credential.withheld" && r["initiator"] == "other.test"
    });
    assert_eq!(withheld["credential"], "bank");
}
