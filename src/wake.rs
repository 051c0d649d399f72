//! Waking the workers at commit.
//!
//! Vocabulary: a backend that wrote outbox rows is *armed* for the rest of
//! its transaction, and when that transaction commits it sets the
//! publisher's latch, so delivery starts at once instead of at the next
//! `outbox.poll_interval`; a transaction that changed subscriptions bumps
//! their *generation* at commit and wakes the supervisor and the consumers;
//! one that installed the extension wakes the launcher. All of it concerns
//! the current database's *entry* (none: the database is not served).

use std::cell::Cell;
use std::sync::atomic::Ordering;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem::{SLOTS, here, mine, my_db, preloaded, shared};

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static CAPTURED: Cell<bool> = const { Cell::new(false) };
    static CALLBACK: Cell<bool> = const { Cell::new(false) };
    static SUBSCRIPTIONS_CHANGED: Cell<bool> = const { Cell::new(false) };
    static INSTALLED: Cell<bool> = const { Cell::new(false) };
    static LAUNCHER: Cell<bool> = const { Cell::new(false) };
}

/// Wakes the launcher at commit (a database was dropped: it frees the
/// entry once the catalog says so).
pub fn arm_launcher() {
    register_callback();
    LAUNCHER.with(|c| c.set(true));
}

/// Marks the current transaction as installing the extension: at commit
/// the launcher looks at this database.
pub fn arm_installed() {
    register_callback();
    INSTALLED.with(|c| c.set(true));
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

/// Marks the current transaction as having captured messages in the WAL:
/// at commit the publisher also looks at its slot (a commit that only
/// wrote rows does not make it decode the WAL).
pub fn arm_captured() {
    arm();
    CAPTURED.with(|c| c.set(true));
}

/// Whether the current transaction captured a message already.
pub fn captured() -> bool {
    CAPTURED.with(Cell::get)
}

/// The `outbox.database` setting, when it does not name the current
/// database (worked out again only when the setting changes: a reload).
fn serving_other_database() -> Option<String> {
    // Served: the launcher says so in the entry (no setting to read).
    if here().is_some_and(|d| d.served.load(Ordering::Acquire)) {
        return None;
    }
    thread_local! {
        static ANSWER: std::cell::RefCell<Option<(String, bool)>> = const { std::cell::RefCell::new(None) };
    }
    let setting = crate::guc::text(&crate::guc::DATABASE);
    ANSWER.with(|a| {
        let mut a = a.borrow_mut();
        if a.as_ref().is_none_or(|(s, _)| *s != setting) {
            let here = unsafe {
                let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
                (!name.is_null()).then(|| {
                    std::ffi::CStr::from_ptr(name)
                        .to_string_lossy()
                        .into_owned()
                })
            };
            let served = here.is_none_or(|h| crate::guc::databases().serves(&h));
            *a = Some((setting.clone(), served));
        }
        (!a.as_ref().is_some_and(|(_, served)| *served)).then_some(setting)
    })
}

/// Whether transactions that published committed since the last call
/// (the publisher's check before it looks at the table).
pub fn take_commits() -> bool {
    let s = mine();
    // Cleared before the look: a commit after this point sets the latch.
    s.wake_pending.store(false, Ordering::Release);
    let now = s.commits.load(Ordering::Acquire);
    s.commits_seen.swap(now, Ordering::AcqRel) != now
}

/// Counts a commit that published, and sets the publisher's latch unless
/// a wake-up is pending already.
pub fn wake_publisher() {
    let Some(shared) = here() else { return };
    shared.commits.fetch_add(1, Ordering::AcqRel);
    if !shared.wake_pending.swap(true, Ordering::AcqRel) {
        set_latch_of(shared.publisher_pid.load(Ordering::Acquire));
    }
}

pub fn set_latch_of(pid: i32) {
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

/// The publisher reached the broker after a failure: consumers backing off
/// reconnect now.
pub fn broker_returned() {
    mine().broker_returns.fetch_add(1, Ordering::AcqRel);
    wake_consumers();
}

/// Sets the latch of every consumer worker of the current database.
fn wake_consumers() {
    let db = my_db();
    let pids: Vec<i32> = SLOTS
        .share()
        .0
        .iter()
        .filter(|s| s.used && s.db == db)
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
        // Messages captured in the WAL are read back through the slot: it
        // must still be usable when the transaction commits (it may have
        // been invalidated or dropped since the first capture), or the
        // transaction fails instead of losing them.
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE if CAPTURED.with(Cell::get) => {
            if let Err(e) = crate::capture::check() {
                e.raise();
            }
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            let installed = INSTALLED.with(|c| c.replace(false));
            if (installed | LAUNCHER.with(|c| c.replace(false)))
                && let Some(shared) = shared()
            {
                if installed {
                    // This database's publisher looks again; a database
                    // without an entry yet: every absent one does.
                    match here() {
                        Some(db) => db.installs.fetch_add(1, Ordering::AcqRel),
                        None => shared.installs.fetch_add(1, Ordering::AcqRel),
                    };
                }
                set_latch_of(shared.launcher_pid.load(Ordering::Acquire));
            }
            if SUBSCRIPTIONS_CHANGED.with(|c| c.replace(false))
                && let Some(shared) = here()
            {
                shared.subscriptions.fetch_add(1, Ordering::AcqRel);
                wake_consumers();
                // Always set: the supervisor must run even while a wake-up
                // is pending (the publisher may be backing off).
                shared.commits.fetch_add(1, Ordering::AcqRel);
                set_latch_of(shared.publisher_pid.load(Ordering::Acquire));
            }
            if ARMED.with(|a| a.replace(false)) {
                if CAPTURED.with(|c| c.replace(false))
                    && let Some(shared) = here()
                {
                    shared.captures.fetch_add(1, Ordering::AcqRel);
                }
                wake_publisher();
            }
        }
        // A prepared transaction commits in another session: the worker's
        // poll finds its rows.
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            ARMED.with(|a| a.set(false));
            CAPTURED.with(|c| c.set(false));
            // A rolled-back subscribe changed nothing.
            SUBSCRIPTIONS_CHANGED.with(|c| c.set(false));
            INSTALLED.with(|c| c.set(false));
            LAUNCHER.with(|c| c.set(false));
        }
        _ => {}
    }
}
