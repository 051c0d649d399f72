//! The publishing API over a real connection: what is written, what is
//! refused (SQLSTATE, nothing written), and who may call it.

use std::time::Duration;

use outbox_pg_e2e::cluster::sqlstate;
use outbox_pg_e2e::{Cluster, unique};
use postgres::Client;

use crate::shared;

fn count(c: &mut Client, destination_like: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM outbox.published WHERE destination LIKE $1",
        &[&destination_like],
    )
    .unwrap()
    .get(0)
}

#[test]
fn publish_commits_a_row_and_rollback_writes_none() {
    let mut c = shared().client();
    let d = format!("/queue/{}", unique("commit"));
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT outbox.publish($1, '{\"a\": 1}')", &[&d])
        .unwrap();
    tx.rollback().unwrap();
    assert_eq!(count(&mut c, &d), 0);

    let id: String = c
        .query_one(
            "SELECT outbox.publish($1, '{\"a\": 1}', '{\"team\":\"x\"}')::text",
            &[&d],
        )
        .unwrap()
        .get(0);
    let row = c
        .query_one(
            "SELECT message_id::text, status::text, retry, headers->>'team', body::text, published_at IS NULL, last_error IS NULL
             FROM outbox.published WHERE destination = $1",
            &[&d],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), id);
    assert_eq!(row.get::<_, String>(1), "scheduled");
    assert_eq!(row.get::<_, i32>(2), 0);
    assert_eq!(row.get::<_, String>(3), "x");
    assert_eq!(row.get::<_, String>(4), r#"{"a": 1}"#);
    assert!(row.get::<_, bool>(5) && row.get::<_, bool>(6));
}

/// Every bad input of SPEC §2.1 and §2.2: the SQLSTATE, a message without
/// panic text, and no row written.
#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let mut c = shared().client();
    let tag = unique("bad");
    let dest = format!("/queue/{tag}");
    let big = format!("SELECT outbox.publish('{dest}', to_jsonb(repeat('x', 1100000)))");
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "SELECT outbox.publish(NULL, '{}')".to_string(),
            "22004",
            "destination must not be null",
        ),
        (
            "SELECT outbox.publish('', '{}')".to_string(),
            "22023",
            "destination must not be empty",
        ),
        (
            format!("SELECT outbox.publish('queue-{tag}', '{{}}')"),
            "22023",
            "invalid destination",
        ),
        (
            "SELECT outbox.publish('/', '{}')".to_string(),
            "22023",
            "invalid destination",
        ),
        (
            format!("SELECT outbox.publish('{dest}', NULL)"),
            "22004",
            "body must not be null",
        ),
        (
            format!("SELECT outbox.publish('{dest}', '{{}}', '[1]')"),
            "22023",
            "headers must be a JSON object",
        ),
        (
            format!("SELECT outbox.publish('{dest}', '{{}}', '{{\"a\": 1}}')"),
            "22023",
            "must be a JSON string",
        ),
        (
            format!("SELECT outbox.publish('{dest}', '{{}}', '{{\"\": \"x\"}}')"),
            "22023",
            "invalid header name",
        ),
        (
            format!("SELECT outbox.publish('{dest}', '{{}}', '{{\"a:b\": \"x\"}}')"),
            "22023",
            "invalid header name",
        ),
        (
            format!("SELECT outbox.publish('{dest}', '{{}}', '{{\"destination\": \"/x\"}}')"),
            "22023",
            "reserved by STOMP",
        ),
        (
            format!("SELECT outbox.publish('{dest}', '{{}}', '{{\"content-length\": \"1\"}}')"),
            "22023",
            "reserved",
        ),
        (
            format!("SELECT outbox.publish('{dest}', '{{}}', version => '')"),
            "22023",
            "invalid version",
        ),
        (
            format!("SELECT outbox.publish('{dest}', '{{}}', delay => '-1 hour')"),
            "22023",
            "delay must not be negative",
        ),
        (
            format!("SELECT outbox.publish('{dest}', '{{}}', '{{bad')"),
            "22P02",
            "invalid input syntax for type json",
        ),
        (big, "54000", "more than outbox.max_message_bytes"),
    ];
    for (sql, state, message) in &cases {
        let e = c.batch_execute(sql).expect_err(sql);
        assert_eq!(sqlstate(&e), *state, "{sql}: {e:?}");
        let db = e.as_db_error().unwrap();
        assert!(db.message().contains(message), "{sql}: {}", db.message());
        assert!(
            !db.message().contains("panicked") && !db.message().contains("internal error"),
            "{sql}: {}",
            db.message()
        );
    }
    assert_eq!(count(&mut c, &format!("%{tag}%")), 0);
}

#[test]
fn trigger_bodies_options_and_headers() {
    let mut c = shared().client();
    let t = unique("orders");
    let d = format!("/topic/{t}");
    c.batch_execute(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, status text, total numeric, secret text);
         CREATE FUNCTION {t}_json(r {t}) RETURNS jsonb LANGUAGE sql AS $$ SELECT jsonb_build_object('order', r.id, 'st', r.status) $$;
         CREATE TRIGGER all_cols AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION outbox.publish('{d}');
         CREATE TRIGGER some_cols AFTER INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION outbox.publish('{d}', 'fields=status', 'version=v1', 'headers={{\"team\":\"billing\"}}');
         CREATE TRIGGER ser AFTER INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION outbox.publish('{d}', 'serializer={t}_json', 'fields=total');
         INSERT INTO {t} VALUES (1, 'new', 9.5, 's');
         UPDATE {t} SET status = 'paid' WHERE id = 1;
         DELETE FROM {t};"
    ))
    .unwrap();
    let rows = c
        .query(
            "SELECT destination, version, body::text, headers->>'outbox-op', headers->>'outbox-table', headers->>'team',
                    headers->>'content-type', headers->>'dop-msg-type', headers->>'dop-msg-id' = message_id::text
             FROM outbox.published WHERE destination LIKE $1 ORDER BY id",
            &[&format!("{d}%")],
        )
        .unwrap();
    let got: Vec<(String, Option<String>, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let all = |body: &str, op: &str| (d.clone(), None, body.to_string(), op.to_string());
    assert_eq!(
        got,
        vec![
            // Triggers fire in name order: all_cols, ser, some_cols.
            all(
                r#"{"id": 1, "total": 9.5, "secret": "s", "status": "new"}"#,
                "INSERT"
            ),
            (
                d.clone(),
                None,
                r#"{"st": "new", "order": 1}"#.into(),
                "INSERT".into()
            ),
            (
                format!("{d}.v1"),
                Some("v1".into()),
                r#"{"id": 1, "status": "new"}"#.into(),
                "INSERT".into()
            ),
            all(
                r#"{"id": 1, "total": 9.5, "secret": "s", "status": "paid"}"#,
                "UPDATE"
            ),
            all(
                r#"{"id": 1, "total": 9.5, "secret": "s", "status": "paid"}"#,
                "DELETE"
            ),
        ]
    );
    for r in &rows {
        assert_eq!(r.get::<_, String>(4), format!("public.{t}"));
        assert_eq!(r.get::<_, String>(6), "application/json;charset=utf-8");
        assert_eq!(r.get::<_, String>(7), "Published");
        assert!(r.get::<_, bool>(8));
    }
    assert_eq!(
        rows[2].get::<_, Option<String>>(5).as_deref(),
        Some("billing")
    );
}

/// Every wrong trigger definition fails at the first row it fires for,
/// names the trigger, and the statement writes nothing at all.
#[test]
fn bad_triggers_are_clear_errors_naming_the_trigger() {
    let mut c = shared().client();
    let cases: &[(&str, &str, &str, &str)] = &[
        ("AFTER INSERT", "FOR EACH ROW", "", "no destination given"),
        (
            "AFTER INSERT",
            "FOR EACH ROW",
            "'no-slash'",
            "invalid destination",
        ),
        (
            "AFTER INSERT",
            "FOR EACH ROW",
            "'/queue/x', 'colour=red'",
            "unknown option \"colour\"",
        ),
        (
            "AFTER INSERT",
            "FOR EACH ROW",
            "'/queue/x', 'fields'",
            "not of the form key=value",
        ),
        (
            "AFTER INSERT",
            "FOR EACH ROW",
            "'/queue/x', 'fields=nope'",
            "unknown field \"nope\"",
        ),
        (
            "AFTER INSERT",
            "FOR EACH ROW",
            "'/queue/x', 'serializer=no_such_fn'",
            "does not exist",
        ),
        (
            "AFTER INSERT",
            "FOR EACH ROW",
            "'/queue/x', 'headers={\"ack\":\"x\"}'",
            "reserved by STOMP",
        ),
        (
            "AFTER INSERT",
            "FOR EACH ROW",
            "'/queue/x', 'headers={\"a\":1}'",
            "must be a JSON string",
        ),
        (
            "AFTER INSERT",
            "FOR EACH STATEMENT",
            "'/queue/x'",
            "must be fired FOR EACH ROW",
        ),
        (
            "BEFORE INSERT",
            "FOR EACH ROW",
            "'/queue/x'",
            "must be fired AFTER",
        ),
        (
            "AFTER INSERT",
            "FOR EACH ROW",
            "'/queue/x', 'version=v1', 'version=v2'",
            "given twice",
        ),
    ];
    for (when, level, args, message) in cases {
        let t = unique("badtrg");
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id int, v text);
             CREATE TRIGGER tg_{t} {when} ON {t} {level} EXECUTE FUNCTION outbox.publish({args});"
        ))
        .unwrap();
        let e = c
            .batch_execute(&format!("INSERT INTO {t} VALUES (1, 'a')"))
            .expect_err(args);
        let db = e.as_db_error().unwrap();
        assert_eq!(&db.code().code()[..2], "22", "{args}: {db:?}");
        assert!(db.message().contains(message), "{args}: {}", db.message());
        assert!(
            db.message()
                .contains(&format!("trigger \"tg_{t}\" on table \"public.{t}\"")),
            "{}",
            db.message()
        );
        assert!(db.hint().is_some(), "{args}: no hint");
        let rows: i64 = c
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .unwrap()
            .get(0);
        assert_eq!(rows, 0, "the user's row was rolled back too");
        let written: i64 = c
            .query_one(
                "SELECT count(*) FROM outbox.published WHERE headers->>'outbox-table' = $1",
                &[&format!("public.{t}")],
            )
            .unwrap()
            .get(0);
        assert_eq!(written, 0);
    }
}

#[test]
fn bad_header_json_in_a_trigger_is_22p02() {
    let mut c = shared().client();
    let t = unique("badjson");
    c.batch_execute(&format!(
        "CREATE TABLE {t} (id int);
         CREATE TRIGGER tg AFTER INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION outbox.publish('/queue/x', 'headers={{oops');"
    ))
    .unwrap();
    let e = c
        .batch_execute(&format!("INSERT INTO {t} VALUES (1)"))
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22P02");
}

#[test]
fn serializer_runs_as_the_caller_and_needs_execute() {
    let mut c = shared().client();
    let t = unique("ser");
    let role = unique("writer");
    c.batch_execute(&format!(
        "CREATE TABLE {t} (id int);
         CREATE FUNCTION {t}_who(r {t}) RETURNS jsonb LANGUAGE sql AS $$ SELECT jsonb_build_object('user', current_user) $$;
         CREATE TRIGGER tg AFTER INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION outbox.publish('/queue/{t}', 'serializer={t}_who');
         CREATE ROLE {role} LOGIN;
         GRANT INSERT ON {t} TO {role};"
    ))
    .unwrap();
    let mut w = shared().connect("postgres", &role);
    w.batch_execute(&format!("INSERT INTO {t} VALUES (1)"))
        .unwrap();
    let body: String = c
        .query_one(
            "SELECT body->>'user' FROM outbox.published WHERE destination = $1",
            &[&format!("/queue/{t}")],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        body, role,
        "the serializer ran as the role that inserted, not as a superuser"
    );
    c.batch_execute(&format!(
        "REVOKE EXECUTE ON FUNCTION {t}_who({t}) FROM PUBLIC"
    ))
    .unwrap();
    let mut w = shared().connect("postgres", &role);
    let e = w
        .batch_execute(&format!("INSERT INTO {t} VALUES (2)"))
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
}

#[test]
fn only_publishers_may_publish_and_nobody_else_reads_the_table() {
    let mut c = shared().client();
    let (nobody, publisher) = (unique("nobody"), unique("pub"));
    c.batch_execute(&format!(
        "CREATE ROLE {nobody} LOGIN; CREATE ROLE {publisher} LOGIN IN ROLE outbox_publisher;"
    ))
    .unwrap();
    let d = format!("/queue/{}", unique("priv"));
    let mut n = shared().connect("postgres", &nobody);
    let e = n
        .batch_execute(&format!("SELECT outbox.publish('{d}', '1')"))
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    let e = n
        .batch_execute("SELECT * FROM outbox.published")
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    let mut p = shared().connect("postgres", &publisher);
    p.batch_execute(&format!("SELECT outbox.publish('{d}', '1')"))
        .unwrap();
    // Publishing does not grant writing the table directly.
    let e = p
        .batch_execute(&format!(
            "INSERT INTO outbox.published (message_id, destination, body) VALUES (gen_random_uuid(), '{d}', '1')"
        ))
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    assert_eq!(count(&mut c, &d), 1);
}

#[test]
fn without_preloading_rows_are_written_and_a_warning_says_so() {
    let cluster = Cluster::init(&[]);
    cluster.execute("postgres", "CREATE EXTENSION outbox_pg");
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = notices.clone();
    let mut c = postgres::Config::from_str_url(&cluster.url("postgres", "postgres"))
        .notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()))
        .connect(postgres::NoTls)
        .unwrap();
    c.batch_execute(
        "SELECT outbox.publish('/queue/x', '1'); SELECT outbox.publish('/queue/x', '2');",
    )
    .unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM outbox.published", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let notices = notices.lock().unwrap();
    assert!(
        notices
            .iter()
            .any(|m| m.contains("not in shared_preload_libraries")),
        "{notices:?}"
    );
}

trait FromStrUrl {
    fn from_str_url(s: &str) -> postgres::Config;
}
impl FromStrUrl for postgres::Config {
    fn from_str_url(s: &str) -> postgres::Config {
        s.parse().expect("valid connection string")
    }
}

/// An ALTER that commits while a publisher waits for the table's lock: the
/// row is written as the table is now (here through the statement, with
/// the new column's default), not as it was when the publisher last
/// looked (the backend would write a NULL pointer into the new column).
#[test]
fn the_outbox_row_follows_an_alter_committed_while_it_waited() {
    let cl = Cluster::start(&["outbox.stomp_hosts = '127.0.0.1:9'"]);
    let mut c = cl.client();
    // The direct path's layout is known to this session before the ALTER.
    c.batch_execute("SELECT outbox.publish('/queue/alter', '{\"n\": 1}')")
        .unwrap();
    let mut alter = cl.client();
    alter
        .batch_execute(
            "BEGIN; ALTER TABLE outbox.published ADD COLUMN tenant text NOT NULL DEFAULT 'acme'",
        )
        .unwrap();
    let publisher = std::thread::spawn(move || {
        c.batch_execute("SELECT outbox.publish('/queue/alter', '{\"n\": 2}')")
            .unwrap();
        c
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!publisher.is_finished(), "the publish waits for the ALTER");
    alter.batch_execute("COMMIT").unwrap();
    let mut c = publisher.join().expect("the publish returns");
    let rows: Vec<(i32, String)> = c
        .query(
            "SELECT (body->>'n')::int, tenant FROM outbox.published ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, [(1, "acme".to_string()), (2, "acme".to_string())]);
}

/// Rows go into outbox.published directly while the table is as the
/// extension made it, and through an INSERT statement once it is not: a
/// trigger on the table fires, a column added with a default gets it (in
/// this session and in one that was open before); back again when they are
/// gone. Delays, versions and savepoints work either way.
#[test]
fn the_outbox_row_honours_what_is_added_to_the_table() {
    // Nothing listens on port 9: rows stay scheduled while we look.
    let cl = Cluster::start(&["outbox.stomp_hosts = '127.0.0.1:9'"]);
    let mut c = cl.client();
    let mut other = cl.client();
    c.batch_execute(
        "CREATE TABLE seen (message_id uuid);
         CREATE FUNCTION note_row() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO public.seen VALUES (NEW.message_id); RETURN NEW; END $$;",
    )
    .unwrap();
    fn publish(c: &mut impl postgres::GenericClient, n: i32) -> String {
        c.query_one(
            "SELECT outbox.publish('/queue/shape', jsonb_build_object('n', $1::int), '{}', 'v2', '1 hour')::text",
            &[&n],
        )
        .unwrap()
        .get(0)
    }
    let check = |c: &mut Client, id: &str| {
        let ok: bool = c
            .query_one(
                "SELECT id > 0 AND status = 'scheduled' AND retry = 0 AND destination = '/queue/shape.v2'
                        AND version = 'v2' AND added > now() - interval '1 minute'
                        AND next_attempt_at - added = '1 hour' AND published_at IS NULL AND last_error IS NULL
                        AND headers->>'dop-msg-id' = message_id::text AND body ? 'n'
                 FROM outbox.published WHERE message_id = $1::text::uuid",
                &[&id],
            )
            .unwrap()
            .get(0);
        assert!(ok, "row {id}");
    };
    let seen = |c: &mut Client, id: &str| -> bool {
        c.query_one(
            "SELECT EXISTS (SELECT 1 FROM seen WHERE message_id = $1::text::uuid)",
            &[&id],
        )
        .unwrap()
        .get(0)
    };
    let direct = publish(&mut c, 1);
    check(&mut c, &direct);
    publish(&mut other, 2);

    c.batch_execute(
        "CREATE TRIGGER note AFTER INSERT ON outbox.published FOR EACH ROW EXECUTE FUNCTION note_row();
         ALTER TABLE outbox.published ADD COLUMN tenant text DEFAULT 'acme';",
    )
    .unwrap();
    for (client, n) in [(&mut c, 3), (&mut other, 4)] {
        let id = publish(client, n);
        check(client, &id);
        assert!(seen(client, &id), "the table's trigger fired for {n}");
        let tenant: String = client
            .query_one(
                "SELECT tenant FROM outbox.published WHERE message_id = $1::text::uuid",
                &[&id],
            )
            .unwrap()
            .get(0);
        assert_eq!(tenant, "acme");
    }

    c.batch_execute(
        "DROP TRIGGER note ON outbox.published; ALTER TABLE outbox.published DROP COLUMN tenant;",
    )
    .unwrap();
    for (client, n) in [(&mut c, 5), (&mut other, 6)] {
        let id = publish(client, n);
        check(client, &id);
        assert!(!seen(client, &id));
    }

    // A savepoint rolled back takes its row with it.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SAVEPOINT s").unwrap();
    publish(&mut tx, 7);
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    publish(&mut tx, 8);
    tx.commit().unwrap();
    let ns: Vec<i32> = c
        .query(
            "SELECT (body->>'n')::int FROM outbox.published ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ns, [1, 2, 3, 4, 5, 6, 8]);
}

/// Change data capture reads the outbox table too (Debezium's outbox
/// pattern does): rows written by the trigger and by publish() appear in
/// logical decoding, in commit order, and a rolled-back one does not.
#[test]
fn outbox_rows_reach_logical_decoding() {
    let cl = Cluster::start(&[
        "outbox.stomp_hosts = '127.0.0.1:9'",
        "wal_level = logical",
        "max_replication_slots = 4",
    ]);
    let mut c = cl.client();
    for sql in [
        "SELECT pg_create_logical_replication_slot('outbox_cdc', 'test_decoding')",
        "CREATE TABLE orders (id int PRIMARY KEY, status text)",
        "CREATE TRIGGER orders_outbox AFTER INSERT ON orders FOR EACH ROW
           EXECUTE FUNCTION outbox.publish('/topic/orders')",
        "INSERT INTO orders VALUES (1, 'new')",
        "SELECT outbox.publish('/queue/cdc', '{\"n\": 2}')",
    ] {
        c.batch_execute(sql).unwrap();
    }
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SELECT outbox.publish('/queue/cdc', '{\"n\": 3}')")
        .unwrap();
    tx.rollback().unwrap();
    let changes: Vec<String> = c
        .query(
            "SELECT data FROM pg_logical_slot_get_changes('outbox_cdc', NULL, NULL)
             WHERE data LIKE 'table outbox.published: INSERT:%'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(
        changes[0].contains("destination[text]:'/topic/orders'")
            && changes[0].contains(r#""status": "new""#),
        "{}",
        changes[0]
    );
    assert!(
        changes[1].contains("destination[text]:'/queue/cdc'")
            && changes[1].contains("status[outbox.message_status]:'scheduled'"),
        "{}",
        changes[1]
    );
}
