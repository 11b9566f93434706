//! Client certificates on the agent endpoint: how they are asked for and verified, and the
//! [`Peer`] every request on the endpoint carries to its handler.
//!
//! Without `tls.client_ca`, the handshake proves only that the client holds the private key of
//! the certificate it presents ([`PinnedClientVerifier`]); which certificate may use a session
//! is the session's mandate's business, which pins it by [`sha256_hex`]. With `tls.client_ca`,
//! rustls' WebPKI verifier also requires a chain to those roots.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::ClientAuth;

/// Who sent a request on the agent endpoint, inserted into the extensions of every request
/// (handlers read it with `Option<axum::Extension<Peer>>`).
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The TCP peer's address (a proxy in front of the supervisor shows up as itself).
    pub addr: Option<SocketAddr>,
    /// Lowercase hex SHA-256 of the DER of the client's leaf certificate, when the client
    /// presented one and the handshake verified it. Fixed for the connection's lifetime:
    /// rustls never renegotiates.
    pub cert_sha256: Option<String>,
}

impl Peer {
    /// The peer of a TLS connection whose handshake has completed.
    pub fn from_tls(addr: SocketAddr, conn: &rustls::ServerConnection) -> Peer {
        Peer {
            addr: Some(addr),
            cert_sha256: conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| sha256_hex(leaf)),
        }
    }
}

/// Lowercase hex SHA-256 of `der`: the form in which mandates pin client certificates. For a
/// PEM file, the same value is `openssl x509 -in cert.pem -outform DER | sha256sum`.
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// A client-certificate setting that cannot be used, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `client_ca` could not be read.
    #[error("tls.client_ca: cannot read {}: {source}", path.display())]
    ReadClientCa {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `client_ca` is not PEM.
    #[error("tls.client_ca: {} is not PEM: {source}", path.display())]
    ClientCaPem {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        source: std::io::Error,
    },
    /// `client_ca` holds no certificate.
    #[error("tls.client_ca: {} holds no certificate (PEM `BEGIN CERTIFICATE` blocks expected)", path.display())]
    NoClientCa {
        /// The file.
        path: PathBuf,
    },
    /// A certificate in `client_ca` cannot serve as a trust anchor.
    #[error("tls.client_ca: certificate {index} in {} cannot be a root: {source}", path.display())]
    ClientCaRoot {
        /// The file.
        path: PathBuf,
        /// 1-based position of the certificate in the file.
        index: usize,
        /// What rustls said.
        source: rustls::Error,
    },
    /// `client_ca` without `client_auth`.
    #[error(
        "tls.client_ca: client certificates are not requested; set tls.client_auth = \
         \"optional\" or \"required\", or remove client_ca"
    )]
    ClientCaWithoutClientAuth,
    /// rustls refused to build the verifier.
    #[error("tls.client_ca: cannot build the client-certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Reads `tls.client_ca` (PEM certificates) as the roots client certificates must chain to.
pub fn read_client_ca(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::ReadClientCa {
        path: path.into(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in rustls_pemfile::certs(&mut pem.as_slice()).enumerate() {
        let der = cert.map_err(|source| TlsError::ClientCaPem {
            path: path.into(),
            source,
        })?;
        roots.add(der).map_err(|source| TlsError::ClientCaRoot {
            path: path.into(),
            index: i + 1,
            source,
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoClientCa { path: path.into() });
    }
    Ok(roots)
}

/// The verifier for `tls.client_auth` and `tls.client_ca`.
pub fn client_verifier(
    auth: ClientAuth,
    client_ca: Option<&Path>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let required = match auth {
        ClientAuth::None if client_ca.is_some() => return Err(TlsError::ClientCaWithoutClientAuth),
        ClientAuth::None => return Ok(WebPkiClientVerifier::no_client_auth()),
        ClientAuth::Optional => false,
        ClientAuth::Required => true,
    };
    let Some(ca) = client_ca else {
        return Ok(Arc::new(PinnedClientVerifier::new(required, provider)));
    };
    let roots = Arc::new(read_client_ca(ca)?);
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let builder = if required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    Ok(builder.build()?)
}

/// Asks for a client certificate and accepts any, provided the client proves in the handshake
/// that it holds the certificate's private key. No chain, name or validity period is checked:
/// the certificate is an identity pinned by its SHA-256 in the mandate (like an SSH key), and
/// the endpoint compares [`Peer::cert_sha256`] with the pin on every request.
#[derive(Debug)]
pub struct PinnedClientVerifier {
    required: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedClientVerifier {
    /// A verifier that fails handshakes without a certificate iff `required`, and checks
    /// handshake signatures with `provider`'s algorithms.
    pub fn new(required: bool, provider: &CryptoProvider) -> PinnedClientVerifier {
        PinnedClientVerifier {
            required,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA to name: clients pick the certificate they were told to use.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The pin in the mandate decides; the signature checks below bind the connection to
        // the holder of this certificate's key, which is what makes the pin mean something.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_is_lowercase_hex_of_the_bytes() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn client_ca_errors_name_the_field_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let e = read_client_ca(&ca).unwrap_err().to_string();
        assert!(e.starts_with("tls.client_ca: cannot read"), "{e}");
        std::fs::write(&ca, "not a certificate").unwrap();
        let e = read_client_ca(&ca).unwrap_err().to_string();
        assert!(
            e.starts_with("tls.client_ca:") && e.contains("no certificate"),
            "{e}"
        );
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = read_client_ca(&ca).unwrap_err().to_string();
        assert!(e.starts_with("tls.client_ca: certificate 1"), "{e}");
        let cert = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        assert_eq!(read_client_ca(&ca).unwrap().len(), 1);
    }

    #[test]
    fn verifier_follows_client_auth() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v = client_verifier(ClientAuth::None, None, &provider).unwrap();
        assert!(!v.offer_client_auth());
        let v = client_verifier(ClientAuth::Optional, None, &provider).unwrap();
        assert!(v.offer_client_auth() && !v.client_auth_mandatory());
        assert!(v.root_hint_subjects().is_empty());
        assert!(!v.supported_verify_schemes().is_empty());
        let v = client_verifier(ClientAuth::Required, None, &provider).unwrap();
        assert!(v.offer_client_auth() && v.client_auth_mandatory());
        let e = client_verifier(ClientAuth::None, Some(Path::new("/x.pem")), &provider)
            .err()
            .unwrap();
        assert!(matches!(e, TlsError::ClientCaWithoutClientAuth), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let v = client_verifier(ClientAuth::Optional, Some(&ca), &provider).unwrap();
        assert!(v.offer_client_auth() && !v.client_auth_mandatory());
        assert_eq!(v.root_hint_subjects().len(), 1);
        let v = client_verifier(ClientAuth::Required, Some(&ca), &provider).unwrap();
        assert!(v.client_auth_mandatory());
    }
}
