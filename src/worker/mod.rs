//! Background workers: the publisher (one per cluster, serving
//! `outbox.database`, registered with the postmaster at preload time), which
//! also supervises the consumers (one dynamic worker per subscription).

pub mod consumer;
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
