//! Running as another role — a table's owner — inside a security-restricted
//! operation, as PostgreSQL runs index functions and maintenance as a
//! table's owner: nothing run meanwhile can SET ROLE back or keep the
//! owner's rights, and with `pin` the search_path is `pg_catalog, pg_temp`
//! (the caller's path cannot steer name lookups). An error unwinding out of
//! `f` aborts the (sub)transaction, which restores the user id, the
//! security context and the settings.

use pgrx::pg_sys;

/// What a pinned search_path is (as PostgreSQL 17's own maintenance uses).
const SAFE_SEARCH_PATH: &std::ffi::CStr = c"pg_catalog, pg_temp";

/// Runs `f` as `role` (see the module header).
pub fn as_role<R>(role: pg_sys::Oid, pin: bool, f: impl FnOnce() -> R) -> R {
    // SAFETY: the user id and settings are restored on return, and by the
    // abort on error.
    unsafe {
        let (mut user, mut sec) = (pg_sys::InvalidOid, 0);
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec);
        pg_sys::SetUserIdAndSecContext(
            role,
            sec | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION)
                as i32,
        );
        let level = pin.then(|| {
            let level = pg_sys::NewGUCNestLevel();
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                SAFE_SEARCH_PATH.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
            level
        });
        let r = f();
        if let Some(level) = level {
            // Settings changed inside are dropped with the pinned one.
            pg_sys::AtEOXact_GUC(false, level);
        }
        pg_sys::SetUserIdAndSecContext(user, sec);
        r
    }
}
