//! Background workers: the launcher (one per cluster, registered with the
//! postmaster at preload time, no database), the publishers it starts (one
//! per database served), and the consumers each publisher supervises (one
//! per subscription of its database).

mod callback;
pub mod consumer;
mod flight;
mod floor;
mod inbox;
mod keeper;
pub mod launcher;
pub mod link;
pub mod publisher;
mod subscription;
pub mod supervisor;
mod tx;
mod wal;

use pgrx::pg_sys;

/// Registers the launcher; called from `_PG_init` while preloading.
pub fn register() {
    launcher::register();
}

/// The entry of database `oid` when its workers are wanted there (served,
/// and not being dropped): checked by a starting worker before it connects.
pub fn entry_to_serve(oid: pg_sys::Oid) -> Option<(usize, &'static crate::shmem::Db)> {
    use std::sync::atomic::Ordering::Acquire;
    crate::shmem::db_of(oid).filter(|(_, d)| d.served.load(Acquire) && !d.is_dropping())
}

/// Whether the worker's database is still served (the launcher or a
/// `DROP DATABASE` says no by the entry, and signals the worker).
pub fn still_served() -> bool {
    use std::sync::atomic::Ordering::Acquire;
    let db = crate::shmem::mine();
    db.oid.load(Acquire) == crate::shmem::my_db() && db.served.load(Acquire) && !db.is_dropping()
}

/// Whether the worker was asked to stop (SIGTERM). pgrx's flag is cleared
/// by reading it, so it is kept here once seen: a check deep in the work
/// (retention) must not hide it from the main loop.
pub fn stopping() -> bool {
    if pgrx::bgworkers::BackgroundWorker::sigterm_received() {
        STOP.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sleeps on the latch for at most `d`; false when the worker must stop
/// (wait_latch reads and clears pgrx's SIGTERM flag itself, and also says
/// no when the postmaster died).
pub fn wait(d: std::time::Duration) -> bool {
    if !pgrx::bgworkers::BackgroundWorker::wait_latch(Some(d)) {
        STOP.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    !stopping()
}

/// The current database's name (a catalog look-up: inside a transaction).
pub fn database_name() -> String {
    // SAFETY: a catalog lookup from a connected worker.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            return String::new();
        }
        std::ffi::CStr::from_ptr(name)
            .to_string_lossy()
            .into_owned()
    }
}

/// Keeps malloc from giving the top of its heap back after every batch: a
/// batch's frames and buffers pass the default trim threshold, and each
/// shrink and regrowth of the heap (brk) cost a TLB flush on every core and
/// page faults (a sixth of a busy consumer's time). Setting the trim
/// threshold also freezes malloc's mmap threshold at 128 kB, so memory
/// context blocks above it (up to 8 MB) would each be a fresh mapping,
/// faulted in and unmapped at every batch: they come from the heap too
/// (larger ones, a big message, stay mappings). What a burst leaves free is
/// given back once the worker is idle (`release_free_memory`).
pub fn keep_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc settings, before this process's work starts.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, (8 << 20) + (64 << 10));
    }
}

/// Returns the free memory of malloc's heap to the system (glibc keeps the
/// high-water mark of a burst otherwise): a publisher after a drain, a
/// consumer once idle.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim, from the process's main thread.
        unsafe { malloc_trim(0) };
    }
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

/// Pins the worker's `search_path` to PostgreSQL's default, whatever the
/// database's or role's settings say: the callbacks it runs see a known
/// path (they may set their own, which ends with the call), and its own
/// statements qualify every name anyway.
pub fn pin_search_path() {
    // SAFETY: setting a GUC by name from the worker's main thread.
    unsafe {
        pgrx::pg_sys::SetConfigOption(
            c"search_path".as_ptr(),
            c"\"$user\", public".as_ptr(),
            pgrx::pg_sys::GucContext::PGC_SUSET,
            pgrx::pg_sys::GucSource::PGC_S_SESSION,
        );
    }
}

thread_local! {
    /// The statements this worker has prepared and kept, by their text.
    static KEPT: std::cell::RefCell<std::collections::HashMap<&'static str, Kept>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// A kept statement, with what it was prepared for.
struct Kept {
    plan: &'static pgrx::spi::OwnedPreparedStatement,
    types: Vec<pg_sys::Oid>,
    writes: bool,
}

/// `sql`, prepared at its first run for arguments of `args`' types (the
/// same at every run) and kept for the process's life: parsing and planning
/// a publisher's few statements at every look was a quarter of its CPU.
/// PostgreSQL's plan cache plans a kept statement again when what it
/// reads changes (the extension dropped and made again, say). `writes`: run
/// as a write (a fresh snapshot per statement) rather than read-only.
pub fn kept(
    c: &pgrx::spi::SpiClient,
    sql: &'static str,
    args: &[pgrx::datum::DatumWithOid],
    writes: bool,
) -> pgrx::spi::Result<&'static pgrx::spi::OwnedPreparedStatement> {
    let found = KEPT.with_borrow(|k| {
        k.get(sql).map(|k| {
            let same =
                k.writes == writes && k.types.iter().copied().eq(args.iter().map(|a| a.oid()));
            (k.plan, same)
        })
    });
    if let Some((plan, same)) = found {
        if !same {
            pgrx::error!("outbox: a kept statement was run with other arguments: {sql}");
        }
        return Ok(plan);
    }
    let types: Vec<pg_sys::Oid> = args.iter().map(|a| a.oid()).collect();
    let oids: Vec<pg_sys::PgOid> = types.iter().map(|t| pg_sys::PgOid::from(*t)).collect();
    let prepared = if writes {
        c.prepare_mut(sql, &oids)?
    } else {
        c.prepare(sql, &oids)?
    };
    // Kept once per statement text, for good: a handful per worker.
    let plan: &'static _ = Box::leak(Box::new(prepared.keep()));
    KEPT.with_borrow_mut(|k| {
        k.insert(
            sql,
            Kept {
                plan,
                types,
                writes,
            },
        )
    });
    Ok(plan)
}

/// The first column of the first row of a read-only statement (kept, see
/// `kept`). pgrx's `Spi::get_one_with_args` runs statements as writes,
/// which gives the transaction an id: a worker's look would burn one (and
/// write a commit record), and PostgreSQL makes no slot in such a
/// transaction.
fn read_one<T: pgrx::FromDatum + pgrx::IntoDatum>(
    sql: &'static str,
    args: &[pgrx::datum::DatumWithOid],
) -> pgrx::spi::Result<Option<T>> {
    pgrx::spi::Spi::connect(|c| {
        c.select(kept(c, sql, args, false)?, Some(1), args)?
            .first()
            .get_one::<T>()
    })
}

/// The first row's first columns of a statement run as a write, as
/// `Spi::get_one_with_args` runs it (kept, see `kept`).
fn write_one<T: pgrx::FromDatum + pgrx::IntoDatum>(
    sql: &'static str,
    args: &[pgrx::datum::DatumWithOid],
) -> pgrx::spi::Result<Option<T>> {
    pgrx::spi::Spi::connect_mut(|c| {
        let stmt = kept(c, sql, args, true)?;
        c.update(stmt, Some(1), args)?.first().get_one::<T>()
    })
}

/// Whether the extension's table `outbox.<name>` exists in this database
/// (the extension may not be created yet, or may have been dropped). Runs
/// inside the caller's transaction.
pub fn table_exists(name: &str) -> bool {
    read_one::<bool>(
        "SELECT pg_catalog.to_regclass(pg_catalog.format('outbox.%I', $1::text)) IS NOT NULL",
        &[pgrx::datum::DatumWithOid::from(name)],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Shows the worker at work in `pg_stat_activity`.
pub fn busy(what: &str) {
    if let Ok(c) = std::ffi::CString::new(what) {
        // SAFETY: a NUL-terminated string PostgreSQL copies.
        unsafe {
            pgrx::pg_sys::pgstat_report_activity(
                pgrx::pg_sys::BackendState::STATE_RUNNING,
                c.as_ptr(),
            )
        };
    }
}

/// Ends the worker's process.
pub fn exit(code: i32) -> ! {
    // SAFETY: PostgreSQL's own exit, running its exit callbacks.
    unsafe { pgrx::pg_sys::proc_exit(code) };
    // It does not return, though 18's bindings do not say so.
    #[cfg(feature = "pg18")]
    unreachable!()
}

/// Shows the worker waiting in `pg_stat_activity`, and sends its table
/// statistics; returns how soon the worker must wake to send what could not
/// go yet (None: nothing left).
pub fn idle() -> Option<std::time::Duration> {
    // SAFETY: a plain report to the statistics system.
    unsafe {
        pgrx::pg_sys::pgstat_report_activity(
            pgrx::pg_sys::BackendState::STATE_IDLE,
            std::ptr::null(),
        );
    }
    report_stats()
}

/// Hands the table changes of committed transactions to the statistics
/// system, at most once a second (as a backend does), so that autovacuum
/// sees the churn the workers make. Some(wait) when changes are held back:
/// call again after that.
///
/// PostgreSQL's own throttle cannot be used: it measures time by the last
/// transaction's end, which stands still in an idle worker, so it would
/// hold the last changes back for good.
pub fn report_stats() -> Option<std::time::Duration> {
    use std::time::{Duration, Instant};
    const EVERY: Duration = Duration::from_secs(1);
    thread_local! {
        static SENT: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    }
    match SENT.get().and_then(|at| EVERY.checked_sub(at.elapsed())) {
        Some(left) if !left.is_zero() => Some(left),
        _ => {
            // SAFETY: outside a transaction, from the worker's main thread.
            unsafe { pgrx::pg_sys::pgstat_report_stat(true) };
            SENT.set(Some(Instant::now()));
            None
        }
    }
}
