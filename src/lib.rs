//! outbox_pg: the transactional outbox and the idempotent inbox over STOMP,
//! inside PostgreSQL. This file only wires the modules together.

mod api;
mod broker;
mod capture;
mod direct;
mod enqueue;
mod error;
mod fmgr;
mod guc;
mod headers;
mod ids;
mod jsonb;
mod latch;
mod owner;
mod rowjson;
mod shmem;
mod status;
// A complete STOMP client; the workers use part of it.
#[allow(dead_code)]
mod stomp;
mod subscriptions;
mod trigger;
mod utility;
mod wake;
mod worker;

#[cfg(any(test, feature = "pg_test"))]
mod tests;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/outbox_pg.sql", name = "outbox_pg", bootstrap);
pgrx::extension_sql_file!("../sql/inbox.sql", name = "inbox", requires = ["outbox_pg"]);
pgrx::extension_sql_file!(
    "../sql/operations.sql",
    name = "operations",
    requires = ["inbox"]
);

#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    if unsafe { pgrx::pg_sys::IsBinaryUpgrade } {
        return;
    }
    guc::init();
    capture::register_callbacks();
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init_shared_memory();
        capture::load_key();
        worker::register();
        utility::init();
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
