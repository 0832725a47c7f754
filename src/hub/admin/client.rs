//! The CLI's side of the admin socket: one request, one answer, every step
//! within a deadline (a hub that accepts and never answers is an error, not
//! a hang).

use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LinesCodec};

use super::{AdminRequest, AdminResponse};

/// How long a command waits for the hub's answer when `--timeout` does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the CLI could not talk to the hub.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("no tether hub is listening on admin socket {path} ({source}); start it with `tether hub --config /etc/tether/hub.toml` (or `systemctl start tether-hub`), or point to its socket with --socket or --config")]
    NoHub {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the hub's admin socket {path} ({source}): only root, the hub's user and its group may; run this as one of them")]
    Denied {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the hub on {path} did not answer within {}; it may be hung or overloaded: see its log (`journalctl -u tether-hub`), or give it longer with --timeout", humantime::format_duration(*.limit))]
    NoAnswer { path: String, limit: Duration },
    #[error("lost the connection to the hub: {0}")]
    Lost(String),
    #[error(
        "the hub sent a line this CLI cannot read ({0}); are the CLI and hub versions the same?"
    )]
    Garbled(String),
}

/// Sends `req` to the hub on `path` and returns its answer within `limit`.
pub async fn request(
    path: &Path,
    req: &AdminRequest,
    limit: Duration,
) -> Result<AdminResponse, AdminClientError> {
    let shown = path.display().to_string();
    let no_answer = || AdminClientError::NoAnswer {
        path: shown.clone(),
        limit,
    };
    let exchange = async {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::PermissionDenied => AdminClientError::Denied {
                    path: shown.clone(),
                    source: e,
                },
                _ => AdminClientError::NoHub {
                    path: shown.clone(),
                    source: e,
                },
            })?;
        let mut conn = Framed::new(stream, LinesCodec::new_with_max_length(16 << 20));
        let line = serde_json::to_string(req).expect("BUG: requests serialize");
        conn.send(line)
            .await
            .map_err(|e| AdminClientError::Lost(e.to_string()))?;
        match conn.next().await {
            None => Err(AdminClientError::Lost(
                "the hub closed the connection without answering".into(),
            )),
            Some(Err(e)) => Err(AdminClientError::Lost(e.to_string())),
            Some(Ok(line)) => {
                serde_json::from_str(&line).map_err(|e| AdminClientError::Garbled(e.to_string()))
            }
        }
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| no_answer())?
}
