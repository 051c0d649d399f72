//! ActiveMQ Classic as the broker: delivery and the inbox end to end, with
//! its differences (queues for durable consumption, NACK straight to the
//! dead-letter queue, `ack` ids that differ from message ids).

use std::time::Duration;

use outbox_pg_e2e::activemq::ActiveMq;
use outbox_pg_e2e::broker::Subscriber;
use outbox_pg_e2e::{Cluster, unique, wait_drained, wait_for};

#[test]
fn delivery_and_inbox_over_activemq() {
    let amq = ActiveMq::start();
    let cl = Cluster::start(&[
        &format!("outbox.stomp_hosts = '{}'", amq.host()),
        "outbox.maximum_retry_attempts = 3",
        "outbox.maximum_backoff = '500ms'",
    ]);
    let mut c = cl.client();

    // Delivery: body and headers arrive; the rows are confirmed by receipt.
    let q = unique("amq_out");
    let d = format!("/queue/{q}");
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('n', i), '{\"team\": \"billing\", \"tricky\": \"a:b\\nc\"}')
         FROM generate_series(1, 20) i",
        &[&d],
    )
    .unwrap();
    let mut sub = Subscriber::at(&amq.config(), &d, &[]);
    let got = sub.take(20, Duration::from_secs(30));
    let bodies: Vec<String> = got.iter().map(|m| m.body_text()).collect();
    assert_eq!(
        bodies,
        (1..=20)
            .map(|i| format!("{{\"n\": {i}}}"))
            .collect::<Vec<_>>(),
        "in order"
    );
    assert_eq!(got[0].get("team"), Some("billing"));
    assert_eq!(got[0].get("tricky"), Some("a:b\nc"));
    assert!(got[0].get("dop-msg-id").is_some());
    wait_for("rows published", Duration::from_secs(10), || {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM outbox.published WHERE status = 'published'",
                &[],
            )
            .unwrap()
            .get(0);
        (n == 20).then_some(())
    });

    // The inbox: a queue destination (ActiveMQ keeps topics for present
    // subscribers only), callbacks once per message, a failing one to DLQ.<queue>.
    c.batch_execute(
        "CREATE TABLE got (body jsonb);
         CREATE FUNCTION keep(m outbox.message) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             IF m.body ? 'fail' THEN RAISE EXCEPTION 'no'; END IF;
             INSERT INTO got VALUES (m.body);
         END $$;",
    )
    .unwrap();
    let q = unique("amq_in");
    let d = format!("/queue/{q}");
    c.execute(
        "SELECT outbox.subscribe('amq', $1, 'keep(outbox.message)')",
        &[&d],
    )
    .unwrap();
    wait_for("the consumer", Duration::from_secs(20), || {
        cl.log()
            .contains("outbox consumer \"amq\": subscribed")
            .then_some(())
    });
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('n', i)) FROM generate_series(1, 30) i",
        &[&d],
    )
    .unwrap();
    c.execute("SELECT outbox.publish($1, '{\"fail\": true}')", &[&d])
        .unwrap();
    wait_for("30 callbacks", Duration::from_secs(30), || {
        let n: i64 = c.query_one("SELECT count(*) FROM got", &[]).unwrap().get(0);
        (n == 30).then_some(())
    });
    let mut dlq = Subscriber::at(&amq.config(), &format!("/queue/DLQ.{q}"), &[]);
    assert_eq!(
        dlq.take(1, Duration::from_secs(20))[0].body_text(),
        r#"{"fail": true}"#
    );
    let (status, attempts): (String, i32) = c
        .query_one(
            "SELECT status::text, attempts FROM outbox.received WHERE body ? 'fail'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((status.as_str(), attempts), ("failed", 3));
    let consumed: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.received WHERE status = 'consumed'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(consumed, 30);
    c.execute("SELECT outbox.unsubscribe('amq')", &[]).unwrap();
}

#[test]
fn activemq_restarts_duplicates_and_discards() {
    let mut amq = ActiveMq::start();
    let cl = Cluster::start(&[
        &format!("outbox.stomp_hosts = '{}'", amq.host()),
        "outbox.maximum_backoff = '500ms'",
    ]);
    let mut c = cl.client();
    c.batch_execute(
        "CREATE TABLE got (id text, body jsonb);
         CREATE FUNCTION keep(m outbox.message) RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO got VALUES (m.message_id, m.body);
             RETURN NOT m.body ? 'drop';
         END $$;",
    )
    .unwrap();
    let q = unique("amq_restart");
    let d = format!("/queue/{q}");
    c.execute(
        "SELECT outbox.subscribe('amq2', $1, 'keep(outbox.message)')",
        &[&d],
    )
    .unwrap();
    wait_for("the consumer", Duration::from_secs(20), || {
        cl.log()
            .contains("outbox consumer \"amq2\": subscribed")
            .then_some(())
    });
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('n', i)) FROM generate_series(1, 50) i",
        &[&d],
    )
    .unwrap();
    // The broker stops mid-stream and comes back: nothing is lost.
    amq.stop();
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('n', i)) FROM generate_series(51, 100) i",
        &[&d],
    )
    .unwrap();
    amq.start_again();
    wait_for(
        "100 messages after the restart",
        Duration::from_secs(60),
        || {
            let n: i64 = c
                .query_one("SELECT count(DISTINCT id) FROM got", &[])
                .unwrap()
                .get(0);
            (n == 100).then_some(())
        },
    );
    let dup: i64 = c
        .query_one("SELECT count(*) - count(DISTINCT id) FROM got", &[])
        .unwrap()
        .get(0);
    assert_eq!(dup, 0, "one effect per message id");
    let retries: i64 = c
        .query_one("SELECT sum(retry) FROM outbox.published", &[])
        .unwrap()
        .get(0);
    assert_eq!(retries, 0, "a broker restart is not a message failure");
    // A discarded message: nothing the callback wrote stays, it goes to the DLQ.
    c.execute("SELECT outbox.publish($1, '{\"drop\": true}')", &[&d])
        .unwrap();
    let mut dlq = Subscriber::at(&amq.config(), &format!("/queue/DLQ.{q}"), &[]);
    assert_eq!(
        dlq.take(1, Duration::from_secs(20))[0].body_text(),
        r#"{"drop": true}"#
    );
    let kept: i64 = c
        .query_one("SELECT count(*) FROM got WHERE body ? 'drop'", &[])
        .unwrap()
        .get(0);
    assert_eq!(kept, 0);
    c.execute("SELECT outbox.unsubscribe('amq2')", &[]).unwrap();
}

/// A frame ActiveMQ refuses inside a STOMP transaction (one larger than
/// its transport accepts): that row alone is charged; the innocent rows of
/// its transaction, and the rows after it, are delivered with no retry
/// counted.
#[test]
fn a_frame_refused_inside_a_transaction_charges_it_alone() {
    let amq = ActiveMq::start_with("wireFormat.maxFrameSize=20000");
    let cl = Cluster::start(&[
        &format!("outbox.stomp_hosts = '{}'", amq.host()),
        "outbox.maximum_retry_attempts = 1",
        "outbox.maximum_backoff = '200ms'",
    ]);
    let mut c = cl.client();
    let q = unique("amq_big");
    let d = format!("/queue/{q}");
    // Row 5 of 10 is too large for the broker.
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('n', i, 'pad', CASE WHEN i = 5 THEN repeat('x', 50000) ELSE '' END))
         FROM generate_series(1, 10) i",
        &[&d],
    )
    .unwrap();
    only_refused_is_charged(&mut c, 5);
    let mut sub = Subscriber::at(&amq.config(), &d, &[]);
    let got = sub.take(9, Duration::from_secs(30));
    let mut ns: Vec<i64> = got
        .iter()
        .map(|m| {
            let body = m.body_text();
            let n = body.split("\"n\": ").nth(1).unwrap_or_default();
            n.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap_or_default()
                .parse::<i64>()
                .unwrap_or_else(|_| panic!("no n in {body}"))
        })
        .collect();
    ns.sort_unstable();
    ns.dedup();
    assert_eq!(
        ns,
        [1, 2, 3, 4, 6, 7, 8, 9, 10],
        "every innocent row arrived"
    );
}

/// A SEND ActiveMQ refuses inside a STOMP transaction while the connection
/// stays open (a queue the login may not write to), with several flights
/// in the air: the refused row alone is charged, and every innocent row
/// reaches its queue in id order: none of a later transaction arrives
/// before the innocent rows of the refused one.
#[test]
fn a_send_refused_inside_a_transaction_keeps_the_order() {
    let amq = ActiveMq::start_with_a_closed_queue();
    let cl = Cluster::start(&[
        &format!("outbox.stomp_hosts = '{}'", amq.host()),
        "outbox.maximum_retry_attempts = 1",
        "outbox.maximum_backoff = '200ms'",
        "outbox.batch_size = 200",
    ]);
    let mut c = cl.client();
    let q = unique("open.amq_order");
    let d = format!("/queue/{q}");
    let closed = format!("/queue/{}", unique("closed.amq"));
    // 1,000 rows; row 450 goes to the closed queue.
    c.execute(
        "SELECT outbox.publish(CASE WHEN i = 450 THEN $2 ELSE $1 END, jsonb_build_object('n', i))
         FROM generate_series(1, 1000) i",
        &[&d, &closed],
    )
    .unwrap();
    only_refused_is_charged(&mut c, 450);
    let mut sub = Subscriber::at(&amq.config(), &d, &[]);
    // Duplicates may come (at least once): read until every row came and
    // the queue stays quiet.
    let mut seen = std::collections::HashSet::new();
    let mut first: Vec<i64> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let wait = if seen.len() < 999 {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(500)
        };
        let Some(m) = sub.next(wait) else { break };
        let body = m.body_text();
        let n: i64 = body
            .trim_start_matches("{\"n\": ")
            .trim_end_matches('}')
            .parse()
            .unwrap_or_else(|_| panic!("no n in {body}"));
        if seen.insert(n) {
            first.push(n);
        }
    }
    let expected: Vec<i64> = (1..=1000).filter(|n| *n != 450).collect();
    assert_eq!(first, expected, "first arrivals in id order");
}

/// Waits until no row is scheduled, then asserts that the row whose body
/// has `n = refused` failed after one attempt and every other was
/// published with no retry counted.
fn only_refused_is_charged(c: &mut postgres::Client, refused: i32) {
    wait_drained(c, Duration::from_secs(90));
    let rows = c
        .query(
            "SELECT (body->>'n')::int, status::text, retry FROM outbox.published ORDER BY id",
            &[],
        )
        .unwrap();
    assert!(!rows.is_empty());
    for r in rows {
        let (n, status, retry): (i32, String, i32) = (r.get(0), r.get(1), r.get(2));
        let wanted = if n == refused {
            ("failed", 1)
        } else {
            ("published", 0)
        };
        assert_eq!((status.as_str(), retry), wanted, "row {n}");
    }
}
