//! Figures of the store for the admin interface (`tether hub datasets`,
//! `tether hub clients`): per dataset its head, live rows, log length and
//! bytes on disk, and the clients the store knows.
//!
//! The SQLite store answers on a read-only connection of its own, opened
//! for the question: counting rows and pages of a large dataset takes a
//! while, and neither the writer nor the catch-up reader waits for it.

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::sqlite::dataset_tables;
use super::StoreError;

/// One dataset as the store holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetFigures {
    /// Last sequence number (0 when empty).
    pub head: u64,
    /// Rows that exist now (not deleted).
    pub live_rows: u64,
    /// Changes in the log.
    pub log_changes: u64,
    /// Bytes of the store file its log and rows take (pages).
    pub bytes: u64,
    /// Clients that ever claimed an identity in it.
    pub clients: Vec<KnownClient>,
}

/// A client identity the store knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownClient {
    pub client: String,
    /// Highest client seq applied.
    pub last_seq: u64,
}

/// What the store holds, for every dataset asked about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    /// Bytes of the whole store file (pages in use and free).
    pub store_bytes: u64,
    pub datasets: Vec<(String, DatasetFigures)>,
}

/// Opens the store file at `path` read-only and reads the figures of
/// `datasets` (a dataset the store has never seen has all zeros).
pub fn inspect_file(path: &std::path::Path, datasets: &[String]) -> Result<Inspection, StoreError> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Backend(format!("opening {} to inspect: {e}", path.display())))?;
    c.busy_timeout(std::time::Duration::from_secs(10))?;
    let pages: u64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let page_size: u64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let mut out = Inspection {
        store_bytes: pages * page_size,
        datasets: Vec::new(),
    };
    for name in datasets {
        out.datasets.push((name.clone(), dataset(&c, name)?));
    }
    Ok(out)
}

fn dataset(c: &Connection, name: &str) -> Result<DatasetFigures, StoreError> {
    let found: Option<(i64, i64)> = c
        .query_row(
            "SELECT id, head FROM datasets WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((id, head)) = found else {
        return Ok(DatasetFigures::default());
    };
    let (log, rows) = dataset_tables(id);
    let exists = |t: &str| -> Result<bool, StoreError> {
        Ok(c.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
            [t],
            |r| r.get::<_, i64>(0),
        )? > 0)
    };
    if !exists(&log)? || !exists(&rows)? {
        return Ok(DatasetFigures {
            head: head as u64,
            ..DatasetFigures::default()
        });
    }
    let count = |sql: String| -> Result<u64, StoreError> {
        Ok(c.query_row(&sql, [], |r| r.get::<_, i64>(0))? as u64)
    };
    let live_rows = count(format!("SELECT count(*) FROM {rows} WHERE deleted = 0"))?;
    let log_changes = count(format!("SELECT count(*) FROM {log}"))?;
    // dbstat's aggregate form: one row per table, its pages summed.
    let bytes = count(format!(
        "SELECT coalesce(sum(pgsize), 0) FROM dbstat('main', 1) WHERE name IN ('{log}', '{rows}')"
    ))?;
    let mut q =
        c.prepare("SELECT client, last_seq FROM clients WHERE dataset = ?1 ORDER BY client")?;
    let clients = q
        .query_map([id], |r| {
            Ok(KnownClient {
                client: r.get(0)?,
                last_seq: r.get::<_, i64>(1)? as u64,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DatasetFigures {
        head: head as u64,
        live_rows,
        log_changes,
        bytes,
        clients,
    })
}
