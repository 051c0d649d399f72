//! The *floor*: where the publisher's look from the start begins. Rows
//! below it are known to be final (published or failed), so a look walks
//! none of the index entries they left behind (a burst leaves one dead
//! entry per row in the work-list index until VACUUM; walking them made
//! every later look slower).
//!
//! A row may become visible late, below rows already sent: its transaction
//! took its id, then committed after later ones. So the floor only rises
//! to ids that are *settled*: `last` (the id sequence's last value) is
//! read, then the transactions running in this database are noted; once
//! all of them have ended, every id up to `last` belongs to a transaction
//! that has ended, and a look from the old floor sees them all — the
//! floor rises to the first scheduled row it finds, or past `last`. A
//! change the publisher does not make itself (`outbox.retry_failed()`, a
//! hand-written UPDATE) can put a row back below it: the floor returns to
//! the start when the workers are woken for one, and now and then; also
//! when the sequence went back (a TRUNCATE ... RESTART IDENTITY). With a
//! sequence that caches ids per session, cycles or counts down, ids do not
//! follow the order they were taken in, and the floor stays at the start.

use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pgrx::spi::Spi;

/// How often the floor returns to the start regardless.
const RESET: Duration = Duration::from_secs(60);

pub struct Floor {
    /// First id a look from the start reads.
    pub at: i64,
    /// The sequence's last value and the transactions then running.
    pending: Option<(i64, Vec<pg_sys::VirtualTransactionId>)>,
    /// The pending transactions have all ended: the next look may rise.
    settled: Option<i64>,
    reset_at: Instant,
}

impl Default for Floor {
    fn default() -> Floor {
        Floor {
            at: 0,
            pending: None,
            settled: None,
            reset_at: Instant::now(),
        }
    }
}

impl Floor {
    /// Back to the start (a row may have been put back below).
    pub fn reset(&mut self) {
        *self = Floor::default();
    }

    /// Before a look from the start, in a transaction of its own (the
    /// look's snapshot must be taken after it): notes the transactions
    /// now running, or finds that those noted have ended.
    pub fn prepare(&mut self) {
        if self.reset_at.elapsed() >= RESET {
            self.reset();
        }
        // Ids follow the order they were taken in only from a sequence
        // that hands them out one at a time, upwards, without cycling;
        // otherwise the floor stays at the start.
        let seq = Spi::get_two::<i64, bool>(
            "SELECT coalesce(pg_catalog.pg_sequence_last_value(s.seqrelid), 0), \
                    s.seqcache OPERATOR(pg_catalog.=) 1 AND NOT s.seqcycle \
                      AND s.seqincrement OPERATOR(pg_catalog.>) 0 \
             FROM pg_catalog.pg_sequence s \
             WHERE s.seqrelid OPERATOR(pg_catalog.=) 'outbox.published_id_seq'::pg_catalog.regclass",
        );
        let last = match seq {
            Ok((Some(last), Some(true))) => last,
            _ => {
                self.reset();
                return;
            }
        };
        if last + 1 < self.at {
            // The sequence went back (TRUNCATE ... RESTART IDENTITY).
            self.reset();
        }
        match &self.pending {
            Some((noted, running)) => {
                // SAFETY: a non-blocking look at each noted transaction.
                let ended = running
                    .iter()
                    .all(|v| unsafe { pg_sys::VirtualXactLock(*v, false) });
                if ended {
                    self.settled = Some(*noted);
                    self.pending = None;
                }
            }
            None if self.settled.is_none() => self.pending = Some((last, running())),
            None => {}
        }
    }

    /// In the look's transaction, after `prepare`: rises when settled.
    pub fn rise(&mut self) {
        let Some(last) = self.settled.take() else {
            return;
        };
        let first = super::write_one::<i64>(
            "SELECT min(id) FROM outbox.published WHERE status = 'scheduled' AND id >= $1",
            &[pgrx::datum::DatumWithOid::from(self.at)],
        )
        .ok()
        .flatten();
        let to = first.map_or(last + 1, |f| f.min(last + 1));
        self.at = self.at.max(to);
    }
}

/// The transactions running now in this database (but ours).
fn running() -> Vec<pg_sys::VirtualTransactionId> {
    let mut n = 0;
    // SAFETY: PostgreSQL returns a palloc'd array of `n` entries.
    unsafe {
        let v = pg_sys::GetCurrentVirtualXIDs(
            pg_sys::InvalidTransactionId,
            false,
            false,
            pg_sys::PROC_IN_VACUUM as i32,
            &mut n,
        );
        if v.is_null() || n <= 0 {
            return Vec::new();
        }
        std::slice::from_raw_parts(v, n as usize).to_vec()
    }
}
