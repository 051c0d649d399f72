//! `outbox-soak`: a few minutes of publishing under faults, then proof that
//! nothing was lost.
//!
//! Eight clients publish (half through `outbox.publish()`, half through a
//! table trigger) while the soak restarts the broker twice, terminates the
//! publisher once and restarts Postgres once (`-m immediate`). A
//! subscription records every message in the inbox; a plain STOMP
//! subscriber on a second queue counts what crossed the wire. At the end:
//! every committed message id arrived (none lost), the inbox has exactly one
//! row per id, and the duplicates on the wire and the publisher's memory
//! are reported.
//!
//! Usage: outbox-soak [SECONDS]   (default 180)

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_pg_e2e::broker::{self, Subscriber};
use outbox_pg_e2e::{Cluster, rss_kb, unique, wait_drained, wait_for};

fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    broker::wait_until_up();
    let cl = Cluster::start(&[
        "outbox.maximum_backoff = '1s'",
        "outbox.poll_interval = '500ms'",
        r#"outbox.stomp_queue_headers = '{"durable":"true","auto-delete":"false","prefetch-count":"100","x-expires":"600000"}'"#,
    ]);
    let q = unique("soak");
    let d = format!("/topic/{q}");
    cl.execute(
        "postgres",
        &format!(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, client int, n int);
             CREATE TRIGGER orders_out AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION outbox.publish('{d}');
             CREATE TABLE seen (message_id text);
             CREATE FUNCTION record(m outbox.message) RETURNS void LANGUAGE sql AS
               $$ INSERT INTO seen VALUES (m.message_id) $$;
             SELECT outbox.subscribe('soak', '{d}', 'record(outbox.message)');"
        ),
    );
    wait_for("the subscription", Duration::from_secs(20), || {
        cl.log()
            .contains("outbox consumer \"soak\": subscribed")
            .then_some(())
    });
    // A second queue on the same topic sees every copy the broker delivers.
    let wire = Arc::new(Mutex::new(Vec::<String>::new()));
    let wire_q = format!("/queue/{q}-wire");
    let stop_wire = Arc::new(AtomicBool::new(false));
    let wire_thread = {
        let (wire, stop, d, wire_q) = (wire.clone(), stop_wire.clone(), d.clone(), wire_q.clone());
        std::thread::spawn(move || {
            let rk = d.trim_start_matches("/topic/").to_string();
            let mut sub: Option<Subscriber> = None;
            while !stop.load(Ordering::Relaxed) {
                // The broker restarts during the soak: resubscribe when it is back.
                let Some(s) = sub.as_mut() else {
                    sub = Subscriber::try_at(
                        &broker::config(),
                        &format!("/exchange/amq.topic/{rk}"),
                        &[
                            ("x-queue-name", wire_q.trim_start_matches("/queue/")),
                            ("durable", "true"),
                            ("auto-delete", "false"),
                            ("x-expires", "600000"),
                        ],
                    )
                    .ok();
                    if sub.is_none() {
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    continue;
                };
                match s.try_next(Duration::from_millis(500)) {
                    Ok(Some(m)) => wire
                        .lock()
                        .unwrap()
                        .push(m.get("dop-msg-id").unwrap_or("").to_string()),
                    Ok(None) => {}
                    Err(_) => sub = None,
                }
            }
        })
    };

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let committed = Arc::new(Mutex::new(HashSet::<String>::new()));
    let ambiguous = Arc::new(Mutex::new(0u64));
    let clients: Vec<_> = (0..8)
        .map(|client| {
            let url = cl.url("postgres", "postgres");
            let (committed, ambiguous, d) = (committed.clone(), ambiguous.clone(), d.clone());
            std::thread::spawn(move || {
                let mut n = 0i32;
                while Instant::now() < deadline {
                    let Ok(mut c) = postgres::Client::connect(&url, postgres::NoTls) else {
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    };
                    while Instant::now() < deadline {
                        n += 1;
                        let ids: Result<Vec<String>, postgres::Error> = (|| {
                            let mut tx = c.transaction()?;
                            let ids = if client % 2 == 0 {
                                tx.query(
                                    "SELECT outbox.publish($1, jsonb_build_object('client', $2::int, 'n', $3::int, 'k', k))::text
                                     FROM generate_series(1, 5) k",
                                    &[&d, &client, &n],
                                )?
                                .iter()
                                .map(|r| r.get(0))
                                .collect()
                            } else {
                                tx.execute("INSERT INTO orders (client, n) SELECT $1, $2 FROM generate_series(1, 5)", &[&client, &n])?;
                                tx.query(
                                    "SELECT message_id::text FROM outbox.published
                                     WHERE headers->>'outbox-table' = 'public.orders' AND xmin::text::bigint = txid_current() % 4294967296",
                                    &[],
                                )?
                                .iter()
                                .map(|r| r.get(0))
                                .collect()
                            };
                            tx.commit()?;
                            Ok(ids)
                        })();
                        match ids {
                            Ok(ids) => committed.lock().unwrap().extend(ids),
                            Err(e) if e.is_closed() || e.as_db_error().is_none() => {
                                // The commit's fate is unknown (the server went away).
                                *ambiguous.lock().unwrap() += 1;
                                break;
                            }
                            Err(_) => {}
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            })
        })
        .collect();

    let publisher_pid = |cl: &Cluster| -> Option<i32> {
        cl.client()
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox publisher'",
                &[],
            )
            .ok()
            .flatten()
            .map(|r| r.get(0))
    };
    let step = Duration::from_secs(seconds) / 6;
    type Fault<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let faults: Vec<Fault> = vec![
        (
            "broker restart",
            Box::new(|| {
                broker::rabbitmqctl(&["stop_app"]);
                std::thread::sleep(Duration::from_secs(2));
                broker::rabbitmqctl(&["start_app"]);
            }),
        ),
        (
            "publisher terminated",
            Box::new(|| {
                if let Some(pid) = publisher_pid(&cl) {
                    let _ = cl
                        .client()
                        .execute("SELECT pg_terminate_backend($1)", &[&pid]);
                }
            }),
        ),
        (
            "postgres restart -m immediate",
            Box::new(|| cl.restart("immediate")),
        ),
        (
            "broker restart",
            Box::new(|| {
                broker::rabbitmqctl(&["stop_app"]);
                std::thread::sleep(Duration::from_secs(2));
                broker::rabbitmqctl(&["start_app"]);
            }),
        ),
    ];
    let mut rss_start = 0;
    for (i, (what, fault)) in faults.iter().enumerate() {
        std::thread::sleep(step);
        if i == 0 {
            rss_start = publisher_pid(&cl).map(rss_kb).unwrap_or(0);
        }
        println!(
            "soak: {:>4}s {what}",
            (Instant::now() + Duration::from_secs(seconds) - deadline).as_secs()
        );
        fault();
    }
    for c in clients {
        c.join().unwrap();
    }
    broker::wait_until_up();
    let committed = committed.lock().unwrap().clone();
    println!(
        "soak: publishing stopped; {} messages committed; waiting for delivery",
        committed.len()
    );

    let mut c = cl.client();
    wait_drained(&mut c, Duration::from_secs(600));
    let received = wait_for("the inbox to catch up", Duration::from_secs(600), || {
        let ids: HashSet<String> = c
            .query(
                "SELECT message_id FROM outbox.received WHERE status = 'consumed'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        committed.is_subset(&ids).then_some(ids)
    });
    std::thread::sleep(Duration::from_secs(3));
    stop_wire.store(true, Ordering::Relaxed);
    wire_thread.join().unwrap();
    let rss_end = publisher_pid(&cl).map(rss_kb).unwrap_or(0);

    let failed: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.published WHERE status = 'failed'",
            &[],
        )
        .unwrap()
        .get(0);
    let inbox_rows: i64 = c
        .query_one("SELECT count(*) FROM outbox.received", &[])
        .unwrap()
        .get(0);
    let effects: i64 = c
        .query_one("SELECT count(*) FROM seen", &[])
        .unwrap()
        .get(0);
    let effects_distinct: i64 = c
        .query_one("SELECT count(DISTINCT message_id) FROM seen", &[])
        .unwrap()
        .get(0);
    let wire = wire.lock().unwrap();
    let wire_distinct: HashSet<&String> = wire.iter().collect();
    let lost = committed.difference(&received).count();
    println!(
        "soak: seconds {seconds}, clients 8, faults: 2 broker restarts, 1 publisher terminated, 1 postgres restart"
    );
    println!(
        "soak: committed {}, commits of unknown fate {}",
        committed.len(),
        ambiguous.lock().unwrap()
    );
    println!("soak: lost {lost}, failed {failed}");
    println!(
        "soak: inbox rows {inbox_rows}, callback effects {effects} ({effects_distinct} distinct ids)"
    );
    println!(
        "soak: on the wire {} copies of {} ids: {} duplicates",
        wire.len(),
        wire_distinct.len(),
        wire.len() - wire_distinct.len()
    );
    println!(
        "soak: publisher RSS {} kB after the first fault, {} kB at the end",
        rss_start, rss_end
    );
    let _ = c.execute("SELECT outbox.unsubscribe('soak')", &[]);
    let ok = lost == 0
        && failed == 0
        && effects == effects_distinct
        && effects_distinct as usize >= committed.len();
    println!("soak: {}", if ok { "PASS" } else { "FAIL" });
    std::process::exit(if ok { 0 } else { 1 });
}
