//! Whom sluice trusts for the upstream's TLS: `upstream.tls_roots` — Mozilla's roots built in
//! (webpki-roots, the default: the same on every host and in a scratch container), the system's store
//! (rustls-native-certs, read once at start: what a company installs its TLS-inspecting proxy's CA
//! into), or both — plus the PEM roots of `upstream.ca_file`. Certificates are always verified; there
//! is no switch to turn that off.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use super::BuildError;
use crate::config::{TlsRoots, UpstreamConfig};

/// The rustls client configuration for the upstream (ALPN is left to the connector).
pub fn client_config(config: &UpstreamConfig) -> Result<ClientConfig, BuildError> {
    let mut roots = RootCertStore::empty();
    if matches!(config.tls_roots, TlsRoots::Bundled | TlsRoots::Both) {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if matches!(config.tls_roots, TlsRoots::System | TlsRoots::Both) {
        let system = rustls_native_certs::load_native_certs();
        for err in &system.errors {
            tracing::warn!(error = %err, "a system certificate could not be read (upstream.tls_roots)");
        }
        let (added, ignored) = roots.add_parsable_certificates(system.certs);
        if added == 0 {
            return Err(BuildError::Roots(format!(
                "upstream.tls_roots = {:?} found no usable system certificate ({ignored} unusable); install \
                 ca-certificates, or use \"bundled\"",
                config.tls_roots
            )));
        }
    }
    if let Some(path) = &config.ca_file {
        add_ca_file(&mut roots, path)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Adds every certificate of the PEM file at `path`; a file without one is an error.
fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), BuildError> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| BuildError::Roots(format!("upstream.ca_file {shown}: {err}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| BuildError::Roots(format!("upstream.ca_file {shown}: {err}")))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(BuildError::Roots(format!(
            "upstream.ca_file {shown} holds no usable certificate (expected PEM: -----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_path() {
        let dir = std::env::temp_dir().join(format!("sluice-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let config = UpstreamConfig { ca_file: Some(empty.clone()), ..UpstreamConfig::default() };
        let message = client_config(&config).unwrap_err().to_string();
        assert!(message.contains("upstream.ca_file") && message.contains("empty.pem"), "{message}");
        let missing = UpstreamConfig { ca_file: Some(dir.join("missing.pem")), ..UpstreamConfig::default() };
        let message = client_config(&missing).unwrap_err().to_string();
        assert!(message.contains("missing.pem"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_bundled_roots_are_the_default() {
        assert!(client_config(&UpstreamConfig::default()).is_ok());
    }
}
