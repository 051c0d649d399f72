//! End-to-end harness: throw-away PostgreSQL clusters with outbox_pg
//! preloaded, and a small broker toolkit for the tests in `tests/e2e`.
//!
//! Vocabulary: a *cluster* is an initdb'ed data directory in a temp folder
//! with its own port and socket directory, run as the unprivileged `postgres`
//! user when the tests run as root; it is stopped and removed on drop.
//! Nothing here touches the machine's own PostgreSQL cluster.

pub mod broker;
pub mod cluster;

pub use cluster::Cluster;

use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it returns Some, or panics with `what` after
/// `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A name unique within this test run, for tables, queues and databases.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 100_000
    )
}
