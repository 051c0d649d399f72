//! The inbox record: a MESSAGE's parts as `outbox.received` stores them,
//! and the writes of a message's row.
//!
//! Vocabulary: a message is *recorded* (its id inserted as `consumed`
//! before the callback runs: the unique index decides, so a duplicate — even
//! one arriving at the same moment — is seen inside the transaction),
//! *finished* (its outcome written when it is not a success), or recorded
//! *failed* with a reason when nothing of it can run (a body PostgreSQL
//! cannot store, an error outside the callback).

use std::borrow::Cow;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::Spi;

use super::subscription::Subscription;
use crate::stomp::frame::Frame;

/// A MESSAGE's parts as the inbox stores them, borrowed from the frame
/// where they need no change.
pub struct Prepared<'a> {
    pub id: String,
    pub destination: &'a str,
    pub headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The body, or why it cannot be stored as jsonb (found without
    /// PostgreSQL; what only jsonb's parser refuses is found when the
    /// body is converted).
    pub body: Result<&'a str, &'static str>,
    pub redelivered: bool,
}

impl Prepared<'_> {
    pub fn new(m: &Frame) -> Prepared<'_> {
        let body = match std::str::from_utf8(&m.body) {
            Err(_) => Err("malformed body: not UTF-8"),
            Ok(b) if escapes_nul(b) => {
                Err("malformed body: JSON with \\u0000, which jsonb cannot store")
            }
            Ok(b) if serde_json::from_str::<serde::de::IgnoredAny>(b).is_err() => {
                Err("malformed body: not JSON")
            }
            Ok(b) => Ok(b),
        };
        Prepared {
            id: message_id(m),
            destination: m.get("destination").unwrap_or_default(),
            headers: stored_headers(m),
            body,
            redelivered: m.get("redelivered") == Some("true"),
        }
    }

    /// The headers as a jsonb datum.
    pub fn headers_jsonb(&self) -> pg_sys::Datum {
        crate::jsonb::object(&pairs(&self.headers))
    }

    /// The headers as JSON text.
    pub fn headers_json(&self) -> String {
        crate::headers::to_json(&pairs(&self.headers))
    }
}

/// Whether JSON text holds the escape `\u0000` (which jsonb cannot store);
/// an escaped backslash followed by `u0000` is not one.
fn escapes_nul(json: &str) -> bool {
    let b = json.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'u') && b.get(i + 2..i + 6) == Some(b"0000".as_slice()) {
                return true;
            }
            // Skip the escaped character, whatever it is.
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// cap-msg-id, else dop-msg-id, else amqp-message-id, else message-id.
fn message_id(m: &Frame) -> String {
    ["cap-msg-id", "dop-msg-id", "amqp-message-id", "message-id"]
        .iter()
        .find_map(|h| m.get(h).filter(|v| !v.is_empty()))
        .unwrap_or_default()
        .replace('\0', "\u{FFFD}")
}

/// A jsonb datum from JSON text; raises what jsonb's parser raises (a
/// number out of range, a lone surrogate).
pub fn jsonb(text: &str) -> pg_sys::Datum {
    let c = std::ffi::CString::new(text).unwrap_or_default();
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::jsonb_in,
            &[Some(pg_sys::Datum::from(c.as_ptr()))],
        )
        .expect("jsonb_in returns a value")
    }
}

/// The MESSAGE's headers as the inbox stores them: each name once (the
/// first of repeated names, as STOMP 1.2 reads them); NUL, which STOMP
/// allows and jsonb does not, becomes U+FFFD.
fn stored_headers(m: &Frame) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    fn clean(s: &str) -> Cow<'_, str> {
        if s.contains('\0') {
            Cow::Owned(s.replace('\0', "\u{FFFD}"))
        } else {
            Cow::Borrowed(s)
        }
    }
    let mut seen = std::collections::HashSet::with_capacity(m.headers.len());
    m.headers
        .iter()
        .map(|(k, v)| (clean(k), v))
        .filter(|(k, _)| seen.insert(k.clone()))
        .map(|(k, v)| (k, clean(v)))
        .collect()
}

/// Stored headers as borrowed pairs, for `jsonb::object` and `headers::to_json`.
fn pairs<'a>(headers: &'a [(Cow<'_, str>, Cow<'_, str>)]) -> Vec<(&'a str, Cow<'a, str>)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_ref(), Cow::Borrowed(v.as_ref())))
        .collect()
}

const RECORD: &std::ffi::CStr = c"INSERT INTO outbox.received AS r \
     (message_id, subscription, destination, headers, body, status, processed_at) \
     VALUES ($1, $2, $3, $4, $5, 'consumed', pg_catalog.clock_timestamp()) \
     ON CONFLICT (message_id) DO UPDATE SET attempts = r.attempts OPERATOR(pg_catalog.+) 1, \
         subscription = excluded.subscription, body = excluded.body, headers = excluded.headers, \
         status = 'consumed', last_error = NULL, processed_at = excluded.processed_at \
     WHERE r.status OPERATOR(pg_catalog.=) 'failed' \
     RETURNING r.attempts";

thread_local! {
    /// RECORD, prepared once per worker.
    static RECORD_PLAN: std::cell::Cell<pg_sys::SPIPlanPtr> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

fn text(s: &str) -> pg_sys::Datum {
    unsafe {
        pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
            s.as_ptr().cast(),
            s.len() as i32,
        ))
    }
}

/// Records the message id as consumed; Some(attempts) when the callback
/// must run (new, or failed before), None when it was consumed or
/// discarded already. The row says `consumed` unless the callback's
/// outcome changes it (`finish`), so success costs no second write.
///
/// `direct`: insert the row without a statement (see `direct`) where the
/// table allows it; an id recorded before then raises a unique violation
/// instead of being looked at.
pub fn record(
    id: &str,
    sub: &Subscription,
    destination: &str,
    headers: pg_sys::Datum,
    body: pg_sys::Datum,
    direct: bool,
) -> Option<i32> {
    let (id_text, sub_text, destination_text) = (text(id), text(&sub.name), text(destination));
    if direct
        && crate::direct::insert_received(&crate::direct::Received {
            message_id: id_text,
            subscription: sub_text,
            destination: destination_text,
            headers,
            body,
        })
    {
        // As after a statement: the callback's own statements see the row.
        unsafe { pg_sys::CommandCounterIncrement() };
        return Some(1);
    }
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("outbox consumer: could not connect to SPI");
        }
        let mut plan = RECORD_PLAN.with(|p| p.get());
        if plan.is_null() {
            let mut types = [
                pg_sys::TEXTOID,
                pg_sys::TEXTOID,
                pg_sys::TEXTOID,
                pg_sys::JSONBOID,
                pg_sys::JSONBOID,
            ];
            plan = pg_sys::SPI_prepare(RECORD.as_ptr(), 5, types.as_mut_ptr());
            if plan.is_null() {
                error!(
                    "outbox consumer: could not prepare the inbox record (SPI code {})",
                    std::ptr::read(&raw const pg_sys::SPI_result)
                );
            }
            pg_sys::SPI_keepplan(plan);
            RECORD_PLAN.with(|p| p.set(plan));
        }
        let mut values = [id_text, sub_text, destination_text, headers, body];
        let nulls = [b' ' as std::ffi::c_char; 5];
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        if rc != pg_sys::SPI_OK_INSERT_RETURNING as i32 {
            error!("outbox consumer: could not record message {id} (SPI code {rc})");
        }
        let attempts = if pg_sys::SPI_processed == 0 {
            None
        } else {
            let table = pg_sys::SPI_tuptable;
            let mut isnull = false;
            let d = pg_sys::SPI_getbinval(*(*table).vals, (*table).tupdesc, 1, &mut isnull);
            (!isnull).then(|| d.value() as i32)
        };
        pg_sys::SPI_finish();
        attempts
    }
}

/// Records the message `failed` with `reason`, its body not stored (a body
/// PostgreSQL cannot store, or an error outside the callback); counts an
/// attempt when it had failed before. Returns the attempts, or None when
/// the id was consumed or discarded already (the effect happened once).
pub fn record_failed(
    p: &Prepared,
    sub: &Subscription,
    reason: &str,
) -> Result<Option<i32>, pgrx::spi::SpiError> {
    Spi::connect_mut(|c| {
        let rows = c.update(
            "INSERT INTO outbox.received AS r (message_id, subscription, destination, headers, status, last_error, processed_at) \
             VALUES ($1, $2, $3, $4::pg_catalog.jsonb, 'failed', $5, pg_catalog.clock_timestamp()) \
             ON CONFLICT (message_id) DO UPDATE SET attempts = r.attempts OPERATOR(pg_catalog.+) 1, \
                 last_error = excluded.last_error, processed_at = excluded.processed_at \
             WHERE r.status OPERATOR(pg_catalog.=) 'failed' \
             RETURNING r.attempts",
            None,
            &[
                DatumWithOid::from(p.id.as_str()),
                DatumWithOid::from(sub.name.as_str()),
                DatumWithOid::from(p.destination),
                DatumWithOid::from(p.headers_json().as_str()),
                DatumWithOid::from(reason),
            ],
        )?;
        if rows.is_empty() {
            return Ok(None);
        }
        rows.first().get_one::<i32>()
    })
}

/// Writes the outcome of an attempt that did not succeed.
pub fn finish(id: &str, status: &str, error: Option<&str>) {
    Spi::connect_mut(|c| {
        c.update(
            "UPDATE outbox.received SET status = $2::outbox.receipt_status, last_error = $3, \
                 processed_at = pg_catalog.clock_timestamp() WHERE message_id OPERATOR(pg_catalog.=) $1",
            None,
            &[
                DatumWithOid::from(id),
                DatumWithOid::from(status),
                DatumWithOid::from(error),
            ],
        )
        .unwrap_or_else(|e| error!("outbox consumer: could not record message {id}: {e}"));
    });
}

#[cfg(test)]
mod tests {
    use super::escapes_nul;

    #[test]
    fn nul_escapes_are_found_and_escaped_backslashes_are_not() {
        assert!(escapes_nul(r#"{"a": "\u0000"}"#));
        assert!(escapes_nul(r#"["x\\\u0000"]"#));
        assert!(!escapes_nul(r#"{"path": "C:\\u0000dir"}"#));
        assert!(!escapes_nul(r#"{"a": "\u0001"}"#));
        assert!(!escapes_nul(r#"{"a": "u0000"}"#));
        assert!(!escapes_nul("\\"));
    }
}
