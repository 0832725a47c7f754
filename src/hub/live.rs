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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DatasetConfig, TokenAccess, TokenConfig};

    fn config(access: TokenAccess, datasets: &[&str], tables: &[&str]) -> HubConfig {
        let text = "listen = \"127.0.0.1:0\"\nstore = \"sqlite:/x.db\"\n";
        let mut cfg = HubConfig::from_str(std::path::Path::new("hub.toml"), text).unwrap();
        cfg.datasets = vec![DatasetConfig {
            name: "notes".into(),
            tables: tables.iter().map(|t| t.to_string()).collect(),
        }];
        cfg.tokens = vec![TokenConfig {
            name: "t".into(),
            sha256: "h".into(),
            datasets: datasets.iter().map(|d| d.to_string()).collect(),
            access,
        }];
        cfg
    }

    #[test]
    fn a_session_goes_on_only_while_its_token_dataset_and_tables_allow_it() {
        let rw = TokenAccess::ReadWrite;
        let verdict = |cfg: HubConfig, hash: &str, access: Access| {
            Live::new(&cfg)
                .unwrap()
                .verdict(hash, "t", access, "notes", &["a".into()])
                .map_err(|(code, _)| code)
        };
        let same = config(rw, &["notes"], &["a", "b"]);
        assert_eq!(verdict(same.clone(), "h", Access::ReadWrite), Ok(()));
        assert_eq!(
            verdict(same.clone(), "other", Access::ReadWrite),
            Err(ErrorCode::Unauthorized)
        );
        assert_eq!(
            verdict(config(rw, &["*"], &["a"]), "h", Access::ReadWrite),
            Ok(())
        );
        let mut gone = same.clone();
        gone.datasets[0].name = "elsewhere".into();
        gone.tokens[0].datasets = vec!["*".into()];
        assert_eq!(
            verdict(gone, "h", Access::ReadWrite),
            Err(ErrorCode::UnknownDataset)
        );
        let mut narrowed = same.clone();
        narrowed.datasets.push(DatasetConfig {
            name: "other".into(),
            tables: vec!["a".into()],
        });
        narrowed.tokens[0].datasets = vec!["other".into()];
        assert_eq!(
            verdict(narrowed, "h", Access::ReadWrite),
            Err(ErrorCode::Forbidden)
        );
        let ro = config(TokenAccess::ReadOnly, &["notes"], &["a"]);
        assert_eq!(
            verdict(ro.clone(), "h", Access::ReadWrite),
            Err(ErrorCode::Forbidden)
        );
        assert_eq!(
            verdict(ro, "h", Access::ReadOnly),
            Ok(()),
            "already read-only"
        );
        // Widened to read_write: the read-only session goes on as it is.
        assert_eq!(verdict(same, "h", Access::ReadOnly), Ok(()));
        assert_eq!(
            verdict(config(rw, &["notes"], &["b"]), "h", Access::ReadWrite),
            Err(ErrorCode::UnknownTable)
        );
    }
}
