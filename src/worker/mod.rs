//! Background workers: the publisher (one per cluster, serving
//! `outbox.database`, registered with the postmaster at preload time), which
//! also supervises the consumers (one dynamic worker per subscription).

pub mod consumer;
pub mod link;
pub mod publisher;
pub mod supervisor;

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};

/// Registers the publisher; called from `_PG_init` while preloading.
pub fn register() {
    BackgroundWorkerBuilder::new("outbox publisher")
        .set_type("outbox publisher")
        .set_library("outbox_pg")
        .set_function("outbox_publisher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // A worker that dies is started again after a second.
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// Makes the worker immune to time limits set for its database or role
/// (`ALTER DATABASE ... SET statement_timeout`): a worker's short
/// transactions must not be cancelled into a restart loop. Also keeps its
/// queries from starting parallel workers.
pub fn ignore_session_limits() {
    for name in [
        c"statement_timeout",
        c"lock_timeout",
        c"idle_in_transaction_session_timeout",
        // Parallel workers would take the background-worker slots that
        // consumer workers need (and a worker's queries are index probes).
        c"max_parallel_workers_per_gather",
    ] {
        unsafe {
            pgrx::pg_sys::SetConfigOption(
                name.as_ptr(),
                c"0".as_ptr(),
                pgrx::pg_sys::GucContext::PGC_SUSET,
                pgrx::pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
    }
}

/// Whether the extension's table `outbox.<name>` exists in this database
/// (the extension may not be created yet, or may have been dropped). Runs
/// inside the caller's transaction.
pub fn table_exists(name: &str) -> bool {
    pgrx::spi::Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.to_regclass(pg_catalog.format('outbox.%I', $1::text)) IS NOT NULL",
        &[pgrx::datum::DatumWithOid::from(name)],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}
