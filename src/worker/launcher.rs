//! The launcher: the one worker the postmaster starts (at preload), with no
//! database connection. It reads `outbox.database` and `pg_database` and
//! keeps one publisher running per *wanted* database; each publisher
//! supervises its own database's consumers.
//!
//! Vocabulary: a database is *wanted* when `outbox.database` names it (or is
//! `*`) and it accepts connections; it is *served* while it has an entry in
//! shared memory marked so. A publisher that finds no extension in its
//! database marks the entry *absent* and leaves; the launcher starts it
//! again only after a `CREATE EXTENSION outbox_pg` there (the entry's
//! `installs` count moved past the one the publisher saw; one in a
//! database without an entry moves the shared count, and every absent
//! database is probed again), or a reload that changes the setting. The launcher restarts a publisher that stopped
//! after `RESTART` (publishers are never restarted by the postmaster, so a
//! database that is dropped or no longer wanted keeps no worker).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;

use crate::guc::{self, Databases};
use crate::shmem::{MAX_DATABASES, PUBLISHERS, SHARED, SLOTS, Slot, WorkerState, now_ms};

/// A publisher that stopped is started again after this long.
const RESTART: Duration = Duration::from_secs(1);
/// How often the launcher looks at `pg_database` when nothing wakes it
/// (a database created or renamed): the 10 s the SPEC allows.
const LOOK_EVERY: Duration = Duration::from_secs(10);

/// Registers the launcher; called from `_PG_init` while preloading.
pub fn register() {
    BackgroundWorkerBuilder::new("outbox launcher")
        .set_type("outbox launcher")
        .set_library("outbox_pg")
        .set_function("outbox_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(RESTART))
        .load();
}

/// One row of `pg_database`.
struct Database {
    oid: u32,
    name: String,
    /// Accepts connections, is no template and is valid.
    open: bool,
}

/// A publisher the launcher started.
struct Started {
    worker: DynamicBackgroundWorker,
    at: Instant,
}

#[derive(Default)]
struct Launcher {
    started: HashMap<u32, Started>,
    /// When each database's publisher last stopped or could not start.
    stopped_at: HashMap<u32, Instant>,
    installs_seen: u64,
    /// Databases found without the extension whose entry was taken back
    /// for another (more than MAX_DATABASES): not probed again until an
    /// install or a change of the setting.
    absent: HashSet<u32>,
    /// The `outbox.database` setting last applied.
    setting: String,
    /// Problems logged, each once while it lasts.
    logged: HashSet<String>,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: only the shared catalogs (pg_database) are read.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let shared = SHARED.get();
    shared
        .launcher_pid
        .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
    log!("outbox launcher started");
    let mut launcher = Launcher {
        // Every entry is looked at again: a publisher that found no
        // extension under the launcher's last incarnation may find it now.
        installs_seen: u64::MAX,
        setting: guc::text(&guc::DATABASE),
        ..Default::default()
    };
    loop {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            // A reload that changes the setting looks at every database
            // again, absent ones too (other reloads probe nothing).
            let setting = guc::text(&guc::DATABASE);
            if setting != launcher.setting {
                launcher.setting = setting;
                launcher.installs_seen = u64::MAX;
            }
        }
        let wait = launcher.step();
        if !super::wait(wait) {
            break;
        }
    }
    shared.launcher_pid.store(0, Ordering::Release);
    log!("outbox launcher stopped");
    // Exit code 1: started again after the restart time (at shutdown
    // nothing is). The publishers run on meanwhile.
    super::exit(1);
}

impl Launcher {
    /// Brings the publishers in line with the setting and the catalog;
    /// returns how long to sleep.
    fn step(&mut self) -> Duration {
        let shared = SHARED.get();
        let installs = shared.installs.load(Ordering::Acquire);
        if installs != self.installs_seen {
            self.installs_seen = installs;
            // A reload (or a new launcher) probes absent databases again,
            // and an install is served at once.
            for db in &shared.dbs {
                db.absent.store(0, Ordering::Release);
            }
            self.stopped_at.clear();
            self.absent.clear();
        }
        let catalog = databases();
        let wanted = self.wanted(&catalog);
        let mut wait = LOOK_EVERY;

        // Entries of databases no longer wanted (or gone): their workers
        // leave, and the entry is freed once none is left.
        for (i, db) in shared.dbs.iter().enumerate() {
            let oid = db.oid.load(Ordering::Acquire);
            if oid == 0 || wanted.contains(&oid) {
                continue;
            }
            let exists = catalog.iter().any(|d| d.oid == oid);
            if db.is_dropping() && exists {
                continue; // a DROP DATABASE is under way: its backend decides
            }
            if db.served.swap(false, Ordering::AcqRel) {
                debug1!("outbox launcher: database {oid} is no longer served");
            }
            let left = stop_workers(oid, db.publisher_pid.load(Ordering::Acquire));
            let running = self
                .started
                .get(&oid)
                .is_some_and(|s| !matches!(s.worker.pid(), Err(BackgroundWorkerStatus::Stopped)));
            if left || running {
                wait = wait.min(Duration::from_millis(200));
                continue;
            }
            self.started.remove(&oid);
            self.stopped_at.remove(&oid);
            free_slots(oid);
            PUBLISHERS.exclusive().0[i] = Slot::EMPTY;
            db.oid.store(0, Ordering::Release);
        }

        for &oid in &wanted {
            if self.absent.contains(&oid) {
                continue;
            }
            let Some((i, db, taken)) = entry(oid) else {
                self.once(format!(
                    "outbox launcher: more than {MAX_DATABASES} databases to serve; database {oid} is not served"
                ));
                continue;
            };
            if let Some(taken) = taken {
                self.absent.insert(taken);
                self.started.remove(&taken);
                self.stopped_at.remove(&taken);
            }
            db.served.store(true, Ordering::Release);
            if db.is_absent() || db.is_dropping() {
                continue;
            }
            if let Some(s) = self.started.get(&oid) {
                match s.worker.pid() {
                    Err(BackgroundWorkerStatus::Stopped) => {
                        self.started.remove(&oid);
                        self.stopped_at.insert(oid, Instant::now());
                    }
                    // Running, or about to: nothing to do.
                    _ => continue,
                }
            }
            if !self.started.contains_key(&oid) && alive(db.publisher_pid.load(Ordering::Acquire)) {
                // Started by an earlier launcher: it is looked at again
                // every LOOK_EVERY (its stop does not wake this launcher).
                continue;
            }
            if let Some(left) = self
                .stopped_at
                .get(&oid)
                .and_then(|t| RESTART.checked_sub(t.elapsed()))
                .filter(|d| !d.is_zero())
            {
                wait = wait.min(left);
                continue;
            }
            match start_publisher(oid) {
                Ok(worker) => {
                    self.started.insert(
                        oid,
                        Started {
                            worker,
                            at: Instant::now(),
                        },
                    );
                    self.logged
                        .retain(|p| !p.contains("raise max_worker_processes"));
                }
                Err(()) => {
                    let problem = "no background worker slot is free for the publisher; raise max_worker_processes";
                    let mut slot = PUBLISHERS.exclusive();
                    let s = &mut slot.0[i];
                    s.used = true;
                    s.db = oid;
                    s.state = WorkerState::Stopped;
                    s.set_error(problem, now_ms());
                    drop(slot);
                    self.once(format!("outbox launcher: database {oid}: {problem}"));
                    self.stopped_at.insert(oid, Instant::now());
                    wait = wait.min(LOOK_EVERY);
                }
            }
        }
        // A publisher that started moments ago may stop again at once (no
        // extension): look soon after, so a restart is not 10 s late.
        if self
            .started
            .values()
            .any(|s| s.at.elapsed() < Duration::from_secs(2))
        {
            wait = wait.min(RESTART);
        }
        wait
    }

    /// The oids of the databases wanted now.
    fn wanted(&mut self, catalog: &[Database]) -> Vec<u32> {
        let mut problems = HashSet::new();
        let wanted = match guc::databases() {
            Databases::All => catalog.iter().filter(|d| d.open).map(|d| d.oid).collect(),
            Databases::Names(names) => names
                .iter()
                .filter_map(|name| match catalog.iter().find(|d| &d.name == name) {
                    Some(d) if d.open => Some(d.oid),
                    Some(_) => {
                        problems.insert(format!(
                            "outbox.database names \"{name}\", which does not accept connections (or is a template); it is not served"
                        ));
                        None
                    }
                    None => {
                        problems.insert(format!(
                            "outbox.database names \"{name}\", which does not exist; it is served once it is created"
                        ));
                        None
                    }
                })
                .collect(),
        };
        // Logged once while they last (and again if they come back).
        self.logged
            .retain(|p| !p.starts_with("outbox.database") || problems.contains(p));
        for p in problems {
            if self.logged.insert(p.clone()) {
                log!("{p}");
            }
        }
        wanted
    }

    fn once(&mut self, problem: String) {
        if self.logged.insert(problem.clone()) {
            warning!("{problem}");
        }
    }
}

/// The entry of `oid`, taken if it has none (None: every entry is taken),
/// and the database whose absent entry was taken back for it.
fn entry(oid: u32) -> Option<(usize, &'static crate::shmem::Db, Option<u32>)> {
    if let Some((i, db)) = crate::shmem::db_of(pg_sys::Oid::from(oid)) {
        return Some((i, db, None));
    }
    let dbs = &SHARED.get().dbs;
    let free = dbs
        .iter()
        .enumerate()
        .find(|(_, d)| d.oid.load(Ordering::Acquire) == 0);
    // None free: one of a database without the extension (under `*`) is
    // taken back, so those cannot crowd out one that has it.
    let (i, db) = free.or_else(|| {
        dbs.iter().enumerate().find(|(_, d)| {
            let oid = d.oid.load(Ordering::Acquire);
            d.is_absent()
                && d.dropping.load(Ordering::Acquire) == 0
                && !alive(d.publisher_pid.load(Ordering::Acquire))
                && !SLOTS.share().0.iter().any(|s| s.used && s.db == oid)
        })
    })?;
    let taken = Some(db.oid.load(Ordering::Acquire)).filter(|o| *o != 0);
    db.reset();
    PUBLISHERS.exclusive().0[i] = Slot::EMPTY;
    db.oid.store(oid, Ordering::Release);
    Some((i, db, taken))
}

fn start_publisher(oid: u32) -> Result<DynamicBackgroundWorker, ()> {
    BackgroundWorkerBuilder::new(&format!("outbox publisher {oid}"))
        .set_type("outbox publisher")
        .set_library("outbox_pg")
        .set_function("outbox_publisher_main")
        .set_argument(Some(pg_sys::Datum::from(oid)))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // The launcher restarts it (or not: a dropped database).
        .set_restart_time(None)
        // Its stop sets the launcher's latch.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .map_err(|_| ())
}

/// Asks the workers of database `oid` to leave (the publisher, and the
/// consumers, which see the entry no longer served and exit for good);
/// true while one is still running.
pub fn stop_workers(oid: u32, publisher: i32) -> bool {
    let mut left = false;
    let mut pids: Vec<i32> = SLOTS
        .share()
        .0
        .iter()
        .filter(|s| s.used && s.db == oid && s.pid > 0)
        .map(|s| s.pid)
        .collect();
    pids.push(publisher);
    for pid in pids {
        // SAFETY: a look-up in the proc array; the pid is signalled only
        // while it is a process connected to that database (a pid left in
        // a slot may have been reused by another process since).
        let ours = unsafe {
            let proc_ = pg_sys::BackendPidGetProc(pid);
            pid > 0 && !proc_.is_null() && (*proc_).databaseId.to_u32() == oid
        };
        if ours {
            unsafe { libc::kill(pid, libc::SIGTERM) };
            left = true;
        }
    }
    left
}

/// Whether `pid` is a live backend or worker.
fn alive(pid: i32) -> bool {
    // SAFETY: a look-up in the proc array.
    pid > 0 && unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }
}

/// Frees the consumer slots of database `oid` (none of its workers runs).
fn free_slots(oid: u32) {
    for s in SLOTS.exclusive().0.iter_mut().filter(|s| s.db == oid) {
        *s = Slot::EMPTY;
    }
}

/// Every row of `pg_database` (a shared catalog: readable without a
/// database connection), read in a transaction of its own.
fn databases() -> Vec<Database> {
    BackgroundWorker::transaction(|| {
        let mut list = Vec::new();
        // SAFETY: a catalog scan in a transaction, as the autovacuum
        // launcher does; every tuple is read before the next is fetched.
        unsafe {
            let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
            let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, lock);
            let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
            loop {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                // GETSTRUCT: the fixed-size columns follow the header.
                let data = (*tuple).t_data;
                let form = &*data
                    .cast::<u8>()
                    .add((*data).t_hoff as usize)
                    .cast::<pg_sys::FormData_pg_database>();
                let name = std::ffi::CStr::from_ptr(form.datname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                list.push(Database {
                    oid: form.oid.to_u32(),
                    name,
                    // -2: a database whose DROP was interrupted (invalid).
                    open: form.datallowconn && !form.datistemplate && form.datconnlimit != -2,
                });
            }
            pg_sys::heap_endscan(scan);
            pg_sys::table_close(rel, lock);
        }
        list
    })
}
