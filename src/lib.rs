//! tether keeps local SQLite databases in realtime two-way sync with a hub.
//!
//! How data flows:
//!
//! 1. An app commits to its SQLite file with any client. Triggers installed by
//!    [`local::schema`] record the touched keys in tether's outbox tables inside
//!    the app's own transaction.
//! 2. The file watcher ([`local::watch`]) wakes the database's [`session`],
//!    which reads a batch from the outbox on the database's own thread
//!    ([`local::LocalDb`]) and sends it as an `upload` frame ([`proto`]).
//! 3. The [`hub`] applies the batch to its store ([`hub::store`]) in one
//!    transaction, answers per change, and fans applied changes out to every
//!    other session of the dataset ([`hub::fanout`]).
//! 4. Receiving sessions apply them locally, with the cursor in the same
//!    transaction ([`local::replica`]).
//!
//! Modules:
//!
//! * [`clock`]: wall-clock milliseconds and optional deadlines.
//! * [`config`]: `tether.toml` and `hub.toml`.
//! * [`proto`]: frames of the wire protocol, codec, limits. No I/O.
//! * [`local`]: the local database: capture, outbox, applying remote changes.
//! * [`session`]: one database's connection to the hub: driver loop, backoff, status.
//! * [`daemon`]: runs one session per configured database.
//! * [`control`]: the local control socket (daemon side and CLI side).
//! * [`hub`]: the server: auth, sessions, fan-out, store, reloading hub.toml,
//!   the admin socket.
//! * [`metrics`]: Prometheus metrics of the daemon and the hub.
//! * [`http`]: the few plain HTTP answers (`/metrics`, `/healthz`).
//! * [`listen`]: the accept loop every listener shares.
//! * [`counted`]: sockets that count bytes written, for stall detection.
//! * [`outgoing`]: frames written while the same task keeps reading.
//! * [`places`]: default paths (the control socket with or without root).
//! * [`service`]: systemd readiness, status and watchdog notifications.
//! * [`embedded`]: a hub and daemons inside one process (demo, bench, apps).
//! * [`demo`]: the self-contained `tether demo` and `tether bench`.
//! * `fuzzing`: harnesses the fuzz targets (`fuzz/`) and property tests drive.
//! * [`reliability`]: `tether reliability`, seeded fault schedules against
//!   real processes, and the accounting of every write.

pub mod clock;
pub mod config;
pub mod control;
pub mod counted;
pub mod daemon;
pub mod demo;
pub mod embedded;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod hub;
pub mod listen;
pub mod local;
pub mod metrics;
pub mod outgoing;
pub mod places;
pub mod proto;
pub mod reliability;
pub mod service;
pub mod session;
pub mod tls;
