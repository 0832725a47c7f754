//! Prometheus metrics of a real hub and real daemons: the text parses, the
//! figures match what happened, and counters move.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};

use common::procs::*;
use common::*;

const FAST: &str =
    "initial = \"100ms\"\nmax = \"1s\"\nping_interval = \"1s\"\nread_timeout = \"10s\"";

/// A plain HTTP/1.1 request on a fresh connection; returns status line,
/// headers (lowercased names) and body.
fn http(addr: &str, raw: &str) -> (String, HashMap<String, String>, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.lines();
    let status = lines.next().unwrap().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn get(addr: &str, path: &str) -> (String, HashMap<String, String>, String) {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"))
}

/// Parses OpenMetrics / Prometheus text strictly: every line is a HELP,
/// TYPE or UNIT comment, a sample of a declared family, or the final EOF.
/// Returns each sample (`name{labels}` exactly as written) with its value.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut families: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF");
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, value) = (
                parts.next().unwrap(),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            assert!(valid_name(name), "bad family name in {line:?}");
            match kind {
                "HELP" | "UNIT" => {}
                "TYPE" => {
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown"
                        ]
                        .contains(&value),
                        "bad type in {line:?}"
                    );
                    families.insert(name.to_owned(), value.to_owned());
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name = key.split('{').next().unwrap();
        assert!(valid_name(name), "bad sample name in {line:?}");
        if let Some(labels) = key.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label in {line:?}"));
                    assert!(valid_name(k), "bad label name in {line:?}");
                    assert!(!v.contains('\n'));
                }
            }
        }
        let family = ["_total", "_bucket", "_count", "_sum", "_created", ""]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                families.contains_key(base).then_some(base)
            })
            .unwrap_or_else(|| panic!("sample of an undeclared family: {line:?}"));
        if families[family] == "counter" {
            assert!(
                name.ends_with("_total") || name.ends_with("_created"),
                "{line:?}"
            );
        }
        assert!(
            samples.insert(key.to_owned(), value).is_none(),
            "duplicate sample {line:?}"
        );
    }
    samples
}

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        let mut keys: Vec<_> = m.keys().collect();
        keys.sort();
        panic!("no sample {key}; have {keys:#?}")
    })
}

fn scrape(addr: &str) -> HashMap<String, f64> {
    let (status, headers, body) = get(addr, "/metrics");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}: {body}");
    assert!(
        headers["content-type"].starts_with("application/openmetrics-text"),
        "{headers:?}"
    );
    parse(&body)
}

fn cli_metrics(cfg: &std::path::Path) -> HashMap<String, f64> {
    let (code, out, err) = cli(&["metrics", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    parse(&out)
}

fn insert_rows(db: &std::path::Path, prefix: &str, n: usize) {
    let c = rusqlite::Connection::open(db).unwrap();
    let tx = c.unchecked_transaction().unwrap();
    for i in 0..n {
        tx.execute(
            "INSERT INTO notes VALUES (?1, 't', 'body', ?2)",
            rusqlite::params![format!("{prefix}{i}"), i as i64],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_follow_what_the_hub_and_daemons_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = tether::hub::auth::new_token();
    std::fs::write(d.join("token"), &token).unwrap();
    for f in ["a.db", "b.db"] {
        app(&d.join(f), NOTES);
    }
    let hash = tether::hub::auth::hash_token(&token);
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &hash, "hub").await;
    let (a, acfg) = start_daemon_with(
        d,
        "a",
        &addr,
        &d.join("token"),
        &[("one", "a.db")],
        FAST,
        "metrics_listen = \"127.0.0.1:0\"",
    )
    .await;
    let (b, bcfg) = start_daemon(d, "b", &addr, &d.join("token"), &[("one", "b.db")], FAST).await;
    wait_connected_cli(&acfg, "one").await;
    wait_connected_cli(&bcfg, "one").await;
    let a_metrics = wait_log_field(&a, "serving metrics", "addr").await;

    insert_rows(&d.join("a.db"), "r", 50);
    let bdb = rusqlite::Connection::open(d.join("b.db")).unwrap();
    wait_until("B has A's rows", || count(&bdb, "notes") == 50).await;
    wait_until("A's upload answered", || {
        status_json(&acfg, "one")["pending_changes"] == 0
    })
    .await;

    // The hub, on its WebSocket listener.
    let hub = scrape(&addr);
    assert_eq!(value(&hub, "tether_hub_sessions{dataset=\"notes\"}"), 2.0);
    assert_eq!(
        value(
            &hub,
            "tether_hub_changes_total{dataset=\"notes\",outcome=\"applied\"}"
        ),
        50.0
    );
    assert_eq!(
        value(
            &hub,
            "tether_hub_changes_total{dataset=\"notes\",outcome=\"conflict\"}"
        ),
        0.0
    );
    assert!(value(&hub, "tether_hub_upload_batches_total{dataset=\"notes\"}") >= 1.0);
    assert!(value(&hub, "tether_hub_received_bytes_total{dataset=\"notes\"}") > 50.0 * 8.0);
    assert!(value(&hub, "tether_hub_sent_bytes_total{dataset=\"notes\"}") > 50.0 * 8.0);
    assert!(
        value(
            &hub,
            "tether_hub_fanout_latency_seconds_count{dataset=\"notes\"}"
        ) >= 1.0
    );
    assert!(value(&hub, "tether_hub_store_seconds_count{op=\"apply_batch\"}") >= 1.0);
    assert_eq!(
        value(&hub, "tether_hub_store_seconds_count{op=\"open_session\"}"),
        2.0
    );

    // Daemon A over HTTP, daemon B through the CLI.
    let am = scrape(&a_metrics);
    assert_eq!(
        value(
            &am,
            "tether_uploaded_changes_total{db=\"one\",outcome=\"applied\"}"
        ),
        50.0
    );
    assert_eq!(
        value(&am, "tether_upload_latency_seconds_count{db=\"one\"}"),
        50.0
    );
    assert_eq!(value(&am, "tether_connections{state=\"connected\"}"), 1.0);
    assert_eq!(value(&am, "tether_sessions{state=\"active\"}"), 1.0);
    assert_eq!(value(&am, "tether_pending_changes{db=\"one\"}"), 0.0);
    assert_eq!(value(&am, "tether_connects_total{db=\"one\"}"), 1.0);
    let bm = cli_metrics(&bcfg);
    assert_eq!(
        value(&bm, "tether_downloaded_changes_total{db=\"one\"}"),
        50.0
    );
    assert!(value(&bm, "tether_downloaded_bytes_total{db=\"one\"}") > 50.0 * 8.0);
    assert_eq!(value(&bm, "tether_download_lag_changes{db=\"one\"}"), 0.0);

    // Counters move; pending changes show while uploads are paused.
    cli(&[
        "pause",
        "one",
        "--upload",
        "--config",
        acfg.to_str().unwrap(),
    ]);
    insert_rows(&d.join("a.db"), "s", 7);
    wait_until("A's pending changes in its metrics", || {
        value(&scrape(&a_metrics), "tether_pending_changes{db=\"one\"}") == 7.0
    })
    .await;
    cli(&["resume", "one", "--config", acfg.to_str().unwrap()]);
    wait_until("A's upload counter moves", || {
        value(
            &scrape(&a_metrics),
            "tether_uploaded_changes_total{db=\"one\",outcome=\"applied\"}",
        ) == 57.0
    })
    .await;
    wait_until("B's download counter moves", || {
        value(
            &cli_metrics(&bcfg),
            "tether_downloaded_changes_total{db=\"one\"}",
        ) == 57.0
    })
    .await;

    // Health, unknown paths, a plain GET of the WebSocket endpoint, garbage
    // and a wrong token: clear answers, and the hub keeps serving.
    let (status, _, body) = get(&addr, "/healthz");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "ok\n");
    let (status, _, body) = get(&addr, "/v1/nope");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    assert!(body.contains("/v1/nope"), "{body}");
    let (status, _, body) = get(&addr, "/");
    assert!(status.starts_with("HTTP/1.1 426"), "{status}");
    assert!(body.contains("WebSocket"), "{body}");
    let (status, _, _) = http(&addr, "POST /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(status.starts_with("HTTP/1.1 405"), "{status}");
    let (status, _, body) = http(&addr, "\u{1}\u{2} garbage\r\n\r\n");
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    assert!(body.contains("malformed HTTP request"), "{body}");
    let (status, _, _) = http(
        &addr,
        "GET /v1/sync HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer wrong\r\n\r\n",
    );
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    let hub = scrape(&addr);
    assert_eq!(
        value(&hub, "tether_hub_refused_total{code=\"unauthorized\"}"),
        1.0
    );
    assert_eq!(
        value(
            &hub,
            "tether_hub_changes_total{dataset=\"notes\",outcome=\"applied\"}"
        ),
        57.0
    );
    let (status, _, body) = get(&a_metrics, "/healthz");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "ok\n");

    // A daemon that leaves is no longer counted as connected.
    assert!(b.terminate().success());
    wait_until("hub counts one session", || {
        value(&scrape(&addr), "tether_hub_sessions{dataset=\"notes\"}") == 1.0
    })
    .await;
    assert!(a.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_set_in_hub_toml_is_answered_and_counted_and_every_limit_shows_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = tether::hub::auth::new_token();
    std::fs::write(d.join("token"), &token).unwrap();
    app(&d.join("a.db"), NOTES);
    let cfg = d.join("hub.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nstore = \"sqlite:{}\"\n[limits]\nmax_connections_per_token = 1\n[[dataset]]\nname = \"notes\"\ntables = [\"notes\"]\n[[token]]\nname = \"t\"\nsha256 = \"{}\"\ndatasets = [\"*\"]\n",
            d.join("hub.db").display(),
            tether::hub::auth::hash_token(&token)
        ),
    )
    .unwrap();
    let hub = Proc::spawn(
        &["hub", "--config", cfg.to_str().unwrap()],
        d.join("hub.log"),
    );
    let addr = wait_log_field(&hub, "hub started", "listen").await;
    let limits = [
        "max_unauthenticated",
        "max_unauthenticated_per_address",
        "unauthenticated_timeout",
        "max_sessions",
        "max_connections_per_token",
        "max_frames_per_second",
        "max_partial_frames_mib",
        "max_in_flight_mib_per_token",
        "max_upload_changes",
    ];
    let m = scrape(&addr);
    for l in limits {
        assert_eq!(
            value(&m, &format!("tether_hub_limited_total{{limit=\"{l}\"}}")),
            0.0
        );
    }
    assert_eq!(value(&m, "tether_hub_partial_frame_bytes"), 0.0);
    let (a, acfg) = start_daemon(d, "a", &addr, &d.join("token"), &[("one", "a.db")], FAST).await;
    wait_connected_cli(&acfg, "one").await;
    // A second connection with the same token is one too many.
    let (status, _, body) = http(
        &addr,
        &format!("GET /v1/sync HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"),
    );
    assert!(status.starts_with("HTTP/1.1 429"), "{status}");
    assert!(
        body.contains("token \"t\"") && body.contains("max_connections_per_token"),
        "{body}"
    );
    let m = scrape(&addr);
    for l in limits {
        let want = if l == "max_connections_per_token" {
            1.0
        } else {
            0.0
        };
        assert_eq!(
            value(&m, &format!("tether_hub_limited_total{{limit=\"{l}\"}}")),
            want,
            "{l}"
        );
    }
    // The daemon that holds the token's connection keeps syncing.
    insert_rows(&d.join("a.db"), "r", 5);
    wait_until("the hub applied A's rows", || {
        value(
            &scrape(&addr),
            "tether_hub_changes_total{dataset=\"notes\",outcome=\"applied\"}",
        ) == 5.0
    })
    .await;
    assert!(a.terminate().success());
    assert!(hub.terminate().success());
}
