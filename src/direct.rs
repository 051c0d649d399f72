//! Writing a row *directly*: through the table access method and the
//! executor's index maintenance (as logical replication's apply worker
//! writes rows), without planning or starting an INSERT statement per row —
//! that start-up was the largest part of a trigger's cost, and of a
//! consumer's record of each message.
//!
//! Vocabulary: a *stock table* is `outbox.published` or `outbox.received`
//! exactly as the extension made it: no triggers, no row security, no
//! generated or unknown columns, no CHECK constraint and no index of
//! anyone else's — so a direct write runs no function of anyone's (and
//! needs no pinned search_path). Its *layout* is where each column sits and
//! the label its `status` starts with, looked up once per backend and
//! forgotten when the table's relcache entry is invalidated (ALTER, DROP, a
//! new trigger). The direct path is taken only for a stock table; otherwise
//! the caller uses its SPI statement, which handles everything Postgres
//! allows. The layout is read after the table's lock is taken (which
//! applies invalidations) and checked against the open relation. The
//! values a direct row gets where the statement would use a column default
//! (`added`, `attempts`, `retry`) are the defaults the extension gave them.

// PostgreSQL 13 keeps the statement: the direct path is compiled out.
#![cfg_attr(feature = "pg13", allow(dead_code))]

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::pg_sys;

/// What a stock table looks like: its columns in order of the `Spec`'s
/// constants, each with its type (`None`: an enum), and the status label
/// a new row gets; `cache` is its place in `LAYOUTS`.
struct Spec {
    cache: usize,
    table: &'static CStr,
    sequence: &'static CStr,
    columns: &'static [(&'static str, Option<pg_sys::Oid>)],
    status: usize,
    label: &'static CStr,
    /// Indexes the extension made on it (none of them runs a function).
    indexes: i32,
}

const MAX_COLUMNS: usize = 12;

mod published {
    use super::{Spec, pg_sys};
    pub const MESSAGE_ID: usize = 1;
    pub const DESTINATION: usize = 2;
    pub const VERSION: usize = 3;
    pub const BODY: usize = 4;
    pub const HEADERS: usize = 5;
    pub const RETRY: usize = 7;
    pub const ADDED: usize = 8;
    pub const NEXT_ATTEMPT_AT: usize = 9;
    pub const SPEC: Spec = Spec {
        cache: 0,
        table: c"published",
        sequence: c"published_id_seq",
        columns: &[
            ("id", Some(pg_sys::INT8OID)),
            ("message_id", Some(pg_sys::UUIDOID)),
            ("destination", Some(pg_sys::TEXTOID)),
            ("version", Some(pg_sys::TEXTOID)),
            ("body", Some(pg_sys::JSONBOID)),
            ("headers", Some(pg_sys::JSONBOID)),
            ("status", None),
            ("retry", Some(pg_sys::INT4OID)),
            ("added", Some(pg_sys::TIMESTAMPTZOID)),
            ("next_attempt_at", Some(pg_sys::TIMESTAMPTZOID)),
            ("published_at", Some(pg_sys::TIMESTAMPTZOID)),
            ("last_error", Some(pg_sys::TEXTOID)),
        ],
        status: 6,
        label: c"scheduled",
        // Primary key, message_id, the work list, the failed rows.
        indexes: 4,
    };
}

mod received {
    use super::{Spec, pg_sys};
    pub const MESSAGE_ID: usize = 1;
    pub const SUBSCRIPTION: usize = 2;
    pub const DESTINATION: usize = 3;
    pub const HEADERS: usize = 4;
    pub const BODY: usize = 5;
    pub const ATTEMPTS: usize = 7;
    pub const ADDED: usize = 9;
    pub const PROCESSED_AT: usize = 10;
    pub const SPEC: Spec = Spec {
        cache: 1,
        table: c"received",
        sequence: c"received_id_seq",
        columns: &[
            ("id", Some(pg_sys::INT8OID)),
            ("message_id", Some(pg_sys::TEXTOID)),
            ("subscription", Some(pg_sys::TEXTOID)),
            ("destination", Some(pg_sys::TEXTOID)),
            ("headers", Some(pg_sys::JSONBOID)),
            ("body", Some(pg_sys::JSONBOID)),
            ("status", None),
            ("attempts", Some(pg_sys::INT4OID)),
            ("last_error", Some(pg_sys::TEXTOID)),
            ("added", Some(pg_sys::TIMESTAMPTZOID)),
            ("processed_at", Some(pg_sys::TIMESTAMPTZOID)),
        ],
        status: 6,
        label: c"consumed",
        // Primary key, message_id.
        indexes: 2,
    };
}

/// Where a stock table's columns sit (`at[c]`: the attribute index of the
/// Spec's column `c`).
#[derive(Clone, Copy)]
struct Layout {
    relid: pg_sys::Oid,
    natts: usize,
    sequence: pg_sys::Oid,
    /// The status label's OID (an enum datum).
    label: pg_sys::Oid,
    at: [usize; MAX_COLUMNS],
}

#[derive(Clone, Copy)]
enum Known {
    /// Not looked up (or invalidated).
    Unknown,
    /// The table (this relation) is not as the extension made it: use SPI.
    Unsupported(pg_sys::Oid),
    Stock(Layout),
}

const TABLES: usize = 2;

thread_local! {
    /// Per stock table, at its `Spec::cache`.
    static LAYOUTS: [Cell<Known>; TABLES] = const { [Cell::new(Known::Unknown), Cell::new(Known::Unknown)] };
    static CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// An outbox row's values; `None` for SQL NULL.
pub struct Published {
    pub message_id: pg_sys::Datum,
    pub destination: pg_sys::Datum,
    pub version: Option<pg_sys::Datum>,
    pub body: pg_sys::Datum,
    pub headers: pg_sys::Datum,
    /// An interval datum.
    pub delay: Option<pg_sys::Datum>,
}

/// Inserts an outbox row (`scheduled`, due now or after the delay); false
/// (nothing done) when the table is not stock. The caller runs as the
/// table's owner.
pub fn insert_published(v: &Published) -> bool {
    write(&published::SPEC, |row| unsafe {
        let now = pg_sys::GetCurrentTransactionStartTimestamp();
        row.set(published::MESSAGE_ID, v.message_id);
        row.set(published::DESTINATION, v.destination);
        if let Some(version) = v.version {
            row.set(published::VERSION, version);
        }
        row.set(published::BODY, v.body);
        row.set(published::HEADERS, v.headers);
        row.set(published::RETRY, pg_sys::Datum::from(0i32));
        row.set(published::ADDED, pg_sys::Datum::from(now));
        let next = match v.delay {
            None => pg_sys::Datum::from(now),
            Some(delay) => pgrx::direct_function_call_as_datum(
                pg_sys::timestamptz_pl_interval,
                &[Some(pg_sys::Datum::from(now)), Some(delay)],
            )
            .expect("timestamptz + interval returns a value"),
        };
        row.set(published::NEXT_ATTEMPT_AT, next);
    })
}

/// An inbox row's values.
pub struct Received {
    pub message_id: pg_sys::Datum,
    pub subscription: pg_sys::Datum,
    pub destination: pg_sys::Datum,
    pub headers: pg_sys::Datum,
    pub body: pg_sys::Datum,
}

/// Inserts an inbox row as a first, successful attempt (`consumed`,
/// attempts 1, processed now); false (nothing done) when the table is not
/// stock. A message id recorded before is a unique violation (SQLSTATE
/// 23505) — after waiting, as any insert does, for a transaction that is
/// recording it at the same moment.
pub fn insert_received(v: &Received) -> bool {
    write(&received::SPEC, |row| unsafe {
        row.set(received::MESSAGE_ID, v.message_id);
        row.set(received::SUBSCRIPTION, v.subscription);
        row.set(received::DESTINATION, v.destination);
        row.set(received::HEADERS, v.headers);
        row.set(received::BODY, v.body);
        row.set(received::ATTEMPTS, pg_sys::Datum::from(1i32));
        row.set(
            received::ADDED,
            pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp()),
        );
        row.set(
            received::PROCESSED_AT,
            pg_sys::Datum::from(pg_sys::GetCurrentTimestamp()),
        );
    })
}

/// A row being filled: columns named by a Spec's constants; those not set
/// are NULL.
struct Row<'a> {
    values: &'a mut [pg_sys::Datum],
    nulls: &'a mut [bool],
    at: &'a [usize; MAX_COLUMNS],
}

impl Row<'_> {
    fn set(&mut self, column: usize, d: pg_sys::Datum) {
        self.values[self.at[column]] = d;
        self.nulls[self.at[column]] = false;
    }
}

fn write(spec: &Spec, fill: impl FnOnce(&mut Row)) -> bool {
    // PostgreSQL 13's executor API differs (and the version is past its end
    // of life): it keeps the SPI statement.
    if cfg!(feature = "pg13") {
        return false;
    }
    let known = || LAYOUTS.with(|l| l[spec.cache].get());
    let relid = match known() {
        Known::Stock(l) => l.relid,
        Known::Unsupported(_) => return false,
        Known::Unknown => unsafe {
            let nsp = pg_sys::get_namespace_oid(c"outbox".as_ptr(), true);
            pg_sys::get_relname_relid(spec.table.as_ptr(), nsp)
        },
    };
    if relid == pg_sys::InvalidOid {
        return false;
    }
    unsafe {
        // Taking the lock applies pending invalidations (an ALTER that
        // committed while we waited forgets the layout): the layout is
        // read only now, and checked against the open relation.
        let rel = pg_sys::try_table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            // Dropped since: the statement reports it as Postgres would.
            LAYOUTS.with(|l| l[spec.cache].set(Known::Unknown));
            return false;
        }
        let layout = match known() {
            Known::Stock(l) if l.relid == relid => Some(l),
            Known::Unsupported(_) => None,
            Known::Stock(_) | Known::Unknown => {
                let k = look_up(rel, spec);
                LAYOUTS.with(|l| l[spec.cache].set(k));
                match k {
                    Known::Stock(l) => Some(l),
                    _ => None,
                }
            }
        };
        let current =
            |l: &Layout| (*(*rel).rd_att).natts as usize == l.natts && (*rel).trigdesc.is_null();
        match layout {
            Some(l) if current(&l) => {
                #[cfg(not(feature = "pg13"))]
                insert_with(rel, &l, spec, fill);
                #[cfg(feature = "pg13")]
                let _ = fill;
                pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
                true
            }
            _ => {
                // The statement takes the same lock again: keep it.
                pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
                false
            }
        }
    }
}

#[cfg(not(feature = "pg13"))]
unsafe fn insert_with(rel: pg_sys::Relation, l: &Layout, spec: &Spec, fill: impl FnOnce(&mut Row)) {
    unsafe {
        let estate = pg_sys::CreateExecutorState();
        // Everything below lives as long as the executor state.
        let caller = pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
        (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
        let rri =
            pg_sys::palloc0(size_of::<pg_sys::ResultRelInfo>()).cast::<pg_sys::ResultRelInfo>();
        (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        // Range table index 0: there is no statement, so no range table.
        pg_sys::InitResultRelInfo(rri, rel, 0, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(rri, false);
        let slot = pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
        pg_sys::ExecClearTuple(slot);
        let mut row = Row {
            values: std::slice::from_raw_parts_mut((*slot).tts_values, l.natts),
            nulls: std::slice::from_raw_parts_mut((*slot).tts_isnull, l.natts),
            at: &l.at,
        };
        row.nulls.fill(true);
        // Column 0 of every stock table is its identity.
        row.set(
            0,
            pgrx::direct_function_call_as_datum(
                pg_sys::nextval_oid,
                &[Some(pg_sys::Datum::from(l.sequence))],
            )
            .expect("nextval returns a value"),
        );
        row.set(spec.status, pg_sys::Datum::from(l.label));
        fill(&mut row);
        pg_sys::ExecStoreVirtualTuple(slot);
        pg_sys::ExecSimpleRelationInsert(rri, estate, slot);
        pg_sys::ExecCloseIndices(rri);
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        pg_sys::MemoryContextSwitchTo(caller);
        pg_sys::FreeExecutorState(estate);
    }
}

/// Reads the open table's columns and checks that it is stock.
unsafe fn look_up(rel: pg_sys::Relation, spec: &Spec) -> Known {
    unsafe {
        if !CALLBACK.with(|c| c.replace(true)) {
            pg_sys::CacheRegisterRelcacheCallback(Some(forget), pg_sys::Datum::from(0));
        }
        let relid = (*rel).rd_id;
        let sequence =
            pg_sys::get_relname_relid(spec.sequence.as_ptr(), (*(*rel).rd_rel).relnamespace);
        if sequence == pg_sys::InvalidOid {
            return Known::Unsupported(relid);
        }
        // First: the index list may read the catalog and so rebuild the
        // relation's entry, which the pointers below point into.
        let indexes = pg_sys::RelationGetIndexList(rel);
        let n_indexes = if indexes.is_null() {
            0
        } else {
            (*indexes).length
        };
        pg_sys::list_free(indexes);
        let form = &*(*rel).rd_rel;
        let desc = (*rel).rd_att;
        // No trigger descriptor: no triggers now (`relhastriggers` stays set
        // after the last one is dropped, until a VACUUM).
        let mut ok = form.relkind as u8 == pg_sys::RELKIND_RELATION
            && (*rel).trigdesc.is_null()
            && !form.relrowsecurity
            && ((*desc).constr.is_null()
                || (!(*(*desc).constr).has_generated_stored && (*(*desc).constr).num_check == 0))
            && n_indexes == spec.indexes;
        let natts = (*desc).natts as usize;
        let mut l = Layout {
            relid,
            natts,
            sequence,
            label: pg_sys::InvalidOid,
            at: [0; MAX_COLUMNS],
        };
        let mut found = 0;
        for i in 0..natts {
            let att = &*attribute(desc, i);
            if att.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(att.attname.data.as_ptr()).to_bytes();
            let Some(c) = spec.columns.iter().position(|(n, _)| n.as_bytes() == name) else {
                ok = false;
                continue;
            };
            l.at[c] = i;
            found += 1;
            // The identity is the extension's (GENERATED ALWAYS).
            if c == 0 && att.attidentity as u8 != pg_sys::ATTRIBUTE_IDENTITY_ALWAYS {
                ok = false;
            }
            match spec.columns[c].1 {
                Some(typ) => ok &= att.atttypid == typ,
                None if !pg_sys::type_is_enum(att.atttypid) => ok = false,
                None => {
                    let label = pgrx::direct_function_call_as_datum(
                        pg_sys::enum_in,
                        &[
                            Some(pg_sys::Datum::from(spec.label.as_ptr())),
                            Some(pg_sys::Datum::from(att.atttypid)),
                        ],
                    )
                    .expect("enum_in returns a value");
                    l.label = pg_sys::Oid::from(label.value() as u32);
                }
            }
        }
        if ok && found == spec.columns.len() {
            Known::Stock(l)
        } else {
            Known::Unsupported(relid)
        }
    }
}

/// The i-th (0-based) attribute of a tuple descriptor, on every supported
/// major: PostgreSQL 18 keeps them after its compact attributes, where
/// only its `TupleDescAttr` knows the way.
pub(crate) unsafe fn attribute(
    desc: pg_sys::TupleDesc,
    i: usize,
) -> *const pg_sys::FormData_pg_attribute {
    #[cfg(feature = "pg18")]
    unsafe {
        pg_sys::TupleDescAttr(desc, i as std::ffi::c_int)
    }
    #[cfg(not(feature = "pg18"))]
    unsafe {
        (*desc).attrs.as_ptr().add(i)
    }
}

/// Relcache invalidation of the table (or of all relations): look again
/// before the next row.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    LAYOUTS.with(|layouts| {
        for l in layouts {
            let known = match l.get() {
                Known::Stock(layout) => layout.relid,
                Known::Unsupported(known) => known,
                Known::Unknown => continue,
            };
            if relid == pg_sys::InvalidOid || relid == known {
                l.set(Known::Unknown);
            }
        }
    });
}
