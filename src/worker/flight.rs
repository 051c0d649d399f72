//! Frames in flight: how the publisher keeps the broker busy.
//!
//! Vocabulary: a *flight* is one batch's rows sent as SEND frames whose
//! *receipts* have not all come back; the publisher keeps several in the
//! air (the next batch goes out while the receipts of the last arrive), so
//! the broker never waits for the database, nor the database for the
//! broker. A flight is made of *units*, each confirmed by one receipt: a
//! single SEND on RabbitMQ (which confirms each persistent message once
//! stored), a STOMP *transaction* of up to `TX_ROWS` SENDs on ActiveMQ (which
//! handles receipted persistent SENDs one at a time per connection, and a
//! transaction's COMMIT at once). A row is *confirmed* when its unit's
//! receipt came; *refused* when the broker's ERROR names its (single-row)
//! unit, or when, the connection surviving, it is the one frame left
//! unreceipted per ERROR; otherwise its fate is *unknown* (the publisher
//! then isolates it). Nothing here touches PostgreSQL.
//!
//! A transaction's SENDs are followed by a *marker*: an empty transaction
//! begun with a receipt and aborted. The broker handles a connection's
//! frames in order, so the marker's receipt says that every SEND before it
//! was taken, and an ERROR naming nothing that comes before it (ActiveMQ's
//! answer to a refused SEND without a receipt) belongs to that
//! transaction. A receipt on each SEND would say the same, but ActiveMQ
//! then handles them one at a time (a third of the pace). A transaction is
//! *committed* once its marker came back and the COMMIT before it was
//! answered; ActiveMQ sends that ERROR from another thread, so it may come
//! after the marker, but then the transaction is rollback-only and its
//! COMMIT fails: nothing after a refused SEND is committed either way. A transaction that had one is *doomed*: it
//! and every later one still open are *aborted*; the doomed one's rows are
//! then isolated (the refused row is charged alone), the others' are sent
//! again in order.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::stomp::client::{Connection, ERROR_GRACE, StompError};
use crate::stomp::frame::{Command, Frame};

/// Rows per STOMP transaction on ActiveMQ.
pub const TX_ROWS: usize = 100;

/// How a broker is best kept busy.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Style {
    /// One receipt per SEND (RabbitMQ, and any broker not known).
    Receipts,
    /// Transactions of up to this many SENDs, one receipt on the COMMIT.
    Transactions(usize),
}

impl Style {
    /// From CONNECTED's `server` header (`ActiveMQ/5.17.2`).
    pub fn of(server: Option<&str>) -> Style {
        match server {
            // ActiveMQ Classic; Artemis says `ActiveMQ-Artemis/...`.
            Some(s) if s.starts_with("ActiveMQ/") => Style::Transactions(TX_ROWS),
            _ => Style::Receipts,
        }
    }
}

/// Where a STOMP transaction of a flight stands.
#[derive(Clone, Copy, PartialEq, Debug)]
enum TxState {
    /// BEGIN, SENDs and marker written; the marker's receipt owed.
    Open,
    /// Its marker came back: every SEND was taken.
    Marked,
    /// COMMIT written, its receipt owed.
    Committing,
    /// ABORT written, its receipt owed.
    Aborting,
    /// Its COMMIT or ABORT was answered.
    Done,
}

/// One STOMP transaction of a flight.
#[derive(Debug)]
struct Tx {
    seq: u64,
    /// An ERROR naming nothing came before its marker: one of its SENDs
    /// was refused, it must not be committed.
    doomed: bool,
    /// Its ABORT was written: every later transaction is aborted too.
    aborted: bool,
    state: TxState,
}

/// One flight (see the module header).
#[derive(Default, Debug)]
pub struct Flight {
    /// Its rows, in the order sent.
    pub rows: Vec<i64>,
    /// Receipt id → the rows it confirms.
    units: HashMap<String, Vec<i64>>,
    /// Receipts still owed.
    pending: HashSet<String>,
    pub confirmed: Vec<i64>,
    pub refused: Vec<(i64, String)>,
    /// Rows whose unit the broker's ERROR named, but which may be innocent
    /// (a transaction's other SENDs).
    pub unknown: Vec<i64>,
    /// ERRORs that named no unit of any flight.
    pub unattributed: Vec<String>,
    /// One receipt per row: elimination can find a refused row.
    single: bool,
    /// Transactions still owed a receipt when an ERROR naming nothing came:
    /// the ERROR may be for one of their SENDs, so their COMMIT's receipt
    /// confirms nothing (a broker may commit the rest of a transaction
    /// whose SEND it refused).
    tainted: HashSet<String>,
    /// Its STOMP transactions, in the order sent (none on RabbitMQ).
    txs: Vec<Tx>,
}

impl Flight {
    /// Queues the frames of `rows` (id and its SEND frame, in id order)
    /// and writes them.
    pub fn send(
        conn: &mut Connection,
        rows: Vec<(i64, Frame)>,
        style: Style,
        seq: &mut u64,
    ) -> Result<Flight, StompError> {
        let mut f = Flight {
            single: style == Style::Receipts,
            ..Default::default()
        };
        match style {
            Style::Receipts => {
                for (id, frame) in rows {
                    let receipt = format!("o-{id}");
                    conn.queue(&frame.header("receipt", receipt.as_str()))?;
                    f.add_unit(receipt, vec![id]);
                }
            }
            Style::Transactions(n) => {
                // The COMMITs go out from `advance`, as the markers come
                // back.
                let mut rows = rows.into_iter().peekable();
                while rows.peek().is_some() {
                    *seq += 1;
                    let tx = format!("t-{seq}");
                    conn.queue(&Frame::new(Command::Begin).header("transaction", tx.as_str()))?;
                    let mut ids = Vec::with_capacity(n);
                    for (id, frame) in rows.by_ref().take(n) {
                        conn.queue(&frame.header("transaction", tx.as_str()))?;
                        ids.push(id);
                    }
                    let marker = format!("m-{seq}");
                    conn.queue(
                        &Frame::new(Command::Begin)
                            .header("transaction", marker.as_str())
                            .header("receipt", marker.as_str()),
                    )?;
                    conn.queue(&Frame::new(Command::Abort).header("transaction", marker.as_str()))?;
                    f.pending.insert(marker);
                    f.rows.extend_from_slice(&ids);
                    f.units.insert(format!("c-{seq}"), ids);
                    f.txs.push(Tx {
                        seq: *seq,
                        doomed: false,
                        aborted: false,
                        state: TxState::Open,
                    });
                }
            }
        }
        conn.flush()?;
        Ok(f)
    }

    fn add_unit(&mut self, receipt: String, ids: Vec<i64>) {
        self.rows.extend_from_slice(&ids);
        self.pending.insert(receipt.clone());
        self.units.insert(receipt, ids);
    }

    /// An ERROR naming nothing came and no transaction's marker was owed:
    /// the transaction being committed may hold the refused SEND (its
    /// receipt confirms nothing), and so may those waiting to be (they are
    /// aborted, their rows isolated).
    fn taint(&mut self) {
        for tx in &mut self.txs {
            match tx.state {
                TxState::Committing => {
                    self.tainted.insert(format!("c-{}", tx.seq));
                }
                TxState::Marked => tx.doomed = true,
                _ => {}
            }
        }
    }

    /// Charges an ERROR naming nothing to the first transaction whose
    /// marker is owed (the broker answers in order); false if none is.
    fn doom_first_open(&mut self) -> bool {
        match self.txs.iter_mut().find(|t| t.state == TxState::Open) {
            Some(tx) => {
                tx.doomed = true;
                true
            }
            None => false,
        }
    }

    /// Every receipt came (or was answered by an ERROR), every transaction
    /// was committed or aborted.
    pub fn settled(&self) -> bool {
        self.pending.is_empty() && self.txs.iter().all(|t| t.state == TxState::Done)
    }

    /// Something went wrong in it: nothing more is sent until every flight
    /// has landed (rows after a refused one must not overtake it).
    pub fn troubled(&self) -> bool {
        self.aborted() || !self.unknown.is_empty() || !self.unattributed.is_empty()
    }

    /// Some transaction of it was aborted: its rows go out again.
    pub fn aborted(&self) -> bool {
        self.txs.iter().any(|t| t.aborted)
    }

    /// Takes a receipt or ERROR meant for this flight; false if not ours.
    fn take(&mut self, receipt: &str, error: Option<&str>) -> bool {
        if !self.pending.remove(receipt) {
            return false;
        }
        if let Some(seq) = receipt.strip_prefix("m-") {
            if let Some(tx) = self.txs.iter_mut().find(|t| t.seq.to_string() == seq) {
                if error.is_some() {
                    // The marker itself refused: nothing says its SENDs
                    // were taken.
                    tx.doomed = true;
                }
                if tx.state == TxState::Open {
                    tx.state = TxState::Marked;
                }
            }
            return true;
        }
        if let Some(seq) = receipt.strip_prefix("a-") {
            // An ABORT answered (an ERROR too: the broker may have ended
            // the transaction itself). Its rows are simply missing.
            if let Some(tx) = self.txs.iter_mut().find(|t| t.seq.to_string() == seq) {
                tx.state = TxState::Done;
            }
            return true;
        }
        if let Some(seq) = receipt.strip_prefix("c-")
            && let Some(tx) = self.txs.iter_mut().find(|t| t.seq.to_string() == seq)
        {
            tx.state = TxState::Done;
            if error.is_some() {
                // Not committed (an ERROR for one of its SENDs came late):
                // nothing after it may be.
                tx.aborted = true;
            }
        }
        let ids = &self.units[receipt];
        match error {
            None if self.tainted.contains(receipt) => self.unknown.extend_from_slice(ids),
            None => self.confirmed.extend_from_slice(ids),
            Some(why) if self.single => self.refused.push((ids[0], why.to_string())),
            Some(_) => self.unknown.extend_from_slice(ids),
        }
        true
    }

    /// Rows neither confirmed, refused nor unknown yet.
    pub fn missing(&self) -> Vec<i64> {
        let done: HashSet<i64> = self
            .confirmed
            .iter()
            .chain(self.refused.iter().map(|(id, _)| id))
            .chain(&self.unknown)
            .copied()
            .collect();
        self.rows
            .iter()
            .copied()
            .filter(|id| !done.contains(id))
            .collect()
    }
}

/// Writes what the transactions of `flights` (in order) are ready for: the
/// COMMIT of the next whose marker came back, once the COMMIT before it
/// was answered (one at a time: should a COMMIT fail, nothing later was
/// committed; the SENDs keep the broker busy meanwhile, at the same pace
/// as pipelined COMMITs); an ABORT for a doomed one, and for every later
/// one not committed (nothing after a refused row may reach a queue before
/// it is sent again). A doomed transaction's rows become unknown (isolated).
fn advance(conn: &mut Connection, flights: &mut [Flight]) -> Result<(), StompError> {
    let mut blocked = false;
    let mut aborting = false;
    let mut wrote = false;
    for f in flights.iter_mut() {
        for tx in f.txs.iter_mut() {
            if tx.aborted {
                // Sticky: what comes after an abort is never committed.
                aborting = true;
                continue;
            }
            if tx.state == TxState::Committing {
                blocked = true;
                continue;
            }
            if !matches!(tx.state, TxState::Open | TxState::Marked) {
                continue;
            }
            // COMMIT or ABORT, with a receipt named after the transaction.
            let mut end = |command: Command, prefix: &str| {
                let receipt = format!("{prefix}-{}", tx.seq);
                let name = format!("t-{}", tx.seq);
                let frame = Frame::new(command)
                    .header("transaction", name.as_str())
                    .header("receipt", receipt.as_str());
                f.pending.insert(receipt);
                wrote = true;
                conn.queue(&frame)
            };
            if aborting || tx.doomed {
                end(Command::Abort, "a")?;
                if tx.doomed {
                    f.unknown
                        .extend_from_slice(&f.units[&format!("c-{}", tx.seq)]);
                }
                tx.state = TxState::Aborting;
                tx.aborted = true;
                aborting = true;
            } else if !blocked && tx.state == TxState::Marked {
                end(Command::Commit, "c")?;
                tx.state = TxState::Committing;
            } else {
                blocked = true;
            }
        }
    }
    if wrote {
        conn.flush()?;
    }
    Ok(())
}

/// Reads one frame (waiting at most `wait`) into `flights`: Ok(None) when
/// none came, Ok(Some(true)) for an ERROR. Frames that belong to no
/// flight go to `other`.
fn read_into(
    conn: &mut Connection,
    flights: &mut [Flight],
    wait: Duration,
    other: &mut Vec<Frame>,
) -> Result<Option<bool>, StompError> {
    match conn.read_frame(wait) {
        Ok(Some(f)) if f.command == Command::Receipt => {
            let id = f.get("receipt-id").unwrap_or_default();
            if !flights.iter_mut().any(|fl| fl.take(id, None)) {
                other.push(f);
            }
            Ok(Some(false))
        }
        Ok(Some(f)) => {
            other.push(f);
            Ok(Some(false))
        }
        Ok(None) => Ok(None),
        Err(e @ StompError::Broker { .. }) => {
            let why = e.to_string();
            let named = match &e {
                // One naming a receipt of no flight in the air answers a
                // flight that landed already: it says nothing of these.
                StompError::Broker {
                    receipt_id: Some(r),
                    ..
                } => {
                    flights.iter_mut().any(|fl| fl.take(r, Some(&why)));
                    true
                }
                _ => false,
            };
            if !named && !flights.iter_mut().any(Flight::doom_first_open) {
                flights.iter_mut().for_each(Flight::taint);
                if let Some(first) = flights.first_mut() {
                    first.unattributed.push(why);
                }
            }
            Ok(Some(true))
        }
        Err(e) => Err(e),
    }
}

/// Takes the broker's answers already read, without waiting, and writes
/// the COMMITs they allow: called before a new flight goes out, so the
/// broker is not kept waiting for a COMMIT while the database works.
pub fn take_ready(conn: &mut Connection, flights: &mut [Flight]) -> Result<(), StompError> {
    let mut other = Vec::new();
    let result = loop {
        match read_into(conn, flights, Duration::ZERO, &mut other) {
            Ok(Some(_)) => {}
            Ok(None) => break advance(conn, flights),
            Err(e) => break Err(e),
        }
    };
    for f in other.into_iter().rev() {
        conn.push_back(f);
    }
    result
}

/// Reads the broker's answers into `flights` until the first is settled —
/// or, once any ERROR came or a transaction was aborted, until all are (at
/// most `ERROR_GRACE` more after an ERROR). Frames that belong to no
/// flight are kept for later reads. Err: the connection is gone (or
/// silent past `timeout`); what came before counts.
pub fn collect(
    conn: &mut Connection,
    flights: &mut [Flight],
    timeout: Duration,
) -> Result<(), StompError> {
    let mut deadline = Instant::now() + timeout;
    if flights.iter().any(|f| !f.unattributed.is_empty()) {
        deadline = deadline.min(Instant::now() + ERROR_GRACE);
    }
    let mut other = Vec::new();
    let result = loop {
        if let Err(e) = advance(conn, flights) {
            break Err(e);
        }
        let troubled = flights
            .iter()
            .any(|f| !f.unattributed.is_empty() || f.aborted());
        let done = if troubled {
            flights.iter().all(Flight::settled)
        } else {
            flights.first().is_none_or(Flight::settled)
        };
        if done {
            break Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match read_into(conn, flights, left, &mut other) {
            Ok(Some(false)) => {}
            Ok(Some(true)) => deadline = deadline.min(Instant::now() + ERROR_GRACE),
            // An ERROR's grace ended: what has not come is judged missing,
            // unless a transaction is still open on the broker (the
            // connection then ends, and the broker drops it).
            Ok(None)
                if flights.iter().any(|f| !f.unattributed.is_empty())
                    && flights
                        .iter()
                        .all(|f| f.txs.iter().all(|t| t.state == TxState::Done)) =>
            {
                break Ok(());
            }
            Ok(None) => break Err(StompError::Timeout("receipts")),
            Err(e) => break Err(e),
        }
    };
    for f in other.into_iter().rev() {
        conn.push_back(f);
    }
    result
}

/// After an ERROR no flight could be charged with: rows refused by
/// elimination (the connection survived, every flight has one receipt per
/// row, and exactly as many rows are missing as ERRORs came; or the row was
/// sent alone and `charge_alone`: the publisher saw it end two connections
/// in a row), else the rows whose fate is unknown (to isolate).
pub fn eliminate(flights: &mut [Flight], connection_alive: bool, charge_alone: bool) -> Vec<i64> {
    let errors: Vec<String> = flights
        .iter_mut()
        .flat_map(|f| std::mem::take(&mut f.unattributed))
        .collect();
    let missing: Vec<(usize, i64)> = flights
        .iter()
        .enumerate()
        .flat_map(|(i, f)| f.missing().into_iter().map(move |id| (i, id)))
        .collect();
    let mut unknown: Vec<i64> = flights
        .iter_mut()
        .flat_map(|f| std::mem::take(&mut f.unknown))
        .collect();
    let single = flights.iter().all(|f| f.single);
    let alone = flights.iter().map(|f| f.rows.len()).sum::<usize>() == 1;
    if errors.is_empty() {
        // Lost without a word: the unconfirmed are simply sent again.
    } else if single
        && missing.len() == errors.len()
        && (connection_alive || (alone && charge_alone))
    {
        // The frames left unreceipted are the refused ones; a frame sent
        // alone is the culprit when the broker closed two connections over
        // it (once could be the broker going away, with a word).
        for ((i, id), why) in missing.into_iter().zip(errors) {
            flights[i].refused.push((id, why));
        }
    } else {
        unknown.extend(missing.iter().map(|(_, id)| id));
    }
    unknown.sort_unstable();
    unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flight(ids: &[i64], single: bool) -> Flight {
        let mut f = Flight {
            single,
            ..Default::default()
        };
        if single {
            for id in ids {
                f.add_unit(format!("o-{id}"), vec![*id]);
            }
        } else {
            f.add_unit("c-1".into(), ids.to_vec());
            f.txs.push(Tx {
                seq: 1,
                doomed: false,
                aborted: false,
                state: TxState::Committing,
            });
        }
        f
    }

    #[test]
    fn a_commit_after_an_error_naming_nothing_confirms_nothing() {
        let mut f = flight(&[1, 2], false);
        f.taint();
        assert!(f.take("c-1", None));
        assert!(f.confirmed.is_empty());
        assert_eq!(f.unknown, [1, 2]);
    }

    #[test]
    fn a_lone_row_is_charged_only_when_known_to_end_connections() {
        let lone = || {
            let mut f = flight(&[7], true);
            f.unattributed.push("connection_forced".into());
            f
        };
        let mut f = lone();
        assert_eq!(eliminate(std::slice::from_mut(&mut f), false, false), [7]);
        assert!(f.refused.is_empty());
        let mut f = lone();
        assert!(eliminate(std::slice::from_mut(&mut f), false, true).is_empty());
        assert_eq!(f.refused.len(), 1);
    }

    #[test]
    fn an_error_naming_nothing_dooms_the_transaction_whose_marker_is_owed() {
        let mut f = Flight::default();
        for seq in 1..=2u64 {
            f.txs.push(Tx {
                seq,
                doomed: false,
                aborted: false,
                state: TxState::Open,
            });
            f.pending.insert(format!("m-{seq}"));
        }
        assert!(f.take("m-1", None));
        assert!(f.doom_first_open());
        assert!(!f.txs[0].doomed && f.txs[1].doomed);
        assert_eq!(f.txs[0].state, TxState::Marked);
        assert!(f.take("m-2", None));
        // No marker owed: an ERROR naming nothing dooms nobody.
        assert!(!f.doom_first_open());
    }

    #[test]
    fn style_from_the_server_header() {
        assert_eq!(
            Style::of(Some("ActiveMQ/5.17.2")),
            Style::Transactions(TX_ROWS)
        );
        assert_eq!(Style::of(Some("RabbitMQ/3.10.8")), Style::Receipts);
        assert_eq!(Style::of(Some("ActiveMQ-Artemis/2.31")), Style::Receipts);
        assert_eq!(Style::of(None), Style::Receipts);
    }

    #[test]
    fn receipts_confirm_their_rows_and_errors_refuse_single_rows() {
        let mut f = flight(&[1, 2, 3], true);
        assert!(f.take("o-1", None));
        assert!(f.take("o-2", Some("too large")));
        assert!(!f.take("o-9", None));
        assert_eq!(f.confirmed, [1]);
        assert_eq!(f.refused, [(2, "too large".to_string())]);
        assert_eq!(f.missing(), [3]);
        assert!(!f.settled());
    }

    #[test]
    fn a_transactions_error_charges_nobody() {
        let mut f = flight(&[1, 2, 3], false);
        assert!(f.take("c-1", Some("bad")));
        assert!(f.refused.is_empty());
        assert_eq!(
            eliminate(std::slice::from_mut(&mut f), true, false),
            [1, 2, 3]
        );
    }

    #[test]
    fn elimination_across_two_flights() {
        let mut a = flight(&[1, 2], true);
        let mut b = flight(&[3, 4], true);
        a.take("o-1", None);
        b.take("o-3", None);
        b.take("o-4", None);
        a.unattributed.push("unknown destination".into());
        let mut both = [a, b];
        assert!(eliminate(&mut both, true, false).is_empty());
        assert_eq!(both[0].refused, [(2, "unknown destination".to_string())]);
        // Lost connection: nobody is charged, the missing are isolated.
        let mut a = flight(&[1, 2], true);
        a.take("o-1", None);
        a.unattributed.push("not_found".into());
        assert_eq!(eliminate(std::slice::from_mut(&mut a), false, true), [2]);
        assert!(a.refused.is_empty());
    }
}
