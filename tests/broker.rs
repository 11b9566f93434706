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
    let injected = sup.wait_audit("credential.injected", |r| r["host"] == "bank.test");
    assert_eq!(injected["credential"], "bank");
    assert_eq!(injected["tokens"].as_array().unwrap().len(), 2);
    assert!(injected["tokens"][0].as_str().unwrap().starts_with("fp:"));
    sup.wait_audit("credential.withheld", |r| r["host"] == "bank.test");
}
