//! What an agent may see: scrubbing of events, answers and every other frame bound for an
//! agent-owned session.
//!
//! Three entry points, from cheapest to most specific:
//!
//! - [`scrub_text`] runs on every frame to the agent while the session holds secrets. It looks
//!   for held secret values (raw or encoded) in the frame's text and decodes the frame only when
//!   one is there, so the bulk of the traffic (multi-megabyte screenshots included) is searched
//!   once and passed on untouched.
//! - [`scrub_event`] runs on events for which [`event_needs_scrub`] is true: those that, measured
//!   on Chromium 156, can carry credential material the detector may not know yet — raw
//!   `Set-Cookie` values (captured into the vault only as this very event is routed), the
//!   `Cookie` header, associated cookies, handshake headers and cookie lines in issues.
//! - [`scrub_reply`] runs on answers for which [`reply_needs_scrub`] is true: cookie reads, which
//!   are answered with held cookies removed.
//!
//! Scrub in place, never drop: clients pair `responseReceived` with its `ExtraInfo` by
//! `requestId` and hang if one vanishes, so no event is removed and no field a client pairs on
//! is touched. Every replaced value becomes [`REDACTED`].
//!
//! If params that need scrubbing cannot be decoded (text `serde_json` cannot represent, such as a
//! lone UTF-16 surrogate escape), the router fails closed: it drops the event or answers the
//! request with an error rather than forward unscrubbed material.

use serde_json::{Map, Value};

use crate::broker::leak::LeakDetector;
pub use crate::broker::leak::REDACTED;

use super::{Held, SessionKind};

/// Whether events named `method` on a session of `kind` go through [`scrub_event`].
pub fn event_needs_scrub(_kind: SessionKind, method: &str) -> bool {
    matches!(
        method,
        "Network.requestWillBeSentExtraInfo"
            | "Network.responseReceivedExtraInfo"
            | "Network.responseReceived"
            | "Network.webSocketWillSendHandshakeRequest"
            | "Network.webSocketHandshakeResponseReceived"
            | "Audits.issueAdded"
    )
}

/// Whether answers to `method` on a session of `kind` go through [`scrub_reply`].
pub fn reply_needs_scrub(_kind: SessionKind, method: &str) -> bool {
    matches!(
        method,
        "Storage.getCookies" | "Network.getCookies" | "Network.getAllCookies"
    )
}

/// Any frame bound for the agent: `None` when it carries no held secret (the common case, decided
/// without decoding), else the frame re-serialised with every held secret in every string,
/// object key and number replaced by [`REDACTED`].
///
/// Chromium escapes some characters in JSON strings (`\uXXXX`, `\/`), which would hide a secret
/// from a search of the raw text; frames with such escapes are decoded and searched string by
/// string. Text that is not JSON `serde_json` can represent is redacted as raw text; if a secret
/// is still visible after that (percent-encoded), the whole frame becomes the JSON string
/// `"[held by chaperone]"`, which the router must treat as undeliverable.
pub fn scrub_text(text: &str, held: &Held) -> Option<String> {
    let detector = held.detector()?;
    if detector.find(text.as_bytes()).is_none() && !has_hiding_escape(text) {
        return None;
    }
    match serde_json::from_str::<Value>(text) {
        Ok(mut value) => redact_value(&mut value, detector).then(|| value.to_string()),
        Err(_) => {
            let redacted = detector.redact(text)?;
            if redacted == REDACTED || redacted.is_empty() {
                Some(Value::String(REDACTED.into()).to_string())
            } else {
                Some(redacted)
            }
        }
    }
}

/// Whether `text` has a JSON escape that could stand for a character of a held secret (held
/// values are printable ASCII): `\/` or `\u00XX` for a printable ASCII character.
fn has_hiding_escape(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find('\\') {
        let i = from + at;
        match bytes.get(i + 1) {
            Some(b'/') => return true,
            Some(b'u') => {
                let hex = bytes.get(i + 2..i + 6);
                if let Some([b'0', b'0', hi, _]) = hex {
                    if (b'2'..=b'7').contains(hi) {
                        return true;
                    }
                }
            }
            _ => {}
        }
        // Skip the escaped character, so `\\u0041` (a backslash, then text) is not an escape.
        from = (i + 2).min(text.len());
    }
    false
}

/// Removes credential material from the `params` of an event before it reaches an agent.
/// Does nothing while the session holds nothing.
pub fn scrub_event(_kind: SessionKind, method: &str, params: &mut Value, held: &Held) {
    if !held.holds_anything() {
        return;
    }
    match method {
        "Network.responseReceivedExtraInfo" => {
            // No URL in this event, and the vault may capture the cookie only as this event is
            // routed: every Set-Cookie value goes, whatever its site.
            if let Some(headers) = params.get_mut("headers") {
                redact_set_cookie_headers(headers);
            }
            redact_string_at(params, "headersText", redact_set_cookie_text);
            for list in ["blockedCookies", "exemptedCookies"] {
                for entry in array_mut(params, list) {
                    redact_string_at(entry, "cookieLine", redact_set_cookie_line);
                    if let Some(cookie) = entry.get_mut("cookie") {
                        redact_cookie_value(cookie);
                    }
                }
            }
        }
        "Network.requestWillBeSentExtraInfo" => {
            let mut names: Vec<String> = held.cookies().iter().map(|c| c.name.clone()).collect();
            for entry in array_mut(params, "associatedCookies") {
                let Some(cookie) = entry.get_mut("cookie") else {
                    continue;
                };
                let domain = cookie.get("domain").and_then(Value::as_str).unwrap_or("");
                if held.is_credential_host(domain) {
                    if let Some(name) = cookie.get("name").and_then(Value::as_str) {
                        names.push(name.to_owned());
                    }
                    redact_cookie_value(cookie);
                }
            }
            if let Some(headers) = params.get_mut("headers") {
                redact_cookie_headers(headers, &names);
            }
            redact_string_at(params, "headersText", |t| redact_cookie_text(t, &names));
        }
        "Network.responseReceived" | "Network.webSocketHandshakeResponseReceived" => {
            let names = held_names(held);
            if let Some(response) = params.get_mut("response") {
                redact_response(response, &names);
            }
        }
        "Network.webSocketWillSendHandshakeRequest" => {
            let names = held_names(held);
            if let Some(headers) = params.pointer_mut("/request/headers") {
                redact_cookie_headers(headers, &names);
            }
        }
        "Audits.issueAdded" => {
            if let Some(details) = params.pointer_mut("/issue/details/cookieIssueDetails") {
                // Set only for cookie lines Chromium could not parse, so it may be either a
                // Set-Cookie line or a Cookie header: every value in it goes.
                redact_string_at(details, "rawCookieLine", |line| {
                    redact_pairs(line, |_| true)
                });
                if let Some(cookie) = details.get_mut("cookie") {
                    redact_cookie_value(cookie);
                }
            }
        }
        _ => {}
    }
    if let Some(detector) = held.detector() {
        redact_value(params, detector);
    }
}

/// Removes credential material from the `result` of an answer before it reaches an agent:
/// cookie reads lose every held cookie and every cookie whose value holds a secret.
pub fn scrub_reply(kind: SessionKind, method: &str, result: &mut Value, held: &Held) {
    if reply_needs_scrub(kind, method) {
        if let Some(cookies) = result.get_mut("cookies").and_then(Value::as_array_mut) {
            cookies.retain(|cookie| !is_held(cookie, held));
        }
    }
    if let Some(detector) = held.detector() {
        redact_value(result, detector);
    }
}

/// Whether a CDP `Network.Cookie` must not be shown: it is held, or its value is a secret.
fn is_held(cookie: &Value, held: &Held) -> bool {
    let field = |name| cookie.get(name).and_then(Value::as_str).unwrap_or("");
    if held.is_held_cookie(field("domain"), field("name")) {
        return true;
    }
    held.detector()
        .is_some_and(|d| d.find(field("value").as_bytes()).is_some())
}

fn held_names(held: &Held) -> Vec<String> {
    held.cookies().iter().map(|c| c.name.clone()).collect()
}

/// `Network.Response`: response headers lose Set-Cookie values, request headers (when Chromium
/// fills them) lose the values of held cookies.
fn redact_response(response: &mut Value, held_names: &[String]) {
    if let Some(headers) = response.get_mut("headers") {
        redact_set_cookie_headers(headers);
    }
    redact_string_at(response, "headersText", redact_set_cookie_text);
    if let Some(headers) = response.get_mut("requestHeaders") {
        redact_cookie_headers(headers, held_names);
    }
    redact_string_at(response, "requestHeadersText", |t| {
        redact_cookie_text(t, held_names)
    });
}

/// The elements of the array at `key`, if there is one.
fn array_mut<'a>(value: &'a mut Value, key: &str) -> impl Iterator<Item = &'a mut Value> {
    value
        .get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

/// Replaces the string at `key` with `f` of it.
fn redact_string_at(value: &mut Value, key: &str, f: impl FnOnce(&str) -> String) {
    if let Some(Value::String(s)) = value.get_mut(key) {
        *s = f(s);
    }
}

/// A CDP cookie object's non-empty `value` becomes the marker.
fn redact_cookie_value(cookie: &mut Value) {
    if let Some(Value::String(v)) = cookie.get_mut("value") {
        if !v.is_empty() {
            *v = REDACTED.into();
        }
    }
}

/// Every header named `Set-Cookie` (any case) in a CDP headers object. Its value may hold several
/// cookies joined by `\n`.
fn redact_set_cookie_headers(headers: &mut Value) {
    let Some(headers) = headers.as_object_mut() else {
        return;
    };
    for (name, value) in headers.iter_mut() {
        if name.eq_ignore_ascii_case("set-cookie") {
            if let Value::String(v) = value {
                *v = v
                    .split('\n')
                    .map(redact_set_cookie_line)
                    .collect::<Vec<_>>()
                    .join("\n");
            }
        }
    }
}

/// Every header named `Cookie` (any case): values of the pairs named in `names`.
fn redact_cookie_headers(headers: &mut Value, names: &[String]) {
    let Some(headers) = headers.as_object_mut() else {
        return;
    };
    for (name, value) in headers.iter_mut() {
        if name.eq_ignore_ascii_case("cookie") {
            if let Value::String(v) = value {
                *v = redact_pairs(v, |n| names.iter().any(|h| h == n));
            }
        }
    }
}

/// `name=value; Attr=…`: the value of the first pair (the cookie) goes, attributes stay. A line
/// without `=` is a nameless cookie: all of the first pair is its value.
fn redact_set_cookie_line(line: &str) -> String {
    let (pair, attributes) = match line.find(';') {
        Some(i) => line.split_at(i),
        None => (line, ""),
    };
    let redacted_pair = match pair.split_once('=') {
        Some((name, value)) if !value.trim().is_empty() => format!("{name}={REDACTED}"),
        Some(_) => pair.to_owned(),
        None if pair.trim().is_empty() => pair.to_owned(),
        None => REDACTED.to_owned(),
    };
    redacted_pair + attributes
}

/// `a=1; b=2`: the values of the pairs whose (trimmed) name `hit` accepts.
fn redact_pairs(value: &str, hit: impl Fn(&str) -> bool) -> String {
    value
        .split(';')
        .map(|pair| match pair.split_once('=') {
            Some((name, v)) if hit(name.trim()) && !v.trim().is_empty() => {
                format!("{name}={REDACTED}")
            }
            Some(_) => pair.to_owned(),
            None if hit("") && !pair.trim().is_empty() => REDACTED.to_owned(),
            None => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// An HTTP header block (`headersText`): the values of its `Set-Cookie` lines.
fn redact_set_cookie_text(text: &str) -> String {
    redact_header_lines(text, "set-cookie", redact_set_cookie_line)
}

/// An HTTP request header block: the values of held cookies in its `Cookie` lines.
fn redact_cookie_text(text: &str, names: &[String]) -> String {
    redact_header_lines(text, "cookie", |v| {
        redact_pairs(v, |n| names.iter().any(|h| h == n))
    })
}

/// Applies `f` to the value of every line of `text` whose header name is `header` (any case),
/// keeping line endings and everything else.
fn redact_header_lines(text: &str, header: &str, f: impl Fn(&str) -> String) -> String {
    text.split('\n')
        .map(|line| {
            let Some((name, value)) = line.split_once(':') else {
                return line.to_owned();
            };
            if !name.trim().eq_ignore_ascii_case(header) {
                return line.to_owned();
            }
            let (value, cr) = match value.strip_suffix('\r') {
                Some(v) => (v, "\r"),
                None => (value, ""),
            };
            let lead = value.len() - value.trim_start().len();
            format!("{name}:{}{}{cr}", &value[..lead], f(&value[lead..]))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Replaces every held secret in every string, object key and number of `value`; true when
/// anything changed.
fn redact_value(value: &mut Value, detector: &LeakDetector) -> bool {
    match value {
        Value::String(s) => match detector.redact(s) {
            Some(r) => {
                *s = r;
                true
            }
            None => false,
        },
        Value::Number(n) => {
            // Held values may be all digits, and a page can hand one back as a number.
            if detector.find(n.to_string().as_bytes()).is_some() {
                *value = Value::String(REDACTED.into());
                true
            } else {
                false
            }
        }
        Value::Array(items) => items.iter_mut().fold(false, |changed, item| {
            redact_value(item, detector) | changed
        }),
        Value::Object(map) => {
            let mut changed = false;
            let keys_hit = map.keys().any(|k| detector.find(k.as_bytes()).is_some());
            if keys_hit {
                let old = std::mem::take(map);
                let mut renamed = Map::with_capacity(old.len());
                for (k, v) in old {
                    let k = detector.redact(&k).unwrap_or(k);
                    renamed.insert(k, v);
                }
                *map = renamed;
                changed = true;
            }
            for item in map.values_mut() {
                changed |= redact_value(item, detector);
            }
            changed
        }
        Value::Null | Value::Bool(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::HeldCookie;
    use proptest::prelude::*;
    use serde_json::json;
    use SessionKind::*;

    const SECRET: &str = "SECRET-SESSION-93ab2e";
    const BEARER: &str = "tok-4f1b9a77c2e0d6";

    fn bank() -> Held {
        Held::new(
            &[SECRET, BEARER],
            vec![HeldCookie {
                site: "bank.test".into(),
                name: "sid".into(),
            }],
            vec!["bank.test".into()],
            "/files",
        )
    }

    fn event(method: &str, mut params: Value, held: &Held) -> Value {
        assert!(event_needs_scrub(Page, method), "{method}");
        scrub_event(Page, method, &mut params, held);
        params
    }

    fn no_secret(value: &Value) {
        let text = value.to_string();
        assert!(!text.contains(SECRET) && !text.contains(BEARER), "{text}");
        assert!(!text.contains("fresh-unknown-value"), "{text}");
    }

    #[test]
    fn set_cookie_values_in_response_extra_info_are_redacted_names_and_attributes_kept() {
        let params = json!({
            "requestId": "R1",
            "statusCode": 200,
            "headers": {
                "content-type": "text/html",
                "Set-Cookie": "sid=fresh-unknown-value; Path=/; HttpOnly\ntheme=dark; Max-Age=60\ngone=; Max-Age=0"
            },
            "headersText": "HTTP/1.1 200 OK\r\nSet-Cookie: sid=fresh-unknown-value; Secure\r\nset-cookie:theme=dark\r\nContent-Length: 3\r\n\r\n",
            "blockedCookies": [{
                "blockedReasons": ["SameSiteLax"],
                "cookieLine": "sid=fresh-unknown-value; SameSite=Lax",
                "cookie": {"name": "sid", "value": "fresh-unknown-value", "domain": "bank.test"}
            }],
            "exemptedCookies": [{
                "exemptionReason": "TPCDMetadata",
                "cookieLine": "x=fresh-unknown-value",
                "cookie": {"name": "x", "value": "fresh-unknown-value", "domain": "a.test"}
            }],
        });
        let out = event("Network.responseReceivedExtraInfo", params, &bank());
        no_secret(&out);
        assert_eq!(out["requestId"], "R1");
        assert_eq!(
            out["headers"]["Set-Cookie"],
            format!(
                "sid={REDACTED}; Path=/; HttpOnly\ntheme={REDACTED}; Max-Age=60\ngone=; Max-Age=0"
            )
        );
        assert_eq!(out["headers"]["content-type"], "text/html");
        assert_eq!(
            out["headersText"],
            format!("HTTP/1.1 200 OK\r\nSet-Cookie: sid={REDACTED}; Secure\r\nset-cookie:theme={REDACTED}\r\nContent-Length: 3\r\n\r\n")
        );
        assert_eq!(
            out["blockedCookies"][0]["cookieLine"],
            format!("sid={REDACTED}; SameSite=Lax")
        );
        assert_eq!(out["blockedCookies"][0]["cookie"]["value"], REDACTED);
        assert_eq!(out["blockedCookies"][0]["cookie"]["name"], "sid");
        assert_eq!(
            out["exemptedCookies"][0]["cookieLine"],
            format!("x={REDACTED}")
        );
        assert_eq!(out["exemptedCookies"][0]["cookie"]["value"], REDACTED);
    }

    #[test]
    fn nothing_is_scrubbed_while_nothing_is_held() {
        let params = json!({"requestId": "R", "headers": {"set-cookie": "a=b"}});
        let out = event(
            "Network.responseReceivedExtraInfo",
            params.clone(),
            &Held::nothing("/files"),
        );
        assert_eq!(out, params);
        assert_eq!(scrub_text(&params.to_string(), &Held::nothing("/f")), None);
    }

    #[test]
    fn request_extra_info_loses_credential_cookies_and_injected_values() {
        let params = json!({
            "requestId": "R2",
            "associatedCookies": [
                {"blockedReasons": [], "cookie": {"name": "pref", "value": "fresh-unknown-value", "domain": ".bank.test"}},
                {"blockedReasons": [], "cookie": {"name": "ga", "value": "visible-1", "domain": "a.test"}}
            ],
            "headers": {
                "Cookie": format!("sid={SECRET}; pref=fresh-unknown-value; ga=visible-1"),
                "authorization": format!("Bearer {BEARER}"),
                "accept": "*/*"
            },
            "connectTiming": {"requestTime": 1.5}
        });
        let out = event("Network.requestWillBeSentExtraInfo", params, &bank());
        no_secret(&out);
        assert_eq!(out["requestId"], "R2");
        assert_eq!(
            out["headers"]["Cookie"],
            format!("sid={REDACTED}; pref={REDACTED}; ga=visible-1")
        );
        assert_eq!(
            out["headers"]["authorization"],
            format!("Bearer {REDACTED}")
        );
        assert_eq!(out["associatedCookies"][0]["cookie"]["value"], REDACTED);
        assert_eq!(out["associatedCookies"][1]["cookie"]["value"], "visible-1");
        assert_eq!(out["connectTiming"]["requestTime"], 1.5);
    }

    #[test]
    fn response_received_and_websocket_handshakes_are_scrubbed() {
        let response = json!({
            "url": "https://bank.test/",
            "status": 200,
            "headers": {"Set-Cookie": "sid=fresh-unknown-value"},
            "headersText": "HTTP/1.1 200 OK\r\nSet-Cookie: sid=fresh-unknown-value\r\n",
            "requestHeaders": {"Cookie": "sid=fresh-unknown-value; a=1"},
            "requestHeadersText": "GET / HTTP/1.1\r\nCookie: sid=fresh-unknown-value; a=1\r\n"
        });
        for method in [
            "Network.responseReceived",
            "Network.webSocketHandshakeResponseReceived",
        ] {
            let out = event(
                method,
                json!({"requestId": "R3", "response": response.clone()}),
                &bank(),
            );
            no_secret(&out);
            assert_eq!(out["requestId"], "R3");
            assert_eq!(
                out["response"]["requestHeaders"]["Cookie"],
                format!("sid={REDACTED}; a=1")
            );
            assert_eq!(
                out["response"]["requestHeadersText"],
                format!("GET / HTTP/1.1\r\nCookie: sid={REDACTED}; a=1\r\n")
            );
            assert_eq!(out["response"]["url"], "https://bank.test/");
        }
        let out = event(
            "Network.webSocketWillSendHandshakeRequest",
            json!({"requestId": "W", "timestamp": 1, "wallTime": 2,
                   "request": {"headers": {"cookie": "sid=fresh-unknown-value; b=2"}}}),
            &bank(),
        );
        no_secret(&out);
        assert_eq!(
            out["request"]["headers"]["cookie"],
            format!("sid={REDACTED}; b=2")
        );
    }

    #[test]
    fn cookie_issues_lose_their_raw_lines() {
        let out = event(
            "Audits.issueAdded",
            json!({"issue": {"code": "CookieIssue", "details": {"cookieIssueDetails": {
                "rawCookieLine": "sid=fresh-unknown-value; other=fresh-unknown-value; Path=/",
                "cookie": {"name": "sid", "domain": "bank.test", "path": "/"},
                "cookieWarningReasons": [], "cookieExclusionReasons": ["ExcludeSameSiteLax"],
                "operation": "SetCookie"
            }}}}),
            &bank(),
        );
        no_secret(&out);
        let details = &out["issue"]["details"]["cookieIssueDetails"];
        assert_eq!(
            details["rawCookieLine"],
            format!("sid={REDACTED}; other={REDACTED}; Path={REDACTED}")
        );
        assert_eq!(details["cookie"]["name"], "sid");
        assert_eq!(details["operation"], "SetCookie");
    }

    #[test]
    fn cookie_reads_lose_held_cookies_and_secret_values() {
        let result = json!({"cookies": [
            {"name": "sid", "value": "x", "domain": ".bank.test"},
            {"name": "sid", "value": "x", "domain": "www.bank.test"},
            {"name": "copy", "value": format!("v{SECRET}"), "domain": "a.test"},
            {"name": "theme", "value": "dark", "domain": "bank.test"},
            {"name": "sid", "value": "mine", "domain": "a.test"},
        ]});
        for method in ["Storage.getCookies", "Network.getCookies"] {
            assert!(reply_needs_scrub(Browser, method));
            let mut out = result.clone();
            scrub_reply(Browser, method, &mut out, &bank());
            let names: Vec<(&str, &str)> = out["cookies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c["name"].as_str().unwrap(), c["domain"].as_str().unwrap()))
                .collect();
            assert_eq!(names, [("theme", "bank.test"), ("sid", "a.test")]);
        }
        let mut out = result.clone();
        scrub_reply(
            Browser,
            "Storage.getCookies",
            &mut out,
            &Held::nothing("/f"),
        );
        assert_eq!(out, result);
    }

    #[test]
    fn scrub_text_passes_clean_frames_untouched() {
        let held = bank();
        let frame = json!({"id": 3, "result": {"data": "iVBORw0KGgo".repeat(1000)}});
        assert_eq!(scrub_text(&frame.to_string(), &held), None);
        // An escaped backslash followed by text is no escape of a secret character.
        assert_eq!(scrub_text(r#"{"a":"\\u0041"}"#, &held), None);
    }

    #[test]
    fn scrub_text_redacts_values_keys_numbers_and_escaped_forms() {
        let held = Held::new(
            &[SECRET, "1234567890123"],
            Vec::new(),
            vec!["bank.test".into()],
            "/f",
        );
        let frame = json!({
            "method": "Runtime.consoleAPICalled",
            "params": {"args": [{"type": "string", "value": format!("leak {SECRET}!")}],
                       SECRET: 1, "n": 1234567890123_u64, "executionContextId": 7}
        })
        .to_string();
        let out: Value = serde_json::from_str(&scrub_text(&frame, &held).unwrap()).unwrap();
        assert_eq!(
            out["params"]["args"][0]["value"],
            format!("leak {REDACTED}!")
        );
        assert_eq!(out["params"][REDACTED], 1);
        assert_eq!(out["params"]["n"], REDACTED);
        assert_eq!(out["params"]["executionContextId"], 7);
        // Chromium may escape characters; the secret is still found after decoding.
        let escaped = SECRET.replace('-', "\\u002d");
        let frame = format!(r#"{{"id":1,"result":{{"value":"{escaped}"}}}}"#);
        let out = scrub_text(&frame, &held).unwrap();
        assert!(!out.contains(SECRET) && out.contains(REDACTED), "{out}");
        // Base64 in a body, as Network.getResponseBody answers.
        let b64 = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("<p>{SECRET}</p>"),
        );
        let frame = json!({"id": 2, "result": {"body": b64, "base64Encoded": true}}).to_string();
        let out = scrub_text(&frame, &held).unwrap();
        assert!(
            held.detector().unwrap().find(out.as_bytes()).is_none(),
            "{out}"
        );
    }

    #[test]
    fn scrub_text_fails_closed_on_text_it_cannot_decode() {
        let held = bank();
        let frame = format!(r#"{{"id":1,"result":{{"s":"\ud800","v":"{SECRET}"}}}}"#);
        let out = scrub_text(&frame, &held).unwrap();
        assert!(!out.contains(SECRET), "{out}");
        let pct: String = SECRET.bytes().map(|b| format!("%{b:02X}")).collect();
        let frame = format!(r#"{{"id":1,"result":{{"s":"\ud800","v":"{pct}"}}}}"#);
        assert_eq!(
            scrub_text(&frame, &held).unwrap(),
            format!("\"{REDACTED}\"")
        );
    }

    #[test]
    fn helpers_handle_odd_lines() {
        assert_eq!(redact_set_cookie_line("nameless"), REDACTED);
        assert_eq!(redact_set_cookie_line(""), "");
        assert_eq!(
            redact_set_cookie_line("a=b=c; x"),
            format!("a={REDACTED}; x")
        );
        assert_eq!(
            redact_pairs("a=1;b", |n| n == "a"),
            format!("a={REDACTED};b")
        );
        assert_eq!(
            redact_header_lines("X: 1\nCookie:  a=1\r\nNo colon", "cookie", |_| "V".into()),
            "X: 1\nCookie:  V\r\nNo colon"
        );
        assert!(has_hiding_escape(r#""a\/b""#));
        assert!(has_hiding_escape(r#""\u0041""#));
        assert!(!has_hiding_escape(r#""\u00e9\n\"""#));
        assert!(!has_hiding_escape("trailing\\"));
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(|n| json!(n)),
            "[ -~]{0,16}".prop_map(Value::String),
            Just(Value::String(format!("sid={SECRET}; Path=/"))),
            Just(Value::String(format!("Bearer {BEARER}"))),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            let keys = prop::sample::select(vec![
                "headers",
                "Set-Cookie",
                "cookie",
                "Cookie",
                "headersText",
                "cookieLine",
                "blockedCookies",
                "associatedCookies",
                "response",
                "request",
                "value",
                "domain",
                "name",
                "issue",
                "details",
                "cookieIssueDetails",
                "rawCookieLine",
                SECRET,
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
        fn scrubbed_events_and_frames_hold_no_secret(
            method in prop::sample::select(vec![
                "Network.requestWillBeSentExtraInfo", "Network.responseReceivedExtraInfo",
                "Network.responseReceived", "Network.webSocketWillSendHandshakeRequest",
                "Network.webSocketHandshakeResponseReceived", "Audits.issueAdded",
                "Storage.getCookies",
            ]),
            params in arb_json(),
        ) {
            let held = bank();
            let detector = held.detector().unwrap();
            let mut event = params.clone();
            scrub_event(Page, method, &mut event, &held);
            prop_assert!(detector.find(event.to_string().as_bytes()).is_none());
            let mut reply = params.clone();
            scrub_reply(Page, method, &mut reply, &held);
            prop_assert!(detector.find(reply.to_string().as_bytes()).is_none());
            let text = params.to_string();
            let out = scrub_text(&text, &held).unwrap_or(text);
            prop_assert!(detector.find(out.as_bytes()).is_none());
        }
    }
}
