//! The SQL regression files in `pg_test/` (sql + expected output), run by
//! PostgreSQL's own pg_regress against a throw-away cluster.

use std::path::PathBuf;
use std::process::Command;

use outbox_pg_e2e::Cluster;

#[test]
fn pg_regress_files_match_their_expected_output() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let input = root.join("pg_test");
    let mut tests: Vec<String> = std::fs::read_dir(input.join("sql"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".sql")
                .map(String::from)
        })
        .collect();
    tests.sort();
    assert!(!tests.is_empty(), "no regression files in pg_test/sql");

    // Served, but with no broker to reach: the expected output shows rows
    // as they were written (the launcher starts the publisher at the
    // CREATE EXTENSION's commit, before the files look at the rows).
    let cluster = Cluster::start(&[
        "outbox.database = 'outbox_regress'",
        "outbox.stomp_hosts = '127.0.0.1:1'",
    ]);
    cluster.execute("postgres", "CREATE DATABASE outbox_regress");
    let pgxs = outbox_pg_e2e::cluster::pg_config_value("--pgxs");
    let pg_regress = pgxs
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("test/regress/pg_regress");
    let out = std::env::temp_dir().join(outbox_pg_e2e::unique("outbox_pg_regress"));
    std::fs::create_dir_all(&out).unwrap();
    let status = Command::new(&pg_regress)
        .arg(format!("--inputdir={}", input.display()))
        .arg(format!("--outputdir={}", out.display()))
        .arg(format!("--bindir={}", cluster.bindir().display()))
        .args([
            "--host=127.0.0.1",
            "--user=postgres",
            "--dbname=outbox_regress",
            "--use-existing",
        ])
        .arg(format!("--port={}", cluster.port))
        .args(&tests)
        .status()
        .expect("pg_regress runs");
    let diffs = std::fs::read_to_string(out.join("regression.diffs")).unwrap_or_default();
    assert!(
        status.success(),
        "pg_regress failed; differences:\n{diffs}\n(output kept in {})",
        out.display()
    );
    let _ = std::fs::remove_dir_all(&out);
}
