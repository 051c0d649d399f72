//! The packages that `scripts/package.sh` built, installed as a user would
//! into the PostgreSQL of PG_CONFIG: the .deb with `dpkg -i` where the
//! server is Debian's, else the tarball's `install.sh`; then a clean
//! cluster, `CREATE EXTENSION`, and a message delivered end to end.
//!
//! Not part of `cargo test` by default (it installs into the server):
//! `cargo test -p outbox_pg_e2e --test package` after `scripts/package.sh`;
//! the e2e suite then runs against what it installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outbox_pg_e2e::broker::{self, Subscriber};
use outbox_pg_e2e::cluster::{pg_config, pg_config_value, root_command};
use outbox_pg_e2e::{Cluster, unique};

/// The extension's version, from its Cargo.toml.
fn version() -> String {
    let manifest = root().join("Cargo.toml");
    std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"'))
        .map(String::from)
        .expect("a version in Cargo.toml")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn major() -> String {
    let out = Command::new(pg_config()).arg("--version").output().unwrap();
    let v = String::from_utf8(out.stdout).unwrap();
    v.trim()
        .strip_prefix("PostgreSQL ")
        .and_then(|v| v.split('.').next())
        .expect("pg_config --version")
        .to_string()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn package(name: &str) -> PathBuf {
    let p = root().join("target/package").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/package.sh first",
        p.display()
    );
    p
}

/// Installs the .deb and checks that the files on disk are the package's.
fn install_deb(major: &str, version: &str) {
    let name = format!("postgresql-{major}-outbox-pg");
    run(root_command("dpkg")
        .arg("-i")
        .arg(package(&format!("{name}_{version}_amd64.deb"))));
    let installed = run(Command::new("dpkg-query").args(["-W", "-f=${Version}", &name]));
    assert_eq!(installed, version);
    run(Command::new("dpkg").args(["--verify", &name]));
    let files = run(Command::new("dpkg").args(["-L", &name]));
    for f in [
        "outbox_pg.so",
        "outbox_pg.control",
        &format!("outbox_pg--{version}.sql"),
    ] {
        assert!(
            files.lines().any(|l| l.ends_with(&format!("/{f}"))),
            "{name} ships {f}"
        );
    }
}

/// Unpacks the tarball, runs its install.sh with PG_CONFIG, and checks that
/// the files on disk are the tarball's.
fn install_tarball(major: &str, version: &str) {
    let name = format!("outbox_pg-{version}-pg{major}-amd64");
    let dir = std::env::temp_dir().join(unique("outbox_pg_package"));
    std::fs::create_dir_all(&dir).unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(package(&format!("{name}.tar.gz")))
        .arg("-C")
        .arg(&dir));
    let unpacked = dir.join(&name);
    run(root_command("env")
        .arg(format!("PG_CONFIG={}", pg_config()))
        .arg("sh")
        .arg(unpacked.join("install.sh")));
    let same = |from: &Path, to: &Path| {
        assert!(
            std::fs::read(from).unwrap() == std::fs::read(to).unwrap(),
            "{} is not the package's {}",
            to.display(),
            from.display()
        )
    };
    same(
        &unpacked.join("lib/outbox_pg.so"),
        &pg_config_value("--pkglibdir").join("outbox_pg.so"),
    );
    let extension = pg_config_value("--sharedir").join("extension");
    let mut shipped = 0;
    for f in std::fs::read_dir(unpacked.join("extension")).unwrap() {
        let f = f.unwrap().path();
        same(&f, &extension.join(f.file_name().unwrap()));
        shipped += 1;
    }
    assert!(shipped >= 2, "the tarball ships a control file and SQL");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_package_installs_and_delivers_a_message_end_to_end() {
    let (major, version) = (major(), version());
    if pg_config() == format!("/usr/lib/postgresql/{major}/bin/pg_config") {
        install_deb(&major, &version);
    } else {
        install_tarball(&major, &version);
    }

    let _b = broker::shared_broker();
    let cl = Cluster::start(&[]);
    let mut c = cl.client();
    let installed: String = c
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'outbox_pg'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(installed, version);
    let d = format!("/topic/{}", unique("package"));
    let mut sub = Subscriber::new(&d);
    c.execute(
        "SELECT outbox.publish($1, '{\"from\": \"the package\"}')",
        &[&d],
    )
    .unwrap();
    let m = sub.take(1, Duration::from_secs(10)).remove(0);
    assert_eq!(m.body_text(), r#"{"from": "the package"}"#);
    assert_eq!(m.get("destination"), Some(d.as_str()));
}
