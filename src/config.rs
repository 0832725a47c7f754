//! Configuration files: `tether.toml` for the daemon, `hub.toml` for the hub.
//!
//! Unknown keys are refused; every error starts with the file and the key so
//! that the fix is obvious. Durations are strings such as `"500ms"`, `"30s"`,
//! `"2m"`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A configuration problem, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

/// A duration written as `"500ms"`, `"30s"`, `"2m"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write it like \"500ms\", \"30s\" or \"2m\""
            ))
        })
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// How a conflict between a local change and a newer hub row is settled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// The local change is dropped and the hub's row is written locally.
    #[default]
    ServerWins,
    /// The local change is sent again against the hub's current version.
    ClientWins,
    /// Columns the app wrote (in the local change or in a later pending
    /// write) win; the others take the hub's values. A delete on either side
    /// is settled as `server_wins`, unless the app wrote the row again.
    MergeColumns,
}

/// `tether.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Path of the local control socket (used by the `tether` CLI).
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// `[control]`: who may use the control socket, and how long a client
    /// may stay silent.
    #[serde(default)]
    pub control: ControlConfig,
    /// On SIGTERM, how long sessions may wait for the hub to answer uploads
    /// already sent. Whatever is not answered stays captured for next time.
    #[serde(default = "d_shutdown")]
    pub shutdown_timeout: Dur,
    /// Serve Prometheus metrics over HTTP at `/metrics` (and `/healthz`) on
    /// this address, for example `127.0.0.1:9464`. Off when absent; `tether
    /// metrics` prints the same figures either way.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Log filter when `RUST_LOG` is not set: `error`, `warn`, `info`,
    /// `debug`, `trace`, or directives such as `"info,tether::session=debug"`.
    #[serde(default)]
    pub log_level: Option<String>,
    pub hub: HubConn,
    #[serde(default)]
    pub reconnect: Reconnect,
    #[serde(rename = "database", default)]
    pub databases: Vec<DatabaseConfig>,
}

/// `/run/tether/tether.sock` for root, a per-user path otherwise (see
/// [`crate::places::control_socket`]).
pub fn default_control_socket() -> PathBuf {
    crate::places::control_socket()
}

/// `[control]` of `tether.toml`: the control socket's guard. Read at
/// start; a change takes effect when the daemon restarts.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Users (names or uids) allowed to use the control socket, checked
    /// against each client's credentials. Default: root and the daemon's
    /// own user.
    #[serde(default)]
    pub allow_users: Option<Vec<IdOrName>>,
    /// Groups (names or gids) whose members may use the control socket.
    /// Default: the daemon's own group.
    #[serde(default)]
    pub allow_groups: Option<Vec<IdOrName>>,
    /// A client that sends no request for this long is disconnected; one
    /// whose request is running (`wait`, `watch`, ...) is not idle.
    #[serde(default = "d_control_idle")]
    pub idle_timeout: Dur,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            allow_users: None,
            allow_groups: None,
            idle_timeout: d_control_idle(),
        }
    }
}

fn d_control_idle() -> Dur {
    Dur(Duration::from_secs(5))
}

/// A user or group named by its number or its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdOrName {
    Id(u32),
    Name(String),
}

impl fmt::Display for IdOrName {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            IdOrName::Id(n) => write!(f, "{n}"),
            IdOrName::Name(s) => write!(f, "{s:?}"),
        }
    }
}

impl<'de> Deserialize<'de> for IdOrName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IdOrName, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IdOrName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a name such as \"tether\" or a number such as 1000")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<IdOrName, E> {
                u32::try_from(n)
                    .map(IdOrName::Id)
                    .map_err(|_| E::custom(format!("{n} is not a uid or gid (0 to {})", u32::MAX)))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<IdOrName, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(-1))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<IdOrName, E> {
                if let Ok(n) = s.parse::<u32>() {
                    return Ok(IdOrName::Id(n));
                }
                if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == ':') {
                    return Err(E::custom(format!("{s:?} is not a user or group name")));
                }
                Ok(IdOrName::Name(s.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `[hub]` of `tether.toml`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HubConn {
    /// Full WebSocket URL, for example `ws://127.0.0.1:7420/v1/sync`.
    pub url: String,
    /// File holding the token (re-read before each connection).
    pub token_file: Option<PathBuf>,
    /// The token itself, when it is not in a file.
    pub token: Option<String>,
    /// PEM file of the CA certificates that may sign the hub's certificate
    /// for `wss://` (a private CA or a self-signed hub). Without it the
    /// system's roots are used.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// `[reconnect]` of `tether.toml`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Reconnect {
    #[serde(default = "d_initial")]
    pub initial: Dur,
    #[serde(default = "d_max")]
    pub max: Dur,
    #[serde(default = "d_multiplier")]
    pub multiplier: f32,
    /// How often the daemon pings the hub (keeps load balancers from closing
    /// idle connections and feeds the read-timeout guard).
    #[serde(default = "d_ping")]
    pub ping_interval: Dur,
    /// A connection that received nothing for this long is dropped and made anew.
    #[serde(default = "d_read_timeout")]
    pub read_timeout: Dur,
}

fn d_shutdown() -> Dur {
    Dur(Duration::from_secs(10))
}
fn d_initial() -> Dur {
    Dur(Duration::from_millis(500))
}
fn d_max() -> Dur {
    Dur(Duration::from_secs(60))
}
fn d_multiplier() -> f32 {
    2.0
}
fn d_ping() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d_true() -> bool {
    true
}

fn d_read_timeout() -> Dur {
    Dur(Duration::from_secs(120))
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            initial: d_initial(),
            max: d_max(),
            multiplier: d_multiplier(),
            ping_interval: d_ping(),
            read_timeout: d_read_timeout(),
        }
    }
}

/// One `[[database]]` of `tether.toml`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Unique name, used by the CLI and in logs.
    pub name: String,
    pub path: PathBuf,
    /// Hub namespace; defaults to `name`.
    pub dataset: Option<String>,
    pub tables: Vec<String>,
    #[serde(default)]
    pub conflict: ConflictPolicy,
    /// Per-table overrides of `conflict`.
    #[serde(default)]
    pub table_conflict: BTreeMap<String, ConflictPolicy>,
}

impl DatabaseConfig {
    pub fn dataset(&self) -> &str {
        self.dataset.as_deref().unwrap_or(&self.name)
    }

    /// Each table with the policy that applies to it.
    pub fn table_policies(&self) -> Vec<(String, ConflictPolicy)> {
        self.tables
            .iter()
            .map(|t| {
                (
                    t.clone(),
                    self.table_conflict.get(t).copied().unwrap_or(self.conflict),
                )
            })
            .collect()
    }
}

/// A `log_level` must be a filter `tracing` understands.
fn check_log_level(level: Option<&str>) -> Result<(), String> {
    match level {
        None => Ok(()),
        Some(l) => {
            let help = "use error, warn, info, debug or trace, or directives like \"info,tether::session=debug\"";
            // A bare word is a target name to `tracing` ("inof" would turn
            // every other log line off); here it must be a level.
            const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
            if let Some(d) = l
                .split(',')
                .map(str::trim)
                .find(|d| !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str()))
            {
                return Err(format!("{d:?} in {l:?} is not a log level; {help}"));
            }
            tracing_subscriber::EnvFilter::builder()
                .parse(l)
                .map(|_| ())
                .map_err(|e| format!("{l:?} is not a log filter ({e}); {help}"))
        }
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })
}

impl DaemonConfig {
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        Self::from_str(path, &read(path)?)
    }

    /// Parses and validates; `path` is only used in messages.
    pub fn from_str(path: &Path, text: &str) -> Result<DaemonConfig, ConfigError> {
        let cfg: DaemonConfig = parse(path, text)?;
        let bad = |key: String, message: String| ConfigError::Invalid {
            path: path.display().to_string(),
            key,
            message,
        };
        check_log_level(cfg.log_level.as_deref()).map_err(|m| bad("log_level".into(), m))?;
        if cfg.control.idle_timeout.0.is_zero() {
            return Err(bad(
                "control.idle_timeout".into(),
                "must be above zero, like \"5s\"".into(),
            ));
        }
        if !(cfg.hub.url.starts_with("ws://") || cfg.hub.url.starts_with("wss://")) {
            return Err(bad(
                "hub.url".into(),
                format!(
                    "{:?} is not a WebSocket URL; write it like \"ws://127.0.0.1:7420/v1/sync\"",
                    cfg.hub.url
                ),
            ));
        }
        match (&cfg.hub.token, &cfg.hub.token_file) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "hub.token".into(),
                    "set either `token` or `token_file`, not both".into(),
                ))
            }
            (None, None) => {
                return Err(bad(
                    "hub".into(),
                    "no token: set `token_file = \"/etc/tether/token\"` (or `token`); create one with `tether hub new-token`".into(),
                ))
            }
            _ => {}
        }
        let r = &cfg.reconnect;
        if r.initial.0.is_zero() || r.max.0 < r.initial.0 {
            return Err(bad(
                "reconnect.max".into(),
                format!("must be at least `initial` ({}) and above zero", r.initial),
            ));
        }
        if !(r.multiplier >= 1.0 && r.multiplier.is_finite()) {
            return Err(bad(
                "reconnect.multiplier".into(),
                format!("{} must be a number >= 1.0", r.multiplier),
            ));
        }
        if r.ping_interval.0.is_zero() || r.read_timeout.0 <= r.ping_interval.0 {
            return Err(bad(
                "reconnect.read_timeout".into(),
                format!(
                    "must be longer than ping_interval ({}), or a healthy idle connection would be cut",
                    r.ping_interval
                ),
            ));
        }
        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        for (i, db) in cfg.databases.iter().enumerate() {
            let key = |k: &str| format!("database[{i}].{k}");
            if db.name.is_empty()
                || !db
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(bad(
                    key("name"),
                    format!(
                        "{:?} must be non-empty and use only letters, digits, '-', '_' and '.'",
                        db.name
                    ),
                ));
            }
            if !names.insert(db.name.clone()) {
                return Err(bad(
                    key("name"),
                    format!("{:?} is used twice; names must be unique", db.name),
                ));
            }
            if !paths.insert(db.path.clone()) {
                return Err(bad(
                    key("path"),
                    format!(
                        "{} is configured twice; a database is synced by one session",
                        db.path.display()
                    ),
                ));
            }
            if db.tables.is_empty() {
                return Err(bad(key("tables"), "list at least one table to sync".into()));
            }
            for t in db.table_conflict.keys() {
                if !db.tables.contains(t) {
                    return Err(bad(
                        key(&format!("table_conflict.{t}")),
                        format!("table {t:?} is not in `tables` of database {:?}", db.name),
                    ));
                }
            }
        }
        Ok(cfg)
    }

    /// The token, read now from `token` or `token_file`.
    pub fn read_token(&self) -> Result<String, String> {
        if let Some(t) = &self.hub.token {
            return Ok(t.trim().to_owned());
        }
        let path = self.hub.token_file.as_ref().expect("BUG: validated");
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
            Ok(_) => Err(format!("token file {} is empty", path.display())),
            Err(e) => Err(format!("cannot read token file {}: {e}", path.display())),
        }
    }
}

/// `hub.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// Address to listen on, for example `127.0.0.1:7420`.
    pub listen: String,
    /// `sqlite:/path/to/hub.db`.
    pub store: String,
    #[serde(rename = "dataset", default)]
    pub datasets: Vec<DatasetConfig>,
    #[serde(rename = "token", default)]
    pub tokens: Vec<TokenConfig>,
    /// A client that sent nothing for this long is disconnected.
    #[serde(default = "d_read_timeout")]
    pub read_timeout: Dur,
    /// Serve Prometheus metrics at `/metrics` on the listener. Turn off when
    /// the listener is reachable by people who should not see dataset names
    /// and traffic figures (or filter the path in a reverse proxy).
    #[serde(default = "d_true")]
    pub metrics: bool,
    /// Log filter when `RUST_LOG` is not set (as in `tether.toml`).
    #[serde(default)]
    pub log_level: Option<String>,
    /// PEM certificate chain: with `tls_key`, the hub serves `wss://` (and
    /// `https://` for `/healthz` and `/metrics`) instead of plain TCP.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// `[limits]`: budgets that keep one client, or a flood of connections,
    /// from taking the hub from everyone else.
    #[serde(default)]
    pub limits: HubLimits,
    /// The admin socket (`tether hub clients`, `tether hub reload`, ...);
    /// default: beside the store, see [`crate::hub::admin::socket_path`].
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
}

/// `[limits]` of `hub.toml`. Each limit is named in the error a client gets
/// when it meets it, and counted in `tether_hub_limited_total{limit=...}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HubLimits {
    /// Connections past the token check (upgrade, `hello`, live sessions).
    pub max_sessions: usize,
    /// Connections that have not presented a valid token yet (TLS
    /// handshake, request head). A newcomer past this closes the one that
    /// waited longest, so a flood never keeps a daemon out.
    pub max_unauthenticated: usize,
    /// The same, per source address.
    pub max_unauthenticated_per_address: usize,
    /// Time a connection has to present a valid token (TLS handshake and
    /// request head together).
    pub unauthenticated_timeout: Dur,
    /// Connections presenting the same token at once.
    pub max_connections_per_token: usize,
    /// Frames (any WebSocket message, pings included) a session may send in
    /// one second, on average; as many may come in one burst.
    pub max_frames_per_second: u32,
    /// Bytes of incomplete frames buffered across all connections, in MiB.
    pub max_partial_frames_mib: u64,
    /// Bytes received from one token's connections and not yet done with
    /// (incomplete frames, uploads waiting to be applied), in MiB.
    pub max_in_flight_mib_per_token: u64,
    /// Changes in one `upload`: a larger batch would hold its dataset for
    /// long. At least [`crate::proto::MAX_BATCH_CHANGES`], what daemons send.
    pub max_upload_changes: usize,
}

impl Default for HubLimits {
    fn default() -> Self {
        HubLimits {
            max_sessions: 4096,
            max_unauthenticated: 1024,
            max_unauthenticated_per_address: 64,
            unauthenticated_timeout: Dur(Duration::from_secs(5)),
            max_connections_per_token: 512,
            max_frames_per_second: 1000,
            max_partial_frames_mib: 256,
            max_in_flight_mib_per_token: 128,
            max_upload_changes: 2 * crate::proto::MAX_BATCH_CHANGES,
        }
    }
}

impl HubLimits {
    /// The first key whose value is out of range, and why.
    fn check(&self) -> Result<(), (&'static str, String)> {
        let positive = [
            ("max_sessions", self.max_sessions as u64),
            ("max_unauthenticated", self.max_unauthenticated as u64),
            (
                "max_unauthenticated_per_address",
                self.max_unauthenticated_per_address as u64,
            ),
            (
                "max_connections_per_token",
                self.max_connections_per_token as u64,
            ),
            (
                "max_frames_per_second",
                u64::from(self.max_frames_per_second),
            ),
            ("max_partial_frames_mib", self.max_partial_frames_mib),
            (
                "max_in_flight_mib_per_token",
                self.max_in_flight_mib_per_token,
            ),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err((key, "must be at least 1".into()));
        }
        if self.unauthenticated_timeout.0.is_zero() {
            return Err((
                "unauthenticated_timeout",
                "must be above zero, like \"5s\"".into(),
            ));
        }
        if self.max_upload_changes < crate::proto::MAX_BATCH_CHANGES {
            return Err((
                "max_upload_changes",
                format!(
                    "{} is below {}, the changes a tether daemon may put in one batch: its uploads would be refused",
                    self.max_upload_changes,
                    crate::proto::MAX_BATCH_CHANGES
                ),
            ));
        }
        let mib = u64::MAX >> 20;
        for (key, v) in [
            ("max_partial_frames_mib", self.max_partial_frames_mib),
            (
                "max_in_flight_mib_per_token",
                self.max_in_flight_mib_per_token,
            ),
        ] {
            if v > mib {
                return Err((key, format!("{v} MiB is more than can be counted")));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub name: String,
    /// Tables clients may sync in this dataset.
    pub tables: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenAccess {
    ReadWrite,
    ReadOnly,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    /// Lowercase hex SHA-256 of the token's UTF-8 bytes.
    pub sha256: String,
    /// Datasets this token may sync, or `["*"]` for all.
    pub datasets: Vec<String>,
    #[serde(default = "d_access")]
    pub access: TokenAccess,
}

fn d_access() -> TokenAccess {
    TokenAccess::ReadWrite
}

/// Where the hub keeps its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
}

impl HubConfig {
    pub fn load(path: &Path) -> Result<HubConfig, ConfigError> {
        Self::from_str(path, &read(path)?)
    }

    pub fn from_str(path: &Path, text: &str) -> Result<HubConfig, ConfigError> {
        let cfg: HubConfig = parse(path, text)?;
        let bad = |key: String, message: String| ConfigError::Invalid {
            path: path.display().to_string(),
            key,
            message,
        };
        check_log_level(cfg.log_level.as_deref()).map_err(|m| bad("log_level".into(), m))?;
        if cfg.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad(
                "listen".into(),
                format!(
                    "{:?} is not an address; write it like \"127.0.0.1:7420\"",
                    cfg.listen
                ),
            ));
        }
        cfg.store_url().map_err(|m| bad("store".into(), m))?;
        match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(_), None) => return Err(bad("tls_key".into(), "tls_cert is set but tls_key is not: set both (PEM files) to serve wss://, or neither for plain ws://".into())),
            (None, Some(_)) => return Err(bad("tls_cert".into(), "tls_key is set but tls_cert is not: set both (PEM files) to serve wss://, or neither for plain ws://".into())),
            _ => {}
        }
        cfg.limits
            .check()
            .map_err(|(key, m)| bad(format!("limits.{key}"), m))?;
        let mut names = HashSet::new();
        for (i, d) in cfg.datasets.iter().enumerate() {
            if !names.insert(d.name.clone()) {
                return Err(bad(
                    format!("dataset[{i}].name"),
                    format!("{:?} is used twice", d.name),
                ));
            }
            if d.tables.is_empty() {
                return Err(bad(
                    format!("dataset[{i}].tables"),
                    "list at least one table".into(),
                ));
            }
        }
        for (i, t) in cfg.tokens.iter().enumerate() {
            if t.sha256.len() != 64
                || !t
                    .sha256
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
            {
                return Err(bad(
                    format!("token[{i}].sha256"),
                    format!("token {:?}: expected 64 lowercase hex characters (the SHA-256 of the token); `tether hub new-token` prints one", t.name),
                ));
            }
            for d in &t.datasets {
                if d != "*" && !names.contains(d) {
                    return Err(bad(
                        format!("token[{i}].datasets"),
                        format!(
                            "token {:?} names dataset {d:?}, which no [[dataset]] declares",
                            t.name
                        ),
                    ));
                }
            }
        }
        Ok(cfg)
    }

    pub fn store_url(&self) -> Result<StoreUrl, String> {
        match self.store.split_once(':') {
            Some(("sqlite", p)) if !p.is_empty() => Ok(StoreUrl::Sqlite(PathBuf::from(p))),
            _ => Err(format!(
                "{:?} is not a store; write it like \"sqlite:/var/lib/tether-hub/hub.db\"",
                self.store
            )),
        }
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;

    #[test]
    fn a_tls_certificate_without_its_key_is_refused_naming_the_key() {
        let base = "listen = \"127.0.0.1:0\"\nstore = \"sqlite:/tmp/x.db\"\n";
        let e = HubConfig::from_str(
            Path::new("hub.toml"),
            &format!("{base}tls_cert = \"c.pem\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls_key") && e.contains("set both"), "{e}");
        let e = HubConfig::from_str(
            Path::new("hub.toml"),
            &format!("{base}tls_key = \"k.pem\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls_cert"), "{e}");
        let ok = HubConfig::from_str(
            Path::new("hub.toml"),
            &format!("{base}tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n"),
        )
        .unwrap();
        assert_eq!(ok.tls_key.as_deref(), Some(Path::new("k.pem")));
    }
}

#[cfg(test)]
mod limits_tests {
    use super::*;

    const BASE: &str = "listen = \"127.0.0.1:0\"\nstore = \"sqlite:/tmp/x.db\"\n";

    fn load(extra: &str) -> Result<HubConfig, String> {
        HubConfig::from_str(Path::new("hub.toml"), &format!("{BASE}{extra}"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn limits_default_when_absent_and_are_read_from_their_table() {
        assert_eq!(load("").unwrap().limits, HubLimits::default());
        let l = load("[limits]\nmax_sessions = 10\nunauthenticated_timeout = \"2s\"\n")
            .unwrap()
            .limits;
        assert_eq!(l.max_sessions, 10);
        assert_eq!(l.unauthenticated_timeout, Dur(Duration::from_secs(2)));
        assert_eq!(
            l.max_upload_changes,
            HubLimits::default().max_upload_changes
        );
    }

    #[test]
    fn out_of_range_limits_are_refused_naming_the_key() {
        let e = load("[limits]\nmax_frames_per_second = 0\n").unwrap_err();
        assert!(
            e.contains("limits.max_frames_per_second") && e.contains("at least 1"),
            "{e}"
        );
        let e = load("[limits]\nunauthenticated_timeout = \"0s\"\n").unwrap_err();
        assert!(e.contains("limits.unauthenticated_timeout"), "{e}");
        let e = load("[limits]\nmax_upload_changes = 100\n").unwrap_err();
        assert!(
            e.contains("limits.max_upload_changes") && e.contains("4000"),
            "{e}"
        );
        let e = load("[limits]\nmax_conections = 3\n").unwrap_err();
        assert!(e.contains("max_conections"), "{e}");
    }
}
