//! A row as jsonb's text — exactly what `to_jsonb(row)::text` gives —
//! written straight from the tuple when every column is of a common
//! built-in type: a captured message's body without a jsonb value built
//! and printed on the way (that was a fifth of a captured row's cost).
//!
//! Vocabulary: a *plan* lists a row's columns in jsonb's key order
//! (shorter names first, then bytewise), each with its key already
//! escaped and the *kind* of writing its values take; a plan with a
//! column of any other type (a domain, an array, json, a user's type) is
//! not *direct*, and such rows go through `to_jsonb`. The pg_test tier
//! compares both ways value by value.

use std::ffi::CStr;

use pgrx::pg_sys;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bool,
    Int2,
    Int4,
    Int8,
    /// numeric: its text, a JSON number unless NaN or ±Infinity.
    Numeric,
    /// float4 and float8: their text read back as numeric, as jsonb does.
    Float4,
    Float8,
    /// text, varchar, char(n): the stored characters, escaped.
    Text,
    Uuid,
    /// date, timestamp, timestamptz: ISO 8601, as jsonb writes them.
    DateTime,
}

impl Kind {
    fn of(typ: pg_sys::Oid) -> Option<Kind> {
        Some(match typ {
            pg_sys::BOOLOID => Kind::Bool,
            pg_sys::INT2OID => Kind::Int2,
            pg_sys::INT4OID => Kind::Int4,
            pg_sys::INT8OID => Kind::Int8,
            pg_sys::NUMERICOID => Kind::Numeric,
            pg_sys::FLOAT4OID => Kind::Float4,
            pg_sys::FLOAT8OID => Kind::Float8,
            pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => Kind::Text,
            pg_sys::UUIDOID => Kind::Uuid,
            pg_sys::DATEOID | pg_sys::TIMESTAMPOID | pg_sys::TIMESTAMPTZOID => Kind::DateTime,
            _ => return None,
        })
    }
}

struct Column {
    attnum: i16,
    name: Vec<u8>,
    typ: pg_sys::Oid,
    kind: Option<Kind>,
    /// `"name": `, escaped.
    key: Vec<u8>,
}

/// How one table's rows (or a projection of them) are written.
pub struct Plan {
    natts: i32,
    columns: Vec<Column>,
}

impl Plan {
    /// The plan for `desc`'s columns `attnums` (every live column when
    /// None).
    ///
    /// # Safety
    /// `desc` is a valid tuple descriptor.
    pub unsafe fn new(desc: pg_sys::TupleDesc, attnums: Option<&[i16]>) -> Plan {
        let natts = unsafe { (*desc).natts };
        let all: Vec<i16> = (1..=natts as i16).collect();
        let mut columns: Vec<Column> = attnums
            .unwrap_or(&all)
            .iter()
            .filter_map(|&attnum| {
                let (name, typ) = unsafe { column(desc, attnum) }?;
                let mut key = Vec::with_capacity(name.len() + 4);
                escape(&mut key, &name);
                key.extend_from_slice(b": ");
                Some(Column {
                    attnum,
                    kind: Kind::of(typ),
                    name,
                    typ,
                    key,
                })
            })
            .collect();
        // jsonb's order of keys: by length, then by bytes.
        columns.sort_by(|a, b| (a.name.len(), &a.name).cmp(&(b.name.len(), &b.name)));
        Plan { natts, columns }
    }

    /// Whether the plan still describes `desc` (no column added, dropped,
    /// renamed or retyped since).
    ///
    /// # Safety
    /// `desc` is a valid tuple descriptor.
    pub unsafe fn fits(&self, desc: pg_sys::TupleDesc) -> bool {
        (unsafe { (*desc).natts } == self.natts)
            && self.columns.iter().all(|c| unsafe {
                let att = &*crate::direct::attribute(desc, c.attnum as usize - 1);
                !att.attisdropped
                    && att.atttypid == c.typ
                    && CStr::from_ptr(att.attname.data.as_ptr()).to_bytes() == c.name
            })
    }

    /// Whether every column is written directly.
    pub fn direct(&self) -> bool {
        self.columns.iter().all(|c| c.kind.is_some())
    }

    /// The row's jsonb text; only for a direct plan that fits. None once
    /// it would pass `limit` bytes: such a row goes through `to_jsonb`
    /// (PostgreSQL's memory and limits; its size is then checked as the
    /// table mode checks it), never through a large buffer here.
    ///
    /// # Safety
    /// `tuple` is a tuple of `desc`, which the plan fits.
    pub unsafe fn write(
        &self,
        desc: pg_sys::TupleDesc,
        tuple: pg_sys::HeapTuple,
        limit: usize,
    ) -> Option<String> {
        debug_assert!(self.direct());
        let n = self.natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); n];
        let mut nulls = vec![false; n];
        unsafe { pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr()) };
        let mut out = Vec::with_capacity(16 + 24 * self.columns.len());
        out.push(b'{');
        for (i, c) in self.columns.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(&c.key);
            let at = c.attnum as usize - 1;
            if nulls[at] {
                out.extend_from_slice(b"null");
                continue;
            }
            let kind = c.kind.expect("a direct plan");
            // A text's escaped form takes at least its size and two quotes
            // (and a brace follows): known before it is read, toasted or not.
            if kind == Kind::Text
                && out.len() + unsafe { pg_sys::toast_raw_datum_size(values[at]) }
                    - pg_sys::VARHDRSZ
                    + 3
                    > limit
            {
                return None;
            }
            unsafe { value(&mut out, kind, c.typ, values[at]) };
            if out.len() + 1 > limit {
                return None;
            }
        }
        out.push(b'}');
        // Checked even in a UTF-8 database: bytes that came in without a
        // conversion (a foreign table, a C function) may be invalid, and an
        // invalid message could not be read back. As jsonb's text's
        // conversion does (and then measured: a replacement is longer).
        let text = match String::from_utf8(out) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        (text.len() <= limit).then_some(text)
    }
}

/// Name and type of a live column.
unsafe fn column(desc: pg_sys::TupleDesc, attnum: i16) -> Option<(Vec<u8>, pg_sys::Oid)> {
    unsafe {
        if attnum < 1 || attnum as i32 > (*desc).natts {
            return None;
        }
        let att = &*crate::direct::attribute(desc, attnum as usize - 1);
        (!att.attisdropped).then(|| {
            (
                CStr::from_ptr(att.attname.data.as_ptr())
                    .to_bytes()
                    .to_vec(),
                att.atttypid,
            )
        })
    }
}

/// One non-null value, as jsonb prints it.
unsafe fn value(out: &mut Vec<u8>, kind: Kind, typ: pg_sys::Oid, d: pg_sys::Datum) {
    use std::io::Write;
    match kind {
        Kind::Bool => out.extend_from_slice(if d.value() != 0 { b"true" } else { b"false" }),
        Kind::Int2 => write!(out, "{}", d.value() as i16).expect("a Vec takes it"),
        Kind::Int4 => write!(out, "{}", d.value() as i32).expect("a Vec takes it"),
        Kind::Int8 => write!(out, "{}", d.value() as i64).expect("a Vec takes it"),
        Kind::Numeric => unsafe {
            let text = call_out(pg_sys::numeric_out, d);
            number(out, CStr::from_ptr(text), false);
            pg_sys::pfree(text.cast());
        },
        Kind::Float4 | Kind::Float8 => unsafe {
            let f = if kind == Kind::Float4 {
                pg_sys::float4out
            } else {
                pg_sys::float8out
            };
            let text = call_out(f, d);
            number(out, CStr::from_ptr(text), true);
            pg_sys::pfree(text.cast());
        },
        Kind::Text => unsafe {
            let p = d.cast_mut_ptr::<pg_sys::varlena>();
            // Inline and uncompressed (most values): read in place.
            let v = if pgrx::varlena::varatt_is_1b_e(p) || pgrx::varlena::varatt_is_4b_c(p) {
                pg_sys::pg_detoast_datum_packed(p)
            } else {
                p
            };
            let len = pgrx::varlena::varsize_any_exhdr(v);
            let data = pgrx::varlena::vardata_any(v) as *const u8;
            escape(out, std::slice::from_raw_parts(data, len));
            if v.cast::<u8>() != d.cast_mut_ptr::<u8>() {
                pg_sys::pfree(v.cast());
            }
        },
        Kind::Uuid => unsafe {
            let bytes = &*d.cast_mut_ptr::<[u8; 16]>();
            out.push(b'"');
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            out.extend_from_slice(
                uuid::Uuid::from_bytes(*bytes)
                    .hyphenated()
                    .encode_lower(&mut buf)
                    .as_bytes(),
            );
            out.push(b'"');
        },
        Kind::DateTime => unsafe {
            // MAXDATELEN + 1: what JsonEncodeDateTime writes at most.
            let mut buf = [0 as std::ffi::c_char; 129];
            let text = pg_sys::JsonEncodeDateTime(buf.as_mut_ptr(), d, typ, std::ptr::null());
            escape(out, CStr::from_ptr(text).to_bytes());
        },
    }
}

/// Calls a type's output function.
unsafe fn call_out(
    f: unsafe fn(pg_sys::FunctionCallInfo) -> pg_sys::Datum,
    d: pg_sys::Datum,
) -> *mut std::ffi::c_char {
    unsafe {
        pgrx::direct_function_call_as_datum(f, &[Some(d)])
            .expect("an output function returns text")
            .cast_mut_ptr()
    }
}

/// A number's text as jsonb keeps it: a JSON number unless it is NaN or
/// an infinity (a string then); a float's text is read back as numeric
/// first (`1e+20` is kept as `100000000000000000000`).
unsafe fn number(out: &mut Vec<u8>, text: &CStr, float: bool) {
    let bytes = text.to_bytes();
    if bytes.iter().any(|&b| b == b'N' || b == b'n') {
        escape(out, bytes);
    } else if float {
        unsafe {
            let n = pgrx::direct_function_call_as_datum(
                pg_sys::numeric_in,
                &[
                    Some(pg_sys::Datum::from(text.as_ptr())),
                    Some(pg_sys::Datum::from(pg_sys::InvalidOid)),
                    Some(pg_sys::Datum::from(-1i32)),
                ],
            )
            .expect("numeric_in returns a value");
            let back = call_out(pg_sys::numeric_out, n);
            out.extend_from_slice(CStr::from_ptr(back).to_bytes());
            pg_sys::pfree(back.cast());
            pg_sys::pfree(n.cast_mut_ptr());
        }
    } else {
        out.extend_from_slice(bytes);
    }
}

/// A JSON string as PostgreSQL's `escape_json` writes it.
fn escape(out: &mut Vec<u8>, s: &[u8]) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut from = 0;
    for (i, &b) in s.iter().enumerate() {
        let with: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..0x20 => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[from..i]);
        if with.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 15)]);
        } else {
            out.extend_from_slice(with);
        }
        from = i + 1;
    }
    out.extend_from_slice(&s[from..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::escape;

    fn escaped(s: &str) -> String {
        let mut out = Vec::new();
        escape(&mut out, s.as_bytes());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_escape_as_postgres_does() {
        assert_eq!(escaped(""), r#""""#);
        assert_eq!(escaped("plain é"), r#""plain é""#);
        assert_eq!(escaped("a\"b\\c/d"), r#""a\"b\\c/d""#);
        assert_eq!(
            escaped("\u{8}\u{c}\n\r\t\u{1}\u{1f}\u{7f}"),
            "\"\\b\\f\\n\\r\\t\\u0001\\u001f\u{7f}\""
        );
    }

    proptest::proptest! {
        #[test]
        fn escaped_strings_read_back(s in ".*") {
            let back: String = serde_json::from_str(&escaped(&s)).unwrap();
            proptest::prop_assert_eq!(back, s);
        }
    }
}
