//! In-transaction behaviour (`#[pg_test]`): each test runs in a transaction
//! that is rolled back, so no worker ever sees these rows.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one<T: pgrx::IntoDatum + pgrx::FromDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql)
            .expect("query runs")
            .expect("not null")
    }

    #[pg_test]
    fn publish_writes_one_scheduled_row_with_generated_headers() {
        let id: pgrx::Uuid =
            one("SELECT outbox.publish('/topic/orders', '{\"n\": 1}', '{\"team\": \"billing\"}')");
        let id = id.to_string();
        let (dest, status, msg_id): (Option<String>, Option<String>, Option<String>) =
            Spi::get_three(
                "SELECT destination, status::text, headers->>'dop-msg-id' FROM outbox.published",
            )
            .unwrap();
        let team: Option<String> =
            Spi::get_one("SELECT headers->>'team' FROM outbox.published").unwrap();
        assert_eq!(dest.as_deref(), Some("/topic/orders"));
        assert_eq!(status.as_deref(), Some("scheduled"));
        assert_eq!(msg_id.as_deref(), Some(id.as_str()));
        assert_eq!(team.as_deref(), Some("billing"));
        let same: bool = one(&format!(
            "SELECT message_id = '{id}'::uuid FROM outbox.published"
        ));
        assert!(same);
    }

    #[pg_test]
    fn version_and_delay() {
        Spi::run("SELECT outbox.publish('/topic/o', '1', version => 'v2', delay => '1 hour')")
            .unwrap();
        let dest: String = one("SELECT destination FROM outbox.published");
        assert_eq!(dest, "/topic/o.v2");
        let later: bool =
            one("SELECT next_attempt_at >= now() + interval '59 minutes' FROM outbox.published");
        assert!(later);
    }

    #[pg_test]
    fn rows_written_by_a_trigger_carry_op_and_table() {
        Spi::run("CREATE TABLE t (id int PRIMARY KEY, a text, b int)").unwrap();
        Spi::run("CREATE TRIGGER t_out AFTER INSERT OR UPDATE OR DELETE ON t FOR EACH ROW EXECUTE FUNCTION outbox.publish('/topic/t', 'fields=b')").unwrap();
        Spi::run("INSERT INTO t VALUES (1, 'x', 10); UPDATE t SET b = 11; DELETE FROM t").unwrap();
        let ops: String =
            one("SELECT string_agg(headers->>'outbox-op', ',' ORDER BY id) FROM outbox.published");
        assert_eq!(ops, "INSERT,UPDATE,DELETE");
        let bodies: String =
            one("SELECT string_agg(body::text, ';' ORDER BY id) FROM outbox.published");
        assert_eq!(
            bodies,
            r#"{"b": 10, "id": 1};{"b": 11, "id": 1};{"b": 11, "id": 1}"#
        );
        let table: String = one("SELECT DISTINCT headers->>'outbox-table' FROM outbox.published");
        assert_eq!(table, "public.t");
    }

    #[pg_test(error = "destination must not be null")]
    fn null_destination_is_an_error() {
        Spi::run("SELECT outbox.publish(NULL, '{}')").unwrap();
    }

    /// `jsonb::object` (names pushed in jsonb's key order) builds the same
    /// jsonb as the text input of the same pairs, over many generated sets
    /// of names: ties in length, multi-byte names, repeated names (the
    /// last value wins, as in the text input), none at all.
    #[pg_test]
    fn headers_jsonb_is_the_text_inputs() {
        use std::borrow::Cow;
        use std::ffi::{CStr, CString};
        let out = |d: pg_sys::Datum| unsafe {
            let text = pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(d)])
                .expect("jsonb_out returns a value");
            CStr::from_ptr(text.cast_mut_ptr())
                .to_string_lossy()
                .into_owned()
        };
        let names = [
            "a",
            "b",
            "aa",
            "ab",
            "ba",
            "é",
            "ü",
            "dop-msg-id",
            "content-type",
            "x-y",
        ];
        // A small linear congruential generator: the same cases every run.
        let mut seed = 0x2545_f491_u64;
        let mut next = |n: usize| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) as usize % n
        };
        for case in 0..300 {
            let pairs: Vec<(&str, String)> = (0..next(12))
                .map(|i| (names[next(names.len())], format!("v{case}.{i}")))
                .collect();
            let cow: Vec<(&str, Cow<str>)> = pairs
                .iter()
                .map(|(k, v)| (*k, Cow::Borrowed(v.as_str())))
                .collect();
            let built = out(crate::jsonb::object(&cow));
            let text = format!(
                "{{{}}}",
                pairs
                    .iter()
                    .map(|(k, v)| format!(
                        "{}: {}",
                        serde_json::to_string(k).unwrap(),
                        serde_json::to_string(v).unwrap()
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let c = CString::new(text.clone()).unwrap();
            let parsed = unsafe {
                pgrx::direct_function_call_as_datum(
                    pg_sys::jsonb_in,
                    &[Some(pg_sys::Datum::from(c.as_ptr()))],
                )
                .expect("jsonb_in returns a value")
            };
            assert_eq!(built, out(parsed), "pairs {text}");
        }
    }

    /// The write path's fast way (no INSERT statement) is taken for the
    /// table as the extension made it, and not once anyone else's index
    /// is on it (an index function would then run as the table's owner
    /// without a pinned search_path). A wrong count of the extension's own
    /// indexes once sent every row through the statement, unnoticed.
    #[pg_test]
    #[cfg(not(feature = "pg13"))]
    fn a_stock_table_is_written_directly_and_not_with_an_index_of_anyone_else() {
        use pgrx::IntoDatum;
        let row = |n: u8| crate::direct::Published {
            message_id: pgrx::Uuid::from_bytes([n; 16]).into_datum().unwrap(),
            destination: "/topic/direct".into_datum().unwrap(),
            version: None,
            body: pgrx::JsonB(serde_json::json!({"n": n}))
                .into_datum()
                .unwrap(),
            headers: pgrx::JsonB(serde_json::json!({})).into_datum().unwrap(),
            delay: None,
        };
        assert!(crate::direct::insert_published(&row(1)), "stock: direct");
        Spi::run("CREATE INDEX published_by_destination ON outbox.published (destination)")
            .unwrap();
        assert!(
            !crate::direct::insert_published(&row(2)),
            "another index: the statement"
        );
        Spi::run("DROP INDEX outbox.published_by_destination").unwrap();
        assert!(crate::direct::insert_published(&row(3)), "stock again");
        let n: i64 =
            one("SELECT count(*) FROM outbox.published WHERE destination = '/topic/direct'");
        assert_eq!(n, 2);
    }

    /// Rows of `table` as `rowjson` writes them and as `to_jsonb(row)::text`
    /// gives them, in `k` order.
    fn both_ways(table: &str, attnums: Option<&[i16]>) -> Vec<(String, String)> {
        let mut direct = Vec::new();
        unsafe {
            assert_eq!(pg_sys::SPI_connect(), pg_sys::SPI_OK_CONNECT as i32);
            let q = std::ffi::CString::new(format!("SELECT * FROM {table} ORDER BY k")).unwrap();
            assert_eq!(
                pg_sys::SPI_execute(q.as_ptr(), false, 0),
                pg_sys::SPI_OK_SELECT as i32
            );
            let t = pg_sys::SPI_tuptable;
            let plan = crate::rowjson::Plan::new((*t).tupdesc, attnums);
            assert!(plan.direct(), "every column of {table} is written directly");
            assert!(plan.fits((*t).tupdesc));
            for i in 0..pg_sys::SPI_processed as usize {
                let tuple = *(*t).vals.add(i);
                let text = plan.write((*t).tupdesc, tuple, usize::MAX).unwrap();
                // Over the limit, no text (to_jsonb writes that row).
                if text.len() > 2 {
                    assert_eq!(plan.write((*t).tupdesc, tuple, text.len() - 1), None);
                }
                assert_eq!(
                    plan.write((*t).tupdesc, tuple, text.len()).as_ref(),
                    Some(&text)
                );
                direct.push(text);
            }
            pg_sys::SPI_finish();
        }
        // The projection tested is (i4, k).
        let row = match attnums {
            None => table.to_string(),
            Some(_) => format!("(SELECT r FROM (SELECT {table}.k, {table}.i4) r)"),
        };
        let jsonb: Vec<String> = Spi::connect(|c| {
            c.select(
                &format!("SELECT to_jsonb({row})::text FROM {table} ORDER BY k"),
                None,
                &[],
            )
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
        });
        assert_eq!(direct.len(), jsonb.len());
        direct.into_iter().zip(jsonb).collect()
    }

    /// The trigger's body for the WAL, written from the row, is the jsonb
    /// text byte for byte: every kind of column, awkward names, NULLs,
    /// extremes, NaN and infinities, floats jsonb rewrites, escapes, and
    /// two time zones and float settings.
    #[pg_test]
    fn rows_written_directly_are_what_to_jsonb_prints() {
        Spi::run(
            r#"CREATE TABLE rj (k int, "b" bool, i2 int2, i4 int4, "a much longer name" int8,
                 n numeric, n2 numeric(10,3), f4 float4, f8 float8, t text, "v w" varchar(20),
                 c char(5), u uuid, d date, ts timestamp, tz timestamptz, "é""\" text, " " text)"#,
        )
        .unwrap();
        Spi::run(
            r#"INSERT INTO rj
               SELECT g, g % 3 = 0, (g * 7919 % 65535 - 32767)::int2, g * 104729 % 2147483647 - 1073741823,
                      (g::int8 * 2147483647 * 131) % 9223372036854775807, (g * 1.37) ^ (g % 7) / 3,
                      (g % 1000) * 1.5, (g * 1.1)::float4 ^ (g % 9), (g * 1.1)::float8 ^ (g % 40 - 20),
                      repeat(chr(1 + g % 200), g % 4) || '"\/' || chr(8) || chr(12) || E'\n\r\t' || chr(31) || chr(127) || 'é😀',
                      'v' || g, 'c' || (g % 10), md5(g::text)::uuid,
                      '2000-01-01'::date + g * 37, '1999-12-31 23:59:59.5'::timestamp + g * interval '1 day 1 hour 1.000001 s',
                      '2026-03-29 00:30:00+00'::timestamptz + g * interval '17 minutes', 'x' || g, ''
               FROM generate_series(1, 300) g;
               INSERT INTO rj VALUES
                 (1001, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
                 (1002, true, -32768, -2147483648, -9223372036854775808, 'NaN', 0, 'NaN', 'NaN', '', '', '', '00000000-0000-0000-0000-000000000000',
                  'infinity', 'infinity', 'infinity', '', ''),
                 (1003, false, 32767, 2147483647, 9223372036854775807, 'Infinity', -0.001, 'Infinity', '-Infinity', ' ', ' ', ' ', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
                  '-infinity', '-infinity', '-infinity', '', ''),
                 (1004, true, 0, 0, 0, '-Infinity', 1234567.125, '-0', '-0', 'x', 'x', 'x', NULL, '4713-01-01 BC', '0001-01-01 BC', '294276-12-31 23:59:59.999999', 'y', 'z'),
                 (1005, true, 1, 1, 1, '0.000000000000000000001', 0.0, '1e-30', '1e+300', repeat('long ', 2000), NULL, NULL, NULL, '2024-02-29', '2024-02-29 12:00', '2024-02-29 12:00+05:30', NULL, NULL),
                 (1006, true, 1, 1, 1, '123456789012345678901234567890.123456789', 1, '3.4028235e38', '1.7976931348623157e308', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"#,
        )
        .unwrap();
        for (zone, digits) in [("UTC", 1), ("America/Sao_Paulo", 0), ("Asia/Kolkata", 3)] {
            Spi::run(&format!(
                "SET LOCAL TimeZone = '{zone}'; SET LOCAL extra_float_digits = {digits}"
            ))
            .unwrap();
            for (direct, jsonb) in both_ways("rj", None) {
                assert_eq!(
                    direct, jsonb,
                    "time zone {zone}, extra_float_digits {digits}"
                );
            }
        }
        // A text last in key order: a row that fits its limit exactly is
        // still written (the limit's arithmetic is exact).
        Spi::run(
            r#"CREATE TABLE rj3 (k int, "the longest column name" text);
               INSERT INTO rj3 VALUES (1, 'abcd'), (2, ''), (3, NULL), (4, repeat('z', 3000)),
                 (5, repeat(E'\n', 40)), (6, repeat('é', 900))"#,
        )
        .unwrap();
        for (direct, jsonb) in both_ways("rj3", None) {
            assert_eq!(direct, jsonb);
        }
        // A projection: the columns given, in jsonb's key order still.
        for (direct, jsonb) in both_ways("rj", Some(&[4, 1])) {
            assert_eq!(direct, jsonb);
        }
        // A column of another kind: not direct (to_jsonb writes those).
        Spi::run("CREATE TABLE rj2 (k int, j jsonb)").unwrap();
        unsafe {
            pg_sys::SPI_connect();
            let q = c"SELECT * FROM rj2";
            pg_sys::SPI_execute(q.as_ptr(), false, 0);
            let plan = crate::rowjson::Plan::new((*pg_sys::SPI_tuptable).tupdesc, None);
            assert!(!plan.direct());
            pg_sys::SPI_finish();
        }
    }
}
