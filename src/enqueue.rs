//! The one path every message takes into the outbox: validate, build the
//! stored headers, insert the row (directly, see direct.rs, or through a
//! saved plan), arm the commit wake.
//! Used by `outbox.publish(...)` (api.rs) and the trigger (trigger.rs).
//!
//! Vocabulary: the *owner switch* runs the insert as the owner of
//! `outbox.published`, a security-restricted operation under a pinned
//! search_path (`as_owner`). Its caches are plain cells, copied out before
//! use, so a publish may run inside another (from a serializer, a callback,
//! a trigger on the table).

use std::cell::Cell;

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

use crate::error::{OutboxError, Result};
use crate::headers::{self, Generated};

/// Checks a destination the way a STOMP broker routes it: `/` and a name.
pub fn check_destination(destination: Option<&str>) -> Result<&str> {
    let d = destination.ok_or(OutboxError::Null {
        what: "destination",
    })?;
    if d.is_empty() {
        return Err(OutboxError::EmptyDestination);
    }
    if !d.starts_with('/') || d.len() < 2 || d.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(OutboxError::Destination(d.to_string()));
    }
    Ok(d)
}

/// The wire destination: `destination.version` when a version is given.
pub fn wire_destination(destination: &str, version: Option<&str>) -> Result<String> {
    match version {
        None => Ok(destination.to_string()),
        Some(v) if v.is_empty() || v.chars().any(|c| c.is_control() || c.is_whitespace()) => {
            Err(OutboxError::Version(v.to_string()))
        }
        Some(v) => Ok(format!("{destination}.{v}")),
    }
}

/// Rejects a body over `outbox.max_message_bytes` (its uncompressed jsonb
/// size, read from the varlena header without detoasting).
pub fn check_size(body: pg_sys::Datum) -> Result<()> {
    check_len(unsafe { pg_sys::toast_raw_datum_size(body) })
}

/// `outbox.max_message_bytes`.
pub fn max_bytes() -> usize {
    crate::guc::MAX_MESSAGE_BYTES.get().max(0) as usize
}

/// Rejects a body of `size` bytes over `outbox.max_message_bytes`.
fn check_len(size: usize) -> Result<()> {
    let limit = max_bytes();
    if size > limit {
        return Err(OutboxError::TooLarge { size, limit });
    }
    Ok(())
}

/// A message body: a jsonb datum, or (a trigger's row, for the WAL) its
/// text already.
pub enum Body {
    Jsonb(pg_sys::Datum),
    Text(String),
}

/// One message about to be written.
pub struct Message<'a> {
    /// Wire destination (version suffix applied).
    pub destination: &'a str,
    pub version: Option<&'a str>,
    pub body: Body,
    pub user_headers: &'a [(String, String)],
    /// `(operation, schema.table)` for trigger messages.
    pub trigger: Option<(&'a str, &'a str)>,
    /// An interval datum, or None for "now".
    pub delay: Option<pg_sys::Datum>,
}

const INSERT: &std::ffi::CStr = c"INSERT INTO outbox.published \
     (message_id, destination, version, body, headers, next_attempt_at) \
     VALUES ($1, $2, $3, $4, $5, pg_catalog.now() OPERATOR(pg_catalog.+) COALESCE($6, '0'::pg_catalog.interval))";

thread_local! {
    /// `outbox.published` and its schema, found by name once per backend
    /// and confirmed at each use (see `owner`).
    static TABLE: Cell<(pg_sys::Oid, pg_sys::Oid)> =
        const { Cell::new((pg_sys::InvalidOid, pg_sys::InvalidOid)) };
    /// The INSERT, prepared once per backend and kept (the plan cache
    /// revalidates it if the table is recreated). Always run under the
    /// pinned search_path, so it is never re-planned for a caller's.
    static PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

/// Writes the message into `outbox.published` in the current transaction
/// and returns its message id. The caller has validated destination and body.
pub fn write(m: &Message) -> uuid::Uuid {
    // Time-ordered (version 7): each new id lands at the right edge of the
    // message_id index instead of on a random page of it.
    let now = std::time::SystemTime::now();
    let id = crate::ids::message_id_at(now);
    let delayed = m.delay.is_some_and(|d| !interval_is_zero(d));
    if crate::capture::wanted(delayed) {
        // Once per transaction: the slot's look scans shared memory.
        if !crate::wake::captured()
            && let Err(e) = crate::capture::check()
        {
            e.raise();
        }
        let text;
        let body = match &m.body {
            Body::Text(t) => t.as_str(),
            Body::Jsonb(d) => {
                // SAFETY: a jsonb datum.
                text = unsafe { crate::fmgr::jsonb_text(*d) };
                text.as_str()
            }
        };
        let size = body.len()
            + m.destination.len()
            + m.user_headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        // A WAL record holds at most about 1 GB (and a reader allocates
        // it whole): a message that large goes into the table instead.
        if size <= crate::capture::MESSAGE_MAX {
            // The generated headers are made when the message is read back.
            crate::capture::emit(&crate::capture::Outgoing {
                message_id: *id.as_bytes(),
                sent: now
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64),
                destination: m.destination,
                version: m.version,
                user_headers: m.user_headers,
                trigger: m.trigger,
                body,
            });
            crate::wake::arm_captured();
            return id;
        }
    }
    let id_text = id.to_string();
    let headers = headers::stored(
        m.user_headers,
        &Generated {
            message_id: &id_text,
            destination: m.destination,
            trigger: m.trigger,
            sent: now,
            correlation: crate::ids::random_id(),
        },
    );
    let body = match &m.body {
        Body::Jsonb(d) => *d,
        // SAFETY: JSON text made by rowjson, as jsonb reads it.
        Body::Text(t) => unsafe { crate::fmgr::jsonb_from_text(t) },
    };
    unsafe {
        let uuid = pg_sys::palloc(16) as *mut u8;
        std::ptr::copy_nonoverlapping(id.as_bytes().as_ptr(), uuid, 16);
        let headers_datum = crate::jsonb::object(&headers);
        let mut values = [
            pg_sys::Datum::from(uuid),
            text_datum(m.destination),
            m.version.map(text_datum).unwrap_or(pg_sys::Datum::from(0)),
            body,
            headers_datum,
            m.delay.unwrap_or(pg_sys::Datum::from(0)),
        ];
        let nulls = [
            b' ' as std::ffi::c_char,
            b' ' as _,
            if m.version.is_some() { b' ' } else { b'n' } as _,
            b' ' as _,
            b' ' as _,
            if m.delay.is_some() { b' ' } else { b'n' } as _,
        ];
        // A stock table runs nothing of anyone's: the owner switch needs no
        // pinned search_path there (it costs a settings save and restore
        // per row).
        let direct = as_owner(false, || {
            crate::direct::insert_published(&crate::direct::Published {
                message_id: values[0],
                destination: values[1],
                version: m.version.is_some().then_some(values[2]),
                body: values[3],
                headers: values[4],
                delay: m.delay,
            })
        });
        if !direct {
            // The table is not as the extension made it (a trigger on it,
            // say): the statement does all Postgres would.
            as_owner(true, || {
                if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
                    pgrx::error!("outbox: could not connect to SPI");
                }
                let plan = plan();
                let rc =
                    pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
                if rc != pg_sys::SPI_OK_INSERT as i32 {
                    pgrx::error!("outbox: insert into outbox.published failed (SPI code {rc})");
                }
                pg_sys::SPI_finish();
            });
        }
    }
    crate::wake::arm();
    id
}

/// Whether an interval datum is zero (no delay).
fn interval_is_zero(d: pg_sys::Datum) -> bool {
    // SAFETY: an interval datum, by reference.
    let iv = unsafe { &*(d.cast_mut_ptr::<pg_sys::Interval>()) };
    iv.month == 0 && iv.day == 0 && iv.time == 0
}

/// Runs `f` as the owner of `outbox.published`: publishers need EXECUTE on
/// the API, not INSERT on the table (so they cannot forge rows). It is a
/// security-restricted operation (see `crate::owner`), with search_path
/// pinned when `pin`: whatever the table runs (an index expression, a
/// trigger someone added) cannot take the owner's rights with it, nor be
/// steered by the caller's search_path.
unsafe fn as_owner<R>(pin: bool, f: impl FnOnce() -> R) -> R {
    crate::owner::as_role(unsafe { owner() }, pin, f)
}

unsafe fn plan() -> pg_sys::SPIPlanPtr {
    let cached = PLAN.with(|p| p.get());
    if !cached.is_null() {
        return cached;
    }
    let mut types = [
        pg_sys::UUIDOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::JSONBOID,
        pg_sys::JSONBOID,
        pg_sys::INTERVALOID,
    ];
    unsafe {
        let plan = pg_sys::SPI_prepare(INSERT.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if plan.is_null() {
            let rc = pg_sys::SPI_result;
            pgrx::error!(
                "outbox: could not prepare the insert into outbox.published (SPI code {rc})"
            );
        }
        if pg_sys::SPI_keepplan(plan) != 0 {
            pgrx::error!("outbox: could not keep the insert into outbox.published");
        }
        PLAN.with(|p| p.set(plan));
        plan
    }
}

/// The owner of `outbox.published` (the role that created the extension),
/// read from its catalog row: one syscache lookup per message, no relation
/// opened, and a table dropped and made again (or given another owner) is
/// seen at once.
unsafe fn owner() -> pg_sys::Oid {
    let (relid, nsp) = TABLE.with(|t| t.get());
    if let Some(owner) = unsafe { owner_of(relid, nsp) } {
        return owner;
    }
    unsafe {
        // Catalog lookups without ACL checks: the caller may lack USAGE on
        // the schema, and needs none.
        let nsp = pg_sys::get_namespace_oid(c"outbox".as_ptr(), false);
        let relid = pg_sys::get_relname_relid(c"published".as_ptr(), nsp);
        let Some(owner) = owner_of(relid, nsp) else {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                "relation \"outbox.published\" does not exist",
                "outbox",
            )
            .set_hint("Drop and create the extension outbox_pg again.")
            .report(PgLogLevel::ERROR);
            unreachable!("ereport(ERROR) returned")
        };
        TABLE.with(|t| t.set((relid, nsp)));
        owner
    }
}

/// `relowner` of `relid` while it is still `outbox.published`.
unsafe fn owner_of(relid: pg_sys::Oid, nsp: pg_sys::Oid) -> Option<pg_sys::Oid> {
    if relid == pg_sys::InvalidOid {
        return None;
    }
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(relid),
        );
        if tuple.is_null() {
            return None;
        }
        let form = &*pg_sys::GETSTRUCT(tuple).cast::<pg_sys::FormData_pg_class>();
        let same = form.relnamespace == nsp
            && std::ffi::CStr::from_ptr(form.relname.data.as_ptr()) == c"published";
        let owner = form.relowner;
        pg_sys::ReleaseSysCache(tuple);
        same.then_some(owner)
    }
}

fn text_datum(s: &str) -> pg_sys::Datum {
    unsafe {
        pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
            s.as_ptr() as *const _,
            s.len() as i32,
        ))
    }
}
