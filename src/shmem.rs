//! The extension's shared memory, present only when the library is
//! preloaded: the *shared state* (atomics: the launcher's pid, and per
//! served database an *entry* with its publisher's pid, commit and
//! subscription counters) and one *slot* per worker (a consumer's
//! reservation, and every worker's status as `outbox.stats()` shows it).
//! Layout only: `status.rs` writes the slots, `wake.rs` the counters, the
//! launcher (worker/launcher.rs) the entries.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic, PgLwLock};

use crate::guc::CONSUMER_SLOTS;

/// Most databases served at once (entries in shared memory).
pub const MAX_DATABASES: usize = 32;

/// Process-wide state shared by the workers and the backends.
#[derive(Default)]
pub struct Shared {
    /// pid of the launcher, 0 when none runs.
    pub launcher_pid: AtomicI32,
    /// Bumped at the commit of a `CREATE EXTENSION outbox_pg` in a
    /// database without an entry: the launcher looks at every database
    /// again.
    pub installs: AtomicU64,
    /// One entry per served database.
    pub dbs: [Db; MAX_DATABASES],
}

/// A served database's state. Only the launcher takes and frees entries.
#[derive(Default)]
pub struct Db {
    /// The database's oid; 0: a free entry.
    pub oid: AtomicU32,
    /// The launcher serves it; false: its workers leave, and a restarted
    /// consumer exits at once.
    pub served: AtomicBool,
    /// pid of the backend running a `DROP DATABASE` of it (0: none): its
    /// workers leave and none starts while that backend lives; a drop
    /// that fails clears it, and so does the backend's death.
    pub dropping: AtomicI32,
    /// Bumped at the commit of a `CREATE EXTENSION outbox_pg` in it.
    pub installs: AtomicU64,
    /// Its publisher found no extension there: 1 + the `installs` count it
    /// read before it looked (0: not absent). Not started again until that
    /// count moves (a `CREATE EXTENSION` committed) or a reload: a count
    /// read before the look cannot miss a commit during it.
    pub absent: AtomicU64,
    /// pid of its running publisher, 0 when none runs.
    pub publisher_pid: AtomicI32,
    /// Commits of transactions that published, since start.
    pub commits: AtomicU64,
    /// Commits the publisher has already looked at.
    pub commits_seen: AtomicU64,
    /// Commits of transactions that captured messages in the WAL, since
    /// start (a subset of `commits`).
    pub captures: AtomicU64,
    /// The publisher's latch was set and it has not looked since: later
    /// commits need not set it again (a burst of commits costs one wake-up,
    /// and none while the publisher is busy or backing off).
    pub wake_pending: AtomicBool,
    /// Bumped at the commit of every transaction that changed subscriptions.
    pub subscriptions: AtomicU64,
    /// When the worker last ran retention (ms since the epoch).
    pub cleaned_at: AtomicI64,
    /// The publisher is inside a unit of work; still true when its next
    /// incarnation starts means the last one ended in an error.
    pub publisher_busy: AtomicBool,
    /// Bumped when the publisher reaches the broker again after a failure:
    /// consumers in a reconnection backoff try at once.
    pub broker_returns: AtomicU64,
    /// Publisher incarnations in a row that ended in an error.
    pub publisher_failures: AtomicU32,
}

impl Db {
    /// Whether the publisher found no extension since the last install
    /// in this database.
    pub fn is_absent(&self) -> bool {
        self.absent.load(Ordering::Acquire) == self.installs.load(Ordering::Acquire).wrapping_add(1)
    }

    /// Whether a `DROP DATABASE` of it is under way (its backend lives).
    pub fn is_dropping(&self) -> bool {
        let pid = self.dropping.load(Ordering::Acquire);
        // SAFETY: a look-up in the proc array.
        let alive = pid != 0 && unsafe { !pg_sys::BackendPidGetProc(pid).is_null() };
        if pid != 0 && !alive {
            // Its backend died mid-drop: cleared, so a later process with
            // the same pid does not hold the database back.
            let _ = self
                .dropping
                .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
        }
        alive
    }

    /// Clears everything but the oid (the launcher, before taking it).
    pub fn reset(&self) {
        self.served.store(false, Ordering::Release);
        self.dropping.store(0, Ordering::Release);
        self.absent.store(0, Ordering::Release);
        self.publisher_pid.store(0, Ordering::Release);
        self.wake_pending.store(false, Ordering::Release);
        self.cleaned_at.store(0, Ordering::Release);
        self.publisher_busy.store(false, Ordering::Release);
        self.publisher_failures.store(0, Ordering::Release);
        // Counters only grow: a reader comparing with an older value sees
        // a change, never misses one.
    }
}

// SAFETY: only atomics, no pointers.
unsafe impl PGRXSharedMemory for Shared {}

pub static SHARED: PgAtomic<Shared> = unsafe { PgAtomic::new(c"outbox_pg_shared") };

/// The entry of database `oid`, with its index.
pub fn db_of(oid: pg_sys::Oid) -> Option<(usize, &'static Db)> {
    let oid = oid.to_u32();
    if oid == 0 || !preloaded() {
        return None;
    }
    SHARED
        .get()
        .dbs
        .iter()
        .enumerate()
        .find(|(_, d)| d.oid.load(Ordering::Acquire) == oid)
}

thread_local! {
    /// The entry a worker serves (set once it has its database).
    static MINE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Called by a worker once it knows its database's entry.
pub fn set_mine(index: usize) {
    MINE.set(Some(index));
}

/// The index of the worker's entry.
pub fn mine_index() -> Option<usize> {
    MINE.get()
}

/// The entry of the worker's database (its own copy after the launcher
/// freed it: the worker is about to leave then).
pub fn mine() -> &'static Db {
    static ORPHAN: std::sync::OnceLock<Db> = std::sync::OnceLock::new();
    match MINE.get() {
        Some(i) => &SHARED.get().dbs[i],
        None => ORPHAN.get_or_init(Db::default),
    }
}

/// The entry of the current database, for a backend (None: not served).
pub fn here() -> Option<&'static Db> {
    db_of(unsafe { pg_sys::MyDatabaseId }).map(|(_, d)| d)
}

/// One worker's place in shared memory: for a consumer, reserved by the
/// supervisor (pid 0, `reserved_at` set) and taken by the worker (its pid);
/// for every worker, its status as `outbox.stats()` shows it.
#[derive(Clone, Copy)]
pub struct Slot {
    pub used: bool,
    /// The database of the worker (its oid).
    pub db: u32,
    pub pid: i32,
    /// When the supervisor reserved it (ms since the epoch).
    pub reserved_at: i64,
    pub name_len: u8,
    pub name: [u8; 64],
    pub state: WorkerState,
    pub host_len: u8,
    pub host: [u8; 64],
    /// Messages sent (publisher) or handled (consumer) since start.
    pub messages: u64,
    pub started_at: i64,
    pub error_at: i64,
    /// Publisher: commit time of the oldest captured message waiting (ms).
    pub waiting_at: i64,
    pub error_len: u16,
    pub error: [u8; 512],
}

/// What a worker is doing, as `outbox.stats()` reports it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Starting,
    Connected,
    BackingOff,
    Stopped,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Connected => "connected",
            WorkerState::BackingOff => "backing off",
            WorkerState::Stopped => "stopped",
        }
    }
}

fn copy_text(dst: &mut [u8], text: &str) -> usize {
    // Cut at a character boundary.
    let mut n = text.len().min(dst.len());
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    dst[..n].copy_from_slice(&text.as_bytes()[..n]);
    n
}

impl Slot {
    pub const EMPTY: Slot = Slot {
        used: false,
        db: 0,
        pid: 0,
        reserved_at: 0,
        name_len: 0,
        name: [0; 64],
        state: WorkerState::Starting,
        host_len: 0,
        host: [0; 64],
        messages: 0,
        started_at: 0,
        error_at: 0,
        waiting_at: 0,
        error_len: 0,
        error: [0; 512],
    };

    pub fn name(&self) -> &str {
        std::str::from_utf8(&self.name[..self.name_len as usize]).unwrap_or("")
    }

    pub fn set_name(&mut self, name: &str) {
        self.name_len = copy_text(&mut self.name, name) as u8;
    }

    pub fn host(&self) -> &str {
        std::str::from_utf8(&self.host[..self.host_len as usize]).unwrap_or("")
    }

    pub fn set_host(&mut self, host: &str) {
        self.host_len = copy_text(&mut self.host, host) as u8;
    }

    pub fn error(&self) -> &str {
        std::str::from_utf8(&self.error[..self.error_len as usize]).unwrap_or("")
    }

    pub fn set_error(&mut self, error: &str, at: i64) {
        self.error_len = copy_text(&mut self.error, error) as u16;
        self.error_at = at;
    }
}

#[derive(Clone, Copy)]
pub struct Slots(pub [Slot; CONSUMER_SLOTS]);

impl Default for Slots {
    fn default() -> Self {
        Slots([Slot::EMPTY; CONSUMER_SLOTS])
    }
}

// SAFETY: plain data, no pointers.
unsafe impl PGRXSharedMemory for Slots {}

pub static SLOTS: PgLwLock<Slots> = unsafe { PgLwLock::new(c"outbox_pg_slots") };

/// Every publisher's status, at its database's entry index.
#[derive(Clone, Copy)]
pub struct Publishers(pub [Slot; MAX_DATABASES]);

impl Default for Publishers {
    fn default() -> Self {
        Publishers([Slot::EMPTY; MAX_DATABASES])
    }
}

// SAFETY: plain data, no pointers.
unsafe impl PGRXSharedMemory for Publishers {}

pub static PUBLISHERS: PgLwLock<Publishers> = unsafe { PgLwLock::new(c"outbox_pg_publishers") };

// SAFETY: plain data, no pointers.
unsafe impl PGRXSharedMemory for Slot {}

impl Default for Slot {
    fn default() -> Self {
        Slot::EMPTY
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

thread_local! {
    static PRELOADED: Cell<bool> = const { Cell::new(false) };
}

/// Called from `_PG_init` while `shared_preload_libraries` is processed.
pub fn init_shared_memory() {
    PRELOADED.with(|p| p.set(true));
    pgrx::pg_shmem_init!(SHARED);
    pgrx::pg_shmem_init!(SLOTS);
    pgrx::pg_shmem_init!(PUBLISHERS);
}

pub fn preloaded() -> bool {
    PRELOADED.with(|p| p.get())
}

/// The shared state, when the library was preloaded.
pub fn shared() -> Option<&'static Shared> {
    preloaded().then(|| SHARED.get())
}

/// The current database's oid, as slots hold it.
pub fn my_db() -> u32 {
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}
