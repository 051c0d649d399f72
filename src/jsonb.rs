//! Building jsonb values directly, without writing and re-parsing JSON
//! text (the outbox row's headers are made once per message).

use std::borrow::Cow;

use pgrx::pg_sys;
use pgrx::pg_sys::JsonbIteratorToken::{WJB_BEGIN_OBJECT, WJB_END_OBJECT, WJB_KEY, WJB_VALUE};

/// A jsonb object of string values, from distinct names (on a repeated
/// name the last value would win, as in jsonb's text input).
pub fn object(pairs: &[(&str, Cow<str>)]) -> pg_sys::Datum {
    unsafe {
        let mut state: *mut pg_sys::JsonbParseState = std::ptr::null_mut();
        pg_sys::pushJsonbValue(&mut state, WJB_BEGIN_OBJECT, std::ptr::null_mut());
        // In jsonb's key order (shorter first, then bytewise): Postgres
        // sorts the keys at the end, and its sort returns at once on
        // input already in order.
        let mut sorted: Vec<&(&str, Cow<str>)> = pairs.iter().collect();
        sorted.sort_by(|(a, _), (b, _)| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
        for (name, value) in sorted {
            // pushJsonbValue keeps pointers to the bytes; JsonbValueToJsonb
            // copies them, while `pairs` is still borrowed.
            pg_sys::pushJsonbValue(&mut state, WJB_KEY, &mut string(name));
            pg_sys::pushJsonbValue(&mut state, WJB_VALUE, &mut string(value));
        }
        let value = pg_sys::pushJsonbValue(&mut state, WJB_END_OBJECT, std::ptr::null_mut());
        pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(value))
    }
}

fn string(s: &str) -> pg_sys::JsonbValue {
    pg_sys::JsonbValue {
        type_: pg_sys::jbvType::jbvString,
        val: pg_sys::JsonbValue__bindgen_ty_1 {
            string: pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
                len: s.len() as i32,
                val: s.as_ptr() as *mut std::ffi::c_char,
            },
        },
    }
}
