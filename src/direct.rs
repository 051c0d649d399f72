//! Writing an outbox row *directly*: through the table access method and
//! the executor's index maintenance (as logical replication's apply worker
//! writes rows), without planning or starting an INSERT statement per
//! message — that start-up was the largest part of a trigger's cost.
//!
//! Vocabulary: the *layout* is where each column of `outbox.published` sits
//! and what its defaults are (the identity sequence, the `scheduled` label),
//! looked up once per backend and forgotten when the table's relcache entry
//! is invalidated (ALTER, DROP, a new trigger). The direct path is taken only
//! while the table is exactly as the extension made it: no triggers, no row
//! security, no generated or unknown columns. Otherwise the caller uses its
//! SPI statement, which handles everything Postgres allows.

use std::cell::Cell;

use pgrx::pg_sys;

/// Column positions (0-based) in `outbox.published`.
#[derive(Clone, Copy, Default)]
struct Layout {
    relid: pg_sys::Oid,
    natts: usize,
    sequence: pg_sys::Oid,
    /// The `scheduled` label's OID (an enum datum).
    scheduled: pg_sys::Oid,
    id: usize,
    message_id: usize,
    destination: usize,
    version: usize,
    body: usize,
    headers: usize,
    status: usize,
    retry: usize,
    added: usize,
    next_attempt_at: usize,
    published_at: usize,
    last_error: usize,
}

#[derive(Clone, Copy)]
enum Known {
    /// Not looked up (or invalidated).
    Unknown,
    /// The table is not as the extension made it: use SPI.
    Unsupported,
    Direct(Layout),
}

thread_local! {
    static LAYOUT: Cell<Known> = const { Cell::new(Known::Unknown) };
    static CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// One row's values; `None` for SQL NULL.
pub struct Values {
    pub message_id: pg_sys::Datum,
    pub destination: pg_sys::Datum,
    pub version: Option<pg_sys::Datum>,
    pub body: pg_sys::Datum,
    pub headers: pg_sys::Datum,
    /// An interval datum.
    pub delay: Option<pg_sys::Datum>,
}

/// Inserts the row directly; false (nothing done) when the table is not
/// as the extension made it. The caller runs as the table's owner.
pub fn insert(v: &Values) -> bool {
    // PostgreSQL 13's executor API differs (and the version is past its end
    // of life): it keeps the SPI statement.
    if cfg!(feature = "pg13") {
        return false;
    }
    let layout = match LAYOUT.with(|l| l.get()) {
        Known::Direct(l) => l,
        Known::Unsupported => return false,
        Known::Unknown => {
            let known = unsafe { look_up() };
            LAYOUT.with(|l| l.set(known));
            match known {
                Known::Direct(l) => l,
                _ => return false,
            }
        }
    };
    #[cfg(not(feature = "pg13"))]
    unsafe {
        insert_with(&layout, v)
    };
    #[cfg(feature = "pg13")]
    let _ = (layout, v);
    true
}

#[cfg(not(feature = "pg13"))]
unsafe fn insert_with(l: &Layout, v: &Values) {
    unsafe {
        let rel = pg_sys::table_open(l.relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let estate = pg_sys::CreateExecutorState();
        (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
        let rri =
            pg_sys::palloc0(size_of::<pg_sys::ResultRelInfo>()).cast::<pg_sys::ResultRelInfo>();
        (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        // Range table index 0: there is no statement, so no range table.
        pg_sys::InitResultRelInfo(rri, rel, 0, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(rri, false);
        let slot = pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
        pg_sys::ExecClearTuple(slot);
        let values = std::slice::from_raw_parts_mut((*slot).tts_values, l.natts);
        let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, l.natts);
        nulls.fill(true);
        let mut set = |at: usize, d: pg_sys::Datum| {
            values[at] = d;
            nulls[at] = false;
        };
        let now = pg_sys::GetCurrentTransactionStartTimestamp();
        set(
            l.id,
            pgrx::direct_function_call_as_datum(
                pg_sys::nextval_oid,
                &[Some(pg_sys::Datum::from(l.sequence))],
            )
            .expect("nextval returns a value"),
        );
        set(l.message_id, v.message_id);
        set(l.destination, v.destination);
        if let Some(version) = v.version {
            set(l.version, version);
        }
        set(l.body, v.body);
        set(l.headers, v.headers);
        set(l.status, pg_sys::Datum::from(l.scheduled));
        set(l.retry, pg_sys::Datum::from(0i32));
        set(l.added, pg_sys::Datum::from(now));
        let next = match v.delay {
            None => pg_sys::Datum::from(now),
            Some(delay) => pgrx::direct_function_call_as_datum(
                pg_sys::timestamptz_pl_interval,
                &[Some(pg_sys::Datum::from(now)), Some(delay)],
            )
            .expect("timestamptz + interval returns a value"),
        };
        set(l.next_attempt_at, next);
        let _ = (l.published_at, l.last_error); // NULL
        pg_sys::ExecStoreVirtualTuple(slot);
        pg_sys::ExecSimpleRelationInsert(rri, estate, slot);
        pg_sys::ExecCloseIndices(rri);
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        pg_sys::FreeExecutorState(estate);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}

/// Reads the table's columns and checks that the direct path may be used.
unsafe fn look_up() -> Known {
    unsafe {
        if !CALLBACK.with(|c| c.replace(true)) {
            pg_sys::CacheRegisterRelcacheCallback(Some(forget), pg_sys::Datum::from(0));
        }
        let nsp = pg_sys::get_namespace_oid(c"outbox".as_ptr(), true);
        let relid = pg_sys::get_relname_relid(c"published".as_ptr(), nsp);
        let sequence = pg_sys::get_relname_relid(c"published_id_seq".as_ptr(), nsp);
        if relid == pg_sys::InvalidOid || sequence == pg_sys::InvalidOid {
            return Known::Unsupported;
        }
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let form = &*(*rel).rd_rel;
        let desc = (*rel).rd_att;
        let plain = form.relkind as u8 == pg_sys::RELKIND_RELATION
            && !form.relhastriggers
            && (*rel).trigdesc.is_null()
            && !form.relrowsecurity
            && ((*desc).constr.is_null() || !(*(*desc).constr).has_generated_stored);
        let natts = (*desc).natts as usize;
        let mut l = Layout {
            relid,
            natts,
            sequence,
            ..Layout::default()
        };
        let mut found = 0;
        let mut ok = plain;
        for (i, att) in (*desc).attrs.as_slice(natts).iter().enumerate() {
            if att.attisdropped {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_bytes();
            let (slot, typ) = match name {
                b"id" => (&mut l.id, pg_sys::INT8OID),
                b"message_id" => (&mut l.message_id, pg_sys::UUIDOID),
                b"destination" => (&mut l.destination, pg_sys::TEXTOID),
                b"version" => (&mut l.version, pg_sys::TEXTOID),
                b"body" => (&mut l.body, pg_sys::JSONBOID),
                b"headers" => (&mut l.headers, pg_sys::JSONBOID),
                b"status" => (&mut l.status, att.atttypid),
                b"retry" => (&mut l.retry, pg_sys::INT4OID),
                b"added" => (&mut l.added, pg_sys::TIMESTAMPTZOID),
                b"next_attempt_at" => (&mut l.next_attempt_at, pg_sys::TIMESTAMPTZOID),
                b"published_at" => (&mut l.published_at, pg_sys::TIMESTAMPTZOID),
                b"last_error" => (&mut l.last_error, pg_sys::TEXTOID),
                _ => {
                    ok = false;
                    continue;
                }
            };
            ok &= att.atttypid == typ;
            *slot = i;
            found += 1;
            if name == b"status" && !pg_sys::type_is_enum(att.atttypid) {
                ok = false;
            } else if name == b"status" {
                let label = pgrx::direct_function_call_as_datum(
                    pg_sys::enum_in,
                    &[
                        Some(pg_sys::Datum::from(c"scheduled".as_ptr())),
                        Some(pg_sys::Datum::from(att.atttypid)),
                    ],
                )
                .expect("enum_in returns a value");
                l.scheduled = pg_sys::Oid::from(label.value() as u32);
            }
        }
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if ok && found == 12 {
            Known::Direct(l)
        } else {
            Known::Unsupported
        }
    }
}

/// Relcache invalidation: look again before the next row.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    LAYOUT.with(|l| {
        let stale = match l.get() {
            Known::Direct(layout) => relid == pg_sys::InvalidOid || relid == layout.relid,
            Known::Unsupported => true,
            Known::Unknown => false,
        };
        if stale {
            l.set(Known::Unknown);
        }
    });
}
