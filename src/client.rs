//! A small client for the control API, used by `chaperone session …`.

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

use crate::config::ControlAddr;

/// Sends one request to the control API; returns the status and the JSON body.
pub async fn request(
    addr: &ControlAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))?;
    let resp = match addr {
        ControlAddr::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p).await.with_context(|| {
                format!(
                    "cannot reach the control API at unix:{} (is `chaperone serve` running?)",
                    p.display()
                )
            })?;
            send(TokioIo::new(s), req).await?
        }
        ControlAddr::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a)
                .await
                .with_context(|| format!("cannot reach the control API at {a}"))?;
            send(TokioIo::new(s), req).await?
        }
    };
    Ok(resp)
}

async fn send<T>(
    io: T,
    req: Request<Full<bytes::Bytes>>,
) -> anyhow::Result<(u16, serde_json::Value)>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    let value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or_else(
            |_| serde_json::json!({ "error": String::from_utf8_lossy(&body).to_string() }),
        )
    };
    Ok((status, value))
}
