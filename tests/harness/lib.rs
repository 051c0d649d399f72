//! End-to-end harness: throw-away PostgreSQL clusters with outbox_pg
//! preloaded, and a small broker toolkit for the tests in `tests/e2e`.
//!
//! Vocabulary: a *cluster* is an initdb'ed data directory in a temp folder
//! with its own port and socket directory, run as the unprivileged `postgres`
//! user when the tests run as root; it is stopped and removed on drop.
//! Nothing here touches the machine's own PostgreSQL cluster.

pub mod activemq;
pub mod broker;
pub mod cluster;
pub mod standby;

pub use cluster::Cluster;

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A cluster shared by the tests of one group, started on first use and
/// stopped when the test binary exits (statics are never dropped, so an
/// `atexit` handler stops every shared cluster).
pub fn shared_cluster(
    cell: &'static OnceLock<Cluster>,
    init: impl FnOnce() -> Cluster,
) -> &'static Cluster {
    static CELLS: Mutex<Vec<&'static OnceLock<Cluster>>> = Mutex::new(Vec::new());
    cell.get_or_init(|| {
        unsafe extern "C" {
            fn atexit(cb: extern "C" fn()) -> i32;
        }
        extern "C" fn stop_all() {
            for cell in CELLS.lock().map(|c| c.clone()).unwrap_or_default() {
                if let Some(c) = cell.get() {
                    // SAFETY: at exit nothing uses the cluster any more.
                    unsafe { std::ptr::drop_in_place(c as *const Cluster as *mut Cluster) };
                }
            }
        }
        let mut cells = CELLS.lock().unwrap_or_else(|e| e.into_inner());
        if cells.is_empty() {
            unsafe { atexit(stop_all) };
        }
        cells.push(cell);
        drop(cells);
        init()
    })
}

/// Waits until the outbox has no scheduled row left. While a backlog
/// drains it only looks at the newest row (one index probe: rows go out in
/// id order), so that polling a big backlog does not take the CPU the
/// worker is being measured with; then it counts.
pub fn wait_drained(c: &mut postgres::Client, timeout: Duration) {
    wait_for("the outbox to drain", timeout, || {
        let newest_done: bool = c
            .query_one(
                "SELECT coalesce((SELECT status <> 'scheduled' FROM outbox.published ORDER BY id DESC LIMIT 1), true)",
                &[],
            )
            .unwrap()
            .get(0);
        if !newest_done {
            return None;
        }
        let left: i64 = c
            .query_one(
                "SELECT count(*) FROM outbox.published WHERE status = 'scheduled'",
                &[],
            )
            .unwrap()
            .get(0);
        (left == 0).then_some(())
    });
}

/// Private resident memory of a process (RssAnon: not the shared buffers
/// it touched), in kB (0 if it is gone).
pub fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

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
