//! The supervisor's own HTTPS client, for the calls it makes upstream with held credentials:
//! OAuth refreshes and revocations at session end. One per supervisor (`[upstream]` in the
//! config).
//!
//! rustls with the ring provider, the system's roots plus `upstream.ca_file`. It follows no
//! redirect (a `307` would replay a refresh token to wherever the answer points), uses no
//! proxy from the environment, and bounds every call by `upstream.timeout`. Error texts never
//! carry a URL or a body: both can hold held values.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use url::Url;
use zeroize::Zeroizing;

use crate::config::UpstreamConfig;

/// Why the upstream client could not be built or a call failed. Never holds a value.
#[derive(Clone, Debug, thiserror::Error)]
pub enum UpstreamError {
    /// `upstream.ca_file` could not be used.
    #[error("upstream.ca_file: {0}")]
    Roots(String),
    /// The TLS client could not be set up.
    #[error("the upstream HTTPS client could not be built: {0}")]
    Client(String),
    /// Connecting, TLS or HTTP failed.
    #[error("{0}")]
    Request(String),
    /// No complete answer within `upstream.timeout`.
    #[error("no answer within {0:?} (upstream.timeout)")]
    Timeout(Duration),
    /// The answer's body is larger than the caller accepts.
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
}

/// Reads the PEM certificates of `path` (for `upstream.ca_file`); refuses a file without any.
pub fn read_roots(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = Vec::new();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let der = cert.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        roots.push(
            reqwest::Certificate::from_der(&der)
                .map_err(|e| format!("{}: bad certificate: {e}", path.display()))?,
        );
    }
    if roots.is_empty() {
        return Err(format!(
            "{} holds no certificate (PEM `BEGIN CERTIFICATE` blocks expected)",
            path.display()
        ));
    }
    Ok(roots)
}

/// The supervisor's upstream client. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// An upstream answer. The body is zeroized when dropped: a token endpoint's answer holds
/// tokens.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body.
    pub body: Zeroizing<Vec<u8>>,
}

impl Upstream {
    /// The client for `cfg`.
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, UpstreamError> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(false)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .referer(false)
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(concat!("chaperone/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &cfg.ca_file {
            for root in read_roots(ca).map_err(UpstreamError::Roots)? {
                b = b.add_root_certificate(root);
            }
        }
        let client = b
            .build()
            .map_err(|e| UpstreamError::Client(e.without_url().to_string()))?;
        Ok(Upstream {
            client,
            timeout: cfg.timeout,
        })
    }

    /// `upstream.timeout`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// One call: `method` to `url` with `headers` and, when given, `form` as an
    /// `application/x-www-form-urlencoded` body. Reads at most `max_body` bytes of the answer.
    pub async fn send(
        &self,
        method: &str,
        url: &Url,
        headers: &[(String, Zeroizing<String>)],
        form: Option<&Zeroizing<String>>,
        max_body: usize,
    ) -> Result<Answer, UpstreamError> {
        let call = async {
            let method = reqwest::Method::from_bytes(method.as_bytes())
                .map_err(|_| UpstreamError::Request(format!("`{method}` is not a method")))?;
            let mut req = self.client.request(method, url.clone());
            for (name, value) in headers {
                let mut v = reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                    UpstreamError::Request(format!("header {name} holds a character HTTP forbids"))
                })?;
                v.set_sensitive(true);
                req = req.header(name.as_str(), v);
            }
            if let Some(form) = form {
                // reqwest keeps its own copy of the body until it is sent; ours is zeroized by
                // the caller.
                req = req
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(form.as_bytes().to_vec());
            }
            let mut resp = req.send().await.map_err(request_error)?;
            let status = resp.status().as_u16();
            let mut body = Zeroizing::new(Vec::new());
            while let Some(chunk) = resp.chunk().await.map_err(request_error)? {
                if body.len() + chunk.len() > max_body {
                    return Err(UpstreamError::TooLarge(max_body));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Answer { status, body })
        };
        // reqwest's own timeout covers the whole call; this one also bounds what it does not
        // see (a stuck resolver thread).
        tokio::time::timeout(self.timeout + Duration::from_secs(1), call)
            .await
            .unwrap_or(Err(UpstreamError::Timeout(self.timeout)))
    }

    /// POSTs `body` as JSON to `url` (a notification: the answer's body is not read beyond
    /// 64 KiB); returns the HTTP status.
    pub async fn post_json(&self, url: &Url, body: &Value) -> Result<u16, UpstreamError> {
        let call = async {
            let resp = self
                .client
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await
                .map_err(request_error)?;
            Ok(resp.status().as_u16())
        };
        tokio::time::timeout(self.timeout + Duration::from_secs(1), call)
            .await
            .unwrap_or(Err(UpstreamError::Timeout(self.timeout)))
    }

    /// Sends every revocation at once; returns their outcomes in the same order.
    pub async fn revoke_all(&self, revocations: Vec<Revocation>) -> Vec<Revoked> {
        futures_util::future::join_all(revocations.into_iter().map(|r| self.revoke(r))).await
    }

    /// Sends one revocation.
    pub async fn revoke(&self, r: Revocation) -> Revoked {
        let result = self
            .send(&r.method, &r.url, &r.headers, r.form.as_ref(), 64 * 1024)
            .await;
        let (status, error) = match result {
            Ok(a) if (200..300).contains(&a.status) => (Some(a.status), None),
            Ok(a) => (
                Some(a.status),
                Some(format!("the revocation endpoint answered {}", a.status)),
            ),
            Err(e) => (None, Some(e.to_string())),
        };
        Revoked {
            credential: r.credential,
            host: r.url.host_str().unwrap_or_default().to_string(),
            method: r.method,
            status,
            error,
        }
    }
}

fn request_error(e: reqwest::Error) -> UpstreamError {
    if e.is_timeout() {
        return UpstreamError::Request("no answer within upstream.timeout".into());
    }
    // The URL is left out: a form or query may hold a value. The source chain says why (refused
    // connection, certificate not trusted…).
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    UpstreamError::Request(text)
}

/// A revocation the supervisor sends at session end, built from the vault before it is purged.
/// Its values are zeroized when it is dropped.
pub struct Revocation {
    /// The credential's id.
    pub credential: String,
    /// Where it goes.
    pub url: Url,
    /// `POST`, `DELETE`…
    pub method: String,
    /// Headers: the credential's (and its access token's), and its cookies for `url`.
    pub headers: Vec<(String, Zeroizing<String>)>,
    /// The form body, placeholders filled.
    pub form: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocation")
            .field("credential", &self.credential)
            .field("host", &self.url.host_str())
            .field("method", &self.method)
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("form", &self.form.is_some())
            .finish()
    }
}

/// What became of a [`Revocation`].
#[derive(Clone, Debug)]
pub struct Revoked {
    /// The credential's id.
    pub credential: String,
    /// The host it went to.
    pub host: String,
    /// The method.
    pub method: String,
    /// The HTTP status, when an answer came.
    pub status: Option<u16>,
    /// Why it failed; `None` on a 2xx answer.
    pub error: Option<String>,
}

impl Revoked {
    /// A revocation that could not even be sent.
    pub fn not_sent(r: &Revocation, why: &str) -> Revoked {
        Revoked {
            credential: r.credential.clone(),
            host: r.url.host_str().unwrap_or_default().to_string(),
            method: r.method.clone(),
            status: None,
            error: Some(why.to_string()),
        }
    }

    /// Whether the endpoint accepted it (a 2xx answer).
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// The fields of its `credential.revoked_upstream` audit record.
    pub fn audit_fields(&self) -> Value {
        let mut v = json!({
            "credential": self.credential,
            "host": self.host,
            "method": self.method,
            "status": self.status,
            "outcome": if self.ok() { "ok" } else { "failed" },
        });
        if let Some(e) = &self.error {
            v["error"] = e.clone().into();
        }
        v
    }
}
