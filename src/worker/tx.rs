//! Transactions a worker survives. A worker runs other people's code and
//! data: an error in one message must end that message's (sub)transaction,
//! never the worker. [`transaction`] is a top-level transaction whose error
//! is returned (after the abort) instead of ending the process;
//! [`subtransaction`] does the same inside one.

use std::panic::AssertUnwindSafe;

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;

/// A caught error: its text, and whether trying the same again may work
/// (a deadlock, a serialization failure, a lock or resource shortage, a
/// cancel) as opposed to an error of the message itself.
pub struct Failure {
    pub message: String,
    pub transient: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn failure(e: &CaughtError) -> Failure {
    let r = match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
        CaughtError::RustPanic { ereport, .. } => ereport,
    };
    let state = sqlstate(r.sql_error_code() as i32);
    let transient =
        state.starts_with("40") || state.starts_with("53") || state == "55P03" || state == "57014";
    Failure {
        message: r.message().to_string(),
        transient,
    }
}

/// The five characters of a packed SQLSTATE (PostgreSQL's MAKE_SQLSTATE).
fn sqlstate(code: i32) -> String {
    (0..5)
        .map(|i| char::from(b'0' + ((code >> (6 * i)) & 0x3F) as u8))
        .collect()
}

/// Runs `f` in a transaction of its own and commits; an error in `f` or
/// at commit (a deferred constraint, say) aborts it and is returned.
pub fn transaction<R>(f: impl FnOnce() -> R) -> Result<R, Failure> {
    // SAFETY: called between transactions from the worker's main thread;
    // the memory context in use before is restored on either path.
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        pgrx::PgTryBuilder::new(AssertUnwindSafe(|| {
            pg_sys::SetCurrentStatementStartTimestamp();
            pg_sys::StartTransactionCommand();
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            let r = f();
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
            pg_sys::MemoryContextSwitchTo(cxt);
            Ok(r)
        }))
        .catch_others(|e| {
            pg_sys::AbortCurrentTransaction();
            pg_sys::MemoryContextSwitchTo(cxt);
            Err(failure(&e))
        })
        .execute()
    }
}

/// Runs `f` in a subtransaction: its work is kept when `keep` approves the
/// result, rolled back otherwise and on error (whose message is returned).
pub fn subtransaction<R>(
    f: impl FnOnce() -> R,
    keep: impl FnOnce(&R) -> bool,
) -> Result<R, Failure> {
    // SAFETY: inside a transaction; the memory context and resource owner
    // in use before are restored on either path.
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        let result = pgrx::PgTryBuilder::new(AssertUnwindSafe(|| {
            let r = f();
            if keep(&r) {
                pg_sys::ReleaseCurrentSubTransaction();
            } else {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            }
            Ok(r)
        }))
        .catch_others(|e| {
            pg_sys::MemoryContextSwitchTo(cxt);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            Err(failure(&e))
        })
        .execute();
        pg_sys::MemoryContextSwitchTo(cxt);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sqlstate_unpacks() {
        // MAKE_SQLSTATE('4','0','P','0','1'), deadlock_detected
        let pack = |s: &str| {
            s.bytes()
                .enumerate()
                .map(|(i, c)| (((c - b'0') & 0x3F) as i32) << (6 * i))
                .sum::<i32>()
        };
        for s in ["40P01", "57014", "22003", "55P03", "XX000"] {
            assert_eq!(super::sqlstate(pack(s)), s);
        }
    }
}
