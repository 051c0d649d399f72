//! Delivery by the publisher worker to the real broker (RabbitMQ's STOMP
//! plugin on 127.0.0.1:61613): what arrives, in what order, how fast, and
//! what happens when the broker, the worker or Postgres fail.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use outbox_pg_e2e::broker::{self, Subscriber};
use outbox_pg_e2e::{Cluster, unique, wait_for};
use postgres::Client;

/// Short retry and backoff timings so failure tests finish quickly.
const FAST: &[&str] = &[
    "outbox.poll_interval = '10s'",
    "outbox.pause_for_retry = '200ms'",
    "outbox.wait_retry = '200ms'",
    "outbox.maximum_retry_attempts = 3",
    "outbox.maximum_backoff = '500ms'",
    "outbox.stomp_connect_timeout = '2s'",
];

fn cluster(extra: &[&str]) -> Cluster {
    Cluster::start(&[FAST, extra].concat())
}

/// One cluster for the tests that leave the worker's settings alone.
fn shared() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    outbox_pg_e2e::shared_cluster(&C, || cluster(&[]))
}

fn status_counts(c: &mut Client, destination_like: &str) -> (i64, i64, i64) {
    let r = c
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'scheduled'), count(*) FILTER (WHERE status = 'published'),
                    count(*) FILTER (WHERE status = 'failed')
             FROM outbox.published WHERE destination LIKE $1",
            &[&destination_like],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

fn wait_published(c: &mut Client, destination_like: &str, n: i64, timeout: Duration) {
    wait_for(
        &format!("{n} rows published to {destination_like}"),
        timeout,
        || (status_counts(c, destination_like).1 >= n).then_some(()),
    );
}

#[test]
fn a_committed_message_arrives_with_its_body_and_every_header() {
    let _b = broker::shared_broker();
    let d = format!("/topic/{}", unique("hdr"));
    let mut sub = Subscriber::new(&d);
    let mut c = shared().client();
    let id: String = c
        .query_one(
            "SELECT outbox.publish($1, '{\"total\": 9.5, \"items\": [\"a\", \"b\"]}',
                    '{\"team\": \"billing\", \"tricky\": \"a\\nb:c\\\\d\", \"dop-correlation-id\": \"corr-7\"}')::text",
            &[&d],
        )
        .unwrap()
        .get(0);
    let m = sub.take(1, Duration::from_secs(10)).remove(0);
    assert_eq!(m.get("destination"), Some(d.as_str()));
    assert_eq!(
        String::from_utf8(m.body.clone()).unwrap(),
        r#"{"items": ["a", "b"], "total": 9.5}"#
    );
    assert_eq!(m.get("dop-msg-id"), Some(id.as_str()));
    assert_eq!(m.get("dop-msg-destination"), Some(d.as_str()));
    assert_eq!(m.get("dop-msg-type"), Some("Published"));
    assert_eq!(m.get("dop-correlation-id"), Some("corr-7"));
    assert!(
        m.get("dop-msg-sent-time")
            .is_some_and(|t| t.ends_with("+00:00"))
    );
    assert_eq!(
        m.get("content-type"),
        Some("application/json;charset=utf-8")
    );
    assert_eq!(m.get("persistent"), Some("true"));
    assert_eq!(m.get("team"), Some("billing"));
    assert_eq!(
        m.get("tricky"),
        Some("a\nb:c\\d"),
        "escaped on the wire, intact on arrival"
    );
    wait_published(&mut c, &d, 1, Duration::from_secs(5));
    let r = c
        .query_one("SELECT published_at IS NOT NULL, retry, last_error FROM outbox.published WHERE destination = $1", &[&d])
        .unwrap();
    assert!(r.get::<_, bool>(0));
    assert_eq!(r.get::<_, i32>(1), 0);
    assert_eq!(r.get::<_, Option<String>>(2), None);
}

#[test]
fn rollback_sends_nothing_and_order_holds_across_transactions() {
    let _b = broker::shared_broker();
    let d = format!("/topic/{}", unique("order"));
    let mut sub = Subscriber::new(&d);
    let mut c = shared().client();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT outbox.publish($1, '\"rolled back\"')", &[&d])
        .unwrap();
    tx.rollback().unwrap();
    for t in 0..40 {
        let mut tx = c.transaction().unwrap();
        for i in 0..5 {
            tx.execute(
                "SELECT outbox.publish($1, to_jsonb($2::int))",
                &[&d, &(t * 5 + i)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let got: Vec<i32> = sub
        .take(200, Duration::from_secs(20))
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).parse().unwrap())
        .collect();
    assert_eq!(got, (0..200).collect::<Vec<_>>());
    assert!(
        sub.next(Duration::from_millis(300)).is_none(),
        "the rolled-back message never arrives"
    );
}

#[test]
fn commit_wakes_the_worker_at_once() {
    let _b = broker::shared_broker();
    // poll_interval is 10 s here: only the commit wake-up can be this fast.
    let d = format!("/topic/{}", unique("wake"));
    let mut sub = Subscriber::new(&d);
    let mut c = shared().client();
    let mut samples = Vec::new();
    for i in 0..20 {
        let start = Instant::now();
        c.execute("SELECT outbox.publish($1, to_jsonb($2::int))", &[&d, &i])
            .unwrap();
        sub.take(1, Duration::from_secs(15));
        samples.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    samples.sort();
    let p50 = samples[samples.len() / 2];
    eprintln!(
        "commit -> subscriber: p50 {p50:?}, max {:?}",
        samples.last().unwrap()
    );
    assert!(p50 < Duration::from_millis(100), "p50 {p50:?}");
}

#[test]
fn a_poison_message_fails_alone_while_the_rest_flows() {
    let _b = broker::shared_broker();
    let d = format!("/topic/{}", unique("poison"));
    let poison = format!("/nonsense/{}", unique("x"));
    let mut sub = Subscriber::new(&d);
    let mut c = shared().client();
    c.batch_execute(&format!(
        "BEGIN;
         SELECT outbox.publish('{d}', '1');
         SELECT outbox.publish('{poison}', '\"bad\"');
         SELECT outbox.publish('{d}', '2');
         COMMIT;"
    ))
    .unwrap();
    let got: Vec<String> = sub
        .take(2, Duration::from_secs(10))
        .iter()
        .map(|m| m.body_text())
        .collect();
    assert_eq!(got, ["1", "2"]);
    for i in 3..6 {
        c.execute("SELECT outbox.publish($1, to_jsonb($2::int))", &[&d, &i])
            .unwrap();
    }
    assert_eq!(
        sub.take(3, Duration::from_secs(10)).len(),
        3,
        "later messages flow while the poison one retries"
    );
    let row = wait_for(
        "the poison message to fail",
        Duration::from_secs(20),
        || {
            let r = c
            .query_one("SELECT status::text, retry, last_error FROM outbox.published WHERE destination = $1", &[&poison])
            .unwrap();
            (r.get::<_, String>(0) == "failed").then_some(r)
        },
    );
    assert_eq!(row.get::<_, i32>(1), 3, "maximum_retry_attempts");
    assert!(
        row.get::<_, Option<String>>(2)
            .unwrap()
            .contains("Unknown destination")
    );
    assert_eq!(status_counts(&mut c, &format!("{d}%")), (0, 5, 0));
}

#[test]
fn a_dead_first_host_fails_over_to_the_next() {
    let _b = broker::shared_broker();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hosts = format!("outbox.stomp_hosts = '127.0.0.1:{dead},{}'", broker::STOMP);
    let cl = cluster(&[&hosts]);
    let d = format!("/topic/{}", unique("failover"));
    let mut sub = Subscriber::new(&d);
    let mut c = cl.client();
    c.execute("SELECT outbox.publish($1, '\"hello\"')", &[&d])
        .unwrap();
    assert_eq!(
        sub.take(1, Duration::from_secs(15))[0].body_text(),
        "\"hello\""
    );
}

#[test]
fn a_refused_login_keeps_rows_scheduled_until_fixed_and_reloaded() {
    let _b = broker::shared_broker();
    let cl = cluster(&["outbox.stomp_passcode = 'wrong-secret'"]);
    let d = format!("/topic/{}", unique("login"));
    let mut sub = Subscriber::new(&d);
    let mut c = cl.client();
    for i in 0..3 {
        c.execute("SELECT outbox.publish($1, to_jsonb($2::int))", &[&d, &i])
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        status_counts(&mut c, &d),
        (3, 0, 0),
        "connection failures never touch rows"
    );
    let retries: i64 = c
        .query_one("SELECT sum(retry) FROM outbox.published", &[])
        .unwrap()
        .get(0);
    assert_eq!(retries, 0);
    assert!(sub.next(Duration::from_millis(200)).is_none());
    let log = cl.log();
    assert!(log.contains("refused"), "the refusal is logged");
    assert!(
        !log.contains("wrong-secret"),
        "the passcode never appears in the log"
    );
    cl.set(&["outbox.stomp_passcode = 'guest'"]);
    assert_eq!(sub.take(3, Duration::from_secs(15)).len(), 3);
    wait_published(&mut c, &d, 3, Duration::from_secs(5));
}

#[test]
fn a_terminated_worker_is_back_within_two_seconds_and_delivers() {
    let _b = broker::shared_broker();
    let cl = cluster(&[]);
    let mut c = cl.client();
    let pid = |c: &mut Client| -> Option<i32> {
        c.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox publisher'",
            &[],
        )
        .unwrap()
        .map(|r| r.get(0))
    };
    let first = wait_for("the publisher", Duration::from_secs(10), || pid(&mut c));
    c.execute("SELECT pg_terminate_backend($1)", &[&first])
        .unwrap();
    let start = Instant::now();
    let d = format!("/topic/{}", unique("restart"));
    let mut sub = Subscriber::new(&d);
    c.execute("SELECT outbox.publish($1, '\"while it was down\"')", &[&d])
        .unwrap();
    let second = wait_for("a new publisher", Duration::from_secs(5), || {
        pid(&mut c).filter(|p| *p != first)
    });
    assert!(
        start.elapsed() < Duration::from_secs(2) + Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert_ne!(first, second);
    assert_eq!(sub.take(1, Duration::from_secs(10)).len(), 1);
}

#[test]
fn an_immediate_postgres_restart_while_draining_loses_nothing() {
    let _b = broker::shared_broker();
    let cl = cluster(&["outbox.batch_size = 100"]);
    let q = unique("crash");
    // A durable queue keeps what arrives while nobody listens; x-expires
    // lets RabbitMQ drop it a minute after the test.
    let d = format!("/queue/{q}");
    let mut c = cl.client();
    c.execute(
        "SELECT outbox.publish($1, to_jsonb(i), '{\"x-expires\": \"60000\"}') FROM generate_series(1, 3000) i",
        &[&d],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    cl.restart("immediate");
    let mut c = cl.client();
    wait_published(&mut c, &d, 3000, Duration::from_secs(60));
    let mut sub = Subscriber::with_headers(&d, &[("x-expires", "60000")]);
    let mut seen = std::collections::HashSet::new();
    while let Some(m) = sub.next(Duration::from_secs(2)) {
        seen.insert(m.body_text());
    }
    assert_eq!(seen.len(), 3000, "every message arrived at least once");
}

#[test]
fn the_broker_stopping_mid_stream_loses_nothing_and_fails_nothing() {
    let _b = broker::exclusive_broker();
    let cl = cluster(&[]);
    let d = format!("/queue/{}", unique("outage"));
    let mut c = cl.client();
    let publish = |c: &mut Client, from: i32, to: i32| {
        c.execute(
            "SELECT outbox.publish($1, to_jsonb(i), '{\"x-expires\": \"120000\"}') FROM generate_series($2::int, $3::int) i",
            &[&d, &from, &to],
        )
        .unwrap();
    };
    publish(&mut c, 1, 500);
    broker::rabbitmqctl(&["stop_app"]);
    publish(&mut c, 501, 1000);
    std::thread::sleep(Duration::from_secs(1));
    broker::rabbitmqctl(&["start_app"]);
    broker::wait_until_up();
    publish(&mut c, 1001, 1500);
    wait_published(&mut c, &d, 1500, Duration::from_secs(60));
    assert_eq!(status_counts(&mut c, &d), (0, 1500, 0));
    let retries: i64 = c
        .query_one("SELECT sum(retry) FROM outbox.published", &[])
        .unwrap()
        .get(0);
    assert_eq!(retries, 0, "a broker outage is not a message failure");
    let mut sub = Subscriber::with_headers(&d, &[("x-expires", "120000")]);
    let mut seen = std::collections::HashSet::new();
    while let Some(m) = sub.next(Duration::from_secs(2)) {
        seen.insert(m.body_text());
    }
    assert_eq!(seen.len(), 1500);
}

#[test]
fn send_delivers_at_once_without_the_outbox() {
    let _b = broker::shared_broker();
    let d = format!("/topic/{}", unique("send"));
    let mut sub = Subscriber::new(&d);
    let mut c = shared().client();
    c.execute(
        "SELECT outbox.send($1, '{\"direct\": true}', '{\"team\": \"ops\"}')",
        &[&d],
    )
    .unwrap();
    let m = sub.take(1, Duration::from_secs(5)).remove(0);
    assert_eq!(m.body_text(), r#"{"direct": true}"#);
    assert_eq!(m.get("team"), Some("ops"));
    assert!(m.get("dop-msg-id").is_some());
    assert_eq!(status_counts(&mut c, &d), (0, 0, 0), "no outbox row");

    let e = c
        .execute(
            "SELECT outbox.send($1, '1')",
            &[&format!("/nonsense/{}", unique("x"))],
        )
        .unwrap_err();
    assert_eq!(outbox_pg_e2e::cluster::sqlstate(&e), "22023", "{e:?}");
}

#[test]
fn send_errors_quickly_when_no_broker_listens() {
    let _b = broker::shared_broker();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cl = cluster(&[&format!("outbox.stomp_hosts = '127.0.0.1:{dead}'")]);
    let mut c = cl.client();
    let start = Instant::now();
    let e = c
        .execute("SELECT outbox.send('/topic/x', '1')", &[])
        .unwrap_err();
    assert_eq!(outbox_pg_e2e::cluster::sqlstate(&e), "08006", "{e:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("could not send to the broker"), "{msg}");
}

#[test]
fn the_worker_carries_on_through_session_limits_a_recreated_extension_and_reloads() {
    let _b = broker::shared_broker();
    let cl = cluster(&[]);
    let d = format!("/topic/{}", unique("degrade"));
    let mut sub = Subscriber::new(&d);
    let mut c = cl.client();
    // Limits meant for applications do not cancel the worker's work.
    c.batch_execute("ALTER DATABASE postgres SET statement_timeout = '1ms'; ALTER DATABASE postgres SET lock_timeout = '1ms';")
        .unwrap();
    // The launcher starts the publisher at the CREATE EXTENSION's commit.
    let pid: i32 = wait_for("the publisher", Duration::from_secs(10), || {
        c.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox publisher'",
            &[],
        )
        .unwrap()
        .map(|r| r.get(0))
    });
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut c = cl.client();
    c.batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")
        .unwrap();
    c.execute(
        "SELECT outbox.publish($1, '\"under limits\"') FROM generate_series(1, 200)",
        &[&d],
    )
    .unwrap();
    assert_eq!(sub.take(200, Duration::from_secs(15)).len(), 200);

    // Dropped and created again: the worker notices and delivers.
    c.batch_execute("DROP EXTENSION outbox_pg CASCADE; CREATE EXTENSION outbox_pg;")
        .unwrap();
    c.execute("SELECT outbox.publish($1, '\"after recreate\"')", &[&d])
        .unwrap();
    assert_eq!(
        sub.take(1, Duration::from_secs(15))[0].body_text(),
        "\"after recreate\""
    );

    // Every reloadable setting changed with ALTER SYSTEM while running.
    // ALTER SYSTEM may not share a transaction (a multi-statement batch).
    for setting in [
        "outbox.batch_size = 7",
        "outbox.poll_interval = '2s'",
        "outbox.maximum_backoff = '400ms'",
        "outbox.maximum_retry_attempts = 4",
        "outbox.pause_for_retry = '50ms'",
        "outbox.wait_retry = '50ms'",
        "outbox.days_to_keep_data = 10",
        "outbox.cleanup_interval = '1h'",
        "outbox.max_message_bytes = '2MB'",
        "outbox.stomp_heartbeats = '2000,2000'",
        "outbox.stomp_connect_timeout = '3s'",
        "outbox.stomp_vhost = '/'",
        "outbox.stomp_username = 'guest'",
        "outbox.stomp_passcode = 'guest'",
        "outbox.stomp_queue_headers = '{\"durable\":\"true\"}'",
    ] {
        c.batch_execute(&format!("ALTER SYSTEM SET {setting}"))
            .unwrap();
    }
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.execute(
        "SELECT outbox.publish($1, to_jsonb(i)) FROM generate_series(1, 30) i",
        &[&d],
    )
    .unwrap();
    assert_eq!(sub.take(30, Duration::from_secs(15)).len(), 30);
    assert!(
        cl.log().contains("broker settings changed, reconnecting"),
        "stomp_* changes reconnect"
    );
}

#[test]
fn an_error_inside_the_workers_transaction_is_logged_and_the_worker_carries_on() {
    let _b = broker::shared_broker();
    let cl = cluster(&[]);
    let d = format!("/topic/{}", unique("diskfull"));
    let mut sub = Subscriber::new(&d);
    let mut c = cl.client();
    // Marking rows published fails as a full disk would (SQLSTATE 53100).
    c.batch_execute(
        "CREATE FUNCTION outbox_disk_full() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = '53100'; END $$;
         CREATE TRIGGER disk_full BEFORE UPDATE ON outbox.published FOR EACH ROW EXECUTE FUNCTION outbox_disk_full();",
    )
    .unwrap();
    c.execute(
        "SELECT outbox.publish($1, to_jsonb(i)) FROM generate_series(1, 5) i",
        &[&d],
    )
    .unwrap();
    wait_for("the error in the log", Duration::from_secs(10), || {
        cl.log().contains("No space left on device").then_some(())
    });
    // Failing again and again, it backs off instead of re-sending the
    // batch every second.
    wait_for("the backoff in the log", Duration::from_secs(10), || {
        cl.log()
            .contains("outbox publisher: its work failed 2 times in a row; waiting")
            .then_some(())
    });
    assert_eq!(
        status_counts(&mut c, &d),
        (5, 0, 0),
        "nothing is marked while it fails"
    );
    // The disk has room again: the restarted worker finishes the job.
    c.batch_execute("DROP TRIGGER disk_full ON outbox.published")
        .unwrap();
    wait_published(&mut c, &d, 5, Duration::from_secs(15));
    let mut seen = std::collections::HashSet::new();
    while let Some(m) = sub.next(Duration::from_millis(500)) {
        seen.insert(m.body_text());
    }
    assert_eq!(seen.len(), 5, "every message arrived (at least once)");
    assert!(c.query_one("SELECT 1", &[]).is_ok(), "the server stayed up");
}

/// After a burst the publisher's looks start past the rows known to be
/// final (the floor), yet a row committed late below rows already sent, a
/// row after the id sequence was restarted, and rows from a sequence that
/// caches ids per session all go out at once, not at the next periodic
/// look.
#[test]
fn late_commits_and_changed_sequences_are_delivered_at_once() {
    let _b = broker::shared_broker();
    let cl = cluster(&[]);
    let mut c = cl.client();
    let d = format!("/topic/{}", unique("floor"));
    c.execute(
        "SELECT outbox.publish($1, to_jsonb(i)) FROM generate_series(1, 2000) i",
        &[&d],
    )
    .unwrap();
    wait_published(&mut c, &d, 2000, Duration::from_secs(60));
    // A few looks, so that the floor has risen past the burst.
    for i in 0..3 {
        c.execute("SELECT outbox.publish($1, to_jsonb($2::int))", &[&d, &i])
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_published(&mut c, &d, 2003, Duration::from_secs(5));
    let soon = Duration::from_secs(3);

    // A late commit: its id is below the one sent before it.
    let mut late = cl.client();
    let mut t = late.transaction().unwrap();
    t.execute("SELECT outbox.publish($1, '\"late\"')", &[&d])
        .unwrap();
    c.execute("SELECT outbox.publish($1, '\"early\"')", &[&d])
        .unwrap();
    wait_published(&mut c, &d, 2004, soon);
    t.commit().unwrap();
    wait_published(&mut c, &d, 2005, soon);

    // The sequence restarted below the floor.
    c.batch_execute("TRUNCATE outbox.published RESTART IDENTITY")
        .unwrap();
    c.execute("SELECT outbox.publish($1, '\"restarted\"')", &[&d])
        .unwrap();
    wait_published(&mut c, &d, 1, soon);

    // Ids cached per session: taken out of order.
    c.batch_execute("ALTER SEQUENCE outbox.published_id_seq CACHE 20")
        .unwrap();
    let mut other = cl.client();
    other
        .execute("SELECT outbox.publish($1, '\"other\"')", &[&d])
        .unwrap();
    c.execute("SELECT outbox.publish($1, '\"cached\"')", &[&d])
        .unwrap();
    wait_published(&mut c, &d, 3, soon);
    c.batch_execute("ALTER SEQUENCE outbox.published_id_seq CACHE 1")
        .unwrap();
}
