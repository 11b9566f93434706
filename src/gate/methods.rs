//! The gate's method tables: which CDP methods an agent may send on which kind of session, and
//! the methods refused everywhere with a reason of their own.
//!
//! Built from what the supported clients send (Playwright 1.65 `server/chromium`, puppeteer-core
//! 24.43 `cdp/`, chromiumoxide 0.9 handlers) and from the Chromium 156 protocol. Domains that
//! only touch one page's own state (DOM, CSS, input, emulation, debugging, profiling) are allowed
//! as a whole on the kinds of target that have them; domains that reach the browser, its network
//! stack, its cookie store or the machine are listed method by method, so a method Chromium adds
//! later stays refused until someone has looked at it.
//!
//! Parameters are judged afterwards by [`super::policy`]; being listed here is necessary, not
//! sufficient.

use super::policy::Refusal;
use super::SessionKind;

/// A set of [`SessionKind`]s.
#[derive(Clone, Copy)]
struct Kinds(u8);

const BROWSER: Kinds = Kinds(1);
const TAB: Kinds = Kinds(2);
const PAGE: Kinds = Kinds(4);
const WORKER: Kinds = Kinds(8);
const OTHER: Kinds = Kinds(16);

impl Kinds {
    const fn or(self, other: Kinds) -> Kinds {
        Kinds(self.0 | other.0)
    }

    fn contains(self, kind: SessionKind) -> bool {
        self.0 & bit(kind) != 0
    }
}

fn bit(kind: SessionKind) -> u8 {
    match kind {
        SessionKind::Browser => BROWSER.0,
        SessionKind::Tab => TAB.0,
        SessionKind::Page => PAGE.0,
        SessionKind::Worker => WORKER.0,
        SessionKind::Other => OTHER.0,
    }
}

const PAGE_WORKER: Kinds = PAGE.or(WORKER);
/// Every kind but [`OTHER`]: the browser, tabs, pages and workers.
const KNOWN: Kinds = BROWSER.or(TAB).or(PAGE).or(WORKER);
const ALL: Kinds = KNOWN.or(OTHER);

/// Which methods of a domain a row allows.
enum Methods {
    /// Every method of the domain, including ones Chromium adds later: only for domains whose
    /// whole surface is confined to the target's own state.
    All,
    /// Exactly these.
    Only(&'static [&'static str]),
}

/// One row of the allowlist: `methods` of `domain` on sessions of `kinds`. A domain may have
/// several rows (a narrow one for every kind, a wide one for pages).
struct Row {
    domain: &'static str,
    kinds: Kinds,
    methods: Methods,
}

const fn row(domain: &'static str, kinds: Kinds, methods: Methods) -> Row {
    Row {
        domain,
        kinds,
        methods,
    }
}

use Methods::{All, Only};

/// Target methods an agent may use. Attachment is flat-only and session ids are translated by
/// the router; `createTarget` and `createBrowserContext` have their parameters checked.
const TARGET: &[&str] = &[
    "activateTarget",
    "attachToBrowserTarget",
    "attachToTarget",
    "autoAttachRelated",
    "closeTarget",
    "createBrowserContext",
    "createTarget",
    "detachFromTarget",
    "disposeBrowserContext",
    "getBrowserContexts",
    // Puppeteer's page.openDevTools() looks the DevTools target up after opening it; reading
    // the id is harmless (opening is refused).
    "getDevToolsTarget",
    "getTargetInfo",
    "getTargets",
    "setAutoAttach",
    "setDiscoverTargets",
];

/// Browser methods: version, window geometry, permissions and downloads (whose path the policy
/// rewrites into the session's files directory).
const BROWSER_METHODS: &[&str] = &[
    "cancelDownload",
    "close",
    "getHistogram",
    "getHistograms",
    "getVersion",
    "getWindowBounds",
    "getWindowForTarget",
    "grantPermissions",
    "resetPermissions",
    "setContentsSize",
    "setDockTile",
    "setDownloadBehavior",
    "setPermission",
    "setWindowBounds",
];

/// Storage methods: cookies (filtered both ways by the gate), quota, clearing and tracking of
/// the agent's own origins. Bulk readers of other stored state are absent on purpose.
const STORAGE: &[&str] = &[
    "clearCookies",
    "clearDataForOrigin",
    "clearDataForStorageKey",
    "deleteStorageBucket",
    "getAffectedUrlsForThirdPartyCookieMetadata",
    "getCookies",
    "getRelatedWebsiteSets",
    "getStorageKey",
    "getStorageKeyForFrame",
    "getUsageAndQuota",
    "overrideQuotaForOrigin",
    "setCookies",
    "setStorageBucketTracking",
    "trackCacheStorageForOrigin",
    "trackCacheStorageForStorageKey",
    "trackIndexedDBForOrigin",
    "trackIndexedDBForStorageKey",
    "untrackCacheStorageForOrigin",
    "untrackCacheStorageForStorageKey",
    "untrackIndexedDBForOrigin",
    "untrackIndexedDBForStorageKey",
];

/// Network methods. Requests still pass the supervisor's interception and egress whatever the
/// agent sets here; cookie reads and writes are filtered by the gate.
const NETWORK: &[&str] = &[
    "canClearBrowserCache",
    "canClearBrowserCookies",
    "canEmulateNetworkConditions",
    "clearAcceptedEncodingsOverride",
    "clearBrowserCache",
    "clearBrowserCookies",
    "configureDurableMessages",
    "deleteCookies",
    "disable",
    "emulateNetworkConditions",
    "emulateNetworkConditionsByRule",
    "enable",
    "enableReportingApi",
    "fetchSchemefulSite",
    "getCertificate",
    "getCookies",
    "getRequestPostData",
    "getResponseBody",
    "getSecurityIsolationStatus",
    "overrideNetworkState",
    "replayXHR",
    "searchInResponseBody",
    "setAcceptedEncodings",
    "setAttachDebugStack",
    "setBlockedURLs",
    "setBypassServiceWorker",
    "setCacheDisabled",
    "setCookie",
    "setCookies",
    "setExtraHTTPHeaders",
    "setUserAgentOverride",
    "streamResourceContent",
];

/// Memory: reads and sampling only; the pressure simulations act on the whole browser.
const MEMORY: &[&str] = &[
    "getAllTimeSamplingProfile",
    "getBrowserSamplingProfile",
    "getDOMCounters",
    "getDOMCountersForLeakDetection",
    "getSamplingProfile",
    "startSampling",
    "stopSampling",
];

/// Tracing: `start` has its categories checked by the policy.
const TRACING: &[&str] = &[
    "end",
    "getCategories",
    "getTrackEventDescriptor",
    "recordClockSyncMarker",
    "requestMemoryDump",
    "start",
];

/// Security: the certificate methods are judged by the policy against what the session holds.
const SECURITY: &[&str] = &[
    "disable",
    "enable",
    "handleCertificateError",
    "setIgnoreCertificateErrors",
    "setOverrideCertificateErrors",
];

/// What a session that is not yet (or never) driven needs: Playwright and Puppeteer resume and
/// detach every target they auto-attach to, including ones they do not drive.
const RESUME: &[&str] = &["runIfWaitingForDebugger"];

/// The allowlist. A method is allowed on a session when some row names its domain, includes the
/// session's kind and includes the method.
const ROWS: &[Row] = &[
    // The browser and its targets.
    row("Target", ALL, Only(TARGET)),
    row("Browser", KNOWN, Only(BROWSER_METHODS)),
    row("Storage", BROWSER.or(PAGE_WORKER), Only(STORAGE)),
    row("SystemInfo", KNOWN, Only(&["getFeatureState", "getInfo"])),
    row("Tracing", BROWSER.or(PAGE), Only(TRACING)),
    row("Memory", KNOWN, Only(MEMORY)),
    row("Security", BROWSER.or(PAGE), Only(SECURITY)),
    // Streams (traces, PDFs, blobs) and protocol introspection: read-only, any known target.
    row("IO", KNOWN, Only(&["close", "read", "resolveBlob"])),
    row("Schema", ALL, All),
    row("Inspector", ALL, All),
    row("Runtime", TAB.or(OTHER), Only(RESUME)),
    // Network and interception on the targets that make requests. Browser-level Fetch is the
    // supervisor's (see `router_integrity`).
    row("Network", PAGE_WORKER, Only(NETWORK)),
    row("Fetch", PAGE_WORKER, All),
    // JavaScript and its tooling: pages and workers.
    row("Runtime", PAGE_WORKER, All),
    row("Debugger", PAGE_WORKER, All),
    row("Profiler", PAGE_WORKER, All),
    row("HeapProfiler", PAGE_WORKER, All),
    row("Log", PAGE_WORKER, All),
    row("Console", PAGE_WORKER, All),
    row("EventBreakpoints", PAGE_WORKER, All),
    row("DOMDebugger", PAGE_WORKER, All),
    // Playwright sets the user agent and locale on service workers too.
    row("Emulation", PAGE_WORKER, All),
    row("ServiceWorker", PAGE_WORKER, All),
    // The page's own document, rendering, input and storage.
    row("Page", PAGE, All),
    row("DOM", PAGE, All),
    row("DOMSnapshot", PAGE, All),
    row("DOMStorage", PAGE, All),
    row("CSS", PAGE, All),
    row("Overlay", PAGE, All),
    row("Input", PAGE, All),
    row("Accessibility", PAGE, All),
    row("Animation", PAGE, All),
    row("LayerTree", PAGE, All),
    row("Media", PAGE, All),
    row("Audits", PAGE, All),
    row("IndexedDB", PAGE, All),
    row("CacheStorage", PAGE, All),
    row("FileSystem", PAGE, All),
    row("Performance", PAGE, All),
    row("PerformanceTimeline", PAGE, All),
    row("WebAudio", PAGE, All),
    row("WebAuthn", PAGE, All),
    row("BackgroundService", PAGE, All),
    row("Preload", PAGE, All),
    row("Autofill", PAGE, All),
    row("FedCm", PAGE, All),
    row("DeviceAccess", PAGE, All),
    row("DeviceOrientation", PAGE, All),
    row("HeadlessExperimental", PAGE, All),
    // Puppeteer 24.43: page.bluetooth and page.webmcp.
    row("BluetoothEmulation", PAGE, All),
    row("WebMCP", PAGE, All),
];

/// Methods refused on every kind of session, with the reason the agent is told. `Domain.*`
/// refuses a whole domain. Checked before the allowlist, so these reasons win over the generic
/// one even where a row would allow the method.
const REFUSED: &[(&str, &str)] = &[
    (
        "Target.setRemoteLocations",
        "remote debugging locations would connect the browser to endpoints outside chaperone",
    ),
    (
        "Target.openDevTools",
        "a DevTools window would get an unfiltered protocol connection; use this CDP \
         connection instead",
    ),
    (
        "Tethering.*",
        "port tethering would open a network path around chaperone's egress proxy",
    ),
    (
        "Extensions.*",
        "extensions act with privileges chaperone cannot confine; the supervisor manages the \
         browser's extensions",
    ),
    (
        "PWA.*",
        "installing or launching web apps acts outside the sandboxed pages",
    ),
    (
        "Cast.*",
        "casting would send the session's content to devices outside chaperone",
    ),
    (
        "Browser.getBrowserCommandLine",
        "the browser's command line belongs to the supervisor",
    ),
    (
        "Browser.executeBrowserCommand",
        "browser UI commands act outside the pages and belong to the supervisor",
    ),
    (
        "Browser.crash",
        "crashing the browser ends the session; close the page or the connection instead",
    ),
    (
        "Browser.crashGpuProcess",
        "crashing the browser's GPU process disturbs the whole session; close the page instead",
    ),
    (
        "Page.crash",
        "crashing a renderer is not available to agents; close the page with Page.close or \
         Target.closeTarget instead",
    ),
    (
        "Browser.addPrivacySandboxEnrollmentOverride",
        "privacy sandbox overrides change browser-wide policy that belongs to the supervisor",
    ),
    (
        "Browser.addPrivacySandboxCoordinatorKeyConfig",
        "privacy sandbox overrides change browser-wide policy that belongs to the supervisor",
    ),
    (
        "Network.getAllCookies",
        "it reads every cookie in the browser; use Storage.getCookies or Network.getCookies, \
         which answer without the cookies chaperone holds",
    ),
    (
        "Network.setCookieControls",
        "cookie controls are browser-wide and belong to the supervisor",
    ),
    (
        "Network.loadNetworkResource",
        "it fetches with the browser's own credentials outside any page; navigate a page or \
         call fetch() in one instead",
    ),
    ("Network.setRequestInterception", LEGACY_INTERCEPTION),
    ("Network.continueInterceptedRequest", LEGACY_INTERCEPTION),
    (
        "Network.getResponseBodyForInterception",
        LEGACY_INTERCEPTION,
    ),
    (
        "Network.takeResponseBodyForInterceptionAsStream",
        LEGACY_INTERCEPTION,
    ),
    (
        "Network.enableDeviceBoundSessions",
        "device-bound sessions are credentials, and credentials belong to the supervisor",
    ),
    (
        "SystemInfo.getProcessInfo",
        "the browser's process list belongs to the supervisor; SystemInfo.getInfo is available",
    ),
    ("Storage.getSharedStorageEntries", BULK_READER),
    ("Storage.getSharedStorageMetadata", BULK_READER),
    ("Storage.getTrustTokens", BULK_READER),
    ("Storage.getInterestGroupDetails", BULK_READER),
    (
        "Storage.sendPendingAttributionReports",
        "it makes the browser send reports on its own; the session's egress belongs to the \
         supervisor",
    ),
];

const LEGACY_INTERCEPTION: &str = "the legacy interception API is not available; use \
                                   Fetch.enable on a page or worker session (Playwright route() \
                                   and Puppeteer request interception already do)";

const BULK_READER: &str = "bulk readers of the browser's stored state are not available to \
                           agents; read a page's own storage from that page";

/// The specific reason `method` is refused on every session, if it is.
pub(super) fn refused_everywhere(method: &str) -> Option<&'static str> {
    let domain = domain_of(method);
    REFUSED.iter().find_map(|&(name, reason)| {
        let hit = match name.strip_suffix(".*") {
            Some(d) => d == domain,
            None => name == method,
        };
        hit.then_some(reason)
    })
}

/// Whether `method` is on the allowlist for `kind`; the refusal tells the agent where the
/// method is available, if anywhere.
pub(super) fn allowed(kind: SessionKind, method: &str) -> Result<(), Refusal> {
    let domain = domain_of(method);
    let name = &method[domain.len()..].trim_start_matches('.');
    let matches = |r: &&Row| {
        r.domain == domain
            && match r.methods {
                All => !name.is_empty(),
                Only(list) => list.contains(name),
            }
    };
    if ROWS.iter().filter(matches).any(|r| r.kinds.contains(kind)) {
        return Ok(());
    }
    let elsewhere: Vec<&str> = [
        SessionKind::Browser,
        SessionKind::Tab,
        SessionKind::Page,
        SessionKind::Worker,
    ]
    .into_iter()
    .filter(|&k| ROWS.iter().filter(matches).any(|r| r.kinds.contains(k)))
    .map(kind_name)
    .collect();
    if elsewhere.is_empty() {
        return Err(Refusal::new(format!(
            "chaperone's gate forwards only methods known to leave held credentials, the \
             supervisor's interception and the sandbox alone, and {method} is not among them; \
             if your client needs it, ask the operator to have it reviewed"
        )));
    }
    let hint = if elsewhere == ["browser"] {
        "send it without a sessionId (on the connection's browser session)".to_string()
    } else {
        "attach to such a target (Target.setAutoAttach or Target.attachToTarget with \
         \"flatten\": true) and send it with that sessionId"
            .to_string()
    };
    Err(Refusal::new(format!(
        "{method} is available on {} sessions, and this is a {} session; {hint}",
        elsewhere.join(", "),
        kind_name(kind),
    )))
}

/// The domain part of `Domain.method` (the whole text when it has no dot).
fn domain_of(method: &str) -> &str {
    method.split_once('.').map_or(method, |(d, _)| d)
}

fn kind_name(kind: SessionKind) -> &'static str {
    match kind {
        SessionKind::Browser => "browser",
        SessionKind::Tab => "tab",
        SessionKind::Page => "page",
        SessionKind::Worker => "worker",
        SessionKind::Other => "other-target",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SessionKind::*;

    #[test]
    fn every_refused_method_names_a_reason_and_is_not_on_a_row_it_could_slip_through() {
        for (name, reason) in REFUSED {
            assert!(!reason.is_empty(), "{name}");
            assert!(name.contains('.'), "{name}");
        }
        assert!(refused_everywhere("Tethering.bind").is_some());
        assert!(refused_everywhere("Extensions.getExtensions").is_some());
        assert!(refused_everywhere("Network.getAllCookies").is_some());
        // A domain refusal matches the domain exactly, not a prefix of it.
        assert!(refused_everywhere("TetheringX.bind").is_none());
        assert!(refused_everywhere("Network.getCookies").is_none());
    }

    #[test]
    fn domains_are_allowed_per_kind() {
        assert!(allowed(Page, "DOM.getDocument").is_ok());
        assert!(allowed(Worker, "DOM.getDocument").is_err());
        assert!(allowed(Browser, "DOM.getDocument").is_err());
        assert!(allowed(Worker, "Runtime.evaluate").is_ok());
        assert!(allowed(Browser, "Runtime.evaluate").is_err());
        assert!(allowed(Tab, "Runtime.runIfWaitingForDebugger").is_ok());
        assert!(allowed(Other, "Runtime.runIfWaitingForDebugger").is_ok());
        assert!(allowed(Other, "Runtime.evaluate").is_err());
        assert!(allowed(Other, "Target.detachFromTarget").is_ok());
        assert!(allowed(Browser, "Storage.getCookies").is_ok());
        assert!(allowed(Tab, "Storage.getCookies").is_err());
        assert!(allowed(Page, "Network.enable").is_ok());
        assert!(allowed(Browser, "Network.enable").is_err());
        // Method-level domains do not let new methods through.
        assert!(allowed(Page, "Network.someFutureCall").is_err());
        assert!(allowed(Browser, "Storage.setProtectedAudienceKAnonymity").is_err());
        // Domain-level rows do.
        assert!(allowed(Page, "Page.someFutureCall").is_ok());
        // Malformed names are refused.
        for method in ["", "Page", "Page.", ".enable", "No.such"] {
            assert!(allowed(Page, method).is_err(), "{method:?}");
        }
    }

    #[test]
    fn refusals_say_where_the_method_is_available() {
        let text = allowed(Browser, "Page.navigate")
            .unwrap_err()
            .message("Page.navigate");
        assert!(text.contains("available on page sessions"), "{text}");
        assert!(text.contains("flatten"), "{text}");
        let text = allowed(Other, "Storage.getCookies")
            .unwrap_err()
            .message("x");
        assert!(
            text.contains("available on browser, page, worker sessions"),
            "{text}"
        );
        let text = allowed(Page, "No.such").unwrap_err().message("No.such");
        assert!(text.contains("ask the operator"), "{text}");
    }
}
