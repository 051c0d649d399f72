//! The inbox end to end: outbox.subscribe() → a consumer worker → the real
//! broker → the SQL callback, once per message id.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use outbox_pg_e2e::broker::{self, Subscriber, send_raw};
use outbox_pg_e2e::cluster::sqlstate;
use outbox_pg_e2e::{Cluster, unique, wait_for};
use postgres::Client;

const SETTINGS: &[&str] = &[
    "outbox.poll_interval = '10s'",
    "outbox.maximum_retry_attempts = 3",
    "outbox.maximum_backoff = '500ms'",
    "outbox.max_consumers = 32",
    // Test queues disappear two minutes after their consumer left.
    r#"outbox.stomp_queue_headers = '{"durable":"true","auto-delete":"false","prefetch-count":"20","x-expires":"120000"}'"#,
];

fn shared() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    outbox_pg_e2e::shared_cluster(&C, || {
        let c = Cluster::start(SETTINGS);
        c.execute(
            "postgres",
            "CREATE TABLE effects (subscription text, message_id text, body jsonb, who text);
             CREATE FUNCTION record_effect(m outbox.message) RETURNS void LANGUAGE sql AS
               $$ INSERT INTO effects VALUES (m.headers->>'sub', m.message_id, m.body, current_user) $$;
             CREATE FUNCTION always_fails(m outbox.message) RETURNS void LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO effects VALUES ('fails', m.message_id, m.body, current_user);
                        RAISE EXCEPTION 'callback says no to %', m.body; END $$;
             CREATE FUNCTION rejects(m outbox.message) RETURNS boolean LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO effects VALUES ('rejects', m.message_id, m.body, current_user);
                        RETURN (m.body->>'keep')::boolean; END $$;
             GRANT ALL ON effects TO PUBLIC;",
        );
        c
    })
}

/// A topic routing key and its queue, unique to the test.
fn topic(prefix: &str) -> (String, String) {
    let q = unique(prefix);
    (format!("/topic/{q}"), q)
}

/// Subscribes and waits until the consumer is subscribed at the broker.
fn subscribe(cl: &Cluster, c: &mut Client, name: &str, destination: &str, callback: &str) {
    c.execute(
        "SELECT outbox.subscribe($1, $2, $3::text::regprocedure)",
        &[&name, &destination, &callback],
    )
    .unwrap();
    let line = format!("outbox consumer \"{name}\": subscribed to {destination}");
    wait_for(&line, Duration::from_secs(10), || {
        cl.log().contains(&line).then_some(())
    });
}

/// Consumer workers running for the subscription `name`.
fn consumers(c: &mut Client, name: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'outbox consumer' AND application_name = $1",
        &[&name],
    )
    .unwrap()
    .get(0)
}

fn effects(c: &mut Client, body_like: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM effects WHERE body::text LIKE $1",
        &[&body_like],
    )
    .unwrap()
    .get(0)
}

fn received(c: &mut Client, sub: &str) -> Vec<(String, String, i32)> {
    c.query(
        "SELECT message_id, status::text, attempts FROM outbox.received WHERE subscription = $1 ORDER BY id",
        &[&sub],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[test]
fn publish_to_callback_round_trip_once_per_message() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let (d, _) = topic("round");
    let name = unique("round");
    subscribe(cl, &mut c, &name, &d, "record_effect(outbox.message)");
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('round', i), jsonb_build_object('sub', $2::text))
         FROM generate_series(1, 50) i",
        &[&d, &name],
    )
    .unwrap();
    wait_for("50 consumed", Duration::from_secs(20), || {
        (received(&mut c, &name)
            .iter()
            .filter(|r| r.1 == "consumed")
            .count()
            == 50)
            .then_some(())
    });
    let n: i64 = c
        .query_one(
            "SELECT count(DISTINCT message_id) FROM effects WHERE subscription = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 50, "one effect per message");
    let ids_match: bool = c
        .query_one(
            "SELECT bool_and(r.message_id = p.message_id::text) FROM outbox.received r
             JOIN outbox.published p ON p.message_id::text = r.message_id WHERE r.subscription = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert!(ids_match, "the inbox records dop-msg-id");
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
}

#[test]
fn the_same_message_id_takes_effect_once_even_concurrently() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let (d, q) = topic("dup");
    let (a, b) = (unique("dupa"), unique("dupb"));
    // Two consumers on one queue: duplicates reach both at the same moment.
    for name in [&a, &b] {
        c.execute(
            "SELECT outbox.subscribe($1, $2, 'record_effect(outbox.message)'::regprocedure, $3)",
            &[name, &d, &q],
        )
        .unwrap();
        let line = format!("outbox consumer \"{name}\": subscribed to {d}");
        wait_for(&line, Duration::from_secs(10), || {
            cl.log().contains(&line).then_some(())
        });
    }
    let id = unique("same-id");
    let h: &[(&str, &str)] = &[("dop-msg-id", &id)];
    send_raw(
        &d,
        &[
            (h, r#"{"dup": 1}"#),
            (h, r#"{"dup": 1}"#),
            (h, r#"{"dup": 1}"#),
            (h, r#"{"dup": 1}"#),
            (h, r#"{"dup": 1}"#),
        ],
    );
    let count = |c: &mut Client| -> i64 {
        c.query_one("SELECT count(*) FROM effects WHERE message_id = $1", &[&id])
            .unwrap()
            .get(0)
    };
    wait_for("the first effect", Duration::from_secs(10), || {
        (count(&mut c) >= 1).then_some(())
    });
    // Give the other four copies time to arrive and be handled.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&mut c), 1, "five deliveries of one id, one effect");
    let (status, attempts): (String, i32) = c
        .query_one(
            "SELECT status::text, attempts FROM outbox.received WHERE message_id = $1",
            &[&id],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((status.as_str(), attempts), ("consumed", 1));
    for name in [&a, &b] {
        c.execute("SELECT outbox.unsubscribe($1)", &[name]).unwrap();
    }
}

/// The inbox row goes in directly while `outbox.received` is as the
/// extension made it, and through the INSERT statement once it is not (a
/// trigger on it fires, a column added with a default gets it); back again
/// when they are gone. Either way the callback sees its message's row, the
/// row holds what the statement would have written, and an id repeated
/// within one batch (a unique violation on the direct path) takes effect
/// once.
#[test]
fn the_inbox_row_honours_what_is_added_to_the_table() {
    let _b = broker::shared_broker();
    let cl = Cluster::start(SETTINGS);
    let mut c = cl.client();
    c.batch_execute(
        "CREATE TABLE effects (message_id text, body jsonb, row_seen boolean);
         CREATE FUNCTION look(m outbox.message) RETURNS void LANGUAGE sql AS
           $$ INSERT INTO effects SELECT m.message_id, m.body,
                EXISTS (SELECT 1 FROM outbox.received r WHERE r.message_id = m.message_id) $$;
         CREATE TABLE seen (message_id text);
         CREATE FUNCTION note_row() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO seen VALUES (NEW.message_id); RETURN NEW; END $$;",
    )
    .unwrap();
    let (d, _) = topic("shape");
    let name = unique("shape");
    subscribe(&cl, &mut c, &name, &d, "look(outbox.message)");
    // Sends `ids` (each once, repeats included) in one go and waits for the
    // last one's effect.
    let send = |c: &mut Client, round: i32, ids: &[&str]| {
        let bodies: Vec<String> = (0..ids.len())
            .map(|i| format!(r#"{{"round": {round}, "i": {i}}}"#))
            .collect();
        let headers: Vec<[(&str, &str); 1]> = ids.iter().map(|id| [("cap-msg-id", *id)]).collect();
        let messages: Vec<(&[(&str, &str)], &str)> = headers
            .iter()
            .zip(&bodies)
            .map(|(h, b)| (&h[..], b.as_str()))
            .collect();
        send_raw(&d, &messages);
        let last = *ids.last().expect("some ids");
        wait_for("the round's last effect", Duration::from_secs(20), || {
            c.query_opt("SELECT 1 FROM effects WHERE message_id = $1", &[&last])
                .unwrap()
                .map(|_| ())
        });
    };
    let check = |c: &mut Client, round: i32, ids: &[&str], noted: bool| {
        for id in ids {
            let ok: bool = c
                .query_one(
                    "SELECT r.id > 0 AND r.status = 'consumed' AND r.attempts = 1 AND r.subscription = $2
                            AND r.destination = $3 AND r.headers->>'cap-msg-id' = r.message_id
                            AND (r.body->>'round')::int = $4 AND r.last_error IS NULL
                            AND r.added > now() - interval '1 minute' AND r.processed_at >= r.added
                            AND (SELECT bool_and(row_seen) FROM effects e WHERE e.message_id = r.message_id)
                            AND (SELECT count(*) FROM effects e WHERE e.message_id = r.message_id) = 1
                     FROM outbox.received r WHERE r.message_id = $1",
                    &[id, &name, &d, &round],
                )
                .unwrap()
                .get(0);
            assert!(ok, "round {round}: row and effect of {id}");
            let in_seen: bool = c
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM seen WHERE message_id = $1)",
                    &[id],
                )
                .unwrap()
                .get(0);
            assert_eq!(
                in_seen, noted,
                "round {round}: the table's trigger fired for {id}"
            );
        }
    };

    // Stock: one batch holding an id twice, and an id consumed before.
    send(&mut c, 1, &["a1", "a2", "a1", "a3"]);
    send(&mut c, 1, &["a2", "a4"]);
    check(&mut c, 1, &["a1", "a2", "a3", "a4"], false);

    c.batch_execute(
        "CREATE TRIGGER note AFTER INSERT ON outbox.received FOR EACH ROW EXECUTE FUNCTION note_row();
         ALTER TABLE outbox.received ADD COLUMN tenant text DEFAULT 'acme';",
    )
    .unwrap();
    send(&mut c, 2, &["b1", "b2", "b1", "a4", "b3"]);
    check(&mut c, 2, &["b1", "b2", "b3"], true);
    let tenants: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.received WHERE tenant = 'acme' AND message_id LIKE 'b%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(tenants, 3, "the new column's default");

    c.batch_execute(
        "DROP TRIGGER note ON outbox.received; ALTER TABLE outbox.received DROP COLUMN tenant;",
    )
    .unwrap();
    send(&mut c, 3, &["c1", "c2", "b2", "c3"]);
    // After a batch that met an id recorded before, the next records with
    // the statement; one with new ids only puts the direct path back.
    send(&mut c, 3, &["c4"]);
    send(&mut c, 3, &["c5"]);
    check(&mut c, 3, &["c1", "c2", "c3", "c4", "c5"], false);

    // An ALTER that commits while the consumer waits for the table's lock:
    // the rows are written as the table is now.
    let mut alter = cl.client();
    alter
        .batch_execute(
            "BEGIN; ALTER TABLE outbox.received ADD COLUMN tenant text NOT NULL DEFAULT 'acme'",
        )
        .unwrap();
    let headers: [[(&str, &str); 1]; 2] = [[("cap-msg-id", "d1")], [("cap-msg-id", "d2")]];
    send_raw(
        &d,
        &[
            (&headers[0][..], r#"{"round": 4, "i": 0}"#),
            (&headers[1][..], r#"{"round": 4, "i": 1}"#),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let waiting: i64 = c
        .query_one(
            "SELECT count(*) FROM effects WHERE message_id LIKE 'd%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(waiting, 0, "the consumer waits for the ALTER");
    alter.batch_execute("COMMIT").unwrap();
    wait_for(
        "the effects after the ALTER",
        Duration::from_secs(20),
        || {
            c.query_opt("SELECT 1 FROM effects WHERE message_id = 'd2'", &[])
                .unwrap()
                .map(|_| ())
        },
    );
    check(&mut c, 4, &["d1", "d2"], false);
    let tenants: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.received WHERE tenant = 'acme'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(tenants, 14, "the new column's default, in every row");
    assert!(
        !cl.log().contains("terminated by signal"),
        "no backend crashed"
    );

    let (rows, effects): (i64, i64) = c
        .query_one(
            "SELECT (SELECT count(*) FROM outbox.received), (SELECT count(*) FROM effects)",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((rows, effects), (14, 14), "each id once");
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
}

/// Two subscriptions whose queues hold the same ids in opposite orders,
/// each consumer recording its whole backlog in one transaction with a
/// slow callback: their batches wait on each other (a deadlock Postgres
/// breaks), yet every id takes effect once and both queues empty.
#[test]
fn the_same_ids_in_opposite_orders_take_effect_once() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION slow_effect(m outbox.message) RETURNS void LANGUAGE sql AS
           $$ SELECT pg_sleep(0.3); INSERT INTO effects VALUES ('slow', m.message_id, m.body, current_user) $$;",
    )
    .unwrap();
    let (d1, q1) = topic("cross1");
    let (d2, q2) = topic("cross2");
    let (n1, n2) = (unique("cross1"), unique("cross2"));
    // Create the queues, then leave while they fill.
    for (name, d) in [(&n1, &d1), (&n2, &d2)] {
        subscribe(cl, &mut c, name, d, "slow_effect(outbox.message)");
        c.execute("SELECT outbox.unsubscribe($1)", &[name]).unwrap();
    }
    let ids: Vec<String> = (0..4).map(|i| unique(&format!("cross-id{i}"))).collect();
    let messages =
        |order: &mut dyn Iterator<Item = &String>| -> Vec<(Vec<(&str, String)>, String)> {
            order
                .map(|id| {
                    (
                        vec![("dop-msg-id", id.clone())],
                        format!(r#"{{"cross": "{id}"}}"#),
                    )
                })
                .collect()
        };
    for (d, msgs) in [
        (&d1, messages(&mut ids.iter())),
        (&d2, messages(&mut ids.iter().rev())),
    ] {
        let headers: Vec<Vec<(&str, &str)>> = msgs
            .iter()
            .map(|(h, _)| h.iter().map(|(k, v)| (*k, v.as_str())).collect())
            .collect();
        let batch: Vec<(&[(&str, &str)], &str)> = headers
            .iter()
            .zip(&msgs)
            .map(|(h, (_, body))| (h.as_slice(), body.as_str()))
            .collect();
        send_raw(d, &batch);
    }
    // Both at once, in one transaction.
    let mut tx = c.transaction().unwrap();
    for (name, d) in [(&n1, &d1), (&n2, &d2)] {
        tx.execute(
            "SELECT outbox.subscribe($1, $2, 'slow_effect(outbox.message)'::regprocedure)",
            &[name, d],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    let effects_of = |c: &mut Client| -> Vec<(String, i64)> {
        c.query(
            "SELECT message_id, count(*) FROM effects WHERE message_id = ANY($1) GROUP BY 1 ORDER BY 1",
            &[&ids],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    };
    let consumed = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM outbox.received WHERE message_id = ANY($1) AND status = 'consumed'",
            &[&ids],
        )
        .unwrap()
        .get(0)
    };
    wait_for("four ids consumed", Duration::from_secs(30), || {
        (consumed(&mut c) == 4).then_some(())
    });
    // Both queues empty: every delivery was ACKed, none left hanging.
    for q in [&q1, &q2] {
        wait_for("the queue to empty", Duration::from_secs(20), || {
            (broker::queue_depth(q) == Some(0)).then_some(())
        });
    }
    let effects = effects_of(&mut c);
    assert_eq!(effects.len(), 4, "{effects:?}");
    assert!(effects.iter().all(|(_, n)| *n == 1), "{effects:?}");
    for name in [&n1, &n2] {
        c.execute("SELECT outbox.unsubscribe($1)", &[name]).unwrap();
    }
}

#[test]
fn the_message_id_is_taken_in_order_of_precedence() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let (d, _) = topic("prec");
    let name = unique("prec");
    subscribe(cl, &mut c, &name, &d, "record_effect(outbox.message)");
    let (cap, dop, amqp) = (unique("cap"), unique("dop"), unique("amqp"));
    send_raw(
        &d,
        &[
            (
                &[
                    ("cap-msg-id", &cap),
                    ("dop-msg-id", "x1"),
                    ("amqp-message-id", "y1"),
                ],
                r#"{"p": 1}"#,
            ),
            (
                &[("dop-msg-id", &dop), ("amqp-message-id", "y2")],
                r#"{"p": 2}"#,
            ),
            (&[("amqp-message-id", &amqp)], r#"{"p": 3}"#),
            (&[], r#"{"p": 4}"#),
        ],
    );
    let rows = wait_for("4 received", Duration::from_secs(10), || {
        let r = received(&mut c, &name);
        (r.len() == 4).then_some(r)
    });
    assert_eq!(rows[0].0, cap);
    assert_eq!(rows[1].0, dop);
    assert_eq!(rows[2].0, amqp);
    assert!(
        rows[3].0.starts_with("T_"),
        "the broker's message-id: {}",
        rows[3].0
    );
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
}

#[test]
fn failing_rejecting_and_malformed_messages_go_to_the_dead_letter_queue() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    // A raising callback: retried up to maximum_retry_attempts, then DLQ.
    let (d, q) = topic("fail");
    let mut dlq = Subscriber::with_headers(
        &format!("/queue/DLQ.{q}"),
        &[("durable", "true"), ("auto-delete", "false")],
    );
    let name = unique("fail");
    subscribe(cl, &mut c, &name, &d, "always_fails(outbox.message)");
    c.execute("SELECT outbox.publish($1, '{\"fails\": 1}')", &[&d])
        .unwrap();
    let dead = dlq.take(1, Duration::from_secs(20)).remove(0);
    assert_eq!(dead.body_text(), r#"{"fails": 1}"#);
    let (status, attempts, error): (String, i32, String) = c
        .query_one("SELECT status::text, attempts, last_error FROM outbox.received WHERE subscription = $1", &[&name])
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    assert_eq!((status.as_str(), attempts), ("failed", 3));
    assert!(error.contains("callback says no"), "{error}");
    assert_eq!(
        effects(&mut c, "{\"fails\": 1}"),
        0,
        "the callback's work was rolled back each time"
    );
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();

    // A callback returning false: discarded, nothing it wrote persists.
    let (d, q) = topic("reject");
    let mut dlq = Subscriber::with_headers(
        &format!("/queue/DLQ.{q}"),
        &[("durable", "true"), ("auto-delete", "false")],
    );
    let name = unique("reject");
    subscribe(cl, &mut c, &name, &d, "rejects(outbox.message)");
    c.execute("SELECT outbox.publish($1, '{\"keep\": false}'); ", &[&d])
        .unwrap();
    c.execute("SELECT outbox.publish($1, '{\"keep\": true}'); ", &[&d])
        .unwrap();
    assert_eq!(
        dlq.take(1, Duration::from_secs(10))[0].body_text(),
        r#"{"keep": false}"#
    );
    let statuses: Vec<String> = wait_for("two received", Duration::from_secs(10), || {
        let r = received(&mut c, &name);
        (r.len() == 2).then(|| r.into_iter().map(|x| x.1).collect())
    });
    assert_eq!(statuses, ["discarded", "consumed"]);
    assert_eq!(effects(&mut c, "{\"keep\": false}"), 0);
    assert_eq!(effects(&mut c, "{\"keep\": true}"), 1);
    assert!(dlq.next(Duration::from_millis(300)).is_none());

    // A body that is not JSON: straight to the DLQ, the reason recorded.
    send_raw(
        &d,
        &[(&[("dop-msg-id", "not-json-1")], "this is { not json")],
    );
    assert_eq!(
        dlq.take(1, Duration::from_secs(10))[0].body_text(),
        "this is { not json"
    );
    let error: String = wait_for(
        "the malformed message recorded",
        Duration::from_secs(5),
        || {
            c.query_opt(
                "SELECT last_error FROM outbox.received WHERE message_id = 'not-json-1'",
                &[],
            )
            .unwrap()
            .map(|r| r.get(0))
        },
    );
    assert!(error.contains("not JSON"), "{error}");
    // JSON that jsonb cannot store (\u0000), with a NUL in a header: the
    // same, not a worker failing over and over.
    send_raw(
        &d,
        &[(
            &[("dop-msg-id", "nul-body-1"), ("note", "a\0b")],
            r#"{"a": "\u0000"}"#,
        )],
    );
    assert_eq!(
        dlq.take(1, Duration::from_secs(10))[0].body_text(),
        r#"{"a": "\u0000"}"#
    );
    wait_for("the NUL message recorded", Duration::from_secs(5), || {
        c.query_opt(
            "SELECT 1 FROM outbox.received WHERE message_id = 'nul-body-1' AND status = 'failed'",
            &[],
        )
        .unwrap()
    });
    // ... and the consumer keeps going.
    c.execute(
        "SELECT outbox.publish($1, '{\"keep\": true, \"after\": 1}')",
        &[&d],
    )
    .unwrap();
    wait_for("the next message", Duration::from_secs(10), || {
        (effects(&mut c, "%\"after\": 1%") == 1).then_some(())
    });
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
}

/// Messages that wait in the queue arrive together and share a
/// transaction: a raising and a rejecting callback among them must still
/// get their own outcome, the others one effect each, in queue order.
#[test]
fn a_backlog_with_failing_and_rejected_messages_keeps_each_outcome_and_the_order() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS ordered (n bigserial, sub text, i int);
         GRANT ALL ON ordered, ordered_n_seq TO PUBLIC;
         CREATE OR REPLACE FUNCTION mixed(m outbox.message) RETURNS boolean LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO ordered (sub, i) VALUES (m.headers->>'sub', (m.body->>'i')::int);
                    IF m.body->>'kind' = 'fail' THEN RAISE EXCEPTION 'fails on purpose'; END IF;
                    RETURN m.body->>'kind' <> 'reject'; END $$;",
    )
    .unwrap();
    let (d, q) = topic("mixed");
    let name = unique("mixed");
    // Subscribe once so the queue exists, then leave while it fills.
    subscribe(cl, &mut c, &name, &d, "mixed(outbox.message)");
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
    let mut dlq = Subscriber::with_headers(
        &format!("/queue/DLQ.{q}"),
        &[("durable", "true"), ("auto-delete", "false")],
    );
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('i', i, 'kind',
             CASE i % 10 WHEN 3 THEN 'fail' WHEN 7 THEN 'reject' ELSE 'ok' END),
             jsonb_build_object('sub', $2::text))
         FROM generate_series(1, 60) i",
        &[&d, &name],
    )
    .unwrap();
    outbox_pg_e2e::wait_drained(&mut c, Duration::from_secs(20));
    subscribe(cl, &mut c, &name, &d, "mixed(outbox.message)");
    let rows = wait_for("60 outcomes", Duration::from_secs(30), || {
        let r = received(&mut c, &name);
        (r.len() == 60 && r.iter().all(|x| x.1 != "failed" || x.2 == 3)).then_some(r)
    });
    let count = |status: &str, attempts: i32| {
        rows.iter()
            .filter(|r| r.1 == status && r.2 == attempts)
            .count()
    };
    assert_eq!(count("consumed", 1), 48, "{rows:?}");
    assert_eq!(count("discarded", 1), 6, "{rows:?}");
    assert_eq!(count("failed", 3), 6, "{rows:?}");
    // What persisted: the ok messages, once each, in order.
    let kept: Vec<i32> = c
        .query("SELECT i FROM ordered WHERE sub = $1 ORDER BY n", &[&name])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: Vec<i32> = (1..=60).filter(|i| i % 10 != 3 && i % 10 != 7).collect();
    assert_eq!(kept, expected);
    let mut dead: Vec<i64> = dlq
        .take(12, Duration::from_secs(10))
        .iter()
        .map(|m| {
            // jsonb text: {"i": 3, "kind": "fail"}
            let b = m.body_text();
            let digits = b["{\"i\": ".len()..].split(',').next().unwrap();
            digits.parse().unwrap()
        })
        .collect();
    dead.sort();
    let expected: Vec<i64> = (1..=60).filter(|i| i % 10 == 3 || i % 10 == 7).collect();
    assert_eq!(dead, expected);
    assert!(dlq.next(Duration::from_millis(300)).is_none());
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
}

/// Callbacks of one batch share a transaction, but what one sets (SET or
/// SET LOCAL) ends with its call: it reaches neither the next message nor
/// the worker's session.
#[test]
fn settings_a_callback_changes_do_not_reach_the_next_message() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS local_seen (sub text, seen text);
         GRANT ALL ON local_seen TO PUBLIC;
         CREATE OR REPLACE FUNCTION sets_local(m outbox.message) RETURNS void LANGUAGE plpgsql AS
           $$ BEGIN
                INSERT INTO local_seen VALUES (m.headers->>'sub', current_setting('outbox_test.seen', true));
                PERFORM set_config('outbox_test.seen', 'set by ' || (m.body->>'n'),
                                   (m.body->>'n')::int % 2 = 0);
              END $$;",
    )
    .unwrap();
    let (d, _) = topic("setlocal");
    let name = unique("setlocal");
    subscribe(cl, &mut c, &name, &d, "sets_local(outbox.message)");
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('n', i), jsonb_build_object('sub', $2::text))
         FROM generate_series(1, 10) i",
        &[&d, &name],
    )
    .unwrap();
    outbox_pg_e2e::wait_drained(&mut c, Duration::from_secs(20));
    subscribe(cl, &mut c, &name, &d, "sets_local(outbox.message)");
    let seen: Vec<Option<String>> = wait_for("10 callbacks", Duration::from_secs(20), || {
        let rows: Vec<Option<String>> = c
            .query("SELECT seen FROM local_seen WHERE sub = $1", &[&name])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        (rows.len() == 10).then_some(rows)
    });
    assert!(
        seen.iter().all(|s| s.as_deref().is_none_or(str::is_empty)),
        "{seen:?}"
    );
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
}

/// A consumer that never runs out of messages (a prefetch larger than its
/// batches keeps its socket full) still sees an unsubscribe within about a
/// second; what it had not handled stays in the queue.
#[test]
fn unsubscribe_stops_a_busy_consumer_and_loses_nothing() {
    let _b = broker::shared_broker();
    let settings: Vec<&str> = SETTINGS
        .iter()
        .map(|s| {
            if s.contains("prefetch-count") {
                r#"outbox.stomp_queue_headers = '{"durable":"true","auto-delete":"false","prefetch-count":"400","x-expires":"120000"}'"#
            } else {
                s
            }
        })
        .collect();
    let cl = &Cluster::start(&settings);
    let mut c = cl.client();
    c.batch_execute(
        "CREATE TABLE effects (subscription text, message_id text, body jsonb, who text);
         CREATE FUNCTION steady_effect(m outbox.message) RETURNS void LANGUAGE sql AS
           $$ SELECT pg_sleep(0.002); INSERT INTO effects VALUES ('steady', m.message_id, m.body, current_user) $$;",
    )
    .unwrap();
    let (d, _) = topic("busy");
    let name = unique("busy");
    subscribe(cl, &mut c, &name, &d, "steady_effect(outbox.message)");
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('busy', $2::text, 'i', i)) FROM generate_series(1, 3000) i",
        &[&d, &name],
    )
    .unwrap();
    let done = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM effects WHERE body->>'busy' = $1",
            &[&name],
        )
        .unwrap()
        .get(0)
    };
    wait_for("the consumer to be busy", Duration::from_secs(20), || {
        (done(&mut c) >= 100).then_some(())
    });
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
    let start = Instant::now();
    wait_for("the busy consumer to stop", Duration::from_secs(10), || {
        (consumers(&mut c, &name) == 0).then_some(())
    });
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "stopped after {:?}",
        start.elapsed()
    );
    let at_stop = done(&mut c);
    assert!(at_stop < 3000, "it stopped before the queue ran out");
    subscribe(cl, &mut c, &name, &d, "steady_effect(outbox.message)");
    wait_for("the rest", Duration::from_secs(60), || {
        (done(&mut c) == 3000).then_some(())
    });
    let distinct: i64 = c
        .query_one(
            "SELECT count(DISTINCT message_id) FROM effects WHERE body->>'busy' = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(distinct, 3000, "each message once");
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
}

#[test]
fn unsubscribe_stops_within_a_second_and_resubscribe_picks_up_the_backlog() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let (d, _) = topic("unsub");
    let name = unique("unsub");
    subscribe(cl, &mut c, &name, &d, "record_effect(outbox.message)");
    assert_eq!(consumers(&mut c, &name), 1);
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
    let start = Instant::now();
    wait_for("the consumer to stop", Duration::from_secs(3), || {
        (consumers(&mut c, &name) == 0).then_some(())
    });
    assert!(
        start.elapsed() < Duration::from_secs(1) + Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('unsub', i)) FROM generate_series(1, 10) i",
        &[&d],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(effects(&mut c, "{\"unsub\":%"), 0);
    c.execute(
        "SELECT outbox.subscribe($1, $2, 'record_effect(outbox.message)'::regprocedure)",
        &[&name, &d],
    )
    .unwrap();
    let start = Instant::now();
    wait_for("the consumer to start", Duration::from_secs(3), || {
        (consumers(&mut c, &name) == 1).then_some(())
    });
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "started in {:?}",
        start.elapsed()
    );
    wait_for("the backlog", Duration::from_secs(15), || {
        (effects(&mut c, "{\"unsub\":%") == 10).then_some(())
    });
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
}

#[test]
fn a_killed_consumer_restarts_and_loses_nothing() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let (d, _) = topic("kill");
    let name = unique("kill");
    subscribe(cl, &mut c, &name, &d, "record_effect(outbox.message)");
    let pid: i32 = c
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('kill', i)) FROM generate_series(1, 20) i",
        &[&d],
    )
    .unwrap();
    wait_for("a new consumer", Duration::from_secs(5), || {
        c.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND pid <> $2",
            &[&name, &pid],
        )
        .unwrap()
        .map(|_| ())
    });
    wait_for("all 20", Duration::from_secs(15), || {
        (effects(&mut c, "{\"kill\":%") == 20).then_some(())
    });
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
}

#[test]
fn callbacks_run_as_the_subscriptions_owner_and_cannot_escalate() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let admin = unique("admin");
    let outsider = unique("outsider");
    c.batch_execute(&format!(
        "CREATE ROLE {admin} LOGIN IN ROLE outbox_admin;
         CREATE ROLE {outsider} LOGIN;
         CREATE FUNCTION escalate_{admin}(m outbox.message) RETURNS void LANGUAGE plpgsql AS
           $$ BEGIN
                INSERT INTO effects VALUES ('who', m.message_id, m.body, current_user);
                IF m.body ? 'escalate' THEN
                  EXECUTE 'SET ROLE postgres';
                  INSERT INTO effects VALUES ('escalated', m.message_id, m.body, current_user);
                END IF;
              END $$;"
    ))
    .unwrap();
    // Not an admin: may not subscribe.
    let mut o = cl.connect("postgres", &outsider);
    let e = o
        .execute("SELECT outbox.subscribe('x', '/topic/x', 'record_effect(outbox.message)'::regprocedure)", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501");

    let mut a = cl.connect("postgres", &admin);
    // A callback of the wrong shape is refused at subscribe time.
    let e = a
        .execute(
            "SELECT outbox.subscribe('bad', '/topic/x', 'lower(text)'::regprocedure)",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42P13", "{e:?}");
    // Nobody writes the table directly (so nobody forges its owner):
    // only subscribe/unsubscribe do.
    for dml in [
        "INSERT INTO outbox.subscriptions (name, destination, callback, queue, owner) VALUES ('forged', '/topic/f', 'record_effect(outbox.message)', 'f', 'postgres')",
        "UPDATE outbox.subscriptions SET owner = 'postgres'",
        "DELETE FROM outbox.subscriptions",
    ] {
        let e = a.execute(dml, &[]).unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "{dml}: {e:?}");
    }

    let (d, _) = topic("owner");
    let name = unique("owner");
    a.execute(
        "SELECT outbox.subscribe($1, $2, $3::text::regprocedure)",
        &[&name, &d, &format!("escalate_{admin}(outbox.message)")],
    )
    .unwrap();
    let line = format!("outbox consumer \"{name}\": subscribed to {d}");
    wait_for(&line, Duration::from_secs(10), || {
        cl.log().contains(&line).then_some(())
    });
    c.execute("SELECT outbox.publish($1, '{\"owner\": 1}')", &[&d])
        .unwrap();
    c.execute(
        "SELECT outbox.publish($1, '{\"owner\": 2, \"escalate\": true}')",
        &[&d],
    )
    .unwrap();
    let who: String = wait_for("the callback", Duration::from_secs(10), || {
        c.query_opt(
            "SELECT who FROM effects WHERE subscription = 'who' AND body->>'owner' = '1'",
            &[],
        )
        .unwrap()
        .map(|r| r.get(0))
    });
    assert_eq!(who, admin, "the callback ran as the subscription's owner");
    wait_for(
        "the escalation attempt to fail",
        Duration::from_secs(15),
        || {
            let r = c
            .query_opt(
                "SELECT status::text, last_error FROM outbox.received r WHERE subscription = $1 AND body->>'owner' = '2'",
                &[&name],
            )
            .unwrap()?;
            (r.get::<_, String>(0) == "failed").then_some(())
        },
    );
    let escalated: i64 = c
        .query_one(
            "SELECT count(*) FROM effects WHERE subscription = 'escalated'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(escalated, 0, "SET ROLE inside a callback is refused");
    a.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
}

#[test]
fn consumers_resume_after_a_postgres_restart_and_a_broker_outage() {
    let _b = broker::exclusive_broker();
    let cl = Cluster::start(SETTINGS);
    cl.execute(
        "postgres",
        "CREATE TABLE got (body jsonb);
         CREATE FUNCTION keep(m outbox.message) RETURNS void LANGUAGE sql AS $$ INSERT INTO got VALUES (m.body) $$;",
    );
    let mut c = cl.client();
    let (d, _) = topic("resume");
    let name = unique("resume");
    subscribe(&cl, &mut c, &name, &d, "keep(outbox.message)");
    let got =
        |c: &mut Client| -> i64 { c.query_one("SELECT count(*) FROM got", &[]).unwrap().get(0) };

    cl.restart("immediate");
    let mut c = cl.client();
    wait_for(
        "the consumer after the restart",
        Duration::from_secs(10),
        || {
            c.query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )
            .unwrap()
        },
    );
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('n', i)) FROM generate_series(1, 10) i",
        &[&d],
    )
    .unwrap();
    wait_for("10 after the restart", Duration::from_secs(15), || {
        (got(&mut c) == 10).then_some(())
    });

    broker::rabbitmqctl(&["stop_app"]);
    std::thread::sleep(Duration::from_secs(1));
    broker::rabbitmqctl(&["start_app"]);
    broker::wait_until_up();
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('n', i)) FROM generate_series(11, 20) i",
        &[&d],
    )
    .unwrap();
    wait_for("10 more after the outage", Duration::from_secs(30), || {
        (got(&mut c) == 20).then_some(())
    });
    assert!(
        cl.log()
            .contains(&format!("outbox consumer \"{name}\": connection")),
        "the outage was logged"
    );
}

#[test]
fn more_subscriptions_than_max_consumers_is_a_clear_error() {
    let cl = Cluster::start(&["outbox.max_consumers = 1"]);
    cl.execute(
        "postgres",
        "CREATE FUNCTION nothing(m outbox.message) RETURNS void LANGUAGE sql AS $$ SELECT $$;
         SELECT outbox.subscribe('one', '/topic/one', 'nothing(outbox.message)');",
    );
    let mut c = cl.client();
    let e = c
        .execute(
            "SELECT outbox.subscribe('two', '/topic/two', 'nothing(outbox.message)')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "53400", "{e:?}");
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .contains("outbox.max_consumers")
    );
    // Changing the existing one is fine.
    c.execute(
        "SELECT outbox.subscribe('one', '/topic/one2', 'nothing(outbox.message)')",
        &[],
    )
    .unwrap();
}

#[test]
fn a_queue_with_other_arguments_is_reported_clearly() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let q = unique("argq");
    // A queue declared beforehand without the dead-letter arguments.
    drop(Subscriber::with_headers(
        &format!("/queue/{q}"),
        &[
            ("durable", "true"),
            ("auto-delete", "false"),
            ("x-expires", "120000"),
        ],
    ));
    let name = unique("argsub");
    c.execute(
        "SELECT outbox.subscribe($1, $2, 'record_effect(outbox.message)'::regprocedure, $3)",
        &[&name, &format!("/queue/{q}"), &q],
    )
    .unwrap();
    let line = format!("outbox consumer \"{name}\": queue {q} exists with other arguments");
    wait_for(&line, Duration::from_secs(10), || {
        cl.log().contains(&line).then_some(())
    });
    assert!(cl.log().contains("so the broker refused to subscribe"));
    let (state, error): (String, String) = wait_for("the status", Duration::from_secs(5), || {
        c.query_opt(
            "SELECT state, last_error FROM outbox.status WHERE name = $1",
            &[&name],
        )
        .unwrap()
        .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
    });
    assert_eq!(state, "backing off");
    assert!(error.contains("other arguments"), "{error}");
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
}
