//! Function-manager glue: the V1 info records Postgres looks up for each C
//! symbol named in `sql/*.sql`, and argument access helpers.

use pgrx::pg_sys;

/// Declares `pg_finfo_<symbol>` so Postgres calls `<symbol>` with the V1
/// convention (what `PG_FUNCTION_INFO_V1` does in C).
macro_rules! finfo_v1 {
    ($finfo:ident) => {
        #[unsafe(no_mangle)]
        #[doc(hidden)]
        pub extern "C" fn $finfo() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
            const V1: ::pgrx::pg_sys::Pg_finfo_record =
                ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}
pub(crate) use finfo_v1;

/// Argument `n` as a raw datum, or None when SQL NULL (or not passed).
pub unsafe fn arg(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Option<pg_sys::Datum> {
    unsafe {
        // Only the `nargs` passed exist: slice no further than that.
        let nargs = usize::try_from((*fcinfo).nargs).unwrap_or(0);
        if n >= nargs {
            return None;
        }
        let a = &(*fcinfo).args.as_slice(nargs)[n];
        (!a.isnull).then_some(a.value)
    }
}

/// Argument `n` as text, or None when SQL NULL.
pub unsafe fn arg_text(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Option<String> {
    unsafe { arg(fcinfo, n).map(|d| text_of(d)) }
}

/// A text datum (possibly toasted) as a Rust string.
pub unsafe fn text_of(d: pg_sys::Datum) -> String {
    unsafe {
        let c = pg_sys::text_to_cstring(d.cast_mut_ptr());
        let s = std::ffi::CStr::from_ptr(c).to_string_lossy().into_owned();
        pg_sys::pfree(c.cast());
        s
    }
}

/// A jsonb datum as JSON text.
pub unsafe fn jsonb_text(d: pg_sys::Datum) -> String {
    unsafe {
        let c: pg_sys::Datum = pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(d)])
            .expect("jsonb_out returns text");
        let s = std::ffi::CStr::from_ptr(c.cast_mut_ptr())
            .to_string_lossy()
            .into_owned();
        pg_sys::pfree(c.cast_mut_ptr());
        s
    }
}

/// JSON text as a jsonb datum.
pub unsafe fn jsonb_from_text(s: &str) -> pg_sys::Datum {
    let c = std::ffi::CString::new(s).expect("JSON text has no NUL");
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::jsonb_in,
            &[Some(pg_sys::Datum::from(c.as_ptr()))],
        )
        .expect("jsonb_in returns a value")
    }
}
