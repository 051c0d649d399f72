//! Failover to a streaming standby (`pg_basebackup -R`, see
//! `harness/standby.rs`): nothing runs on the standby; at promotion its
//! workers start and deliver every committed message that was not
//! confirmed, and the inbox keeps each message's effect to one.
//!
//! "Broker down" is simulated per server, not by stopping the machine's
//! RabbitMQ: a server's `outbox.stomp_hosts` points at `127.0.0.1:1`
//! (nothing listens there), and the promoted server is given the real
//! broker back with `ALTER SYSTEM` and a reload. That cuts off exactly the
//! server under test, keeps the durable queues of the subscriptions where
//! they are, and lets these tests share the broker with the others
//! (`shared_broker`) instead of stopping everything else
//! (`exclusive_broker`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox_pg_e2e::broker::{self, Subscriber, send_raw};
use outbox_pg_e2e::cluster::sqlstate;
use outbox_pg_e2e::standby::{Standby, stop, switchover};
use outbox_pg_e2e::{Cluster, unique, wait_drained, wait_for};
use postgres::Client;

const SETTINGS: &[&str] = &[
    "outbox.poll_interval = '1s'",
    "outbox.pause_for_retry = '200ms'",
    "outbox.wait_retry = '200ms'",
    "outbox.maximum_retry_attempts = 3",
    "outbox.maximum_backoff = '500ms'",
    "outbox.stomp_connect_timeout = '2s'",
    // Test queues disappear two minutes after their consumer left.
    r#"outbox.stomp_queue_headers = '{"durable":"true","auto-delete":"false","prefetch-count":"100","x-expires":"120000"}'"#,
];

/// Where no broker listens.
const DEAD_BROKER: &str = "outbox.stomp_hosts = '127.0.0.1:1'";
const REAL_BROKER: &str = "outbox.stomp_hosts = '127.0.0.1:61613'";

/// A primary with the effects table and the callback that fills it.
fn primary(extra: &[&str]) -> Cluster {
    let cl = Cluster::start(&[SETTINGS, extra].concat());
    cl.execute(
        "postgres",
        "CREATE TABLE effects (message_id text, body jsonb);
         CREATE FUNCTION record_effect(m outbox.message) RETURNS void LANGUAGE sql AS
           $$ INSERT INTO effects VALUES (m.message_id, m.body) $$;",
    );
    cl
}

/// A topic routing key and its queue, unique to the test.
fn topic(prefix: &str) -> (String, String) {
    let q = unique(prefix);
    (format!("/topic/{q}"), q)
}

/// Subscribes `record_effect` and waits until the consumer is subscribed
/// at the broker (its queue exists from then on).
fn subscribe(cl: &Cluster, name: &str, destination: &str) {
    cl.client()
        .execute(
            "SELECT outbox.subscribe($1, $2, 'record_effect(outbox.message)'::regprocedure)",
            &[&name, &destination],
        )
        .unwrap();
    wait_subscribed(cl, name, destination);
}

fn wait_subscribed(cl: &Cluster, name: &str, destination: &str) {
    let line = format!("outbox consumer \"{name}\": subscribed to {destination}");
    wait_for(&line, Duration::from_secs(15), || {
        cl.log().contains(&line).then_some(())
    });
}

/// Points the server's workers at no broker and waits until both the
/// publisher and the consumer `name` have dropped their connections.
fn cut_off(cl: &Cluster, name: &str) {
    cl.set(&[DEAD_BROKER]);
    for who in [
        "outbox publisher".to_string(),
        format!("outbox consumer \"{name}\""),
    ] {
        let line = format!("{who}: broker settings changed, reconnecting");
        wait_for(&line, Duration::from_secs(10), || {
            cl.log().contains(&line).then_some(())
        });
    }
}

/// Sends one raw message per id (as `dop-msg-id`) to `destination`.
fn send_ids(destination: &str, ids: &[String]) {
    let headers: Vec<[(&str, &str); 1]> =
        ids.iter().map(|id| [("dop-msg-id", id.as_str())]).collect();
    let bodies: Vec<String> = ids
        .iter()
        .map(|id| format!(r#"{{"raw": "{id}"}}"#))
        .collect();
    let messages: Vec<(&[(&str, &str)], &str)> = headers
        .iter()
        .zip(&bodies)
        .map(|(h, b)| (&h[..], b.as_str()))
        .collect();
    send_raw(destination, &messages);
}

/// The outbox workers in `pg_stat_activity`: `backend_type:application_name`.
fn workers(c: &mut Client) -> Vec<String> {
    c.query(
        "SELECT backend_type || ':' || coalesce(application_name, '') FROM pg_stat_activity
         WHERE backend_type LIKE '%outbox%' ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Waits until the publisher and the consumer `name` run.
fn wait_workers(c: &mut Client, name: &str, timeout: Duration) {
    let consumer = format!("outbox consumer:{name}");
    wait_for("the publisher and the consumer", timeout, || {
        let w = workers(c);
        (w.iter().any(|w| w.starts_with("outbox publisher:")) && w.contains(&consumer))
            .then_some(())
    });
}

/// The message ids of the outbox rows to `destination`.
fn committed(c: &mut Client, destination: &str) -> HashSet<String> {
    c.query(
        "SELECT message_id::text FROM outbox.published WHERE destination = $1",
        &[&destination],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn count(c: &mut Client, sql: &str, destination: &str) -> i64 {
    c.query_one(sql, &[&destination]).unwrap().get(0)
}

fn consumed(c: &mut Client, name: &str) -> i64 {
    count(
        c,
        "SELECT count(*) FROM outbox.received WHERE subscription = $1 AND status = 'consumed'",
        name,
    )
}

/// What arrived on the wire: reads until every id of `expected` was seen
/// (or `timeout`), then on until the wire is quiet for a while, to count
/// the duplicates. Returns the distinct `dop-msg-id`s and the number of
/// messages.
fn wire(
    sub: &mut Subscriber,
    expected: &HashSet<String>,
    timeout: Duration,
) -> (HashSet<String>, usize) {
    let deadline = Instant::now() + timeout;
    let mut seen = HashSet::new();
    let mut total = 0;
    loop {
        let missing = !expected.is_subset(&seen);
        let wait = if missing {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(500)
        };
        match sub.next(wait) {
            Some(m) => {
                total += 1;
                seen.insert(m.get("dop-msg-id").expect("a dop-msg-id").to_string());
            }
            None => return (seen, total),
        }
    }
}

/// The inbox of subscription `name` against what must be in it: every id
/// of `ids` consumed, in one attempt, with exactly one callback effect, and
/// nothing else.
fn assert_exactly_once(c: &mut Client, name: &str, ids: &HashSet<String>) {
    let rows: Vec<(String, String, i32)> = c
        .query(
            "SELECT message_id, status::text, attempts FROM outbox.received WHERE subscription = $1",
            &[&name],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let recorded: HashSet<String> = rows.iter().map(|r| r.0.clone()).collect();
    assert_eq!(rows.len(), recorded.len());
    assert_eq!(&recorded, ids, "the inbox holds every id, and only those");
    let odd: Vec<_> = rows
        .iter()
        .filter(|r| r.1 != "consumed" || r.2 != 1)
        .take(5)
        .collect();
    assert!(odd.is_empty(), "consumed in one attempt: {odd:?}");
    let twice: Vec<(String, i64)> = c
        .query(
            "SELECT message_id, count(*) FROM effects GROUP BY 1 HAVING count(*) > 1 LIMIT 5",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(twice.is_empty(), "callback effects repeated: {twice:?}");
    let effected: HashSet<String> = c
        .query("SELECT message_id FROM effects", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(&effected, ids, "one effect per id");
}

/// Log lines a quiet standby must not write: any error or warning, and
/// anything about the outbox (the cluster's own directory, whose name says
/// outbox too, left out).
fn bad_lines(cl: &Cluster) -> Vec<String> {
    let dir = cl.dir.display().to_string();
    cl.log()
        .lines()
        .map(|l| l.replace(&dir, "<dir>"))
        .filter(|l| {
            ["WARNING:", "ERROR:", "FATAL:", "PANIC:", "outbox"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect()
}

/// The standby is pointed at the real broker while its primary is not, so
/// that a worker running on it would show: on the wire, in the queue, in
/// `pg_stat_activity` or in its log. Promoted, the same server does
/// deliver, which shows the silence was the standby's.
#[test]
fn a_standby_runs_no_worker_and_logs_nothing_until_promoted() {
    let _b = broker::shared_broker();
    let primary = primary(&[]);
    let (d, q) = topic("standby");
    let name = unique("standby");
    subscribe(&primary, &name, &d);
    cut_off(&primary, &name);
    let standby = Standby::of(&primary, &[REAL_BROKER]);
    // Waiting in the subscription's queue, and waiting in the outbox.
    let raw: Vec<String> = (0..5).map(|i| format!("{name}-raw{i}")).collect();
    send_ids(&d, &raw);
    let mut sub = Subscriber::new(&d);
    let mut c = primary.client();
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('n', i)) FROM generate_series(1, 50) i",
        &[&d],
    )
    .unwrap();
    let ids = committed(&mut c, &d);
    standby.wait_replayed(&primary, Duration::from_secs(30));

    let mut s = standby.client();
    assert!(standby.in_recovery());
    assert_eq!(
        count(
            &mut s,
            "SELECT count(*) FROM outbox.published WHERE destination = $1 AND status = 'scheduled'",
            &d
        ),
        50,
        "the rows are on the standby"
    );
    assert_eq!(
        count(
            &mut s,
            "SELECT count(*) FROM outbox.subscriptions WHERE name = $1",
            &name
        ),
        1,
        "and the subscription"
    );
    // A consumer starts within a second and the publisher at once where
    // they may run: give them three.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        workers(&mut s),
        Vec::<String>::new(),
        "no outbox worker on the standby"
    );
    assert!(
        sub.next(Duration::from_millis(500)).is_none(),
        "the standby sent nothing"
    );
    assert_eq!(
        broker::queue_depth(&q),
        Some(5),
        "the standby consumed nothing"
    );
    let bad = bad_lines(&standby);
    assert!(bad.is_empty(), "the standby's log:\n{}", bad.join("\n"));
    // Reading works on the standby; writing is PostgreSQL's plain refusal.
    s.query("SELECT * FROM outbox.status", &[])
        .unwrap_or_else(|e| panic!("outbox.status on a standby: {e:?}"));
    let e = s
        .execute("SELECT outbox.publish($1, '1')", &[&d])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "25006", "{e:?}");

    // Fenced and promoted: the same server runs its workers and delivers.
    stop(&primary, "immediate");
    standby.promote();
    let mut s = standby.client();
    wait_workers(&mut s, &name, Duration::from_secs(10));
    let (got, _) = wire(&mut sub, &ids, Duration::from_secs(20));
    assert_eq!(got, ids);
    wait_for("55 consumed", Duration::from_secs(20), || {
        (consumed(&mut s, &name) == 55).then_some(())
    });
    let all: HashSet<String> = ids.iter().cloned().chain(raw).collect();
    assert_exactly_once(&mut s, &name, &all);
    assert!(standby.log().contains("outbox publisher started"));
}

/// Asynchronous streaming, the broker out of reach of the primary: 2,000
/// messages and some inbox traffic committed and replayed, the primary
/// stopped with `-m immediate`, the standby promoted, then the broker given
/// to it. Every committed message goes out (set equality of `dop-msg-id`
/// on the wire), the consumer resumes on the promoted server, and every
/// message, including ids consumed before the failover and delivered again
/// after it, takes effect once.
#[test]
fn after_an_immediate_stop_and_a_promotion_every_committed_message_is_delivered_once() {
    let _b = broker::shared_broker();
    let primary = primary(&[]);
    // The standby has no broker either until it is promoted.
    let standby = Standby::of(&primary, &[DEAD_BROKER]);
    let (d, q) = topic("failover");
    let name = unique("failover");
    subscribe(&primary, &name, &d);
    let mut c = primary.client();

    // Inbox traffic on the primary: 100 messages consumed there.
    let before: Vec<String> = (0..100).map(|i| format!("{name}-before{i}")).collect();
    send_ids(&d, &before);
    wait_for(
        "100 consumed on the primary",
        Duration::from_secs(20),
        || (consumed(&mut c, &name) == 100).then_some(()),
    );
    wait_for("their ACKs", Duration::from_secs(10), || {
        (broker::queue_depth(&q) == Some(0)).then_some(())
    });

    cut_off(&primary, &name);
    // While the broker is out of reach: 25 new ids, and 25 consumed before
    // the failover coming again, wait in the queue.
    let during: Vec<String> = (0..25).map(|i| format!("{name}-during{i}")).collect();
    send_ids(&d, &[&during[..], &before[..25]].concat());
    let mut sub = Subscriber::new(&d);
    for t in 0..20 {
        c.execute(
            "SELECT outbox.publish($1, jsonb_build_object('n', $2::int * 100 + i)) FROM generate_series(1, 100) i",
            &[&d, &t],
        )
        .unwrap();
    }
    let ids = committed(&mut c, &d);
    assert_eq!(ids.len(), 2000);
    standby.wait_replayed(&primary, Duration::from_secs(30));
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM outbox.published WHERE destination = $1 AND status = 'scheduled'",
            &d
        ),
        2000,
        "the primary sent nothing"
    );
    {
        let mut s = standby.client();
        assert_eq!(committed(&mut s, &d), ids, "replayed on the standby");
        assert_eq!(consumed(&mut s, &name), 100);
    }

    // The primary dies (and stays down: fenced); the standby takes over.
    stop(&primary, "immediate");
    standby.promote();
    let mut s = standby.client();
    wait_workers(&mut s, &name, Duration::from_secs(10));
    // The broker comes back, for the promoted server.
    s.batch_execute(&format!("ALTER SYSTEM SET {REAL_BROKER}"))
        .unwrap();
    s.batch_execute("SELECT pg_reload_conf()").unwrap();
    let start = Instant::now();

    let (got, total) = wire(&mut sub, &ids, Duration::from_secs(40));
    assert_eq!(got, ids, "every committed message, by dop-msg-id");
    wait_drained(&mut s, Duration::from_secs(10));
    assert_eq!(
        count(
            &mut s,
            "SELECT count(*) FROM outbox.published WHERE destination = $1 AND status = 'published'",
            &d
        ),
        2000
    );
    wait_subscribed(&standby, &name, &d);
    wait_for("2125 consumed", Duration::from_secs(40), || {
        (consumed(&mut s, &name) == 2125).then_some(())
    });
    wait_for("the queue to empty", Duration::from_secs(10), || {
        (broker::queue_depth(&q) == Some(0)).then_some(())
    });
    eprintln!(
        "failover: {total} messages on the wire for 2000 ids, all consumed {:?} after the broker came back",
        start.elapsed()
    );
    let all: HashSet<String> = ids.into_iter().chain(before).chain(during).collect();
    assert_exactly_once(&mut s, &name, &all);
}

/// A planned switchover (fast stop of the primary, which streams all its
/// WAL first; promotion of the standby) while the publisher is halfway
/// through a backlog and the consumer is busy with it: messages sent and
/// not yet marked go out again (at least once on the wire), and the inbox
/// takes each one once.
#[test]
fn a_switchover_mid_drain_is_at_least_once_on_the_wire_and_exactly_once_in_the_inbox() {
    let _b = broker::shared_broker();
    let primary = primary(&["outbox.batch_size = 50"]);
    // Each mark of a flight takes 50 ms longer: the drain lasts seconds and
    // always has flights sent and not yet marked.
    primary.execute(
        "postgres",
        "CREATE FUNCTION slow_mark() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END $$;
         CREATE TRIGGER slow_mark AFTER UPDATE ON outbox.published
           FOR EACH STATEMENT EXECUTE FUNCTION slow_mark();",
    );
    let standby = Standby::of(&primary, &[]);
    let (d, q) = topic("switchover");
    let name = unique("switchover");
    subscribe(&primary, &name, &d);
    let mut sub = Subscriber::new(&d);
    let mut c = primary.client();
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('n', i)) FROM generate_series(1, 3000) i",
        &[&d],
    )
    .unwrap();
    let ids = committed(&mut c, &d);
    assert_eq!(ids.len(), 3000);
    let status = "SELECT count(*) FILTER (WHERE status = 'published') FROM outbox.published WHERE destination = $1";
    wait_for("the drain to be under way", Duration::from_secs(20), || {
        (count(&mut c, status, &d) >= 300).then_some(())
    });
    let at_switch = count(&mut c, status, &d);
    let consumed_at_switch = consumed(&mut c, &name);
    assert!(at_switch < 3000, "caught mid-drain ({at_switch} marked)");
    let t0: String = standby
        .client()
        .query_one("SELECT clock_timestamp()::text", &[])
        .unwrap()
        .get(0);

    switchover(&primary, &standby);
    let mut s = standby.client();
    wait_workers(&mut s, &name, Duration::from_secs(10));
    let start = Instant::now();
    let (got, total) = wire(&mut sub, &ids, Duration::from_secs(40));
    assert_eq!(got, ids, "every committed message, by dop-msg-id");
    assert!(total >= 3000);
    wait_drained(&mut s, Duration::from_secs(20));
    let r = s
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'published'),
                    count(*) FILTER (WHERE published_at > $2::text::timestamptz)
             FROM outbox.published WHERE destination = $1",
            &[&d, &t0],
        )
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 3000);
    assert!(
        r.get::<_, i64>(1) > 0,
        "the promoted server finished the drain"
    );
    wait_for("3000 consumed", Duration::from_secs(40), || {
        (consumed(&mut s, &name) == 3000).then_some(())
    });
    wait_for("the queue to empty", Duration::from_secs(10), || {
        (broker::queue_depth(&q) == Some(0)).then_some(())
    });
    eprintln!(
        "switchover at {at_switch} marked / {consumed_at_switch} consumed: {total} messages on the wire \
         ({} duplicates), all consumed {:?} after the promotion",
        total - 3000,
        start.elapsed()
    );
    assert_exactly_once(&mut s, &name, &ids);
}
