//! `tether hub datasets|clients|tokens|reload`: ask the running hub over its
//! admin socket and print the answer for people (or as JSON).
//!
//! Exit codes: 0 done; 1 the hub refused (a reload of an invalid file, a
//! store that cannot be read) or the connection broke; 69 no hub listens on
//! the socket; 75 the hub did not answer in time; 77 this user may not use
//! the socket; 78 the socket cannot be found because hub.toml cannot be read
//! as TOML (give --socket).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tether::hub::admin::client::{request, AdminClientError, DEFAULT_TIMEOUT};
use tether::hub::admin::{
    self, AdminError, AdminRequest, AdminResponse, ClientInfo, DatasetInfo, TokenInfo,
};
use tether::hub::reload::ReloadReport;

use crate::cli::{AdminArgs, Command, HubCommand};
use crate::commands::{EXIT_NOT_ALLOWED, EXIT_NO_ANSWER, EXIT_NO_DAEMON};

/// Where hub.toml is when --config does not say.
const DEFAULT_CONFIG: &str = "/etc/tether/hub.toml";

/// The admin request a command stands for, if it is one.
pub fn request_of(cmd: &Command) -> Option<(AdminRequest, AdminArgs)> {
    let Command::Hub(args) = cmd else {
        return None;
    };
    match args.command.as_ref()? {
        HubCommand::Datasets(a) => Some((AdminRequest::Datasets {}, *a)),
        HubCommand::Clients(a) => Some((AdminRequest::Clients {}, *a)),
        HubCommand::Tokens(a) => Some((AdminRequest::Tokens {}, *a)),
        HubCommand::Reload(a) => Some((AdminRequest::Reload {}, *a)),
        _ => None,
    }
}

/// Finds the socket, asks, prints; see the module's exit codes.
pub async fn run(
    req: AdminRequest,
    args: AdminArgs,
    socket: Option<&Path>,
    config: Option<&Path>,
) -> ExitCode {
    let path = match socket {
        Some(s) => s.to_path_buf(),
        None => match admin::socket_from_file(config.unwrap_or(Path::new(DEFAULT_CONFIG))) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(78);
            }
        },
    };
    let answer = match request(&path, &req, args.timeout.unwrap_or(DEFAULT_TIMEOUT)).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(match e {
                AdminClientError::NoHub { .. } => EXIT_NO_DAEMON,
                AdminClientError::NoAnswer { .. } => EXIT_NO_ANSWER,
                AdminClientError::Denied { .. } => EXIT_NOT_ALLOWED,
                AdminClientError::Lost(_) | AdminClientError::Garbled(_) => 1,
            });
        }
    };
    if let AdminResponse::Error { code, message } = &answer {
        if args.json {
            println!(
                "{}",
                serde_json::to_string(&answer).expect("BUG: serializes")
            );
        }
        eprintln!("error: {message}");
        return ExitCode::from(match code {
            AdminError::NotAllowed => EXIT_NOT_ALLOWED,
            AdminError::TooManyClients => EXIT_NO_ANSWER,
            _ => 1,
        });
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&answer).expect("BUG: serializes")
        );
    } else {
        print!("{}", text(&answer));
    }
    ExitCode::SUCCESS
}

/// An answer as text for people.
fn text(a: &AdminResponse) -> String {
    match a {
        AdminResponse::Datasets {
            store_bytes,
            datasets,
        } => datasets_text(*store_bytes, datasets),
        AdminResponse::Clients { clients } => clients_text(clients),
        AdminResponse::Tokens { tokens } => tokens_text(tokens),
        AdminResponse::Reload { report } => reload_text(report),
        AdminResponse::Error { message, .. } => format!("error: {message}\n"),
    }
}

/// Rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = *w));
            }
        }
        l.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn datasets_text(store_bytes: u64, datasets: &[DatasetInfo]) -> String {
    if datasets.is_empty() {
        return "no datasets declared in hub.toml\n".into();
    }
    let rows = datasets
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                d.tables.join(","),
                d.head.to_string(),
                d.live_rows.to_string(),
                d.log_changes.to_string(),
                size(d.bytes),
                d.sessions.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "DATASET",
            "TABLES",
            "HEAD",
            "LIVE ROWS",
            "LOG",
            "SIZE",
            "SESSIONS",
        ],
        rows,
    );
    out.push_str(&format!("store: {}\n", size(store_bytes)));
    out
}

/// "2026-11-30T10:03:12Z (2m 5s ago)".
fn when(ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    let ago = SystemTime::now()
        .duration_since(at)
        .map(|d| Duration::from_secs(d.as_secs()))
        .unwrap_or_default();
    format!(
        "{} ({} ago)",
        humantime::format_rfc3339_seconds(at),
        humantime::format_duration(ago)
    )
}

fn clients_text(clients: &[ClientInfo]) -> String {
    if clients.is_empty() {
        return "no clients connected or known\n".into();
    }
    let dash = || "-".to_owned();
    let rows = clients
        .iter()
        .map(|c| {
            let state = match (c.connected_since_ms, c.last_seen_ms) {
                (Some(since), _) if c.connected => format!("connected since {}", when(since)),
                (_, Some(seen)) => format!("last seen {}", when(seen)),
                _ => "not seen since the hub started".to_owned(),
            };
            vec![
                c.dataset.clone(),
                c.client.clone(),
                c.token.clone().unwrap_or_else(dash),
                c.address.clone().unwrap_or_else(dash),
                c.cursor.map_or_else(dash, |v| v.to_string()),
                c.lag.map_or_else(dash, |v| v.to_string()),
                state,
            ]
        })
        .collect();
    table(
        &[
            "DATASET", "CLIENT", "TOKEN", "ADDRESS", "CURSOR", "LAG", "STATE",
        ],
        rows,
    )
}

fn tokens_text(tokens: &[TokenInfo]) -> String {
    if tokens.is_empty() {
        return "no tokens in hub.toml: no daemon can connect\n".into();
    }
    let rows = tokens
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                serde_json::to_value(t.access)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                t.datasets.join(","),
                t.sessions.to_string(),
            ]
        })
        .collect();
    table(&["NAME", "ACCESS", "DATASETS", "SESSIONS"], rows)
}

fn reload_text(r: &ReloadReport) -> String {
    let mut out = String::from("hub.toml reloaded\n");
    let list = |what: &str, items: &[String], out: &mut String| {
        if !items.is_empty() {
            out.push_str(&format!("  {what}: {}\n", items.join(", ")));
        }
    };
    list("tokens added", &r.tokens_added, &mut out);
    list("tokens removed", &r.tokens_removed, &mut out);
    list("tokens changed", &r.tokens_changed, &mut out);
    list("datasets added", &r.datasets_added, &mut out);
    list("datasets removed", &r.datasets_removed, &mut out);
    list("datasets changed", &r.datasets_changed, &mut out);
    if r.tls_reloaded {
        out.push_str("  TLS certificate and key read again: new connections use them\n");
    }
    for c in &r.sessions_closed {
        out.push_str(&format!(
            "  closed session {}/{} (token {:?}): {}: {}\n",
            c.dataset, c.client, c.token, c.code, c.reason
        ));
    }
    out.push_str(&format!(
        "  sessions kept: {}, closed: {}\n",
        r.sessions_kept,
        r.sessions_closed.len()
    ));
    for w in &r.needs_restart {
        out.push_str(&format!("  needs a restart: {w}\n"));
    }
    out
}
