//! Several databases per cluster: `outbox.database` as a list or `*`, one
//! publisher per database (started by the launcher), each database's
//! consumers its own; reloads, `CREATE EXTENSION` under `*`, `DROP DATABASE`
//! of a served database, and a name in the list that does not exist.

use std::time::{Duration, Instant};

use outbox_pg_e2e::broker::{self, Subscriber};
use outbox_pg_e2e::{Cluster, unique, wait_for};
use postgres::Client;

const SETTINGS: &[&str] = &[
    "outbox.poll_interval = '1s'",
    "outbox.maximum_backoff = '500ms'",
    // Test queues disappear two minutes after their consumer left.
    r#"outbox.stomp_queue_headers = '{"durable":"true","auto-delete":"false","prefetch-count":"20","x-expires":"120000"}'"#,
];

fn cluster(database: &str, extra: &[&str]) -> Cluster {
    let setting = format!("outbox.database = '{database}'");
    Cluster::start(&[SETTINGS, &[setting.as_str()], extra].concat())
}

/// Creates database `db` with the extension, a table of effects and a
/// callback that records them in arrival order.
fn create_served(c: &Cluster, db: &str) {
    c.execute("postgres", &format!("CREATE DATABASE {db}"));
    install(c, db);
}

fn install(c: &Cluster, db: &str) {
    c.execute(
        db,
        "CREATE EXTENSION IF NOT EXISTS outbox_pg;
         CREATE TABLE effects (n bigserial PRIMARY KEY, message_id text, body jsonb);
         CREATE FUNCTION record_effect(m outbox.message) RETURNS void LANGUAGE sql AS
           $$ INSERT INTO effects (message_id, body) VALUES (m.message_id, m.body) $$;",
    );
}

/// Outbox workers of a kind connected to database `db`.
fn workers(c: &mut Client, kind: &str, db: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = $1 AND datname = $2",
        &[&kind, &db],
    )
    .unwrap()
    .get(0)
}

/// Waits (15 s at most) until `n` workers of a kind run in `db`.
fn wait_workers(c: &mut Client, kind: &str, db: &str, n: i64) {
    wait_for(
        &format!("{n} {kind} in {db}"),
        Duration::from_secs(15),
        || (workers(c, kind, db) == n).then_some(()),
    );
}

fn subscribe(cl: &Cluster, db: &str, name: &str, destination: &str) {
    cl.connect(db, "postgres")
        .execute(
            "SELECT outbox.subscribe($1, $2, 'record_effect(outbox.message)'::regprocedure)",
            &[&name, &destination],
        )
        .unwrap();
    let line = format!("outbox consumer \"{name}\": subscribed to {destination}");
    wait_for(&line, Duration::from_secs(15), || {
        cl.log().contains(&line).then_some(())
    });
}

/// Creates `db` served, with a consumer of a fresh topic (returned) and
/// its publisher running.
fn serve_with_consumer(cl: &Cluster, db: &str) -> String {
    create_served(cl, db);
    let d = format!("/topic/{}", unique(db));
    subscribe(cl, db, &format!("in-{db}"), &d);
    wait_workers(&mut cl.client(), "outbox publisher", db, 1);
    d
}

/// The `seq` of every effect, in the order the callback ran.
fn effects(c: &mut Client) -> Vec<i64> {
    c.query("SELECT (body->>'seq')::bigint FROM effects ORDER BY n", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn publish(c: &mut Client, destination: &str, body: &str) {
    c.execute(
        "SELECT outbox.publish($1, $2::text::jsonb)",
        &[&destination, &body],
    )
    .unwrap();
}

#[test]
fn three_databases_are_served_at_once_each_in_its_own_order() {
    let _b = broker::shared_broker();
    let cl = cluster("postgres, alpha ,beta", &[]);
    install(&cl, "postgres");
    create_served(&cl, "alpha");
    create_served(&cl, "beta");
    let dbs = ["postgres", "alpha", "beta"];
    let mut admin = cl.client();
    for db in dbs {
        wait_workers(&mut admin, "outbox publisher", db, 1);
    }
    // Each database consumes what the next one publishes.
    let tag = unique("multi");
    let dest = |db: &str| format!("/topic/{tag}-{db}");
    for (i, db) in dbs.iter().enumerate() {
        let from = dbs[(i + 1) % dbs.len()];
        subscribe(&cl, db, &format!("from-{from}"), &dest(from));
    }
    let mut wire: Vec<Subscriber> = dbs.iter().map(|db| Subscriber::new(&dest(db))).collect();
    let mut clients: Vec<Client> = dbs.iter().map(|db| cl.connect(db, "postgres")).collect();
    const N: i64 = 300;
    for seq in 0..N {
        // Interleaved, and now and then several in one transaction.
        for (i, db) in dbs.iter().enumerate() {
            let body = format!(r#"{{"seq": {seq}, "from": "{db}"}}"#);
            publish(&mut clients[i], &dest(db), &body);
        }
    }
    for (i, db) in dbs.iter().enumerate() {
        let frames = wire[i].take(N as usize, Duration::from_secs(60));
        let seqs: Vec<i64> = frames
            .iter()
            .map(|f| {
                let body: serde_like::Body = serde_like::parse(&f.body);
                assert_eq!(body.from, *db, "a message of {db} came from elsewhere");
                body.seq
            })
            .collect();
        assert_eq!(
            seqs,
            (0..N).collect::<Vec<_>>(),
            "{db}'s messages on the wire"
        );
    }
    for (i, db) in dbs.iter().enumerate() {
        let c = &mut clients[i];
        wait_for(
            &format!("{N} effects in {db}"),
            Duration::from_secs(60),
            || (effects(c).len() as i64 >= N).then_some(()),
        );
        assert_eq!(
            effects(c),
            (0..N).collect::<Vec<_>>(),
            "{db}'s inbox, once each, in order"
        );
        // Each database shows its own workers only.
        let rows: Vec<(String, String)> = c
            .query(
                "SELECT worker, name FROM outbox.status ORDER BY worker",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let from = dbs[(i + 1) % dbs.len()];
        assert_eq!(
            rows,
            vec![
                ("consumer".to_string(), format!("from-{from}")),
                ("publisher".to_string(), "publisher".to_string())
            ],
            "outbox.status in {db}"
        );
    }
    let launchers: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'outbox launcher' AND datname IS NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(launchers, 1, "one launcher, with no database");
}

#[test]
fn star_serves_a_database_once_the_extension_is_created_there() {
    let _b = broker::shared_broker();
    let cl = cluster("*", &[]);
    let mut admin = cl.client();
    wait_workers(&mut admin, "outbox publisher", "postgres", 1);
    cl.execute("postgres", "CREATE DATABASE gamma");
    // No extension there: no worker stays.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(workers(&mut admin, "outbox publisher", "gamma"), 0);

    let started = Instant::now();
    install(&cl, "gamma");
    wait_workers(&mut admin, "outbox publisher", "gamma", 1);
    let picked_up = started.elapsed();
    let d = format!("/topic/{}", unique("star"));
    let mut sub = Subscriber::new(&d);
    publish(&mut cl.connect("gamma", "postgres"), &d, r#"{"seq": 1}"#);
    assert!(
        sub.next(Duration::from_secs(10)).is_some(),
        "gamma's message"
    );
    eprintln!("picked up in {picked_up:?}");

    // DROP EXTENSION stops that database's workers, consumers too.
    subscribe(&cl, "gamma", "g", &format!("/topic/{}", unique("star-in")));
    cl.execute("gamma", "DROP EXTENSION outbox_pg CASCADE");
    wait_workers(&mut admin, "outbox publisher", "gamma", 0);
    wait_workers(&mut admin, "outbox consumer", "gamma", 0);
    // And another CREATE EXTENSION brings them back.
    cl.execute("gamma", "CREATE EXTENSION outbox_pg");
    wait_workers(&mut admin, "outbox publisher", "gamma", 1);
    assert_eq!(workers(&mut admin, "outbox publisher", "postgres"), 1);
}

#[test]
fn a_served_database_is_dropped_while_its_workers_run_and_served_again() {
    let _b = broker::shared_broker();
    let cl = cluster("postgres, delta", &[]);
    let d = serve_with_consumer(&cl, "delta");
    let mut admin = cl.client();
    {
        // Busy: messages on their way in and out while the drop comes.
        let mut c = cl.connect("delta", "postgres");
        for seq in 0..200 {
            publish(&mut c, &d, &format!(r#"{{"seq": {seq}}}"#));
        }
    }
    let started = Instant::now();
    admin
        .batch_execute("DROP DATABASE delta")
        .unwrap_or_else(|e| panic!("DROP DATABASE: {}", outbox_pg_e2e::cluster::describe(&e)));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "DROP DATABASE took {took:?}");
    // No worker comes back for it, and nothing loops in the log.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(workers(&mut admin, "outbox publisher", "delta"), 0);
    assert_eq!(workers(&mut admin, "outbox consumer", "delta"), 0);
    let log = cl.log();
    let missing = log.matches("does not exist").count();
    assert!(missing <= 2, "restart loop after the drop:\n{log}");
    assert_eq!(log.matches("outbox launcher started").count(), 1);

    // Created again: served again.
    create_served(&cl, "delta");
    wait_workers(&mut admin, "outbox publisher", "delta", 1);
    let d2 = format!("/topic/{}", unique("drop-again"));
    let mut sub = Subscriber::new(&d2);
    publish(&mut cl.connect("delta", "postgres"), &d2, r#"{"seq": 7}"#);
    assert!(
        sub.next(Duration::from_secs(10)).is_some(),
        "the new delta's message"
    );
}

#[test]
fn a_missing_database_is_logged_once_and_served_once_created() {
    let _b = broker::shared_broker();
    let cl = cluster("postgres, nosuch", &[]);
    let mut admin = cl.client();
    wait_workers(&mut admin, "outbox publisher", "postgres", 1);
    let line = "outbox.database names \"nosuch\", which does not exist";
    wait_for(line, Duration::from_secs(10), || {
        cl.log().contains(line).then_some(())
    });
    // Reloads and installs wake the launcher: still logged once, nothing restarts.
    for _ in 0..3 {
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
        std::thread::sleep(Duration::from_millis(700));
    }
    let log = cl.log();
    assert_eq!(log.matches(line).count(), 1, "{log}");
    assert_eq!(log.matches("outbox launcher started").count(), 1, "{log}");
    assert_eq!(
        log.matches("outbox publisher started for database \"postgres\"")
            .count(),
        1,
        "{log}"
    );
    create_served(&cl, "nosuch");
    wait_workers(&mut admin, "outbox publisher", "nosuch", 1);
}

#[test]
fn a_reload_changes_the_databases_served() {
    let _b = broker::shared_broker();
    let cl = cluster("postgres", &[]);
    create_served(&cl, "epsilon");
    install(&cl, "postgres");
    subscribe(
        &cl,
        "postgres",
        "in-postgres",
        &format!("/topic/{}", unique("reload")),
    );
    let mut admin = cl.client();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(workers(&mut admin, "outbox publisher", "epsilon"), 0);

    cl.set(&["outbox.database = 'epsilon'"]);
    wait_workers(&mut admin, "outbox publisher", "epsilon", 1);
    wait_workers(&mut admin, "outbox publisher", "postgres", 0);
    wait_workers(&mut admin, "outbox consumer", "postgres", 0);
    // A message written where nothing serves now says so, and waits.
    let d = format!("/topic/{}", unique("reload-out"));
    let mut sub = Subscriber::new(&d);
    admin
        .batch_execute(&format!("SELECT outbox.publish('{d}', '{{\"seq\": 1}}')"))
        .unwrap();
    assert!(sub.next(Duration::from_secs(2)).is_none());
    // Served again: it goes, and the consumer is back.
    cl.set(&["outbox.database = 'epsilon,postgres'"]);
    assert!(
        sub.next(Duration::from_secs(10)).is_some(),
        "the waiting message"
    );
    wait_workers(&mut admin, "outbox consumer", "postgres", 1);
    assert_eq!(cl.log().matches("outbox launcher started").count(), 1);
}

#[test]
fn running_out_of_worker_slots_is_logged_and_shown() {
    let _b = broker::shared_broker();
    // PostgreSQL's logical replication launcher, ours and one publisher
    // take three of four: one consumer fits.
    let cl = cluster("postgres", &["max_worker_processes = 4"]);
    install(&cl, "postgres");
    let mut c = cl.client();
    for i in 0..3 {
        c.execute(
            "SELECT outbox.subscribe($1, $2, 'record_effect(outbox.message)'::regprocedure)",
            &[&format!("slot-{i}"), &format!("/topic/{}", unique("slots"))],
        )
        .unwrap();
    }
    let shown: i64 = wait_for(
        "the shortage in outbox.status",
        Duration::from_secs(15),
        || {
            let n: i64 = c
            .query_one(
                "SELECT count(*) FROM outbox.status WHERE worker = 'consumer' AND last_error LIKE '%raise max_worker_processes%'",
                &[],
            )
            .unwrap()
            .get(0);
            (n >= 2).then_some(n)
        },
    );
    assert_eq!(shown, 2);
    // The publisher that could not start them says so too.
    let publisher: Option<String> = c
        .query_one(
            "SELECT last_error FROM outbox.status WHERE worker = 'publisher'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        publisher.is_some_and(|e| e.contains("raise max_worker_processes")),
        "the publisher's last_error"
    );
    wait_workers(&mut c, "outbox consumer", "postgres", 1);
    assert!(cl.log().contains("raise max_worker_processes"));
}

/// The two fields of the test bodies (no JSON crate in the harness).
mod serde_like {
    pub struct Body {
        pub seq: i64,
        pub from: String,
    }

    pub fn parse(body: &[u8]) -> Body {
        let text = String::from_utf8_lossy(body);
        let field = |name: &str| -> String {
            let at = text
                .find(&format!("\"{name}\""))
                .unwrap_or_else(|| panic!("no {name} in {text}"));
            let rest = text[at + name.len() + 2..].trim_start_matches([':', ' ']);
            rest.split([',', '}'])
                .next()
                .unwrap()
                .trim()
                .trim_matches('"')
                .to_string()
        };
        Body {
            seq: field("seq").parse().unwrap(),
            from: field("from"),
        }
    }
}

#[test]
fn a_drop_database_that_fails_leaves_the_database_served() {
    let _b = broker::shared_broker();
    let cl = cluster("postgres, zeta", &[]);
    let d = serve_with_consumer(&cl, "zeta");
    let mut admin = cl.client();
    let publisher = |c: &mut Client| -> i32 {
        c.query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox publisher' AND datname = 'zeta'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let before = publisher(&mut admin);

    // Refused before anything happens: the workers are untouched.
    let e = admin
        .batch_execute("BEGIN; DROP DATABASE zeta")
        .unwrap_err();
    assert_eq!(outbox_pg_e2e::cluster::sqlstate(&e), "25001", "{e:?}");
    admin.batch_execute("ROLLBACK").unwrap();
    assert_eq!(publisher(&mut admin), before);

    // Refused by PostgreSQL after the workers left (a session is still
    // there): they come back, and messages flow both ways.
    let _holder = cl.connect("zeta", "postgres");
    let e = admin.batch_execute("DROP DATABASE zeta").unwrap_err();
    assert_eq!(outbox_pg_e2e::cluster::sqlstate(&e), "55006", "{e:?}");
    wait_workers(&mut admin, "outbox publisher", "zeta", 1);
    wait_workers(&mut admin, "outbox consumer", "zeta", 1);
    let mut c = cl.connect("zeta", "postgres");
    for seq in 0..20 {
        publish(&mut c, &d, &format!(r#"{{"seq": {seq}}}"#));
    }
    wait_for("20 effects in zeta", Duration::from_secs(20), || {
        (effects(&mut c).len() == 20).then_some(())
    });
    assert_eq!(effects(&mut c), (0..20).collect::<Vec<_>>());
}

#[test]
fn more_databases_than_entries_without_the_extension_crowd_out_nothing() {
    let _b = broker::shared_broker();
    let cl = cluster("*", &[]);
    let mut admin = cl.client();
    // More databases than shared memory has entries (32), none with it.
    for i in 0..36 {
        admin
            .batch_execute(&format!("CREATE DATABASE crowd_{i}"))
            .unwrap();
    }
    let probes = |cl: &Cluster| cl.log().matches("the extension is not installed").count();
    std::thread::sleep(Duration::from_secs(6));
    let settled = probes(&cl);
    std::thread::sleep(Duration::from_secs(5));
    // Each probed about once, not in a cycle.
    assert!(
        probes(&cl) - settled <= 2,
        "probes go on: {settled} then {}",
        probes(&cl)
    );
    install(&cl, "crowd_35");
    wait_workers(&mut admin, "outbox publisher", "crowd_35", 1);
    wait_workers(&mut admin, "outbox publisher", "postgres", 1);
}
