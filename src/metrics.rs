//! Prometheus metrics of the daemon and the hub (`prometheus-client`).
//!
//! Each daemon and each hub owns its own registry (no process-wide global),
//! so an app that embeds several of them, or a test, gets separate figures.
//! Counters live here, outside the sessions, so they keep counting across a
//! session restarted by a reload. Gauges that describe the present (sessions
//! by state, pending changes) are filled from the sessions' status at scrape
//! time instead of being kept up to date on every change.
//!
//! The text is OpenMetrics 1.0 (the format Prometheus negotiates first); it
//! differs from the older 0.0.4 text format only by its `# EOF` line and by
//! counters being declared without their `_total` suffix.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

use crate::clock::now_ms;
use crate::proto::UploadSummary;
use crate::session::{ConnectionState, SessionState, Status};

/// `Content-Type` of the rendered text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets: 0.5 ms doubling up to about 33 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

type Latency = Family<DbLabel, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbLabel {
    pub db: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// What the hub answered for one uploaded change.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    applied,
    conflict,
    invalid,
    materialize_error,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::applied,
        Outcome::conflict,
        Outcome::invalid,
        Outcome::materialize_error,
    ];

    fn count(self, s: &UploadSummary) -> u64 {
        match self {
            Outcome::applied => s.applied,
            Outcome::conflict => s.conflict,
            Outcome::invalid => s.invalid,
            Outcome::materialize_error => s.materialize_error,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DbOutcome {
    db: String,
    outcome: Outcome,
}

/// The daemon's metrics; see the README for what each one means.
#[derive(Debug)]
pub struct DaemonMetrics {
    registry: Registry,
    sessions: Family<StateLabel, Gauge>,
    connections: Family<StateLabel, Gauge>,
    pending: Family<DbLabel, Gauge>,
    oldest_pending: Family<DbLabel, FloatGauge>,
    cursor_lag: Family<DbLabel, Gauge>,
    upload_batches: Family<DbLabel, Counter>,
    uploaded: Family<DbOutcome, Counter>,
    uploaded_bytes: Family<DbLabel, Counter>,
    downloaded: Family<DbLabel, Counter>,
    downloaded_bytes: Family<DbLabel, Counter>,
    connects: Family<DbLabel, Counter>,
    reconnects: Family<DbLabel, Counter>,
    recoveries: Family<DbLabel, Counter>,
    upload_latency: Latency,
}

impl Default for DaemonMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl DaemonMetrics {
    pub fn new() -> DaemonMetrics {
        let mut r = Registry::with_prefix("tether");
        DaemonMetrics {
            sessions: add(
                &mut r,
                "sessions",
                "Sync sessions by state (active, paused, waiting_for_access_token, dying, inactive, error)",
                Family::default(),
            ),
            connections: add(
                &mut r,
                "connections",
                "Sync sessions by connection state (disconnected, connecting, connected)",
                Family::default(),
            ),
            pending: add(
                &mut r,
                "pending_changes",
                "Captured local writes not yet answered by the hub",
                Family::default(),
            ),
            oldest_pending: add(
                &mut r,
                "oldest_pending_seconds",
                "Age of the oldest captured local write not yet answered by the hub (0 when none)",
                Family::default(),
            ),
            cursor_lag: add(
                &mut r,
                "download_lag_changes",
                "Hub sequence numbers the local database has not applied yet (hub head minus cursor)",
                Family::default(),
            ),
            upload_batches: add(
                &mut r,
                "upload_batches",
                "Upload batches answered by the hub",
                Family::default(),
            ),
            uploaded: add(
                &mut r,
                "uploaded_changes",
                "Uploaded changes by the hub's answer",
                Family::default(),
            ),
            uploaded_bytes: add(
                &mut r,
                "uploaded_bytes",
                "Bytes of upload frames answered by the hub",
                Family::default(),
            ),
            downloaded: add(
                &mut r,
                "downloaded_changes",
                "Changes received from the hub and applied locally",
                Family::default(),
            ),
            downloaded_bytes: add(
                &mut r,
                "downloaded_bytes",
                "Bytes of change frames received from the hub",
                Family::default(),
            ),
            connects: add(
                &mut r,
                "connects",
                "Connections the hub welcomed",
                Family::default(),
            ),
            reconnects: add(
                &mut r,
                "reconnects",
                "Connection attempts after a connection ended or failed",
                Family::default(),
            ),
            recoveries: add(
                &mut r,
                "recoveries",
                "Recoveries from a hub whose history went back (store restored): the database downloaded the dataset again and sent its rows",
                Family::default(),
            ),
            upload_latency: add(
                &mut r,
                "upload_latency_seconds",
                "From the local commit of a write to the hub's answer for it",
                Family::new_with_constructor(latency as fn() -> Histogram),
            ),
            registry: r,
        }
    }

    /// The counters of one database's session.
    pub fn session(&self, db: &str) -> SessionMetrics {
        let l = DbLabel { db: db.to_owned() };
        SessionMetrics {
            upload_batches: self.upload_batches.get_or_create_owned(&l),
            uploaded: Outcome::ALL.map(|outcome| {
                self.uploaded.get_or_create_owned(&DbOutcome {
                    db: db.to_owned(),
                    outcome,
                })
            }),
            uploaded_bytes: self.uploaded_bytes.get_or_create_owned(&l),
            downloaded: self.downloaded.get_or_create_owned(&l),
            downloaded_bytes: self.downloaded_bytes.get_or_create_owned(&l),
            connects: self.connects.get_or_create_owned(&l),
            reconnects: self.reconnects.get_or_create_owned(&l),
            recoveries: self.recoveries.get_or_create_owned(&l),
            upload_latency: Some(self.upload_latency.get_or_create_owned(&l)),
        }
    }

    /// Renders every metric, with the gauges taken from `statuses` (one per
    /// configured database, as the control socket's `status` reports them).
    pub fn render(&self, statuses: &[Status]) -> String {
        for s in SessionState::ALL {
            let n = statuses.iter().filter(|st| st.session == s).count();
            self.sessions
                .get_or_create(&StateLabel {
                    state: s.as_str().to_owned(),
                })
                .set(n as i64);
        }
        for c in ConnectionState::ALL {
            let n = statuses.iter().filter(|st| st.connection == c).count();
            self.connections
                .get_or_create(&StateLabel {
                    state: c.as_str().to_owned(),
                })
                .set(n as i64);
        }
        // Databases removed by a reload disappear from the gauges.
        self.pending.clear();
        self.oldest_pending.clear();
        self.cursor_lag.clear();
        for s in statuses {
            let l = DbLabel { db: s.name.clone() };
            self.pending.get_or_create(&l).set(s.pending_changes as i64);
            let age = match s.oldest_pending_ms {
                Some(ms) if s.pending_changes > 0 => ms as f64 / 1000.0,
                _ => 0.0,
            };
            self.oldest_pending.get_or_create(&l).set(age);
            self.cursor_lag
                .get_or_create(&l)
                .set(s.hub_head.saturating_sub(s.cursor) as i64);
        }
        encode(&self.registry)
    }
}

/// One session's counters; clones share the figures.
#[derive(Clone, Debug, Default)]
pub struct SessionMetrics {
    upload_batches: Counter,
    uploaded: [Counter; 4],
    uploaded_bytes: Counter,
    downloaded: Counter,
    downloaded_bytes: Counter,
    pub connects: Counter,
    pub reconnects: Counter,
    pub recoveries: Counter,
    upload_latency: Option<Histogram>,
}

impl SessionMetrics {
    /// Counts an answered upload batch of `bytes`, and the time from each
    /// write's local commit (`captured_ms`, milliseconds since the epoch) to
    /// the answer.
    pub fn uploaded(&self, s: &UploadSummary, bytes: u64, captured_ms: &[i64]) {
        self.upload_batches.inc();
        for (i, o) in Outcome::ALL.into_iter().enumerate() {
            self.uploaded[i].inc_by(o.count(s));
        }
        self.uploaded_bytes.inc_by(bytes);
        if let Some(h) = &self.upload_latency {
            let now = now_ms();
            // Rows captured without a time (none in practice) are left out.
            for &at in captured_ms.iter().filter(|&&at| at > 0) {
                h.observe((now - at).max(0) as f64 / 1000.0);
            }
        }
    }

    pub fn downloaded(&self, changes: u64, bytes: u64) {
        self.downloaded.inc_by(changes);
        self.downloaded_bytes.inc_by(bytes);
    }
}

/// Registers `metric` under `name` and returns it (clones share the figures).
fn add<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}

fn encode(r: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, r)
        .expect("BUG: writing to a String cannot fail");
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatasetLabel {
    dataset: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatasetOutcome {
    dataset: String,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

/// A store operation timed by the hub.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StoreOp {
    /// Applying one upload batch (one transaction).
    apply_batch,
    /// Reading one page of changes for a catch-up.
    read_changes,
    /// Checking a client's tables and reading its position at `hello`.
    open_session,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: StoreOp,
}

/// A hub limit (a key of `[limits]` in `hub.toml`), as counted in
/// `tether_hub_limited_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Limit {
    /// An unauthenticated connection closed for a newer one (hub budget).
    max_unauthenticated,
    /// The same, for the budget of its source address.
    max_unauthenticated_per_address,
    /// An unauthenticated connection that presented no valid token in time.
    unauthenticated_timeout,
    /// A connection with a valid token refused: every session place taken.
    max_sessions,
    /// The same: its token's connections were all taken.
    max_connections_per_token,
    /// A session that sent frames faster than allowed.
    max_frames_per_second,
    /// A connection closed: incomplete frames across the hub at their limit.
    max_partial_frames_mib,
    /// A connection closed: its token's bytes in flight at their limit.
    max_in_flight_mib_per_token,
    /// An upload of more changes than allowed.
    max_upload_changes,
}

impl Limit {
    pub const ALL: [Limit; 9] = [
        Limit::max_unauthenticated,
        Limit::max_unauthenticated_per_address,
        Limit::unauthenticated_timeout,
        Limit::max_sessions,
        Limit::max_connections_per_token,
        Limit::max_frames_per_second,
        Limit::max_partial_frames_mib,
        Limit::max_in_flight_mib_per_token,
        Limit::max_upload_changes,
    ];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: Limit,
}

/// The hub's metrics; see the README for what each one means.
#[derive(Debug)]
pub struct HubMetrics {
    registry: Registry,
    sessions: Family<DatasetLabel, Gauge>,
    refused: Family<CodeLabel, Counter>,
    stalled: Family<DatasetLabel, Counter>,
    batches: Family<DatasetLabel, Counter>,
    changes: Family<DatasetOutcome, Counter>,
    bytes_in: Family<DatasetLabel, Counter>,
    bytes_out: Family<DatasetLabel, Counter>,
    fanout: Family<DatasetLabel, Histogram, fn() -> Histogram>,
    store: Family<OpLabel, Histogram, fn() -> Histogram>,
    limited: Family<LimitLabel, Counter>,
    unauthenticated: Gauge,
    partial_bytes: Gauge,
}

impl Default for HubMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl HubMetrics {
    pub fn new() -> HubMetrics {
        let mut r = Registry::with_prefix("tether_hub");
        let m = HubMetrics {
            sessions: add(
                &mut r,
                "sessions",
                "Daemon sessions connected, by dataset",
                Family::default(),
            ),
            refused: add(
                &mut r,
                "refused",
                "Connections or sessions refused, by error code (unauthorized, forbidden, schema_mismatch, ...)",
                Family::default(),
            ),
            stalled: add(
                &mut r,
                "stalled_sessions",
                "Sessions dropped because the daemon took no data for the read timeout while frames waited for it",
                Family::default(),
            ),
            batches: add(
                &mut r,
                "upload_batches",
                "Upload batches applied",
                Family::default(),
            ),
            changes: add(
                &mut r,
                "changes",
                "Uploaded changes by outcome (applied, conflict, invalid, materialize_error)",
                Family::default(),
            ),
            bytes_in: add(
                &mut r,
                "received_bytes",
                "Bytes of frames received from daemons",
                Family::default(),
            ),
            bytes_out: add(
                &mut r,
                "sent_bytes",
                "Bytes of frames sent to daemons",
                Family::default(),
            ),
            fanout: add(
                &mut r,
                "fanout_latency_seconds",
                "From a batch being stored to its changes being sent to another session",
                Family::new_with_constructor(latency as fn() -> Histogram),
            ),
            store: add(
                &mut r,
                "store_seconds",
                "Time of store operations",
                Family::new_with_constructor(latency as fn() -> Histogram),
            ),
            limited: add(
                &mut r,
                "limited",
                "Connections closed or refused, or sessions ended, by the [limits] key of hub.toml they met",
                Family::default(),
            ),
            unauthenticated: add(
                &mut r,
                "unauthenticated_connections",
                "Connections that have not presented a valid token yet",
                Gauge::default(),
            ),
            partial_bytes: add(
                &mut r,
                "partial_frame_bytes",
                "Bytes read from connections with a valid token and not yet part of a complete message",
                Gauge::default(),
            ),
            registry: r,
        };
        // Every limit shows, at zero, before it is ever met.
        for limit in Limit::ALL {
            let _ = m.limited.get_or_create(&LimitLabel { limit });
        }
        m
    }

    pub fn render(&self) -> String {
        encode(&self.registry)
    }

    /// A connection or session met `limit`.
    pub fn limited(&self, limit: Limit) {
        self.limited.get_or_create(&LimitLabel { limit }).inc();
    }

    /// How many times `limit` was met so far.
    pub fn limited_count(&self, limit: Limit) -> u64 {
        self.limited.get_or_create(&LimitLabel { limit }).get()
    }

    /// Unauthenticated connections came (`1`) or went (`-1`).
    pub fn unauthenticated(&self, delta: i64) {
        self.unauthenticated.inc_by(delta);
    }

    /// Bytes of incomplete frames were read (positive) or taken (negative).
    pub fn partial_bytes(&self, delta: i64) {
        self.partial_bytes.inc_by(delta);
    }

    /// Shows a configured dataset's figures (at zero) before any session.
    pub fn declare_dataset(&self, dataset: &str) {
        let l = DatasetLabel {
            dataset: dataset.to_owned(),
        };
        let _ = self.sessions.get_or_create(&l);
        let _ = self.stalled.get_or_create(&l);
        let _ = self.batches.get_or_create(&l);
        let _ = self.bytes_in.get_or_create(&l);
        let _ = self.bytes_out.get_or_create(&l);
        for outcome in Outcome::ALL {
            let _ = self.changes.get_or_create(&DatasetOutcome {
                dataset: dataset.to_owned(),
                outcome,
            });
        }
    }

    /// A connection or session refused with `code`.
    pub fn refused(&self, code: &str) {
        self.refused
            .get_or_create(&CodeLabel {
                code: code.to_owned(),
            })
            .inc();
    }

    /// A session of `dataset` dropped because its daemon took nothing.
    pub fn stalled(&self, dataset: &str) {
        self.stalled
            .get_or_create(&DatasetLabel {
                dataset: dataset.to_owned(),
            })
            .inc();
    }

    pub fn store_time(&self, op: StoreOp, took: std::time::Duration) {
        self.store
            .get_or_create(&OpLabel { op })
            .observe(took.as_secs_f64());
    }

    /// The figures of one session of `dataset`; counts it as connected
    /// until the returned value is dropped.
    pub fn session(&self, dataset: &str) -> HubSessionMetrics {
        let l = DatasetLabel {
            dataset: dataset.to_owned(),
        };
        let connected = self.sessions.get_or_create_owned(&l);
        connected.inc();
        HubSessionMetrics {
            batches: self.batches.get_or_create_owned(&l),
            changes: Outcome::ALL.map(|outcome| {
                self.changes.get_or_create_owned(&DatasetOutcome {
                    dataset: dataset.to_owned(),
                    outcome,
                })
            }),
            bytes_in: self.bytes_in.get_or_create_owned(&l),
            bytes_out: self.bytes_out.get_or_create_owned(&l),
            fanout: self.fanout.get_or_create_owned(&l),
            connected,
        }
    }
}

/// One hub session's figures.
pub struct HubSessionMetrics {
    batches: Counter,
    changes: [Counter; 4],
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    fanout: Histogram,
    connected: Gauge,
}

impl HubSessionMetrics {
    pub fn applied(&self, s: &UploadSummary) {
        self.batches.inc();
        for (i, o) in Outcome::ALL.into_iter().enumerate() {
            self.changes[i].inc_by(o.count(s));
        }
    }

    /// A published batch stored at `stored` was just sent.
    pub fn fanned_out(&self, stored: std::time::Instant) {
        self.fanout.observe(stored.elapsed().as_secs_f64());
    }
}

impl Drop for HubSessionMetrics {
    fn drop(&mut self) {
        self.connected.dec();
    }
}
