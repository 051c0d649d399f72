//! `ALTER EXTENSION outbox_pg UPDATE` from every earlier release, with rows
//! waiting and workers running: nothing lost, nothing twice, and the schema
//! and grants those of a fresh install.
//!
//! An earlier release is installed from its install script, kept in
//! `tests/fixtures/` (what `cargo pgrx install` produced for it), with the
//! library under test: the library serves every earlier schema until the
//! UPDATE.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use outbox_pg_e2e::cluster::{pg_config_value, root_command, sqlstate};
use outbox_pg_e2e::{Cluster, broker, unique, wait_drained, wait_for};
use postgres::Client;

/// The releases an UPDATE starts from.
const EARLIER: &[&str] = &["0.1.0", "0.2.0"];

/// Puts the install script of `version` beside the installed extension.
fn install_release(version: &str) {
    let name = format!("outbox_pg--{version}.sql");
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(&name);
    let script = std::fs::read(&fixture).unwrap();
    let target = pg_config_value("--sharedir").join("extension").join(&name);
    if std::fs::read(&target).ok().as_ref() != Some(&script) {
        let out = root_command("install")
            .args(["-m", "644"])
            .arg(&fixture)
            .arg(&target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot install {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The schema of `db` as `pg_dump --schema-only --binary-upgrade` shows it
/// (the only mode that dumps an extension's own objects, with their grants
/// as the scripts made them), less its noise; the schema `app` holds the
/// test's own objects.
fn schema(cl: &Cluster, db: &str) -> Vec<String> {
    let out = Command::new(cl.bindir().join("pg_dump"))
        .args(["--schema-only", "--binary-upgrade", "--exclude-schema=app"])
        .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
        .arg(cl.port.to_string())
        .arg(db)
        .output()
        .expect("pg_dump runs");
    assert!(
        out.status.success(),
        "pg_dump {db}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !noise(l))
        .map(String::from)
        .collect()
}

/// What differs between any two dumps: object and transaction ids,
/// sequence positions (15 dumps them), the dump's random key.
fn noise(l: &str) -> bool {
    l.contains("binary_upgrade_set_next_")
        || l.starts_with("SET relfrozenxid")
        || (l.starts_with("WHERE oid = '") && l.ends_with("';"))
        || l.starts_with("SELECT pg_catalog.setval(")
        || l.starts_with("\\restrict")
        || l.starts_with("\\unrestrict")
}

/// Where two dumps part, with some context, for the failure message.
fn first_difference(a: &[String], b: &[String]) -> String {
    let at = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let from = at.saturating_sub(5);
    let show = |d: &[String]| d[from.min(d.len())..(at + 10).min(d.len())].join("\n");
    format!(
        "line {at}:\n--- updated\n{}\n--- fresh\n{}",
        show(a),
        show(b)
    )
}

fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

fn publish(c: &mut Client, destination: &str, from: i32, to: i32, delay: &str) {
    c.execute(
        "SELECT outbox.publish($1, jsonb_build_object('n', n), delay => $2::text::interval)
           FROM generate_series($3::int, $4::int - 1) n",
        &[&destination, &delay, &from, &to],
    )
    .unwrap();
}

#[test]
fn update_with_rows_waiting_and_workers_running_loses_nothing() {
    for version in EARLIER {
        update_from(version);
    }
}

fn update_from(version: &str) {
    let _b = broker::shared_broker();
    install_release(version);
    let cl = Cluster::init(&[
        "shared_preload_libraries = 'outbox_pg'",
        "outbox.poll_interval = '200ms'",
        // Test queues disappear two minutes after their consumer left.
        r#"outbox.stomp_queue_headers = '{"durable":"true","auto-delete":"false","prefetch-count":"20","x-expires":"120000"}'"#,
    ]);
    cl.execute(
        "postgres",
        &format!(
            "CREATE EXTENSION outbox_pg VERSION '{version}';
             CREATE SCHEMA app;
             CREATE TABLE app.effects (message_id text, n int);
             -- Slow enough that messages queue at the broker during the UPDATE.
             CREATE FUNCTION app.consume(m outbox.message) RETURNS void LANGUAGE sql AS
               $$ SELECT pg_sleep(0.01); INSERT INTO app.effects VALUES (m.message_id, (m.body->>'n')::int) $$;"
        ),
    );
    let mut c = cl.client();
    let q = unique("upgrade");
    let dest = format!("/topic/{q}");
    let name = unique("upgrade");
    c.execute(
        "SELECT outbox.subscribe($1, $2, 'app.consume(outbox.message)')",
        &[&name, &dest],
    )
    .unwrap();
    let line = format!("outbox consumer \"{name}\": subscribed to {dest}");
    wait_for(&line, Duration::from_secs(20), || {
        cl.log().contains(&line).then_some(())
    });

    // Published and consumed before the UPDATE; one given up (failed);
    // some waiting for their time; a stream in flight during it.
    publish(&mut c, &dest, 0, 10, "0");
    wait_drained(&mut c, Duration::from_secs(30));
    c.execute(
        "INSERT INTO outbox.published (message_id, destination, body, status, retry, last_error)
         VALUES (gen_random_uuid(), $1, '{\"n\": 1000}', 'failed', 50, 'given up before the update')",
        &[&dest],
    )
    .unwrap();
    publish(&mut c, &dest, 10, 30, "2s");
    publish(&mut c, &dest, 30, 130, "0");

    c.batch_execute("ALTER EXTENSION outbox_pg UPDATE").unwrap();
    let now: String = c
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'outbox_pg'",
            &[],
        )
        .unwrap()
        .get(0);
    let default: String = c
        .query_one(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'outbox_pg'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(now, default, "UPDATE from {version} reaches the release");

    // The same workers go on; the new SQL surface works.
    publish(&mut c, &dest, 130, 140, "0");
    assert_eq!(count(&mut c, "SELECT outbox.retry_failed()"), 1);
    wait_for("every message consumed", Duration::from_secs(60), || {
        (count(&mut c, "SELECT count(*) FROM app.effects") >= 141).then_some(())
    });
    wait_drained(&mut c, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM outbox.published WHERE status = 'published'"
        ),
        141
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM app.effects"), 141);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(DISTINCT n) FROM app.effects WHERE n BETWEEN 0 AND 139 OR n = 1000"
        ),
        141,
        "each message consumed once"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM outbox.received WHERE status = 'consumed'"
        ),
        141
    );
    c.batch_execute("GRANT USAGE ON SCHEMA app TO outbox_admin; GRANT EXECUTE ON FUNCTION app.consume(outbox.message) TO outbox_admin; SET ROLE outbox_admin")
        .unwrap();
    let e = c
        .batch_execute("DELETE FROM outbox.subscriptions")
        .unwrap_err();
    assert_eq!(
        sqlstate(&e),
        "42501",
        "subscriptions are written only through subscribe"
    );
    c.execute(
        "SELECT outbox.subscribe($1, $2, 'app.consume(outbox.message)')",
        &[&format!("{name}_2"), &dest],
    )
    .unwrap();
    c.execute("SELECT outbox.unsubscribe($1)", &[&format!("{name}_2")])
        .unwrap();
    c.execute("SELECT outbox.unsubscribe($1)", &[&name])
        .unwrap();
    c.batch_execute("RESET ROLE").unwrap();

    // The schema and grants of a fresh install.
    c.batch_execute("CREATE DATABASE fresh").unwrap();
    cl.execute("fresh", "CREATE EXTENSION outbox_pg");
    let (updated, fresh) = (schema(&cl, "postgres"), schema(&cl, "fresh"));
    assert!(
        updated == fresh,
        "the schema after UPDATE from {version} differs from a fresh install at {}",
        first_difference(&updated, &fresh)
    );
}
