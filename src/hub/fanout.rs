//! Per-dataset fan-out of applied changes to the live sessions.
//!
//! Applying a batch and publishing it happen under one per-dataset lock, so
//! published batches arrive in sequence order. A session that falls behind
//! (its broadcast receiver lagged) or sees a gap reads the missing changes from
//! the store by its own sequence number: nothing is ever skipped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use super::store::LogEntry;

/// How many published batches a session may fall behind before it is
/// switched to reading from the store.
pub const FANOUT_BUFFER: usize = 256;

/// Changes applied by one batch.
#[derive(Debug)]
pub struct Published {
    /// Sequence number just before the first change of this batch.
    pub after: u64,
    /// Last sequence number of this batch.
    pub last: u64,
    pub entries: Vec<LogEntry>,
    /// When the batch was stored (for the fan-out latency).
    pub stored: std::time::Instant,
    /// Schemas a breaking change just made current (its rows, written
    /// again in the new layout, are this batch): a session whose table
    /// does not have at least their columns ends instead of receiving it.
    pub breaking: Vec<crate::proto::TableSchema>,
}

pub struct DatasetFanout {
    pub tx: broadcast::Sender<Arc<Published>>,
    /// Held while a batch is applied and published.
    pub apply_lock: Mutex<()>,
    /// The dataset's head as far as this hub knows: raised under
    /// `apply_lock` once a batch is stored, and by each session opened with
    /// the head it read from the store.
    pub head: std::sync::atomic::AtomicU64,
}

/// One [`DatasetFanout`] per dataset.
#[derive(Default)]
pub struct Fanout {
    datasets: Mutex<HashMap<String, Arc<DatasetFanout>>>,
}

impl Fanout {
    pub fn dataset(&self, name: &str) -> Arc<DatasetFanout> {
        self.datasets
            .lock()
            .expect("BUG: poisoned")
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(DatasetFanout {
                    tx: broadcast::channel(FANOUT_BUFFER).0,
                    apply_lock: Mutex::new(()),
                    head: std::sync::atomic::AtomicU64::new(0),
                })
            })
            .clone()
    }
}
