//! Mutual TLS on the agent endpoint (`[tls] client_auth`), against the real supervisor and
//! Chromium: what the handshake admits. Which certificate may use which session (the mandate's
//! pin) is checked by the endpoint, after the handshake.

mod common;

use common::*;

/// A supervisor whose agent endpoint serves TLS with a fresh self-signed certificate and asks
/// for client certificates as `client_auth` says; returns it, the certificate (PEM) to trust,
/// and the directory holding the certificate and key files (removed when dropped).
fn tls_supervisor(client_auth: &str) -> (Supervisor, String, tempfile::TempDir) {
    let server =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let ca = server.cert.pem();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, &ca).unwrap();
    std::fs::write(&key_file, server.signing_key.serialize_pem()).unwrap();
    let sup = Supervisor::start_with_config(&format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_auth = \"{client_auth}\"\n",
        cert_file.display(),
        key_file.display()
    ));
    (sup, ca, dir)
}

#[test]
fn mtls_required_refuses_agents_without_a_client_certificate_at_the_handshake() {
    let (sup, ca, _files) = tls_supervisor("required");
    let s = sup.session(&mandate(60, &["site.test"]));
    let cdp_url = s["cdp_url"].as_str().unwrap().to_string();
    let version_url = format!("{}/json/version", s["http_url"].as_str().unwrap());
    let (cert, key, fingerprint) = make_client_cert("agent-1");
    let der = rustls_pemfile::certs(&mut cert.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(fingerprint, chaperone::tls::sha256_hex(&der));
    let client = Some((cert.as_bytes(), key.as_bytes()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The refusal itself, read without sending anything so that nothing can race it.
        for url in [&version_url, &cdp_url] {
            let e = tls_refusal_without_certificate(url, ca.as_bytes())
                .await
                .unwrap_err();
            assert!(e.contains("CertificateRequired"), "{url}: {e}");
        }
        // What an agent without a certificate gets: no answer and no websocket. (Which error
        // its client reports depends on when it reads; the reason is asserted above.)
        https_get(&version_url, ca.as_bytes(), None)
            .await
            .unwrap_err();
        connect_tls_ws(&cdp_url, ca.as_bytes(), None)
            .await
            .err()
            .unwrap();

        let (status, v) = https_get(&version_url, ca.as_bytes(), client)
            .await
            .unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["webSocketDebuggerUrl"], cdp_url, "{v}");
        let mut cdp = connect_tls_ws(&cdp_url, ca.as_bytes(), client)
            .await
            .unwrap();
        let reply = cdp
            .call("Browser.getVersion", serde_json::json!({}), None)
            .await;
        let product = reply["result"]["product"].as_str().unwrap_or_default();
        assert!(product.contains("Chrome"), "{reply}");
    });
}

/// A session pinned to client certificates (`identity.client_cert_sha256`): the endpoint
/// admits only those, and a resume ticket an agent got over CDP is bound to the certificate it
/// proved (AG-374 8.6, another identity).
#[test]
fn ag374_8_6_the_certificate_pin_binds_the_session_and_its_tickets() {
    // Optional at the handshake, so a connection without a certificate reaches the endpoint
    // and the session's own pin refuses it.
    let (sup, ca, _files) = tls_supervisor("optional");
    let (a_cert, a_key, a_fp) = make_client_cert("agent-a");
    let (b_cert, b_key, b_fp) = make_client_cert("agent-b");
    let (c_cert, c_key, _) = make_client_cert("stranger");
    let mut m = mandate(600, &["site.test"]);
    m["identity"] = serde_json::json!({"client_cert_sha256": [a_fp, b_fp]});
    let s = sup.session(&m);
    let id = s["id"].as_str().unwrap().to_string();
    let cdp_url = s["cdp_url"].as_str().unwrap().to_string();
    let version_url = format!("{}/json/version", s["http_url"].as_str().unwrap());
    let a = Some((a_cert.as_bytes(), a_key.as_bytes()));
    let b = Some((b_cert.as_bytes(), b_key.as_bytes()));
    let c = Some((c_cert.as_bytes(), c_key.as_bytes()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for client in [None, c] {
            let (status, v) = https_get(&version_url, ca.as_bytes(), client)
                .await
                .unwrap();
            assert_eq!(status, 403, "{v}");
            let e = connect_tls_ws(&cdp_url, ca.as_bytes(), client)
                .await
                .err()
                .expect("refused");
            assert!(e.contains("403"), "{e}");
        }
        let (status, _) = https_get(&version_url, ca.as_bytes(), a).await.unwrap();
        assert_eq!(status, 200);
        let mut cdp = connect_tls_ws(&cdp_url, ca.as_bytes(), a).await.unwrap();
        let t = cdp
            .call("Chaperone.getResumeTicket", serde_json::json!({}), None)
            .await;
        let resume = t["result"]["resumeUrl"]
            .as_str()
            .expect("a ticket")
            .to_string();
        cdp.abort();
        sup.wait_audit("session.detached", |r| {
            r["event"] == "session.detached" && r["session"] == id.as_str()
        });
        // The other pinned certificate may drive the session, but not with A's ticket.
        let e = connect_tls_ws(&resume, ca.as_bytes(), b)
            .await
            .err()
            .expect("refused");
        assert!(e.contains("403"), "{e}");
        let mut again = connect_tls_ws(&resume, ca.as_bytes(), a).await.unwrap();
        let v = again
            .call("Browser.getVersion", serde_json::json!({}), None)
            .await;
        assert!(v.get("result").is_some(), "{v}");
    });
    let records: Vec<serde_json::Value> = sup
        .audit_records()
        .into_iter()
        .filter(|r| r["session"] == id.as_str())
        .collect();
    let reasons: Vec<&str> = records
        .iter()
        .filter(|r| r["event"] == "agent.refused" || r["event"] == "session.resume_refused")
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "client_certificate_missing",
            "client_certificate_missing",
            "client_certificate_mismatch",
            "client_certificate_mismatch",
            "foreign_identity"
        ]
    );
    // Every record of the session names its identity.
    for r in &records {
        assert_eq!(r["identity"]["client_cert_sha256"][0], a_fp.as_str(), "{r}");
    }

    // A supervisor that does not ask for certificates refuses to bind a session to one.
    let plain = Supervisor::start();
    let (status, body) = plain.api("POST", "/v1/sessions", Some(&m.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("identity.client_cert_sha256"),
        "{body}"
    );
}
