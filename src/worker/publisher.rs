//! The publisher: delivers committed outbox rows to the broker.
//!
//! Vocabulary: a *batch* is up to `outbox.batch_size` due scheduled rows in
//! id order, *claimed* (read past the *cursor*, or from the *floor*: see
//! floor.rs) in one short transaction, sent as a *flight* (see flight.rs)
//! while earlier flights' receipts come in, and marked `published` in
//! another short transaction only for the rows whose receipts came back. A *refusal* is a broker
//! ERROR for one frame (a poison message): that row's `retry` grows on the
//! schedule of `outbox.pause_for_retry`/`outbox.wait_retry` until it is
//! `failed`. A *connection failure* (broker down, login refused, connection
//! closed) touches no row: the worker reconnects with backoff. When an
//! ERROR cannot be pinned on one frame (the broker closed the connection
//! and took earlier receipts with it), the unreceipted rows are *isolated*:
//! sent one per batch until the culprit shows itself.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::Spi;

use super::flight::{self, Flight, Style};
use super::link::Link;
use crate::broker;
use crate::guc;
use crate::wake;

/// Flights a drain keeps sent and not yet marked: enough that the broker
/// always has work queued while the database marks and claims (ActiveMQ,
/// which works one transaction at a time, wants about ten in the pipe).
pub(super) const IN_THE_AIR: usize = 3;

/// With nothing scheduled, the worker only wakes at commits; it still looks
/// at the table this often (prepared transactions commit without waking it).
const SAFETY_POLL: Duration = Duration::from_secs(60);

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_publisher_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    crate::latch::in_worker();
    // Started by the launcher for one database (its oid), whose entry says
    // whether it is still wanted: it may have gone meanwhile.
    let oid = pg_sys::Oid::from(arg.value() as u32);
    let Some((index, shared)) = super::entry_to_serve(oid) else {
        super::exit(0);
    };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(oid), None);
    crate::shmem::set_mine(index);
    super::ignore_session_limits();
    super::keep_heap();
    super::pin_search_path();
    publisher_settings();
    let database = BackgroundWorker::transaction(super::database_name);
    // Read before the look: an install committed during it moves the count.
    let installs = shared.installs.load(Ordering::Acquire);
    if !extension_ready() {
        // Started again after a CREATE EXTENSION (or a reload).
        log!(
            "outbox publisher: the extension is not installed in database \"{database}\"; not serving it"
        );
        shared
            .absent
            .store(installs.wrapping_add(1), Ordering::Release);
        super::exit(0);
    }
    // One publisher per database: one started by an earlier launcher
    // (terminated meanwhile) may still run.
    let me = unsafe { pg_sys::MyProcPid };
    loop {
        let holder = shared.publisher_pid.load(Ordering::Acquire);
        if holder != 0 && unsafe { !pg_sys::BackendPidGetProc(holder).is_null() } {
            log!("outbox publisher: database \"{database}\" has one already (pid {holder})");
            super::exit(0);
        }
        // Taken over from a dead holder (or none).
        if shared
            .publisher_pid
            .compare_exchange(holder, me, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            break;
        }
    }
    log!("outbox publisher started for database \"{database}\"");

    let report = crate::status::Reporter::Publisher;
    report.started();
    let mut p = Publisher::new();
    let mut stop = !back_off_after_errors(shared);
    while !stop {
        if super::stopping() || !super::still_served() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            p.reload();
        }
        shared.publisher_busy.store(true, Ordering::Release);
        let mut wait = p.step();
        if p.gone {
            log!("outbox publisher: the extension was dropped from database \"{database}\"");
            p.wal.drop_slot();
            // Not marked absent: the launcher starts it again, and it
            // looks then (a DROP and CREATE in quick turn is served).
            break;
        }
        // A unit of work ends when its flights are marked: a failure
        // between its steps counts as one of the unit.
        if p.window.is_empty() {
            shared.publisher_busy.store(false, Ordering::Release);
            shared.publisher_failures.store(0, Ordering::Release);
        }
        if !wait.is_zero()
            && let Some(flush) = super::idle()
        {
            // Statistics held back: come back for them soon.
            wait = wait.min(flush);
        }
        // A commit's wake-up consumed by a wait on the broker counts too.
        let woken = crate::latch::take_woken();
        stop = !wait.is_zero() && !woken && !p.supervisor.pending() && !super::wait(wait);
    }
    p.disconnect();
    shared.publisher_busy.store(false, Ordering::Release);
    report.stopped();
    let _ = shared
        .publisher_pid
        .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Acquire);
    log!("outbox publisher stopped");
    // The launcher starts it again when its database is still served.
    super::exit(0);
}

/// The publisher's statements are index walks in id order that stop at a
/// batch; right after a burst (no statistics yet) the planner would read
/// the whole backlog through a bitmap and sort it for every batch instead.
/// The publisher runs no user code this would reach but triggers on
/// `outbox.published`.
///
/// Its commits need not wait for the WAL flush either: a mark lost in a
/// crash only sends that message again (at least once, as any failure
/// does), and the drain no longer waits for the disk once per batch.
fn publisher_settings() {
    for name in [
        c"enable_bitmapscan",
        c"enable_seqscan",
        c"synchronous_commit",
        // A plan that had to keep a disabled node costs more than
        // jit_above_cost: compiling it took time and 8 MB of memory.
        c"jit",
    ] {
        // SAFETY: setting a GUC by name from the worker's main thread.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                c"off".as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
    }
}

/// When the last incarnation ended in an error (a full disk failing every
/// batch, say), waits before working again: 1 s, 2 s, 4 s ... up to
/// `outbox.maximum_backoff`, on top of the postmaster's 1 s restart time,
/// instead of re-sending the same batch every second. False when the
/// worker must exit meanwhile.
fn back_off_after_errors(shared: &crate::shmem::Db) -> bool {
    if !shared.publisher_busy.swap(false, Ordering::AcqRel) {
        shared.publisher_failures.store(0, Ordering::Release);
        return true;
    }
    let failures = shared.publisher_failures.fetch_add(1, Ordering::AcqRel) + 1;
    if failures < 2 {
        return true; // the first error: try again after the restart time
    }
    let cap = Duration::from_millis(guc::MAXIMUM_BACKOFF_MS.get().max(1) as u64);
    let wait = Duration::from_secs(1 << (failures - 2).min(20)).min(cap);
    log!(
        "outbox publisher: its work failed {failures} times in a row; waiting {} ms before trying again",
        wait.as_millis()
    );
    let until = Instant::now() + wait;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if left.is_zero() || super::stopping() || !super::still_served() {
            break;
        }
        if !super::wait(left) {
            return false;
        }
    }
    !super::stopping()
}

/// One claimed row.
struct Row {
    id: i64,
    destination: String,
    headers: String,
    body: String,
}

/// What one batch did to the rows it claimed.
#[derive(Default)]
struct Verdict {
    published: Vec<i64>,
    refused: Vec<(i64, String)>,
    /// The connection is gone (rows not receipted stay untouched).
    lost: Option<String>,
    /// Rows whose fate is unknown after an unattributable ERROR.
    isolate: Vec<i64>,
}

struct Publisher {
    link: Link,
    /// Rows with id up to this one are sent one per batch.
    isolate_upto: Option<i64>,
    /// While a backlog drains, each batch starts after the last one's
    /// highest id, so no scan walks the index entries of rows already
    /// published (they stay until vacuum) or rows in flight; a short batch
    /// sends the next scan back to the start (`rescan`, once nothing is in
    /// the air), where retries and late commits are.
    cursor: i64,
    rescan: bool,
    /// Where a look from the start begins (see floor.rs), and the
    /// subscriptions generation it was last reset at.
    floor: super::floor::Floor,
    floor_generation: Option<u64>,
    /// A row sent alone over which the broker closed the connection with
    /// an ERROR (charged if it happens again).
    suspect: Option<i64>,
    /// Flights sent and not yet marked, oldest first (`IN_THE_AIR` at most).
    window: std::collections::VecDeque<Flight>,
    /// STOMP transactions begun on this connection (their ids).
    transactions: u64,
    /// When the table was last looked at, and whether due-later rows remain.
    last_query: Option<Instant>,
    next_due: Option<Instant>,
    idle: bool,
    /// The extension was dropped (the supervisor found no table).
    gone: bool,
    /// Capture in the WAL (see wal.rs), and when its slot was last read:
    /// after which commit count, at what time, and whether that read found
    /// messages (then the next comes at once).
    wal: super::wal::Wal,
    wal_commits: Option<u64>,
    wal_peeked: Option<Instant>,
    wal_busy: bool,
    supervisor: super::supervisor::Supervisor,
    /// When the supervisor last checked every subscription.
    supervised_at: Option<Instant>,
}

impl Publisher {
    fn new() -> Publisher {
        Publisher {
            link: Link::new(
                "outbox publisher".into(),
                crate::status::Reporter::Publisher,
            ),
            isolate_upto: None,
            cursor: 0,
            rescan: true,
            floor: Default::default(),
            floor_generation: None,
            suspect: None,
            window: Default::default(),
            transactions: 0,
            last_query: None,
            next_due: None,
            idle: false,
            gone: false,
            wal: super::wal::Wal::new(),
            wal_commits: None,
            wal_peeked: None,
            wal_busy: false,
            supervisor: Default::default(),
            supervised_at: None,
        }
    }

    fn reload(&mut self) {
        self.link.reload();
        if self.link.conn.is_none() {
            // Reconnecting with new settings: flights in the air are sent
            // again on the new connection.
            self.disconnect();
        }
        // Anything may have changed (batch size, retry schedule): look again.
        self.idle = false;
    }

    fn disconnect(&mut self) {
        self.link.disconnect();
        // Unconfirmed rows are sent again after the reconnect.
        self.window.clear();
        self.cursor = 0;
        self.rescan = true;
    }

    /// Does one unit of work; returns how long to sleep (zero: go on).
    fn step(&mut self) -> Duration {
        let poll = Duration::from_millis(guc::POLL_INTERVAL_MS.get().max(1) as u64);
        // Consumers first, at every wake-up: at start, when subscriptions
        // changed (whichever wake-up brought that), and now and then (a
        // consumer that could not start is tried again).
        let force = self
            .supervised_at
            .is_none_or(|t| t.elapsed() >= SAFETY_POLL.min(poll * 10));
        if force {
            self.supervised_at = Some(Instant::now());
        }
        self.supervisor.run(force);
        if self.supervisor.gone {
            self.gone = true;
            return Duration::ZERO;
        }
        // A capture committed since the slot's last look (the table's
        // look may have taken the commit's wake-up).
        let wal_commit = self.wal.is_ready()
            && self.wal_commits != Some(crate::shmem::mine().captures.load(Ordering::Acquire));
        let wal_behind = wal_commit
            || (self.wal_peeked.is_none_or(|t| t.elapsed() >= poll) && self.wal.behind());
        if self.idle && !self.should_look(poll) && !wal_behind {
            return self.idle_wait(poll);
        }
        if self.window.is_empty() {
            // Not while flights wait for receipts (nothing reads them meanwhile).
            retention();
        }
        if self.link.conn.is_none() {
            let wait = self.link.backing_off();
            if !wait.is_zero() {
                return self.while_away(wait);
            }
            match self.link.connect(
                |_| Ok(()),
                |host, e| format!("could not connect to broker at {host}: {e}"),
            ) {
                Some((host, true)) => {
                    log!("outbox publisher: connected to broker at {host}");
                    // Consumers backing off from the same outage try now.
                    wake::broker_returned();
                }
                Some((host, false)) => debug1!("outbox publisher: connected to broker at {host}"),
                None => {
                    let wait = self.link.backing_off();
                    return self.while_away(wait);
                }
            }
        }
        if self.window.is_empty() && self.wal_due(poll) {
            let receipt_timeout = self.link.config.connect_timeout.max(Duration::from_secs(5));
            let conn = self.link.conn.as_mut().expect("connected");
            let delivered = self
                .wal
                .deliver(conn, &mut self.transactions, receipt_timeout);
            crate::status::Reporter::Publisher.waiting(self.wal.oldest_waiting);
            match delivered {
                Ok(0) => {}
                Ok(_) => {
                    // More waits when the look was cut (looked at again at
                    // once; a capture committed since is seen by its
                    // counter); spilled rows are in the table now. The
                    // table's turn comes first.
                    self.wal_busy = self.wal.cut;
                    self.idle = false;
                    self.rescan = true;
                }
                Err(e) => {
                    self.cursor = 0;
                    self.rescan = true;
                    self.link.broke(e);
                    return self.link.backing_off();
                }
            }
        }
        let wal_busy = self.wal_busy;
        match self.batch() {
            Some(0) if wal_busy => Duration::ZERO,
            Some(0) => {
                if !self.idle {
                    // A backlog has drained: what malloc kept for it goes
                    // back to the system, so the worker's memory stays flat.
                    super::release_free_memory();
                }
                self.idle = true;
                self.idle_wait(poll)
            }
            Some(_) => {
                self.idle = false;
                Duration::ZERO
            }
            // The connection was lost: reconnect after the backoff.
            None => self.link.backing_off(),
        }
    }

    /// Whether to peek at the slot now: captures committed since the last
    /// peek, the last one found messages, or a poll interval passed.
    fn wal_due(&mut self, poll: Duration) -> bool {
        if !self.wal.prepare() || self.wal.held() {
            return false;
        }
        // Cleared first: a capture committed after the load below sets
        // the latch again (a wake-up left pending by a table commit would
        // keep it from doing so).
        crate::shmem::mine()
            .wake_pending
            .store(false, Ordering::Release);
        let commits = crate::shmem::mine().captures.load(Ordering::Acquire);
        let due = self.wal_busy
            || self.wal_commits != Some(commits)
            || self.wal_peeked.is_none_or(|t| t.elapsed() >= poll);
        if due {
            self.wal_commits = Some(commits);
            self.wal_peeked = Some(Instant::now());
            self.wal_busy = false;
        }
        due
    }

    /// With the broker away: captured messages that waited long enough
    /// move into the table; returns how long to sleep.
    fn while_away(&mut self, wait: Duration) -> Duration {
        if !self.wal.prepare() {
            return wait;
        }
        if self.wal.spill_if_due() {
            self.idle = false;
            self.rescan = true;
        }
        crate::status::Reporter::Publisher.waiting(self.wal.oldest_waiting);
        self.wal.spill_due_in().map_or(wait, |d| wait.min(d))
    }

    /// Whether an idle worker should look at the table now.
    fn should_look(&self, poll: Duration) -> bool {
        let now = Instant::now();
        // The latch was set (a commit) if we were woken before the timeout:
        // wait_latch does not say, so any wake-up before the deadline counts.
        self.next_due.is_some_and(|d| d <= now)
            || self
                .last_query
                .is_none_or(|q| now - q >= SAFETY_POLL.max(poll))
            || wake::take_commits()
            // Woken for a change whose wake-up an earlier look took.
            || self.supervisor.generation_seen() != self.floor_generation
    }

    fn idle_wait(&mut self, poll: Duration) -> Duration {
        if let Some(c) = self.link.conn.as_mut()
            && let Err(e) = c.keepalive()
        {
            let why = format!("connection to {} lost while idle: {e}", c.host());
            self.link.lost(why);
        }
        let mut wait = SAFETY_POLL.max(poll);
        if self.wal.behind() {
            // The slot follows the WAL once per poll interval.
            wait = wait.min(poll);
        }
        if let Some(d) = self.next_due {
            wait = wait.min(
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            );
        }
        if let Some(k) = self.link.conn.as_ref().and_then(|c| c.keepalive_due_in()) {
            wait = wait.min(k.max(Duration::from_millis(1)));
        }
        wait
    }

    /// One step of the drain: claims the next batch (in a short
    /// transaction) and sends it while the receipts of the one before come
    /// in, then marks what the broker answered (in another). Some(n): rows
    /// claimed or marked (0: nothing left, the worker may idle); None: the
    /// connection was lost.
    fn batch(&mut self) -> Option<usize> {
        let batch_size = guc::BATCH_SIZE.get().max(1) as i64;
        let isolating = self.isolate_upto.is_some();
        let limit = if isolating { 1 } else { batch_size };
        let receipt_timeout = self.link.config.connect_timeout.max(Duration::from_secs(5));
        // This look covers every commit so far; a later one wakes us again.
        wake::take_commits();
        // Answers read meanwhile release their COMMITs first. After trouble
        // in the air nothing more is sent until every flight has landed;
        // a connection lost here lands them too (what was confirmed counts).
        let mut lost = None;
        if !self.window.is_empty() {
            let conn = self.link.conn.as_mut().expect("connected");
            if let Err(e) = flight::take_ready(conn, self.window.make_contiguous()) {
                lost = Some(e);
            }
        }
        let held = lost.is_some() || self.window.iter().any(Flight::troubled);
        // Back to the start (retries, late commits) only with nothing in
        // the air: rows in flight are still `scheduled`.
        let from_start = self.window.is_empty() && self.rescan;
        if from_start {
            if self.supervisor.generation_seen() != self.floor_generation {
                // Woken for a change (outbox.retry_failed() among them):
                // rows may be scheduled again below the floor.
                self.floor_generation = self.supervisor.generation_seen();
                self.floor.reset();
            }
            // AssertUnwindSafe: an error here ends the worker (it restarts).
            let floor = std::panic::AssertUnwindSafe(&mut self.floor);
            BackgroundWorker::transaction(move || {
                let floor = floor;
                floor.0.prepare()
            });
        }
        let after = if from_start {
            self.floor.at - 1
        } else {
            self.cursor
        };
        let mut floor = std::panic::AssertUnwindSafe(&mut self.floor);
        let (rows, next_due) = if held {
            (Vec::new(), None)
        } else {
            BackgroundWorker::transaction(move || {
                if from_start {
                    floor.rise();
                }
                let after = if from_start { floor.at - 1 } else { after };
                let rows = claim(limit, after);
                let next_due = if (rows.len() as i64) < limit && from_start {
                    seconds_to_next_due(floor.at)
                } else {
                    None
                };
                (rows, next_due)
            })
        };
        if !held {
            self.last_query = Some(Instant::now());
            self.next_due = next_due.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
        }
        let claimed = rows.len();
        self.rescan = (claimed as i64) < limit;
        let conn = self.link.conn.as_mut().expect("connected");
        if let Some(last) = rows.last() {
            self.cursor = last.id;
            let style = if isolating {
                Style::Receipts
            } else {
                Style::of(conn.server())
            };
            let frames = rows
                .iter()
                .map(|r| {
                    (
                        r.id,
                        broker::send_frame(&r.destination, &r.headers, &r.body),
                    )
                })
                .collect();
            match Flight::send(conn, frames, style, &mut self.transactions) {
                Ok(f) => self.window.push_back(f),
                // Whatever of it was written is unconfirmed (sent again);
                // the flights before it land with what they confirmed.
                Err(e) => lost = Some(e),
            }
            super::busy(&format!("sending a batch of {claimed} message(s)"));
        }
        // Flights stay in the air while a backlog drains (full batches);
        // isolating, or at its end (a short batch: a lone message waits for
        // nothing else), every flight lands.
        let keep = if claimed as i64 == limit && !isolating && !held && lost.is_none() {
            IN_THE_AIR - 1
        } else {
            0
        };
        let mut marked = 0;
        if self.window.is_empty()
            && let Some(e) = lost.take()
        {
            self.cursor = 0;
            self.rescan = true;
            self.link.broke(e);
            return None;
        }
        while self.window.len() > keep {
            let conn = self.link.conn.as_mut().expect("connected");
            let read = match lost.take() {
                Some(e) => Err(e),
                None => flight::collect(conn, self.window.make_contiguous(), receipt_timeout),
            };
            let troubled = read.is_err() || self.window.iter().any(Flight::troubled);
            let n = if troubled { self.window.len() } else { 1 };
            let mut landed: Vec<Flight> = self.window.drain(..n).collect();
            // A row sent alone whose connection ended with an ERROR: the
            // second time in a row it is the culprit, not the broker.
            let lone = match landed.as_slice() {
                [f] if f.rows.len() == 1 => Some(f.rows[0]),
                _ => None,
            };
            let ended_over_lone = troubled && read.is_err() && lone.is_some();
            let charge_alone = ended_over_lone && self.suspect == lone;
            self.suspect = if ended_over_lone && !charge_alone {
                lone
            } else {
                None
            };
            let isolate = if troubled {
                flight::eliminate(&mut landed, read.is_ok(), charge_alone)
            } else {
                Vec::new()
            };
            let verdict = Verdict {
                published: landed
                    .iter()
                    .flat_map(|f| f.confirmed.iter().copied())
                    .collect(),
                refused: landed
                    .iter()
                    .flat_map(|f| f.refused.iter().cloned())
                    .collect(),
                lost: read.err().map(|e| e.to_string()),
                isolate,
            };
            marked += landed.iter().map(|f| f.rows.len()).sum::<usize>();
            BackgroundWorker::transaction(|| record(&verdict));
            if verdict.lost.is_none() {
                // A unit of work done: errors before it do not add up.
                crate::shmem::mine()
                    .publisher_failures
                    .store(0, Ordering::Release);
            }
            let sent = verdict.published.len() as u64;
            crate::status::Reporter::Publisher.count(sent);
            if let Some((id, why)) = verdict.refused.last() {
                crate::status::Reporter::Publisher.error(&format!("message {id}: {why}"));
            }
            let isolated_last = isolating
                && verdict.isolate.is_empty()
                && self.isolate_upto.is_some_and(|upto| self.cursor >= upto);
            if isolated_last {
                self.isolate_upto = None;
            }
            if let Some(max) = verdict.isolate.iter().max() {
                self.isolate_upto = Some(self.isolate_upto.map_or(*max, |u| u.max(*max)));
            }
            if troubled {
                // Unconfirmed rows lie behind the cursor: start over so
                // they go out first, in order.
                self.cursor = 0;
                self.rescan = true;
            }
            if let Some(why) = verdict.lost {
                self.window.clear();
                self.link.broke(why);
                return None;
            }
        }
        if claimed + marked > 0 {
            let _ = super::report_stats();
        }
        // Idle only when a look from the start found nothing and nothing
        // is in the air.
        Some(
            if claimed == 0 && (!from_start || !self.window.is_empty()) {
                marked.max(1)
            } else {
                claimed.max(marked)
            },
        )
    }
}

/// Deletes finished rows older than `outbox.days_to_keep_data`, at most
/// once per `outbox.cleanup_interval`, one bounded batch per transaction.
fn retention() {
    let shared = crate::shmem::mine();
    let now = crate::shmem::now_ms();
    let interval = i64::from(guc::CLEANUP_INTERVAL_S.get().max(1)) * 1000;
    let last = shared.cleaned_at.load(Ordering::Acquire);
    if last != 0 && now - last < interval {
        return;
    }
    shared.cleaned_at.store(now, Ordering::Release);
    let mut total = 0i64;
    loop {
        let n = BackgroundWorker::transaction(|| {
            Spi::get_one::<i64>("SELECT outbox._cleanup_batch(5000)")
                .ok()
                .flatten()
                .unwrap_or(0)
        });
        total += n;
        if n == 0 || super::stopping() {
            break;
        }
    }
    if total > 0 {
        log!(
            "outbox publisher: retention deleted {total} rows older than outbox.days_to_keep_data"
        );
    }
}

/// Whether `outbox.published` exists in this database (the extension may
/// not be created yet, or may have been dropped).
fn extension_ready() -> bool {
    BackgroundWorker::transaction(|| super::table_exists("published"))
}

/// The next due rows after `after` (an id), in id order. No row lock: one
/// publisher serves a database, and rows in flight stay behind the cursor
/// (a lock would write every row a second time).
fn claim(limit: i64, after: i64) -> Vec<Row> {
    Spi::connect(|client| {
        let args = [DatumWithOid::from(limit), DatumWithOid::from(after)];
        let rows = super::kept(
            client,
            "SELECT id, destination, headers::text, body::text FROM outbox.published \
             WHERE status = 'scheduled' AND next_attempt_at <= pg_catalog.now() AND id > $2 \
             ORDER BY id LIMIT $1",
            &args,
            false,
        )
        .and_then(|stmt| client.select(stmt, None, &args))
        .unwrap_or_else(|e| error!("outbox publisher: could not read the outbox: {e}"));
        rows.map(|r| Row {
            id: r.get::<i64>(1).ok().flatten().unwrap_or_default(),
            destination: r.get::<String>(2).ok().flatten().unwrap_or_default(),
            headers: r.get::<String>(3).ok().flatten().unwrap_or_default(),
            body: r.get::<String>(4).ok().flatten().unwrap_or_default(),
        })
        .collect()
    })
}

/// Writes the verdict: published rows, refused rows' retry schedule.
fn record(v: &Verdict) {
    Spi::connect_mut(|client| {
        if !v.published.is_empty() {
            let args = [DatumWithOid::from(v.published.clone())];
            super::kept(
                client,
                "UPDATE outbox.published SET status = 'published', published_at = pg_catalog.clock_timestamp() \
                 WHERE id = ANY($1)",
                &args,
                true,
            )
            .and_then(|stmt| client.update(stmt, None, &args))
            .unwrap_or_else(|e| error!("outbox publisher: could not mark rows published: {e}"));
        }
        for (id, why) in &v.refused {
            let max = guc::MAXIMUM_RETRY_ATTEMPTS.get();
            let pause = guc::PAUSE_FOR_RETRY_MS.get() as f64 / 1000.0;
            let wait = guc::WAIT_RETRY_MS.get() as f64 / 1000.0;
            client
                .update(
                    "UPDATE outbox.published SET retry = retry + 1, last_error = $2, \
                       status = CASE WHEN retry + 1 >= $3 THEN 'failed' ELSE 'scheduled' END::outbox.message_status, \
                       next_attempt_at = pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => \
                         CASE WHEN retry + 1 < 2 THEN 0 WHEN retry + 1 = 2 THEN $4 ELSE $5 END) \
                     WHERE id = $1",
                    None,
                    &[
                        DatumWithOid::from(*id),
                        DatumWithOid::from(why.as_str()),
                        DatumWithOid::from(max),
                        DatumWithOid::from(pause),
                        DatumWithOid::from(wait),
                    ],
                )
                .unwrap_or_else(|e| error!("outbox publisher: could not record a refusal: {e}"));
        }
        for (id, why) in &v.refused {
            warning!("outbox publisher: broker refused message {id}: {why}");
        }
    });
}

/// Seconds until the earliest scheduled row that is not yet due, among the
/// first 10,000 scheduled rows by id: read through the work-list index, so
/// it costs the backlog, never a scan of the table (statistics taken during
/// a big backlog would otherwise choose one). Rows beyond those are found
/// by the next look at the latest.
fn seconds_to_next_due(floor: i64) -> Option<f64> {
    super::write_one::<f64>(
        "SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - pg_catalog.clock_timestamp())::float8 \
         FROM (SELECT next_attempt_at FROM outbox.published WHERE status = 'scheduled' AND id >= $1 \
               ORDER BY id LIMIT 10000) AS waiting",
        &[DatumWithOid::from(floor)],
    )
    .ok()
    .flatten()
}
