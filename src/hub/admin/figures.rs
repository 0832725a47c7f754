//! What the admin answers show, gathered from the live config, the registry
//! of sessions and the store (read on a blocking thread).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{AdminError, AdminResponse, ClientInfo, DatasetInfo, TokenInfo};
use crate::hub::store::inspect::Inspection;
use crate::hub::HubInner;

/// The store's figures for every declared dataset.
async fn inspect(inner: &Arc<HubInner>, names: Vec<String>) -> Result<Inspection, AdminResponse> {
    let store = inner.store.clone();
    match tokio::task::spawn_blocking(move || store.inspect(&names)).await {
        Ok(Ok(i)) => Ok(i),
        Ok(Err(e)) => Err(AdminResponse::error(AdminError::Store, e.to_string())),
        Err(e) => Err(AdminResponse::error(
            AdminError::Store,
            format!("reading the store failed: {e}"),
        )),
    }
}

fn declared(inner: &HubInner) -> Vec<String> {
    let mut names: Vec<String> = inner.live().datasets.keys().cloned().collect();
    names.sort();
    names
}

/// `datasets`: each declared dataset with its figures.
pub async fn datasets(inner: &Arc<HubInner>) -> AdminResponse {
    let live = inner.live();
    let found = match inspect(inner, declared(inner)).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    let mut sessions: HashMap<String, usize> = HashMap::new();
    for s in inner.sessions.seats() {
        *sessions.entry(s.dataset.clone()).or_default() += 1;
    }
    let datasets = found
        .datasets
        .into_iter()
        .map(|(name, f)| {
            let mut tables: Vec<String> = live
                .datasets
                .get(&name)
                .map(|t| t.iter().cloned().collect())
                .unwrap_or_default();
            tables.sort();
            DatasetInfo {
                sessions: sessions.get(&name).copied().unwrap_or(0),
                tables,
                head: f.head,
                live_rows: f.live_rows,
                log_changes: f.log_changes,
                bytes: f.bytes,
                name,
            }
        })
        .collect();
    AdminResponse::Datasets {
        store_bytes: found.store_bytes,
        datasets,
    }
}

/// `clients`: every live session, then every identity the store knows in a
/// declared dataset (with when it was last seen, if since the hub started).
pub async fn clients(inner: &Arc<HubInner>) -> AdminResponse {
    let found = match inspect(inner, declared(inner)).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    let mut out: BTreeMap<(String, String), ClientInfo> = BTreeMap::new();
    let mut heads: HashMap<String, u64> = HashMap::new();
    for (name, f) in &found.datasets {
        heads.insert(name.clone(), f.head);
        for c in &f.clients {
            out.insert(
                (name.clone(), c.client.clone()),
                ClientInfo {
                    dataset: name.clone(),
                    client: c.client.clone(),
                    connected: false,
                    connection: None,
                    token: None,
                    address: None,
                    connected_since_ms: None,
                    last_seen_ms: None,
                    cursor: None,
                    head: f.head,
                    lag: None,
                    last_seq: c.last_seq,
                },
            );
        }
    }
    let head_of = |d: &str| heads.get(d).copied().unwrap_or(0);
    for (dataset, client, seen) in inner.sessions.last_seen() {
        let head = head_of(&dataset);
        let e = out
            .entry((dataset.clone(), client.clone()))
            .or_insert_with(|| unknown(&dataset, &client, head));
        e.token = Some(seen.token_name);
        e.address = Some(seen.peer.to_string());
        e.last_seen_ms = Some(seen.at_ms);
        e.cursor = Some(seen.cursor);
        e.lag = Some(head.saturating_sub(seen.cursor));
    }
    for s in inner.sessions.seats() {
        // The store's head may be older than a batch applied since it was
        // read: the fan-out's head is the newest known.
        let head =
            head_of(&s.dataset).max(inner.fanout.dataset(&s.dataset).head.load(Ordering::SeqCst));
        let cursor = s.cursor.load(Ordering::Relaxed);
        let e = out
            .entry((s.dataset.clone(), s.client.clone()))
            .or_insert_with(|| unknown(&s.dataset, &s.client, head));
        e.connected = true;
        e.connection = Some(s.connection.load(Ordering::Relaxed));
        e.token = Some(s.token_name());
        e.address = Some(s.peer.to_string());
        e.connected_since_ms = Some(s.since_ms);
        e.last_seen_ms = None;
        e.cursor = Some(cursor);
        e.head = head;
        e.lag = Some(head.saturating_sub(cursor));
    }
    AdminResponse::Clients {
        clients: out.into_values().collect(),
    }
}

fn unknown(dataset: &str, client: &str, head: u64) -> ClientInfo {
    ClientInfo {
        dataset: dataset.to_owned(),
        client: client.to_owned(),
        connected: false,
        connection: None,
        token: None,
        address: None,
        connected_since_ms: None,
        last_seen_ms: None,
        cursor: None,
        head,
        lag: None,
        last_seq: 0,
    }
}

/// `tokens`: the tokens of the config in force, never their hashes.
pub fn tokens(inner: &HubInner) -> AdminResponse {
    let live = inner.live();
    let mut sessions: HashMap<String, usize> = HashMap::new();
    for s in inner.sessions.seats() {
        *sessions.entry(s.token_sha256.clone()).or_default() += 1;
    }
    let tokens = live
        .config
        .tokens
        .iter()
        .filter_map(|t| live.tokens.by_hash(&t.sha256).map(|g| (t, g)))
        .map(|(t, g)| TokenInfo {
            name: t.name.clone(),
            datasets: g.datasets().to_vec(),
            access: g.access,
            sessions: sessions.get(&t.sha256).copied().unwrap_or(0),
        })
        .collect();
    AdminResponse::Tokens { tokens }
}
