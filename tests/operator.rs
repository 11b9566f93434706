//! What operators touch: `audit verify` on a real log and on tampered copies, `doctor`, the
//! TCP control API with its token, `wss://` for agents, and a host that lacks sandbox layers
//! (an unprivileged supervisor: no cgroups, no per-session uids).

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use serde_json::json;

fn verify(path: &std::path::Path) -> (i32, String) {
    let out = Command::new(bin())
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn ag120_4_6_audit_verify_passes_on_a_real_log_and_names_tampered_records() {
    let mut sup = Supervisor::start();
    let s = sup.session(&mandate(300, &["site.test"]));
    let (status, _) = sup.api(
        "DELETE",
        &format!("/v1/sessions/{}", s["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(status, 200);
    assert!(sup.stop().success());
    let (code, out) = verify(&sup.audit);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("chain intact"), "{out}");

    let lines: Vec<String> = std::fs::read_to_string(&sup.audit)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(lines.len() >= 6, "{lines:?}");
    let tampered = sup.dir.path().join("tampered.jsonl");
    let write = |l: &[String]| std::fs::write(&tampered, l.join("\n") + "\n").unwrap();

    // Edit: the revocation now claims another reason.
    let mut edited = lines.clone();
    let i = edited
        .iter()
        .position(|l| l.contains("session.revoked"))
        .unwrap();
    edited[i] = edited[i].replace("session.revoked", "session.expired");
    write(&edited);
    let (code, out) = verify(&tampered);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("line {}", i + 1)) && out.contains("edited"),
        "{out}"
    );

    // Delete the record in the middle.
    let mut deleted = lines.clone();
    deleted.remove(2);
    write(&deleted);
    let (code, out) = verify(&tampered);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("line 3"), "{out}");

    // Reorder two records.
    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    write(&swapped);
    let (code, out) = verify(&tampered);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("line 4"), "{out}");
}

#[test]
fn doctor_reports_every_layer_and_chromium() {
    let out = Command::new(bin()).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "landlock ABI",
        "user_ns",
        "net_ns",
        "cgroup",
        "per_session_uid",
        "chromium:",
        "verdict:",
    ] {
        assert!(
            text.contains(needle),
            "doctor output lacks {needle}:\n{text}"
        );
    }
    assert!(text.contains("Chromium 1"), "{text}");
    // As root on this host every layer is there.
    if nix::unistd::geteuid().is_root() {
        assert_eq!(out.status.code(), Some(0), "{text}");
        assert!(!text.contains("MISSING"), "{text}");
    }
}

#[test]
fn tcp_control_api_needs_the_operator_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "operator-token-0123456789abcdef\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sup = Supervisor::start_with_config(&format!(
        "control = \"127.0.0.1:{port}\"\ncontrol_token_file = \"{}\"\n",
        token_file.display()
    ));
    let addr = chaperone::config::ControlAddr::Tcp(([127, 0, 0, 1], port).into());
    let call = |token: Option<&str>, method: &str, path: &str, body: Option<String>| {
        control_api(&addr, token, method, path, body.as_deref())
    };
    let (st, body) = call(None, "GET", "/v1/sessions", None);
    assert_eq!(st, 401, "{body}");
    let (st, _) = call(
        Some("wrong-token-0123456789abcdef"),
        "GET",
        "/healthz",
        None,
    );
    assert_eq!(st, 401);
    let (st, body) = call(
        None,
        "POST",
        "/v1/sessions",
        Some(mandate(60, &["site.test"]).to_string()),
    );
    assert_eq!(st, 401, "{body}");
    assert!(
        chromium_under(sup.pid()).is_empty(),
        "an unauthenticated request launched Chromium"
    );
    let (st, body) = call(
        Some("operator-token-0123456789abcdef"),
        "GET",
        "/healthz",
        None,
    );
    assert_eq!(st, 200, "{body}");
    // A change made over TCP is recorded with the address it came from and the token shown.
    let token = Some("operator-token-0123456789abcdef");
    let m = mandate(60, &["site.test"]).to_string();
    let (st, created) = call(token, "POST", "/v1/sessions", Some(m));
    assert_eq!(st, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let path = format!("/v1/sessions/{id}");
    let (st, body) = call(token, "PATCH", &path, Some(r#"{"ttl_secs": 30}"#.into()));
    assert_eq!(st, 200, "{body}");
    let narrowed = sup.wait_audit("mandate.narrowed", |r| r["event"] == "mandate.narrowed");
    let caller = &narrowed["caller"];
    assert_eq!(
        (&caller["transport"], &caller["token"]),
        (&json!("tcp"), &json!(true)),
        "{narrowed}"
    );
    assert!(
        caller["addr"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{narrowed}"
    );
    // The CLI speaks the same protocol.
    let out = Command::new(bin())
        .args([
            "session",
            "list",
            "--control",
            &format!("127.0.0.1:{port}"),
            "--token-file",
        ])
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"sessions\""));
}

#[test]
fn session_cli_starts_shows_and_revokes() {
    let sup = Supervisor::start();
    let control = format!("unix:{}", sup.control.display());
    let cli = |args: &[&str]| {
        let out = Command::new(bin())
            .arg("session")
            .args(args)
            .args(["--control", &control])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code(), v)
    };
    let profile = repo().join("profiles/ci.toml");
    let (code, started) = cli(&["start", "--profile", profile.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{started}");
    assert_eq!(started["state"], "active");
    assert_eq!(started["agent"], "ci");
    let id = started["id"].as_str().unwrap();
    let (code, shown) = cli(&["show", id]);
    assert_eq!((code, &shown["id"]), (Some(0), &started["id"]));
    // Narrowing goes through; a widening without approval is refused; with it, it is in force.
    let (code, narrowed) = cli(&["change", id, "--json", "{\"idle_timeout_secs\": 600}"]);
    assert_eq!(code, Some(0), "{narrowed}");
    assert_eq!(narrowed["idle_timeout_secs"], 600);
    let (code, refused) = cli(&["change", id, "--json", "{\"idle_timeout_secs\": null}"]);
    assert_eq!(code, Some(1), "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .starts_with("approved_by:"),
        "{refused}"
    );
    let (code, widened) = cli(&[
        "change",
        id,
        "--json",
        "{\"idle_timeout_secs\": null}",
        "--approved-by",
        "ops",
    ]);
    assert_eq!(code, Some(0), "{widened}");
    assert_eq!(widened["changes"][0]["widened"], true);
    let (code, ticket) = cli(&["ticket", id]);
    assert_eq!(code, Some(0), "{ticket}");
    assert!(ticket["ticket"].as_str().unwrap().starts_with("chpr1."));
    assert!(ticket["cdp_url"]
        .as_str()
        .unwrap()
        .contains("?ticket=chpr1."));
    let (code, revoked) = cli(&["revoke", id]);
    assert_eq!(code, Some(0));
    assert_eq!(revoked["state"], "purged");
    let (code, missing) = cli(&["show", "no-such-session"]);
    assert_eq!(code, Some(1));
    assert!(missing["error"]
        .as_str()
        .unwrap()
        .contains("no-such-session"));
    let (code, bad) = cli(&[
        "start",
        "--mandate-json",
        "{\"agent\":\"x\",\"ttl_secs\":0}",
    ]);
    assert_eq!(code, Some(1));
    assert!(bad["error"].as_str().unwrap().contains("ttl_secs"), "{bad}");
}

#[test]
fn agent_key_cli_issues_lists_and_revokes() {
    let sup = Supervisor::start();
    let control = format!("unix:{}", sup.control.display());
    let cli = |args: &[&str]| {
        let out = Command::new(bin())
            .arg("agent-key")
            .args(args)
            .args(["--control", &control])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code(), v)
    };
    let (code, issued) = cli(&["issue", "--label", "nightly crawler"]);
    assert_eq!(code, Some(0), "{issued}");
    let id = issued["id"].as_str().unwrap().to_string();
    let key = issued["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("chak_"), "{issued}");
    let (code, list) = cli(&["list"]);
    assert_eq!(code, Some(0));
    assert_eq!(list["keys"][0]["id"], id.as_str());
    assert_eq!(list["keys"][0]["label"], "nightly crawler");
    assert!(!list.to_string().contains(&key), "the list shows a key");
    let (code, revoked) = cli(&["revoke", &id]);
    assert_eq!(code, Some(0), "{revoked}");
    assert!(revoked["revoked_at"].is_string());
    let (code, missing) = cli(&["revoke", "ak_00000000"]);
    assert_eq!(code, Some(1));
    assert!(missing["error"].as_str().unwrap().contains("ak_00000000"));
    let issued_rec = sup.events("agent_key.issued");
    assert_eq!(issued_rec[0]["agent_key"], id.as_str());
    assert_eq!(sup.events("agent_key.revoked")[0]["agent_key"], id.as_str());
    assert!(!std::fs::read_to_string(&sup.audit).unwrap().contains(&key));
}

#[test]
fn agents_connect_over_wss_when_given_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    std::fs::write(dir.path().join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key_pem).unwrap();
    let sup = Supervisor::start_with_config(&format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    ));
    let s = sup.session(&mandate(60, &["site.test"]));
    let url = s["cdp_url"].as_str().unwrap().to_string();
    assert!(url.starts_with("wss://"), "{url}");
    assert!(s["http_url"].as_str().unwrap().starts_with("https://"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let product = rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(sup.listen).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the agent endpoint");
        let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tls)
            .await
            .expect("websocket over TLS");
        use futures_util::{SinkExt, StreamExt};
        ws.send(tokio_tungstenite::tungstenite::Message::text(
            json!({"id": 1, "method": "Browser.getVersion"}).to_string(),
        ))
        .await
        .unwrap();
        let reply = ws.next().await.unwrap().unwrap().into_text().unwrap();
        let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
        v["result"]["product"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    });
    assert!(product.contains("Chrome"), "{product}");
    // Plain ws:// to a TLS endpoint does not get a browser.
    let plain = rt.block_on(tokio_tungstenite::connect_async(
        url.replace("wss://", "ws://"),
    ));
    assert!(plain.is_err());
}

/// Runs `chaperone serve` as the unprivileged user `nobody`: no cgroups, no per-session
/// uids. Sessions are refused naming the missing layers, unless the config accepts them.
#[test]
fn missing_layers_refuse_sessions_unless_accepted_and_then_say_so() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("needs root to switch to nobody; skipped");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("chaperone-nobody-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let start = |accept: &str| {
        let cfg = dir.path().join(format!("cfg{}.toml", accept.len()));
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\ncontrol = \"unix:{d}/c{n}.sock\"\naudit_log = \"{d}/audit{n}.jsonl\"\n[sandbox]\naccept_degraded = [{accept}]\n",
                d = dir.path().display(),
                n = accept.len()
            ),
        )
        .unwrap();
        let mut child = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(bin())
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(
            line.contains("ready"),
            "supervisor as nobody did not start: {line}"
        );
        (child, dir.path().join(format!("c{}.sock", accept.len())))
    };
    let api = |sock: &std::path::Path, method: &str, path: &str, body: Option<String>| {
        let addr = chaperone::config::ControlAddr::Unix(sock.to_path_buf());
        control_api(&addr, None, method, path, body.as_deref())
    };
    let (mut strict, sock) = start("");
    let (st, body) = api(
        &sock,
        "POST",
        "/v1/sessions",
        Some(mandate(60, &["site.test"]).to_string()),
    );
    assert_eq!(st, 500, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("cgroup") || msg.contains("per_session_uid"),
        "{msg}"
    );
    assert!(chromium_under(strict.id() as i32).is_empty());
    let _ = strict.kill();
    let _ = strict.wait();

    let (mut lenient, sock) = start("\"cgroup\", \"per_session_uid\"");
    let (st, body) = api(
        &sock,
        "POST",
        "/v1/sessions",
        Some(mandate(60, &["site.test"]).to_string()),
    );
    assert_eq!(st, 201, "{body}");
    let degraded: Vec<&str> = body["degraded"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        degraded.contains(&"per_session_uid") && degraded.contains(&"cgroup"),
        "{body}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = Cdp::connect(body["cdp_url"].as_str().unwrap()).await;
        let v = c.call("Browser.getVersion", json!({}), None).await;
        assert!(v["result"]["product"].is_string());
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lenient.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = lenient.wait();
}

#[test]
fn a_failed_launch_is_reported_by_step_and_leaves_nothing() {
    let sup =
        Supervisor::start_with_config("[browser]\npath = \"/usr/lib/chromium/no-such-chromium\"\n");
    let (status, body) = sup.api(
        "POST",
        "/v1/sessions",
        Some(&mandate(60, &["site.test"]).to_string()),
    );
    assert_eq!(status, 500, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("launch failed") && msg.contains("no-such-chromium"),
        "{msg}"
    );
    let events: Vec<String> = sup
        .audit_records()
        .iter()
        .filter(|r| !r["session"].is_null())
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        events,
        ["session.created", "session.crashed", "session.purged"]
    );
    assert!(descendants(sup.pid()).iter().all(|p| !alive(*p)));
    let (_, list) = sup.api("GET", "/v1/sessions", None);
    assert_eq!(list["sessions"][0]["state"], "purged", "{list}");
}

#[test]
fn the_session_limit_is_enforced_and_named() {
    let sup = Supervisor::start_with_config("[limits]\nmax_sessions = 1\n");
    let first = sup.session(&mandate(60, &["site.test"]));
    let before = chromium_under(sup.pid()).len();
    let (status, body) = sup.api(
        "POST",
        "/v1/sessions",
        Some(&mandate(60, &["site.test"]).to_string()),
    );
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("limits.max_sessions"),
        "{body}"
    );
    assert_eq!(
        chromium_under(sup.pid()).len(),
        before,
        "a refused session launched Chromium"
    );
    // Once the first is revoked, there is room again.
    let (status, _) = sup.api(
        "DELETE",
        &format!("/v1/sessions/{}", first["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(status, 200);
    let second = sup.session(&mandate(60, &["site.test"]));
    assert_eq!(second["state"], "active");
}
