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

unsafe fn publish(fcinfo: pg_sys::FunctionCallInfo) -> Result<uuid::Uuid> {
    let destination = unsafe { fmgr::arg_text(fcinfo, 0) };
    let destination = enqueue::check_destination(destination.as_deref())?;
    let body = unsafe { fmgr::arg(fcinfo, 1) }.ok_or(OutboxError::Null { what: "body" })?;
    let user_headers = match unsafe { fmgr::arg(fcinfo, 2) } {
        None => Vec::new(),
        Some(d) => parse_headers(&unsafe { fmgr::jsonb_text(d) })?,
    };
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
        body,
        user_headers: &user_headers,
        trigger: None,
        delay,
    }))
}

/// Validated user headers from their JSON text (`{}` costs nothing).
pub fn parse_headers(json: &str) -> Result<headers::Headers> {
    if json == "{}" {
        return Ok(Vec::new());
    }
    let value: serde_json::Value = serde_json::from_str(json).expect("jsonb_out yields valid JSON");
    headers::from_json(&value)
}
