//! End-to-end tests: a real PostgreSQL (throw-away clusters with outbox_pg
//! preloaded) and, for delivery, the machine's real STOMP broker.

mod api;
mod delivery;
mod inbox;
mod operations;
mod regress;
mod tls;

use std::sync::OnceLock;

use outbox_pg_e2e::Cluster;

/// One cluster shared by the tests that only need the SQL API; stopped when
/// the test binary exits.
pub fn shared() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        unsafe extern "C" {
            fn atexit(cb: extern "C" fn()) -> i32;
        }
        extern "C" fn stop() {
            if let Some(c) = CLUSTER.get() {
                // Statics are never dropped: stop and remove it here.
                unsafe { std::ptr::drop_in_place(c as *const Cluster as *mut Cluster) };
            }
        }
        unsafe { atexit(stop) };
        Cluster::start(&[])
    })
}
