//! One sync session: a persistent WebSocket to the hub for one local database.
//!
//! * [`machine`]: the session protocol as a state machine without I/O
//!   (states, inputs, actions), table-tested;
//! * [`driver`]: the loop that feeds it inputs and performs its actions;
//! * `conn`: one open connection, read and written in the same poll;
//! * [`connect`]: opening the WebSocket;
//! * [`status`]: what a session reports about itself.
//!
//! Reconnection uses exponential backoff with jitter (`backon`), reset after a
//! connection that stayed up for [`HEALTHY_AFTER`].

mod checks;
pub(crate) mod conn;
mod connect;
pub mod driver;
pub mod machine;
pub mod status;

use std::path::PathBuf;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::sync::{broadcast, oneshot, watch};

use crate::config::Reconnect;
use crate::local::{LocalError, ThreadGone};
pub use driver::Session;
pub use machine::{ACK_TIMEOUT, HEALTHY_AFTER, MAX_INFLIGHT, POLL_INTERVAL};
pub use status::{ConnectionState, Event, SessionState, Status};

/// Where the bearer token comes from; a file is re-read before each connection.
#[derive(Clone, Debug)]
pub enum TokenSource {
    Inline(String),
    File(PathBuf),
}

impl TokenSource {
    fn read(&self) -> Result<String, SessionError> {
        let token = self.read_raw()?;
        let whence = match self {
            TokenSource::Inline(_) => "hub.token in the daemon's config".to_owned(),
            TokenSource::File(p) => format!("token file {}", p.display()),
        };
        check_token(&whence, &token).map_err(|e| {
            SessionError::Unauthorized(format!(
                "{e}; the session tries again as soon as the file changes"
            ))
        })?;
        Ok(token)
    }

    fn read_raw(&self) -> Result<String, SessionError> {
        match self {
            TokenSource::Inline(t) => Ok(t.clone()),
            TokenSource::File(p) => match std::fs::read_to_string(p) {
                Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
                Ok(_) => Err(SessionError::Unauthorized(format!(
                    "token file {} is empty",
                    p.display()
                ))),
                Err(e) => Err(SessionError::Unauthorized(format!(
                    "cannot read token file {}: {e}",
                    p.display()
                ))),
            },
        }
    }
}

/// Checks a token (already trimmed) read from `whence`. A token is one
/// word of visible ASCII: anything else cannot go in an HTTP header, and
/// usually means the file holds more than the token (the whole output of
/// `tether hub new-token`, say). Used by the session and `tether check`.
pub fn check_token(whence: &str, token: &str) -> Result<(), String> {
    if token.contains('\n') {
        return Err(format!(
            "{whence} holds more than one line: put only the token (the line starting tth_) in it"
        ));
    }
    if let Some(bad) = token.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "{whence} holds {} characters with {bad:?} among them, which no token contains: it must hold only the token itself (the line starting tth_ that `tether hub new-token` prints)",
            token.chars().count()
        ));
    }
    Ok(())
}

/// Commands an operator sends to a running session.
#[derive(Debug)]
pub enum Control {
    /// Stop uploading and/or downloading. Local writes keep being captured.
    Pause { upload: bool, download: bool },
    /// Undo a pause.
    Resume { upload: bool, download: bool },
    /// Try to connect now if waiting in backoff; answers what it did.
    Reconnect {
        reply: oneshot::Sender<ReconnectOutcome>,
    },
    /// Ask the hub for the dataset's head now; `None` when it cannot be
    /// asked (not connected, or a hub that does not answer head requests).
    FetchHead { reply: oneshot::Sender<Option<u64>> },
}

/// What a reconnect request did to one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconnectOutcome {
    /// It was disconnected or waiting in backoff and tries now.
    Woken,
    /// Nothing to do: it is connected (or connecting).
    AlreadyConnected,
    /// Left alone: it is paused in both directions; resume it first.
    Paused,
}

/// Everything a session needs to know.
#[derive(Clone, Debug)]
pub struct SessionParams {
    pub name: String,
    pub dataset: String,
    pub url: String,
    /// CA certificates for `wss://` (`hub.ca_file`); the system's roots when unset.
    pub ca_file: Option<std::path::PathBuf>,
    pub token: TokenSource,
    pub reconnect: Reconnect,
    /// Ask the hub to push this client's own changes back too.
    pub echo_own: bool,
    /// On shutdown, how long in-flight uploads may take to be answered.
    pub shutdown_timeout: Duration,
    /// Where the session counts what it does (shared with the daemon's
    /// registry; a default value counts into nothing anyone reads).
    pub metrics: crate::metrics::SessionMetrics,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Worth retrying after backoff.
    #[error("{0}")]
    Retry(String),
    /// The hub refused the token.
    #[error("{0}")]
    Unauthorized(String),
    /// Cannot succeed until an operator fixes something.
    #[error("{0}")]
    Fatal(String),
}

impl From<LocalError> for SessionError {
    fn from(e: LocalError) -> Self {
        SessionError::Retry(e.to_string())
    }
}

impl From<ThreadGone> for SessionError {
    fn from(e: ThreadGone) -> Self {
        SessionError::Fatal(e.to_string())
    }
}

/// Reconnection delays: exponential (`backon`: `initial`, times `multiplier`
/// per attempt, capped at `max`) with full jitter, i.e. each delay is drawn
/// uniformly between zero and the exponential value, so that many daemons
/// cut off together do not come back together. `backon`'s own jitter adds
/// up to one more delay on top (exceeding `max`), hence this form. A floor
/// of 10 ms keeps a failing hub from being hammered.
pub fn backoff(r: &Reconnect) -> impl Iterator<Item = Duration> {
    use rand::Rng;
    backon::ExponentialBuilder::default()
        .with_min_delay(r.initial.0)
        .with_max_delay(r.max.0)
        .with_factor(r.multiplier)
        .without_max_times()
        .build()
        .map(|d| {
            let jittered = d.mul_f64(rand::thread_rng().gen_range(0.0..=1.0));
            jittered.max(Duration::from_millis(10).min(d))
        })
}

/// Changes a published status and emits events for what changed.
pub fn update_status(
    status: &watch::Sender<Status>,
    events: &broadcast::Sender<Event>,
    f: impl FnOnce(&mut Status),
) {
    let mut emitted = Vec::new();
    status.send_modify(|s| {
        let (conn, sess) = (s.connection, s.session);
        f(s);
        if s.connection != conn {
            emitted.push(Event::Connection {
                db: s.name.clone(),
                old: conn,
                new: s.connection,
            });
        }
        if s.session != sess {
            emitted.push(Event::Session {
                db: s.name.clone(),
                old: sess,
                new: s.session,
            });
        }
    });
    for e in emitted {
        // No watcher is fine.
        let _ = events.send(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    #[test]
    fn a_token_file_holding_more_than_a_token_names_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "token (give this to the daemon):\ntth_abc\n").unwrap();
        let e = TokenSource::File(f.clone()).read().unwrap_err();
        assert!(
            matches!(e, SessionError::Unauthorized(_)),
            "retried when the file changes"
        );
        let e = e.to_string();
        assert!(
            e.contains(f.to_str().unwrap()) && e.contains("only the token"),
            "{e}"
        );
        std::fs::write(&f, "tth_abc\n").unwrap();
        assert_eq!(TokenSource::File(f).read().unwrap(), "tth_abc");
        let e = TokenSource::Inline("two words".into())
            .read()
            .unwrap_err()
            .to_string();
        assert!(e.contains("hub.token"), "{e}");
    }

    #[test]
    fn backoff_grows_exponentially_with_full_jitter_and_stays_under_max() {
        let r = Reconnect {
            initial: Dur(Duration::from_millis(100)),
            max: Dur(Duration::from_secs(2)),
            multiplier: 2.0,
            ..Reconnect::default()
        };
        let runs: Vec<Vec<Duration>> = (0..200).map(|_| backoff(&r).take(8).collect()).collect();
        for run in &runs {
            for (i, d) in run.iter().enumerate() {
                let cap = Duration::from_millis(100 * (1 << i)).min(Duration::from_secs(2));
                assert!(*d <= cap, "attempt {i}: {d:?} above {cap:?}");
            }
        }
        // Full jitter: delays spread over the whole range, not just above it.
        let late: Vec<Duration> = runs.iter().map(|r| r[7]).collect();
        assert!(late.iter().any(|d| *d < Duration::from_millis(700)));
        assert!(late.iter().any(|d| *d > Duration::from_millis(1300)));
    }
}
