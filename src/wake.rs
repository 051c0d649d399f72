//! Waking the publisher at commit.
//!
//! Vocabulary: the *shared state* lives in shared memory (present only when
//! the library is preloaded) and holds the publisher worker's pid; a backend
//! that wrote outbox rows is *armed* for the rest of its transaction, and
//! when that transaction commits it sets the publisher's latch, so delivery
//! starts at once instead of at the next `outbox.poll_interval`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};

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
    pub publisher_failures: std::sync::atomic::AtomicU32,
}

// SAFETY: only atomics, no pointers.
unsafe impl PGRXSharedMemory for Shared {}

pub static SHARED: PgAtomic<Shared> = unsafe { PgAtomic::new(c"outbox_pg_shared") };

/// Most consumer workers (the upper bound of `outbox.max_consumers`).
pub const MAX_CONSUMERS: usize = 64;

/// One worker's place in shared memory: for a consumer, reserved by the
/// supervisor (pid 0, `reserved_at` set) and taken by the worker (its pid);
/// for every worker, its status as `outbox.stats()` shows it.
#[derive(Clone, Copy)]
pub struct Slot {
    pub used: bool,
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
pub struct Slots(pub [Slot; MAX_CONSUMERS]);

impl Default for Slots {
    fn default() -> Self {
        Slots([Slot::EMPTY; MAX_CONSUMERS])
    }
}

// SAFETY: plain data, no pointers.
unsafe impl PGRXSharedMemory for Slots {}

pub static SLOTS: PgLwLock<Slots> = unsafe { PgLwLock::new(c"outbox_pg_slots") };

/// The publisher's status.
pub static PUBLISHER: PgLwLock<Slot> = unsafe { PgLwLock::new(c"outbox_pg_publisher") };

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

/// Where a worker reports its status.
#[derive(Clone)]
pub enum Reporter {
    Publisher,
    Consumer(String),
}

impl Reporter {
    fn with(&self, f: impl FnOnce(&mut Slot)) {
        match self {
            Reporter::Publisher => f(&mut PUBLISHER.exclusive()),
            Reporter::Consumer(name) => {
                let mut slots = SLOTS.exclusive();
                if let Some(s) = slots.0.iter_mut().find(|s| s.used && s.name() == name) {
                    f(s);
                }
            }
        }
    }

    pub fn started(&self) {
        let pid = unsafe { pg_sys::MyProcPid };
        self.with(|s| {
            s.used = true;
            s.pid = pid;
            s.state = WorkerState::Starting;
            s.started_at = now_ms();
            s.messages = 0;
            s.host_len = 0;
        });
    }

    pub fn connected(&self, host: &str) {
        self.with(|s| {
            s.state = WorkerState::Connected;
            s.set_host(host);
        });
    }

    /// A connection problem: backing off until the next attempt.
    pub fn failed(&self, host: &str, error: &str) {
        self.with(|s| {
            s.state = WorkerState::BackingOff;
            s.set_host(host);
            s.set_error(error, now_ms());
        });
    }

    /// A problem with a message (the connection is fine).
    pub fn error(&self, error: &str) {
        self.with(|s| s.set_error(error, now_ms()));
    }

    pub fn count(&self, n: u64) {
        if n > 0 {
            self.with(|s| s.messages += n);
        }
    }

    pub fn stopped(&self) {
        self.with(|s| {
            s.state = WorkerState::Stopped;
            s.pid = 0;
        });
    }
}

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
    pgrx::pg_shmem_init!(PUBLISHER);
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

/// The database the workers serve, when it is not the current one (asked
/// once per backend: neither can change while it runs).
fn serving_other_database() -> Option<String> {
    thread_local! {
        static ANSWER: std::cell::OnceCell<Option<String>> = const { std::cell::OnceCell::new() };
    }
    ANSWER.with(|a| a.get_or_init(look_up_serving_other_database).clone())
}

fn look_up_serving_other_database() -> Option<String> {
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
    // Cleared before the look: a commit after this point sets the latch.
    s.wake_pending.store(false, Ordering::Release);
    let now = s.commits.load(Ordering::Acquire);
    s.commits_seen.swap(now, Ordering::AcqRel) != now
}

/// Counts a commit that published, and sets the publisher's latch unless
/// a wake-up is pending already.
pub fn wake_publisher() {
    let Some(shared) = shared() else { return };
    shared.commits.fetch_add(1, Ordering::AcqRel);
    if !shared.wake_pending.swap(true, Ordering::AcqRel) {
        set_latch_of(shared.publisher_pid.load(Ordering::Acquire));
    }
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
/// The publisher reached the broker after a failure: consumers backing off
/// reconnect now.
pub fn broker_returned() {
    SHARED.get().broker_returns.fetch_add(1, Ordering::AcqRel);
    wake_consumers();
}

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
                // Always set: the supervisor must run even while a wake-up
                // is pending (the publisher may be backing off).
                shared.commits.fetch_add(1, Ordering::AcqRel);
                set_latch_of(shared.publisher_pid.load(Ordering::Acquire));
            }
            if ARMED.with(|a| a.replace(false)) {
                wake_publisher();
            }
        }
        // A prepared transaction commits in another session: the worker's
        // poll finds its rows.
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            ARMED.with(|a| a.set(false));
            // A rolled-back subscribe changed nothing.
            SUBSCRIPTIONS_CHANGED.with(|c| c.set(false));
        }
        _ => {}
    }
}
