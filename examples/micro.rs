use std::time::Instant;
use tether::config::ConflictPolicy;
use tether::local::Replica;
use tether::proto::{Op, RemoteChange, Value};
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.db");
    let c = rusqlite::Connection::open(&p).unwrap();
    c.execute_batch("CREATE TABLE notes (id TEXT PRIMARY KEY, title TEXT NOT NULL, body TEXT NOT NULL, updated INTEGER NOT NULL)").unwrap();
    let mut r = Replica::open("b", &p, &[("notes".into(), ConflictPolicy::ServerWins)]).unwrap();
    let c2 = rusqlite::Connection::open(dir.path().join("raw.db")).unwrap();
    c2.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF; CREATE TABLE notes (id TEXT PRIMARY KEY, title TEXT NOT NULL, body TEXT NOT NULL, updated INTEGER NOT NULL); CREATE TABLE ver (k0, version INTEGER NOT NULL, PRIMARY KEY (k0)) WITHOUT ROWID;").unwrap();
    for round in 0..5 {
        let t = Instant::now();
        let tx = c2.unchecked_transaction().unwrap();
        for _ in 0..4000 {
            let id = uuid::Uuid::new_v4().to_string();
            tx.prepare_cached("INSERT INTO notes VALUES (?1, ?2, ?3, 5)")
                .unwrap()
                .execute(rusqlite::params![id, "x".repeat(32), "y".repeat(200)])
                .unwrap();
            tx.prepare_cached("SELECT version FROM ver WHERE k0 = ?1")
                .unwrap()
                .query_row([&id], |r| r.get::<_, i64>(0))
                .ok();
            tx.prepare_cached("INSERT INTO ver VALUES (?1, 7)")
                .unwrap()
                .execute([&id])
                .unwrap();
        }
        tx.commit().unwrap();
        println!("raw {round}: {:?}", t.elapsed());
    }
    let mut v = 0;
    for round in 0..5 {
        let changes: Vec<RemoteChange> = (0..4000)
            .map(|i| {
                v += 1;
                RemoteChange {
                    version: v,
                    table: "notes".into(),
                    op: Op::Upsert,
                    pk: vec![Value::Text(uuid::Uuid::new_v4().to_string())],
                    values: vec![],
                }
            })
            .map(|mut c| {
                c.values = vec![
                    c.pk[0].clone(),
                    Value::Text("x".repeat(32)),
                    Value::Text("y".repeat(200)),
                    Value::Integer(5),
                ];
                c
            })
            .collect();
        let t = Instant::now();
        r.apply_remote(&changes, v).unwrap();
        println!("round {round}: {:?}", t.elapsed());
    }
}
#[allow(dead_code)]
fn unused() {}
