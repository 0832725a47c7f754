use std::collections::HashMap;
use std::time::Instant;
use tether::hub::store::{sqlite::SqliteStore, HubStore};
use tether::proto::{Change, Op, TableSchema, Value};
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let st = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
    let ts = TableSchema {
        name: "notes".into(),
        columns: vec!["id".into(), "title".into(), "body".into(), "updated".into()],
        types: vec!["TEXT".into(); 4],
        pk: vec![0],
        fingerprint: "x".into(),
    };
    let tables: HashMap<String, TableSchema> = [("notes".to_string(), ts.clone())].into();
    st.register_schema("notes", &[ts]).unwrap();
    let mut seq = 0;
    for round in 0..8 {
        let changes: Vec<Change> = (0..4000)
            .map(|_| {
                seq += 1;
                let id = Value::Text(uuid::Uuid::new_v4().to_string());
                Change {
                    seq,
                    table: "notes".into(),
                    op: Op::Upsert,
                    pk: vec![id.clone()],
                    values: vec![
                        id,
                        Value::Text("x".repeat(32)),
                        Value::Text("y".repeat(200)),
                        Value::Integer(5),
                    ],
                    base: 0,
                    mask: u64::MAX,
                }
            })
            .collect();
        let t = Instant::now();
        st.apply_batch("notes", "c1", &tables, &changes, 0).unwrap();
        println!("round {round}: {:?}", t.elapsed());
    }
}
