//! The CLI side of the control socket.

use std::path::{Path, PathBuf};

use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LinesCodec};

use super::{Request, Response, MAX_LINE};

/// Where the CLI looks for the daemon when nothing else says.
pub const DEFAULT_SOCKET: &str = "/run/tether/tether.sock";

/// Why the CLI could not talk to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no tether daemon is listening on {path} ({source}); start it with `tether daemon --config /etc/tether/tether.toml` (or `systemctl start tether`), or point to its socket with --socket or --config")]
    NoDaemon {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lost the connection to the daemon: {0}")]
    Lost(String),
    #[error("the daemon sent a line this CLI cannot read ({0}); are the CLI and daemon versions the same?")]
    Garbled(String),
}

/// An open control connection.
pub struct Client {
    conn: Framed<UnixStream, LinesCodec>,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::NoDaemon {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Client {
            conn: Framed::new(stream, LinesCodec::new_with_max_length(16 * MAX_LINE)),
        })
    }

    /// Sends a request; read the answers with [`Client::next`].
    pub async fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let line = serde_json::to_string(req).expect("BUG: requests serialize");
        self.conn
            .send(line)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))
    }

    /// The next response line.
    pub async fn next(&mut self) -> Result<Response, ClientError> {
        match self.conn.next().await {
            None => Err(ClientError::Lost("the daemon closed the connection".into())),
            Some(Err(e)) => Err(ClientError::Lost(e.to_string())),
            Some(Ok(line)) => {
                serde_json::from_str(&line).map_err(|e| ClientError::Garbled(e.to_string()))
            }
        }
    }
}

/// Finds the socket: `--socket`, else `--config`'s `control_socket`, else
/// `TETHER_SOCKET`, else [`DEFAULT_SOCKET`].
pub fn socket_path(
    socket: Option<&Path>,
    config: Option<&Path>,
) -> Result<PathBuf, crate::config::ConfigError> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    if let Some(c) = config {
        return Ok(crate::config::DaemonConfig::load(c)?.control_socket);
    }
    if let Some(s) = std::env::var_os("TETHER_SOCKET") {
        return Ok(PathBuf::from(s));
    }
    Ok(PathBuf::from(DEFAULT_SOCKET))
}
