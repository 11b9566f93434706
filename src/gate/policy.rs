//! Which CDP methods an agent may send, per session kind, and with which parameters.
//!
//! [`check`] runs for every well-formed agent request after the router has resolved the
//! session (so `kind` is trustworthy) and before anything reaches the pipe. It has three layers:
//!
//! 1. [`router_integrity`]: refusals that keep the router itself sound. Each refused method
//!    would let the agent exchange CDP messages the router never sees (non-flat sessions,
//!    page-script bindings) or take a browser-wide hook that belongs to the supervisor.
//! 2. [`allowlist`]: the per-kind method allowlist (the tables are in `gate/methods.rs`). The
//!    pipe client is more privileged than a DevTools websocket client
//!    (`AllowUnsafeOperations`), so only methods the gate knows pass.
//! 3. Parameter rules for the allowed methods that can reach outside a page: navigations
//!    ([`navigable`]), download and upload paths (confined to the session's files directory),
//!    cookie writes (held cookies cannot be overwritten or shadowed), certificate-error
//!    overrides (not while credentials are held), proxies in new contexts and network logs in
//!    traces.
//!
//! A refusal reaches the agent as `-32000 "chaperone: <method> refused: <reason>"`. The text must
//! never contain "wasn't found" or "Not supported": Puppeteer silently swallows errors
//! containing those, and a refusal must be loud.

use std::borrow::Cow;

use serde_json::{json, Value};

use super::{methods, Held, SessionKind};

/// Why the gate refused a message; the text is shown to the agent and written to the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    reason: Cow<'static, str>,
}

impl Refusal {
    /// A refusal with the given reason (a sentence fragment that tells the agent what to do).
    pub fn new(reason: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal {
            reason: reason.into(),
        }
    }

    /// The reason, without the `chaperone: <method> refused:` prefix.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The error message the agent receives for `method`.
    pub fn message(&self, method: &str) -> String {
        format!("chaperone: {method} refused: {}", self.reason)
    }
}

/// What the router does with a request the gate accepted.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Forward it to the browser with the (possibly rewritten) params.
    Forward,
    /// Do not forward it; answer the agent with this `result` (every part of the request was
    /// dropped, see [`Checked::dropped`]).
    Answer(Value),
}

/// The outcome of [`check`] for an accepted request.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// Forward or answer locally.
    pub verdict: Verdict,
    /// One human-readable text per part of the request that was dropped (a cookie write over a
    /// held cookie); the router audits each as `cdp.denied`. Never contains a secret value.
    pub dropped: Vec<String>,
}

impl Checked {
    fn forward() -> Checked {
        Checked {
            verdict: Verdict::Forward,
            dropped: Vec::new(),
        }
    }
}

/// Decides whether an agent may send `method` with `params` on a session of `kind`, given what
/// the session `held`s.
///
/// `params` is the object that will be forwarded (the router re-serialises it, so duplicate keys
/// cannot make Chromium see something else than this check saw); an absent `params` is passed
/// as an empty object. The check may rewrite it in place (download paths, cookie lists); the
/// router forwards the rewritten value. The only change the router makes afterwards is the
/// translation of `Target.detachFromTarget`'s session alias to the real id.
pub fn check(
    kind: SessionKind,
    method: &str,
    params: &mut Value,
    held: &Held,
) -> Result<Checked, Refusal> {
    router_integrity(kind, method, params)?;
    allowlist(kind, method)?;
    parameters(method, params, held)
}

/// The per-kind method allowlist: methods refused everywhere get their own reason, anything no
/// row of the tables in `gate/methods.rs` allows for `kind` is refused with a hint where it is available.
pub fn allowlist(kind: SessionKind, method: &str) -> Result<(), Refusal> {
    if let Some(reason) = methods::refused_everywhere(method) {
        return Err(Refusal::new(reason));
    }
    methods::allowed(kind, method)
}

/// Whether an agent may navigate to `url` (`Page.navigate`, `Target.createTarget`, the
/// `/json/new` endpoint). Only web content is navigable: `http`, `https`, `about`, `data` and
/// `blob`. Local files, browser pages (`chrome:`, `chrome-untrusted:`, `chrome-extension:`,
/// `devtools:`, `view-source:`), `javascript:`, `filesystem:` and every other scheme are
/// refused. An empty URL is `about:blank`, as Chromium treats it.
pub fn navigable(url: &str) -> Result<(), Refusal> {
    // Browsers strip leading and trailing C0 controls and spaces; so does the URL parser, but
    // an all-blank URL must not reach it.
    if url.trim_matches(|c: char| c <= ' ').is_empty() {
        return Ok(());
    }
    let parsed = url::Url::parse(url).map_err(|_| {
        Refusal::new(
            "the URL is not absolute; give a full http:// or https:// URL (about:, data: and \
             blob: URLs work too)",
        )
    })?;
    match parsed.scheme() {
        "http" | "https" | "about" | "data" | "blob" => Ok(()),
        scheme => {
            // Name the scheme only when it is short and plain, so the text stays readable and
            // cannot smuggle anything into the audit log.
            let shown = if scheme.len() <= 32 {
                format!("`{scheme}:` URLs")
            } else {
                "URLs of that scheme".to_string()
            };
            Err(Refusal::new(format!(
                "{shown} are not navigable through chaperone: agents reach web content only \
                 (http, https, about, data, blob)"
            )))
        }
    }
}

/// Parameter rules for allowed methods.
fn parameters(method: &str, params: &mut Value, held: &Held) -> Result<Checked, Refusal> {
    match method {
        "Page.navigate" | "Target.createTarget" => {
            if let Some(url) = params.get("url").and_then(Value::as_str) {
                navigable(url)?;
            }
        }
        "Browser.setDownloadBehavior" | "Page.setDownloadBehavior" => {
            confine_downloads(params, held.files_dir());
        }
        "DOM.setFileInputFiles" => {
            let files = params.get("files").and_then(Value::as_array);
            let Some(files) = files else {
                return Err(Refusal::new(format!(
                    "`files` must be a list of paths inside {}",
                    held.files_dir()
                )));
            };
            confine_paths(files, held.files_dir(), "files")?;
        }
        "Input.dispatchDragEvent" => {
            // Drag data can drop local files into the page, by path.
            if let Some(files) = params.pointer("/data/files") {
                let Some(files) = files.as_array() else {
                    return Err(Refusal::new(format!(
                        "`data.files` must be a list of paths inside {}",
                        held.files_dir()
                    )));
                };
                confine_paths(files, held.files_dir(), "data.files")?;
            }
        }
        "Security.setIgnoreCertificateErrors"
        | "Security.setOverrideCertificateErrors"
        | "Security.handleCertificateError"
            if held.holds_anything() =>
        {
            let switching_off = match method {
                "Security.setIgnoreCertificateErrors" => params.get("ignore"),
                "Security.setOverrideCertificateErrors" => params.get("override"),
                _ => None,
            } == Some(&Value::Bool(false));
            if !switching_off {
                return Err(Refusal::new(CERTIFICATES_WHILE_HOLDING));
            }
        }
        "Target.createBrowserContext" => {
            for key in [
                "proxyServer",
                "proxyBypassList",
                "originsWithUniversalNetworkAccess",
            ] {
                if params.get(key).is_some() {
                    return Err(Refusal::new(format!(
                        "`{key}` changes where the context's requests go, and the session's \
                         egress belongs to the supervisor; create the context without it"
                    )));
                }
            }
        }
        "Tracing.start" => tracing_start(params)?,
        "Network.setCookie" => {
            if let Some(text) = held_cookie_write(params, held)? {
                return Ok(Checked {
                    // What Chromium 156 answers to a successful setCookie (the field is
                    // deprecated and always true).
                    verdict: Verdict::Answer(json!({ "success": true })),
                    dropped: vec![text],
                });
            }
        }
        "Network.setCookies" | "Storage.setCookies" => return cookie_list_write(params, held),
        _ => {}
    }
    Ok(Checked::forward())
}

const CERTIFICATES_WHILE_HOLDING: &str =
    "certificate errors cannot be ignored in a session that holds credentials: a site with a \
     bad certificate may be an impostor, and it would receive them. Playwright: drop \
     ignoreHTTPSErrors; Puppeteer: drop acceptInsecureCerts; chromiumoxide: build the browser \
     config with respect_https_errors()";

/// Points every download at the session's files directory: the client's own path means
/// nothing inside the sandbox (Playwright sends a temporary directory on its machine and fails
/// the connection if this command fails), and downloads must not land anywhere else.
fn confine_downloads(params: &mut Value, files_dir: &str) {
    let Some(params) = params.as_object_mut() else {
        return;
    };
    let allows = matches!(
        params.get("behavior").and_then(Value::as_str),
        Some("allow" | "allowAndName")
    );
    if allows || params.contains_key("downloadPath") {
        params.insert("downloadPath".into(), Value::String(files_dir.into()));
    }
}

/// Refuses unless every entry of `files` is a path inside `files_dir`.
fn confine_paths(files: &[Value], files_dir: &str, field: &str) -> Result<(), Refusal> {
    for (i, file) in files.iter().enumerate() {
        let inside = file.as_str().is_some_and(|p| path_inside(p, files_dir));
        if !inside {
            return Err(Refusal::new(format!(
                "`{field}[{i}]` is not a file inside the session's files directory {files_dir}; \
                 the browser can only upload files from there (downloads land there too)"
            )));
        }
    }
    Ok(())
}

/// Whether `path` names something strictly inside `dir`, after lexical normalisation (`.`,
/// `..`, repeated slashes). Relative paths, paths with NUL and paths whose `..` climb above
/// the root are outside. Symbolic links are not resolved: nothing the agent controls can create
/// one inside the files directory.
fn path_inside(path: &str, dir: &str) -> bool {
    fn components(path: &str) -> Option<Vec<&str>> {
        if !path.starts_with('/') || path.contains('\0') {
            return None;
        }
        let mut out = Vec::new();
        for c in path.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    out.pop()?;
                }
                c => out.push(c),
            }
        }
        Some(out)
    }
    match (components(path), components(dir)) {
        (Some(p), Some(d)) => p.len() > d.len() && p[..d.len()] == d[..],
        _ => false,
    }
}

/// Refuses traces that would record network logs (request and response headers, which can
/// carry what the supervisor injected) or that bypass category selection altogether.
fn tracing_start(params: &Value) -> Result<(), Refusal> {
    const NETWORK_LOG: &str = "network-log trace categories (netlog) record request and response \
                               headers, including credentials the supervisor adds; trace \
                               without them";
    if params.get("perfettoConfig").is_some() {
        return Err(Refusal::new(
            "a raw Perfetto config can enable any data source, network logs included; use \
             traceConfig.includedCategories instead",
        ));
    }
    let mut patterns: Vec<&str> = Vec::new();
    if let Some(categories) = params.get("categories").and_then(Value::as_str) {
        patterns.extend(categories.split(','));
    }
    if let Some(included) = params
        .pointer("/traceConfig/includedCategories")
        .and_then(Value::as_array)
    {
        patterns.extend(included.iter().filter_map(Value::as_str));
    }
    // Chromium's `*` leaves disabled-by-default categories out; a pattern reaches them only by
    // starting with that prefix.
    const PREFIX: &str = "disabled-by-default-";
    let network_log = patterns.iter().map(|p| p.trim()).any(|p| {
        let lower = p.to_ascii_lowercase();
        !p.starts_with('-')
            && (lower.contains("netlog")
                || (lower.starts_with(PREFIX)
                    && glob(lower.as_bytes(), b"disabled-by-default-netlog")))
    });
    if network_log {
        return Err(Refusal::new(NETWORK_LOG));
    }
    Ok(())
}

/// Matches `text` against a trace-category pattern with `*` and `?` wildcards.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative matching with one backtrack point: linear in practice, never exponential.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c.eq_ignore_ascii_case(&text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// Judges one cookie the agent wants to write: `Some(text)` when it would overwrite or shadow a
/// held cookie (same name on the held cookie's site, through `domain` or `url`).
fn held_cookie_write(cookie: &Value, held: &Held) -> Result<Option<String>, Refusal> {
    let Some(name) = cookie.get("name").and_then(Value::as_str) else {
        // Chromium refuses a cookie without a name; nothing can be overwritten.
        return Ok(None);
    };
    let name = name.trim_matches(|c: char| c.is_ascii_whitespace());
    let mut hosts: Vec<String> = Vec::new();
    if let Some(domain) = cookie.get("domain").and_then(Value::as_str) {
        if !domain.trim().is_empty() {
            hosts.push(domain.trim().to_ascii_lowercase());
        }
    }
    if let Some(url) = cookie.get("url").and_then(Value::as_str) {
        let host = url::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase));
        match host {
            Some(host) => hosts.push(host),
            // Chromium might read a host out of what we cannot: fail closed.
            None => {
                return Err(Refusal::new(
                    "a cookie's `url` is not an absolute URL with a host; give one such as \
                     https://example.com/",
                ))
            }
        }
    }
    Ok(hosts
        .iter()
        .find(|host| held.is_held_cookie(host, name))
        .map(|host| {
            let site = crate::vault::jar::site_of(host.trim_start_matches('.'));
            let shown: String = name.chars().take(128).collect();
            format!(
                "cookie `{shown}` for {site} is held by chaperone; the agent's write was dropped"
            )
        }))
}

/// `Network.setCookies` / `Storage.setCookies`: forwards the cookies that do not touch held
/// ones, answers locally when none is left.
fn cookie_list_write(params: &mut Value, held: &Held) -> Result<Checked, Refusal> {
    let Some(cookies) = params.get_mut("cookies").and_then(Value::as_array_mut) else {
        // Chromium refuses the command without a list; nothing is written.
        return Ok(Checked::forward());
    };
    let judged = cookies
        .iter()
        .map(|cookie| held_cookie_write(cookie, held))
        .collect::<Result<Vec<_>, _>>()?;
    let dropped: Vec<String> = judged.iter().flatten().cloned().collect();
    if dropped.is_empty() {
        return Ok(Checked::forward());
    }
    let mut keep = judged.iter().map(Option::is_none);
    cookies.retain(|_| keep.next().unwrap_or(false));
    let verdict = if cookies.is_empty() {
        Verdict::Answer(json!({}))
    } else {
        Verdict::Forward
    };
    Ok(Checked { verdict, dropped })
}

/// Refusals that keep every agent message and event flowing through the router.
pub fn router_integrity(kind: SessionKind, method: &str, params: &Value) -> Result<(), Refusal> {
    const FLAT_ONLY: &str = "chaperone serves flat sessions only: pass \"flatten\": true and \
                             address the session with the sessionId member of each message";
    let flatten = params.get("flatten");
    match method {
        // Both default to non-flat sessions, whose traffic travels inside
        // Target.sendMessageToTarget / receivedMessageFromTarget where the router cannot see it.
        "Target.setAutoAttach" | "Target.attachToTarget" if flatten != Some(&Value::Bool(true)) => {
            return Err(Refusal::new(FLAT_ONLY))
        }
        // Always flat in Chromium 156 (measured); refuse an explicit request for anything else.
        "Target.attachToBrowserTarget" | "Target.autoAttachRelated"
            if flatten.is_some_and(|f| f != &Value::Bool(true)) =>
        {
            return Err(Refusal::new(FLAT_ONLY))
        }
        "Target.sendMessageToTarget" => return Err(Refusal::new(FLAT_ONLY)),
        "Target.exposeDevToolsProtocol" => {
            return Err(Refusal::new(
                "it would give page script a CDP connection that bypasses chaperone's gate",
            ))
        }
        _ => {}
    }
    // Browser-level Fetch from two clients pauses requests in no defined order, and the
    // supervisor's credential broker relies on browser-level Fetch; a page or worker session's
    // Fetch runs before the broker, which is what Playwright's route() needs.
    if method.starts_with("Fetch.") && !matches!(kind, SessionKind::Page | SessionKind::Worker) {
        return Err(Refusal::new(
            "request interception is available on page, frame and worker sessions only; \
             browser-level interception belongs to the supervisor",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::HeldCookie;
    use proptest::prelude::*;
    use serde_json::json;
    use SessionKind::*;

    const DIR: &str = "/home/chaperone/Downloads";
    const SECRET: &str = "SECRET-SESSION-93ab2e";

    fn nothing() -> Held {
        Held::nothing(DIR)
    }

    /// A session holding the bank's `sid` cookie.
    fn bank() -> Held {
        Held::new(
            &[SECRET],
            vec![HeldCookie {
                site: "bank.test".into(),
                name: "sid".into(),
            }],
            vec!["bank.test".into()],
            DIR,
        )
    }

    fn run(kind: SessionKind, method: &str, mut params: Value, held: &Held) -> Outcome {
        let result = check(kind, method, &mut params, held);
        Outcome { result, params }
    }

    struct Outcome {
        result: Result<Checked, Refusal>,
        params: Value,
    }

    impl Outcome {
        fn refused(&self) -> bool {
            self.result.is_err()
        }

        fn reason(&self) -> String {
            self.result.clone().unwrap_err().reason().to_owned()
        }

        fn checked(&self) -> Checked {
            self.result.clone().expect("accepted")
        }
    }

    fn refused(kind: SessionKind, method: &str, params: Value) -> bool {
        run(kind, method, params, &nothing()).refused()
    }

    #[test]
    fn non_flat_attachment_is_refused() {
        assert!(refused(
            Browser,
            "Target.setAutoAttach",
            json!({"autoAttach": true, "waitForDebuggerOnStart": false})
        ));
        assert!(refused(
            Page,
            "Target.setAutoAttach",
            json!({"autoAttach": true, "waitForDebuggerOnStart": false, "flatten": false})
        ));
        assert!(refused(
            Browser,
            "Target.attachToTarget",
            json!({"targetId": "T"})
        ));
        assert!(refused(
            Browser,
            "Target.attachToTarget",
            json!({"targetId": "T", "flatten": "true"})
        ));
        assert!(refused(
            Browser,
            "Target.attachToBrowserTarget",
            json!({"flatten": false})
        ));
        assert!(refused(
            Browser,
            "Target.autoAttachRelated",
            json!({"targetId": "T", "waitForDebuggerOnStart": false, "flatten": 0})
        ));
        assert!(refused(
            Browser,
            "Target.sendMessageToTarget",
            json!({"message": "{}", "sessionId": "S"})
        ));
        assert!(refused(
            Page,
            "Target.exposeDevToolsProtocol",
            json!({"targetId": "T"})
        ));

        assert!(!refused(
            Browser,
            "Target.setAutoAttach",
            json!({"autoAttach": true, "waitForDebuggerOnStart": true, "flatten": true})
        ));
        assert!(!refused(
            Tab,
            "Target.setAutoAttach",
            json!({"autoAttach": true, "waitForDebuggerOnStart": true, "flatten": true})
        ));
        assert!(!refused(
            Browser,
            "Target.attachToTarget",
            json!({"targetId": "T", "flatten": true})
        ));
        assert!(!refused(Browser, "Target.attachToBrowserTarget", json!({})));
        assert!(!refused(
            Browser,
            "Target.autoAttachRelated",
            json!({"targetId": "T", "waitForDebuggerOnStart": false})
        ));
    }

    #[test]
    fn fetch_only_on_page_and_worker_sessions() {
        for kind in [Browser, Tab, Other] {
            assert!(refused(kind, "Fetch.enable", json!({})), "{kind:?}");
            assert!(
                refused(kind, "Fetch.continueRequest", json!({"requestId": "1"})),
                "{kind:?}"
            );
        }
        for kind in [Page, Worker] {
            assert!(
                !refused(
                    kind,
                    "Fetch.enable",
                    json!({"patterns": [{"urlPattern": "*"}]})
                ),
                "{kind:?}"
            );
        }
        // A domain whose name merely starts with "Fetch" is not Fetch, and not allowed either.
        let out = run(Page, "FetchX.enable", json!({}), &nothing());
        assert!(
            out.reason().contains("ask the operator"),
            "{}",
            out.reason()
        );
    }

    #[test]
    fn what_the_clients_send_on_connect_passes_unchanged() {
        // Playwright connectOverCDP, Puppeteer connect, chromiumoxide Browser::connect.
        let cases = [
            (Browser, "Browser.getVersion", json!({})),
            (Browser, "Target.getBrowserContexts", json!({})),
            (
                Browser,
                "Target.setDiscoverTargets",
                json!({"discover": true}),
            ),
            (Browser, "Target.getTargetInfo", json!({})),
            (Browser, "Target.getTargets", json!({})),
            (
                Browser,
                "Target.createBrowserContext",
                json!({"disposeOnDetach": true}),
            ),
            (
                Browser,
                "Target.createTarget",
                json!({"url": "about:blank"}),
            ),
            (Browser, "Storage.getCookies", json!({})),
            (Tab, "Runtime.runIfWaitingForDebugger", json!({})),
            (Page, "Page.enable", json!({})),
            (Page, "Page.getFrameTree", json!({})),
            (Page, "Log.enable", json!({})),
            (
                Page,
                "Page.setLifecycleEventsEnabled",
                json!({"enabled": true}),
            ),
            (Page, "Runtime.enable", json!({})),
            (
                Page,
                "Page.addScriptToEvaluateOnNewDocument",
                json!({"source": "", "worldName": "__playwright_utility_world__"}),
            ),
            (Page, "Network.enable", json!({})),
            (
                Page,
                "Emulation.setFocusEmulationEnabled",
                json!({"enabled": true}),
            ),
            (Page, "Runtime.evaluate", json!({"expression": "1+1"})),
            (
                Page,
                "Network.getCookies",
                json!({"urls": ["https://a.test/"]}),
            ),
            (Worker, "Runtime.enable", json!({})),
            (Worker, "Network.enable", json!({})),
            (Other, "Target.detachFromTarget", json!({})),
        ];
        for (kind, method, params) in cases {
            let out = run(kind, method, params.clone(), &bank());
            assert_eq!(out.checked(), Checked::forward(), "{kind:?} {method}");
            assert_eq!(out.params, params, "{method} was rewritten");
        }
    }

    #[test]
    fn methods_the_issue_names_are_refused_on_every_kind() {
        let methods = [
            "Target.setRemoteLocations",
            "Target.openDevTools",
            "Tethering.bind",
            "Tethering.unbind",
            "Extensions.loadUnpacked",
            "Extensions.getStorageItems",
            "Browser.getBrowserCommandLine",
            "Browser.crash",
            "Browser.crashGpuProcess",
            "Browser.executeBrowserCommand",
            "Page.crash",
            "Network.getAllCookies",
            "Network.setCookieControls",
            "Network.loadNetworkResource",
            "Network.setRequestInterception",
            "Network.continueInterceptedRequest",
            "Network.getResponseBodyForInterception",
            "Network.takeResponseBodyForInterceptionAsStream",
            "PWA.install",
            "PWA.launch",
            "Cast.enable",
            "Cast.startTabMirroring",
            "SystemInfo.getProcessInfo",
            "Storage.getSharedStorageEntries",
            "Storage.getTrustTokens",
            "Storage.getInterestGroupDetails",
        ];
        for method in methods {
            for kind in [Browser, Tab, Page, Worker, Other] {
                let out = run(kind, method, json!({}), &nothing());
                assert!(out.refused(), "{kind:?} {method}");
            }
            // The reason is the method's own, not the generic allowlist text.
            let reason = run(Page, method, json!({}), &nothing()).reason();
            assert!(!reason.contains("ask the operator"), "{method}: {reason}");
        }
        assert!(!refused(Browser, "SystemInfo.getInfo", json!({})));
    }

    #[test]
    fn domains_are_confined_to_the_kinds_that_have_them() {
        assert!(refused(
            Browser,
            "Page.navigate",
            json!({"url": "https://a.test/"})
        ));
        assert!(refused(
            Browser,
            "Runtime.evaluate",
            json!({"expression": "1"})
        ));
        assert!(refused(Tab, "Runtime.evaluate", json!({"expression": "1"})));
        assert!(refused(
            Other,
            "Runtime.evaluate",
            json!({"expression": "1"})
        ));
        assert!(refused(
            Worker,
            "Page.navigate",
            json!({"url": "https://a.test/"})
        ));
        assert!(refused(Browser, "Network.enable", json!({})));
        assert!(!refused(
            Page,
            "Page.navigate",
            json!({"url": "https://a.test/"})
        ));
        assert!(!refused(Page, "DOMSnapshot.captureSnapshot", json!({})));
        assert!(!refused(Worker, "Debugger.enable", json!({})));
        let reason = run(Browser, "Page.enable", json!({}), &nothing()).reason();
        assert!(reason.contains("available on page sessions"), "{reason}");
    }

    #[test]
    fn refusal_text_is_never_swallowed_by_puppeteer() {
        let mut cases = vec![
            (Browser, "Target.setAutoAttach", json!({})),
            (Browser, "Target.sendMessageToTarget", json!({})),
            (Browser, "Target.exposeDevToolsProtocol", json!({})),
            (Browser, "Fetch.enable", json!({})),
            (Browser, "No.such", json!({})),
            (Browser, "Page.enable", json!({})),
            (Page, "Network.someFutureCall", json!({})),
            (Page, "Page.navigate", json!({"url": "file:///etc/passwd"})),
            (Page, "Page.navigate", json!({"url": "nonsense"})),
            (
                Page,
                "DOM.setFileInputFiles",
                json!({"files": ["/etc/passwd"]}),
            ),
            (Page, "Tracing.start", json!({"categories": "netlog"})),
            (
                Browser,
                "Target.createBrowserContext",
                json!({"proxyServer": "x"}),
            ),
            (
                Page,
                "Security.setIgnoreCertificateErrors",
                json!({"ignore": true}),
            ),
        ];
        cases.extend(
            ["Tethering.bind", "Browser.crash", "Network.getAllCookies"]
                .map(|m| (Page, m, json!({}))),
        );
        for (kind, method, params) in cases {
            let out = run(kind, method, params, &bank());
            let message = out.result.unwrap_err().message(method);
            assert!(message.starts_with(&format!("chaperone: {method} refused: ")));
            let lower = message.to_lowercase();
            assert!(
                !lower.contains("wasn't found") && !lower.contains("not supported"),
                "{message}"
            );
        }
    }

    #[test]
    fn only_web_content_is_navigable() {
        for url in [
            "https://bank.test/login",
            "http://a.test",
            "HTTP://A.TEST/",
            "about:blank",
            "data:text/html,<p>hi</p>",
            "blob:https://a.test/5b6c",
            "",
            "  ",
        ] {
            assert!(navigable(url).is_ok(), "{url:?}");
        }
        for url in [
            "file:///etc/passwd",
            "FILE:///etc/passwd",
            " file:///etc/passwd",
            "fi\tle:///etc/passwd",
            "chrome://settings",
            "chrome-untrusted://terminal/",
            "chrome-extension://abc/x.html",
            "devtools://devtools/bundled/inspector.html",
            "view-source:https://a.test/",
            "javascript:alert(1)",
            "java\nscript:alert(1)",
            "filesystem:https://a.test/temporary/x",
            "ftp://a.test/",
            "ws://a.test/",
            "intent://x",
            "a.test/page",
            "/etc/passwd",
        ] {
            let refusal = navigable(url).expect_err(url);
            assert!(!refusal.reason().contains("passwd"), "{url}");
        }
        let out = run(
            Page,
            "Page.navigate",
            json!({"url": "file:///etc/passwd"}),
            &nothing(),
        );
        assert!(out.reason().contains("`file:` URLs"), "{}", out.reason());
        assert!(refused(
            Browser,
            "Target.createTarget",
            json!({"url": "chrome://version"})
        ));
        assert!(!refused(
            Page,
            "Page.navigateToHistoryEntry",
            json!({"entryId": 3})
        ));
    }

    #[test]
    fn downloads_are_redirected_into_the_files_directory() {
        // Exactly what Playwright sends on connect.
        let out = run(
            Browser,
            "Browser.setDownloadBehavior",
            json!({"behavior": "allowAndName", "browserContextId": "C",
                   "downloadPath": "/tmp/playwright-artifacts-X", "eventsEnabled": true}),
            &nothing(),
        );
        assert_eq!(out.checked(), Checked::forward());
        assert_eq!(
            out.params,
            json!({"behavior": "allowAndName", "browserContextId": "C",
                   "downloadPath": DIR, "eventsEnabled": true})
        );
        let out = run(
            Page,
            "Page.setDownloadBehavior",
            json!({"behavior": "allow"}),
            &nothing(),
        );
        assert_eq!(
            out.params,
            json!({"behavior": "allow", "downloadPath": DIR})
        );
        let out = run(
            Browser,
            "Browser.setDownloadBehavior",
            json!({"behavior": "deny", "downloadPath": "/"}),
            &nothing(),
        );
        assert_eq!(out.params, json!({"behavior": "deny", "downloadPath": DIR}));
        let out = run(
            Browser,
            "Browser.setDownloadBehavior",
            json!({"behavior": "default"}),
            &nothing(),
        );
        assert_eq!(out.params, json!({"behavior": "default"}));
    }

    #[test]
    fn uploads_come_from_the_files_directory_only() {
        let upload = |files: Value| {
            run(
                Page,
                "DOM.setFileInputFiles",
                json!({"files": files, "nodeId": 4}),
                &nothing(),
            )
        };
        assert!(!upload(json!([])).refused());
        assert!(!upload(json!([format!("{DIR}/report.pdf")])).refused());
        assert!(!upload(json!([format!("{DIR}/./a/../b.txt"), format!("{DIR}//c")])).refused());
        for bad in [
            json!(["/etc/passwd"]),
            json!([format!("{DIR}/../../../etc/passwd")]),
            json!([format!("{DIR}/a/../../x")]),
            json!([format!("{DIR}2/x")]),
            json!([DIR]),
            json!([format!("{DIR}/")]),
            json!(["Downloads/x"]),
            json!([format!("{DIR}/ok"), "/etc/shadow"]),
            json!([format!("{DIR}/x\u{0}")]),
            json!(["/../../etc/passwd"]),
            json!([1]),
            json!("/etc/passwd"),
        ] {
            let out = upload(bad.clone());
            assert!(out.refused(), "{bad}");
            assert!(out.reason().contains(DIR), "{}", out.reason());
        }
        let out = run(
            Page,
            "DOM.setFileInputFiles",
            json!({"nodeId": 4}),
            &nothing(),
        );
        assert!(out.refused());

        let drag = |files: Value| {
            run(
                Page,
                "Input.dispatchDragEvent",
                json!({"type": "drop", "x": 1, "y": 1,
                       "data": {"items": [], "dragOperationsMask": 1, "files": files}}),
                &nothing(),
            )
        };
        assert!(!drag(json!([format!("{DIR}/a.png")])).refused());
        assert!(drag(json!(["/home/chaperone/.ssh/id_ed25519"])).refused());
        assert!(!refused(
            Page,
            "Input.dispatchDragEvent",
            json!({"type": "dragEnter", "x": 1, "y": 1, "data": {"items": [], "dragOperationsMask": 1}})
        ));
    }

    #[test]
    fn certificate_errors_are_ignored_only_while_nothing_is_held() {
        let cases = [
            (
                "Security.setIgnoreCertificateErrors",
                json!({"ignore": true}),
            ),
            (
                "Security.setOverrideCertificateErrors",
                json!({"override": true}),
            ),
            (
                "Security.handleCertificateError",
                json!({"eventId": 1, "action": "continue"}),
            ),
        ];
        for (method, params) in cases {
            // Playwright's ignoreHTTPSErrors, chromiumoxide's default.
            assert!(!run(Page, method, params.clone(), &nothing()).refused());
            let out = run(Page, method, params, &bank());
            assert!(out.reason().contains("impostor"), "{method}");
        }
        assert!(!run(
            Page,
            "Security.setIgnoreCertificateErrors",
            json!({"ignore": false}),
            &bank()
        )
        .refused());
        assert!(!run(
            Page,
            "Security.setOverrideCertificateErrors",
            json!({"override": false}),
            &bank()
        )
        .refused());
        // Anything but an explicit false counts as switching it on.
        assert!(run(
            Page,
            "Security.setIgnoreCertificateErrors",
            json!({"ignore": "false"}),
            &bank()
        )
        .refused());
    }

    #[test]
    fn new_contexts_cannot_bring_their_own_egress() {
        for key in [
            "proxyServer",
            "proxyBypassList",
            "originsWithUniversalNetworkAccess",
        ] {
            let out = run(
                Browser,
                "Target.createBrowserContext",
                json!({"disposeOnDetach": true, key: null}),
                &nothing(),
            );
            assert!(out.reason().contains(key), "{}", out.reason());
            assert!(out.reason().contains("egress"), "{}", out.reason());
        }
    }

    #[test]
    fn traces_cannot_record_network_logs() {
        for params in [
            json!({"categories": "devtools.timeline,netlog"}),
            json!({"categories": "disabled-by-default-*"}),
            json!({"traceConfig": {"includedCategories": ["disabled-by-default-net*"]}}),
            json!({"traceConfig": {"includedCategories": ["Disabled-By-Default-NetLog"]}}),
            json!({"traceConfig": {"includedCategories": ["*"]}, "perfettoConfig": "AAAA"}),
            json!({"traceConfig": {"includedCategories": ["disabled-by-default-??tlog"]}}),
        ] {
            let out = run(Browser, "Tracing.start", params.clone(), &nothing());
            assert!(out.refused(), "{params}");
        }
        for params in [
            json!({}),
            json!({"categories": "-netlog,devtools.timeline"}),
            json!({"traceConfig": {"includedCategories": ["devtools.timeline", "v8", "*"]}}),
            json!({"traceConfig": {"includedCategories": ["disabled-by-default-devtools.screenshot"]}}),
        ] {
            let out = run(Page, "Tracing.start", params.clone(), &nothing());
            assert!(!out.refused(), "{params}: {}", out.reason());
        }
        assert!(glob(b"a*b*c", b"aXXbYYc"));
        assert!(!glob(b"a*b*c", b"aXXbYY"));
        assert!(glob(b"", b""));
        assert!(!glob(b"", b"x"));
    }

    #[test]
    fn writes_over_held_cookies_are_dropped_and_named() {
        let held = bank();
        // A single cookie, by domain and by URL, shadowing through a subdomain or a dot.
        for cookie in [
            json!({"name": "sid", "value": "attacker", "domain": ".bank.test"}),
            json!({"name": "sid", "value": "attacker", "domain": "BANK.test"}),
            json!({"name": "sid", "value": "attacker", "domain": "www.bank.test", "path": "/x"}),
            json!({"name": "sid", "value": "attacker", "url": "https://login.bank.test/"}),
            json!({"name": " sid ", "value": "attacker", "url": "https://bank.test/"}),
            json!({"name": "sid", "value": "x", "url": "https://a.test/", "domain": "bank.test"}),
        ] {
            let out = run(Page, "Network.setCookie", cookie.clone(), &held);
            let checked = out.checked();
            assert_eq!(
                checked.verdict,
                Verdict::Answer(json!({"success": true})),
                "{cookie}"
            );
            assert_eq!(checked.dropped.len(), 1);
            let text = &checked.dropped[0];
            assert!(
                text.contains("`sid`") && text.contains("bank.test"),
                "{text}"
            );
            assert!(!text.contains("attacker"), "{text}");
        }
        for cookie in [
            json!({"name": "theme", "value": "dark", "domain": "bank.test"}),
            json!({"name": "sid", "value": "x", "domain": "other.test"}),
            json!({"name": "SID", "value": "x", "domain": "bank.test"}),
            json!({"name": "sid", "value": "x", "domain": "bank.test.evil"}),
        ] {
            let out = run(Page, "Network.setCookie", cookie.clone(), &held);
            assert_eq!(out.checked(), Checked::forward(), "{cookie}");
            assert_eq!(out.params, cookie);
        }
        // Lists: the rest is forwarded, in order.
        for (kind, method) in [
            (Page, "Network.setCookies"),
            (Browser, "Storage.setCookies"),
        ] {
            let out = run(
                kind,
                method,
                json!({"cookies": [
                    {"name": "a", "value": "1", "domain": "bank.test"},
                    {"name": "sid", "value": "2", "domain": "bank.test"},
                    {"name": "b", "value": "3", "url": "https://other.test/"},
                ], "browserContextId": "C"}),
                &held,
            );
            let checked = out.checked();
            assert_eq!(checked.verdict, Verdict::Forward);
            assert_eq!(checked.dropped.len(), 1);
            assert_eq!(
                out.params,
                json!({"cookies": [
                    {"name": "a", "value": "1", "domain": "bank.test"},
                    {"name": "b", "value": "3", "url": "https://other.test/"},
                ], "browserContextId": "C"})
            );
            let out = run(
                kind,
                method,
                json!({"cookies": [
                    {"name": "sid", "value": "1", "domain": "bank.test"},
                    {"name": "sid", "value": "2", "url": "http://www.bank.test/"},
                ]}),
                &held,
            );
            let checked = out.checked();
            assert_eq!(checked.verdict, Verdict::Answer(json!({})));
            assert_eq!(checked.dropped.len(), 2);
        }
        // A URL the gate cannot read is refused rather than guessed at.
        let out = run(
            Page,
            "Network.setCookie",
            json!({"name": "sid", "value": "x", "url": "bank.test"}),
            &held,
        );
        assert!(out.reason().contains("url"), "{}", out.reason());
        // With nothing held, nothing is dropped.
        let cookie = json!({"cookies": [{"name": "sid", "value": "1", "domain": "bank.test"}]});
        let out = run(Browser, "Storage.setCookies", cookie.clone(), &nothing());
        assert_eq!(out.checked(), Checked::forward());
        assert_eq!(out.params, cookie);
        // Deleting cookies is harmless: held cookies are never in the browser.
        assert!(!run(
            Page,
            "Network.deleteCookies",
            json!({"name": "sid", "domain": "bank.test"}),
            &held
        )
        .refused());
        assert!(!run(Browser, "Storage.clearCookies", json!({}), &held).refused());
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            ".{0,12}".prop_map(Value::String),
            prop::sample::select(vec![
                "file:///etc/passwd",
                "https://bank.test/",
                "/home/chaperone/Downloads/x",
                "/home/chaperone/Downloads/../x",
                "sid",
                "bank.test",
                "netlog",
                "*",
                "allow",
            ])
            .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            let keys = prop::sample::select(vec![
                "url",
                "files",
                "data",
                "cookies",
                "name",
                "domain",
                "downloadPath",
                "behavior",
                "flatten",
                "ignore",
                "override",
                "categories",
                "traceConfig",
                "includedCategories",
                "proxyServer",
                "x",
            ]);
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((keys, inner), 0..5).prop_map(|kv| {
                    Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn check_never_panics(
            method in prop::sample::select(vec![
                "Page.navigate", "Target.createTarget", "Browser.setDownloadBehavior",
                "Page.setDownloadBehavior", "DOM.setFileInputFiles", "Input.dispatchDragEvent",
                "Security.setIgnoreCertificateErrors", "Security.handleCertificateError",
                "Target.createBrowserContext", "Tracing.start", "Network.setCookie",
                "Network.setCookies", "Storage.setCookies", "Target.setAutoAttach",
                "Target.attachToTarget", "Runtime.evaluate", "Fetch.enable", "", ".", "a.b.c",
            ]),
            kind in prop::sample::select(vec![Browser, Tab, Page, Worker, Other]),
            params in arb_json(),
            holding in any::<bool>(),
        ) {
            let held = if holding { bank() } else { nothing() };
            let mut params = params;
            let _ = check(kind, method, &mut params, &held);
        }
    }
}
