//! Mutual TLS on the agent endpoint (`[tls] client_auth`), against the real supervisor and
//! Chromium: what the handshake admits. Which certificate may use which session (the mandate's
//! pin) is checked by the endpoint, after the handshake.

mod common;

use common::*;

#[test]
fn mtls_required_refuses_agents_without_a_client_certificate_at_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let ca = server.cert.pem();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, &ca).unwrap();
    std::fs::write(&key_file, server.signing_key.serialize_pem()).unwrap();
    let sup = Supervisor::start_with_config(&format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_auth = \"required\"\n",
        cert_file.display(),
        key_file.display()
    ));
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
        let e = https_get(&version_url, ca.as_bytes(), None)
            .await
            .unwrap_err();
        assert!(e.contains("CertificateRequired"), "{e}");
        let e = connect_tls_ws(&cdp_url, ca.as_bytes(), None)
            .await
            .err()
            .unwrap();
        assert!(e.contains("CertificateRequired"), "{e}");

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
