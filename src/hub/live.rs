//! The part of `hub.toml` that a reload replaces while the hub runs: the
//! datasets, the tokens and the TLS certificate.
//!
//! The hub holds one [`Live`] behind a lock and hands out clones of its
//! `Arc`: a connection takes the current one when it needs it (token check,
//! `hello` checks, TLS handshake) and keeps using it for that step, while a
//! reload swaps in a new one for the connections that come after.

use std::collections::{HashMap, HashSet};

use super::auth::Tokens;
use crate::config::HubConfig;
use crate::proto::{Access, ErrorCode};
use crate::tls::TlsError;

/// Datasets, tokens and TLS as of the last (re)load.
pub struct Live {
    /// Declared tables per dataset.
    pub datasets: HashMap<String, HashSet<String>>,
    pub tokens: Tokens,
    /// TLS for every new connection, when the hub has a certificate.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The file these came from: the next reload compares against it, and
    /// `tether hub tokens` lists its tokens.
    pub config: HubConfig,
}

impl Live {
    /// Builds the live part of `cfg`, reading the TLS certificate and key.
    pub fn new(cfg: &HubConfig) -> Result<Live, TlsError> {
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
                crate::tls::server_config(cert, key)?,
            )),
            _ => None,
        };
        Ok(Live {
            datasets: cfg
                .datasets
                .iter()
                .map(|d| (d.name.clone(), d.tables.iter().cloned().collect()))
                .collect(),
            tokens: Tokens::new(&cfg.tokens),
            tls,
            config: cfg.clone(),
        })
    }

    /// Whether a session opened with these properties may go on under this
    /// config; if not, the error code and message it is closed with.
    pub fn verdict(
        &self,
        token_sha256: &str,
        token_name: &str,
        access: Access,
        dataset: &str,
        tables: &[String],
    ) -> Result<(), (ErrorCode, String)> {
        let Some(grant) = self.tokens.by_hash(token_sha256) else {
            return Err((
                ErrorCode::Unauthorized,
                format!("token {token_name:?} was revoked: hub.toml no longer lists it (the hub reloaded its config); give this device a valid token"),
            ));
        };
        let Some(declared) = self.datasets.get(dataset) else {
            return Err((
                ErrorCode::UnknownDataset,
                format!("dataset {dataset:?} was removed from hub.toml (the hub reloaded its config); add it back or fix `dataset` in tether.toml"),
            ));
        };
        if !grant.allows(dataset) {
            return Err((
                ErrorCode::Forbidden,
                format!("token {:?} no longer allows dataset {dataset:?} (the hub reloaded its config); give this device a token for it", grant.name),
            ));
        }
        if access == Access::ReadWrite && grant.access == Access::ReadOnly {
            return Err((
                ErrorCode::Forbidden,
                format!("token {:?} is now read_only (the hub reloaded its config): this connection was closed; the next one downloads only", grant.name),
            ));
        }
        if let Some(t) = tables.iter().find(|t| !declared.contains(*t)) {
            return Err((
                ErrorCode::UnknownTable,
                format!("table {t:?} was removed from dataset {dataset:?} in hub.toml (the hub reloaded its config); add it back, or remove it from this device's `tables`"),
            ));
        }
        Ok(())
    }
}
