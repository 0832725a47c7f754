//! `tether once`: one sync round without a daemon, for timers and scripts:
//! for each database, connect, download everything, upload everything,
//! close, and report.

use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::Daemon;
use crate::config::DaemonConfig;
use crate::proto::UploadSummary;
use crate::session::ConnectionState;

/// The outcome of one database's round.
#[derive(Clone, Debug, Serialize)]
pub struct OnceResult {
    pub db: String,
    /// None when the round succeeded.
    pub error: Option<String>,
    pub downloaded: u64,
    pub uploaded: u64,
    pub last_upload: Option<UploadSummary>,
    /// Local writes still pending at the end (0 on success).
    pub pending: u64,
}

/// Runs one round for the databases named in `only` (all when empty).
pub async fn once(
    mut cfg: DaemonConfig,
    only: &[String],
    timeout: Duration,
) -> Result<Vec<OnceResult>, String> {
    for name in only {
        if !cfg.databases.iter().any(|d| &d.name == name) {
            return Err(super::unknown_db(
                name,
                cfg.databases.iter().map(|d| d.name.as_str()),
            ));
        }
    }
    if !only.is_empty() {
        cfg.databases.retain(|d| only.contains(&d.name));
    }
    let shutdown = CancellationToken::new();
    let daemon = Daemon::start_one_round(&cfg, shutdown.clone());
    let deadline = tokio::time::Instant::now() + timeout;
    let mut results = Vec::new();
    for h in &daemon.handles() {
        let mut rx = h.status.clone();
        let start = rx.borrow().clone();
        let mut result = OnceResult {
            db: h.name.clone(),
            error: None,
            downloaded: 0,
            uploaded: 0,
            last_upload: None,
            pending: 0,
        };
        // Download: connected and caught up with the hub.
        let mut target: Option<u64> = None;
        let outcome = tokio::time::timeout_at(deadline, async {
            loop {
                let s = rx.borrow_and_update().clone();
                if let Some(why) = s.failure() {
                    return Err(why);
                }
                if s.connection == ConnectionState::Connected && s.caught_up {
                    // Upload: everything captured when the round started.
                    if target.is_none() {
                        let Some(local) = h.local.get() else {
                            continue;
                        };
                        let p = local
                            .call(|r| r.pending())
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| e.to_string())?;
                        target = Some(p.last_seq);
                    }
                    // Done once the session reports the log answered up to
                    // the target (its status and counters move together).
                    if let Some(t) = target {
                        if s.consumed >= t {
                            return Ok(s.pending_changes);
                        }
                    }
                }
                if rx.changed().await.is_err() {
                    return Err("session stopped".to_owned());
                }
            }
        })
        .await;
        let end = h.status.borrow().clone();
        result.downloaded = end.downloaded - start.downloaded;
        result.uploaded = end.uploaded - start.uploaded;
        result.last_upload = end.last_upload.clone();
        match outcome {
            Ok(Ok(pending)) => result.pending = pending,
            Ok(Err(why)) => result.error = Some(why),
            Err(_) => {
                result.error = Some(format!(
                    "not done within {timeout:?}: {}",
                    end.last_error
                        .clone()
                        .unwrap_or_else(|| "still transferring".into())
                ))
            }
        }
        results.push(result);
    }
    shutdown.cancel();
    daemon.wait().await;
    Ok(results)
}
