//! A streaming standby of a throw-away `Cluster`, for failover tests.
//!
//! `Standby::of(&primary, settings)` takes a base backup of the primary with
//! `pg_basebackup -R` (a physical replication slot of its own, WAL streamed
//! during the copy) into a new temp directory, gives it its own port and
//! socket directory (loopback only, like every cluster here), appends
//! `settings` to its postgresql.conf and starts it as a hot standby, run as
//! the same unprivileged user. It derefs to a `Cluster` (client, log, set,
//! pg_ctl, ...) and is stopped and removed on drop like any other.
//!
//! The primary needs nothing beyond what `Cluster::init` writes: the
//! default `wal_level = replica` and `max_wal_senders = 10`, and initdb's
//! pg_hba.conf (`-A trust`) already admits replication connections from
//! 127.0.0.1. The standby inherits the primary's postgresql.conf (so
//! `shared_preload_libraries = 'outbox_pg'` too) as it was at the backup.

use std::ops::Deref;
use std::time::Duration;

use crate::cluster::{Cluster, check, free_port, server_command, server_dir};

pub struct Standby {
    cluster: Cluster,
}

impl Deref for Standby {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Standby {
    /// A hot standby of `primary`, streaming from it, with `settings`
    /// (`name = value` lines) added to its postgresql.conf.
    pub fn of(primary: &Cluster, settings: &[&str]) -> Standby {
        let dir = server_dir("outbox_pg_e2e_standby");
        let port = free_port();
        // Made now, so that its Drop cleans up whatever happens next.
        let cluster = Cluster::adopt(dir.clone(), port);
        let slot = format!("standby_{port}");
        check(
            server_command(&primary.bindir().join("pg_basebackup"))
                .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
                .args(["-U", "postgres", "-R", "-X", "stream", "-c", "fast"])
                .args(["--no-sync", "-C", "-S", &slot, "-D"])
                .arg(cluster.data())
                .output()
                .expect("pg_basebackup runs"),
            "pg_basebackup",
        );
        // Later lines win: its own port and socket directory.
        let mut conf = format!(
            "\n# outbox_pg e2e standby\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nhot_standby = on\n",
            dir.display()
        );
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        let path = cluster.data().join("postgresql.conf");
        let mut base = std::fs::read_to_string(&path).unwrap();
        base.push_str(&conf);
        std::fs::write(&path, base).unwrap();
        cluster.pg_ctl(&["start", "-w", "-t", "60"]);
        let standby = Standby { cluster };
        crate::wait_for(
            "the standby to stream from its primary",
            Duration::from_secs(30),
            || {
                let status: Option<String> = standby
                    .client()
                    .query_opt("SELECT status FROM pg_stat_wal_receiver", &[])
                    .unwrap()
                    .map(|r| r.get(0));
                (status.as_deref() == Some("streaming")).then_some(())
            },
        );
        standby
    }

    /// Whether it is still a standby (`pg_is_in_recovery()`).
    pub fn in_recovery(&self) -> bool {
        self.client()
            .query_one("SELECT pg_is_in_recovery()", &[])
            .unwrap()
            .get(0)
    }

    /// Waits until it has replayed everything `primary` has written so far.
    pub fn wait_replayed(&self, primary: &Cluster, timeout: Duration) {
        let lsn: String = primary
            .client()
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .unwrap()
            .get(0);
        self.wait_replayed_lsn(&lsn, timeout);
    }

    /// Waits until it has replayed WAL up to `lsn` (text, `0/3000060`).
    pub fn wait_replayed_lsn(&self, lsn: &str, timeout: Duration) {
        let mut c = self.client();
        crate::wait_for(
            &format!("the standby to replay up to {lsn}"),
            timeout,
            || {
                c.query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&lsn],
                )
                .unwrap()
                .get::<_, bool>(0)
                .then_some(())
            },
        );
    }

    /// `pg_ctl promote` and waits until it accepts writes.
    pub fn promote(&self) {
        self.pg_ctl(&["promote", "-w", "-t", "60"]);
        crate::wait_for("the promotion", Duration::from_secs(30), || {
            (!self.in_recovery()).then_some(())
        });
    }

    /// `pg_ctl stop` with the given mode (`fast`, `immediate`).
    pub fn stop(&self, mode: &str) {
        stop(self, mode);
    }
}

/// `pg_ctl stop -m mode` of any cluster (fencing an old primary, say).
pub fn stop(cluster: &Cluster, mode: &str) {
    cluster.pg_ctl(&["stop", "-w", "-t", "60", "-m", mode]);
}

/// A planned switchover: stops `primary` with a fast shutdown (its
/// walsender streams everything up to the shutdown checkpoint first),
/// checks that `standby` replayed that checkpoint (nothing committed is
/// left behind), then promotes it.
pub fn switchover(primary: &Cluster, standby: &Standby) {
    stop(primary, "fast");
    let lsn = latest_checkpoint(primary);
    standby.wait_replayed_lsn(&lsn, Duration::from_secs(30));
    standby.promote();
}

/// "Latest checkpoint location" of a stopped cluster, from pg_controldata.
pub fn latest_checkpoint(cluster: &Cluster) -> String {
    let out = check(
        server_command(&cluster.bindir().join("pg_controldata"))
            .arg("-D")
            .arg(cluster.data())
            .env("LC_ALL", "C")
            .output()
            .expect("pg_controldata runs"),
        "pg_controldata",
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("Latest checkpoint location:")
                .map(|v| v.trim().to_string())
        })
        .expect("pg_controldata prints the latest checkpoint location")
}
