//! Writing `outbox.subscriptions`. Nobody holds DML on the table: only
//! `outbox.subscribe` and `outbox.unsubscribe` write it, through the two
//! private functions here. They run as the caller, who becomes the
//! subscription's *owner* (the role its callback runs as) and must be
//! able to EXECUTE the callback; the row itself is written as the table's
//! owner, in a security-restricted operation with a pinned search_path.

use pgrx::datum::DatumWithOid;
use pgrx::pg_guard;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::Spi;

use crate::fmgr::{self, finfo_v1};

finfo_v1!(pg_finfo_outbox_subscription_write);

/// `outbox._subscription_write(name, destination, callback, queue)`:
/// inserts or changes the caller's subscription `name`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_subscription_write(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the arguments are as declared in sql/inbox.sql.
    let (name, destination, callback, queue) = unsafe {
        (
            fmgr::arg_text(fcinfo, 0),
            fmgr::arg_text(fcinfo, 1),
            fmgr::arg(fcinfo, 2).map(|d| pg_sys::Oid::from(d.value() as u32)),
            fmgr::arg_text(fcinfo, 3),
        )
    };
    let (Some(name), Some(destination), Some(callback), Some(queue)) =
        (name, destination, callback, queue)
    else {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "name, destination, callback and queue must not be null"
        );
    };
    // SAFETY: the current user of this backend.
    let owner = unsafe { pg_sys::GetUserId() };
    if !may_execute(callback, owner) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for callback {}", callback.to_u32()),
            "The callback runs as the role that subscribes, which needs EXECUTE on it."
        );
    }
    as_table_owner(|| {
        // The checks subscribe() makes, for a caller that skips it (the
        // table's CHECK constraints do the rest).
        let max = crate::guc::MAX_CONSUMERS.get() as i64;
        let full = Spi::get_one_with_args::<bool>(
            "SELECT NOT EXISTS (SELECT FROM outbox.subscriptions s WHERE s.name OPERATOR(pg_catalog.=) $1) \
                AND (SELECT pg_catalog.count(*) FROM outbox.subscriptions) OPERATOR(pg_catalog.>=) $2",
            &[DatumWithOid::from(name.as_str()), DatumWithOid::from(max)],
        )
        .ok()
        .flatten()
        .unwrap_or(false);
        if full {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                format!("too many subscriptions: outbox.max_consumers is {max}"),
                "Raise outbox.max_consumers (and max_worker_processes) and restart, or unsubscribe one."
            );
        }
        Spi::run_with_args(
            "INSERT INTO outbox.subscriptions AS s (name, destination, callback, queue, owner) \
             VALUES ($1, $2, $3::pg_catalog.oid::pg_catalog.regprocedure, $4, $5::pg_catalog.oid::pg_catalog.regrole) \
             ON CONFLICT ON CONSTRAINT subscriptions_pkey DO UPDATE \
                 SET destination = excluded.destination, callback = excluded.callback, \
                     queue = excluded.queue, owner = excluded.owner",
            &[
                DatumWithOid::from(name.as_str()),
                DatumWithOid::from(destination.as_str()),
                DatumWithOid::from(callback),
                DatumWithOid::from(queue.as_str()),
                DatumWithOid::from(owner),
            ],
        )
        .unwrap_or_else(|e| error!("could not write subscription \"{name}\": {e}"));
    });
    crate::wake::arm_subscriptions();
    pg_sys::Datum::from(0)
}

finfo_v1!(pg_finfo_outbox_subscription_delete);

/// `outbox._subscription_delete(name) RETURNS boolean`: removes
/// subscription `name`; false when there was none.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_subscription_delete(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the argument is as declared in sql/inbox.sql.
    let Some(name) = (unsafe { fmgr::arg_text(fcinfo, 0) }) else {
        return pg_sys::Datum::from(false);
    };
    let deleted = as_table_owner(|| {
        Spi::get_one_with_args::<bool>(
            "WITH d AS (DELETE FROM outbox.subscriptions s WHERE s.name OPERATOR(pg_catalog.=) $1 RETURNING 1) \
             SELECT EXISTS (SELECT FROM d)",
            &[DatumWithOid::from(name.as_str())],
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    });
    if deleted {
        crate::wake::arm_subscriptions();
    }
    pg_sys::Datum::from(deleted)
}

/// Whether `role` may EXECUTE function `f` (false when it does not exist).
pub fn may_execute(f: pg_sys::Oid, role: pg_sys::Oid) -> bool {
    let proc = pg_sys::SysCacheIdentifier::PROCOID as i32;
    // SAFETY: syscache look-ups by oid inside a transaction.
    unsafe {
        if !pg_sys::SearchSysCacheExists(
            proc,
            pg_sys::Datum::from(f),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        ) {
            return false;
        }
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        let r = pg_sys::pg_proc_aclcheck(f, role, pg_sys::ACL_EXECUTE as pg_sys::AclMode);
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        let r = pg_sys::object_aclcheck(
            pg_sys::ProcedureRelationId,
            f,
            role,
            pg_sys::ACL_EXECUTE as pg_sys::AclMode,
        );
        r == pg_sys::AclResult::ACLCHECK_OK
    }
}

/// Runs `f` as the owner of `outbox.subscriptions`, in a security-restricted
/// operation with search_path pinned to `pg_catalog, pg_temp`.
fn as_table_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = Spi::get_one::<pg_sys::Oid>(
        "SELECT c.relowner FROM pg_catalog.pg_class c \
         WHERE c.oid OPERATOR(pg_catalog.=) 'outbox.subscriptions'::pg_catalog.regclass",
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| error!("outbox.subscriptions does not exist"));
    crate::owner::as_role(owner, true, f)
}
