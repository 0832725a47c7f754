//! Shared test helpers: a hub and daemons on 127.0.0.1 with temporary files,
//! app connections, and waiting for conditions with a deadline.

#![allow(dead_code)]

pub mod procs;
pub mod proxy;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tether::config::{ConflictPolicy, DatabaseConfig};
use tether::embedded::{database, EmbeddedDaemon, EmbeddedHub};
use tether::session::{ConnectionState, Status};

/// One overall deadline for any awaited condition in these tests.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `cond` until it holds or the deadline passes. A check that is
/// still running at the deadline is abandoned: the wait never outlasts it.
pub async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        match tokio::time::timeout_at(deadline, cond()).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => panic!(
                "timed out after {DEADLINE:?} waiting for {what} (a check was still running)"
            ),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tick.tick().await;
    }
}

/// Synchronous-condition variant of [`wait_for`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(what, || std::future::ready(cond())).await
}

pub const NOTES: &str =
    "CREATE TABLE notes (id TEXT PRIMARY KEY, title TEXT, body TEXT, n INTEGER)";

/// An app's own connection to its database.
pub fn app(path: &Path, schema: &str) -> Connection {
    let c = Connection::open(path).expect("open app db");
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.execute_batch(&format!("PRAGMA journal_mode = WAL; {schema};"))
        .expect("create schema");
    c
}

pub fn count(c: &Connection, table: &str) -> i64 {
    c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

/// All rows of a table, ordered by its first column, as debug text with types.
pub fn dump(c: &Connection, table: &str) -> Vec<String> {
    let mut st = c
        .prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2"))
        .unwrap();
    let n = st.column_count();
    st.query_map([], |r| {
        let mut out = Vec::new();
        for i in 0..n {
            let v: rusqlite::types::Value = r.get(i)?;
            out.push(format!("{v:?}"));
        }
        Ok(out.join("|"))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// A temporary directory with a hub.
pub struct World {
    pub dir: tempfile::TempDir,
    pub hub: Option<EmbeddedHub>,
    pub addr: String,
    pub token: String,
    config: tether::config::HubConfig,
}

impl World {
    pub async fn new(datasets: &[(&str, &[&str])]) -> World {
        let dir = tempfile::tempdir().unwrap();
        let hub = EmbeddedHub::start(&dir.path().join("hub.db"), datasets, "127.0.0.1:0")
            .await
            .expect("hub starts");
        World {
            addr: hub.addr.to_string(),
            token: hub.token.clone(),
            config: hub.config.clone(),
            hub: Some(hub),
            dir,
        }
    }

    /// A world whose hub drops clients silent for `read_timeout`.
    pub async fn with_hub_read_timeout(
        datasets: &[(&str, &[&str])],
        read_timeout: Duration,
    ) -> World {
        let mut w = World::new(datasets).await;
        w.stop_hub().await;
        w.config.read_timeout = tether::config::Dur(read_timeout);
        w.start_hub().await;
        w
    }

    /// A world whose hub serves TLS with this certificate and key (PEM).
    pub async fn with_hub_tls(
        datasets: &[(&str, &[&str])],
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> World {
        let mut w = World::new(datasets).await;
        w.stop_hub().await;
        w.config.tls_cert = Some(cert.to_owned());
        w.config.tls_key = Some(key.to_owned());
        w.start_hub().await;
        w
    }

    /// A daemon for one database file with its own reconnect settings.
    pub fn daemon_with(
        &self,
        file: &str,
        tables: &[&str],
        reconnect: tether::config::Reconnect,
    ) -> EmbeddedDaemon {
        EmbeddedDaemon::start_with(tether::config::DaemonConfig {
            control_socket: PathBuf::from("/nonexistent/tether.sock"),
            control: Default::default(),
            shutdown_timeout: tether::config::Dur(Duration::from_secs(10)),
            metrics_listen: None,
            log_level: None,
            hub: tether::config::HubConn {
                url: self.url(),
                token: Some(self.token.clone()),
                token_file: None,
                ca_file: None,
            },
            reconnect,
            databases: vec![database(
                "db",
                self.path(file),
                tables,
                ConflictPolicy::ServerWins,
            )],
        })
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/sync", self.addr)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn hub(&self) -> &EmbeddedHub {
        self.hub.as_ref().expect("hub running")
    }

    pub async fn stop_hub(&mut self) {
        if let Some(h) = self.hub.take() {
            h.stop().await;
        }
    }

    /// Starts the hub again on the same port with the same store and token.
    pub async fn start_hub(&mut self) {
        let mut config = self.config.clone();
        config.listen = self.addr.clone();
        let hub = EmbeddedHub::start_with(config, self.token.clone())
            .await
            .expect("hub restarts on its port");
        self.hub = Some(hub);
    }

    pub fn daemon(&self, dbs: Vec<DatabaseConfig>) -> EmbeddedDaemon {
        EmbeddedDaemon::start(&self.url(), &self.token, dbs)
    }

    /// A daemon syncing one database file of this world.
    pub fn daemon_for(
        &self,
        file: &str,
        tables: &[&str],
        policy: ConflictPolicy,
    ) -> EmbeddedDaemon {
        self.daemon(vec![database("db", self.path(file), tables, policy)])
    }
}

pub fn status(d: &EmbeddedDaemon, name: &str) -> Status {
    d.status(name).borrow().clone()
}

/// Waits until the session is connected, caught up and has nothing pending.
///
/// The status alone can be stale (the daemon may not have read the app's
/// latest write yet), so the database file is read too: every write
/// captured in it must be answered.
pub async fn wait_idle(d: &EmbeddedDaemon, name: &str) {
    let rx = d.status(name);
    let path = d
        .config
        .databases
        .iter()
        .find(|db| db.name == name)
        .expect("a database of this daemon")
        .path
        .clone();
    let db = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("the database opens");
    wait_until(&format!("{name} idle"), || {
        let captured: i64 = db
            .query_row("SELECT coalesce(max(seq), 0) FROM _tether_log", [], |r| {
                r.get(0)
            })
            .unwrap_or(i64::MAX);
        let s = rx.borrow();
        s.connection == ConnectionState::Connected
            && s.caught_up
            && s.pending_changes == 0
            && s.consumed >= captured as u64
    })
    .await;
}

/// The rows of `table` the hub holds now (each row's last change in the
/// hub's log), formatted like [`dump`]: an app holding exactly these rows
/// dumps the same lines. `schema` creates the table.
pub fn hub_dump(world: &World, schema: &str, table: &str) -> Vec<String> {
    let hub = Connection::open(world.path("hub.db")).unwrap();
    let mut st = hub
        .prepare(
            "SELECT l.vals FROM rows_1 r JOIN log_1 l ON l.seq = r.version
             WHERE r.tbl = ?1 AND r.deleted = 0",
        )
        .unwrap();
    let rows: Vec<Vec<tether::proto::Value>> = st
        .query_map([table], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|v| tether::proto::decode_values(&v.unwrap()).unwrap())
        .collect();
    let mem = Connection::open_in_memory().unwrap();
    mem.execute_batch(schema).unwrap();
    for r in rows {
        let marks = vec!["?"; r.len()].join(", ");
        mem.execute(
            &format!("INSERT INTO {table} VALUES ({marks})"),
            rusqlite::params_from_iter(r.iter()),
        )
        .unwrap();
    }
    dump(&mem, table)
}

/// Waits until `table` in `c` holds exactly the rows whose first column
/// (`id`) is in `want`, whatever their order.
pub async fn wait_ids(c: &Connection, table: &str, want: &[impl AsRef<str>]) {
    let mut want: Vec<String> = want.iter().map(|s| s.as_ref().to_owned()).collect();
    want.sort();
    wait_until(&format!("{table} holding {want:?}"), || {
        let mut got: Vec<String> = c
            .prepare(&format!("SELECT id FROM {table}"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        got.sort();
        got == want
    })
    .await;
}

/// Waits until both apps hold the same rows of `table`.
pub async fn wait_converged(a: &Connection, b: &Connection, table: &str) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        let (da, db) = (dump(a, table), dump(b, table));
        if da == db {
            return;
        }
        if start.elapsed() > DEADLINE {
            panic!(
                "{table} did not converge within {DEADLINE:?}: A has {} rows, B has {}; first difference: {:?}",
                da.len(),
                db.len(),
                da.iter().zip(&db).find(|(x, y)| x != y)
            );
        }
        tick.tick().await;
    }
}

pub type RawWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A hand-driven protocol client, for feeding the hub bad input.
pub async fn raw_connect(
    url: &str,
    token: Option<&str>,
    dataset: Option<&str>,
) -> Result<RawWs, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(d) = dataset {
        req.headers_mut()
            .insert("tether-dataset", d.parse().unwrap());
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

pub async fn raw_send(ws: &mut RawWs, bytes: Vec<u8>) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        bytes.into(),
    ))
    .await
    .unwrap();
}

/// How a raw connection's next read ended.
#[derive(Debug)]
pub enum Next {
    Frame(tether::proto::HubFrame),
    /// The hub closed the connection (a close frame, or the stream's end
    /// after one).
    Closed,
    /// The connection broke without a close: a reset, or the TCP stream
    /// ending with no close frame.
    Broken(String),
}

/// The next read of a raw connection, bounded by [`DEADLINE`].
pub async fn raw_next(ws: &mut RawWs) -> Next {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::{Error, Message};
    loop {
        let m = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("hub answers within the deadline");
        match m {
            Some(Ok(Message::Binary(b))) => {
                return Next::Frame(tether::proto::decode(&b).expect("hub frames decode"))
            }
            Some(Ok(Message::Close(_))) | None => return Next::Closed,
            Some(Err(Error::ConnectionClosed | Error::AlreadyClosed)) => return Next::Closed,
            Some(Err(e)) => return Next::Broken(e.to_string()),
            Some(Ok(_)) => continue,
        }
    }
}

/// The next hub frame, or None when the hub closed the connection. A
/// connection that breaks without a close fails the test: use
/// [`raw_next`] where that is allowed.
pub async fn raw_recv(ws: &mut RawWs) -> Option<tether::proto::HubFrame> {
    match raw_next(ws).await {
        Next::Frame(f) => Some(f),
        Next::Closed => None,
        Next::Broken(e) => panic!("the connection broke instead of closing: {e}"),
    }
}

/// A valid hello for the notes table of [`NOTES`].
pub fn notes_hello(dataset: &str, client: &str) -> tether::proto::ClientFrame {
    let cols: Vec<String> = ["id", "title", "body", "n"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let types: Vec<String> = ["TEXT", "TEXT", "TEXT", "INTEGER"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tether::proto::ClientFrame::Hello(tether::proto::Hello {
        protocol: tether::proto::PROTOCOL_VERSION,
        client_id: client.into(),
        client_key: format!("key-of-{client}"),
        dataset: dataset.into(),
        cursor: 0,
        tables: vec![tether::proto::TableSchema {
            name: "notes".into(),
            fingerprint: tether::local::schema::fingerprint("notes", &cols, &types, &[0]),
            columns: cols,
            types,
            pk: vec![0],
            strict: false,
        }],
        echo_own: false,
        subscribe: true,
        anchor: None,
    })
}

/// Apps and connected daemons for `a.db` and `b.db` of dataset `db`
/// (table [`NOTES`]).
pub async fn notes_pair(
    world: &World,
    policy: ConflictPolicy,
) -> (Connection, Connection, EmbeddedDaemon, EmbeddedDaemon) {
    let a = app(&world.path("a.db"), NOTES);
    let b = app(&world.path("b.db"), NOTES);
    let da = world.daemon_for("a.db", &["notes"], policy);
    let db = world.daemon_for("b.db", &["notes"], policy);
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();
    (a, b, da, db)
}
