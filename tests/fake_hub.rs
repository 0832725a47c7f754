//! A daemon facing a hub that sends what no correct hub would: it drops the
//! connection, changes nothing locally, keeps every pending change, and sends
//! them all once a correct hub answers.

mod common;

use std::sync::Arc;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tether::config::ConflictPolicy;
use tether::embedded::{database, EmbeddedDaemon};
use tether::proto::{
    self, Access, CaughtUp, ChangeResult, Changes, ClientFrame, HubFrame, Outcome, UploadResult,
    UploadSummary, Welcome,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message;

/// What the first connection gets wrong.
#[derive(Clone, Copy)]
enum Lie {
    /// Answers an upload with a seq that was never sent.
    AnswerUnsentSeq,
    /// Claims this client's seqs reached 2^63.
    HugeClientSeq,
    /// Pushes changes up to 2^62.
    HugeCursor,
}

/// What the fake hub saw, per connection (0 = the lying one).
#[derive(Debug)]
enum Seen {
    Hello(usize, proto::Hello),
    Upload(usize, proto::Upload),
}

/// A hub that lies on its first connection and answers correctly after:
/// every upload applied, versions counted from 1.
/// An honest connection waits for `go` before its welcome, so that the test
/// can read the daemon's error about the lie first.
async fn fake_hub(lie: Lie) -> (String, mpsc::Receiver<Seen>, Arc<Notify>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/sync", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel(64);
    let go = Arc::new(Notify::new());
    let go_hub = go.clone();
    tokio::spawn(async move {
        // Bounded: a test needs two or three connections.
        for conn in 0..8usize {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            let go = go_hub.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let mut version = 0u64;
                while let Some(Ok(msg)) = ws.next().await {
                    let Message::Binary(b) = msg else { continue };
                    let frame: ClientFrame = proto::decode(&b).unwrap();
                    let reply: Vec<HubFrame> = match frame {
                        ClientFrame::Hello(h) => {
                            let _ = tx.send(Seen::Hello(conn, h)).await;
                            let lying = conn == 0;
                            if !lying {
                                go.notified().await;
                            }
                            let mut out = vec![HubFrame::Welcome(Welcome {
                                protocol: proto::PROTOCOL_VERSION,
                                head: 0,
                                access: Access::ReadWrite,
                                client_seq: match lie {
                                    Lie::HugeClientSeq if lying => 1 << 63,
                                    _ => 0,
                                },
                                features: Vec::new(),
                            })];
                            if lying && matches!(lie, Lie::HugeCursor) {
                                out.push(HubFrame::Changes(Changes {
                                    changes: Vec::new(),
                                    up_to: 1 << 62,
                                    head: 1 << 62,
                                }));
                            }
                            out.push(HubFrame::CaughtUp(CaughtUp { head: 0 }));
                            out
                        }
                        ClientFrame::Upload(u) => {
                            let _ = tx.send(Seen::Upload(conn, u.clone())).await;
                            let mut results: Vec<ChangeResult> = u
                                .changes
                                .iter()
                                .map(|c| {
                                    version += 1;
                                    ChangeResult {
                                        seq: c.seq,
                                        outcome: Outcome::Applied { version },
                                    }
                                })
                                .collect();
                            if conn == 0 && matches!(lie, Lie::AnswerUnsentSeq) {
                                results.last_mut().unwrap().seq = 1_000_000;
                            }
                            vec![HubFrame::UploadResult(UploadResult {
                                batch: u.batch,
                                summary: UploadSummary::of(&results),
                                results,
                                more: false,
                            })]
                        }
                        ClientFrame::Head(h) => {
                            vec![HubFrame::Head(proto::Head { id: h.id, head: 0 })]
                        }
                    };
                    for f in reply {
                        if ws
                            .send(Message::Binary(proto::encode(&f).into()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, rx, go)
}

async fn next_seen(rx: &mut mpsc::Receiver<Seen>) -> Seen {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("the fake hub hears from the daemon in time")
        .expect("fake hub running")
}

/// What a run saw: the hub's view, and the daemon's error after the lie.
struct Run {
    dir: tempfile::TempDir,
    daemon: EmbeddedDaemon,
    seen: Vec<Seen>,
    error: String,
}

/// Writes `n` rows, starts a daemon against a hub that lies once, and
/// returns what the hub saw until the second connection's first upload.
async fn run(lie: Lie, n: i64) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let a = app(&path, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    for i in 0..n {
        a.execute("INSERT INTO t VALUES (?1, 'x')", [i]).unwrap();
    }
    let (url, mut rx, go) = fake_hub(lie).await;
    let d = EmbeddedDaemon::start(
        &url,
        "tth_unused",
        vec![database("db", path, &["t"], ConflictPolicy::ServerWins)],
    );
    let mut seen = Vec::new();
    let mut error = None;
    loop {
        let s = next_seen(&mut rx).await;
        let done = matches!(s, Seen::Upload(c, _) if c > 0);
        if matches!(s, Seen::Hello(1, _)) {
            // Not connected again yet: the error of the lie is still shown.
            error = status(&d, "db").last_error;
            go.notify_one();
        }
        seen.push(s);
        if done {
            return Run {
                dir,
                daemon: d,
                seen,
                error: error.expect("the daemon reconnected after the lie"),
            };
        }
    }
}

fn uploads(seen: &[Seen], conn: usize) -> Vec<u64> {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Upload(c, u) if *c == conn => Some(u.changes.iter().map(|c| c.seq)),
            _ => None,
        })
        .flatten()
        .collect()
}

fn hello(seen: &[Seen], conn: usize) -> &proto::Hello {
    seen.iter()
        .find_map(|s| match s {
            Seen::Hello(c, h) if *c == conn => Some(h),
            _ => None,
        })
        .expect("hello seen")
}

async fn wait_all_answered(d: &EmbeddedDaemon, n: u64) {
    let rx = d.status("db");
    wait_until("every change answered by the honest hub", || {
        let s = rx.borrow();
        s.pending_changes == 0 && s.uploaded == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_for_a_seq_never_sent_discards_nothing_and_everything_is_sent_again() {
    let Run {
        dir: _dir,
        daemon: d,
        seen,
        error,
    } = run(Lie::AnswerUnsentSeq, 54).await;
    let first = uploads(&seen, 0);
    assert_eq!(first.len(), 54, "the first connection got the whole batch");
    let again = uploads(&seen, 1);
    assert_eq!(
        again.first(),
        first.first(),
        "after the bad answer the same changes go out again: nothing was consumed"
    );
    assert!(
        error.contains("1000000"),
        "the error names the bad seq: {error}"
    );
    wait_all_answered(&d, 54).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_claiming_client_seq_2_pow_63_renumbers_nothing() {
    let Run {
        dir: _dir,
        daemon: d,
        seen,
        error,
    } = run(Lie::HugeClientSeq, 5).await;
    assert!(
        uploads(&seen, 0).is_empty(),
        "nothing was sent on the lying connection"
    );
    let seqs = uploads(&seen, 1);
    assert_eq!(seqs.len(), 5);
    assert!(
        seqs.iter().all(|s| *s <= 10),
        "the local numbering was left alone: {seqs:?}"
    );
    assert!(error.contains("client seq"), "{error}");
    wait_all_answered(&d, 5).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_up_to_2_pow_62_are_never_stored_as_the_cursor() {
    let Run {
        dir,
        daemon: d,
        seen,
        error,
    } = run(Lie::HugeCursor, 3).await;
    assert_eq!(hello(&seen, 0).cursor, 0);
    assert_eq!(
        hello(&seen, 1).cursor,
        0,
        "the next hello still starts from the cursor the database really has"
    );
    assert!(error.contains("up_to"), "{error}");
    wait_all_answered(&d, 3).await;
    assert_eq!(status(&d, "db").cursor, 0);
    d.stop().await;
    // The stored cursor, read back from the file, never took the lie.
    let c = rusqlite::Connection::open(dir.path().join("a.db")).unwrap();
    let stored: Option<i64> = c
        .query_row(
            "SELECT value FROM _tether_meta WHERE key = 'cursor'",
            [],
            |r| r.get(0),
        )
        .ok();
    assert!(stored.unwrap_or(0) < 1 << 62, "stored cursor {stored:?}");
}
