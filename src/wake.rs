//! Waking the workers at commit.
//!
//! Vocabulary: a backend that wrote outbox rows is *armed* for the rest of
//! its transaction, and when that transaction commits it sets the
//! publisher's latch, so delivery starts at once instead of at the next
//! `outbox.poll_interval`; a transaction that changed subscriptions bumps
//! their *generation* at commit and wakes the supervisor and the consumers.

use std::cell::Cell;
use std::sync::atomic::Ordering;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem::{SHARED, SLOTS, preloaded, shared};

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static CALLBACK: Cell<bool> = const { Cell::new(false) };
    static SUBSCRIPTIONS_CHANGED: Cell<bool> = const { Cell::new(false) };
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
