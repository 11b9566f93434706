//! Action-level authorization against real Chromium and a local shop that counts orders:
//! checkouts held for a human (approved, denied, expired), field conditions, `max_count`
//! budgets, a just-in-time credential that rides only on the approved request, the webhook,
//! and an agent that tries to see or answer its own approval over CDP.

mod common;

use std::time::Duration;

use common::shop::Shop;
use common::*;
use serde_json::{json, Value};

/// The just-in-time credential's values: they must reach the shop only on the approved order.
const PAY_TOKEN: &str = "PAYTOKEN-JIT-4f19c2a7";
const PAY_COOKIE: &str = "PAYCOOKIE-JIT-80d3e1b5";

fn shop_mandate(actions: Value) -> Value {
    let mut m = mandate(300, &["shop.test"]);
    m["actions"] = actions;
    m
}

fn checkout_needs_approval() -> Value {
    json!([{ "match": { "method": "POST", "url": "shop.test/checkout*" }, "decision": "approve" }])
}

/// Waits (bounded) until `n` approvals are pending; returns them.
fn pending(sup: &Supervisor, n: usize) -> Vec<Value> {
    for _ in 0..600 {
        let (status, body) = sup.api("GET", "/v1/approvals", None);
        assert_eq!(status, 200, "{body}");
        let list = body["approvals"].as_array().unwrap().clone();
        if list.len() >= n {
            return list;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no {n} pending approvals appeared");
}

fn decide(sup: &Supervisor, id: &str, decision: &str, by: &str) -> (u16, Value) {
    sup.api(
        "POST",
        &format!("/v1/approvals/{id}"),
        Some(&json!({"decision": decision, "by": by}).to_string()),
    )
}

/// Starts an order in the page without waiting for it; `window.outcome` gets its result.
async fn start_order(cdp: &mut Cdp, page: &str, amount: u32, path: &str) {
    cdp.eval(
        page,
        &format!("window.outcome = undefined; order({amount}, '{path}').then(r => window.outcome = r); 0"),
    )
    .await;
}

/// Polls the page (bounded) until the order started by [`start_order`] settled.
async fn outcome(cdp: &mut Cdp, page: &str) -> String {
    for _ in 0..600 {
        if let Some(s) = cdp.eval(page, "window.outcome").await.as_str() {
            return s.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the order never settled");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

#[test]
fn an_approved_checkout_is_sent_once_and_the_agent_sees_nothing_of_the_approval() {
    let shop = Shop::start();
    let sup = Supervisor::start();
    let s = sup.session(&shop_mandate(checkout_needs_approval()));
    let id = s["id"].as_str().unwrap().to_string();
    rt().block_on(async {
        let mut cdp = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let page = cdp.open_page(&shop.url()).await;
        // Browsing is not an action any rule names: it goes through at once.
        cdp.navigate(&page, &format!("{}browse", shop.url())).await;
        cdp.navigate(&page, &shop.url()).await;
        start_order(&mut cdp, &page, 40, "/checkout").await;

        let list = pending(&sup, 1);
        let a = &list[0];
        assert_eq!(a["session"], id.as_str());
        assert_eq!(a["agent"], "test-agent");
        assert_eq!(a["method"], "POST");
        assert_eq!(a["url"], format!("{}checkout", shop.url()));
        assert_eq!(a["rule"]["index"], 0);
        assert_eq!(a["rule"]["decision"], "approve");
        assert_eq!(
            a["body"]["fields"],
            json!([{"name": "item", "value": "book"}, {"name": "amount", "value": "40"}])
        );
        assert_eq!(a["body"]["fields_total"], 2);
        assert_eq!(a["body"]["truncated"], false);
        assert_eq!(a["initiator"], shop.url().trim_end_matches('/'));
        assert!(a["credential"].is_null());
        let approval = a["id"].as_str().unwrap().to_string();

        // The agent, meanwhile, polls: the order is still pending, no order reached the shop,
        // and whatever it tries does not release the request.
        assert!(cdp.eval(&page, "window.outcome").await.is_null());
        assert!(shop.orders().is_empty());
        for guess in 1..=40 {
            cdp.call(
                "Fetch.continueRequest",
                json!({"requestId": format!("interception-job-{guess}.0")}),
                Some(&page),
            )
            .await;
        }
        let local = cdp
            .call("Chaperone.approve", json!({"id": approval}), None)
            .await;
        assert!(local.get("error").is_some(), "{local}");
        cdp.call("Target.getTargets", json!({}), None).await;
        assert!(cdp.eval(&page, "window.outcome").await.is_null());
        assert!(
            shop.orders().is_empty(),
            "an order went out before any decision"
        );

        let (status, body) = decide(&sup, &approval, "approve", "alice");
        assert_eq!(status, 200, "{body}");
        let result = outcome(&mut cdp, &page).await;
        assert_eq!(result, "OK:order 1 placed");
        // A second decision on the same approval changes nothing.
        let (status, body) = decide(&sup, &approval, "approve", "mallory");
        assert_eq!(status, 409, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("approved by alice"),
            "{body}"
        );
        let (status, _) = decide(&sup, "apr_000000000000000000000000", "approve", "alice");
        assert_eq!(status, 404);

        // Nothing of the approval reached the agent's CDP connection.
        let traffic = cdp.seen.join("\n");
        assert!(
            !traffic.contains(&approval),
            "the agent saw the approval id"
        );
        assert!(!traffic.contains("apr_"), "the agent saw an approval id");
        assert!(!traffic.contains("alice"), "the agent saw who approved");
    });
    assert_eq!(shop.orders().len(), 1, "exactly one order");
    let requested = sup.wait_audit("action.approval_requested", |r| {
        r["event"] == "action.approval_requested" && r["session"] == id.as_str()
    });
    assert_eq!(requested["method"], "POST");
    let approved = sup.wait_audit("action.approved", |r| r["event"] == "action.approved");
    assert_eq!(approved["by"], "alice");
    // "alice" is what the caller claims; the record also holds who sent it, as the kernel says.
    assert_eq!(approved["caller"], this_process_as_caller());
    assert_eq!(approved["approval"], requested["approval"]);
    assert!(sup.events("action.denied").is_empty());
    assert!(sup.api("GET", "/v1/approvals", None).1["approvals"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn a_denied_checkout_and_an_unanswered_one_never_reach_the_shop() {
    let shop = Shop::start();
    let sup = Supervisor::start();
    let mut m = shop_mandate(checkout_needs_approval());
    m["approval_timeout_secs"] = json!(2);
    let s = sup.session(&m);
    rt().block_on(async {
        let mut cdp = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let page = cdp.open_page(&shop.url()).await;
        cdp.call("Network.enable", json!({}), Some(&page)).await;

        start_order(&mut cdp, &page, 40, "/checkout").await;
        let approval = pending(&sup, 1)[0]["id"].as_str().unwrap().to_string();
        let (status, body) = decide(&sup, &approval, "deny", "bob");
        assert_eq!(status, 200, "{body}");
        let result = outcome(&mut cdp, &page).await;
        assert!(result.starts_with("ERR:"), "{result}");

        // No one answers this one: it is denied when approval_timeout_secs runs out.
        start_order(&mut cdp, &page, 40, "/checkout").await;
        let late = pending(&sup, 1)[0]["id"].as_str().unwrap().to_string();
        let result = outcome(&mut cdp, &page).await;
        assert!(result.starts_with("ERR:"), "{result}");
        let (status, body) = decide(&sup, &late, "approve", "carol");
        assert_eq!(status, 409, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("expired"),
            "{body}"
        );
        // Both failed as blocked by client, as the browser reports it.
        let blocked = cdp
            .seen
            .iter()
            .filter(|f| {
                f.contains("Network.loadingFailed") && f.contains("net::ERR_BLOCKED_BY_CLIENT")
            })
            .count();
        assert_eq!(
            blocked, 2,
            "loadingFailed events with ERR_BLOCKED_BY_CLIENT"
        );
    });
    assert!(shop.orders().is_empty(), "an order reached the shop");
    let denied = sup.wait_audit("action.denied", |r| r["event"] == "action.denied");
    assert_eq!(denied["by"], "bob");
    assert_eq!(denied["decided_by"], "human");
    let expired = sup.wait_audit("action.expired", |r| r["event"] == "action.expired");
    assert_eq!(expired["after_secs"], 2);
    assert!(sup.events("action.approved").is_empty());
}

/// Waits (bounded) until no approval is pending.
fn none_pending(sup: &Supervisor) {
    for _ in 0..600 {
        let (status, body) = sup.api("GET", "/v1/approvals", None);
        assert_eq!(status, 200, "{body}");
        if body["approvals"].as_array().unwrap().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("a request the page gave up is still listed");
}

/// A held request the page gives up (its own abort, a navigation, a closed tab) leaves the
/// list at once: nobody is asked about a request that no longer exists, a late decision is
/// told what happened, and nothing is sent.
#[test]
fn a_held_checkout_the_page_gives_up_leaves_the_list_and_is_never_sent() {
    let shop = Shop::start();
    let sup = Supervisor::start();
    let s = sup.session(&shop_mandate(checkout_needs_approval()));
    let id = s["id"].as_str().unwrap().to_string();
    let mut given_up = Vec::new();
    rt().block_on(async {
        let mut cdp = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let page = cdp.open_page(&shop.url()).await;

        // The page's own abort.
        cdp.eval(
            &page,
            "window.ctl = new AbortController(); window.outcome = undefined; \
             order(40, '/checkout', ctl.signal).then(r => window.outcome = r); 0",
        )
        .await;
        given_up.push(pending(&sup, 1)[0]["id"].as_str().unwrap().to_string());
        cdp.eval(&page, "ctl.abort(); 0").await;
        let result = outcome(&mut cdp, &page).await;
        assert!(result.starts_with("ERR:"), "{result}");
        none_pending(&sup);

        // A navigation away.
        start_order(&mut cdp, &page, 40, "/checkout").await;
        given_up.push(pending(&sup, 1)[0]["id"].as_str().unwrap().to_string());
        cdp.navigate(&page, &format!("{}browse", shop.url())).await;
        none_pending(&sup);

        // A closed tab.
        let other = cdp.open_page(&shop.url()).await;
        start_order(&mut cdp, &other, 40, "/checkout").await;
        given_up.push(pending(&sup, 1)[0]["id"].as_str().unwrap().to_string());
        cdp.call("Page.close", json!({}), Some(&other)).await;
        none_pending(&sup);
    });
    for approval in &given_up {
        let record = sup.wait_audit("action.expired for a given-up request", |r| {
            r["event"] == "action.expired" && r["approval"] == approval.as_str()
        });
        assert_eq!(record["session"], id.as_str());
        assert!(
            record["reason"]
                .as_str()
                .unwrap()
                .contains("page cancelled"),
            "{record}"
        );
        let (status, body) = decide(&sup, approval, "approve", "alice");
        assert_eq!(status, 409, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("page cancelled"),
            "{body}"
        );
    }
    assert!(
        shop.orders().is_empty(),
        "a given-up order reached the shop"
    );
    assert!(sup.events("action.approved").is_empty());
}

#[test]
fn field_conditions_and_budgets_decide_without_asking_anyone() {
    let shop = Shop::start();
    let sup = Supervisor::start();
    let s = sup.session(&shop_mandate(json!([
        { "match": { "method": "POST", "url": "shop.test/checkout*",
                     "fields": { "amount": { "max": 100 } } },
          "decision": "approve" },
        { "match": { "method": "POST", "url": "shop.test/checkout*" }, "decision": "deny" },
        { "match": { "method": "POST", "url": "shop.test/cart" }, "decision": "allow",
          "max_count": 2 },
    ])));
    rt().block_on(async {
        let mut cdp = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let page = cdp.open_page(&shop.url()).await;
        // Over the limit: denied by the second rule, no human asked.
        start_order(&mut cdp, &page, 500, "/checkout").await;
        let result = outcome(&mut cdp, &page).await;
        assert!(result.starts_with("ERR:"), "{result}");
        // The same over an encoded path and with the amount repeated in the query.
        start_order(&mut cdp, &page, 500, "/check%6Fut?amount=5").await;
        assert!(outcome(&mut cdp, &page).await.starts_with("ERR:"));
        // Three cart additions under a budget of two: the third is denied.
        for n in 1..=3 {
            start_order(&mut cdp, &page, 1, "/cart").await;
            let result = outcome(&mut cdp, &page).await;
            if n <= 2 {
                assert_eq!(result, "OK:added", "cart addition {n}");
            } else {
                assert!(result.starts_with("ERR:"), "cart addition {n}: {result}");
            }
        }
    });
    assert!(shop.orders().is_empty());
    assert_eq!(shop.posts("/cart").len(), 2);
    // Records of refusals are written behind the request's failure: wait for the last one.
    sup.wait_audit("the budget's denial", |r| {
        r["event"] == "action.denied" && r["decided_by"] == "budget"
    });
    assert!(
        sup.events("action.approval_requested").is_empty(),
        "a human was asked"
    );
    let denied = sup.events("action.denied");
    let by_rule: Vec<&Value> = denied
        .iter()
        .filter(|r| r["decided_by"] == "rule")
        .collect();
    assert_eq!(by_rule.len(), 2, "{denied:?}");
    assert!(by_rule.iter().all(|r| r["rule"]["index"] == 1));
    let by_budget: Vec<&Value> = denied
        .iter()
        .filter(|r| r["decided_by"] == "budget")
        .collect();
    assert_eq!(by_budget.len(), 1, "{denied:?}");
    assert_eq!(by_budget[0]["rule"]["max_count"], 2);
    let sent = sup.events("action.sent");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1]["count"], 2);
}

/// The shop, a webhook receiver on this machine that records every POST it gets, and a
/// supervisor that announces approvals to it.
fn shop_with_webhook() -> (Shop, common::bank::Server, Supervisor) {
    let hook = common::bank::Server::serve(
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        std::sync::Arc::new(|_r: &common::bank::Request| {
            common::bank::Reply::new(204, "text/plain", "")
        }),
    );
    let sup = Supervisor::start_with_config(&format!(
        "approval_webhook = \"http://127.0.0.1:{}/hook\"\n",
        hook.port()
    ));
    (Shop::start(), hook, sup)
}

#[test]
fn a_just_in_time_credential_rides_only_on_the_approved_order_and_no_secret_leaks() {
    let (shop, hook, sup) = shop_with_webhook();
    let mut m = shop_mandate(checkout_needs_approval());
    m["credentials"] = json!([{
        "id": "pay",
        "site": "shop.test",
        "on_approval": true,
        "headers": { "X-Pay-Token": PAY_TOKEN },
        "cookies": [{ "name": "pay", "value": PAY_COOKIE, "path": "/", "secure": false }],
    }]);
    let s = sup.session(&m);
    let shop_url = shop.url();
    // A real Playwright agent shops; the test plays the human.
    let agent = std::thread::spawn({
        let cdp_url = s["cdp_url"].as_str().unwrap().to_string();
        let shop_url = shop_url.clone();
        move || {
            let out = std::process::Command::new("node")
                .arg(repo().join("tests/clients/checkout.mjs"))
                .current_dir(repo().join("tests/clients"))
                .env("CHAPERONE_CDP_URL", cdp_url)
                .env("SHOP_URL", shop_url)
                .env("DEBUG", "pw:protocol")
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run node");
            (
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        }
    });
    let list = pending(&sup, 1);
    let approval = list[0]["id"].as_str().unwrap().to_string();
    // The human is told which credential rides on the request if approved.
    assert_eq!(list[0]["credential"], "pay");
    // The shop saw the browsing so far, without the credential.
    assert!(shop.orders().is_empty());
    let (status, body) = decide(&sup, &approval, "approve", "dana");
    assert_eq!(status, 200, "{body}");
    let (stdout, protocol) = agent.join().unwrap();
    let verdict: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|_| panic!("agent: {stdout}\n{protocol}"));
    assert_eq!(verdict["ok"], true, "{verdict}");
    assert_eq!(verdict["result"], "OK:order 1 placed");

    // The credential rode on the approved order, and on nothing else.
    let requests = shop.server.requests();
    let carries = |r: &common::bank::Request| {
        r.header("x-pay-token") == Some(PAY_TOKEN) || r.has_cookie("pay", PAY_COOKIE)
    };
    let orders = shop.orders();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].header("x-pay-token"), Some(PAY_TOKEN));
    assert!(orders[0].has_cookie("pay", PAY_COOKIE));
    let browsing: Vec<_> = requests.iter().filter(|r| r.method == "GET").collect();
    assert!(
        browsing.len() >= 4,
        "browsing before and after: {}",
        browsing.len()
    );
    assert!(
        browsing.iter().all(|r| !carries(r)),
        "a browsing request carried the just-in-time credential"
    );
    let last_get = requests
        .iter()
        .rposition(|r| r.path() == "/browse")
        .unwrap();
    let order_at = requests.iter().position(|r| r.method == "POST").unwrap();
    assert!(last_get > order_at, "no browsing after the order was seen");

    // The webhook heard of the approval, and nothing held.
    for _ in 0..200 {
        if !hook.requests().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let calls = hook.requests();
    assert_eq!(calls.len(), 1, "webhook calls");
    let note: Value = serde_json::from_slice(&calls[0].body).unwrap();
    assert_eq!(note["event"], "action.approval_requested");
    assert_eq!(note["approval"]["id"], approval.as_str());
    assert_eq!(note["approval"]["agent"], "test-agent");

    sup.wait_audit("the credential withheld from browsing", |r| {
        r["event"] == "credential.withheld"
            && r["reason"].as_str().unwrap_or("").contains("on_approval")
    });
    // No secret in the webhook, the approvals API, the audit log, the agent's CDP traffic, or
    // the supervisor's own output.
    let everywhere = [
        (
            "webhook",
            String::from_utf8_lossy(&hook.everything()).to_string(),
        ),
        ("approvals list", list[0].to_string()),
        ("audit log", std::fs::read_to_string(&sup.audit).unwrap()),
        ("agent CDP traffic", protocol.clone()),
        ("supervisor output", sup.stderr_text()),
    ];
    for (what, text) in &everywhere {
        for secret in [PAY_TOKEN, PAY_COOKIE] {
            assert!(!text.contains(secret), "{what} holds a held value");
        }
    }
    assert!(
        protocol.contains("Runtime.evaluate") || protocol.contains("Page.navigate"),
        "no protocol log"
    );
    assert!(!protocol.contains(&approval), "the agent saw its approval");
}

#[test]
fn bad_action_rules_and_decisions_are_refused_naming_the_field() {
    let sup = Supervisor::start();
    let mut m = shop_mandate(
        json!([{ "match": { "url": "shop.test:8080/checkout" }, "decision": "approve" }]),
    );
    let (status, body) = sup.api("POST", "/v1/sessions", Some(&m.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("actions[0].match.url: "),
        "{body}"
    );
    m["actions"] = json!([{ "decision": "allow" }]);
    m["credentials"] = json!([{ "id": "pay", "site": "shop.test", "on_approval": true,
                               "headers": { "X-Pay-Token": PAY_TOKEN } }]);
    let (status, body) = sup.api("POST", "/v1/sessions", Some(&m.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("credentials[0].on_approval: "),
        "{body}"
    );
    assert!(!body.to_string().contains(PAY_TOKEN));
    m["credentials"] = json!([]);
    m["approval_timeout_secs"] = json!(0);
    let (status, body) = sup.api("POST", "/v1/sessions", Some(&m.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("approval_timeout_secs: "),
        "{body}"
    );
    for (body, field) in [
        (json!({"decision": "maybe", "by": "x"}), "decision"),
        (json!({"decision": "approve", "by": ""}), "by"),
        (json!({"decision": "approve"}), "body"),
        (json!({"decision": "approve", "by": "x", "note": 1}), "note"),
    ] {
        let (status, answer) = sup.api("POST", "/v1/approvals/apr_x", Some(&body.to_string()));
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().starts_with(field),
            "{body}: {answer}"
        );
    }
    let (status, _) = sup.api("GET", "/v1/approvals?sesion=x", None);
    assert_eq!(status, 400);
}

#[test]
fn the_cli_lists_approves_and_denies() {
    let shop = Shop::start();
    let sup = Supervisor::start();
    let s = sup.session(&shop_mandate(checkout_needs_approval()));
    let id = s["id"].as_str().unwrap().to_string();
    let control = format!("unix:{}", sup.control.display());
    let cli = |args: &[&str], user: Option<&str>| {
        let mut cmd = std::process::Command::new(bin());
        cmd.arg("approvals")
            .args(args)
            .args(["--control", &control]);
        match user {
            Some(u) => cmd.env("USER", u),
            None => cmd.env_remove("USER"),
        };
        let out = cmd.output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (
            out.status.code(),
            v,
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    rt().block_on(async {
        let mut cdp = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let page = cdp.open_page(&shop.url()).await;

        start_order(&mut cdp, &page, 40, "/checkout").await;
        pending(&sup, 1);
        let (code, list, _) = cli(&["list", "--session", &id], None);
        assert_eq!(code, Some(0), "{list}");
        let approval = list["approvals"][0]["id"].as_str().unwrap().to_string();
        assert_eq!(list["approvals"][0]["session"], id.as_str());
        let (code, _, _) = cli(&["list", "--session", "no-such-session"], None);
        assert_eq!(code, Some(0));
        // Without --by and without $USER, the CLI asks for a name instead of sending nothing.
        let (code, _, err) = cli(&["approve", &approval], None);
        assert_ne!(code, Some(0));
        assert!(err.contains("--by"), "{err}");
        let (code, done, _) = cli(&["approve", &approval, "--by", "erin"], None);
        assert_eq!(code, Some(0), "{done}");
        assert_eq!(outcome(&mut cdp, &page).await, "OK:order 1 placed");

        start_order(&mut cdp, &page, 40, "/checkout").await;
        let second = pending(&sup, 1)[0]["id"].as_str().unwrap().to_string();
        let (code, done, _) = cli(&["deny", &second], Some("frank"));
        assert_eq!(code, Some(0), "{done}");
        assert!(outcome(&mut cdp, &page).await.starts_with("ERR:"));
        let (code, again, _) = cli(&["deny", &second, "--by", "frank"], None);
        assert_eq!(code, Some(1), "{again}");
        assert!(
            again["error"].as_str().unwrap().contains("denied by frank"),
            "{again}"
        );
    });
    assert_eq!(shop.orders().len(), 1);
    let approved = &sup.events("action.approved")[0];
    assert_eq!(approved["by"], "erin");
    assert_eq!(sup.events("action.denied")[0]["by"], "frank");
    // The CLI's own process sent it, as the same user.
    let caller = &approved["caller"];
    assert_eq!(caller["transport"], "unix", "{approved}");
    assert_eq!(caller["uid"], this_process_as_caller()["uid"], "{approved}");
    assert!(
        caller["pid"]
            .as_u64()
            .is_some_and(|p| p != u64::from(std::process::id())),
        "{approved}"
    );
}

#[test]
fn a_held_value_planted_in_a_held_request_is_cut_out_of_the_approval_and_the_webhook() {
    use base64::Engine;
    let (shop, hook, sup) = shop_with_webhook();
    let mut m = shop_mandate(checkout_needs_approval());
    // An ordinary credential of the shop: its value may go to the shop, so the request is not
    // a leak, and it reaches the human's view unless that view cuts it out. (A just-in-time
    // credential's value planted like this is a leak of its own: see the broker's tests.)
    m["credentials"] = json!([{
        "id": "pay", "site": "shop.test",
        "headers": { "X-Pay-Token": PAY_TOKEN },
    }]);
    let s = sup.session(&m);
    let b64 = base64::engine::general_purpose::STANDARD.encode(PAY_TOKEN);
    rt().block_on(async {
        let mut cdp = Cdp::connect(s["cdp_url"].as_str().unwrap()).await;
        let page = cdp.open_page(&shop.url()).await;
        // The page somehow holds the value (say, an earlier leak) and tries to get it shown to
        // the human, raw in the body and base64 in the URL.
        cdp.eval(
            &page,
            &format!(
                "window.outcome = undefined; fetch('/checkout?ref={b64}', {{method: 'POST', \
                 headers: {{'Content-Type': 'application/json'}}, \
                 body: JSON.stringify(Object.assign({{amount: 5, note: 'x{PAY_TOKEN}y'}}, \
                 Object.fromEntries([...Array(40).keys()].map(i => ['f' + i, i == 39 ? '{PAY_TOKEN}' : 'v'])))) }})\
                 .then(r => r.text()).then(t => window.outcome = 'OK:' + t, \
                 e => window.outcome = 'ERR:' + e.message); 0"
            ),
        )
        .await;
        let list = pending(&sup, 1);
        let shown = list[0].to_string();
        assert!(
            !shown.contains(PAY_TOKEN) && !shown.contains(&b64),
            "{shown}"
        );
        assert_eq!(
            list[0]["body"]["fields"][0],
            json!({"name": "amount", "value": "5"})
        );
        let id = list[0]["id"].as_str().unwrap().to_string();
        // The list shows 32 of the 42 fields and says so; the approval itself shows them all,
        // and the URL, with the value still cut out.
        let listed = &list[0]["body"];
        assert_eq!(listed["fields"].as_array().unwrap().len(), 32, "{listed}");
        assert_eq!((&listed["fields_total"], &listed["truncated"]), (&json!(42), &json!(true)));
        let (status, whole) = sup.api("GET", &format!("/v1/approvals/{id}"), None);
        assert_eq!(status, 200, "{whole}");
        let fields = whole["body"]["fields"].as_array().unwrap();
        assert_eq!(fields.len(), 42, "{whole}");
        assert_eq!(whole["body"]["truncated"], false, "{whole}");
        assert_eq!(fields[41]["name"], "f39", "{whole}");
        assert!(whole["url"].as_str().unwrap().contains("/checkout?ref="), "{whole}");
        let shown = whole.to_string();
        assert!(
            !shown.contains(PAY_TOKEN) && !shown.contains(&b64),
            "{shown}"
        );
        let (status, body) = sup.api("GET", "/v1/approvals/apr_000000000000000000000000", None);
        assert_eq!(status, 404, "{body}");
        for _ in 0..200 {
            if !hook.requests().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, _) = decide(&sup, &id, "deny", "gina");
        assert_eq!(status, 200);
        let (status, body) = sup.api("GET", &format!("/v1/approvals/{id}"), None);
        assert_eq!(status, 409, "{body}");
        assert!(body["error"].as_str().unwrap().contains("denied by gina"), "{body}");
        assert!(outcome(&mut cdp, &page).await.starts_with("ERR:"));
    });
    assert_eq!(hook.requests().len(), 1);
    for (what, text) in [
        (
            "webhook",
            String::from_utf8_lossy(&hook.everything()).to_string(),
        ),
        ("audit log", std::fs::read_to_string(&sup.audit).unwrap()),
        ("supervisor output", sup.stderr_text()),
    ] {
        assert!(!text.contains(PAY_TOKEN), "{what} holds the value");
        assert!(!text.contains(&b64), "{what} holds the value in base64");
    }
    assert!(shop.orders().is_empty());
}

#[test]
fn chaperone_run_refuses_step_up_approval_it_could_not_keep_from_its_command() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("p.toml");
    std::fs::write(
        &profile,
        "agent = \"ci\"\nttl_secs = 60\nactions = [{ match = { method = \"POST\" }, decision = \"approve\" }]\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["run", "--profile"])
        .arg(&profile)
        .arg("--audit-log")
        .arg(dir.path().join("audit.jsonl"))
        .args(["--", "true"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mandate.actions[0]"), "{err}");
    assert!(err.contains("chaperone serve"), "{err}");
}
