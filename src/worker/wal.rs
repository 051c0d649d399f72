//! The publisher's half of capture in the WAL (see capture.rs): it owns the
//! database's slot, *peeks* at it (reading does not move it), sends what it
//! finds in commit order with receipts, and *advances* the slot only past
//! transactions whose every message is confirmed by the broker or *spilled*
//! into `outbox.published` (a refused message, one whose fate is unknown,
//! or one that waited longer than `outbox.wal_spill_after` for a broker
//! that is away). Reading a slot is not transactional and its position is
//! saved at checkpoints: after a crash, confirmed messages may come again
//! (at least once), never fewer.
//!
//! Vocabulary: the *target* is the WAL flushed before a peek: every
//! transaction committed before it is in the peek's answer unless the
//! answer was *cut* at the row limit (then only up to its last commit row).

use std::time::{Duration, Instant};

use pgrx::bgworkers::BackgroundWorker;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::Spi;

use super::flight::{self, Flight, Style};
use super::publisher::IN_THE_AIR;
use crate::capture::{self, Captured};
use crate::stomp::client::{Connection, StompError};

/// Rows one peek asks for (complete transactions: PostgreSQL stops after
/// the transaction that reaches it). A row is a chunk of up to 64 kB of
/// messages, so a look holds at most about 128 MB and its last
/// transaction. Each look decodes again from the slot's restart point, so
/// a drain takes big looks.
const PEEK_ROWS: i64 = 2_000;
/// What a look's messages may take, read back whole (a compact chunk's
/// messages share their context, so they take more than its bytes): past
/// it, the look ends after the transaction it is reading (one transaction
/// is always read whole).
const LOOK_BYTES: usize = 64 << 20;
/// How often a database without its slot looks whether it can make it.
const SLOT_RETRY: Duration = Duration::from_secs(60);

/// One transaction's captured messages.
struct Transaction {
    messages: Vec<Captured>,
    /// The end of its commit record: where the slot may advance to.
    end: u64,
    /// Its commit time (PostgreSQL microseconds since 2000).
    committed: i64,
}

/// What a peek found.
struct Peeked {
    transactions: Vec<Transaction>,
    /// Every transaction before the target was read (no cut).
    complete: bool,
    target: u64,
    /// Why the look stopped before a message it cannot read.
    stuck: Option<String>,
}

#[derive(Default)]
pub struct Wal {
    slot: String,
    /// The last look was cut at its row limit: more waits behind it.
    pub cut: bool,
    /// Frames numbered so far (see `deliver`).
    numbered: i64,
    /// The last message found unreadable, and when that was said.
    stuck_said: Option<(String, Instant)>,
    /// No look before this (refused messages could not be stored).
    hold_until: Option<Instant>,
    /// The slot exists.
    ready: bool,
    /// When the slot was last looked for (none yet: now).
    looked_for: Option<Instant>,
    /// The target of the last complete peek: WAL up to it holds nothing
    /// left to send.
    seen_to: std::cell::Cell<u64>,
    /// Since when captured messages wait for a broker that is away.
    waiting_since: Option<Instant>,
    /// The commit time of the oldest message not yet confirmed, for the
    /// status (ms since the epoch; 0: none).
    pub oldest_waiting: i64,
    /// When this publisher last logged a snapshot of running transactions
    /// to let the slot's restart point follow (see `advance`), the restart
    /// point then, and how long until the next may be logged.
    nudged: std::cell::Cell<Option<(Instant, i64, Duration)>>,
}

/// How far the slot's restart point may trail what it confirmed before the
/// publisher logs a snapshot of running transactions: every look decodes
/// the WAL again from that point.
const RESTART_LAG: i64 = 128 << 10;

/// How often such a snapshot may be logged while the restart point follows,
/// and at most how seldom while it does not.
const NUDGE_EVERY: Duration = Duration::from_secs(1);
const NUDGE_MAX: Duration = Duration::from_secs(64);

/// How often a message the publisher cannot read is said again in the log.
const STUCK_SAY_EVERY: Duration = Duration::from_secs(60);

/// How long the slot is left alone after messages the broker refused
/// could not be stored in the table.
const HOLD_AFTER_FAILED_STORE: Duration = Duration::from_secs(1);

/// PostgreSQL's epoch (2000-01-01) in Unix milliseconds.
const PG_EPOCH_MS: i64 = 946_684_800_000;

impl Wal {
    pub fn new() -> Wal {
        allow_plugin();
        Wal {
            slot: capture::slot_name(unsafe { pg_sys::MyDatabaseId }),
            ..Default::default()
        }
    }

    /// Makes sure the slot exists when `wal_level = logical` (at start, and
    /// now and then until it does). True when it does.
    pub fn prepare(&mut self) -> bool {
        if self.ready {
            return true;
        }
        if self.looked_for.is_some_and(|t| t.elapsed() < SLOT_RETRY) {
            return false;
        }
        self.looked_for = Some(Instant::now());
        // SAFETY: reading a GUC variable.
        if unsafe { pg_sys::wal_level } < pg_sys::WalLevel::WAL_LEVEL_LOGICAL as i32 {
            return false;
        }
        if !capture::has_key() {
            // Logged at start; nothing read that could not be checked.
            return false;
        }
        let slot = self.slot.clone();
        let found = BackgroundWorker::transaction(|| {
            super::read_one::<String>(
                "SELECT plugin::text FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[DatumWithOid::from(slot.as_str())],
            )
            .ok()
            .flatten()
        });
        match found {
            Some(plugin) if plugin == capture::PLUGIN => {}
            Some(plugin) => {
                warning!(
                    "outbox publisher: slot \"{}\" uses plugin \"{plugin}\", not {}; captured messages are not read",
                    self.slot,
                    capture::PLUGIN
                );
                return false;
            }
            None => {
                // Waits for the transactions running now to end (how a
                // logical slot finds its starting point).
                super::busy("creating the outbox slot");
                let slot = self.slot.clone();
                allow_plugin();
                let made = super::tx::transaction(|| {
                    // 17 and later: a failover slot, synchronized to standbys
                    // that set sync_replication_slots.
                    #[cfg(any(
                        feature = "pg13",
                        feature = "pg14",
                        feature = "pg15",
                        feature = "pg16"
                    ))]
                    let sql = "SELECT 1 FROM pg_catalog.pg_create_logical_replication_slot($1, $2, false, false)";
                    #[cfg(not(any(
                        feature = "pg13",
                        feature = "pg14",
                        feature = "pg15",
                        feature = "pg16"
                    )))]
                    let sql = "SELECT 1 FROM pg_catalog.pg_create_logical_replication_slot($1, $2, false, false, true)";
                    // A read-only statement: a write would give the
                    // transaction an id, and PostgreSQL makes no slot in one.
                    super::read_one::<i32>(
                        sql,
                        &[
                            DatumWithOid::from(slot.as_str()),
                            DatumWithOid::from(capture::PLUGIN),
                        ],
                    )
                    .unwrap_or_else(|e| error!("{e}"));
                });
                if let Err(e) = made {
                    release_slot();
                    // The table mode goes on; tried again later.
                    let why = format!("could not create slot \"{}\": {e}", self.slot);
                    warning!(
                        "outbox publisher: {why}; outbox.capture = 'wal' is refused until it exists (tried again every {} s)",
                        SLOT_RETRY.as_secs()
                    );
                    crate::status::Reporter::Publisher.error(&why);
                    return false;
                }
                log!(
                    "outbox publisher: created slot \"{}\" for outbox.capture = 'wal'",
                    self.slot
                );
            }
        }
        self.ready = true;
        true
    }

    /// One look at the slot with the broker connected: sends what it
    /// finds, spills what the broker would not take, advances. Some(n):
    /// messages handled (0: none waiting); Err: the connection broke (what
    /// was confirmed before counts).
    pub fn deliver(
        &mut self,
        conn: &mut Connection,
        transactions: &mut u64,
        receipt_timeout: Duration,
    ) -> Result<usize, StompError> {
        if !self.ready {
            return Ok(0);
        }
        let Some(peeked) = self.peek(PEEK_ROWS) else {
            return Ok(0);
        };
        self.waiting_since = None;
        // Not looked at again at once when stuck: at the next poll.
        self.cut = !peeked.complete && peeked.stuck.is_none();
        let n: usize = peeked.transactions.iter().map(|t| t.messages.len()).sum();
        self.oldest_waiting = peeked
            .transactions
            .first()
            .map_or(0, |t| t.committed / 1000 + PG_EPOCH_MS);
        if n == 0 {
            self.advance(&peeked, peeked.transactions.len());
            return Ok(0);
        }
        let style = Style::of(conn.server());
        // Frames are numbered below zero (never a row's id) and never twice
        // in the process: a late receipt of an earlier look confirms
        // nothing of this one. Below, messages go by their index.
        let base = self.numbered;
        self.numbered += n as i64;
        let mut frames = Vec::with_capacity(n);
        for m in peeked.transactions.iter().flat_map(|t| &t.messages) {
            let id = -(base + frames.len() as i64) - 1;
            frames.push((
                id,
                crate::broker::send_frame(&m.destination, &m.headers, &m.body),
            ));
        }
        let index = |id: i64| -id - 1 - base;
        super::busy(&format!("sending {n} captured message(s)"));
        let (flights, read) = send_in_flights(conn, frames, style, transactions, receipt_timeout);
        let confirmed: std::collections::HashSet<i64> = flights
            .iter()
            .flat_map(|f| f.confirmed.iter().map(|id| index(*id)))
            .collect();
        let refused: std::collections::HashMap<i64, String> = flights
            .iter()
            .flat_map(|f| f.refused.iter().map(|(id, why)| (index(*id), why.clone())))
            .collect();
        // The transactions confirmed whole, from the first.
        let whole = {
            let mut i = 0;
            let mut whole = 0;
            for t in &peeked.transactions {
                let ids = i..i + t.messages.len() as i64;
                i = ids.end;
                if !ids.clone().all(|id| confirmed.contains(&id)) {
                    break;
                }
                whole += 1;
            }
            whole
        };
        if read.is_err() {
            // Advance past the transactions confirmed whole; the rest is
            // sent again on the next connection.
            crate::status::Reporter::Publisher.count(confirmed.len() as u64);
            self.advance(&peeked, whole);
            return read.map(|_| 0);
        }
        // The connection stands: whatever is not confirmed moves into the
        // table (a refusal counts as the first attempt), then the slot
        // moves past all of it.
        let mut spill = Vec::new();
        for (i, m) in peeked
            .transactions
            .iter()
            .flat_map(|t| &t.messages)
            .enumerate()
        {
            let i = i as i64;
            if !confirmed.contains(&i) {
                spill.push((m, refused.get(&i).cloned()));
            }
        }
        for (m, why) in &spill {
            if let Some(why) = why {
                warning!(
                    "outbox publisher: broker refused captured message {}: {why}",
                    uuid::Uuid::from_bytes(m.message_id)
                );
                crate::status::Reporter::Publisher.error(why);
            }
        }
        let spilled = spill.len();
        if spilled > 0 && !store(&spill) {
            // Not stored: the slot keeps them and they are sent again, but
            // not at once (what was confirmed with them would go again and
            // again while the table cannot be written): the slot moves
            // past the transactions confirmed whole, and waits a while.
            self.cut = false;
            self.hold_until = Some(Instant::now() + HOLD_AFTER_FAILED_STORE);
            self.advance(&peeked, whole);
            return Ok(n);
        }
        crate::status::Reporter::Publisher.count((n - spilled) as u64);
        self.advance(&peeked, peeked.transactions.len());
        Ok(n)
    }

    /// The broker is away: once captured messages have waited
    /// `outbox.wal_spill_after`, they move into the table and the slot
    /// advances (it never holds WAL for long). True when some moved.
    pub fn spill_if_due(&mut self) -> bool {
        if !self.ready {
            return false;
        }
        let after = Duration::from_millis(crate::guc::WAL_SPILL_AFTER_MS.get().max(0) as u64);
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        if since.elapsed() < after {
            return false;
        }
        let mut moved = 0;
        while let Some(peeked) = self.peek(PEEK_ROWS) {
            let messages: Vec<(&Captured, Option<String>)> = peeked
                .transactions
                .iter()
                .flat_map(|t| &t.messages)
                .map(|m| (m, None))
                .collect();
            if !messages.is_empty() && !store(&messages) {
                break;
            }
            moved += messages.len();
            if !self.advance(&peeked, peeked.transactions.len())
                || peeked.complete
                || peeked.stuck.is_some()
            {
                break;
            }
        }
        self.oldest_waiting = 0;
        self.waiting_since = Some(Instant::now());
        if moved > 0 {
            log!(
                "outbox publisher: the broker is away; {moved} captured message(s) moved into outbox.published"
            );
        }
        moved > 0
    }

    /// After a failed read: the slot is made again when it is gone, or when
    /// it lost its WAL (logged: the captured messages it still held are
    /// gone).
    fn look_again(&mut self) {
        let slot = self.slot.clone();
        let state = super::tx::transaction(|| {
            super::read_one::<String>(
                "SELECT coalesce(wal_status, '') FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[DatumWithOid::from(slot.as_str())],
            )
            .unwrap_or_else(|e| error!("{e}"))
        });
        match state {
            Ok(None) => self.ready = false,
            Ok(Some(s)) if s == "lost" => {
                warning!(
                    "outbox publisher: slot \"{slot}\" was invalidated (see max_slot_wal_keep_size): captured messages it still held are lost; making it again"
                );
                self.drop_slot();
            }
            _ => {}
        }
        if !self.ready {
            self.looked_for = None;
        }
    }

    /// Drops the slot (the extension was dropped: nothing reads it again,
    /// and it would hold WAL for good).
    pub fn drop_slot(&mut self) {
        self.ready = false;
        let slot = self.slot.clone();
        // Whether this publisher made it or an earlier one did.
        let dropped = super::tx::transaction(|| {
            super::read_one::<i32>(
                "SELECT 1 FROM pg_catalog.pg_replication_slots s, \
                   LATERAL pg_catalog.pg_drop_replication_slot(s.slot_name) \
                 WHERE s.slot_name = $1 AND s.plugin = $2",
                &[
                    DatumWithOid::from(slot.as_str()),
                    DatumWithOid::from(capture::PLUGIN),
                ],
            )
            .unwrap_or_else(|e| error!("{e}"))
        });
        match dropped {
            Ok(None) => {}
            Ok(Some(_)) => log!("outbox publisher: dropped slot \"{slot}\""),
            Err(e) => warning!("outbox publisher: could not drop slot \"{slot}\": {e}"),
        }
    }

    /// Looks wait (see `hold_until`).
    pub fn held(&self) -> bool {
        self.hold_until.is_some_and(|t| Instant::now() < t)
    }

    /// The slot exists and is read.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Whether WAL was written since the last complete peek (cheap: no
    /// transaction): an idle publisher looks then, so that the slot keeps
    /// up and holds back no WAL.
    pub fn behind(&self) -> bool {
        // SAFETY: reads a position in shared memory.
        self.ready && unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) } > self.seen_to.get()
    }

    /// When the next spill may be due (the broker away).
    pub fn spill_due_in(&self) -> Option<Duration> {
        let after = Duration::from_millis(crate::guc::WAL_SPILL_AFTER_MS.get().max(0) as u64);
        self.waiting_since.filter(|_| self.ready).map(|t| {
            after
                .saturating_sub(t.elapsed())
                .max(Duration::from_millis(10))
        })
    }

    /// Reads the slot up to the WAL flushed now, without moving it (None:
    /// it could not be read, which is logged).
    fn peek(&mut self, rows: i64) -> Option<Peeked> {
        let slot = self.slot.clone();
        let bound = read_bound();
        let read = super::tx::transaction(|| {
            Spi::connect(|c| {
                let target = (
                    format!("{:X}/{:X}", bound >> 32, bound & 0xffff_ffff),
                    bound as i64,
                );
                let args = [
                    DatumWithOid::from(slot.as_str()),
                    DatumWithOid::from(target.0.as_str()),
                    DatumWithOid::from(rows as i32),
                ];
                let rows_read = super::kept(
                    c,
                    "SELECT (lsn OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn)::int8, data \
                     FROM pg_catalog.pg_logical_slot_peek_binary_changes($1, $2::pg_catalog.pg_lsn, $3::int4)",
                    &args,
                    false,
                )
                .and_then(|stmt| c.select(stmt, None, &args))
                .unwrap_or_else(|e| error!("could not read slot \"{slot}\": {e}"));
                let mut transactions = Vec::new();
                let mut open = Vec::new();
                let mut count = 0i64;
                let mut stuck = None;
                let mut taken = 0usize;
                let mut full = false;
                for r in rows_read {
                    if taken > LOOK_BYTES && open.is_empty() && !transactions.is_empty() {
                        // Between transactions: the next one is read next
                        // time (one is always read whole).
                        full = true;
                        break;
                    }
                    count += 1;
                    let lsn = r.get::<i64>(1).ok().flatten().unwrap_or_default() as u64;
                    let data = r.get::<Vec<u8>>(2).ok().flatten().unwrap_or_default();
                    match data.split_first() {
                        Some((b'M', payload)) => match capture::decode(payload) {
                            Some(messages) => {
                                taken += messages
                                    .iter()
                                    .map(|(_, m)| {
                                        64 + m.destination.len() + m.headers.len() + m.body.len()
                                    })
                                    .sum::<usize>();
                                open.extend(messages);
                            }
                            // Signed with the cluster's key, so written by
                            // outbox_pg, in a format this build does not
                            // know (a newer one): never skipped. The look
                            // ends before its transaction (the slot stops
                            // there and waits for a publisher that reads it).
                            None => {
                                stuck = Some(format!(
                                    "the captured message at {:X}/{:X} is in a format this build of outbox_pg does not read; restart the server with the build that wrote it, or a newer one",
                                    lsn >> 32,
                                    lsn & 0xffff_ffff
                                ));
                                break;
                            }
                        },
                        Some((b'C', at)) if at.len() == 8 => transactions.push(Transaction {
                            messages: in_order(&mut open),
                            end: lsn,
                            committed: i64::from_be_bytes(at.try_into().expect("8 bytes")),
                        }),
                        _ => {}
                    }
                }
                Peeked {
                    transactions,
                    complete: count < rows && stuck.is_none() && !full,
                    target: target.1 as u64,
                    stuck,
                }
            })
        });
        match read {
            Ok(p) => {
                if let Some(why) = &p.stuck {
                    crate::status::Reporter::Publisher.error(why);
                    // Logged again once a minute while it stays.
                    let said = self
                        .stuck_said
                        .as_ref()
                        .is_some_and(|(w, t)| w == why && t.elapsed() < STUCK_SAY_EVERY);
                    if !said {
                        warning!("outbox publisher: {why}");
                        self.stuck_said = Some((why.clone(), Instant::now()));
                    }
                }
                Some(p)
            }
            Err(e) => {
                release_slot();
                warning!(
                    "outbox publisher: could not read slot \"{}\": {e}",
                    self.slot
                );
                self.look_again();
                None
            }
        }
    }

    /// Moves the slot past the first `whole` transactions of a peek (past
    /// the target when that is all of a complete peek). Never backwards.
    fn advance(&self, peeked: &Peeked, whole: usize) -> bool {
        let to = if whole == peeked.transactions.len() && peeked.complete {
            peeked.target
        } else if whole == 0 {
            return true;
        } else {
            peeked.transactions[whole - 1].end
        };
        if to == 0 {
            return true;
        }
        let slot = self.slot.clone();
        let lsn = format!("{:X}/{:X}", to >> 32, to & 0xffff_ffff);
        let moved = super::tx::transaction(|| {
            // Read-only, as the slot functions want (see `prepare`).
            super::read_one::<i64>(
                "SELECT count(*) FROM (SELECT pg_catalog.pg_replication_slot_advance(slot_name, $2::pg_catalog.pg_lsn) \
                 FROM pg_catalog.pg_replication_slots \
                 WHERE slot_name = $1 AND confirmed_flush_lsn OPERATOR(pg_catalog.<) $2::pg_catalog.pg_lsn) AS moved",
                &[DatumWithOid::from(slot.as_str()), DatumWithOid::from(lsn.as_str())],
            )
            .unwrap_or_else(|e| error!("{e}"));
            super::read_one::<i64>(
                "SELECT (restart_lsn OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn)::int8 \
                 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[DatumWithOid::from(slot.as_str())],
            )
            .unwrap_or_else(|e| error!("{e}"))
        });
        // The restart point moves only past a snapshot of running
        // transactions, which PostgreSQL logs every 15 s: until then every
        // look decodes again what the slot confirmed (the table mode's
        // rows, other tables' changes). A trailing one gets a snapshot now,
        // which the next looks move past: at most once a second while that
        // works, less and less often (up to once a minute) while it does
        // not (an old transaction anywhere holds the point back, and each
        // snapshot is WAL and a file of its own).
        if let Ok(Some(restart)) = moved
            && to as i64 - restart > RESTART_LAG
        {
            let (due, next) = match self.nudged.get() {
                None => (true, NUDGE_EVERY),
                Some((at, before, _)) if restart != before => {
                    (at.elapsed() >= NUDGE_EVERY, NUDGE_EVERY)
                }
                Some((at, _, every)) => (at.elapsed() >= every, (every * 2).min(NUDGE_MAX)),
            };
            if due {
                self.nudged.set(Some((Instant::now(), restart, next)));
                // SAFETY: a WAL record, as the background writer logs it.
                unsafe {
                    pg_sys::LogStandbySnapshot();
                }
            }
        }
        if let Err(e) = moved {
            // Tried again at the next look; meanwhile messages may be sent
            // twice, never lost.
            release_slot();
            warning!("outbox publisher: could not advance slot \"{slot}\": {e}");
            return false;
        }
        if to == peeked.target {
            self.seen_to.set(to);
        }
        true
    }
}

/// Sends a look's frames as the table's drain does: flights of
/// `outbox.batch_size`, `IN_THE_AIR` of them at once (the next goes out while the
/// receipts of the first come in), none more while one is in trouble.
/// Returns every flight sent, and how the reading ended: an error (the
/// connection broke) or an ERROR no flight could be charged with stops the
/// sending; what was not confirmed is then judged by the caller.
fn send_in_flights(
    conn: &mut Connection,
    frames: Vec<(i64, crate::stomp::frame::Frame)>,
    style: Style,
    transactions: &mut u64,
    receipt_timeout: Duration,
) -> (Vec<Flight>, Result<(), StompError>) {
    let per = crate::guc::BATCH_SIZE.get().max(1) as usize;
    let mut waiting = frames.into_iter().peekable();
    let mut flights: Vec<Flight> = Vec::new();
    // Flights before this one have landed.
    let mut landed = 0;
    // Once a flight is in trouble nothing more goes out (what follows a
    // refused message must not overtake it): the rest is judged unsent.
    let mut troubled = false;
    loop {
        troubled |= flights[landed..].iter().any(Flight::troubled);
        while flights.len() - landed < IN_THE_AIR && !troubled && waiting.peek().is_some() {
            let rows: Vec<_> = waiting.by_ref().take(per).collect();
            match Flight::send(conn, rows, style, transactions) {
                Ok(f) => flights.push(f),
                Err(e) => return (flights, Err(e)),
            }
        }
        while flights.get(landed).is_some_and(Flight::settled) {
            landed += 1;
        }
        if landed == flights.len() {
            if troubled || waiting.peek().is_none() {
                return (flights, Ok(()));
            }
            continue;
        }
        let read = flight::collect(conn, &mut flights[landed..], receipt_timeout);
        if read.is_err() || flights[landed..].iter().any(|f| !f.unattributed.is_empty()) {
            return (flights, read);
        }
    }
}

/// A transaction's messages in the order they were written: by sequence
/// number (chunks of savepoints can be written before their parent's
/// earlier messages). The sort is stable and linear on the usual, sorted
/// input.
fn in_order(open: &mut Vec<(u32, Captured)>) -> Vec<Captured> {
    open.sort_by_key(|(seq, _)| *seq);
    std::mem::take(open).into_iter().map(|(_, m)| m).collect()
}

/// The end of the WAL a look reads up to (and the slot may advance to):
/// the flushed end, which is a record's end except where the walwriter's
/// whole-page flush cut a record at a page boundary. Reading up to such a
/// cut, the decoder would wait for the record's rest (an asynchronous
/// commit's: up to wal_writer_delay, which a captured message then waited
/// too); there, what was inserted is flushed first and its end is the
/// bound.
fn read_bound() -> u64 {
    // SAFETY: positions read from shared memory.
    let flushed = unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) };
    if !flushed.is_multiple_of(u64::from(pg_sys::XLOG_BLCKSZ)) {
        return flushed;
    }
    // SAFETY: as above.
    let inserted = record_end(unsafe { pg_sys::GetXLogInsertRecPtr() });
    if inserted <= flushed {
        return flushed;
    }
    // In a transaction of its own: an error (there should be none, the
    // request being a record's end) ends the flush, not the worker.
    // SAFETY: a flush any process may ask for, up to WAL that was made.
    match super::tx::transaction(|| unsafe { pg_sys::XLogFlush(inserted) }) {
        Ok(()) => inserted,
        Err(_) => flushed,
    }
}

/// Where the next record will start, as the end of the one before it: past
/// a page header when the position is at the start of a page (a long one
/// at the start of a segment), the end is the page's start.
fn record_end(next: u64) -> u64 {
    // SAFETY: a setting fixed at start.
    let segment = unsafe { pg_sys::wal_segment_size } as u64;
    let page = u64::from(pg_sys::XLOG_BLCKSZ);
    let long = std::mem::size_of::<pg_sys::XLogLongPageHeaderData>() as u64;
    let short = std::mem::size_of::<pg_sys::XLogPageHeaderData>() as u64;
    if segment > 0 && next % segment == long {
        next - long
    } else if next % page == short {
        next - short
    } else {
        next
    }
}

/// Lets go of the slot after an error the worker survived: PostgreSQL
/// releases it only at the end of a backend's error recovery, which a
/// worker's caught error does not reach.
fn release_slot() {
    // SAFETY: the process's own slot pointer, released as PostgreSQL does.
    unsafe {
        if !pg_sys::MyReplicationSlot.is_null() {
            pg_sys::ReplicationSlotRelease();
        }
    }
}

/// Lets this session use the extension as an output plugin where
/// PostgreSQL keeps a list of the libraries allowed
/// (`output_plugin_libraries`, a superuser setting since 15.20 and 18.x):
/// only the publisher's own session, which reads only its own messages;
/// other users' sessions keep the server's list.
fn allow_plugin() {
    // SAFETY: reading and setting a GUC by name from the worker's main thread.
    unsafe {
        let current = pg_sys::GetConfigOption(c"output_plugin_libraries".as_ptr(), true, false);
        if current.is_null() {
            return; // a release without the list
        }
        let list = std::ffi::CStr::from_ptr(current)
            .to_string_lossy()
            .into_owned();
        if list.split(',').any(|l| l.trim() == capture::PLUGIN) {
            return;
        }
        let value = if list.trim().is_empty() {
            capture::PLUGIN.to_string()
        } else {
            format!("{list}, {}", capture::PLUGIN)
        };
        let value = std::ffi::CString::new(value).expect("no NUL");
        pg_sys::SetConfigOption(
            c"output_plugin_libraries".as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
    }
}

/// Writes captured messages into `outbox.published` as scheduled rows (a
/// refusal as the first attempt), durably: the slot moves past them next,
/// and a row lost in a crash after that would be a message lost. A row
/// already there (the same message spilled before a crash) is kept. False
/// when they could not be stored (logged): the slot must not move then.
fn store(messages: &[(&Captured, Option<String>)]) -> bool {
    let stored = super::tx::transaction(|| {
        Spi::connect_mut(|c| {
            c.update("SET LOCAL synchronous_commit = on", None, &[])
                .unwrap_or_else(|e| error!("outbox publisher: {e}"));
            for (m, refused) in messages {
                let id = uuid::Uuid::from_bytes(m.message_id).to_string();
                c.update(
                "INSERT INTO outbox.published \
                   (message_id, destination, version, body, headers, retry, last_error) \
                 VALUES ($1::pg_catalog.uuid, $2, $3, $4::pg_catalog.jsonb, $5::pg_catalog.jsonb, $6, $7) \
                 ON CONFLICT (message_id) DO NOTHING",
                None,
                &[
                    DatumWithOid::from(id.as_str()),
                    DatumWithOid::from(m.destination.as_str()),
                    DatumWithOid::from(m.version.as_deref()),
                    DatumWithOid::from(m.body.as_str()),
                    DatumWithOid::from(m.headers.as_str()),
                    DatumWithOid::from(if refused.is_some() { 1i32 } else { 0i32 }),
                    DatumWithOid::from(refused.as_deref()),
                ],
            )
            .unwrap_or_else(|e| error!("{e}"));
            }
        })
    });
    if let Err(e) = &stored {
        warning!("outbox publisher: could not move captured messages into outbox.published: {e}");
    }
    stored.is_ok()
}
