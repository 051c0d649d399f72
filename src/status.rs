//! Worker status: what each worker tells `outbox.stats()` about itself
//! (state, broker host, counts, last error), written into its slot of
//! shared memory.

use pgrx::pg_sys;

use crate::shmem::{PUBLISHERS, SLOTS, Slot, WorkerState, mine_index, my_db, now_ms};

/// Where a worker reports its status.
#[derive(Clone)]
pub enum Reporter {
    Publisher,
    Consumer(String),
}

impl Reporter {
    fn with(&self, f: impl FnOnce(&mut Slot)) {
        match self {
            Reporter::Publisher => {
                if let Some(i) = mine_index() {
                    f(&mut PUBLISHERS.exclusive().0[i])
                }
            }
            Reporter::Consumer(name) => {
                let db = my_db();
                let mut slots = SLOTS.exclusive();
                if let Some(s) = slots
                    .0
                    .iter_mut()
                    .find(|s| s.used && s.db == db && s.name() == name)
                {
                    f(s);
                }
            }
        }
    }

    pub fn started(&self) {
        let pid = unsafe { pg_sys::MyProcPid };
        let db = my_db();
        self.with(|s| {
            s.used = true;
            s.db = db;
            s.pid = pid;
            s.state = WorkerState::Starting;
            s.started_at = now_ms();
            s.messages = 0;
            s.host_len = 0;
        });
    }

    pub fn connected(&self, host: &str) {
        self.with(|s| {
            s.state = WorkerState::Connected;
            s.set_host(host);
        });
    }

    /// A connection problem: backing off until the next attempt.
    pub fn failed(&self, host: &str, error: &str) {
        self.with(|s| {
            s.state = WorkerState::BackingOff;
            s.set_host(host);
            s.set_error(error, now_ms());
        });
    }

    /// A problem with a message (the connection is fine).
    pub fn error(&self, error: &str) {
        self.with(|s| s.set_error(error, now_ms()));
    }

    /// The commit time of the oldest captured message not yet confirmed
    /// (ms since the epoch; 0: none).
    pub fn waiting(&self, at_ms: i64) {
        self.with(|s| s.waiting_at = at_ms);
    }

    pub fn count(&self, n: u64) {
        if n > 0 {
            self.with(|s| s.messages += n);
        }
    }

    pub fn stopped(&self) {
        self.with(|s| {
            s.state = WorkerState::Stopped;
            s.pid = 0;
        });
    }
}
