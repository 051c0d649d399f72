//! The SQL functions of the publishing API (`outbox.publish(...)`); each is
//! a V1 C function declared in `sql/outbox_pg.sql`.

use pgrx::pg_guard;
use pgrx::pg_sys;

use crate::enqueue::{self, Message};
use crate::error::{OutboxError, Result};
use crate::fmgr::{self, finfo_v1};
use crate::headers;

finfo_v1!(pg_finfo_outbox_publish);

/// `outbox.publish(destination, body, headers, version, delay) RETURNS uuid`
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_publish(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    match unsafe { publish(fcinfo) } {
        Ok(id) => unsafe {
            let p = pg_sys::palloc(16) as *mut u8;
            std::ptr::copy_nonoverlapping(id.as_bytes().as_ptr(), p, 16);
            pg_sys::Datum::from(p)
        },
        Err(e) => e.raise(),
    }
}

/// The arguments `publish` and `send` share, checked: destination, body,
/// headers.
unsafe fn message_args(
    fcinfo: pg_sys::FunctionCallInfo,
) -> Result<(String, pg_sys::Datum, headers::Headers)> {
    let destination = unsafe { fmgr::arg_text(fcinfo, 0) };
    let destination = enqueue::check_destination(destination.as_deref())?.to_string();
    let body = unsafe { fmgr::arg(fcinfo, 1) }.ok_or(OutboxError::Null { what: "body" })?;
    let user_headers = match unsafe { fmgr::arg(fcinfo, 2) } {
        None => Vec::new(),
        Some(d) => parse_headers(&unsafe { fmgr::jsonb_text(d) })?,
    };
    Ok((destination, body, user_headers))
}

unsafe fn publish(fcinfo: pg_sys::FunctionCallInfo) -> Result<uuid::Uuid> {
    let (destination, body, user_headers) = unsafe { message_args(fcinfo) }?;
    let destination = destination.as_str();
    let version = unsafe { fmgr::arg_text(fcinfo, 3) };
    let wire = enqueue::wire_destination(destination, version.as_deref())?;
    let delay = unsafe { fmgr::arg(fcinfo, 4) };
    if let Some(d) = delay {
        let iv = unsafe { &*(d.cast_mut_ptr::<pg_sys::Interval>()) };
        let micros = (iv.month as i128 * 30 + iv.day as i128) * 86_400_000_000 + iv.time as i128;
        if micros < 0 {
            return Err(OutboxError::NegativeDelay);
        }
    }
    enqueue::check_size(body)?;
    Ok(enqueue::write(&Message {
        destination: &wire,
        version: version.as_deref(),
        body: enqueue::Body::Jsonb(body),
        user_headers: &user_headers,
        trigger: None,
        delay,
    }))
}

finfo_v1!(pg_finfo_outbox_send);

/// `outbox.send(destination, body, headers) RETURNS void`: sends at once
/// over a connection of this backend and waits for the broker's receipt.
/// Not transactional: a rollback does not take the message back.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_send(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    if let Err(e) = unsafe { send(fcinfo) } {
        e.raise();
    }
    pg_sys::Datum::from(0)
}

unsafe fn send(fcinfo: pg_sys::FunctionCallInfo) -> Result<()> {
    use crate::stomp::client::{Connection, send_batch};
    let (destination, body, user_headers) = unsafe { message_args(fcinfo) }?;
    let destination = destination.as_str();
    enqueue::check_size(body)?;
    let id = crate::ids::random_id().to_string();
    let stored = headers::stored(
        &user_headers,
        &headers::Generated {
            message_id: &id,
            destination,
            trigger: None,
            sent: std::time::SystemTime::now(),
            correlation: crate::ids::random_id(),
        },
    );
    let frame = crate::broker::send_frame(destination, &headers::to_json(&stored), &unsafe {
        fmgr::jsonb_text(body)
    })
    .header("receipt", "send-1");
    let config = crate::broker::config();
    let mut conn = Connection::open_any(&config).map_err(|e| OutboxError::Broker(e.to_string()))?;
    let outcome = send_batch(
        &mut conn,
        &[frame],
        config
            .connect_timeout
            .max(std::time::Duration::from_secs(1)),
    );
    let _ = conn.disconnect(std::time::Duration::from_millis(200));
    match outcome.errors.into_iter().next() {
        None if !outcome.receipted.is_empty() => Ok(()),
        None => Err(OutboxError::Broker("no receipt from the broker".into())),
        Some(e @ crate::stomp::client::StompError::Broker { .. }) => {
            Err(OutboxError::Refused(e.to_string()))
        }
        Some(e) => Err(OutboxError::Broker(e.to_string())),
    }
}

/// Validated user headers from their JSON text (`{}` costs nothing).
pub fn parse_headers(json: &str) -> Result<headers::Headers> {
    if json == "{}" {
        return Ok(Vec::new());
    }
    let value: serde_json::Value = serde_json::from_str(json).expect("jsonb_out yields valid JSON");
    headers::from_json(&value)
}

finfo_v1!(pg_finfo_outbox_wake);

/// `outbox._wake()`: the workers look at the subscriptions again when the
/// current transaction commits (called by subscribe/unsubscribe).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_wake(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    crate::wake::arm_subscriptions();
    pg_sys::Datum::from(0)
}

finfo_v1!(pg_finfo_outbox_workers);

/// `outbox._workers() RETURNS jsonb`: every worker's status from shared
/// memory (no table is read), for `outbox.stats()`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_workers(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    use crate::shmem::{PUBLISHERS, SLOTS, Slot};
    let mut list = Vec::new();
    let entry = |kind: &str, s: &Slot| {
        let ts = |ms: i64| {
            if ms > 0 {
                serde_json::Value::from(ms as f64 / 1000.0)
            } else {
                serde_json::Value::Null
            }
        };
        serde_json::json!({
            "worker": kind,
            "name": if kind == "publisher" { "publisher" } else { s.name() },
            "pid": if s.pid > 0 { serde_json::Value::from(s.pid) } else { serde_json::Value::Null },
            "state": if s.pid > 0 || kind == "consumer" { s.state.as_str() } else { "stopped" },
            "host": if s.host_len > 0 { serde_json::Value::from(s.host()) } else { serde_json::Value::Null },
            "messages": s.messages,
            "started_at": ts(s.started_at),
            "last_error": if s.error_len > 0 { serde_json::Value::from(s.error()) } else { serde_json::Value::Null },
            "last_error_at": ts(s.error_at),
            "oldest_waiting_commit": ts(s.waiting_at),
        })
    };
    // This database's workers only.
    if let Some((i, _)) = crate::shmem::db_of(unsafe { pg_sys::MyDatabaseId }) {
        list.push(entry("publisher", &PUBLISHERS.share().0[i]));
    } else if crate::shmem::preloaded() {
        list.push(entry("publisher", &Slot::EMPTY));
    }
    if crate::shmem::preloaded() {
        let db = crate::shmem::my_db();
        for s in SLOTS.share().0.iter().filter(|s| s.used && s.db == db) {
            list.push(entry("consumer", s));
        }
    }
    let text =
        std::ffi::CString::new(serde_json::Value::Array(list).to_string()).expect("no NUL in JSON");
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::jsonb_in,
            &[Some(pg_sys::Datum::from(text.as_ptr()))],
        )
        .expect("jsonb_in returns a value")
    }
}
