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
}
