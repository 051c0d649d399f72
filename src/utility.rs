//! The utility hook (installed at preload, so in every backend): the DDL of
//! other sessions the workers must hear of.
//!
//! - `CREATE EXTENSION outbox_pg`: at commit the launcher looks again, so
//!   that under `outbox.database = '*'` the new database is served within
//!   moments.
//! - `DROP EXTENSION` (or `DROP SCHEMA`): at commit the publisher and the
//!   consumers of the database look at their tables, find them gone, and
//!   leave.
//! - `DROP DATABASE` of a served database: its workers are asked to leave
//!   (and none starts: the entry is *dropping*) before PostgreSQL counts the
//!   sessions connected to it, so our workers never block the drop. If the
//!   drop fails, the workers come back.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem::SHARED;

/// How long a `DROP DATABASE` waits for the workers to leave (PostgreSQL
/// then waits 5 s more for any session still there).
const LEAVE_WITHIN: Duration = Duration::from_secs(10);

static mut PREVIOUS: pg_sys::ProcessUtility_hook_type = None;

/// Installs the hook; called from `_PG_init` while preloading.
pub fn init() {
    // SAFETY: the postmaster, while loading the library, before any backend.
    unsafe {
        PREVIOUS = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(hook);
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn hook(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let next = || unsafe {
        match PREVIOUS {
            // Another library's hook: its ERROR must come back through
            // Rust's frames (ours catch it during a DROP DATABASE).
            Some(previous) => pg_sys::ffi::pg_guard_ffi_boundary(|| {
                previous(pstmt, query, read_only_tree, context, params, env, dest, qc)
            }),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query,
                read_only_tree,
                context,
                params,
                env,
                dest,
                qc,
            ),
        }
    };
    // SAFETY: a planned utility statement's node, read by its tag.
    let node = unsafe { (*pstmt).utilityStmt };
    match unsafe { (*node).type_ } {
        pg_sys::NodeTag::T_DropdbStmt => {
            let stmt = node.cast::<pg_sys::DropdbStmt>();
            let name = unsafe { (*stmt).dbname };
            let top_level = context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL;
            drop_database(name, top_level, next)
        }
        pg_sys::NodeTag::T_CreateExtensionStmt => {
            let stmt = node.cast::<pg_sys::CreateExtensionStmt>();
            let ours = unsafe { std::ffi::CStr::from_ptr((*stmt).extname) } == c"outbox_pg";
            next();
            // Another extension may have brought ours in (CASCADE): that
            // database's publisher looks again (only where it has an
            // entry, so no other database is probed for it).
            if ours || crate::shmem::here().is_some() {
                crate::wake::arm_installed();
            }
        }
        pg_sys::NodeTag::T_DropStmt => {
            let kind = unsafe { (*node.cast::<pg_sys::DropStmt>()).removeType };
            next();
            if kind == pg_sys::ObjectType::OBJECT_EXTENSION
                || kind == pg_sys::ObjectType::OBJECT_SCHEMA
            {
                // Cheap when it was not ours: the supervisor reads the
                // subscriptions again.
                crate::wake::arm_subscriptions();
            }
        }
        _ => next(),
    }
}

/// Runs a `DROP DATABASE` (`next`) after the workers of that database left.
fn drop_database(name: *const std::ffi::c_char, top_level: bool, next: impl FnOnce()) {
    // PostgreSQL's own check, first: a DROP DATABASE that cannot run
    // (inside a transaction block or a function) touches no worker.
    // SAFETY: raises an ERROR or returns.
    unsafe { pg_sys::PreventInTransactionBlock(top_level, c"DROP DATABASE".as_ptr()) };
    // SAFETY: a catalog lookup by name (missing: PostgreSQL says so).
    let oid = unsafe { pg_sys::get_database_oid(name, true) };
    let entry = crate::shmem::db_of(oid)
        .map(|(_, d)| d)
        .filter(|_| oid != unsafe { pg_sys::MyDatabaseId } && owns(oid));
    let Some(db) = entry else {
        return next();
    };
    // While this backend lives (a drop that fails, or its death, ends it).
    db.dropping
        .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
    if db.oid.load(Ordering::Acquire) != oid.to_u32() {
        // The launcher gave the entry to another database meanwhile.
        db.dropping.store(0, Ordering::Release);
        return next();
    }
    let next = std::panic::AssertUnwindSafe(next);
    PgTryBuilder::new(move || {
        let until = Instant::now() + LEAVE_WITHIN;
        while crate::worker::launcher::stop_workers(
            oid.to_u32(),
            db.publisher_pid.load(Ordering::Acquire),
        ) && Instant::now() < until
        {
            // SAFETY: a short sleep on the backend's own latch.
            unsafe {
                pg_sys::WaitLatch(
                    pg_sys::MyLatch,
                    (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                        as i32,
                    50,
                    pg_sys::PG_WAIT_EXTENSION,
                );
                pg_sys::ResetLatch(pg_sys::MyLatch);
            }
            pg_sys::check_for_interrupts!();
        }
        // The whole wrapper is moved in (not its field alone).
        let next = next;
        (next.0)();
    })
    .catch_others(|e| {
        // Not dropped: the database is served again.
        db.dropping.store(0, Ordering::Release);
        let shared = SHARED.get();
        crate::wake::set_latch_of(shared.launcher_pid.load(Ordering::Acquire));
        e.rethrow()
    })
    .execute();
    // Dropped: at commit the launcher frees the entry.
    crate::wake::arm_launcher();
}

/// Whether the current user may drop database `oid` (its owner, or a
/// superuser): anyone else's DROP DATABASE fails without touching the
/// workers.
fn owns(oid: pg_sys::Oid) -> bool {
    // SAFETY: catalog lookups in the backend's transaction.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        return pg_sys::pg_database_ownercheck(oid, pg_sys::GetUserId());
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        return pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, oid, pg_sys::GetUserId());
    }
}
