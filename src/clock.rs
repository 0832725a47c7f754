//! Small time helpers shared by the daemon, the control socket, the metrics
//! and the demo.

use tokio::time::Instant;

/// Wall-clock time in milliseconds since the Unix epoch, the unit of the
/// capture log's `at` column (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Sleeps until `at`, or forever without one: an optional deadline as a
/// `select!` branch.
pub async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
