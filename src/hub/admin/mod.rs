//! The hub's admin socket: a local Unix socket, guarded like the daemon's
//! control socket (file mode 0660 from the start, and each client's
//! credentials checked: root, the hub's user and its group), speaking
//! newline-delimited JSON: one [`AdminRequest`] per line, one
//! [`AdminResponse`] line for each. `proto/CONTROL.md` documents it.
//!
//! [`server`] answers on the hub's side, [`client`] is the CLI's side, and
//! [`figures`] gathers what the answers show from the registry of sessions,
//! the live config and the store.

pub mod client;
mod figures;
pub mod server;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::reload::ReloadReport;
use crate::config::HubConfig;
use crate::proto::Access;

/// Longest request line accepted, in bytes.
pub const MAX_LINE: usize = 4096;
/// Admin clients served at once; one more is answered `too_many_clients`.
pub const MAX_CLIENTS: usize = 16;

/// One request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Each declared dataset: head, live rows, log length, bytes, sessions.
    Datasets {},
    /// Connected and known clients: token, address, since, cursor, lag.
    Clients {},
    /// The tokens of `hub.toml`: name, datasets, access (never the hash).
    Tokens {},
    /// Re-read `hub.toml` and apply it (like SIGHUP).
    Reload {},
}

impl AdminRequest {
    pub const CMDS: [&'static str; 4] = ["datasets", "clients", "tokens", "reload"];

    /// Reads one request line: `None` for a blank line, else what is wrong.
    pub fn parse(line: &[u8]) -> Result<Option<AdminRequest>, String> {
        const LIKE: &str = r#"send one JSON object per line, like {"cmd":"clients"}"#;
        let text = std::str::from_utf8(line)
            .map_err(|e| format!("the request is not UTF-8 text ({e}); {LIKE}"))?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("the request is not valid JSON ({e}); {LIKE}"))?;
        let cmd = match value.get("cmd") {
            Some(serde_json::Value::String(c)) => c.clone(),
            _ => {
                return Err(format!(
                    "the request has no `cmd` field naming what to do; one of: {}; {LIKE}",
                    Self::CMDS.join(", ")
                ))
            }
        };
        if !Self::CMDS.contains(&cmd.as_str()) {
            return Err(format!(
                "unknown request type {cmd:?}; known: {}",
                Self::CMDS.join(", ")
            ));
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| format!("request `{cmd}`: {e}; see proto/CONTROL.md"))
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminError {
    /// The line is not a valid request.
    BadRequest,
    /// A reload found `hub.toml` invalid; the hub keeps its current config.
    InvalidConfig,
    /// The store could not be read.
    Store,
    /// The client's user may not use the socket; the connection is closed.
    NotAllowed,
    /// As many clients as the hub serves at once are connected.
    TooManyClients,
    /// No request within the idle timeout; the connection is closed.
    IdleTimeout,
}

/// One response line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdminResponse {
    Datasets {
        /// Bytes of the whole store file.
        store_bytes: u64,
        datasets: Vec<DatasetInfo>,
    },
    Clients {
        clients: Vec<ClientInfo>,
    },
    Tokens {
        tokens: Vec<TokenInfo>,
    },
    Reload {
        report: ReloadReport,
    },
    Error {
        code: AdminError,
        message: String,
    },
}

impl AdminResponse {
    pub fn error(code: AdminError, message: impl Into<String>) -> AdminResponse {
        AdminResponse::Error {
            code,
            message: message.into(),
        }
    }
}

/// A declared dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub name: String,
    pub tables: Vec<String>,
    /// Last sequence number.
    pub head: u64,
    /// Rows that exist now.
    pub live_rows: u64,
    /// Changes in its log.
    pub log_changes: u64,
    /// Bytes its log and rows take in the store file.
    pub bytes: u64,
    /// Sessions connected to it now.
    pub sessions: usize,
}

/// A client identity: connected now, or known to the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub dataset: String,
    pub client: String,
    pub connected: bool,
    /// Number of its connection (unique while the hub runs): the same
    /// number later means the same connection was kept.
    pub connection: Option<u64>,
    /// The token its (last) session presented, by name; unknown for a
    /// client not seen since the hub started.
    pub token: Option<String>,
    /// Address of its (last) session.
    pub address: Option<String>,
    /// Milliseconds since the Unix epoch its session started (connected).
    pub connected_since_ms: Option<u64>,
    /// Milliseconds since the Unix epoch its last session ended (not
    /// connected, seen since the hub started).
    pub last_seen_ms: Option<u64>,
    /// The dataset's changes up to here were sent to it.
    pub cursor: Option<u64>,
    /// The dataset's head now.
    pub head: u64,
    /// Changes it is behind the head (`head - cursor`).
    pub lag: Option<u64>,
    /// Highest client seq of its uploads the store applied.
    pub last_seq: u64,
}

/// A token of `hub.toml`, without its secret or hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub name: String,
    /// Datasets it opens (`*`: all).
    pub datasets: Vec<String>,
    pub access: Access,
    /// Sessions connected with it now.
    pub sessions: usize,
}

/// Where a hub with this config listens for admin clients: `admin_socket`,
/// else beside the store file (`hub.db` -> `hub.db-admin.sock`), a place the
/// hub's user can write without root and that the CLI finds from the same
/// `hub.toml`.
pub fn socket_path(cfg: &HubConfig) -> PathBuf {
    cfg.admin_socket
        .clone()
        .unwrap_or_else(|| beside_store(&cfg.store))
}

fn beside_store(store: &str) -> PathBuf {
    let file = store.strip_prefix("sqlite:").unwrap_or(store);
    let mut p = PathBuf::from(file).into_os_string();
    p.push("-admin.sock");
    PathBuf::from(p)
}

/// The admin socket named by the `hub.toml` at `path`, reading only the
/// two keys it needs (`admin_socket`, `store`): a file the hub would refuse
/// for another reason still names its socket, so that `tether hub reload`
/// can ask the hub and show the hub's refusal.
pub fn socket_from_file(path: &Path) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        format!(
            "{}: not TOML, so the admin socket it names cannot be found ({}); fix the file, or give the socket with --socket",
            path.display(),
            e.message()
        )
    })?;
    if let Some(v) = table.get("admin_socket") {
        return match v.as_str() {
            Some(s) => Ok(PathBuf::from(s)),
            None => Err(format!(
                "{}: admin_socket: expected a path as a string",
                path.display()
            )),
        };
    }
    match table.get("store").and_then(|v| v.as_str()) {
        Some(store) => Ok(beside_store(store)),
        None => Err(format!(
            "{}: store: missing; the admin socket is found beside the store unless admin_socket is set; give it with --socket",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_back_and_garbage_is_named() {
        for cmd in AdminRequest::CMDS {
            let line = format!("{{\"cmd\":\"{cmd}\"}}");
            let r = AdminRequest::parse(line.as_bytes()).unwrap().unwrap();
            assert_eq!(serde_json::to_string(&r).unwrap(), line);
        }
        assert_eq!(AdminRequest::parse(b"  "), Ok(None));
        for (line, want) in [
            (&b"hello"[..], "not valid JSON"),
            (b"{\"cmd\":\"drop\"}", "unknown request type \"drop\""),
            (b"{}", "no `cmd` field"),
            (b"\xff", "not UTF-8"),
        ] {
            let e = AdminRequest::parse(line).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn the_default_socket_is_beside_the_store() {
        assert_eq!(
            beside_store("sqlite:/var/lib/tether-hub/hub.db"),
            PathBuf::from("/var/lib/tether-hub/hub.db-admin.sock")
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hub.toml");
        // Invalid for the hub (no listen), yet it names its socket.
        std::fs::write(&f, "store = \"sqlite:/x/hub.db\"\nbogus = 1\n").unwrap();
        assert_eq!(
            socket_from_file(&f).unwrap(),
            PathBuf::from("/x/hub.db-admin.sock")
        );
        std::fs::write(&f, "admin_socket = \"/run/a.sock\"\n").unwrap();
        assert_eq!(socket_from_file(&f).unwrap(), PathBuf::from("/run/a.sock"));
        std::fs::write(&f, "store = [").unwrap();
        assert!(socket_from_file(&f).unwrap_err().contains("not TOML"));
    }
}
