//! Capture in the WAL (`outbox.capture = 'wal'`): messages written as
//! logical-decoding messages, read back by the publisher through its slot,
//! delivered with the same headers and order, and nothing lost when the
//! broker refuses, is away, or Postgres stops at the worst moment.

use std::collections::HashSet;
use std::time::Duration;

use outbox_pg_e2e::broker::{self, Subscriber};
use outbox_pg_e2e::cluster::sqlstate;
use outbox_pg_e2e::{Cluster, unique, wait_for};
use postgres::Client;

const SETTINGS: &[&str] = &[
    "wal_level = logical",
    "outbox.poll_interval = '1s'",
    "outbox.pause_for_retry = '200ms'",
    "outbox.wait_retry = '200ms'",
    "outbox.maximum_retry_attempts = 3",
    "outbox.maximum_backoff = '500ms'",
    "outbox.stomp_connect_timeout = '2s'",
    "outbox.wal_spill_after = '1s'",
];

/// A cluster with `wal_level = logical` whose publisher made its slot.
fn cluster(extra: &[&str]) -> Cluster {
    let cl = Cluster::start(&[SETTINGS, extra].concat());
    let mut c = cl.client();
    wait_for("the outbox slot", Duration::from_secs(20), || {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'outbox_pg_%' AND plugin = 'outbox_pg'",
                &[],
            )
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    });
    cl
}

fn wal_client(cl: &Cluster) -> Client {
    let mut c = cl.client();
    c.batch_execute("SET outbox.capture = 'wal'").unwrap();
    c
}

fn rows(c: &mut Client) -> i64 {
    c.query_one("SELECT count(*) FROM outbox.published", &[])
        .unwrap()
        .get(0)
}

/// The WAL written so far (a mark for `caught_up`).
fn mark(c: &mut Client) -> String {
    c.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0)
}

/// Whether the slot advanced to `mark`: everything captured before it is
/// confirmed or moved into the table. (Peeking from here would compete
/// with the publisher for the slot.)
fn caught_up(c: &mut Client, mark: &str) -> bool {
    c.query_one(
        "SELECT coalesce(bool_and(confirmed_flush_lsn >= $1::text::pg_lsn), false)
         FROM pg_replication_slots WHERE slot_name LIKE 'outbox_pg_%'",
        &[&mark],
    )
    .unwrap()
    .get(0)
}

fn wait_caught_up(c: &mut Client, mark: &str) {
    wait_for("the slot to advance", Duration::from_secs(15), || {
        caught_up(c, mark).then_some(())
    });
}

/// `n` transactions of 100 captured messages each to `d`; their ids.
fn publish_batches(c: &mut Client, d: &str, n: i32) -> HashSet<String> {
    let mut sent = HashSet::new();
    for t in 0..n {
        let r = c
            .query(
                "SELECT outbox.publish($1, to_jsonb(g))::text FROM generate_series($2::int, $2::int + 99) g",
                &[&d, &(t * 100)],
            )
            .unwrap();
        sent.extend(r.iter().map(|r| r.get::<_, String>(0)));
    }
    sent
}

/// `ALTER SYSTEM SET` each `name = value` (one statement each: it runs in
/// no transaction block), then a reload.
fn alter_system(c: &mut Client, settings: &[&str]) {
    for s in settings {
        c.batch_execute(&format!("ALTER SYSTEM SET {s}")).unwrap();
    }
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
}

fn ids(frames: &[outbox_pg_e2e::broker::stomp::frame::Frame]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f.get("dop-msg-id").unwrap_or_default().to_string())
        .collect()
}

#[test]
fn captured_messages_arrive_in_order_with_their_headers_and_leave_no_row() {
    let _b = broker::shared_broker();
    let cl = cluster(&[]);
    let d = format!("/topic/{}", unique("wal"));
    let mut sub = Subscriber::new(&d);
    // Same sending rules: the version suffix is the wire destination.
    let mut sub_v2 = Subscriber::new(&format!("{d}.v2"));
    let mut c = wal_client(&cl);
    let mut sent = Vec::new();
    for t in 0..3 {
        let mut tx = c.transaction().unwrap();
        for i in 0..50 {
            let id: String = tx
                .query_one(
                    "SELECT outbox.publish($1, jsonb_build_object('seq', $2::int), '{\"team\": \"billing\"}', 'v2')::text",
                    &[&d, &(t * 50 + i)],
                )
                .unwrap()
                .get(0);
            sent.push(id);
        }
        tx.commit().unwrap();
    }
    // Rolled back: never sent.
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT outbox.publish($1, '\"rolled back\"')", &[&d])
        .unwrap();
    tx.rollback().unwrap();
    let frames = sub_v2.take(150, Duration::from_secs(20));
    assert_eq!(ids(&frames), sent, "every message, in commit order");
    let f = &frames[0];
    assert_eq!(f.get("team"), Some("billing"));
    assert_eq!(f.get("dop-msg-type"), Some("Published"));
    assert_eq!(f.get("persistent"), Some("true"));
    assert_eq!(
        f.get("content-type"),
        Some("application/json;charset=utf-8")
    );
    assert_eq!(String::from_utf8_lossy(&f.body), r#"{"seq": 0}"#);
    assert!(
        sub.next(Duration::from_millis(500)).is_none(),
        "nothing else"
    );
    // No row, and the slot moved past them.
    assert_eq!(rows(&mut c), 0);
    let m = mark(&mut c);
    wait_caught_up(&mut c, &m);
    let lag: Option<i64> = c
        .query_one(
            "SELECT slot_lag_bytes FROM outbox.status WHERE worker = 'publisher'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(lag.is_some(), "outbox.status shows the slot's lag");
}

#[test]
fn a_trigger_captures_too_and_a_delayed_message_waits_in_the_table() {
    let _b = broker::shared_broker();
    let cl = cluster(&[]);
    let d = format!("/topic/{}", unique("waltrg"));
    let mut sub = Subscriber::new(&d);
    let mut c = wal_client(&cl);
    c.batch_execute(&format!(
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric);
         CREATE TRIGGER orders_out AFTER INSERT ON orders
           FOR EACH ROW EXECUTE FUNCTION outbox.publish('{d}');
         INSERT INTO orders SELECT g, g * 1.5 FROM generate_series(1, 20) g;"
    ))
    .unwrap();
    let frames = sub.take(20, Duration::from_secs(15));
    assert_eq!(frames.len(), 20);
    assert_eq!(
        String::from_utf8_lossy(&frames[19].body),
        r#"{"id": 20, "total": 30.0}"#
    );
    assert_eq!(rows(&mut c), 0);
    // Every operation, options, and columns the body is written from
    // directly or (jsonb) through to_jsonb: the same body and headers as
    // the table would send.
    let mut sub_v9 = Subscriber::new(&format!("{d}.v9"));
    c.batch_execute(&format!(
        r#"CREATE TABLE items (id bigint PRIMARY KEY, "the name" text, at timestamptz, f float8, ok bool);
           CREATE TABLE docs (id int PRIMARY KEY, doc jsonb);
           CREATE TRIGGER items_out AFTER INSERT OR UPDATE OR DELETE ON items
             FOR EACH ROW EXECUTE FUNCTION outbox.publish('{d}', 'headers={{"team": "billing"}}');
           CREATE TRIGGER items_some AFTER INSERT ON items
             FOR EACH ROW EXECUTE FUNCTION outbox.publish('{d}', 'fields=ok', 'version=v9');
           CREATE TRIGGER docs_out AFTER INSERT ON docs
             FOR EACH ROW EXECUTE FUNCTION outbox.publish('{d}');
           SET TimeZone = 'Asia/Kolkata';
           BEGIN;
           INSERT INTO items VALUES (7, E'tab\there "q"', '2026-12-07 10:00:00.5+00', 1e20, NULL);
           UPDATE items SET ok = true;
           DELETE FROM items;
           INSERT INTO docs VALUES (1, '{{"z": [1, {{"b": null}}], "a": "é"}}');
           COMMIT;"#
    ))
    .unwrap();
    let frames = sub.take(4, Duration::from_secs(15));
    let row = r#"{"f": 100000000000000000000, "at": "2026-12-07T15:30:00.5+05:30", "id": 7, "ok": null, "the name": "tab\there \"q\""}"#;
    let bodies: Vec<String> = frames
        .iter()
        .map(|f| String::from_utf8_lossy(&f.body).into_owned())
        .collect();
    assert_eq!(
        bodies,
        [
            row.to_string(),
            row.replace(r#""ok": null"#, r#""ok": true"#),
            row.replace(r#""ok": null"#, r#""ok": true"#),
            r#"{"id": 1, "doc": {"a": "é", "z": [1, {"b": null}]}}"#.to_string(),
        ]
    );
    let ops: Vec<Option<&str>> = frames.iter().map(|f| f.get("outbox-op")).collect();
    assert_eq!(
        ops,
        [
            Some("INSERT"),
            Some("UPDATE"),
            Some("DELETE"),
            Some("INSERT")
        ]
    );
    assert_eq!(frames[0].get("outbox-table"), Some("public.items"));
    assert_eq!(frames[3].get("outbox-table"), Some("public.docs"));
    assert_eq!(frames[0].get("team"), Some("billing"));
    assert_eq!(frames[3].get("team"), None);
    let mut correlations = std::collections::HashSet::new();
    for f in &frames {
        let id = f.get("dop-msg-id").unwrap();
        let corr = f.get("dop-correlation-id").unwrap();
        assert!(corr.len() == 36 && corr != id && correlations.insert(corr.to_string()));
        let sent = f.get("dop-msg-sent-time").unwrap();
        assert!(
            sent.starts_with("20") && sent.ends_with("+00:00") && sent.len() == 32,
            "{sent}"
        );
        assert_eq!(f.get("dop-msg-destination"), Some(d.as_str()));
    }
    let v9 = sub_v9.take(1, Duration::from_secs(15));
    assert_eq!(
        String::from_utf8_lossy(&v9[0].body),
        r#"{"id": 7, "ok": null}"#
    );
    assert_eq!(
        v9[0].get("dop-msg-destination"),
        Some(format!("{d}.v9").as_str())
    );
    assert_eq!(v9[0].get("team"), None);
    // A row over outbox.max_message_bytes: refused as in the table mode,
    // nothing written; one within it goes.
    c.batch_execute("ALTER SYSTEM SET outbox.max_message_bytes = 200")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for("the reload", Duration::from_secs(10), || {
        let v: String = c
            .query_one("SHOW outbox.max_message_bytes", &[])
            .unwrap()
            .get(0);
        (v == "200B").then_some(())
    });
    let e = c
        .batch_execute("INSERT INTO items (id, \"the name\") VALUES (8, repeat(E'\\n', 150))")
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&postgres::error::SqlState::PROGRAM_LIMIT_EXCEEDED)
    );
    c.batch_execute("INSERT INTO items (id, \"the name\") VALUES (9, repeat('y', 100))")
        .unwrap();
    c.batch_execute("ALTER SYSTEM RESET outbox.max_message_bytes")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    let frames = sub.take(1, Duration::from_secs(15));
    assert!(String::from_utf8_lossy(&frames[0].body).contains(r#""id": 9"#));
    assert!(
        sub.next(Duration::from_millis(500)).is_none(),
        "nothing else"
    );
    c.execute(
        "SELECT outbox.publish($1, '\"later\"', delay => '1 second')",
        &[&d],
    )
    .unwrap();
    assert_eq!(rows(&mut c), 1, "a delayed message is a row");
    assert!(
        sub.next(Duration::from_secs(10)).is_some(),
        "and it is sent"
    );
}

/// `n` captured messages to `d` tagged `tag`, with bodies of `pad`
/// bytes; their ids in order.
fn publish_tagged(
    tx: &mut postgres::Transaction,
    d: &str,
    n: i32,
    tag: &str,
    pad: i32,
) -> Vec<String> {
    tx.query(
        "SELECT outbox.publish($1, jsonb_build_object('tag', $2::text, 'i', g, 'pad', repeat('x', $3)))::text
         FROM generate_series(1, $4) g",
        &[&d, &tag, &pad, &n],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn savepoints_and_prepared_transactions_keep_their_messages_in_order() {
    let _b = broker::shared_broker();
    let cl = cluster(&["max_prepared_transactions = 2"]);
    let d = format!("/topic/{}", unique("walsp"));
    let mut sub = Subscriber::new(&d);
    let mut c = wal_client(&cl);
    let mut expected = Vec::new();
    let mut tx = c.transaction().unwrap();
    expected.extend(publish_tagged(&mut tx, &d, 3, "top, first", 10));
    tx.batch_execute("SAVEPOINT a").unwrap();
    publish_tagged(&mut tx, &d, 5, "rolled back, small", 10);
    tx.batch_execute("ROLLBACK TO SAVEPOINT a").unwrap();
    tx.batch_execute("SAVEPOINT b").unwrap();
    // 300 messages of 2 kB pass the pending chunk's size: a chunk of the
    // savepoint is written before the top level's first three.
    expected.extend(publish_tagged(&mut tx, &d, 300, "released, large", 2000));
    tx.batch_execute("SAVEPOINT c").unwrap();
    publish_tagged(&mut tx, &d, 300, "rolled back, large", 2000);
    tx.batch_execute("ROLLBACK TO SAVEPOINT c; RELEASE SAVEPOINT b")
        .unwrap();
    tx.batch_execute("SAVEPOINT e").unwrap();
    expected.extend(publish_tagged(&mut tx, &d, 2, "released, small", 10));
    tx.batch_execute("RELEASE SAVEPOINT e").unwrap();
    expected.extend(publish_tagged(&mut tx, &d, 2, "top, last", 10));
    tx.commit().unwrap();
    // A prepared transaction's messages go at its COMMIT PREPARED, not
    // before; a rolled-back one's never.
    for (gid, commit) in [("walsp_rolled_back", false), ("walsp_committed", true)] {
        let mut tx = c.transaction().unwrap();
        let ids = publish_tagged(&mut tx, &d, 4, gid, 10);
        tx.batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
            .unwrap();
        if commit {
            expected.extend(ids);
        }
    }
    let frames = sub.take(expected.len() - 4, Duration::from_secs(30));
    assert!(
        sub.next(Duration::from_millis(1500)).is_none(),
        "nothing of a prepared transaction before its commit"
    );
    c.batch_execute("ROLLBACK PREPARED 'walsp_rolled_back'")
        .unwrap();
    c.batch_execute("COMMIT PREPARED 'walsp_committed'")
        .unwrap();
    let frames = [frames, sub.take(4, Duration::from_secs(15))].concat();
    assert!(
        !frames
            .iter()
            .any(|f| String::from_utf8_lossy(&f.body).contains("rolled back")),
        "nothing rolled back is sent"
    );
    assert_eq!(
        ids(&frames),
        expected,
        "every kept message, in the order written"
    );
    assert!(
        sub.next(Duration::from_millis(1000)).is_none(),
        "nothing else"
    );
    // A thousand released subtransactions (a PL/pgSQL exception block
    // each), every tenth rolled back: 2 MB that no level holds alone is
    // written as it goes, and arrives whole and in order.
    c.batch_execute(&format!(
        "DO $$ BEGIN
           FOR i IN 1..1000 LOOP
             BEGIN
               PERFORM outbox.publish('{d}', jsonb_build_object('i', i, 'pad', repeat('x', 2000)));
               IF i % 10 = 0 THEN RAISE EXCEPTION 'rolled back'; END IF;
             EXCEPTION WHEN raise_exception THEN NULL;
             END;
           END LOOP;
         END $$"
    ))
    .unwrap();
    let frames = sub.take(900, Duration::from_secs(30));
    let seen: Vec<i32> = frames
        .iter()
        .map(|f| {
            let body = String::from_utf8_lossy(&f.body);
            let at = body.find("\"i\": ").expect("an i") + 5;
            body[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let kept: Vec<i32> = (1..=1000).filter(|i| i % 10 != 0).collect();
    assert_eq!(seen, kept, "kept, in order, the rolled back left out");
    assert!(
        sub.next(Duration::from_millis(1000)).is_none(),
        "nothing else"
    );
    assert_eq!(rows(&mut c), 0);
}

#[test]
fn capture_in_the_wal_needs_wal_level_logical() {
    let cl = Cluster::start(&["outbox.stomp_hosts = '127.0.0.1:1'"]);
    let mut c = cl.client();
    c.batch_execute("SET outbox.capture = 'wal'").unwrap();
    let e = c
        .execute("SELECT outbox.publish('/topic/x', '1')", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "55000");
    let db = e.as_db_error().unwrap();
    assert!(
        db.message().contains("wal_level = logical"),
        "{}",
        db.message()
    );
    assert!(
        db.hint()
            .unwrap_or_default()
            .contains("wal_level = logical")
    );
    assert_eq!(rows(&mut c), 0, "nothing written");
    let e = c.batch_execute("SET outbox.capture = 'disk'").unwrap_err();
    assert_eq!(sqlstate(&e), "22023");
}

#[test]
fn a_refused_captured_message_becomes_a_row_and_fails_after_its_retries() {
    let _b = broker::shared_broker();
    let cl = cluster(&[]);
    let d = format!("/topic/{}", unique("walpoison"));
    let poison = format!("/nonsense/{}", unique("x"));
    let mut sub = Subscriber::new(&d);
    let mut c = wal_client(&cl);
    c.batch_execute(&format!(
        "BEGIN;
         SELECT outbox.publish('{d}', '1');
         SELECT outbox.publish('{poison}', '\"bad\"');
         SELECT outbox.publish('{d}', '2');
         COMMIT;"
    ))
    .unwrap();
    // The innocent ones arrive (at least once), the refused one fails in
    // the table on the usual schedule.
    let got: HashSet<String> = sub
        .take(2, Duration::from_secs(20))
        .iter()
        .map(|f| String::from_utf8_lossy(&f.body).into_owned())
        .collect();
    assert_eq!(got, HashSet::from(["1".to_string(), "2".to_string()]));
    let (status, retry, error): (String, i32, Option<String>) = wait_for(
        "the refused message to fail",
        Duration::from_secs(30),
        || {
            c.query_opt(
                "SELECT status::text, retry, last_error FROM outbox.published WHERE destination = $1",
                &[&poison],
            )
            .unwrap()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .filter(|(s, _, _): &(String, i32, Option<String>)| s == "failed")
        },
    );
    assert_eq!((status.as_str(), retry), ("failed", 3));
    assert!(error.is_some());
    let m = mark(&mut c);
    wait_caught_up(&mut c, &m);
}

#[test]
fn with_the_broker_away_captured_messages_move_into_the_table_and_all_arrive() {
    let _b = broker::shared_broker();
    let cl = cluster(&["outbox.stomp_hosts = '127.0.0.1:1'"]);
    let d = format!("/topic/{}", unique("walspill"));
    let mut sub = Subscriber::new(&d);
    let mut c = wal_client(&cl);
    let mut sent = HashSet::new();
    for i in 0..100 {
        let id: String = c
            .query_one(
                "SELECT outbox.publish($1, to_jsonb($2::int))::text",
                &[&d, &i],
            )
            .unwrap()
            .get(0);
        sent.insert(id);
    }
    let m = mark(&mut c);
    wait_for("100 rows spilled", Duration::from_secs(20), || {
        (rows(&mut c) == 100).then_some(())
    });
    // The slot holds nothing back meanwhile.
    wait_caught_up(&mut c, &m);
    cl.set(&["outbox.stomp_hosts = '127.0.0.1:61613'"]);
    let got: HashSet<String> = ids(&sub.take(100, Duration::from_secs(20)))
        .into_iter()
        .collect();
    assert_eq!(got, sent);
}

#[test]
fn an_immediate_stop_mid_delivery_loses_no_captured_message() {
    let _b = broker::shared_broker();
    let cl = cluster(&[]);
    let d = format!("/topic/{}", unique("walcrash"));
    let mut sub = Subscriber::new(&d);
    let mut c = wal_client(&cl);
    let sent = publish_batches(&mut c, &d, 20);
    // Stopped at once while it drains, started again.
    let first = sub.next(Duration::from_secs(10)).expect("delivery started");
    cl.restart("immediate");
    let mut got: HashSet<String> = HashSet::from([first.get("dop-msg-id").unwrap().to_string()]);
    let mut dup = 0;
    while got.len() < sent.len() {
        let Some(f) = sub.next(Duration::from_secs(20)) else {
            break;
        };
        if !got.insert(f.get("dop-msg-id").unwrap().to_string()) {
            dup += 1;
        }
    }
    assert_eq!(got, sent, "every committed message arrives");
    eprintln!("{dup} sent twice after the crash");
    let mut c = cl.client();
    let m = mark(&mut c);
    wait_caught_up(&mut c, &m);
}

/// A promotion with captured messages still in the WAL: on 17 and later
/// the slot is a failover slot, synchronized to the standby, and every
/// message arrives from the promoted server; before 17 the standby has no
/// slot (what the README says such a promotion loses).
#[test]
fn a_promotion_keeps_captured_messages_where_the_slot_is_synchronized() {
    use outbox_pg_e2e::standby::{Standby, stop};
    let _b = broker::shared_broker();
    // The slot keeps up while the standby is made (a slot is synchronized
    // only once it is ahead of the standby's start); then the broker goes
    // out of reach, with no spill: the messages wait in the slot.
    let primary = cluster(&["outbox.wal_spill_after = '1h'"]);
    let mut p = primary.client();
    let major: i32 = p
        .query_one(
            "SELECT current_setting('server_version_num')::int / 10000",
            &[],
        )
        .unwrap()
        .get(0);
    let standby = Standby::of(&primary, &["hot_standby_feedback = on"]);
    let mut s = standby.client();
    if major < 17 {
        let n: i64 = s
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "before 17 a standby has no logical slot");
        return;
    }
    // Slot synchronization needs a database in primary_conninfo, and the
    // primary waits for the standby's slot before decoding past it.
    alter_system(
        &mut s,
        &[
            &format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres'",
                primary.port
            ),
            "sync_replication_slots = on",
        ],
    );
    alter_system(
        &mut p,
        &[&format!(
            "synchronized_standby_slots = 'standby_{}'",
            standby.port
        )],
    );
    // Persisted once the primary's slot moved past the standby's start
    // (a running-transactions record comes every 15 s at most).
    wait_for("the slot on the standby", Duration::from_secs(90), || {
        s.query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name LIKE 'outbox_pg_%' AND synced AND NOT temporary",
            &[],
        )
        .unwrap()
    });
    alter_system(&mut p, &["outbox.stomp_hosts = '127.0.0.1:1'"]);
    std::thread::sleep(Duration::from_secs(1));
    let d = format!("/topic/{}", unique("walfailover"));
    let mut sub = Subscriber::new(&d);
    let mut c = wal_client(&primary);
    let sent = publish_batches(&mut c, &d, 5);
    standby.wait_replayed(&primary, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    stop(&primary, "immediate");
    standby.promote();
    let mut s = standby.client();
    alter_system(&mut s, &["outbox.stomp_hosts = '127.0.0.1:61613'"]);
    let got: HashSet<String> = ids(&sub.take(sent.len(), Duration::from_secs(60)))
        .into_iter()
        .collect();
    assert_eq!(
        got.len(),
        sent.len(),
        "every captured message after the promotion"
    );
    assert_eq!(got, sent);
    assert_eq!(rows(&mut s), 0, "from the slot, not the table");
}

#[test]
fn a_message_forged_with_pg_logical_emit_message_is_never_sent() {
    let _b = broker::shared_broker();
    let cl = cluster(&[]);
    let d = format!("/topic/{}", unique("walforge"));
    let mut sub = Subscriber::new(&d);
    let mut c = cl.client();
    // Anyone may call pg_logical_emit_message: a role with no outbox right
    // writes a well-formed payload with the extension's prefix (format 1,
    // an id, destination, headers, body, no version), unsigned.
    c.batch_execute("CREATE ROLE mallory LOGIN").unwrap();
    let mut m = cl.connect("postgres", "mallory");
    let dest = d.as_bytes();
    let mut payload = vec![1u8];
    payload.extend_from_slice(&[9u8; 16]);
    for part in [dest, b"{}", b"\"forged\""] {
        payload.extend_from_slice(&(part.len() as u32).to_be_bytes());
        payload.extend_from_slice(part);
    }
    payload.extend_from_slice(&u32::MAX.to_be_bytes());
    // With a tag of the right length too, and without one.
    let mut tagged = payload.clone();
    tagged.extend_from_slice(&[0u8; 32]);
    for p in [&payload, &tagged] {
        m.execute(
            "SELECT pg_logical_emit_message(true, 'outbox_pg', $1::bytea)",
            &[p],
        )
        .unwrap();
    }
    // A real one after them arrives alone.
    wal_client(&cl)
        .execute("SELECT outbox.publish($1, '\"real\"')", &[&d])
        .unwrap();
    let f = sub.next(Duration::from_secs(15)).expect("the real message");
    assert_eq!(String::from_utf8_lossy(&f.body), "\"real\"");
    assert!(sub.next(Duration::from_secs(2)).is_none(), "nothing forged");
    assert!(cl.log().contains("did not write (its signature is wrong"));
}

/// The slot is looked at again when a transaction that captured commits:
/// one dropped (or invalidated) after the first capture makes the commit
/// fail, rather than leave messages no slot will read.
#[test]
fn a_capture_whose_slot_went_away_before_its_commit_fails() {
    let cl = cluster(&[
        "outbox.stomp_hosts = '127.0.0.1:1'",
        "outbox.wal_spill_after = '1h'",
    ]);
    let mut c = wal_client(&cl);
    let mut other = cl.client();
    c.batch_execute("BEGIN").unwrap();
    c.execute("SELECT outbox.publish('/topic/x', '1')", &[])
        .unwrap();
    // The publisher may hold the slot for a moment: try until it is free.
    wait_for("the slot dropped", Duration::from_secs(10), || {
        other
            .batch_execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'outbox_pg_%'",
            )
            .ok()
    });
    let e = c.batch_execute("COMMIT").unwrap_err();
    assert_eq!(sqlstate(&e), "55000", "{e}");
    assert_eq!(rows(&mut other), 0, "nothing written");
}
