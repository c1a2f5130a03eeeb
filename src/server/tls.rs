//! TLS (rustls) for wss:// and https:// on the main port.
//!
//! Enabled by `RUSTY_SOCKS_TLS_CERT` and `RUSTY_SOCKS_TLS_KEY` (PEM files). A file that is
//! missing, unreadable or holds no usable certificate or key stops startup with a message
//! naming the setting and the file.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// The certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct TlsError {
    /// The setting at fault.
    pub var: &'static str,
    /// What went wrong, naming the file.
    pub reason: String,
}

/// Builds the acceptor from the two PEM files.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let cert_err = |reason: String| TlsError {
        var: "RUSTY_SOCKS_TLS_CERT",
        reason,
    };
    let key_err = |reason: String| TlsError {
        var: "RUSTY_SOCKS_TLS_KEY",
        reason,
    };
    let pem = std::fs::read(cert)
        .map_err(|e| cert_err(format!("cannot read {}: {e}", cert.display())))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(format!("{} is not PEM: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(cert_err(format!("{} holds no certificate", cert.display())));
    }
    let pem =
        std::fs::read(key).map_err(|e| key_err(format!("cannot read {}: {e}", key.display())))?;
    let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        key_err(format!(
            "{} holds no usable private key: {e}",
            key.display()
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| key_err(format!("does not match the certificate: {e}")))?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
