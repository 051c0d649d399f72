//! A throw-away PostgreSQL cluster (see the crate docs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use postgres::{Client, NoTls};

pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    bindir: PathBuf,
}

/// The PostgreSQL the extension was installed into.
pub fn pg_config() -> String {
    std::env::var("PG_CONFIG").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into())
}

pub fn pg_config_value(flag: &str) -> PathBuf {
    let out = Command::new(pg_config())
        .arg(flag)
        .output()
        .expect("pg_config runs");
    assert!(out.status.success(), "pg_config {flag} failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}

/// A command run as the `postgres` user when we are root (Postgres refuses
/// to run as root), as ourselves otherwise.
pub(crate) fn server_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A command run as root (to install into the server's directories):
/// directly when we are root, through sudo otherwise.
pub fn root_command(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

/// A new temp folder the server user owns (for a data directory, a
/// socket and a log).
pub(crate) fn server_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(crate::unique(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        check(
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .output()
                .unwrap(),
            "chown",
        );
    }
    dir
}

pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

pub(crate) fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Cluster {
    /// Starts a cluster with outbox_pg preloaded and the extension created
    /// in database `postgres`; `settings` are extra postgresql.conf lines
    /// (`name = value`).
    pub fn start(settings: &[&str]) -> Cluster {
        let c = Cluster::init(&[&["shared_preload_libraries = 'outbox_pg'"], settings].concat());
        c.execute("postgres", "CREATE EXTENSION outbox_pg");
        c
    }

    /// Starts a cluster with exactly these extra settings; creates nothing.
    pub fn init(settings: &[&str]) -> Cluster {
        let bindir = pg_config_value("--bindir");
        let dir = server_dir("outbox_pg_e2e");
        let data = dir.join("data");
        check(
            server_command(&bindir.join("initdb"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-D",
                ])
                .arg(&data)
                .output()
                .expect("initdb runs"),
            "initdb",
        );
        let port = free_port();
        let mut conf = format!(
            "\n# outbox_pg e2e\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nlog_min_messages = info\nlogging_collector = off\nmax_worker_processes = 32\n\
             outbox.database = 'postgres'\n",
            dir.display()
        );
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        let path = data.join("postgresql.conf");
        let mut base = std::fs::read_to_string(&path).unwrap();
        base.push_str(&conf);
        std::fs::write(&path, base).unwrap();
        let c = Cluster { port, dir, bindir };
        c.pg_ctl(&["start", "-w", "-t", "60"]);
        c
    }

    /// A cluster around a data directory made elsewhere (a base backup in
    /// `dir/data`, see `standby`) that will listen on `port`; not started
    /// here. Stopped and removed on drop like any other.
    pub(crate) fn adopt(dir: PathBuf, port: u16) -> Cluster {
        Cluster {
            port,
            dir,
            bindir: pg_config_value("--bindir"),
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pg_ctl(&self, args: &[&str]) {
        let out = server_command(&self.bindir.join("pg_ctl"))
            .args(args)
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log_path())
            // The server's own environment: no Rust backtraces in messages.
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .output()
            .expect("pg_ctl runs");
        check(
            out,
            &format!("pg_ctl {args:?} (log: {})", self.log_path().display()),
        );
    }

    /// Appends settings to postgresql.conf and reloads.
    pub fn set(&self, settings: &[&str]) {
        let path = self.data().join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&path).unwrap();
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        std::fs::write(&path, conf).unwrap();
        self.pg_ctl(&["reload"]);
    }

    /// `pg_ctl restart` with the given mode (`fast`, `immediate`).
    pub fn restart(&self, mode: &str) {
        self.pg_ctl(&["restart", "-w", "-t", "60", "-m", mode]);
    }

    pub fn url(&self, db: &str, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={db} user={user} connect_timeout=10",
            self.port
        )
    }

    /// A new connection as `postgres` to `postgres`.
    pub fn client(&self) -> Client {
        self.connect("postgres", "postgres")
    }

    pub fn connect(&self, db: &str, user: &str) -> Client {
        crate::wait_for("a connection", Duration::from_secs(30), || {
            Client::connect(&self.url(db, user), NoTls).ok()
        })
    }

    pub fn execute(&self, db: &str, sql: &str) {
        self.connect(db, "postgres")
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = server_command(&self.bindir.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(self.data())
            .output();
        if std::env::var_os("OUTBOX_KEEP_CLUSTERS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A database error as "SQLSTATE: message" (the Display of postgres::Error
/// says only "db error").
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// The SQLSTATE of a failed statement, for assertions.
pub fn sqlstate(e: &postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no sqlstate: {e}"))
}
