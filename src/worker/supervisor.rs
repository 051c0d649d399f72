//! The supervisor (run by the publisher worker): keeps one consumer worker
//! per row of `outbox.subscriptions`, started as a dynamic background worker
//! in a reserved shared-memory *slot*. A consumer stops itself when its
//! subscription goes away; the postmaster restarts one that crashed.
//!
//! Vocabulary: the subscriptions *generation* (shared memory) is bumped at
//! the commit of every change to them; the supervisor has *seen* the one it
//! last acted on. The generation, not the commit wake-up that comes with
//! it, says whether to look again: the publisher consumes wake-ups for its
//! own work (a batch after a reconnect takes the commit count), so it asks
//! [`Supervisor::pending`] at every wake-up and before every sleep.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::prelude::*;
use pgrx::spi::Spi;

use crate::guc;
use crate::shmem::SLOTS;

/// A reservation whose worker never took it is given up after this long.
const STALE_RESERVATION_MS: i64 = 10_000;

#[derive(Default)]
pub struct Supervisor {
    /// The subscriptions generation last acted on.
    seen: Option<u64>,
    /// The last problem logged (logged once).
    logged: Option<String>,
    /// The extension's tables are gone (DROP EXTENSION).
    pub gone: bool,
}

use crate::shmem::now_ms;

fn generation() -> u64 {
    crate::shmem::mine().subscriptions.load(Ordering::Acquire)
}

impl Supervisor {
    /// Whether subscriptions changed since the supervisor last looked (one
    /// atomic load: cheap enough for every wake-up of the publisher).
    /// The generation the supervisor last acted on.
    pub fn generation_seen(&self) -> Option<u64> {
        self.seen
    }

    pub fn pending(&self) -> bool {
        self.seen != Some(generation())
    }

    /// Starts the missing consumers when subscriptions changed (or `force`).
    pub fn run(&mut self, force: bool) {
        // Read before the table: a change committed after this read bumps
        // the generation again, so `pending` stays true until it is seen.
        let generation = generation();
        if !force && self.seen == Some(generation) {
            return;
        }
        self.seen = Some(generation);
        let names: Option<Vec<String>> = BackgroundWorker::transaction(|| {
            if !super::table_exists("subscriptions") {
                return None;
            }
            Spi::connect(|c| {
                c.select(
                    "SELECT name FROM outbox.subscriptions ORDER BY created, name",
                    None,
                    &[],
                )
                .map(|rows| {
                    rows.filter_map(|r| r.get::<String>(1).ok().flatten())
                        .collect()
                })
                .ok()
            })
            .or(Some(Vec::new()))
        });
        let Some(names) = names else {
            self.gone = true;
            return;
        };
        let limit = (guc::MAX_CONSUMERS.get().max(0) as usize).min(crate::guc::CONSUMER_SLOTS);
        for name in names {
            if let Err(problem) = self.ensure(&name, limit)
                && self.logged.as_deref() != Some(problem.as_str())
            {
                warning!("outbox supervisor: {problem}");
                // Shown in outbox.status too (the consumer may have no slot).
                crate::status::Reporter::Publisher.error(&problem);
                self.logged = Some(problem);
            }
        }
    }

    /// Makes sure a worker runs (or is starting) for `name`.
    fn ensure(&mut self, name: &str, limit: usize) -> Result<(), String> {
        let index = {
            let db = crate::shmem::my_db();
            let mut slots = SLOTS.exclusive();
            let now = now_ms();
            if let Some(s) = slots
                .0
                .iter()
                .find(|s| s.used && s.db == db && s.name() == name)
            {
                // A worker that died without a restart left its pid.
                let dead = s.pid != 0 && unsafe { pg_sys::BackendPidGetProc(s.pid).is_null() };
                let stale = dead || (s.pid == 0 && now - s.reserved_at > STALE_RESERVATION_MS);
                if !stale {
                    return Ok(());
                }
            }
            if let Some(s) = slots
                .0
                .iter_mut()
                .find(|s| s.used && s.db == db && s.name() == name)
            {
                *s = crate::shmem::Slot::EMPTY;
            }
            if slots.0.iter().filter(|s| s.used && s.db == db).count() >= limit {
                return Err(format!(
                    "subscription \"{name}\" has no consumer: outbox.max_consumers ({limit}) are running"
                ));
            }
            let Some((i, slot)) = slots.0.iter_mut().enumerate().find(|(_, s)| !s.used) else {
                return Err(format!(
                    "subscription \"{name}\" has no consumer: no free slot"
                ));
            };
            *slot = crate::shmem::Slot::EMPTY;
            slot.used = true;
            slot.db = db;
            slot.reserved_at = now;
            slot.set_name(name);
            i
        };
        let started = BackgroundWorkerBuilder::new(&format!("outbox consumer {name}"))
            .set_type("outbox consumer")
            .set_library("outbox_pg")
            .set_function("outbox_consumer_main")
            .set_extra(name)
            // Its database, which it checks before connecting.
            .set_argument(Some(pg_sys::Datum::from(crate::shmem::my_db())))
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(Some(Duration::from_secs(1)))
            .load_dynamic();
        if started.is_err() {
            let problem = format!(
                "could not start a consumer for subscription \"{name}\": no background worker slot is free; raise max_worker_processes"
            );
            // Kept, stopped, with the reason, so that outbox.status shows
            // it; the reservation goes stale and is tried again.
            let mut slots = SLOTS.exclusive();
            let slot = &mut slots.0[index];
            slot.state = crate::shmem::WorkerState::Stopped;
            slot.set_error(&problem, now_ms());
            return Err(problem);
        }
        debug1!("outbox supervisor: started a consumer for subscription \"{name}\"");
        Ok(())
    }
}
