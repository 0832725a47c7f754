//! `tether hub schema DATASET`: the operator's view of a dataset's tables
//! and their schema history, and the deliberate acceptance of a breaking
//! change (`--accept TABLE`).
//!
//! It opens the hub's SQLite store directly (WAL: a running hub keeps
//! serving). A running hub reads the tables' schema state from the store at
//! every `hello` and every batch, never from a cache, so an acceptance
//! armed here is seen by the next connection.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use super::store::sqlite::SqliteStore;
use super::store::versions::TableHistory;
use super::store::HubStore;
use crate::config::{HubConfig, StoreUrl};

/// Runs the command; the text to print, or an error naming what to do.
pub fn run(
    cfg: &HubConfig,
    dataset: &str,
    accept: Option<&str>,
    json: bool,
) -> Result<String, String> {
    let StoreUrl::Sqlite(path) = cfg.store_url()?;
    let store = open(&path)?;
    if let Some(table) = accept {
        store
            .accept_breaking(dataset, table)
            .map_err(|e| e.to_string())?;
    }
    let tables = store.schema_history(dataset).map_err(|e| e.to_string())?;
    if json {
        return Ok(serde_json::to_string_pretty(&serde_json::json!({
            "dataset": dataset,
            "accepted": accept,
            "tables": tables,
        }))
        .expect("BUG: encodes"));
    }
    let mut out = String::new();
    if let Some(table) = accept {
        let version = tables
            .iter()
            .find(|t| t.name == table)
            .map(|t| t.version)
            .unwrap_or(0);
        out.push_str(&format!(
            "accepted: the next device (with a read_write token) whose schema of {table:?} breaks with version {version} makes it version {}; its rows are then written again in the new layout, and devices whose app still has an older schema are refused (\"upgrade the app\").\nOn that device run `tether reconnect`, or wait for its next attempt.\n\n",
            version + 1
        ));
    }
    if tables.is_empty() {
        out.push_str(&format!(
            "dataset {dataset:?} has no tables on the hub yet: a table is recorded when a device first syncs it\n"
        ));
    }
    for t in &tables {
        out.push_str(&show(t));
    }
    Ok(out)
}

fn open(path: &Path) -> Result<SqliteStore, String> {
    if !path.exists() {
        return Err(format!(
            "the hub store {} does not exist; the hub creates it when it first starts (check `store` in hub.toml)",
            path.display()
        ));
    }
    SqliteStore::open(path).map_err(|e| e.to_string())
}

fn show(t: &TableHistory) -> String {
    let mut out = format!(
        "table {:?}: version {}{}\n",
        t.name,
        t.version,
        if t.strict { ", STRICT" } else { "" }
    );
    if let Some(cur) = t.versions.iter().find(|v| v.version == t.version) {
        let cols: Vec<String> = cur
            .schema
            .columns
            .iter()
            .zip(&cur.schema.types)
            .enumerate()
            .map(|(i, (c, ty))| {
                let key = cur.schema.pk.iter().position(|&k| k as usize == i);
                let mut s = format!("{c} {ty}").trim().to_owned();
                if let Some(k) = key {
                    s.push_str(&format!(" (key {})", k + 1));
                }
                s
            })
            .collect();
        out.push_str(&format!("  columns: {}\n", cols.join(", ")));
    }
    out.push_str("  history:\n");
    for v in &t.versions {
        let at =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(v.at.max(0) as u64));
        out.push_str(&format!("    v{}  {at}  {}\n", v.version, v.change));
    }
    if t.floor > 1 {
        out.push_str(&format!(
            "  devices need at least the columns of version {} (older apps are refused: upgrade the app)\n",
            t.floor
        ));
    }
    if t.accept {
        out.push_str("  a breaking change is accepted: the next device that brings one makes it the next version\n");
    }
    out
}
