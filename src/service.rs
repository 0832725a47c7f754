//! Running under systemd (`Type=notify`): readiness, status lines, watchdog
//! keep-alives and the stopping notice. Every call is a no-op outside systemd
//! (no `NOTIFY_SOCKET`).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::daemon::Daemon;
use crate::session::ConnectionState;

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Startup is complete.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload has begun (followed by [`ready`] when done).
pub fn reloading() {
    notify(&[NotifyState::Reloading]);
}

/// Shutdown has begun.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The one-line status systemd shows for the daemon.
pub fn daemon_status(daemon: &Daemon) -> String {
    let all = daemon.status();
    let connected = all
        .iter()
        .filter(|s| s.connection == ConnectionState::Connected)
        .count();
    let pending: u64 = all.iter().map(|s| s.pending_changes).sum();
    format!(
        "{} databases, {connected} connected, {pending} changes pending",
        all.len()
    )
}

/// How often the status line is refreshed and the watchdog fed: half the
/// watchdog interval when systemd set one, else every 5 s.
fn heartbeat_interval() -> (Duration, bool) {
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        (Duration::from_micros(usec / 2), true)
    } else {
        (Duration::from_secs(5), false)
    }
}

/// Refreshes the daemon's status line and feeds the watchdog until shutdown.
pub async fn daemon_heartbeat(daemon: Arc<Daemon>, shutdown: CancellationToken) {
    let (every, watchdog) = heartbeat_interval();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let status = daemon_status(&daemon);
        if watchdog {
            notify(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
        } else {
            notify(&[NotifyState::Status(&status)]);
        }
    }
}

/// Feeds the watchdog of a process with no richer status (the hub).
pub async fn watchdog(shutdown: CancellationToken) {
    let (every, watchdog) = heartbeat_interval();
    if !watchdog {
        return;
    }
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => notify(&[NotifyState::Watchdog]),
            _ = shutdown.cancelled() => return,
        }
    }
}
