//! TLS for `wss://`, on both ends, with rustls and an explicit crypto
//! provider (ring).
//!
//! The provider is passed to every config built here instead of relying on a
//! process-wide default: rustls 0.23 panics when no default is installed and
//! more than one (or none) is compiled in, and a panic in a session task is
//! a session that silently never connects.
//!
//! The daemon verifies the hub with the system's roots (`/etc/ssl/certs` and
//! the like), or only with the certificates of `ca_file` when one is given
//! (a private CA or a self-signed hub). The hub serves `tls_cert` and
//! `tls_key` from `hub.toml`, read again on reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why TLS cannot be set up; each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {message}")]
    File {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("no trusted root certificates: the system store is empty or unreadable ({0}); set `ca_file` under [hub] to the CA that signed the hub's certificate")]
    NoRoots(String),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::File {
        what,
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot be read: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            "holds no certificate (expected PEM blocks `-----BEGIN CERTIFICATE-----`)".into(),
        ));
    }
    Ok(certs)
}

/// The daemon's TLS config: system roots, or only `ca_file`'s certificates.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for c in certs("hub.ca_file", path)? {
                roots.add(c).map_err(|e| TlsError::File {
                    what: "hub.ca_file",
                    path: path.to_owned(),
                    message: format!("holds a certificate rustls cannot use: {e}"),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (_, rejected) = roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| format!("{rejected} unusable certificates"));
                return Err(TlsError::NoRoots(why));
            }
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The hub's TLS config from its certificate chain and private key (PEM).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs("tls_cert", cert)?;
    let bytes = std::fs::read(key).map_err(|e| TlsError::File {
        what: "tls_key",
        path: key.to_owned(),
        message: format!("cannot be read: {e}"),
    })?;
    let key_der = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::File {
        what: "tls_key",
        path: key.to_owned(),
        message: format!("holds no usable private key (PEM, PKCS#8, PKCS#1 or SEC1): {e}"),
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::File {
            what: "tls_key",
            path: key.to_owned(),
            message: format!("does not match the certificate of tls_cert: {e}"),
        })?;
    Ok(Arc::new(config))
}

/// Whether a URL host is this machine (plain `ws://` is fine there).
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised() {
        for h in [
            "127.0.0.1",
            "127.3.2.1",
            "::1",
            "[::1]",
            "localhost",
            "LOCALHOST",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["10.0.0.1", "hub.example.org", "::2", "0.0.0.0"] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn bad_files_are_named_with_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = client_config(Some(&missing)).unwrap_err().to_string();
        assert!(
            e.contains("hub.ca_file") && e.contains("missing.pem") && e.contains("cannot be read"),
            "{e}"
        );
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let e = client_config(Some(&garbage)).unwrap_err().to_string();
        assert!(e.contains("holds no certificate"), "{e}");
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, other.key_pair.serialize_pem()).unwrap();
        let e = server_config(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        server_config(&cert, &key).unwrap();
        client_config(Some(&cert)).unwrap();
    }
}
