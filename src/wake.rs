//! Waking the publisher at commit.
//!
//! Vocabulary: the *shared state* lives in shared memory (present only when
//! the library is preloaded) and holds the publisher worker's pid; a backend
//! that wrote outbox rows is *armed* for the rest of its transaction, and
//! when that transaction commits it sets the publisher's latch, so delivery
//! starts at once instead of at the next `outbox.poll_interval`.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic, PgLwLock};

/// Process-wide state shared by the workers and the backends.
#[derive(Default)]
pub struct Shared {
    /// pid of the running publisher worker, 0 when none runs.
    pub publisher_pid: AtomicI32,
    /// Commits of transactions that published, since start.
    pub commits: AtomicU64,
    /// Commits the publisher has already looked at.
    pub commits_seen: AtomicU64,
    /// Messages the publisher delivered (receipted), since start.
    pub sent: AtomicU64,
    /// Bumped at the commit of every transaction that changed subscriptions.
    pub subscriptions: AtomicU64,
}

// SAFETY: only atomics, no pointers.
unsafe impl PGRXSharedMemory for Shared {}

pub static SHARED: PgAtomic<Shared> = unsafe { PgAtomic::new(c"outbox_pg_shared") };

/// Most consumer workers (the upper bound of `outbox.max_consumers`).
pub const MAX_CONSUMERS: usize = 64;

/// One consumer worker's place in shared memory: reserved by the
/// supervisor (pid 0, `reserved_at` set) and taken by the worker (its pid).
#[derive(Clone, Copy)]
pub struct Slot {
    pub used: bool,
    pub pid: i32,
    /// When the supervisor reserved it (ms since the epoch).
    pub reserved_at: i64,
    pub name_len: u8,
    pub name: [u8; 64],
}

impl Slot {
    pub const EMPTY: Slot = Slot {
        used: false,
        pid: 0,
        reserved_at: 0,
        name_len: 0,
        name: [0; 64],
    };

    pub fn name(&self) -> &str {
        std::str::from_utf8(&self.name[..self.name_len as usize]).unwrap_or("")
    }

    pub fn set_name(&mut self, name: &str) {
        let n = name.len().min(64);
        self.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        self.name_len = n as u8;
    }
}

#[derive(Clone, Copy)]
pub struct Slots(pub [Slot; MAX_CONSUMERS]);

impl Default for Slots {
    fn default() -> Self {
        Slots([Slot::EMPTY; MAX_CONSUMERS])
    }
}

// SAFETY: plain data, no pointers.
unsafe impl PGRXSharedMemory for Slots {}

pub static SLOTS: PgLwLock<Slots> = unsafe { PgLwLock::new(c"outbox_pg_slots") };

thread_local! {
    static PRELOADED: Cell<bool> = const { Cell::new(false) };
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static CALLBACK: Cell<bool> = const { Cell::new(false) };
    static SUBSCRIPTIONS_CHANGED: Cell<bool> = const { Cell::new(false) };
}

/// Called from `_PG_init` while `shared_preload_libraries` is processed.
pub fn init_shared_memory() {
    PRELOADED.with(|p| p.set(true));
    pgrx::pg_shmem_init!(SHARED);
    pgrx::pg_shmem_init!(SLOTS);
}

pub fn preloaded() -> bool {
    PRELOADED.with(|p| p.get())
}

/// The shared state, when the library was preloaded.
pub fn shared() -> Option<&'static Shared> {
    preloaded().then(|| SHARED.get())
}

fn register_callback() {
    if !CALLBACK.with(|c| c.replace(true)) {
        unsafe { pg_sys::RegisterXactCallback(Some(at_xact_end), std::ptr::null_mut()) };
    }
}

/// Marks the current transaction as having changed subscriptions: at commit
/// the supervisor and the consumers look at them again.
pub fn arm_subscriptions() {
    register_callback();
    SUBSCRIPTIONS_CHANGED.with(|c| c.set(true));
}

/// Marks the current transaction as having written outbox rows. The first
/// time in a transaction, also warns when nothing will deliver them.
pub fn arm() {
    if ARMED.with(|a| a.replace(true)) {
        return;
    }
    register_callback();
    if !preloaded() {
        warning!(
            "outbox_pg is not in shared_preload_libraries: no worker will deliver this message until it is"
        );
    } else if let Some(serving) = serving_other_database() {
        warning!(
            "outbox.database is \"{serving}\": no worker delivers messages written in this database"
        );
    }
}

/// The database the workers serve, when it is not the current one.
fn serving_other_database() -> Option<String> {
    let serving = crate::guc::text(&crate::guc::DATABASE);
    let here = unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr(name)
            .to_string_lossy()
            .into_owned()
    };
    (serving != here).then_some(serving)
}

/// Whether transactions that published committed since the last call
/// (the publisher's check before it looks at the table).
pub fn take_commits() -> bool {
    let s = SHARED.get();
    let now = s.commits.load(Ordering::Acquire);
    s.commits_seen.swap(now, Ordering::AcqRel) != now
}

/// Sets the publisher's latch, if a publisher runs.
pub fn wake_publisher() {
    let Some(shared) = shared() else { return };
    shared.commits.fetch_add(1, Ordering::AcqRel);
    set_latch_of(shared.publisher_pid.load(Ordering::Acquire));
}

fn set_latch_of(pid: i32) {
    if pid <= 0 {
        return;
    }
    unsafe {
        let proc_ = pg_sys::BackendPidGetProc(pid);
        if !proc_.is_null() {
            pg_sys::SetLatch(&raw mut (*proc_).procLatch);
        }
    }
}

/// Sets the latch of every consumer worker.
fn wake_consumers() {
    let pids: Vec<i32> = SLOTS
        .share()
        .0
        .iter()
        .filter(|s| s.used)
        .map(|s| s.pid)
        .collect();
    pids.into_iter().for_each(set_latch_of);
}

#[pg_guard]
unsafe extern "C-unwind" fn at_xact_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            if SUBSCRIPTIONS_CHANGED.with(|c| c.replace(false))
                && let Some(shared) = shared()
            {
                shared.subscriptions.fetch_add(1, Ordering::AcqRel);
                wake_consumers();
                wake_publisher();
            }
            if ARMED.with(|a| a.replace(false)) {
                wake_publisher();
            }
        }
        // A prepared transaction commits in another session: the worker's
        // poll finds its rows.
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            ARMED.with(|a| a.set(false))
        }
        _ => {}
    }
}
