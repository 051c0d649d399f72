//! Operating it: outbox.stats()/outbox.status, retry_failed, retention,
//! and least privilege, checked as real non-superuser roles.

use std::time::Duration;

use outbox_pg_e2e::broker::{self, Subscriber};
use outbox_pg_e2e::cluster::sqlstate;
use outbox_pg_e2e::{Cluster, unique, wait_for};
use postgres::Client;

const FAST: &[&str] = &[
    "outbox.poll_interval = '200ms'",
    "outbox.pause_for_retry = '100ms'",
    "outbox.wait_retry = '100ms'",
    "outbox.maximum_retry_attempts = 2",
    "outbox.maximum_backoff = '300ms'",
];

fn worker_row(c: &mut Client, worker: &str) -> Option<postgres::Row> {
    c.query_opt(
        "SELECT state, host, messages, last_error, pid, scheduled, failed, oldest_scheduled_age IS NULL AS no_backlog
         FROM outbox.status WHERE worker = $1",
        &[&worker],
    )
    .unwrap()
}

#[test]
fn stats_show_workers_and_backlog_and_retry_failed_reschedules() {
    let _b = broker::shared_broker();
    let cl = Cluster::start(FAST);
    let mut c = cl.client();
    let d = format!("/topic/{}", unique("stats"));
    let mut sub = Subscriber::new(&d);
    c.execute(
        "SELECT outbox.publish($1, to_jsonb(i)) FROM generate_series(1, 25) i",
        &[&d],
    )
    .unwrap();
    sub.take(25, Duration::from_secs(10));
    // The counts come from a snapshot, the worker's figures from shared
    // memory a moment later: wait until both show the delivery.
    let row = wait_for("the publisher's count", Duration::from_secs(5), || {
        worker_row(&mut c, "publisher")
            .filter(|r| r.get::<_, i64>(2) >= 25 && r.get::<_, i64>(5) == 0)
    });
    assert_eq!(row.get::<_, String>(0), "connected");
    assert_eq!(row.get::<_, String>(1), broker::STOMP);
    assert!(row.get::<_, Option<i32>>(4).is_some());
    assert_eq!(row.get::<_, i64>(5), 0);
    assert!(row.get::<_, bool>(7), "no scheduled rows: no age");

    // A poison message fails; stats count it; retry_failed reschedules it.
    let poison = format!("/nonsense/{}", unique("p"));
    c.execute("SELECT outbox.publish($1, '1')", &[&poison])
        .unwrap();
    let row = wait_for("a failed row", Duration::from_secs(15), || {
        worker_row(&mut c, "publisher")
            .filter(|r| r.get::<_, i64>(6) == 1 && r.get::<_, Option<String>>(3).is_some())
    });
    assert!(
        row.get::<_, Option<String>>(3)
            .unwrap()
            .contains("Unknown destination")
    );
    let n: i64 = c
        .query_one("SELECT outbox.retry_failed()", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // It is scheduled again with a fresh retry count, and fails again.
    wait_for(
        "the retried row to fail again",
        Duration::from_secs(15),
        || {
            let r = c
                .query_one(
                    "SELECT status::text, retry FROM outbox.published WHERE destination = $1",
                    &[&poison],
                )
                .unwrap();
            (r.get::<_, String>(0) == "failed" && r.get::<_, i32>(1) == 2).then_some(())
        },
    );
    let id: i64 = c
        .query_one(
            "SELECT id FROM outbox.published WHERE destination = $1",
            &[&poison],
        )
        .unwrap()
        .get(0);
    let n: i64 = c
        .query_one("SELECT outbox.retry_failed(ARRAY[$1::bigint, -1])", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let n: i64 = c
        .query_one("SELECT outbox.retry_failed(ARRAY[-1]::bigint[])", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // A consumer shows up too.
    cl.execute(
        "postgres",
        "CREATE FUNCTION noop(m outbox.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;
         SELECT outbox.subscribe('watcher', '/topic/stats-watch', 'noop(outbox.message)');",
    );
    let row = wait_for("the consumer's status", Duration::from_secs(10), || {
        c.query_opt(
            "SELECT state, host FROM outbox.status WHERE worker = 'consumer' AND name = 'watcher'",
            &[],
        )
        .unwrap()
        .filter(|r| r.get::<_, String>(0) == "connected")
    });
    assert_eq!(row.get::<_, String>(1), broker::STOMP);
}

#[test]
fn a_worker_that_cannot_reach_the_broker_shows_backing_off_with_its_error() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cl =
        Cluster::start(&[FAST, &[&format!("outbox.stomp_hosts = '127.0.0.1:{dead}'")]].concat());
    let mut c = cl.client();
    c.execute("SELECT outbox.publish('/topic/x', '1')", &[])
        .unwrap();
    let row = wait_for("backing off", Duration::from_secs(10), || {
        worker_row(&mut c, "publisher").filter(|r| r.get::<_, String>(0) == "backing off")
    });
    assert!(
        row.get::<_, Option<String>>(3)
            .unwrap()
            .contains(&format!("127.0.0.1:{dead}"))
    );
    assert_eq!(row.get::<_, i64>(5), 1, "the row stays scheduled");
    assert!(!row.get::<_, bool>(7), "and its age is shown");
}

#[test]
fn retention_deletes_old_finished_rows_only() {
    let _b = broker::shared_broker();
    let cl = Cluster::start(FAST);
    let mut c = cl.client();
    let d = format!("/topic/{}", unique("keep"));
    c.batch_execute(&format!(
        "SELECT outbox.publish('{d}', to_jsonb(i)) FROM generate_series(1, 6) i;"
    ))
    .unwrap();
    wait_for("published", Duration::from_secs(10), || {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM outbox.published WHERE status = 'published'",
                &[],
            )
            .unwrap()
            .get(0);
        (n == 6).then_some(())
    });
    c.batch_execute(
        "SELECT outbox.publish('/topic/later', '1', delay => '1 day');
         UPDATE outbox.published SET added = now() - interval '40 days' WHERE id <= 4 OR destination = '/topic/later';
         UPDATE outbox.published SET status = 'failed' WHERE id = 4;
         INSERT INTO outbox.received (message_id, subscription, status, added) VALUES
            ('old', 's', 'consumed', now() - interval '40 days'), ('new', 's', 'consumed', now());",
    )
    .unwrap();
    let deleted: i64 = c.query_one("SELECT outbox.cleanup()", &[]).unwrap().get(0);
    assert_eq!(deleted, 5, "4 old finished outbox rows and 1 old inbox row");
    let left: Vec<String> = c
        .query("SELECT status::text FROM outbox.published ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        left,
        ["published", "published", "scheduled"],
        "the old scheduled row is never deleted"
    );
    let inbox: Vec<String> = c
        .query("SELECT message_id FROM outbox.received", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(inbox, ["new"]);
}

#[test]
fn the_worker_runs_retention_on_its_own() {
    let cl = Cluster::start(
        &[
            FAST,
            &[
                "outbox.cleanup_interval = '1s'",
                "outbox.stomp_hosts = '127.0.0.1:1'",
            ],
        ]
        .concat(),
    );
    let mut c = cl.client();
    c.batch_execute(
        "INSERT INTO outbox.received (message_id, subscription, status, added) VALUES
            ('old', 's', 'consumed', now() - interval '40 days'), ('new', 's', 'consumed', now());
         SELECT outbox.publish('/topic/wake', '1');",
    )
    .unwrap();
    wait_for("the worker's retention", Duration::from_secs(10), || {
        let n: i64 = c
            .query_one("SELECT count(*) FROM outbox.received", &[])
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    });
}

#[test]
fn least_privilege_for_public_publishers_and_admins() {
    let cl = Cluster::start(FAST);
    let (nobody, publisher, admin) = (unique("nobody"), unique("publisher"), unique("admin"));
    cl.execute(
        "postgres",
        &format!(
            "CREATE ROLE {nobody} LOGIN; CREATE ROLE {publisher} LOGIN IN ROLE outbox_publisher;
             CREATE ROLE {admin} LOGIN IN ROLE outbox_admin;
             CREATE FUNCTION public.cb(m outbox.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;"
        ),
    );
    let calls = [
        "SELECT outbox.publish('/topic/x', '1')",
        "SELECT outbox.subscribe('s', '/topic/x', 'public.cb(outbox.message)')",
        "SELECT outbox.retry_failed()",
        "SELECT outbox.cleanup()",
        "SELECT * FROM outbox.status",
        "SELECT * FROM outbox.received",
        "SELECT * FROM outbox.published",
        "SELECT * FROM outbox.subscriptions",
    ];
    let allowed = |role: &str, sql: &str| -> bool {
        let mut c = cl.connect("postgres", role);
        match c.batch_execute(sql) {
            Ok(()) => true,
            Err(e) => {
                assert_eq!(sqlstate(&e), "42501", "{role}: {sql}: {e:?}");
                false
            }
        }
    };
    for sql in calls {
        assert!(!allowed(&nobody, sql), "PUBLIC: {sql}");
    }
    assert!(allowed(&publisher, calls[0]));
    for sql in &calls[1..] {
        assert!(!allowed(&publisher, sql), "publisher: {sql}");
    }
    for sql in calls {
        assert!(allowed(&admin, sql), "admin: {sql}");
    }
    // The passcode is for superusers only, and never leaks into logs.
    let mut n = cl.connect("postgres", &nobody);
    let e = n.batch_execute("SHOW outbox.stomp_passcode").unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    let listed: i64 = n
        .query_one(
            "SELECT count(*) FROM pg_settings WHERE name = 'outbox.stomp_passcode'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(listed, 0);
    let shown: String = cl
        .client()
        .query_one("SHOW outbox.stomp_passcode", &[])
        .unwrap()
        .get(0);
    assert_eq!(shown, "guest");
    // Every SECURITY DEFINER function pins its search_path.
    let unpinned: i64 = cl
        .client()
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'outbox' AND p.prosecdef
               AND NOT coalesce(p.proconfig, '{}') && ARRAY['search_path=pg_catalog, pg_temp']",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(unpinned, 0);
}
