//! A row of `outbox.subscriptions` as a consumer uses it, loaded with what
//! the callback host checks (see `callback.rs`).

use pgrx::bgworkers::BackgroundWorker;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::spi::Spi;

/// One subscription. Equal rows mean nothing to restart for.
#[derive(PartialEq)]
pub struct Subscription {
    pub name: String,
    pub destination: String,
    pub queue: String,
    pub callback: pg_sys::Oid,
    /// The callback's name as `regprocedure` prints it, for messages.
    pub callback_name: String,
    pub owner: pg_sys::Oid,
    pub returns_bool: bool,
    /// One `outbox.message` argument, returns void or boolean, a plain
    /// function that returns one row.
    pub shape_ok: bool,
}

/// The subscription's row, or None when it no longer exists (or the
/// extension is gone). Runs its own transaction.
pub fn load(name: &str) -> Option<Subscription> {
    BackgroundWorker::transaction(|| {
        if !super::table_exists("subscriptions") {
            return None;
        }
        Spi::connect(|c| {
            let mut rows = c
                .select(
                    "SELECT s.destination, s.queue, s.callback::oid, s.owner::oid, \
                         p.prorettype OPERATOR(pg_catalog.=) 'pg_catalog.bool'::pg_catalog.regtype, \
                         coalesce(p.pronargs OPERATOR(pg_catalog.=) 1 \
                           AND p.proargtypes[0] OPERATOR(pg_catalog.=) 'outbox.message'::pg_catalog.regtype \
                           AND p.prorettype OPERATOR(pg_catalog.=) ANY (ARRAY['pg_catalog.void'::pg_catalog.regtype, 'pg_catalog.bool'::pg_catalog.regtype]) \
                           AND NOT p.proretset AND p.prokind OPERATOR(pg_catalog.=) 'f', false), \
                         s.callback::pg_catalog.text \
                     FROM outbox.subscriptions s LEFT JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) s.callback \
                     WHERE s.name OPERATOR(pg_catalog.=) $1",
                    None,
                    &[DatumWithOid::from(name)],
                )
                .ok()?;
            let r = rows.next()?;
            Some(Subscription {
                name: name.to_string(),
                destination: r.get::<String>(1).ok()??,
                queue: r.get::<String>(2).ok()??,
                callback: r.get::<pg_sys::Oid>(3).ok()??,
                owner: r.get::<pg_sys::Oid>(4).ok()??,
                returns_bool: r.get::<bool>(5).ok().flatten().unwrap_or(false),
                shape_ok: r.get::<bool>(6).ok().flatten().unwrap_or(false),
                callback_name: r.get::<String>(7).ok().flatten().unwrap_or_default(),
            })
        })
    })
}
