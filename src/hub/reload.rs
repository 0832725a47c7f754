//! Reloading `hub.toml` while the hub runs (SIGHUP, `tether hub reload`).
//!
//! The new file is read and validated as a whole, its TLS certificate and
//! key read too; anything wrong refuses the reload and the hub keeps the
//! config it has. Otherwise the new datasets, tokens and certificate replace
//! the old ones for every connection from then on, and each live session is
//! checked against them ([`super::live::Live::verdict`]): one whose token was
//! removed or narrowed (a dataset no longer allowed, read_write turned
//! read_only), or whose dataset or a table of it was removed, is closed with
//! an `error` frame saying why; the others go on untouched. Settings that
//! cannot change under running sessions (listen address, store, limits, ...)
//! are reported as needing a restart and keep their old value.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::live::Live;
use super::HubInner;
use crate::config::{ConfigError, HubConfig, TokenConfig};

/// What a reload did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub tokens_added: Vec<String>,
    pub tokens_removed: Vec<String>,
    /// Same name, another secret, scope or access.
    pub tokens_changed: Vec<String>,
    pub datasets_added: Vec<String>,
    pub datasets_removed: Vec<String>,
    /// Same name, other tables.
    pub datasets_changed: Vec<String>,
    /// The TLS certificate and key were read again (new connections use them).
    pub tls_reloaded: bool,
    /// Sessions closed because the new config no longer allows them.
    pub sessions_closed: Vec<ClosedSession>,
    /// Sessions that go on.
    pub sessions_kept: usize,
    /// Settings that changed in the file but take effect only when the hub
    /// restarts (they keep their old value until then).
    pub needs_restart: Vec<String>,
}

/// A session a reload closed, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedSession {
    pub dataset: String,
    pub client: String,
    pub token: String,
    /// The `error` frame's code the client got.
    pub code: String,
    pub reason: String,
}

/// Why a reload was refused; the hub keeps its current config.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Tls {
        path: String,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error("this hub was not started from a config file; there is nothing to reload")]
    NoFile,
}

/// Settings that only a restart changes: (key, changed).
fn restart_only(old: &HubConfig, new: &HubConfig) -> Vec<String> {
    let changed = [
        ("listen", old.listen != new.listen),
        ("store", old.store != new.store),
        ("read_timeout", old.read_timeout != new.read_timeout),
        ("metrics", old.metrics != new.metrics),
        ("log_level", old.log_level != new.log_level),
        ("[limits]", old.limits != new.limits),
        ("admin_socket", old.admin_socket != new.admin_socket),
        (
            "tls_cert/tls_key (turning TLS on or off)",
            old.tls_cert.is_some() != new.tls_cert.is_some(),
        ),
    ];
    changed
        .iter()
        .filter(|(_, c)| *c)
        .map(|(k, _)| format!("{k} changed; it takes effect when the hub restarts"))
        .collect()
}

/// Names in `new` only, in `old` only, and in both with other content.
fn diff<T>(
    old: &[T],
    new: &[T],
    name: impl Fn(&T) -> &str,
    same: impl Fn(&T, &T) -> bool,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let by_name = |list: &[T]| -> BTreeMap<String, Vec<usize>> {
        let mut m: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, t) in list.iter().enumerate() {
            m.entry(name(t).to_owned()).or_default().push(i);
        }
        m
    };
    let (o, n) = (by_name(old), by_name(new));
    let names: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
    let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for k in names {
        match (o.get(k), n.get(k)) {
            (None, Some(_)) => added.push(k.clone()),
            (Some(_), None) => removed.push(k.clone()),
            (Some(a), Some(b)) => {
                let equal =
                    a.len() == b.len() && a.iter().zip(b).all(|(&i, &j)| same(&old[i], &new[j]));
                if !equal {
                    changed.push(k.clone());
                }
            }
            (None, None) => unreachable!("a name comes from one of the lists"),
        }
    }
    (added, removed, changed)
}

fn same_token(a: &TokenConfig, b: &TokenConfig) -> bool {
    a.sha256 == b.sha256 && a.datasets == b.datasets && a.access == b.access
}

/// Re-reads the file the hub was started from and applies it.
pub(super) async fn reload_from_file(inner: &Arc<HubInner>) -> Result<ReloadReport, ReloadError> {
    let path = inner.config_path.get().ok_or(ReloadError::NoFile)?.clone();
    let _one_at_a_time = inner.reloading.lock().await;
    let (cfg, live) = tokio::task::spawn_blocking(move || {
        let cfg = HubConfig::load(&path)?;
        let live = Live::new(&cfg).map_err(|source| ReloadError::Tls {
            path: path.display().to_string(),
            source,
        })?;
        Ok::<_, ReloadError>((cfg, live))
    })
    .await
    .expect("BUG: loading the config panicked")?;
    Ok(apply(inner, &cfg, live))
}

/// Swaps in the new live config, then closes the sessions it no longer
/// allows. (A session registering meanwhile checks itself against the new
/// config once registered, so none slips between the two.)
fn apply(inner: &Arc<HubInner>, cfg: &HubConfig, mut live: Live) -> ReloadReport {
    let old = inner.live();
    let mut report = ReloadReport {
        needs_restart: restart_only(&old.config, cfg),
        ..ReloadReport::default()
    };
    // What needs a restart stays as it runs, so that the next reload
    // compares against what is in force.
    let (o, n) = (&old.config, &mut live.config);
    n.listen.clone_from(&o.listen);
    n.store.clone_from(&o.store);
    n.read_timeout = o.read_timeout;
    n.metrics = o.metrics;
    n.log_level.clone_from(&o.log_level);
    n.limits.clone_from(&o.limits);
    n.admin_socket.clone_from(&o.admin_socket);
    if old.tls.is_some() != live.tls.is_some() {
        // The scheme every client's url names: kept until a restart.
        live.tls = old.tls.clone();
        live.config.tls_cert = old.config.tls_cert.clone();
        live.config.tls_key = old.config.tls_key.clone();
    }
    report.tls_reloaded = live.tls.is_some();
    (
        report.tokens_added,
        report.tokens_removed,
        report.tokens_changed,
    ) = diff(
        &old.config.tokens,
        &cfg.tokens,
        |t| t.name.as_str(),
        same_token,
    );
    (
        report.datasets_added,
        report.datasets_removed,
        report.datasets_changed,
    ) = diff(
        &old.config.datasets,
        &cfg.datasets,
        |d| d.name.as_str(),
        |a, b| a.tables == b.tables,
    );
    for d in &report.datasets_added {
        inner.metrics.declare_dataset(d);
    }
    let live = Arc::new(live);
    *inner.live.write().expect("BUG: poisoned") = live.clone();
    for seat in inner.sessions.seats() {
        let name = seat.token_name();
        match live.verdict(
            &seat.token_sha256,
            &name,
            seat.access,
            &seat.dataset,
            &seat.tables,
        ) {
            Ok(()) => {
                if let Some(g) = live.tokens.by_hash(&seat.token_sha256) {
                    *seat.token_name.lock().expect("BUG: poisoned") = g.name.clone();
                }
                report.sessions_kept += 1;
            }
            Err((code, reason)) => {
                seat.revoke(code, reason.clone());
                report.sessions_closed.push(ClosedSession {
                    dataset: seat.dataset.clone(),
                    client: seat.client.clone(),
                    token: name,
                    code: code.as_str().to_owned(),
                    reason,
                });
            }
        }
    }
    for w in &report.needs_restart {
        tracing::warn!("reload: {w}");
    }
    for c in &report.sessions_closed {
        tracing::info!(dataset = ?c.dataset, client = ?c.client, token = ?c.token, code = %c.code, "reload: closing the session: {}", c.reason);
    }
    tracing::info!(
        tokens_added = ?report.tokens_added,
        tokens_removed = ?report.tokens_removed,
        tokens_changed = ?report.tokens_changed,
        datasets_added = ?report.datasets_added,
        datasets_removed = ?report.datasets_removed,
        datasets_changed = ?report.datasets_changed,
        tls_reloaded = report.tls_reloaded,
        sessions_closed = report.sessions_closed.len(),
        sessions_kept = report.sessions_kept,
        "config reloaded"
    );
    report
}

/// What asked for a reload: SIGHUP and the admin socket's `reload` are the
/// same reload, only logged apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Sighup,
    AdminSocket,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Sighup => "SIGHUP",
            Trigger::AdminSocket => "admin socket",
        }
    }
}

/// Reloads, telling systemd (`RELOADING=1`, then `READY=1`) and logging a
/// refusal with the error naming the file and key.
pub async fn announced(hub: &super::Hub, trigger: Trigger) -> Result<ReloadReport, ReloadError> {
    crate::service::reloading();
    tracing::info!("reloading the config ({})", trigger.as_str());
    let r = hub.reload().await;
    match &r {
        Ok(_) => crate::service::ready("config reloaded"),
        Err(e) => {
            tracing::error!(
                "reload ({}) refused, keeping the current config: {e}",
                trigger.as_str()
            );
            crate::service::ready("reload refused; serving with the previous config");
        }
    }
    r
}

/// Reloads on every SIGHUP until `shutdown`. The handler is installed at
/// the call, before the future is first polled: a SIGHUP right after start
/// (before the hub reports ready) reloads rather than kills the process.
pub fn on_sighup(
    hub: super::Hub,
    shutdown: tokio_util::sync::CancellationToken,
) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let hup = signal(SignalKind::hangup());
    async move {
        let mut hup = match hup {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload with `tether hub reload`");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {}
                _ = shutdown.cancelled() => return,
            }
            let _ = announced(&hub, Trigger::Sighup).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sorted_into_added_removed_and_changed() {
        let old = [("a", 1), ("b", 2), ("c", 3)];
        let new = [("b", 2), ("c", 4), ("d", 5)];
        let (added, removed, changed) = diff(&old, &new, |t| t.0, |x, y| x.1 == y.1);
        assert_eq!(added, ["d"]);
        assert_eq!(removed, ["a"]);
        assert_eq!(changed, ["c"]);
        let (a, r, c) = diff(&old, &old, |t| t.0, |x, y| x.1 == y.1);
        assert!(a.is_empty() && r.is_empty() && c.is_empty());
    }
}
