//! The credential broker's cost, measured in the same run on the same machine.
//!
//! `scripts/bench.sh` runs this after `benches/session.rs` (which rewrites the rest of
//! `BENCHMARKS.md` and keeps this section); this program replaces only its own section, between
//! `<!-- credentials:begin -->` and `<!-- credentials:end -->`, and appends it when absent.
//! Two figures:
//!
//! 1. **Page load on a credential site**: `Page.navigate` → the page's `load` lifecycle event
//!    for a page with 100 subresources served by a local HTTP/1.1 server (in this process, on
//!    its own thread), on a fresh page each run. Bare Chromium (as `nobody`, its own sandbox
//!    on, `--host-resolver-rules` for the site) against a chaperone session whose mandate holds
//!    a credential (cookie + `Authorization`) for that site, so every request is intercepted
//!    and gets the credential injected; every chaperone run checks that the server received
//!    the injected credential on the page and on all 100 subresources. A chaperone session
//!    without credentials (no interception, the same sandbox and egress proxy) runs alongside,
//!    so the difference splits into what the sandbox's network path costs and what the
//!    interception costs. Three more bare Chromiums, each with a part of the issue's
//!    interception driven by this program (browser-level `Fetch` for documents only, `Fetch`
//!    for every request, `Network` on every target) and every pause continued at once, show
//!    what that interception costs Chromium itself, with no chaperone: the floor for the
//!    broker. One browser per side for all runs (steady state), medians of `BENCH_RUNS` runs
//!    after one discarded warm-up, the sides' order rotating run by run.
//! 2. **Per-request decision**: [`chaperone::broker::decide::decide`] on a browser-like request
//!    (credential site, non-credential site, request carrying a held value), medians of the
//!    per-call time over batches.
//!
//! Every wait is bounded, and every browser, supervisor, server thread and temporary directory
//! is gone when the program ends, on failure too.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::hint::black_box;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use chaperone::broker::decide::{decide, Context, Decision, Request};
use chaperone::mandate::{Mandate, UnlistedCredentials};
use chaperone::vault::{FingerprintKey, Vault};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use url::Url;

/// Hang guard for one page load.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// The credential's site; both browsers reach it at 127.0.0.1.
const SITE: &str = "bank.test";
/// Subresources of the page (the issue's figure).
const SUBRESOURCES: usize = 100;

const BEGIN: &str = CREDENTIALS_BEGIN;
const END: &str = CREDENTIALS_END;

/// The decision followed by a mandate's action rules (issue 6, which set no target for it).
const RULES_CASE: &str =
    "to another site, then 10 action rules (the 10th matches on 2 JSON body fields)";

/// Targets from the issue.
const LOAD_RATIO_TARGET: f64 = 1.10;
const DECIDE_TARGET_US: f64 = 20.0;

/// A valid 1×1 transparent PNG: every subresource decodes, so the page checks that all loaded.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0a, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x00, 0x01, 0x00, 0x00,
    0x05, 0x00, 0x01, 0x0d, 0x0a, 0x2d, 0xb4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae,
    0x42, 0x60, 0x82,
];

/// Run in the page right after its load event: what loaded, the page's own load time, and from
/// the subresources' resource timing the most of them in flight at once and the median time
/// from sending a request to the end of its response.
const CHECK_JS: &str = "(() => { \
    const n = performance.getEntriesByType('navigation')[0]; \
    const images = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length; \
    const spans = performance.getEntriesByType('resource').filter(e => e.name.includes('/r/')) \
        .map(e => [e.requestStart || e.startTime, e.responseEnd]); \
    const edges = spans.flatMap(([a, b]) => [[a, 1], [b, -1]]) \
        .sort((x, y) => x[0] - y[0] || x[1] - y[1]); \
    let now = 0, peak = 0; \
    for (const [, d] of edges) { now += d; peak = Math.max(peak, now); } \
    const lat = spans.map(([a, b]) => b - a).sort((x, y) => x - y); \
    return {href: location.href, images, load: n ? n.loadEventStart : -1, peak, \
            latency: lat.length ? lat[lat.length >> 1] : -1}; })()";

fn main() {
    // `cargo bench` and scripts/bench.sh pass `--bench`; `cargo test --all-targets` runs this
    // program too, without it, and a minutes-long benchmark has no place in the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("bench: skipped (run scripts/bench.sh, or `cargo bench --bench credentials`)");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run()) {
        eprintln!("bench: FAILED: {e:#}");
        std::process::exit(1);
    }
}

struct Settings {
    runs: usize,
    batches: usize,
    calls: usize,
    out: PathBuf,
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let runs = env_runs()?;
        Ok(Settings {
            runs,
            batches: env_num("BENCH_DECIDE_BATCHES", 200)?.max(1) as usize,
            calls: env_num("BENCH_DECIDE_CALLS", 1000)?.max(1) as usize,
            out: env_out(),
        })
    }
}

async fn run() -> anyhow::Result<()> {
    let s = Settings::from_env()?;
    if !Path::new(CHROMIUM).exists() {
        bail!("{CHROMIUM} is not installed (scripts/setup.sh installs it)");
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("run the benchmark as root (bare Chromium is started as `nobody`)");
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .context("looking up user nobody")?
        .ok_or_else(|| anyhow!("user `nobody` does not exist on this machine"))?;
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let load_before = loadavg();

    // The micro-benchmark first, while none of our browsers exists to steal a core.
    eprintln!(
        "bench: decide(): {} batches × {} calls per scenario",
        s.batches, s.calls
    );
    let micro = decide_bench(&s)?;
    for m in &micro {
        eprintln!(
            "bench: decide(), {}: median {:.2} µs per call",
            m.name,
            median(&m.per_call_us)
        );
    }

    let secrets = Secrets::random();
    let bank = Bank::start(&secrets)?;
    let work = tempfile::Builder::new()
        // Short: Chromium's singleton socket lives below it and a socket path has at most
        // 107 bytes (a longer prefix made bare Chromium exit at start under scripts/bench.sh).
        .prefix("cred-")
        .tempdir()
        .context("creating the bench's temporary directory")?;
    // `nobody` must reach the bare profile below it.
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))?;
    let mut sup = Supervisor::start(work.path()).await?;
    let result = pages(&s, &sup, &bank, &secrets, work.path(), &nobody).await;
    let stopped = sup.stop().await;
    drop(bank);
    let pages = result?;
    stopped?;

    let machine = Machine {
        date,
        load_before,
        chromium: pages.chromium.clone(),
    };
    let section = render(&s, &pages, &micro, &machine);
    write_section(&s.out, &section)?;
    eprintln!(
        "bench: wrote the credential broker's section of {}",
        s.out.display()
    );
    Ok(())
}

struct Machine {
    date: String,
    load_before: String,
    chromium: String,
}

// ---------------------------------------------------------------------------------------------
// The decision micro-benchmark.

struct Micro {
    name: &'static str,
    /// What the call returns (checked once before timing).
    expected: &'static str,
    /// A part of the decision for the request to another site, timed on its own to show where its time goes.
    part: bool,
    per_call_us: Vec<f64>,
}

/// Headers Chromium 156 sends with a `fetch()` POST of JSON, as Fetch shows them at the
/// Request stage (12 of them; no `Cookie`: a credential site's browser cookies are blocked).
fn browser_headers(origin: &str) -> Vec<(String, String)> {
    [
        (
            "sec-ch-ua",
            "\"Chromium\";v=\"156\", \"Not)A;Brand\";v=\"24\"",
        ),
        ("sec-ch-ua-mobile", "?0"),
        ("sec-ch-ua-platform", "\"Linux\""),
        (
            "User-Agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
             HeadlessChrome/156.0.0.0 Safari/537.36",
        ),
        ("Accept", "application/json, text/plain, */*"),
        ("Accept-Language", "en-US,en;q=0.9"),
        ("Content-Type", "application/json"),
        ("Origin", origin),
        (
            "Referer",
            &format!("{origin}/accounts/checking?tab=activity&page=3"),
        ),
        ("Sec-Fetch-Site", "same-origin"),
        ("Sec-Fetch-Mode", "cors"),
        ("Sec-Fetch-Dest", "empty"),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect()
}

/// A 1 KiB JSON body such as a banking page posts.
fn json_body() -> Vec<u8> {
    let mut b = String::from(
        r#"{"from":"checking-0012","to":"savings-0099","amount":"125.00","currency":"EUR","#,
    );
    b.push_str(r#""memo":"monthly transfer","items":["#);
    let mut i = 0;
    while b.len() < 1000 {
        let _ = write!(
            b,
            r#"{{"ref":"INV-2024-{i:05}","amount":"{}.{:02}"}},"#,
            10 + i * 7,
            i * 13 % 100
        );
        i += 1;
    }
    b.pop();
    b.push_str("]}");
    while b.len() < 1024 {
        b.insert(b.len() - 2, ' ');
    }
    b.into_bytes()
}

fn decide_bench(s: &Settings) -> anyhow::Result<Vec<Micro>> {
    let secrets = Secrets::random();
    let mandate = json!({
        "agent": "bench",
        "ttl_secs": 600,
        "credentials": [
            {"id": "bank", "site": SITE,
             "cookies": [{"name": "sid", "value": secrets.cookie}],
             "headers": {"Authorization": format!("Bearer {}", secrets.token)}},
            {"id": "mail", "site": "mail.test",
             "headers": {"X-Api-Key": secrets.other}},
        ],
    });
    let m = Mandate::from_json(&mandate.to_string()).context("the bench's mandate")?;
    let vault =
        Vault::new(&m.credentials, FingerprintKey::random()).context("the bench's vault")?;
    let body = json_body();
    let mut leaky = body.clone();
    // Last, so the scan goes through everything else first; base64, as a page would hide it.
    {
        use base64::Engine;
        let hidden = base64::engine::general_purpose::STANDARD.encode(&secrets.cookie);
        let at = leaky.len() - 2;
        leaky.splice(at..at, format!(",\"x\":\"{hidden}\"").into_bytes());
    }
    let query = "account=checking-0012&period=2024-05&q=monthly%20statement&page=2";
    let bank_url = Url::parse(&format!("https://{SITE}/api/v2/transfers?{query}"))?;
    let shop_url = Url::parse(&format!("https://www.shop.test/api/v2/orders?{query}"))?;
    let evil_url = Url::parse(&format!("https://collect.evil.test/api/v2/c?{query}"))?;
    let bank_headers = browser_headers(&format!("https://{SITE}"));
    let shop_headers = browser_headers("https://www.shop.test");
    let evil_headers = browser_headers("https://collect.evil.test");
    let context = Context {
        document: false,
        main_frame: true,
        same_site: Some(true),
        approved: false,
    };
    let request = |url, headers, body| Request {
        url,
        method: "POST",
        headers,
        body,
        context: context.clone(),
    };
    type Check = fn(&Decision) -> bool;
    let scenarios: [(&'static str, &'static str, Request<'_>, Check); 3] = [
        (
            "to the credential's site, same-site context",
            "cookie and Authorization injected",
            request(&bank_url, &bank_headers, &body),
            |d| {
                matches!(d, Decision::Continue { injected: Some(i), headers: Some(_), .. }
                    if i.tokens.len() == 2)
            },
        ),
        (
            "to another site, no authentication headers",
            "sent untouched",
            request(&shop_url, &shop_headers, &body),
            |d| {
                matches!(
                    d,
                    Decision::Continue {
                        headers: None,
                        injected: None,
                        withheld: None,
                        ..
                    }
                )
            },
        ),
        (
            "to another site, the held cookie base64-encoded at the end of the body",
            "failed as exfiltration",
            request(&evil_url, &evil_headers, &leaky),
            |d| matches!(d, Decision::Exfiltration { credential, .. } if credential == "bank"),
        ),
    ];
    for (name, _, req, check) in &scenarios {
        let d = decide(req, &vault, UnlistedCredentials::Strip);
        if !check(&d) {
            bail!("decide() on the {name:?} request did not decide as expected: {d:?}");
        }
    }
    // The action rules a shop mandate might hold: nine that do not match the request to the
    // shop, then one that does on two JSON body fields (the body is read once, for it).
    let rules: Vec<chaperone::actions::ActionRule> = serde_json::from_value(json!([
        {"match": {"method": "POST", "url": "bank.test/transfer*"}, "decision": "approve"},
        {"match": {"method": "DELETE"}, "decision": "deny"},
        {"match": {"url": "*.evil.test"}, "decision": "deny"},
        {"match": {"method": "PUT", "url": "*.shop.test/api/*/cart*"}, "decision": "allow", "max_count": 50},
        {"match": {"url": "www.shop.test/account/*"}, "decision": "approve"},
        {"match": {"method": ["POST", "PATCH"], "url": "www.shop.test/api/*/address*"}, "decision": "approve"},
        {"match": {"url": "https://www.shop.test/api/*/refund*"}, "decision": "approve"},
        {"match": {"method": "POST", "url": "pay.test/*"}, "decision": "approve"},
        {"match": {"url": "www.shop.test/export*"}, "decision": "deny"},
        {"match": {"method": "POST", "url": "*.shop.test/api/*/orders",
                   "fields": {"amount": {"max": 1000}, "currency": {"one_of": ["EUR", "USD"]}}},
         "decision": "approve"},
    ]))
    .context("the bench's action rules")?;
    let policy = chaperone::actions::ActionPolicy::compile(&rules)
        .map_err(|e| anyhow!("the bench's action rules: {}: {}", e.field, e.message))?;
    let shop_request = request(&shop_url, &shop_headers, &body);
    let with_rules = || {
        let d = decide(&shop_request, &vault, UnlistedCredentials::Strip);
        let m = policy.first_match(&chaperone::actions::Subject {
            method: shop_request.method,
            url: shop_request.url,
            headers: shop_request.headers,
            body: shop_request.body,
        });
        (d, m.map(|m| m.index))
    };
    if with_rules().1 != Some(9) {
        bail!("the bench's action rules did not match the shop request at the 10th rule");
    }
    // The leak scan as `decide` runs it for the request to another site (host, URL, every header
    // value then name, body), split up: it is most of that decision's time.
    let everyone = vault
        .detector_for(None)
        .ok_or_else(|| anyhow!("the bench's vault has no leak detector"))?;
    type Case<'a> = (&'static str, &'static str, bool, Box<dyn Fn() + 'a>);
    let mut cases: Vec<Case<'_>> = Vec::new();
    for (name, expected, req, _) in &scenarios {
        let vault = &vault;
        cases.push((
            name,
            expected,
            false,
            Box::new(move || {
                black_box(decide(
                    black_box(req),
                    black_box(vault),
                    UnlistedCredentials::Strip,
                ));
            }),
        ));
    }
    cases.push((
        RULES_CASE,
        "sent untouched; held for approval",
        false,
        Box::new(|| {
            black_box(with_rules());
        }),
    ));
    cases.extend::<[Case<'_>; 3]>([
        (
            "the 1 KiB body",
            "nothing found",
            true,
            Box::new(|| {
                black_box(everyone.find(black_box(&body)));
            }),
        ),
        (
            "the URL (its query has a percent-escape)",
            "nothing found",
            true,
            Box::new(|| {
                black_box(everyone.find(black_box(shop_url.as_str().as_bytes())));
            }),
        ),
        (
            "the 12 headers (value, then name)",
            "nothing found",
            true,
            Box::new(|| {
                for (n, v) in black_box(&shop_headers) {
                    black_box(
                        everyone
                            .find(v.as_bytes())
                            .or_else(|| everyone.find(n.as_bytes())),
                    );
                }
            }),
        ),
    ]);
    let mut out: Vec<Micro> = cases
        .iter()
        .map(|(name, expected, part, _)| Micro {
            name,
            expected,
            part: *part,
            per_call_us: Vec::with_capacity(s.batches),
        })
        .collect();
    // One discarded batch each, then the cases take turns batch by batch, so drift on the
    // machine hits all of them alike.
    for batch in 0..=s.batches {
        for (i, (.., f)) in cases.iter().enumerate() {
            let t = Instant::now();
            for _ in 0..s.calls {
                f();
            }
            let per_call = t.elapsed().as_secs_f64() * 1e6 / s.calls as f64;
            if batch > 0 {
                out[i].per_call_us.push(per_call);
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The bank: a local HTTP/1.1 server on its own thread.

/// The held values of one bench run (random, so nothing else can produce them by chance).
struct Secrets {
    cookie: String,
    token: String,
    other: String,
}

impl Secrets {
    fn random() -> Secrets {
        let r = || hex::encode(rand::random::<[u8; 12]>());
        Secrets {
            cookie: format!("bench-sid-{}", r()),
            token: format!("bench-token-{}", r()),
            other: format!("bench-key-{}", r()),
        }
    }
}

/// What the bank saw of one request.
struct Hit {
    path: String,
    /// Which TCP connection it came on (numbered by the server as it accepts them).
    conn: u64,
    /// It carried the held cookie and the held `Authorization` header.
    authenticated: bool,
    /// It carried a `Cookie` or `Authorization` header at all.
    any_auth: bool,
}

struct Bank {
    port: u16,
    hits: Arc<Mutex<Vec<Hit>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Bank {
    fn start(secrets: &Secrets) -> anyhow::Result<Bank> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the bank's socket")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let expect = Arc::new((
            format!("sid={}", secrets.cookie),
            format!("Bearer {}", secrets.token),
        ));
        let page = Bytes::from(page_html());
        let recorder = hits.clone();
        let thread = std::thread::Builder::new()
            .name("bank".into())
            .spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let mut accepted = 0u64;
                    loop {
                        let tcp = tokio::select! {
                            a = listener.accept() => a?.0,
                            _ = &mut stopped => return Ok(()),
                        };
                        tcp.set_nodelay(true)?;
                        accepted += 1;
                        let conn = accepted;
                        let (hits, page, expect) = (recorder.clone(), page.clone(), expect.clone());
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let resp = respond(&req, conn, &hits, &page, &expect);
                                async move { Ok::<_, Infallible>(resp) }
                            });
                            // A connection's end (the browser or the proxy closing it) is
                            // not the bench's business; the checks count what arrived.
                            let _ = hyper::server::conn::http1::Builder::new()
                                .keep_alive(true)
                                .serve_connection(TokioIo::new(tcp), svc)
                                .await;
                        });
                    }
                })
            })
            .context("starting the bank's thread")?;
        Ok(Bank {
            port,
            hits,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn url(&self) -> String {
        format!("http://{SITE}:{}/page", self.port)
    }

    /// The requests received since the last call.
    fn take(&self) -> Vec<Hit> {
        std::mem::take(&mut *self.hits.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for Bank {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Err(e)) => eprintln!("bench: the bank server failed: {e:#}"),
                Err(_) => eprintln!("bench: the bank server panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

fn page_html() -> String {
    let mut p = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>bank</title></head><body>\n",
    );
    for i in 0..SUBRESOURCES {
        let _ = writeln!(
            p,
            "<img src=\"/r/{i}.png\" width=\"1\" height=\"1\" alt=\"\">"
        );
    }
    p.push_str("</body></html>\n");
    p
}

fn respond(
    req: &hyper::Request<hyper::body::Incoming>,
    conn: u64,
    hits: &Mutex<Vec<Hit>>,
    page: &Bytes,
    expect: &(String, String),
) -> hyper::Response<Full<Bytes>> {
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
    let cookie = header("cookie");
    let authorization = header("authorization");
    let path = req.uri().path().to_string();
    let hit = Hit {
        authenticated: cookie.is_some_and(|c| c.split(';').any(|p| p.trim() == expect.0))
            && authorization == Some(expect.1.as_str()),
        any_auth: cookie.is_some() || authorization.is_some(),
        conn,
        path: path.clone(),
    };
    hits.lock().unwrap_or_else(|p| p.into_inner()).push(hit);
    let (status, kind, body) = if path == "/page" {
        (200, "text/html; charset=utf-8", page.clone())
    } else if path.starts_with("/r/") && path.ends_with(".png") {
        (200, "image/png", Bytes::from_static(PNG))
    } else {
        (404, "text/plain", Bytes::from_static(b"not found\n"))
    };
    hyper::Response::builder()
        .status(status)
        .header("content-type", kind)
        // Every run loads every subresource from the server: nothing comes from a cache.
        .header("cache-control", "no-store")
        .body(Full::new(body))
        .expect("a response from fixed parts")
}

// ---------------------------------------------------------------------------------------------
// Page loads: six sides, one browser each.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Bare,
    /// A chaperone session without credentials: no interception.
    Plain,
    /// A chaperone session with a credential for the site: every request intercepted.
    Broker,
    /// Bare Chromium with browser-level Fetch for documents only: the interceptor is
    /// installed, the navigation is paused, none of the images.
    FetchDocs,
    /// Bare Chromium with browser-level Fetch for every request, each continued at once.
    FetchAll,
    /// Bare Chromium with `Network` enabled on every target (auto-attach), no Fetch.
    NetworkAll,
}

const SIDES: [Side; 6] = [
    Side::Bare,
    Side::Plain,
    Side::Broker,
    Side::FetchDocs,
    Side::FetchAll,
    Side::NetworkAll,
];

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Bare => "bare",
            Side::Plain => "chaperone, no credentials",
            Side::Broker => "chaperone, credential",
            Side::FetchDocs => "bare + Fetch, nothing paused",
            Side::FetchAll => "bare + Fetch, every request paused",
            Side::NetworkAll => "bare + Network on every target",
        }
    }

    /// A bare Chromium of its own, as `nobody`, reached over a pipe.
    fn is_bare(self) -> bool {
        !matches!(self, Side::Plain | Side::Broker)
    }

    /// The page's requests that must show up, in the bare browser's own CDP events, as
    /// `Fetch.requestPaused` and as `Network.requestWillBeSent`: proof that the side's
    /// interceptor did what the side is named after. None for chaperone's sides: the gate
    /// keeps the broker's sessions from the agent.
    fn expected_events(self) -> Option<Events> {
        let all = SUBRESOURCES + 1;
        let (paused, will_be_sent) = match self {
            Side::Bare => (0, 0),
            Side::FetchDocs => (1, 0),
            Side::FetchAll => (all, 0),
            Side::NetworkAll => (0, all),
            Side::Plain | Side::Broker => return None,
        };
        Some(Events {
            paused,
            will_be_sent,
        })
    }
}

/// Counts of the page's requests (the page and its images) in one load's CDP events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Events {
    paused: usize,
    will_be_sent: usize,
}

/// Sets up a bare browser for `side`: the issue's interception (browser-level Fetch at the
/// Request stage), or its Network part, with every pause answered unchanged at once by this
/// process — the least any interceptor answering over CDP can do.
async fn instrument(side: Side, cdp: &mut Cdp) -> anyhow::Result<()> {
    let pattern = match side {
        Side::FetchDocs => {
            json!({"urlPattern": "*", "resourceType": "Document", "requestStage": "Request"})
        }
        Side::FetchAll => json!({"urlPattern": "*", "requestStage": "Request"}),
        Side::NetworkAll => {
            cdp.hook = Some(network_on_every_target());
            cdp.call(
                "Target.setAutoAttach",
                json!({"autoAttach": true, "waitForDebuggerOnStart": true, "flatten": true}),
                None,
            )
            .await?;
            return Ok(());
        }
        Side::Bare | Side::Plain | Side::Broker => return Ok(()),
    };
    cdp.hook = Some(Box::new(continue_unchanged));
    cdp.call("Fetch.enable", json!({"patterns": [pattern]}), None)
        .await?;
    Ok(())
}

/// Answers a `Fetch.requestPaused` with a `Fetch.continueRequest` that changes nothing.
fn continue_unchanged(m: &Value) -> Vec<Value> {
    if m["method"] != "Fetch.requestPaused" {
        return Vec::new();
    }
    let mut c = json!({
        "method": "Fetch.continueRequest",
        "params": {"requestId": m["params"]["requestId"]},
    });
    if let Some(session) = m.get("sessionId") {
        c["sessionId"] = session.clone();
    }
    vec![c]
}

/// Enables `Network` (no buffering, as chaperone does) on each target the browser's
/// auto-attach reports, once per target, and lets the target run. The bench's own
/// `Target.attachToTarget` reports the page a second time; that session gets nothing, so the
/// page's Network events come once, as under chaperone.
fn network_on_every_target() -> Hook {
    let mut seen = BTreeSet::new();
    Box::new(move |m: &Value| {
        let p = &m["params"];
        if m["method"] != "Target.attachedToTarget"
            || m.get("sessionId").is_some()
            || p["targetInfo"]["type"] == "browser"
            || !seen.insert(p["targetInfo"]["targetId"].to_string())
        {
            return Vec::new();
        }
        let session = &p["sessionId"];
        vec![
            json!({
                "method": "Network.enable",
                "params": {"maxTotalBufferSize": 0, "maxResourceBufferSize": 0},
                "sessionId": session,
            }),
            json!({"method": "Runtime.runIfWaitingForDebugger", "params": {}, "sessionId": session}),
        ]
    })
}

/// One page load.
#[derive(Clone)]
struct Load {
    /// `Page.navigate` sent → `load` lifecycle event received.
    ms: f64,
    /// The page's own `loadEventStart` (navigation timing, from navigation start).
    in_page_ms: f64,
    /// TCP connections the server saw for this load.
    connections: usize,
    /// Most subresource requests in flight at once (resource timing).
    peak: f64,
    /// Median subresource `requestStart` → `responseEnd` (resource timing).
    latency_ms: f64,
    /// CPU time the side's browser processes used during the timed span.
    browser_cpu_ms: f64,
    /// The same by kind of process.
    cpu_by_kind: BTreeMap<&'static str, f64>,
    /// CPU time `chaperone serve` used during the timed span (all its threads).
    supervisor_cpu_ms: f64,
}

struct Pages {
    /// Indexed like [`SIDES`].
    loads: [Vec<Load>; SIDES.len()],
    chromium: String,
}

fn mandate(with_credential: bool, s: &Secrets) -> Value {
    let mut m = json!({
        "agent": "bench",
        "ttl_secs": 3600,
        "egress": {
            "allow": [SITE],
            "private_networks": ["127.0.0.0/8"],
            "hosts": {SITE: "127.0.0.1"},
            // The local test server listens on an ephemeral port.
            "ports": ["1024-65535"],
        }
    });
    if with_credential {
        m["credentials"] = json!([{
            "id": "bank",
            "site": SITE,
            // Plain http to the local server: a Secure cookie would not be sent.
            "cookies": [{"name": "sid", "value": s.cookie, "secure": false}],
            "headers": {"Authorization": format!("Bearer {}", s.token)},
        }]);
    }
    m
}

async fn pages(
    s: &Settings,
    sup: &Supervisor,
    bank: &Bank,
    secrets: &Secrets,
    work: &Path,
    nobody: &nix::unistd::User,
) -> anyhow::Result<Pages> {
    // One bare Chromium per bare side, in the order of SIDES; a failure drops (kills) those
    // already started.
    let mut bares = Vec::new();
    let mut bare_cdps = Vec::new();
    let mut version = Value::Null;
    for side in SIDES.into_iter().filter(|s| s.is_bare()) {
        let (bare, mut cdp, _, v) =
            tokio::time::timeout(STEP_TIMEOUT, Bare::start(work, nobody, Some(SITE)))
                .await
                .map_err(|_| {
                    anyhow!(
                        "bare Chromium ({}) did not answer within {STEP_TIMEOUT:?}",
                        side.name()
                    )
                })??;
        bares.push(bare);
        instrument(side, &mut cdp)
            .await
            .with_context(|| format!("setting up {}", side.name()))?;
        bare_cdps.push(cdp);
        version = v;
    }
    let mut sessions = Vec::new();
    let result = measure(
        s,
        sup,
        bank,
        secrets,
        bares.iter().zip(bare_cdps).collect(),
        &mut sessions,
    )
    .await;
    let mut deleted = Ok(());
    for id in sessions {
        match sup.api("DELETE", &format!("/v1/sessions/{id}"), None).await {
            Ok((200 | 204, _)) => {}
            Ok((status, body)) => {
                deleted = Err(anyhow!(
                    "DELETE /v1/sessions/{id} answered {status}: {body}"
                ))
            }
            Err(e) => deleted = Err(e),
        }
    }
    drop(bares);
    let loads = result?;
    deleted?;
    Ok(Pages {
        loads,
        chromium: version["product"].as_str().unwrap_or("unknown").to_string(),
    })
}

/// Opens the two chaperone sessions (their ids go to `sessions` at once, so the caller can
/// revoke them whatever happens), then loads the page on every side, run by run. `bares` are
/// the bare sides' browsers in the order of [`SIDES`].
async fn measure<'a>(
    s: &Settings,
    sup: &Supervisor,
    bank: &Bank,
    secrets: &Secrets,
    bares: Vec<(&'a Bare, Cdp)>,
    sessions: &mut Vec<String>,
) -> anyhow::Result<[Vec<Load>; SIDES.len()]> {
    let mut bares = bares.into_iter();
    let mut cdps = Vec::new();
    let mut watches: Vec<CpuWatch<'a>> = Vec::new();
    for side in SIDES {
        if side.is_bare() {
            let (bare, cdp) = bares
                .next()
                .ok_or_else(|| anyhow!("no browser for {}", side.name()))?;
            cdps.push(cdp);
            watches.push(CpuWatch {
                procs: Box::new(|| bare.processes()),
                supervisor: sup.pid,
            });
            continue;
        }
        let with_credential = side == Side::Broker;
        // The session's processes: everything below the supervisor's children that appeared
        // with it (its sandbox launcher).
        let before = children(sup.pid);
        let (status, body) = sup
            .api(
                "POST",
                "/v1/sessions",
                Some(mandate(with_credential, secrets).to_string()),
            )
            .await?;
        if status != 201 {
            bail!("POST /v1/sessions answered {status}: {body}");
        }
        let id = body["id"]
            .as_str()
            .ok_or_else(|| anyhow!("no id in {body}"))?;
        sessions.push(id.to_string());
        let roots: Vec<i32> = children(sup.pid)
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        watches.push(CpuWatch {
            procs: Box::new(move || under(&roots)),
            supervisor: sup.pid,
        });
        let url = body["cdp_url"]
            .as_str()
            .ok_or_else(|| anyhow!("no cdp_url in {body}"))?;
        let (ws, _) = tokio::time::timeout(
            STEP_TIMEOUT,
            tokio_tungstenite::connect_async_with_config(url, None, true),
        )
        .await
        .map_err(|_| anyhow!("websocket connect to {url}: no answer"))?
        .with_context(|| format!("websocket connect to {url}"))?;
        let mut cdp = Cdp::new(Transport::Ws(Box::new(ws)));
        cdp.call("Browser.getVersion", json!({}), None).await?;
        cdps.push(cdp);
    }

    let url = bank.url();
    let mut loads: [Vec<Load>; SIDES.len()] = Default::default();
    for i in 0..=s.runs {
        let warmup = i == 0;
        let label = if warmup {
            "warm-up".to_string()
        } else {
            format!("run {i}/{}", s.runs)
        };
        let mut this: [Option<Load>; SIDES.len()] = Default::default();
        // Each side takes each place in the order equally often.
        for k in 0..SIDES.len() {
            let j = (i + k) % SIDES.len();
            let side = SIDES[j];
            bank.take();
            let measured = load(&mut cdps[j], &url, &watches[j])
                .await
                .with_context(|| format!("{}, {label}", side.name()))?;
            let hits = bank.take();
            let l = verify(side, &url, measured, &hits)
                .with_context(|| format!("{}, {label}", side.name()))?;
            this[j] = Some(l);
        }
        let this = this.map(|l| l.expect("every side ran"));
        let each = |f: &dyn Fn(&Load) -> String| this.iter().map(f).collect::<Vec<_>>().join(" / ");
        eprintln!(
            "bench: {label}: {} ms, {} connections ({})",
            each(&|l| format!("{:.0}", l.ms)),
            each(&|l| l.connections.to_string()),
            SIDES.map(Side::name).join(" / "),
        );
        if !warmup {
            for (j, l) in this.into_iter().enumerate() {
                loads[j].push(l);
            }
        }
    }
    Ok(loads)
}

/// Checks that the load was complete and, on the credential side, that every request of it
/// reached the server authenticated (otherwise the figure would not measure injection).
fn verify(side: Side, url: &str, measured: Measured, hits: &[Hit]) -> anyhow::Result<Load> {
    let Measured {
        took,
        check,
        cpu,
        events,
    } = measured;
    if check["href"] != url {
        bail!("the page ended up at {} instead of {url}", check["href"]);
    }
    if check["images"] != SUBRESOURCES {
        bail!(
            "{} of {SUBRESOURCES} images loaded by the load event",
            check["images"]
        );
    }
    let ours: Vec<&Hit> = hits
        .iter()
        .filter(|h| h.path == "/page" || h.path.starts_with("/r/"))
        .collect();
    let subresources: BTreeSet<&str> = ours
        .iter()
        .filter(|h| h.path.starts_with("/r/"))
        .map(|h| h.path.as_str())
        .collect();
    if subresources.len() != SUBRESOURCES || ours.len() != SUBRESOURCES + 1 {
        bail!(
            "the server got {} requests for the page and {} distinct subresources; expected 1 \
             and {SUBRESOURCES}, each once (is something caching despite no-store?)",
            ours.len() - ours.iter().filter(|h| h.path.starts_with("/r/")).count(),
            subresources.len()
        );
    }
    match side {
        Side::Broker => {
            let missing = ours.iter().filter(|h| !h.authenticated).count();
            if missing > 0 {
                bail!(
                    "{missing} of {} requests reached the server without the injected cookie and \
                     Authorization header: the broker did not inject, so the figure would not \
                     measure it",
                    ours.len()
                );
            }
        }
        Side::Bare | Side::Plain | Side::FetchDocs | Side::FetchAll | Side::NetworkAll => {
            if ours.iter().any(|h| h.any_auth) {
                bail!("a request without a credential in play carried Cookie or Authorization");
            }
        }
    }
    if let Some(want) = side.expected_events().filter(|w| *w != events) {
        bail!(
            "the browser reported {} paused and {} sent of the page's requests (expected {} and \
             {}): the side's interception is not what its figure claims to measure",
            events.paused,
            events.will_be_sent,
            want.paused,
            want.will_be_sent
        );
    }
    Ok(Load {
        ms: ms(took),
        in_page_ms: check["load"].as_f64().unwrap_or(f64::NAN),
        connections: hits.iter().map(|h| h.conn).collect::<BTreeSet<_>>().len(),
        peak: check["peak"].as_f64().unwrap_or(f64::NAN),
        latency_ms: check["latency"].as_f64().unwrap_or(f64::NAN),
        browser_cpu_ms: cpu.by_kind.values().sum(),
        cpu_by_kind: cpu.by_kind,
        supervisor_cpu_ms: cpu.supervisor_ms,
    })
}

/// What `load` measured.
struct Measured {
    /// `Page.navigate` sent → the `load` event received.
    took: Duration,
    /// What [`CHECK_JS`] returned.
    check: Value,
    cpu: Cpu,
    /// The page's requests in the client's CDP events from `Page.navigate` to the check.
    events: Events,
}

/// Loads `url` on a fresh page and closes the page again.
async fn load(cdp: &mut Cdp, url: &str, cpu: &CpuWatch<'_>) -> anyhow::Result<Measured> {
    let created = cdp
        .call("Target.createTarget", json!({"url": "about:blank"}), None)
        .await?;
    let target = created["targetId"]
        .as_str()
        .ok_or_else(|| anyhow!("Target.createTarget gave no targetId: {created}"))?
        .to_string();
    let result = load_in(cdp, &target, url, cpu).await;
    let closed = cdp
        .call("Target.closeTarget", json!({"targetId": target}), None)
        .await;
    let r = result?;
    closed?;
    Ok(r)
}

async fn load_in(
    cdp: &mut Cdp,
    target: &str,
    url: &str,
    cpu: &CpuWatch<'_>,
) -> anyhow::Result<Measured> {
    let attached = cdp
        .call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
            None,
        )
        .await?;
    let session = attached["sessionId"]
        .as_str()
        .ok_or_else(|| anyhow!("Target.attachToTarget gave no sessionId: {attached}"))?
        .to_string();
    let s = Some(session.as_str());
    cdp.call("Page.enable", json!({}), s).await?;
    cdp.call(
        "Page.setLifecycleEventsEnabled",
        json!({"enabled": true}),
        s,
    )
    .await?;
    cdp.events.clear();
    let cpu_before = cpu.sample();
    let t0 = Instant::now();
    let nav = cdp.call("Page.navigate", json!({"url": url}), s).await?;
    if let Some(e) = nav["errorText"].as_str().filter(|e| !e.is_empty()) {
        bail!("Page.navigate({url}): {e}");
    }
    let loader = nav["loaderId"]
        .as_str()
        .ok_or_else(|| anyhow!("Page.navigate gave no loaderId: {nav}"))?
        .to_string();
    // The `load` of this very document: the initial about:blank has another loader id.
    let at = cdp
        .wait_event(LOAD_TIMEOUT, |m| {
            m["method"] == "Page.lifecycleEvent"
                && m["sessionId"] == session.as_str()
                && m["params"]["name"] == "load"
                && m["params"]["loaderId"] == loader.as_str()
        })
        .await
        .with_context(|| format!("waiting for {url} to load"))?;
    let used = cpu.since(&cpu_before);
    let check = cdp
        .call(
            "Runtime.evaluate",
            json!({"expression": CHECK_JS, "returnByValue": true}),
            s,
        )
        .await?;
    // The page's own requests (a page may ask for more, such as a favicon).
    let page_url = Url::parse(url)?;
    let ours = |m: &Value| {
        m["params"]["request"]["url"]
            .as_str()
            .and_then(|u| Url::parse(u).ok())
            .is_some_and(|u| {
                u.origin() == page_url.origin()
                    && (u.path() == page_url.path() || u.path().starts_with("/r/"))
            })
    };
    let count = |method: &str| {
        cdp.events
            .iter()
            .filter(|(_, m)| m["method"] == method && ours(m))
            .count()
    };
    let events = Events {
        paused: count("Fetch.requestPaused"),
        will_be_sent: count("Network.requestWillBeSent"),
    };
    Ok(Measured {
        took: at - t0,
        check: check["result"]["value"].clone(),
        cpu: used,
        events,
    })
}

// ---------------------------------------------------------------------------------------------
// CDP over a pipe or a websocket, one request at a time, events kept for the waits.

// ---------------------------------------------------------------------------------------------
// Bare Chromium.

// ---------------------------------------------------------------------------------------------
// chaperone.

// ---------------------------------------------------------------------------------------------
// /proc.

/// `pid`'s direct children (of every thread).
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<i32> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|k| {
            k.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// `roots` and all their descendants.
fn under(roots: &[i32]) -> Vec<i32> {
    roots.iter().flat_map(|&r| descendants(r, true)).collect()
}

/// User + system CPU time of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: field 3 (state) is index 0, utime (14) and stime (15) 11 and 12.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
}

/// `/proc` reports CPU time in USER_HZ ticks, 100 per second on Linux whatever the kernel's HZ.
const TICK_MS: f64 = 10.0;

/// The CPU time of one side's browser processes and of the supervisor, around a load.
struct CpuWatch<'a> {
    procs: Box<dyn Fn() -> Vec<i32> + 'a>,
    supervisor: i32,
}

struct CpuSample {
    browser: Vec<(i32, u64)>,
    supervisor: u64,
}

/// CPU time used during a load, in ms.
struct Cpu {
    /// The side's browser processes, by kind of process.
    by_kind: BTreeMap<&'static str, f64>,
    /// `chaperone serve`.
    supervisor_ms: f64,
}

impl CpuWatch<'_> {
    fn sample(&self) -> CpuSample {
        CpuSample {
            browser: (self.procs)()
                .into_iter()
                .filter_map(|p| Some((p, cpu_ticks(p)?)))
                .collect(),
            supervisor: cpu_ticks(self.supervisor).unwrap_or(0),
        }
    }

    /// CPU used since `before`. A process that started since counts whole; one that ended
    /// since is lost (none does during a load).
    fn since(&self, before: &CpuSample) -> Cpu {
        let now = self.sample();
        let mut by_kind = BTreeMap::new();
        for (p, t) in &now.browser {
            let was = before
                .browser
                .iter()
                .find(|(q, _)| q == p)
                .map_or(0, |(_, t)| *t);
            *by_kind.entry(kind(*p)).or_insert(0.0) += t.saturating_sub(was) as f64 * TICK_MS;
        }
        Cpu {
            by_kind,
            supervisor_ms: now.supervisor.saturating_sub(before.supervisor) as f64 * TICK_MS,
        }
    }
}

/// What a browser-side process is, from its command line.
fn kind(pid: i32) -> &'static str {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // Chromium's child processes rewrite their command line into one space-separated string.
    if args.len() == 1 {
        args = args[0].split(' ').map(str::to_string).collect();
    }
    let flag = |name: &str| {
        let prefix = format!("--{name}=");
        args.iter()
            .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
    };
    if args.iter().any(|a| a.starts_with("__chaperone-sandbox")) {
        return "chaperone's sandbox launcher and init";
    }
    if args
        .first()
        .is_some_and(|a| a.ends_with("chrome_crashpad_handler"))
    {
        return "crashpad handlers";
    }
    match flag("type").as_deref() {
        None => "browser process",
        Some("renderer") => "renderer",
        Some("utility")
            if flag("utility-sub-type").is_some_and(|s| s.contains("NetworkService")) =>
        {
            "network service"
        }
        Some("gpu-process") => "GPU process",
        Some("zygote") => "zygotes",
        Some(_) => "other utility processes",
    }
}

// ---------------------------------------------------------------------------------------------
// Numbers and the report.

fn med_of(loads: &[Load], f: impl Fn(&Load) -> f64) -> f64 {
    median(&loads.iter().map(f).collect::<Vec<_>>())
}

/// Replaces this program's section of `path` (between the markers), or appends it.
fn write_section(path: &Path, section: &str) -> anyhow::Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".to_string(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let block = format!("{BEGIN}\n{}\n{END}\n", section.trim_end());
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => {
            let rest = old[e + END.len()..]
                .strip_prefix('\n')
                .unwrap_or(&old[e + END.len()..]);
            format!("{}{block}{rest}", &old[..b])
        }
        (None, None) => format!("{}\n\n{block}", old.trim_end()),
        _ => bail!(
            "{} has only one of the markers {BEGIN} and {END} (or them out of order): fix the \
             file by hand or rerun scripts/bench.sh, which rewrites it",
            path.display()
        ),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

fn render(s: &Settings, p: &Pages, micro: &[Micro], m: &Machine) -> String {
    let [bare, plain, cred, fetch_docs, fetch_all, network_all] = &p.loads;
    let med3 = |f: &dyn Fn(&Load) -> f64| (med_of(bare, f), med_of(plain, f), med_of(cred, f));
    let t = med3(&|l| l.ms);
    let in_page = med3(&|l| l.in_page_ms);
    let conns = med3(&|l| l.connections as f64);
    let peak = med3(&|l| l.peak);
    let latency = med3(&|l| l.latency_ms);
    let browser_cpu = med3(&|l| l.browser_cpu_ms);
    let sup_cpu = med3(&|l| l.supervisor_cpu_ms);
    // The bare sides: bare Chromium, then the three with a part of the interception.
    let bare_sides = [bare, fetch_docs, fetch_all, network_all];
    let med4 = |f: &dyn Fn(&Load) -> f64| bare_sides.map(|l| med_of(l, f));
    let floor = med4(&|l| l.ms);
    let ratio = t.2 / t.0;
    let interception_ratio = t.2 / t.1;
    let verdict = |ok: bool| if ok { "pass" } else { "**MISSED**" };
    let inject = &micro[0];
    let inject_us = median(&inject.per_call_us);
    let requests = SUBRESOURCES + 1;

    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(w, "## Credential broker\n");
    let _ = writeln!(
        w,
        "Written by `scripts/bench.sh` (program: `benches/credentials.rs`, run after \
         `benches/session.rs`); rerun it rather than editing this section. Same machine as the \
         Machine table above; this part ran as follows.\n"
    );
    let commit = std::env::var("BENCH_COMMIT").unwrap_or_else(|_| "unknown".into());
    let _ = writeln!(w, "| | |\n|---|---|");
    let _ = writeln!(w, "| date (UTC) | {} |", m.date);
    let _ = writeln!(
        w,
        "| CPU | {} × `{}` (`nproc`) |",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        read_first("/proc/cpuinfo", "model name")
    );
    let _ = writeln!(w, "| Chromium | {} (`{CHROMIUM}`) |", m.chromium);
    let _ = writeln!(
        w,
        "| load average (1/5/15 min) | {} at the start, {} at the end |",
        m.load_before,
        loadavg()
    );
    let _ = writeln!(
        w,
        "| chaperone | commit {commit}, `cargo build --release --locked` |"
    );
    let _ = writeln!(
        w,
        "| settings | {} page-load runs per side (plus one warm-up), {} sides, {SUBRESOURCES} \
         subresources; decision: {} batches × {} calls per case |\n",
        s.runs,
        SIDES.len(),
        s.batches,
        s.calls
    );

    let _ = writeln!(w, "### Results\n");
    let _ = writeln!(
        w,
        "| figure | baseline | chaperone, credential | ratio | target | result |\n\
         |---|---:|---:|---:|---|---|"
    );
    let _ = writeln!(
        w,
        "| 5. page with {SUBRESOURCES} subresources on a credential site, `Page.navigate` → \
         `load` | {:.0} ms (bare Chromium) | {:.0} ms | {ratio:.2} × ({:+.0} ms) | ≤ \
         {LOAD_RATIO_TARGET:.2} × bare | {} |",
        t.0,
        t.2,
        t.2 - t.0,
        verdict(ratio <= LOAD_RATIO_TARGET)
    );
    let _ = writeln!(
        w,
        "| 5b. the same, interception alone (not a target of the issue; see below) | {:.0} ms \
         (chaperone, no credentials) | {:.0} ms | {interception_ratio:.2} × ({:+.0} ms) | ≤ \
         {LOAD_RATIO_TARGET:.2} × | {} |",
        t.1,
        t.2,
        t.2 - t.1,
        verdict(interception_ratio <= LOAD_RATIO_TARGET)
    );
    let _ = writeln!(
        w,
        "| 6. per-request decision: `decide` on a request to the credential's site | — | \
         {inject_us:.2} µs | — | ≤ {DECIDE_TARGET_US:.0} µs | {} |",
        verdict(inject_us <= DECIDE_TARGET_US)
    );

    let _ = writeln!(w, "\nPage load, all three sides (medians over the runs):\n");
    let _ = writeln!(
        w,
        "| | bare Chromium | chaperone, no credentials | chaperone, credential |\n\
         |---|---:|---:|---:|"
    );
    let row = |w: &mut String, name: &str, v: (f64, f64, f64), unit: &str, digits: usize| {
        let _ = writeln!(
            w,
            "| {name} | {:.digits$}{unit} | {:.digits$}{unit} | {:.digits$}{unit} |",
            v.0, v.1, v.2
        );
    };
    row(
        w,
        "`Page.navigate` → `load` event (client side)",
        t,
        " ms",
        0,
    );
    row(w, "vs bare", (1.0, t.1 / t.0, t.2 / t.0), " ×", 2);
    row(
        w,
        "the page's own `loadEventStart` (navigation timing)",
        in_page,
        " ms",
        0,
    );
    row(
        w,
        "subresource `requestStart` → `responseEnd`, median (resource timing)",
        latency,
        " ms",
        1,
    );
    row(
        w,
        "most subresource requests in flight at once (resource timing)",
        peak,
        "",
        0,
    );
    row(
        w,
        "TCP connections the server accepted per load",
        conns,
        "",
        0,
    );
    row(
        w,
        "CPU time of the side's browser processes during the load",
        browser_cpu,
        " ms",
        0,
    );
    row(
        w,
        "CPU time of `chaperone serve` during the load",
        sup_cpu,
        " ms",
        0,
    );
    let mut kinds: Vec<&'static str> = p
        .loads
        .iter()
        .flatten()
        .flat_map(|l| l.cpu_by_kind.keys().copied())
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    for k in kinds {
        let v = med3(&|l| l.cpu_by_kind.get(k).copied().unwrap_or(0.0));
        if v != (0.0, 0.0, 0.0) {
            row(w, &format!("… of which {k}"), v, " ms", 0);
        }
    }

    let _ = writeln!(
        w,
        "\nPer-request decision, per call ({} batches of {} calls each; the batch's time divided \
         by its calls):\n",
        s.batches, s.calls
    );
    let _ = writeln!(
        w,
        "| request (POST, 12 headers, 1 KiB JSON body, query string) | decision | median | \
         90th percentile | fastest batch | median ≤ {DECIDE_TARGET_US:.0} µs |\n\
         |---|---|---:|---:|---:|---|"
    );
    let micro_row = |w: &mut String, x: &Micro, target: bool| {
        let med = median(&x.per_call_us);
        let _ = writeln!(
            w,
            "| {} | {} | {med:.2} µs | {:.2} µs | {:.2} µs |{}",
            x.name,
            x.expected,
            percentile(&x.per_call_us, 0.9),
            x.per_call_us.iter().copied().fold(f64::INFINITY, f64::min),
            match (target, x.part) {
                (true, _) => format!(" {} |", verdict(med <= DECIDE_TARGET_US)),
                (false, false) => " — (`decide` and the rules; no target) |".to_string(),
                (false, true) => String::new(),
            }
        );
    };
    for x in micro.iter().filter(|x| !x.part) {
        micro_row(w, x, x.name != RULES_CASE);
    }
    let _ = writeln!(
        w,
        "\nThe leak scan alone, as `decide` runs it for the request to another site (every held \
         value, raw and encoded; percent-decoding where the material has `%` or `+`):\n"
    );
    let _ = writeln!(
        w,
        "| material | result | median | 90th percentile | fastest batch |\n|---|---|---:|---:|---:|"
    );
    for x in micro.iter().filter(|x| x.part) {
        micro_row(w, x, false);
    }

    let _ = writeln!(
        w,
        "\n### What Fetch interception costs Chromium itself (no chaperone)\n"
    );
    let _ = writeln!(
        w,
        "Bare Chromium, and three more bare Chromiums each with a part of the issue's \
         interception set up by this program over the pipe (see Method), in the same runs as the \
         sides above (medians over the runs):\n"
    );
    let _ = writeln!(
        w,
        "| | bare Chromium | {} | {} | {} |\n|---|---:|---:|---:|---:|",
        Side::FetchDocs.name(),
        Side::FetchAll.name(),
        Side::NetworkAll.name()
    );
    let row4 = |w: &mut String, name: &str, v: [f64; 4], unit: &str, digits: usize| {
        let cells: Vec<String> = v.iter().map(|x| format!("{x:.digits$}{unit}")).collect();
        let _ = writeln!(w, "| {name} | {} |", cells.join(" | "));
    };
    row4(
        w,
        "`Page.navigate` → `load` event (client side)",
        floor,
        " ms",
        0,
    );
    row4(w, "vs bare", floor.map(|x| x / floor[0]), " ×", 2);
    row4(
        w,
        "the page's own `loadEventStart` (navigation timing)",
        med4(&|l| l.in_page_ms),
        " ms",
        0,
    );
    row4(
        w,
        "subresource `requestStart` → `responseEnd`, median (resource timing)",
        med4(&|l| l.latency_ms),
        " ms",
        1,
    );
    row4(
        w,
        "CPU time of the side's browser processes during the load",
        med4(&|l| l.browser_cpu_ms),
        " ms",
        0,
    );
    let mut bare_kinds: Vec<&'static str> = bare_sides
        .iter()
        .flat_map(|side| side.iter())
        .flat_map(|l| l.cpu_by_kind.keys().copied())
        .collect();
    bare_kinds.sort_unstable();
    bare_kinds.dedup();
    for k in bare_kinds {
        let v = med4(&|l| l.cpu_by_kind.get(k).copied().unwrap_or(0.0));
        if v.iter().any(|&x| x != 0.0) {
            row4(w, &format!("… of which {k}"), v, " ms", 0);
        }
    }
    let [_, docs_x, all_x, net_x] = floor.map(|x| x / floor[0]);
    let _ = writeln!(
        w,
        "\nThe issue asks for the broker's interception to be browser-level `Fetch` at the \
         Request stage for all URLs. On this machine that has a floor {} the ≤ \
         {LOAD_RATIO_TARGET:.2} × target before chaperone does anything: on bare Chromium, \
         installing the interceptor alone (its pattern matches documents only, so the page's \
         navigation is paused and none of its {SUBRESOURCES} images) costs {docs_x:.2} × \
         ({:+.0} ms), pausing each of the page's {requests} requests and continuing it unchanged \
         at once {all_x:.2} × ({:+.0} ms), and `Network` enabled on every target (auto-attach, \
         no Fetch) {net_x:.2} × ({:+.0} ms). chaperone takes {:.2} × without credentials and \
         {ratio:.2} × with the credential, {:+.0} ms over pausing every request on bare \
         Chromium. That remaining cost is `Network.enable` on every target (used for the \
         requests' `isSameSite` verdict and to capture `Set-Cookie`) plus the decision (figure \
         6: at most {:.2} ms for the page's {requests} requests).",
        if docs_x > LOAD_RATIO_TARGET {
            "above"
        } else {
            "within"
        },
        floor[1] - floor[0],
        floor[2] - floor[0],
        floor[3] - floor[0],
        t.1 / t.0,
        t.2 - floor[2],
        inject_us * requests as f64 / 1000.0,
    );

    let _ = writeln!(w, "\n### Where the time goes\n");
    let scan: f64 = micro
        .iter()
        .filter(|x| x.part)
        .map(|x| median(&x.per_call_us))
        .sum();
    let other_site = micro.get(1).map_or(f64::NAN, |x| median(&x.per_call_us));
    let _ = writeln!(
        w,
        "**Without credentials** the session loads the page in {:.0} ms against bare \
         Chromium's {:.0} ms ({:+.0} ms). Its browser has no way out but chaperone's egress \
         proxy: plain http goes there as proxy requests, and the proxy opens a new upstream \
         connection for each ({:.0} connections per load against bare Chromium's {:.0}). At \
         most {:.0} subresource requests were in flight at once (bare Chromium: {:.0}). Figure \
         5b, against this session (same sandbox, same proxy), isolates the interception.\n",
        t.1,
        t.0,
        t.1 - t.0,
        conns.1,
        conns.0,
        peak.1,
        peak.0,
    );
    let (more_browser, more_sup) = (browser_cpu.2 - browser_cpu.1, sup_cpu.2 - sup_cpu.1);
    let _ = writeln!(
        w,
        "**With the credential** the load takes {:+.0} ms against the session without. Each of the \
         load's {requests} requests is paused at the Fetch Request stage (the page's navigation \
         at the Response stage too; images are not held there): each pause is a \
         `Fetch.requestPaused` event from Chromium to the supervisor over its pipe and a \
         `Fetch.continueRequest` command back, and the Request stage also waits for the \
         request's `Network.requestWillBeSent` (its `isSameSite` verdict). `Network` is enabled \
         on every target for this and for the `Set-Cookie` lines of \
         `Network.responseReceivedExtraInfo`, so each request also sends the supervisor its \
         other Network events. Per subresource, `requestStart` → \
         `responseEnd` goes from {:.1} ms to {:.1} ms. CPU during the load grows by \
         {more_browser:+.0} ms in Chromium's processes ({:.0} → {:.0} ms; by kind in the table \
         above) and by {more_sup:+.0} ms in `chaperone serve` ({:.0} → {:.0} ms); the \
         decision (figure 6, {inject_us:.1} µs for a POST with a 1 KiB body) accounts for at \
         most {:.2} ms of the page's {requests} requests. On 2 cores, CPU spent on the \
         interception comes straight out of the page's time.\n",
        t.2 - t.1,
        latency.1,
        latency.2,
        browser_cpu.1,
        browser_cpu.2,
        sup_cpu.1,
        sup_cpu.2,
        inject_us * requests as f64 / 1000.0,
    );
    let _ = writeln!(
        w,
        "**The decision** is mostly the leak scan. For the request to another site it takes \
         {other_site:.1} µs, and scanning its body, URL and headers on their own takes \
         {scan:.1} µs. The request to the credential's site takes {inject_us:.1} µs although \
         that decision also builds the new header list: there the scan looks for the other \
         credential's value only (1 held value; to any other site, all 3). The scan's cost \
         grows with the material it reads (the body's size above all).\n"
    );

    let _ = writeln!(w, "### Method\n");
    let _ = writeln!(w, "{METHOD}");
    let _ = writeln!(w, "### Every run\n");
    let _ =
        writeln!(
        w,
        "| run | {} | connections (in the columns' order) | in flight at most |\n|---|{}---|---|",
        SIDES.map(|side| format!("{} (ms)", side.name())).join(" | "),
        "---:|".repeat(SIDES.len())
    );
    for i in 0..bare.len() {
        let each = |f: &dyn Fn(&Load) -> String, sep: &str| {
            p.loads
                .iter()
                .map(|l| f(&l[i]))
                .collect::<Vec<_>>()
                .join(sep)
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} |",
            i + 1,
            each(&|l| format!("{:.0}", l.ms), " | "),
            each(&|l| l.connections.to_string(), " / "),
            each(&|l| format!("{:.0}", l.peak), " / "),
        );
    }
    let _ = writeln!(w, "\n### Notes\n\n{NOTES}");
    o
}

const METHOD: &str = "\
5. **Page load.** A server in the bench process (hyper, HTTP/1.1, keep-alive on, its own \
   thread, 127.0.0.1) serves `http://bank.test:PORT/page`: 100 `<img>` tags for \
   `/r/0.png` … `/r/99.png`, each a 67-byte PNG; every response says `Cache-Control: no-store`. \
   Six browsers run side by side for the whole benchmark (one per side, reused for every \
   run, which measures the steady state: the start is figure 1 above):\n   - **bare Chromium**: `chaperone::browser::chromium::args()` without the proxy flags, with \
     `--no-proxy-server --host-resolver-rules=\"MAP bank.test 127.0.0.1\"`, as `nobody` with its \
     own sandbox on, CDP over `--remote-debugging-pipe` (set up as for figure 1);\n   - **chaperone, credential**: a session of `chaperone serve` whose mandate allows `bank.test` \
     (`hosts` → 127.0.0.1, `private_networks` 127.0.0.0/8) and holds a credential for it: a \
     cookie `sid` (`secure: false`, the site is plain http) and an `Authorization: Bearer` \
     header. The broker intercepts every request (Fetch Request stage; Response stage for the \
     site's navigations, fetch and XHR) and \
     injects both into each request of the page; CDP over the session's websocket;\n   - **chaperone, no credentials**: the same mandate without the credential, so no \
     interception at all; it separates the sandbox's network path (the egress proxy) from the \
     interception;\n   - **bare + Fetch, nothing paused**, **bare + Fetch, every request paused**, **bare + \
     Network on every target**: three more bare Chromiums, started like the first, each with a \
     part of the issue's interception set up once by this program over its pipe, which answers \
     every pause at once and unchanged: browser-level `Fetch.enable` with the pattern \
     `{urlPattern: \"*\", resourceType: \"Document\", requestStage: \"Request\"}` (the \
     interceptor installed; only the navigation is paused); `Fetch.enable` with \
     `{urlPattern: \"*\", requestStage: \"Request\"}` (every request paused, each \
     `Fetch.requestPaused` answered with `Fetch.continueRequest {requestId}` alone); \
     `Target.setAutoAttach {autoAttach, waitForDebuggerOnStart, flatten}` and, on each target \
     it attaches (once per target), `Network.enable {maxTotalBufferSize: 0, \
     maxResourceBufferSize: 0}` and `Runtime.runIfWaitingForDebugger`, no Fetch. With no \
     chaperone and no decision in the way, they are a floor for a broker that intercepts this \
     way.\n\
   \n   Each run, each side in turn (the order rotates run by run, so each side takes each place \
   in the order equally often): `Target.createTarget about:blank` → `Target.attachToTarget` \
   (flat) → `Page.enable`, `Page.setLifecycleEventsEnabled` → **timed**: from just before \
   sending `Page.navigate` until the `Page.lifecycleEvent` `load` with the navigation's \
   `loaderId` arrives → untimed checks → `Target.closeTarget`. The checks fail the benchmark \
   unless the page is at its URL with all 100 images decoded, the server got the page and \
   each subresource exactly once, and — on the credential side — every one of those 101 \
   requests carried the held cookie and the held `Authorization` header (on every other side, \
   none carried a `Cookie` or `Authorization`), and unless, on the bare sides, the browser's \
   own CDP events from `Page.navigate` to the checks show the page's requests as the side says: \
   one `Fetch.requestPaused` (the page) with the document pattern, 101 with the pattern for all, \
   101 `Network.requestWillBeSent` on the Network side (one session per target), none of \
   either elsewhere. One warm-up run per side is discarded. \
   The page's own `loadEventStart` (navigation timing) is reported alongside: it starts at \
   the navigation's start inside the browser, so it leaves out the CDP transport (pipe against \
   websocket) and includes everything else. The same script reads the subresources' \
   resource timing (the most requests in flight at once, the median `requestStart` → \
   `responseEnd`); CPU time (`utime + stime` from `/proc/PID/stat`, 10 ms ticks) is read just \
   before `Page.navigate` and just after the load event, for the side's browser processes \
   (bare sides: the browser, its descendants and its crashpad handlers; chaperone: everything under \
   the session's sandbox launcher) and for `chaperone serve` (its egress proxy, gate and \
   broker all run in it).
6. **Per-request decision.** `chaperone::broker::decide::decide` called directly (release \
   build, `std::hint::black_box` around its inputs and output), on requests as Fetch shows \
   them: `POST` with a query string including a percent-escape, the 12 headers Chromium sends \
   with a `fetch()` of JSON (client hints, `User-Agent`, `Accept*`, `Content-Type`, `Origin`, \
   `Referer`, `Sec-Fetch-*`) and a 1 KiB JSON body; a vault with two credentials (`bank.test`: \
   cookie + `Authorization`; `mail.test`: an API key header). Three requests: to the \
   credential's site from a same-site context (the decision injects: the leak scan for the \
   other credential's values, the first-party test, the new header list); to another site \
   without authentication headers (the full leak scan against every held value, nothing to \
   change); to another site with the held cookie base64-encoded at the end of the body \
   (found, `Exfiltration`). Each decision is checked once before timing. Three more cases \
   time `LeakDetector::find` on its own, with the detector `decide` uses for the request to another \
   site, over the parts of that request `decide` scans (the host, a few labels, is left \
   out). One warm-up batch per case is discarded; then the cases take turns batch by batch. \
   Each batch's time over its calls is one sample; the figures are over the samples.
";

const NOTES: &str = "\
- Bare Chromium reaches the site directly; chaperone's browser has no way out but its egress \
  proxy, so even without credentials its page load pays a proxy hop and, for plain http, a new \
  upstream connection per request. Both are part of what an agent sees, so figure 5 compares \
  against bare Chromium as the issue asks; the middle column shows how much of the difference \
  has nothing to do with credentials.
- CPU times come in 10 ms ticks; per load they are sums over a few processes, so single \
  values are coarse and only the medians over the runs mean much.
- The server runs on a thread of the bench process and competes for the same 2 cores as the \
  browsers and the supervisor on every side alike.
- The six browsers stay alive side by side for the whole run; the five that are not loading \
  sit idle.
- On the three instrumented bare sides this program answers each pause itself, over the same \
  pipe as its commands, with nothing to decide: an interceptor that answers over CDP can hardly \
  do less.
";
