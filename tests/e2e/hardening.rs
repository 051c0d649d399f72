//! Hosting other people's code on other people's data (issue #12, SPEC
//! §2.3, §4, §5): nothing a producer sends or a callback does stops a
//! subscription, escalates, or makes a worker deaf.

use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use outbox_pg_e2e::broker::{self, Subscriber, send_raw};
use outbox_pg_e2e::cluster::{describe, sqlstate};
use outbox_pg_e2e::{Cluster, unique, wait_for};
use postgres::{Client, NoTls};

/// Test queues disappear two minutes after their consumer left.
const QUEUE_HEADERS: &str = r#"outbox.stomp_queue_headers = '{"durable":"true","auto-delete":"false","prefetch-count":"20","x-expires":"120000"}'"#;

const SETTINGS: &[&str] = &[
    // RabbitMQ drops a client that is silent for about three seconds.
    "outbox.stomp_heartbeats = '1000,1000'",
    "outbox.maximum_retry_attempts = 3",
    "outbox.maximum_backoff = '500ms'",
    "outbox.max_consumers = 32",
    QUEUE_HEADERS,
];

/// What a subscriber to a dead-letter queue must declare to match it.
const DLQ_HEADERS: &[(&str, &str)] = &[("durable", "true"), ("auto-delete", "false")];

/// `slow` counts its starts in the sequence named by `seq` (not rolled
/// back), writes an effect, then waits up to `wait_ms` unless a row for its
/// tag is in `released`; from start number `sleep_starts + 1` on it does
/// not wait at all.
const SETUP: &str = "
    CREATE TABLE effects (tag text, message_id text, body jsonb, who text);
    CREATE TABLE released (tag text);
    GRANT ALL ON effects, released TO PUBLIC;
    CREATE FUNCTION record_effect(m outbox.message) RETURNS void LANGUAGE sql AS
      $$ INSERT INTO effects VALUES (m.body->>'tag', m.message_id, m.body, current_user) $$;
    CREATE FUNCTION slow(m outbox.message) RETURNS void LANGUAGE plpgsql AS $$
    DECLARE
      n bigint := nextval((m.body->>'seq')::regclass);
    BEGIN
      INSERT INTO effects VALUES (m.body->>'tag', m.message_id, m.body, current_user);
      IF n > coalesce((m.body->>'sleep_starts')::bigint, 1000000) THEN
        RETURN;
      END IF;
      FOR i IN 1 .. coalesce((m.body->>'wait_ms')::int, 0) / 100 LOOP
        EXIT WHEN EXISTS (SELECT 1 FROM released r WHERE r.tag = m.body->>'tag');
        PERFORM pg_sleep(0.1);
      END LOOP;
    END $$;";

fn start(settings: &[&str]) -> Cluster {
    let c = Cluster::start(settings);
    c.execute("postgres", SETUP);
    c
}

/// The cluster of this file's tests that need nothing of their own.
fn shared() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    outbox_pg_e2e::shared_cluster(&C, || start(SETTINGS))
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
    .unwrap_or_else(|e| panic!("subscribe {name}: {}", describe(&e)));
    wait_subscribed(cl, name, destination, Duration::from_secs(10));
}

fn wait_subscribed(cl: &Cluster, name: &str, destination: &str, timeout: Duration) {
    let line = format!("outbox consumer \"{name}\": subscribed to {destination}");
    wait_for(&line, timeout, || cl.log().contains(&line).then_some(()));
}

/// Runs its closure when dropped (cleanup that must happen on failure too).
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Best-effort cleanup statements (never panics: it may run while a test
/// panics).
fn cleanup<'a>(cl: &'a Cluster, sql: String) -> OnDrop<impl FnMut() + 'a> {
    OnDrop(move || {
        if let Ok(mut c) = Client::connect(&cl.url("postgres", "postgres"), NoTls) {
            let _ = c.batch_execute(&sql);
        }
    })
}

fn unsubscribe_later<'a>(cl: &'a Cluster, name: &str) -> OnDrop<impl FnMut() + 'a> {
    cleanup(cl, format!("SELECT outbox.unsubscribe('{name}')"))
}

/// The pid of the consumer serving `name`, if one runs.
fn consumer_pid(c: &mut Client, name: &str) -> Option<i32> {
    c.query_opt(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox consumer' AND application_name = $1",
        &[&name],
    )
    .unwrap()
    .map(|r| r.get(0))
}

fn wait_consumer(c: &mut Client, name: &str) -> i32 {
    wait_for("the consumer", Duration::from_secs(10), || {
        consumer_pid(c, name)
    })
}

/// Waits until `pid` sleeps in pg_sleep (inside a callback).
fn wait_sleeping(c: &mut Client, pid: i32) {
    wait_for(
        "the callback to sleep",
        Duration::from_secs(15),
        || -> Option<()> {
            let event: Option<String> = c
                .query_opt(
                    "SELECT wait_event FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .unwrap()?
                .get(0);
            (event.as_deref() == Some("PgSleep")).then_some(())
        },
    );
}

fn effects(c: &mut Client, tag: &str) -> i64 {
    c.query_one("SELECT count(*) FROM effects WHERE tag = $1", &[&tag])
        .unwrap()
        .get(0)
}

/// How often `slow` started for the sequence `seq`.
fn starts(c: &mut Client, seq: &str) -> i64 {
    c.query_one(
        &format!("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {seq}"),
        &[],
    )
    .unwrap()
    .get(0)
}

/// (message_id, status, attempts, last_error) of a subscription's rows.
fn received(c: &mut Client, sub: &str) -> Vec<(String, String, i32, Option<String>)> {
    c.query(
        "SELECT message_id, status::text, attempts, last_error FROM outbox.received WHERE subscription = $1 ORDER BY id",
        &[&sub],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// A raw message: its extra headers and its body bytes.
type Raw<'a> = (&'a [(&'a str, &'a str)], &'a [u8]);

/// A body for `slow`.
fn slow_body(tag: &str, seq: &str, wait_ms: u32, sleep_starts: Option<u32>) -> String {
    let limit = sleep_starts.map_or(String::new(), |n| format!(r#", "sleep_starts": {n}"#));
    format!(r#"{{"tag": "{tag}", "seq": "{seq}", "wait_ms": {wait_ms}{limit}}}"#)
}

/// Item 1: bodies jsonb refuses (a number out of range, a lone surrogate),
/// a body that is not JSON and one that is not UTF-8: each recorded
/// `failed` with its reason and no body, dead-lettered at once; the good
/// message behind them runs, and the worker never exited.
#[test]
fn poison_bodies_are_dead_lettered_at_once_and_the_consumer_keeps_running() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let (d, q) = topic("poison");
    let name = unique("poison");
    let mut dlq = Subscriber::with_headers(&format!("/queue/DLQ.{q}"), DLQ_HEADERS);
    subscribe(cl, &mut c, &name, &d, "record_effect(outbox.message)");
    let _u = unsubscribe_later(cl, &name);
    let pid = wait_consumer(&mut c, &name);

    let poison: [&[u8]; 4] = [
        br#"{"x": 1e200000}"#,
        br#"{"x": "\ud800"}"#,
        b"this is { not json",
        b"{\"x\": \"\xff\xfe\"}",
    ];
    let ids: Vec<String> = (0..poison.len())
        .map(|i| unique(&format!("poison{i}")))
        .collect();
    let tag = unique("after-poison");
    let good = format!(r#"{{"tag": "{tag}"}}"#);
    let good_id = unique("good");
    let headers: Vec<[(&str, &str); 1]> = ids
        .iter()
        .chain([&good_id])
        .map(|id| [("dop-msg-id", id.as_str())])
        .collect();
    let bodies: Vec<&[u8]> = poison.iter().copied().chain([good.as_bytes()]).collect();
    let messages: Vec<Raw> = headers
        .iter()
        .zip(&bodies)
        .map(|(h, b)| (&h[..], *b))
        .collect();
    let sent = Instant::now();
    send_raw(&d, &messages);
    wait_for(
        "the good message behind the poison",
        Duration::from_secs(10),
        || (effects(&mut c, &tag) == 1).then_some(()),
    );
    assert!(
        sent.elapsed() < Duration::from_millis(2500),
        "the good message ran {:?} after it was sent",
        sent.elapsed()
    );
    let mut dead: Vec<Vec<u8>> = dlq
        .take(poison.len(), Duration::from_secs(5))
        .into_iter()
        .map(|f| f.body)
        .collect();
    dead.sort();
    let mut expected: Vec<Vec<u8>> = poison.iter().map(|b| b.to_vec()).collect();
    expected.sort();
    assert_eq!(dead, expected, "every poison body is in DLQ.{q}, once");
    assert!(dlq.next(Duration::from_millis(300)).is_none());

    for (id, body) in ids.iter().zip(poison) {
        let row = c
            .query_opt(
                "SELECT status::text, last_error, body IS NULL, attempts FROM outbox.received WHERE message_id = $1",
                &[id],
            )
            .unwrap()
            .unwrap_or_else(|| panic!("no inbox row for {}", String::from_utf8_lossy(body)));
        let (status, error, no_body): (String, Option<String>, bool) =
            (row.get(0), row.get(1), row.get(2));
        let what = String::from_utf8_lossy(body);
        assert_eq!(status, "failed", "{what}");
        assert!(
            error.as_deref().is_some_and(|e| !e.trim().is_empty()),
            "{what}: the reason is recorded: {error:?}"
        );
        assert!(no_body, "{what}: body is NULL");
    }
    let good_status: String = c
        .query_one(
            "SELECT status::text FROM outbox.received WHERE message_id = $1",
            &[&good_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(good_status, "consumed");
    assert_eq!(
        consumer_pid(&mut c, &name),
        Some(pid),
        "the consumer never exited"
    );
}

/// Item 2a: outbox_admin members write subscriptions only through
/// subscribe/unsubscribe.
#[test]
fn subscriptions_are_written_only_through_subscribe_and_unsubscribe() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let admin = unique("wradmin");
    c.batch_execute(&format!("CREATE ROLE {admin} LOGIN IN ROLE outbox_admin"))
        .unwrap();
    let mut a = cl.connect("postgres", &admin);
    let name = unique("direct");
    for sql in [
        format!(
            "INSERT INTO outbox.subscriptions (name, destination, callback, queue, owner)
             VALUES ('{name}', '/topic/{name}', 'record_effect(outbox.message)', '{name}', '{admin}')"
        ),
        format!("UPDATE outbox.subscriptions SET destination = '/topic/elsewhere' WHERE name = '{name}'"),
        format!("DELETE FROM outbox.subscriptions WHERE name = '{name}'"),
    ] {
        // Rolled back whatever happens: a forged row must not start a worker.
        let mut tx = a.transaction().unwrap();
        let r = tx.batch_execute(&sql);
        tx.rollback().unwrap();
        match r {
            Ok(()) => panic!("an outbox_admin member may run: {sql}"),
            Err(e) => assert_eq!(sqlstate(&e), "42501", "{sql}: {}", describe(&e)),
        }
    }

    let (d, _) = topic("viafn");
    subscribe(cl, &mut a, &name, &d, "record_effect(outbox.message)");
    let _u = unsubscribe_later(cl, &name);
    let owner: String = c
        .query_one(
            "SELECT owner::text FROM outbox.subscriptions WHERE name = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(owner, admin);
    a.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap_or_else(|e| panic!("unsubscribe: {}", describe(&e)));
    wait_for("the consumer to stop", Duration::from_secs(5), || {
        consumer_pid(&mut c, &name).is_none().then_some(())
    });
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.subscriptions WHERE name = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

/// Item 2b: EXECUTE revoked from the subscription's owner (and PUBLIC):
/// the next message is not run, stays in its queue, and the status and the
/// log say why; granted again, it is consumed.
#[test]
fn a_callback_revoked_from_its_owner_runs_nothing_until_granted_again() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let r = unique("cbowner");
    let f = format!("cb_{r}(outbox.message)");
    c.batch_execute(&format!(
        "CREATE ROLE {r} LOGIN IN ROLE outbox_admin;
         CREATE FUNCTION cb_{r}(m outbox.message) RETURNS void LANGUAGE sql AS
           $$ INSERT INTO effects VALUES (m.body->>'tag', m.message_id, m.body, current_user) $$;
         REVOKE EXECUTE ON FUNCTION {f} FROM PUBLIC;
         GRANT EXECUTE ON FUNCTION {f} TO {r};"
    ))
    .unwrap();
    let mut rc = cl.connect("postgres", &r);
    let (d, q) = topic("revoke");
    let name = unique("revoke");
    subscribe(cl, &mut rc, &name, &d, &f);
    let _u = unsubscribe_later(cl, &name);

    let before = unique("before");
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('tag', $2::text))",
        &[&d, &before],
    )
    .unwrap();
    wait_for("the first message", Duration::from_secs(10), || {
        (effects(&mut c, &before) == 1).then_some(())
    });

    c.batch_execute(&format!(
        "REVOKE EXECUTE ON FUNCTION {f} FROM {r}; REVOKE EXECUTE ON FUNCTION {f} FROM PUBLIC;"
    ))
    .unwrap();
    let after = unique("after");
    let id: String = c
        .query_one(
            "SELECT outbox.publish($1, jsonb_build_object('tag', $2::text))::text",
            &[&d, &after],
        )
        .unwrap()
        .get(0);
    wait_for("the publisher to deliver", Duration::from_secs(10), || {
        c.query_opt(
            "SELECT 1 FROM outbox.published WHERE message_id::text = $1 AND status = 'published'",
            &[&id],
        )
        .unwrap()
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        effects(&mut c, &after),
        0,
        "the callback ran although its owner lost EXECUTE"
    );
    let consumed: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.received WHERE message_id = $1 AND status = 'consumed'",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(consumed, 0);
    let error = wait_for(
        "the refusal in outbox.status",
        Duration::from_secs(10),
        || {
            let e: Option<String> = c
                .query_opt(
                    "SELECT last_error FROM outbox.status WHERE name = $1",
                    &[&name],
                )
                .unwrap()?
                .get(0);
            e.filter(|e| e.contains("permission denied"))
        },
    );
    assert!(
        cl.log().lines().any(|l| l.contains(&name)
            && (l.contains("permission denied") || l.contains(error.as_str()))),
        "the log says why (status: {error})"
    );
    assert_eq!(
        broker::queue_depth(&q),
        Some(1),
        "the message waits in its queue"
    );
    assert!(
        matches!(broker::queue_depth(&format!("DLQ.{q}")), None | Some(0)),
        "nothing was dead-lettered"
    );

    c.batch_execute(&format!("GRANT EXECUTE ON FUNCTION {f} TO {r}"))
        .unwrap();
    wait_for(
        "the message after the GRANT",
        Duration::from_secs(10),
        || (effects(&mut c, &after) == 1).then_some(()),
    );
    let who: String = c
        .query_one("SELECT who FROM effects WHERE tag = $1", &[&after])
        .unwrap()
        .get(0);
    assert_eq!(who, r);
}

/// Item 2c: a SECURITY DEFINER callback owned by the superuser, on which
/// the subscriber has no EXECUTE, can be named neither through subscribe
/// nor by writing the row.
#[test]
fn a_security_definer_callback_its_owner_may_not_execute_is_refused() {
    let cl = shared();
    let mut c = cl.client();
    let r = unique("definer");
    let f = format!("def_{r}(outbox.message)");
    c.batch_execute(&format!(
        "CREATE ROLE {r} LOGIN IN ROLE outbox_admin;
         CREATE FUNCTION def_{r}(m outbox.message) RETURNS void LANGUAGE sql SECURITY DEFINER AS
           $$ INSERT INTO effects VALUES ('definer', m.message_id, m.body, current_user) $$;
         REVOKE EXECUTE ON FUNCTION {f} FROM PUBLIC;"
    ))
    .unwrap();
    let mut rc = cl.connect("postgres", &r);
    let name = unique("definer");
    let e = rc
        .execute(
            "SELECT outbox.subscribe($1, '/topic/definer', $2::text::regprocedure)",
            &[&name, &f],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{}", describe(&e));
    let mut tx = rc.transaction().unwrap();
    let res = tx.batch_execute(&format!(
        "INSERT INTO outbox.subscriptions (name, destination, callback, queue, owner)
         VALUES ('{name}', '/topic/definer', '{f}', 'definer', '{r}')"
    ));
    tx.rollback().unwrap();
    match res {
        Ok(()) => panic!("{r} wrote a subscription naming {f} directly"),
        Err(e) => assert_eq!(sqlstate(&e), "42501", "{}", describe(&e)),
    }
}

/// Item 2d: a serializer whose EXECUTE is revoked while the inserting
/// session stays open is refused at that session's next insert.
#[test]
fn a_serializer_revoked_during_a_session_is_refused_at_its_next_insert() {
    let cl = shared();
    let mut c = cl.client();
    let t = unique("serrev");
    let u = unique("serwriter");
    let d = format!("/topic/{t}");
    c.batch_execute(&format!(
        "CREATE TABLE {t} (id int);
         CREATE FUNCTION {t}_ser(r {t}) RETURNS jsonb LANGUAGE sql AS $$ SELECT jsonb_build_object('id', r.id) $$;
         CREATE TRIGGER tg AFTER INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION outbox.publish('{d}', 'serializer={t}_ser');
         CREATE ROLE {u} LOGIN;
         GRANT INSERT ON {t} TO {u};"
    ))
    .unwrap();
    let count = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM outbox.published WHERE destination = $1",
            &[&d],
        )
        .unwrap()
        .get(0)
    };
    let mut w = cl.connect("postgres", &u);
    w.batch_execute(&format!("INSERT INTO {t} VALUES (1)"))
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert_eq!(count(&mut c), 1);
    c.batch_execute(&format!(
        "REVOKE EXECUTE ON FUNCTION {t}_ser({t}) FROM PUBLIC; REVOKE EXECUTE ON FUNCTION {t}_ser({t}) FROM {u};"
    ))
    .unwrap();
    match w.batch_execute(&format!("INSERT INTO {t} VALUES (2)")) {
        Ok(()) => panic!("the same session still ran the revoked serializer"),
        Err(e) => assert_eq!(sqlstate(&e), "42501", "{}", describe(&e)),
    }
    assert_eq!(count(&mut c), 1, "nothing published by the refused insert");
    c.batch_execute(&format!("GRANT EXECUTE ON FUNCTION {t}_ser({t}) TO {u}"))
        .unwrap();
    w.batch_execute(&format!("INSERT INTO {t} VALUES (3)"))
        .unwrap_or_else(|e| panic!("granted again: {}", describe(&e)));
    assert_eq!(count(&mut c), 2);
}

/// Item 3: with 1 s heart-beats a callback of 8 s runs once (the broker
/// keeps the session; no message id, so a redelivery would look new).
#[test]
fn a_long_callback_runs_once_while_heart_beats_go_on() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let tag = unique("long");
    let seq = format!("{tag}_started");
    c.batch_execute(&format!("CREATE SEQUENCE {seq}")).unwrap();
    let (d, q) = topic("long");
    let name = unique("long");
    subscribe(cl, &mut c, &name, &d, "slow(outbox.message)");
    let _u = unsubscribe_later(cl, &name);
    send_raw(&d, &[(&[], slow_body(&tag, &seq, 8000, None).as_bytes())]);
    wait_for("the callback's effect", Duration::from_secs(20), || {
        (effects(&mut c, &tag) >= 1).then_some(())
    });
    // A lost session shows within a few seconds as a second start.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(starts(&mut c, &seq), 1, "the callback started once");
    assert_eq!(effects(&mut c, &tag), 1);
    let rows = received(&mut c, &name);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("consumed", 1), "{rows:?}");
    wait_for("the queue to be empty", Duration::from_secs(5), || {
        (broker::queue_depth(&q) == Some(0)).then_some(())
    });
}

/// Item 3: past outbox.callback_timeout a callback is cancelled and counts
/// as a failed attempt; after maximum_retry_attempts it is dead-lettered.
#[test]
fn a_callback_past_callback_timeout_is_cancelled_and_dead_lettered() {
    let _b = broker::shared_broker();
    let cl = start(&[
        "outbox.callback_timeout = '1s'",
        "outbox.maximum_retry_attempts = 2",
        "outbox.maximum_backoff = '500ms'",
        QUEUE_HEADERS,
    ]);
    let mut c = cl.client();
    let tag = unique("timeout");
    let seq = format!("{tag}_started");
    c.batch_execute(&format!("CREATE SEQUENCE {seq}")).unwrap();
    let (d, q) = topic("timeout");
    let name = unique("timeout");
    let mut dlq = Subscriber::with_headers(&format!("/queue/DLQ.{q}"), DLQ_HEADERS);
    subscribe(&cl, &mut c, &name, &d, "slow(outbox.message)");
    let id = unique("timeout-id");
    let body = slow_body(&tag, &seq, 30_000, None);
    let sent = Instant::now();
    send_raw(&d, &[(&[("dop-msg-id", &id)], body.as_bytes())]);
    let (attempts, error) = wait_for(
        "the second attempt to fail",
        Duration::from_secs(10),
        || {
            let r = c
                .query_opt(
                    "SELECT attempts, last_error FROM outbox.received WHERE message_id = $1 AND status = 'failed'",
                    &[&id],
                )
                .unwrap()?;
            let (attempts, error): (i32, Option<String>) = (r.get(0), r.get(1));
            (attempts >= 2).then_some((attempts, error.unwrap_or_default()))
        },
    );
    assert_eq!(attempts, 2);
    assert!(error.contains("callback_timeout"), "{error}");
    let dead = dlq.take(1, Duration::from_secs(10)).remove(0);
    assert_eq!(dead.body_text(), body);
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "dead-lettered after {:?}",
        sent.elapsed()
    );
    assert_eq!(effects(&mut c, &tag), 0, "each attempt rolled back");
    assert_eq!(starts(&mut c, &seq), 2);
}

/// Item 4a: pg_terminate_backend stops a consumer inside a callback at
/// once; its transaction rolls back and the redelivered message takes
/// effect once.
#[test]
fn terminate_stops_a_consumer_inside_a_callback_and_the_message_takes_effect_once() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let tag = unique("term");
    let seq = format!("{tag}_started");
    c.batch_execute(&format!("CREATE SEQUENCE {seq}")).unwrap();
    let (d, _) = topic("term");
    let name = unique("term");
    subscribe(cl, &mut c, &name, &d, "slow(outbox.message)");
    let _u = unsubscribe_later(cl, &name);
    let _release = cleanup(cl, format!("INSERT INTO released VALUES ('{tag}')"));
    let id = unique("term-id");
    send_raw(
        &d,
        &[(
            &[("dop-msg-id", &id)],
            slow_body(&tag, &seq, 60_000, None).as_bytes(),
        )],
    );
    let pid = wait_consumer(&mut c, &name);
    wait_sleeping(&mut c, pid);
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    let t = Instant::now();
    wait_for("the consumer to exit", Duration::from_secs(5), || {
        c.query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .unwrap()
            .is_none()
            .then_some(())
    });
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "exited after {:?}",
        t.elapsed()
    );
    wait_for("a new consumer", Duration::from_secs(10), || {
        consumer_pid(&mut c, &name).filter(|p| *p != pid)
    });
    c.execute("INSERT INTO released VALUES ($1)", &[&tag])
        .unwrap();
    wait_for("the redelivered message", Duration::from_secs(15), || {
        c.query_opt(
            "SELECT 1 FROM outbox.received WHERE message_id = $1 AND status = 'consumed'",
            &[&id],
        )
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        effects(&mut c, &tag),
        1,
        "the terminated attempt's effect was rolled back"
    );
    assert!(starts(&mut c, &seq) >= 2, "the message was redelivered");
}

/// Item 4b: pg_cancel_backend cancels the running callback: a failed
/// attempt, retried (the retry does not sleep) and consumed; the worker
/// stays.
#[test]
fn cancel_fails_the_running_callback_and_the_retry_consumes() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let tag = unique("cancel");
    let seq = format!("{tag}_started");
    c.batch_execute(&format!("CREATE SEQUENCE {seq}")).unwrap();
    let (d, _) = topic("cancel");
    let name = unique("cancel");
    subscribe(cl, &mut c, &name, &d, "slow(outbox.message)");
    let _u = unsubscribe_later(cl, &name);
    let _release = cleanup(cl, format!("INSERT INTO released VALUES ('{tag}')"));
    let id = unique("cancel-id");
    send_raw(
        &d,
        &[(
            &[("dop-msg-id", &id)],
            slow_body(&tag, &seq, 60_000, Some(1)).as_bytes(),
        )],
    );
    let pid = wait_consumer(&mut c, &name);
    wait_sleeping(&mut c, pid);
    c.execute("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
    let t = Instant::now();
    let attempts: i32 = wait_for("the retry to consume", Duration::from_secs(10), || {
        c.query_opt(
            "SELECT attempts FROM outbox.received WHERE message_id = $1 AND status = 'consumed'",
            &[&id],
        )
        .unwrap()
        .map(|r| r.get(0))
    });
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "consumed {:?} after the cancel",
        t.elapsed()
    );
    assert_eq!(attempts, 2, "the cancelled call was a failed attempt");
    assert_eq!(starts(&mut c, &seq), 2);
    assert_eq!(
        effects(&mut c, &tag),
        1,
        "the cancelled attempt's effect was rolled back"
    );
    assert_eq!(
        consumer_pid(&mut c, &name),
        Some(pid),
        "a cancel does not end the worker"
    );
}

/// Item 4c: a fast shutdown does not wait for a callback; after the
/// restart the message is redelivered and takes effect once.
#[test]
fn a_fast_shutdown_does_not_wait_for_a_callback() {
    let _b = broker::shared_broker();
    let cl = start(SETTINGS);
    let mut c = cl.client();
    let tag = unique("shutdown");
    let seq = format!("{tag}_started");
    c.batch_execute(&format!("CREATE SEQUENCE {seq}")).unwrap();
    let (d, _) = topic("shutdown");
    let name = unique("shutdown");
    subscribe(&cl, &mut c, &name, &d, "slow(outbox.message)");
    let id = unique("shutdown-id");
    send_raw(
        &d,
        &[(
            &[("dop-msg-id", &id)],
            slow_body(&tag, &seq, 60_000, Some(1)).as_bytes(),
        )],
    );
    let pid = wait_consumer(&mut c, &name);
    wait_sleeping(&mut c, pid);
    drop(c);
    let t = Instant::now();
    let stopped = std::panic::catch_unwind(AssertUnwindSafe(|| {
        cl.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "10"])
    }));
    let took = t.elapsed();
    assert!(
        stopped.is_ok() && took < Duration::from_secs(3),
        "pg_ctl stop -m fast took {took:?} (ok: {})",
        stopped.is_ok()
    );
    cl.pg_ctl(&["start", "-w", "-t", "60"]);
    let mut c = cl.client();
    // The redelivery must not wait (it should not anyway: its start is the second).
    c.execute("INSERT INTO released VALUES ($1)", &[&tag])
        .unwrap();
    wait_for("the redelivered message", Duration::from_secs(20), || {
        c.query_opt(
            "SELECT 1 FROM outbox.received WHERE message_id = $1 AND status = 'consumed'",
            &[&id],
        )
        .unwrap()
    });
    assert_eq!(effects(&mut c, &tag), 1);
}

/// A cluster whose broker accepts TCP connections and never answers.
fn silent() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    outbox_pg_e2e::shared_cluster(&C, || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in listener.incoming().flatten() {
                held.push(s);
            }
        });
        Cluster::start(&[
            &format!("outbox.stomp_hosts = '{addr}'"),
            "outbox.stomp_connect_timeout = '5s'",
        ])
    })
}

/// Item 5: outbox.send() against a broker that never answers ends at
/// statement_timeout with 57014.
#[test]
fn send_ends_at_statement_timeout_against_a_silent_broker() {
    let mut c = silent().client();
    c.batch_execute("SET statement_timeout = '500ms'").unwrap();
    let t = Instant::now();
    let r = c.execute("SELECT outbox.send('/queue/x', '{}')", &[]);
    let took = t.elapsed();
    let e = r.expect_err("a send to a silent broker");
    assert_eq!(sqlstate(&e), "57014", "{} after {took:?}", describe(&e));
    assert!(took < Duration::from_millis(1500), "took {took:?}");
}

/// Item 5: pg_cancel_backend cancels outbox.send() waiting for a silent
/// broker.
#[test]
fn send_is_cancelled_by_pg_cancel_backend() {
    let mut c = silent().client();
    c.batch_execute("SET statement_timeout = 0").unwrap();
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let sending = std::thread::spawn(move || {
        c.execute("SELECT outbox.send('/queue/x', '{}')", &[])
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!sending.is_finished(), "the send waits for the broker");
    let t = Instant::now();
    silent()
        .client()
        .execute("SELECT pg_cancel_backend($1)", &[&pid])
        .unwrap();
    let r = sending.join().unwrap();
    let took = t.elapsed();
    let e = r.expect_err("a send to a silent broker");
    assert_eq!(sqlstate(&e), "57014", "{} after {took:?}", describe(&e));
    assert!(took < Duration::from_secs(1), "{took:?} after the cancel");
}

/// Item 6: the workers report their table changes to the statistics
/// system and their state to pg_stat_activity.
#[test]
fn workers_report_table_statistics_and_their_state() {
    let _b = broker::shared_broker();
    let cl = start(SETTINGS);
    let mut c = cl.client();
    let (d, _) = topic("stats");
    let name = unique("stats");
    subscribe(&cl, &mut c, &name, &d, "record_effect(outbox.message)");
    let tag = unique("stats");
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('tag', $2::text, 'i', i)) FROM generate_series(1, 200) i",
        &[&d, &tag],
    )
    .unwrap();
    wait_for("200 consumed", Duration::from_secs(30), || {
        (effects(&mut c, &tag) == 200).then_some(())
    });
    outbox_pg_e2e::wait_drained(&mut c, Duration::from_secs(10));
    let t = Instant::now();
    let (mut updated, mut inserted) = (0, 0);
    while t.elapsed() < Duration::from_secs(5) {
        c.batch_execute("SELECT pg_stat_clear_snapshot()").unwrap();
        let r = c
            .query_one(
                "SELECT (SELECT n_tup_upd + n_tup_hot_upd FROM pg_stat_user_tables
                          WHERE schemaname = 'outbox' AND relname = 'published'),
                        (SELECT n_tup_ins FROM pg_stat_user_tables
                          WHERE schemaname = 'outbox' AND relname = 'received')",
                &[],
            )
            .unwrap();
        (updated, inserted) = (r.get::<_, i64>(0), r.get::<_, i64>(1));
        if updated >= 200 && inserted >= 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        updated >= 200 && inserted >= 200,
        "after 200 deliveries and 200 receipts: outbox.published n_tup_upd(+hot) = {updated}, \
         outbox.received n_tup_ins = {inserted}"
    );
    let workers: Vec<(String, Option<String>)> = c
        .query(
            "SELECT backend_type, state FROM pg_stat_activity
             WHERE backend_type IN ('outbox publisher', 'outbox consumer') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for kind in ["outbox publisher", "outbox consumer"] {
        assert!(workers.iter().any(|w| w.0 == kind), "{kind}: {workers:?}");
    }
    assert!(
        workers.iter().all(|w| w.1.is_some()),
        "every worker shows a state: {workers:?}"
    );
}

/// Item 7: a serializer that inserts into a table with its own outbox
/// trigger, and a callback that publishes and inserts into such a table:
/// every message is written and delivered.
#[test]
fn serializers_and_callbacks_may_publish_in_turn() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let t = unique("reent");
    let (d, _) = topic("reent");
    let (d2, _) = topic("reentcb");
    let mut out = Subscriber::new(&d);
    let mut out2 = Subscriber::new(&d2);
    c.batch_execute(&format!(
        "CREATE TABLE {t}_a (id int); CREATE TABLE {t}_b (id int); CREATE TABLE {t}_c (id int);
         CREATE FUNCTION {t}_ser_b(r {t}_b) RETURNS jsonb LANGUAGE sql AS $$ SELECT jsonb_build_object('b', r.id) $$;
         CREATE FUNCTION {t}_ser_a(r {t}_a) RETURNS jsonb LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO {t}_b VALUES (r.id * 10); RETURN jsonb_build_object('a', r.id); END $$;
         CREATE TRIGGER tg AFTER INSERT ON {t}_a FOR EACH ROW EXECUTE FUNCTION outbox.publish('{d}', 'serializer={t}_ser_a');
         CREATE TRIGGER tg AFTER INSERT ON {t}_b FOR EACH ROW EXECUTE FUNCTION outbox.publish('{d}', 'serializer={t}_ser_b');
         CREATE TRIGGER tg AFTER INSERT ON {t}_c FOR EACH ROW EXECUTE FUNCTION outbox.publish('{d2}');
         CREATE FUNCTION {t}_cb(m outbox.message) RETURNS void LANGUAGE plpgsql AS
           $$ BEGIN
                PERFORM outbox.publish('{d2}', jsonb_build_object('from_callback', m.body->'n'));
                INSERT INTO {t}_c VALUES ((m.body->>'n')::int);
              END $$;"
    ))
    .unwrap();
    let bodies = |c: &mut Client, d: &str| -> Vec<String> {
        c.query(
            "SELECT body::text FROM outbox.published WHERE destination = $1 ORDER BY body::text",
            &[&d],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let delivered = |out: &mut Subscriber| -> Vec<String> {
        let mut got: Vec<String> = out
            .take(2, Duration::from_secs(10))
            .iter()
            .map(|f| f.body_text())
            .collect();
        got.sort();
        got
    };

    c.batch_execute(&format!("INSERT INTO {t}_a VALUES (1)"))
        .unwrap_or_else(|e| panic!("a serializer that inserts: {}", describe(&e)));
    assert_eq!(bodies(&mut c, &d), [r#"{"a": 1}"#, r#"{"b": 10}"#]);
    assert_eq!(delivered(&mut out), [r#"{"a": 1}"#, r#"{"b": 10}"#]);

    let (ds, _) = topic("reentsub");
    let name = unique("reentsub");
    subscribe(cl, &mut c, &name, &ds, &format!("{t}_cb(outbox.message)"));
    let _u = unsubscribe_later(cl, &name);
    c.execute("SELECT outbox.publish($1, '{\"n\": 7}')", &[&ds])
        .unwrap();
    let expected = [r#"{"from_callback": 7}"#, r#"{"id": 7}"#];
    wait_for(
        "the callback's two messages",
        Duration::from_secs(10),
        || (bodies(&mut c, &d2) == expected).then_some(()),
    );
    assert_eq!(delivered(&mut out2), expected);
    let status: Vec<(String, String, i32, Option<String>)> = received(&mut c, &name);
    assert_eq!(status.len(), 1, "{status:?}");
    assert_eq!(
        (status[0].1.as_str(), status[0].2),
        ("consumed", 1),
        "{status:?}"
    );
}

/// Item 8: a subscription made while the broker is down is subscribed
/// within seconds of the broker's return (its consumer is started at once,
/// and reconnects at its backoff, here capped at a second).
#[test]
fn a_subscription_made_while_the_broker_is_down_starts_when_it_returns() {
    let _b = broker::exclusive_broker();
    let cl = start(&[QUEUE_HEADERS, "outbox.maximum_backoff = '1s'"]);
    let mut c = cl.client();
    // The publisher is connected before the broker goes.
    c.execute("SELECT outbox.publish($1, '{}')", &[&topic("warm").0])
        .unwrap();
    outbox_pg_e2e::wait_drained(&mut c, Duration::from_secs(20));

    broker::rabbitmqctl(&["stop_app"]);
    let down = std::cell::Cell::new(true);
    let _restart = OnDrop(|| {
        if down.get() {
            broker::rabbitmqctl(&["start_app"]);
            broker::wait_until_up();
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let (d, _) = topic("away");
    let name = unique("away");
    c.execute(
        "SELECT outbox.subscribe($1, $2, 'record_effect(outbox.message)'::regprocedure)",
        &[&name, &d],
    )
    .unwrap();
    // Long enough for a reconnection backoff to reach its cap.
    std::thread::sleep(Duration::from_secs(8));
    broker::rabbitmqctl(&["start_app"]);
    broker::wait_until_up();
    down.set(false);
    let back = Instant::now();
    wait_subscribed(&cl, &name, &d, Duration::from_secs(60));
    assert!(
        back.elapsed() < Duration::from_secs(3),
        "subscribed {:?} after the broker came back",
        back.elapsed()
    );
    let tag = unique("away");
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('tag', $2::text))",
        &[&d, &tag],
    )
    .unwrap();
    wait_for("the first message", Duration::from_secs(10), || {
        (effects(&mut c, &tag) == 1).then_some(())
    });
}

/// Review: a consumer whose dead-letter queue holds messages keeps
/// resubscribing after a restart (declaring the DLQ raced with the dead
/// letters and the broker closed the connection at every connect), and a
/// callback that discards is called once for its attempt.
#[test]
fn a_full_dead_letter_queue_does_not_stop_a_restarted_consumer() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    c.batch_execute(
        "CREATE SEQUENCE IF NOT EXISTS discard_calls;
         CREATE OR REPLACE FUNCTION keep_or_discard(m outbox.message) RETURNS boolean LANGUAGE plpgsql AS
           $$ BEGIN PERFORM nextval('discard_calls');
                    INSERT INTO effects VALUES (m.body->>'tag', m.message_id, m.body, current_user);
                    RETURN (m.body->>'keep')::boolean; END $$;",
    )
    .unwrap();
    let (d, q) = topic("dlqfull");
    let name = unique("dlqfull");
    subscribe(cl, &mut c, &name, &d, "keep_or_discard(outbox.message)");
    let _gone = unsubscribe_later(cl, &name);
    let calls = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM discard_calls",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let before = calls(&mut c);
    let tag = unique("dlqfull");
    // One transaction: the three arrive together, as one batch.
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('tag', $2::text, 'keep', k)) FROM unnest(ARRAY[true, false, true]) k",
        &[&d, &tag],
    )
    .unwrap();
    wait_for("two kept, one discarded", Duration::from_secs(10), || {
        let r = received(&mut c, &name);
        (r.len() == 3 && r.iter().all(|x| x.1 != "failed")).then_some(())
    });
    let statuses: Vec<String> = received(&mut c, &name).into_iter().map(|r| r.1).collect();
    assert_eq!(statuses, ["consumed", "discarded", "consumed"]);
    assert_eq!(
        effects(&mut c, &tag),
        2,
        "the discarded message's work is rolled back"
    );
    // The discarding callback ran once; a message before it may have run
    // twice (its first run rolled back with the batch), none more.
    let n = calls(&mut c) - before;
    assert!((3..=4).contains(&n), "{n} calls for 3 messages");
    wait_for("the dead letter", Duration::from_secs(5), || {
        (broker::queue_depth(&format!("DLQ.{q}")) == Some(1)).then_some(())
    });
    // A new incarnation declares the DLQ while it holds a message.
    let pid = wait_consumer(&mut c, &name);
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    let tag2 = unique("dlqfull");
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('tag', $2::text, 'keep', true))",
        &[&d, &tag2],
    )
    .unwrap();
    wait_for(
        "the message after the restart",
        Duration::from_secs(10),
        || (effects(&mut c, &tag2) == 1).then_some(()),
    );
    let closed = cl.log().matches("Subscription not found").count();
    assert!(closed <= 1, "the broker closed {closed} connections");
    // The dead letter the new incarnation may have seen while declaring
    // the DLQ was not taken by the subscription's (cumulative) ACK.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        broker::queue_depth(&format!("DLQ.{q}")),
        Some(1),
        "the dead letter stays in DLQ.{q}"
    );
}

/// Review: a cancel that reaches a worker outside a callback has nothing
/// to cancel: the idle publisher and consumer keep running.
#[test]
fn a_cancel_outside_a_callback_leaves_the_workers_running() {
    let _b = broker::shared_broker();
    let cl = shared();
    let mut c = cl.client();
    let (d, _) = topic("idlecancel");
    let name = unique("idlecancel");
    subscribe(cl, &mut c, &name, &d, "record_effect(outbox.message)");
    let _gone = unsubscribe_later(cl, &name);
    let consumer = wait_consumer(&mut c, &name);
    let publisher: i32 = c
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox publisher'",
            &[],
        )
        .unwrap()
        .get(0);
    for pid in [consumer, publisher] {
        c.execute("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(consumer_pid(&mut c, &name), Some(consumer));
    let still: bool = c
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)",
            &[&publisher],
        )
        .unwrap()
        .get(0);
    assert!(still, "the publisher exited on a cancel");
    let tag = unique("idlecancel");
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('tag', $2::text))",
        &[&d, &tag],
    )
    .unwrap();
    wait_for("the message", Duration::from_secs(10), || {
        (effects(&mut c, &tag) == 1).then_some(())
    });
    assert!(!cl.log().contains("panicked"), "a worker panicked");
}
