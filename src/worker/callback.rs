//! The callback host: how a consumer runs a subscription's callback, which
//! is other people's code.
//!
//! Vocabulary: the callback is *resolved* once per worker (its fmgr entry),
//! *checked* at every load and before every batch (shape: one
//! `outbox.message` argument, returns void or boolean, a plain function;
//! the owner may EXECUTE it — a REVOKE is seen at the next batch), and
//! *called* as its owner inside a security-restricted operation (no SET
//! ROLE, no escaping to the worker's superuser), with the settings it
//! changes undone after the call, under `outbox.callback_timeout`, as user
//! code that a cancel reaches (see `crate::latch`).

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;

use super::subscription::Subscription;
use crate::guc;
use crate::latch::UserCode;
use crate::subscriptions::may_execute;

/// The last call ran past `outbox.callback_timeout` (set by the timer).
static TIMED_OUT: AtomicBool = AtomicBool::new(false);

pub struct Callback {
    /// Where fmgr's entry and what the function caches in it live; deleted
    /// with the Callback (a subscription refused and allowed again resolves
    /// anew without growing the worker's memory).
    memory: pg_sys::MemoryContext,
    /// fmgr's entry for the function (made anew for each batch).
    finfo: std::cell::Cell<*mut pg_sys::FmgrInfo>,
    message_type: pg_sys::Oid,
    returns_bool: bool,
    owner: pg_sys::Oid,
    function: pg_sys::Oid,
    timer: i32,
}

/// The message as the callback receives it.
pub struct Message<'a> {
    pub id: &'a str,
    pub destination: &'a str,
    pub headers: pg_sys::Datum,
    pub body: pg_sys::Datum,
    pub redelivered: bool,
}

/// Why `sub`'s callback may not run, or None. Runs in a transaction.
pub fn refusal(sub: &Subscription) -> Option<String> {
    let (f, owner) = (sub.callback, sub.owner);
    // SAFETY: syscache look-ups by oid inside a transaction.
    unsafe {
        if !exists(pg_sys::SysCacheIdentifier::AUTHOID, owner) {
            return Some(format!(
                "the owner (role {}) of subscription \"{}\" no longer exists",
                owner.to_u32(),
                sub.name
            ));
        }
        if !exists(pg_sys::SysCacheIdentifier::PROCOID, f) {
            return Some(format!(
                "the callback (function {}) of subscription \"{}\" no longer exists",
                f.to_u32(),
                sub.name
            ));
        }
        if !sub.shape_ok {
            return Some(format!(
                "callback {} of subscription \"{}\" must take (outbox.message) and return void or boolean",
                sub.callback_name, sub.name
            ));
        }
        if !may_execute(f, owner) {
            return Some(format!(
                "permission denied for function {}: the owner of subscription \"{}\" may not execute it",
                sub.callback_name, sub.name
            ));
        }
    }
    None
}

unsafe fn exists(cache: pg_sys::SysCacheIdentifier::Type, oid: pg_sys::Oid) -> bool {
    unsafe {
        pg_sys::SearchSysCacheExists(
            cache as i32,
            pg_sys::Datum::from(oid),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        )
    }
}

impl Callback {
    /// Resolves `sub`'s callback, once it passed [`refusal`]. Runs in a
    /// transaction.
    pub fn resolve(sub: &Subscription, message_type: pg_sys::Oid) -> Callback {
        // SAFETY: a zeroed FmgrInfo in a context of its own that lives as
        // long as the Callback, filled by fmgr for an existing function.
        let (memory, finfo) = unsafe {
            let memory = pg_sys::AllocSetContextCreateInternal(
                pg_sys::TopMemoryContext,
                c"outbox callback".as_ptr(),
                pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
                pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            );
            let finfo = pg_sys::MemoryContextAllocZero(memory, size_of::<pg_sys::FmgrInfo>())
                .cast::<pg_sys::FmgrInfo>();
            pg_sys::fmgr_info_cxt(sub.callback, finfo, memory);
            (memory, finfo)
        };
        Callback {
            memory,
            finfo: std::cell::Cell::new(finfo),
            message_type,
            returns_bool: sub.returns_bool,
            owner: sub.owner,
            function: sub.callback,
            timer: timer(),
        }
    }

    /// Resolves the function anew (in a transaction): fmgr caches what a
    /// SECURITY DEFINER function runs as, and its SET clauses, in the
    /// entry; an ALTER FUNCTION since is seen at the next batch.
    pub fn refresh(&self) {
        // SAFETY: the context and the entry are this Callback's; nothing
        // of the last batch's call is in use between batches.
        unsafe {
            pg_sys::MemoryContextReset(self.memory);
            let finfo = pg_sys::MemoryContextAllocZero(self.memory, size_of::<pg_sys::FmgrInfo>())
                .cast::<pg_sys::FmgrInfo>();
            pg_sys::fmgr_info_cxt(self.function, finfo, self.memory);
            self.finfo.set(finfo);
        }
    }

    /// Whether the owner may still execute it (a REVOKE since the last
    /// look); in a transaction.
    pub fn allowed(&self) -> bool {
        // SAFETY: syscache look-ups inside a transaction.
        unsafe {
            exists(pg_sys::SysCacheIdentifier::AUTHOID, self.owner)
                && exists(pg_sys::SysCacheIdentifier::PROCOID, self.function)
                && may_execute(self.function, self.owner)
        }
    }

    /// Calls the callback with an `outbox.message`; Some(b) for a boolean
    /// result. An error (or a cancel, or the timeout) unwinds out of here:
    /// the caller's subtransaction restores the user id and settings.
    pub fn call(&self, m: &Message) -> Option<bool> {
        // SAFETY: the row is built from the outbox.message type's own
        // descriptor; fcinfo has room for its one argument; fn_addr was
        // set by fmgr_info for a function of the checked shape.
        unsafe {
            let desc = pg_sys::lookup_rowtype_tupdesc(self.message_type, -1);
            let mut values = [
                text(m.id),
                text(m.destination),
                m.headers,
                m.body,
                pg_sys::Datum::from(m.redelivered),
            ];
            let mut nulls = [false; 5];
            let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            let row = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
            pg_sys::DecrTupleDescRefCount(desc);

            let (mut user, mut sec) = (pg_sys::InvalidOid, 0);
            pg_sys::GetUserIdAndSecContext(&mut user, &mut sec);
            pg_sys::SetUserIdAndSecContext(
                self.owner,
                sec | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION)
                    as i32,
            );
            let size =
                size_of::<pg_sys::FunctionCallInfoBaseData>() + size_of::<pg_sys::NullableDatum>();
            let fcinfo = pg_sys::palloc0(size).cast::<pg_sys::FunctionCallInfoBaseData>();
            let finfo = self.finfo.get();
            (*fcinfo).flinfo = finfo;
            (*fcinfo).nargs = 1;
            (*fcinfo).fncollation = pg_sys::InvalidOid;
            (*fcinfo).args.as_mut_slice(1)[0] = pg_sys::NullableDatum {
                value: row,
                isnull: false,
            };
            let f = (*finfo).fn_addr.expect("fmgr_info sets fn_addr");
            // Settings the callback changes (SET, SET LOCAL) end with the
            // call: callbacks of a batch share a transaction, and none may
            // change the worker's session for the messages after it.
            let guc_level = pg_sys::NewGUCNestLevel();
            let result = {
                let _running = Running::start(&self.timer);
                pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| f(fcinfo))
            };
            pg_sys::AtEOXact_GUC(false, guc_level);
            pg_sys::SetUserIdAndSecContext(user, sec);
            (self.returns_bool && !(*fcinfo).isnull).then(|| result.value() != 0)
        }
    }
}

impl Drop for Callback {
    fn drop(&mut self) {
        // SAFETY: the context was made by `resolve` and nothing else points
        // into it once the Callback is gone.
        unsafe { pg_sys::MemoryContextDelete(self.memory) };
    }
}

/// What an error of a call means: the timeout's cancel is named as such.
pub fn explain(error: String) -> String {
    if TIMED_OUT.swap(false, Ordering::Relaxed) {
        format!(
            "callback ran longer than outbox.callback_timeout ({} ms) and was cancelled",
            guc::CALLBACK_TIMEOUT_MS.get()
        )
    } else {
        error
    }
}

/// A call in progress: user code (a cancel reaches it) under the timer.
/// Dropped on return and when an error unwinds past it.
struct Running<'a> {
    timer: &'a i32,
    _user: UserCode,
}

impl Running<'_> {
    fn start(timer: &i32) -> Running<'_> {
        TIMED_OUT.store(false, Ordering::Relaxed);
        let ms = guc::CALLBACK_TIMEOUT_MS.get();
        if ms > 0 {
            // SAFETY: the timer was registered by this process.
            unsafe { enable_timeout_after(*timer, ms) };
        }
        Running {
            timer,
            _user: UserCode::enter(),
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        // SAFETY: as in `start`; disabling a timer that is not armed is a no-op.
        unsafe { disable_timeout(*self.timer, false) };
    }
}

// utils/timeout.h, which pgrx does not bind.
unsafe extern "C-unwind" {
    fn RegisterTimeout(id: i32, handler: Option<unsafe extern "C-unwind" fn()>) -> i32;
    fn enable_timeout_after(id: i32, delay_ms: i32);
    fn disable_timeout(id: i32, keep_indicator: bool);
}

/// `USER_TIMEOUT` of `enum TimeoutId`: the first id free for extensions.
#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
const USER_TIMEOUT: i32 = 12;
#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
const USER_TIMEOUT: i32 = 13;

/// The callback timer, registered once per process.
fn timer() -> i32 {
    thread_local! {
        static TIMER: std::cell::OnceCell<i32> = const { std::cell::OnceCell::new() };
    }
    // SAFETY: registering a handler; PostgreSQL picks a free user slot.
    TIMER.with(|t| *t.get_or_init(|| unsafe { RegisterTimeout(USER_TIMEOUT, Some(on_timeout)) }))
}

/// The timer's handler (in signal context): cancel the call, as
/// `statement_timeout` cancels a statement.
unsafe extern "C-unwind" fn on_timeout() {
    TIMED_OUT.store(true, Ordering::Relaxed);
    // SAFETY: the flags and the latch PostgreSQL's own handlers set.
    unsafe {
        std::ptr::write_volatile(&raw mut pg_sys::QueryCancelPending, 1);
        std::ptr::write_volatile(&raw mut pg_sys::InterruptPending, 1);
        pg_sys::SetLatch(pg_sys::MyLatch);
    }
}

fn text(s: &str) -> pg_sys::Datum {
    // SAFETY: copies the bytes into a new text in the current context.
    unsafe {
        pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
            s.as_ptr().cast(),
            s.len() as i32,
        ))
    }
}
