//! Real CDP clients drive a sandboxed Chromium through chaperone: Playwright (`cdp_url` and
//! `http_url`), Puppeteer (`browserWSEndpoint`) and chromiumoxide (`Browser::connect`) each open
//! a page, navigate to a local test site by host name, evaluate script, take a screenshot and
//! close.

mod common;

use common::*;
use futures_util::StreamExt;

fn drive_node(script: &str, endpoint: &str) {
    let site = Site::start(TEST_PAGE);
    let sup = Supervisor::start();
    let s = sup.session(&mandate(300, &["site.test"]));
    let shot = sup.dir.path().join("shot.png");
    let verdict = node_client(
        script,
        &[
            (
                "CHAPERONE_CDP_URL",
                s["cdp_url"].as_str().unwrap().to_string(),
            ),
            (
                "CHAPERONE_HTTP_URL",
                s["http_url"].as_str().unwrap().to_string(),
            ),
            ("SITE_URL", format!("http://site.test:{}/", site.port())),
            ("SHOT_PATH", shot.display().to_string()),
            ("PW_ENDPOINT", endpoint.to_string()),
        ],
    );
    assert_eq!(verdict["ok"], true, "{script} ({endpoint}): {verdict}");
    assert_eq!(verdict["msg"], "hello from site");
    assert_eq!(verdict["sum"], 2);
    assert!(verdict["shot_bytes"].as_u64().unwrap() > 1000);
    assert!(site.hits.load(std::sync::atomic::Ordering::SeqCst) > 0);
    // The browser is still the supervisor's after the client closed its connection: the
    // session waits, detached, for a resumption.
    still_running_after_disconnect(&sup, s["id"].as_str().unwrap());
}

fn still_running_after_disconnect(sup: &Supervisor, id: &str) {
    sup.wait_audit("session.detached", |r| {
        r["event"] == "session.detached" && r["session"] == id
    });
    let (status, body) = sup.api("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(status, 200);
    assert_eq!(body["state"], "detached", "{body}");
}

/// An agent process that dies and a new one that comes back with the ticket the first got
/// over CDP (`Chaperone.getResumeTicket`) and finds its page still open.
fn resume_after_crash(client: &str, via_http: bool) {
    let site = Site::start(TEST_PAGE);
    let sup = Supervisor::start();
    let s = sup.session(&mandate(300, &["site.test"]));
    let id = s["id"].as_str().unwrap().to_string();
    let site_url = format!("http://site.test:{}/", site.port());
    let first = node_client(
        "resume.mjs",
        &[
            ("CLIENT", client.to_string()),
            ("PHASE", "first".into()),
            ("CHAPERONE_CDP_URL", s["cdp_url"].as_str().unwrap().into()),
            ("SITE_URL", site_url.clone()),
        ],
    );
    assert_eq!(first["ok"], true, "{client} first phase: {first}");
    still_running_after_disconnect(&sup, &id);
    let url = if via_http {
        first["httpUrl"].as_str().unwrap()
    } else {
        first["resumeUrl"].as_str().unwrap()
    };
    let second = node_client(
        "resume.mjs",
        &[
            ("CLIENT", client.to_string()),
            ("PHASE", "second".into()),
            ("RESUME_URL", url.to_string()),
            ("SITE_URL", site_url),
        ],
    );
    assert_eq!(second["ok"], true, "{client} second phase: {second}");
    assert_eq!(second["msg"], "hello from site");
    assert_eq!(second["nextSeq"], 2);
    let resumed = sup.wait_audit("session.resumed", |r| {
        r["event"] == "session.resumed" && r["session"] == id.as_str()
    });
    assert_eq!(resumed["freshness"]["result"], "ok", "{resumed}");
    assert_eq!(resumed["freshness"]["issued_via"], "cdp");
    assert_eq!(resumed["freshness"]["ticket_seq"], first["seq"]);
    let log = std::fs::read_to_string(&sup.audit).unwrap();
    assert!(!log.contains("chpr1."), "a ticket is in the audit log");
}

#[test]
fn playwright_reconnects_with_a_resume_ticket() {
    resume_after_crash("playwright", false);
}

#[test]
fn playwright_reconnects_with_a_resume_ticket_on_the_http_url() {
    resume_after_crash("playwright", true);
}

#[test]
fn puppeteer_reconnects_with_a_resume_ticket() {
    resume_after_crash("puppeteer", false);
}

#[test]
fn playwright_connect_over_cdp_with_cdp_url() {
    drive_node("playwright.mjs", "cdp");
}

#[test]
fn playwright_connect_over_cdp_with_http_url() {
    drive_node("playwright.mjs", "http");
}

#[test]
fn puppeteer_connect_with_browser_ws_endpoint() {
    drive_node("puppeteer.mjs", "cdp");
}

#[test]
fn chromiumoxide_browser_connect() {
    let site = Site::start(TEST_PAGE);
    let sup = Supervisor::start();
    let s = sup.session(&mandate(300, &["site.test"]));
    let url = s["cdp_url"].as_str().unwrap().to_string();
    let site_url = format!("http://site.test:{}/", site.port());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let fut = async {
            let (browser, mut handler) = chromiumoxide::Browser::connect(url).await?;
            let h = tokio::spawn(async move { while handler.next().await.is_some() {} });
            let page = browser.new_page(site_url.as_str()).await?;
            page.wait_for_navigation().await?;
            let msg: String = page
                .evaluate("document.querySelector('#msg').textContent")
                .await?
                .into_value()?;
            let sum: i64 = page.evaluate("1+1").await?.into_value()?;
            let png = page
                .screenshot(chromiumoxide::page::ScreenshotParams::builder().build())
                .await?;
            page.close().await?;
            drop(browser);
            h.abort();
            Ok::<_, Box<dyn std::error::Error>>((msg, sum, png))
        };
        let (msg, sum, png) = tokio::time::timeout(std::time::Duration::from_secs(60), fut)
            .await
            .expect("chromiumoxide run hung")
            .expect("chromiumoxide run failed");
        assert_eq!(msg, "hello from site");
        assert_eq!(sum, 2);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    });
    still_running_after_disconnect(&sup, s["id"].as_str().unwrap());
}
