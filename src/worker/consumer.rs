//! A consumer worker: one per subscription, calling its SQL callback once
//! per message id.
//!
//! Vocabulary: the worker *claims* its slot (see supervisor.rs), SUBSCRIBEs
//! as django-outbox-pattern does (client-individual acks, `x-queue-name`,
//! the queue headers, a dead-letter queue `DLQ.<queue>` declared first),
//! and handles each MESSAGE inside one transaction: *record* it in
//! `outbox.received` (inbox.rs), *call* the callback (callback.rs), commit,
//! then ACK. The messages already received share that transaction (a
//! *batch*, see `Consumer::batch`), so a busy queue costs one commit per
//! batch. A callback that raises is rolled back and *retried* (at once,
//! each attempt its own transaction) until `outbox.maximum_retry_attempts`,
//! then *dead-lettered* (NACK `requeue:false` → `DLQ.<queue>`); one that
//! returns false is *discarded* (its work rolled back, dead-lettered). A
//! message that cannot even be recorded (a *poison* body, an error outside
//! the callback) is recorded `failed` and dead-lettered at once: nothing a
//! producer sends stops the subscription. While the owner may not execute
//! the callback the subscription is *refused*: nothing runs, the messages
//! stay in the queue, and the status says why.

use std::cell::Cell;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::spi::Spi;

use super::callback::{self, Callback, Message};
use super::inbox::{self, Prepared};
use super::link::Link;
use super::subscription::{self, Subscription};
use super::{keeper, tx};
use crate::guc;
use crate::latch;
use crate::shmem::SLOTS;
use crate::stomp::client::{Connection, StompError};
use crate::stomp::frame::{Command, Frame};

/// Longest sleep between two looks at the subscription and the signals.
const TICK: Duration = Duration::from_millis(500);
/// Idle time after which a consumer gives back what malloc kept.
const TRIM_AFTER: Duration = Duration::from_secs(5);

/// How often a refused subscription looks at its callback's privileges again.
const RECHECK: Duration = Duration::from_secs(1);

/// Most messages handled in one transaction.
const MAX_BATCH: usize = 100;

/// While messages stream in, a batch that is not full waits this long for
/// the next one (and at most `LINGER_MAX` in all): a consumer faster than
/// its broker would otherwise handle a few messages per transaction,
/// paying a commit, an ACK write and the callback's planning for each.
/// Messages *stream* when the last batch held more than one and ended
/// less than `STREAMING` ago; a message after a quiet spell, or in a
/// trickle, does not wait.
const LINGER: Duration = Duration::from_millis(1);
const LINGER_MAX: Duration = Duration::from_millis(2);
const STREAMING: Duration = Duration::from_millis(10);

/// A message whose recording keeps failing on a transient error (a
/// deadlock, say) is tried this many times before it is dead-lettered.
const TRANSIENT_TRIES: u32 = 10;

/// Messages per batch: half the prefetch, so that while one batch runs the
/// broker already refills what the previous batch's ACKs freed (a batch as
/// large as the prefetch would leave the broker waiting after each).
fn batch_size(queue_headers: &[(String, String)]) -> usize {
    let prefetch = queue_headers
        .iter()
        .find(|(k, _)| k == "prefetch-count")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(MAX_BATCH);
    (prefetch / 2).clamp(1, MAX_BATCH)
}

/// `outbox.stomp_queue_headers` as header pairs (numbers and booleans as
/// their text).
fn queue_headers() -> Vec<(String, String)> {
    match serde_json::from_str::<serde_json::Value>(&guc::text(&guc::STOMP_QUEUE_HEADERS)) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::String(s) => Some((k, s)),
                serde_json::Value::Number(n) => Some((k, n.to_string())),
                serde_json::Value::Bool(b) => Some((k, b.to_string())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The subscriptions' generation (bumped at every commit that changed them).
fn generation() -> u64 {
    crate::shmem::mine()
        .subscriptions
        .load(std::sync::atomic::Ordering::Acquire)
}

fn broker_returns() -> u64 {
    crate::shmem::mine()
        .broker_returns
        .load(std::sync::atomic::Ordering::Acquire)
}

// PostgreSQL's SIGTERM handler for backends (pgrx binds it only as a
// function to call, not as a pointer to hand over).
unsafe extern "C-unwind" {
    fn die(signal: std::ffi::c_int);
}

/// What to tell the broker about one message.
enum Verdict {
    Ack,
    /// Call the callback again.
    Retry,
    /// Neither ACK nor NACK: the broker delivers it again after we leave.
    Leave,
    /// NACK with `requeue:false`: to `DLQ.<queue>`.
    DeadLetter,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_consumer_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SIGTERM as every backend has it: a terminate or a shutdown ends the
    // worker wherever it is, inside a callback or a lock wait too (its
    // transaction rolls back; the broker delivers the message again).
    #[cfg(not(feature = "pg18"))]
    use pg_sys::pqsignal;
    // 18's pqsignal is a macro for the backend's pqsignal_be.
    #[cfg(feature = "pg18")]
    use pg_sys::pqsignal_be as pqsignal;
    // SAFETY: installing PostgreSQL's own handler.
    unsafe { pqsignal(libc::SIGTERM, Some(die)) };
    latch::in_worker();
    let name = BackgroundWorker::get_extra().to_string();
    // Its database's oid: a consumer restarted after its database was
    // dropped (or is no longer served) leaves for good before connecting.
    let oid = pg_sys::Oid::from(arg.value() as u32);
    let Some((index, _)) = super::entry_to_serve(oid) else {
        // Its slot goes too: when the database is served again, its
        // publisher starts a consumer at once.
        forget_slot(oid.to_u32(), &name);
        super::exit(0);
    };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(oid), None);
    crate::shmem::set_mine(index);
    super::ignore_session_limits();
    super::keep_heap();
    super::pin_search_path();
    if !claim_slot(&name) {
        // Another worker serves this subscription already.
        super::exit(0);
    }
    // However it ends (a FATAL too), the slot stops naming this process.
    // SAFETY: registering a callback PostgreSQL runs at exit.
    unsafe { pg_sys::before_shmem_exit(Some(leave_slot), pg_sys::Datum::from(0)) };
    if let Ok(app) = std::ffi::CString::new(name.clone()) {
        unsafe { pg_sys::pgstat_report_appname(app.as_ptr()) };
    }
    // Read before the row: a change committed after this read is seen by
    // the first look at the generation.
    let generation = generation();
    let Some(sub) = subscription::load(&name) else {
        release_slot(&name);
        super::exit(0);
    };
    log!(
        "outbox consumer \"{name}\" started: {} (queue {})",
        sub.destination,
        sub.queue
    );
    let code = Consumer::new(sub, generation).run();
    release_slot_if(&name, code == 0);
    super::exit(code);
}

/// Takes the slot the supervisor reserved for `name` (or a free one after
/// a restart of shared memory); false if a live worker holds it.
fn claim_slot(name: &str) -> bool {
    let me = unsafe { pg_sys::MyProcPid };
    let db = crate::shmem::my_db();
    let mut slots = SLOTS.exclusive();
    if let Some(s) = slots
        .0
        .iter_mut()
        .find(|s| s.used && s.db == db && s.name() == name)
    {
        if s.pid != 0 && s.pid != me && unsafe { !pg_sys::BackendPidGetProc(s.pid).is_null() } {
            return false;
        }
        s.pid = me;
        return true;
    }
    match slots.0.iter_mut().find(|s| !s.used) {
        Some(s) => {
            *s = crate::shmem::Slot::EMPTY;
            s.used = true;
            s.db = db;
            s.pid = me;
            s.set_name(name);
            true
        }
        None => false,
    }
}

/// Frees the slot of subscription `name` of database `db` when no live
/// worker holds it.
fn forget_slot(db: u32, name: &str) {
    let mut slots = SLOTS.exclusive();
    if let Some(s) = slots.0.iter_mut().find(|s| {
        s.used
            && s.db == db
            && s.name() == name
            && (s.pid == 0 || unsafe { pg_sys::BackendPidGetProc(s.pid).is_null() })
    }) {
        *s = crate::shmem::Slot::EMPTY;
    }
}

/// At exit: the slot that names this process is left reserved for the
/// restart (the postmaster starts the worker again after a second).
#[pg_guard]
unsafe extern "C-unwind" fn leave_slot(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    let me = unsafe { pg_sys::MyProcPid };
    let mut slots = SLOTS.exclusive();
    if let Some(s) = slots.0.iter_mut().find(|s| s.used && s.pid == me) {
        s.pid = 0;
        s.reserved_at = crate::shmem::now_ms();
    }
}

fn release_slot(name: &str) {
    release_slot_if(name, true);
}

/// Frees the slot for good (the subscription is gone), or only forgets
/// the pid (the worker will be restarted into it).
fn release_slot_if(name: &str, for_good: bool) {
    let db = crate::shmem::my_db();
    let mut slots = SLOTS.exclusive();
    if let Some(s) = slots
        .0
        .iter_mut()
        .find(|s| s.used && s.db == db && s.name() == name)
    {
        if for_good {
            *s = crate::shmem::Slot::EMPTY;
        } else {
            s.pid = 0;
            s.reserved_at = crate::shmem::now_ms();
        }
    }
}

struct Consumer {
    sub: Subscription,
    report: crate::status::Reporter,
    link: Link,
    generation: u64,
    /// The callback, resolved; None while the subscription is refused.
    callback: Option<Callback>,
    /// Why the subscription is refused, and when that was last looked at.
    refused: Option<(String, Instant)>,
    message_type: pg_sys::Oid,
    /// Messages per batch, from the prefetch the last SUBSCRIBE asked for.
    batch: usize,
    /// When the last batch was handled, and its size.
    last_batch: Option<(Instant, usize)>,
    /// The current batch met a message id recorded before (so the next
    /// one's plain run records with the statement).
    met_recorded: Cell<bool>,
    /// The message whose callback a plain run is calling (its index).
    calling: Cell<Option<usize>>,
    /// The publisher's count of broker returns last seen.
    broker_returns: u64,
    /// `DLQ.<queue>` was declared (by this worker, at a connect).
    dlq_declared: bool,
    /// The broker takes one ACK for every message before it too (RabbitMQ,
    /// subscribed with `ack:client`): a batch writes one ACK, not one per
    /// message.
    cumulative: bool,
    /// When messages were last handled, while malloc's free memory has not
    /// been given back since (it is, once the consumer has been idle for
    /// `TRIM_AFTER`).
    untrimmed: Option<Instant>,
}

/// How `Consumer::attempt` runs a message: *plainly*, inside the batch's
/// one subtransaction, its inbox row written directly or by the statement;
/// or *carefully*, its record and its callback each in a subtransaction of
/// their own.
#[derive(Clone, Copy, PartialEq)]
enum Run {
    Plain { direct: bool },
    Careful,
}

/// A careful attempt's outcome: a verdict, or a transient error while
/// recording (the batch is then handled one message at a time).
type Attempt = Result<Verdict, tx::Failure>;

/// The outcome of a callback's call in a plain run, given to the careful
/// run so that the call is not made twice.
enum Preset {
    Failed(String),
    Discarded,
}

impl Consumer {
    fn new(sub: Subscription, generation: u64) -> Consumer {
        let report = crate::status::Reporter::Consumer(sub.name.clone());
        report.started();
        let link = Link::new(format!("outbox consumer \"{}\"", sub.name), report.clone());
        let message_type = BackgroundWorker::transaction(|| {
            Spi::get_one::<pg_sys::Oid>(
                "SELECT 'outbox.message'::pg_catalog.regtype::pg_catalog.oid",
            )
            .ok()
            .flatten()
            .unwrap_or(pg_sys::InvalidOid)
        });
        let mut c = Consumer {
            report,
            link,
            sub,
            generation,
            callback: None,
            refused: None,
            message_type,
            batch: 1,
            last_batch: None,
            met_recorded: Cell::new(false),
            calling: Cell::new(None),
            broker_returns: broker_returns(),
            dlq_declared: false,
            cumulative: false,
            untrimmed: None,
        };
        c.check();
        c
    }

    /// Looks at the callback: resolves it when the owner may run it, or
    /// marks the subscription refused (logged once, shown in the status).
    fn check(&mut self) {
        let sub = &self.sub;
        let message_type = self.message_type;
        let looked = tx::transaction(|| match callback::refusal(sub) {
            Some(why) => Err(why),
            None => Ok(Callback::resolve(sub, message_type)),
        });
        match looked {
            Ok(Ok(cb)) => {
                if self.refused.take().is_some() {
                    log!(
                        "outbox consumer \"{}\": the callback may run again",
                        self.sub.name
                    );
                }
                self.callback = Some(cb);
            }
            Ok(Err(why)) => self.refuse(why),
            Err(e) => self.refuse(format!("could not look at the callback: {e}")),
        }
    }

    fn refuse(&mut self, why: String) {
        if self.refused.as_ref().map(|(w, _)| w) != Some(&why) {
            warning!(
                "outbox consumer \"{}\": {why}; nothing runs until that changes",
                self.sub.name
            );
            self.report.error(&why);
        }
        self.callback = None;
        self.refused = Some((why, Instant::now()));
        // The messages go back to the queue (or stay there).
        self.disconnect();
    }

    /// The worker's life; returns its exit code (0: gone for good).
    fn run(&mut self) -> i32 {
        loop {
            latch::interrupts();
            if !super::still_served() {
                log!(
                    "outbox consumer \"{}\": its database is no longer served, stopping",
                    self.sub.name
                );
                self.disconnect();
                return 0;
            }
            if BackgroundWorker::sighup_received() {
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                self.link.reload();
            }
            let generation = generation();
            if generation != self.generation {
                self.generation = generation;
                match subscription::load(&self.sub.name) {
                    None => {
                        log!(
                            "outbox consumer \"{}\": unsubscribed, stopping",
                            self.sub.name
                        );
                        self.disconnect();
                        return 0;
                    }
                    Some(s) if s != self.sub => {
                        log!(
                            "outbox consumer \"{}\": subscription changed, restarting",
                            self.sub.name
                        );
                        self.disconnect();
                        return 1;
                    }
                    Some(_) => {}
                }
            }
            if let Some((_, at)) = &self.refused {
                if at.elapsed() >= RECHECK {
                    self.check();
                }
                if self.refused.is_some() {
                    self.nap(TICK);
                    continue;
                }
            }
            let returns = broker_returns();
            if returns != self.broker_returns {
                self.broker_returns = returns;
                if self.link.conn.is_none() {
                    self.link.retry_now();
                }
            }
            if self.link.conn.is_none() && !self.connect() {
                let wait = self.link.backing_off();
                self.nap(wait.min(TICK).max(Duration::from_millis(1)));
                continue;
            }
            if let Err(e) = self.pump() {
                self.link.broke(e);
                continue;
            }
            if self.link.conn.is_none() {
                // Refused, or messages left unhandled: reconnect later.
                continue;
            }
            self.wait();
        }
    }

    fn disconnect(&mut self) {
        self.link.disconnect();
    }

    /// Sleeps on the latch (no socket) for at most `d`.
    fn nap(&mut self, d: Duration) {
        // The tick is short: held-back statistics go at a later one.
        let _ = super::idle();
        if !latch::take_woken() {
            BackgroundWorker::wait_latch(Some(d));
        }
    }

    /// Connects and subscribes; false (with a backoff set) on failure.
    fn connect(&mut self) -> bool {
        if !self.link.backing_off().is_zero() {
            return false;
        }
        let sub = &self.sub;
        let queue_headers = queue_headers();
        self.batch = batch_size(&queue_headers);
        let dlq_declared = &mut self.dlq_declared;
        let cumulative = &mut self.cumulative;
        let connected = self.link.connect(
            |c| {
                // RabbitMQ's `client` ACK covers the channel's earlier
                // deliveries, and this connection receives only the
                // subscription's own (see `give_back`).
                *cumulative = c.server().is_some_and(|s| s.starts_with("RabbitMQ/"));
                subscribe(c, sub, &queue_headers, dlq_declared, *cumulative)
            },
            |host, e| match e {
                StompError::Broker { message, .. } if message.contains("precondition") => format!(
                    "queue {} exists with other arguments than outbox.stomp_queue_headers and the \
                     dead-letter headers, so the broker refused to subscribe to {}: {e}",
                    sub.queue, sub.destination
                ),
                _ => format!("could not subscribe at {host}: {e}"),
            },
        );
        match connected {
            Some((host, _)) => {
                log!(
                    "outbox consumer \"{}\": subscribed to {} at {host}",
                    sub.name,
                    sub.destination
                );
                true
            }
            None => false,
        }
    }

    /// Handles the messages already received, a *batch* at a time: the
    /// messages the socket holds (up to `self.batch`; while they stream, also
    /// those arriving within a `LINGER`) share one transaction, so a
    /// busy queue costs one commit per batch, not per message; ACKs/NACKs
    /// go out after the commit. Returns within about a TICK even while the
    /// queue stays full, so that signals and unsubscribes are seen.
    fn pump(&mut self) -> Result<(), StompError> {
        let mut pending = std::collections::VecDeque::new();
        let mut handled = 0u64;
        let started = Instant::now();
        loop {
            let conn = self.link.conn.as_mut().expect("connected");
            let streaming = self
                .last_batch
                .is_some_and(|(t, n)| n > 1 && t.elapsed() < STREAMING);
            let filling = Instant::now();
            while pending.len() < self.batch {
                let left = LINGER_MAX.saturating_sub(filling.elapsed());
                let wait = if streaming && !pending.is_empty() && left >= LINGER {
                    LINGER
                } else {
                    Duration::ZERO
                };
                match conn.read_frame(wait)? {
                    Some(f) if is_ours(&f) => pending.push_back(f),
                    Some(f) => stray(&f, self.cumulative)?,
                    None => break,
                }
            }
            if pending.is_empty() {
                break;
            }
            super::busy(&format!(
                "handling {} message(s) from {}",
                pending.len(),
                self.sub.destination
            ));
            // The broker session stays alive while callbacks run.
            let mut conn = self.link.conn.take().expect("connected");
            let messages = pending.make_contiguous();
            let (verdicts, kept) = keeper::keep_alive(&mut conn, || {
                let mut verdicts = self.batch(messages);
                // A batch stops at a message whose callback failed with
                // attempts left: retry it now, before anything later, to
                // keep the order.
                if let Some(Verdict::Retry) = verdicts.last() {
                    let m = Prepared::new(&messages[verdicts.len() - 1]);
                    *verdicts.last_mut().expect("not empty") = self.handle(&m);
                }
                verdicts
            });
            self.link.conn = Some(conn);
            let _ = super::report_stats();
            if !kept {
                // The keeper stopped while it held the connection, perhaps
                // mid-write: the session is not trusted; the messages come
                // again and the inbox knows them.
                return Err(StompError::Protocol(
                    "the heart-beat thread stopped while it held the connection".into(),
                ));
            }
            let mut leave = matches!(verdicts.last(), Some(Verdict::Leave));
            let handled_now = verdicts.len();
            let conn = self.link.conn.as_mut().expect("connected");
            // Cumulative: the last ACK of a run stands for the run; a NACK
            // comes after the ACK of everything before it, so it covers
            // only its own message.
            let mut run: Option<String> = None;
            for verdict in verdicts {
                let m = pending.pop_front().expect("a verdict per message");
                let ack = m
                    .get("ack")
                    .or(m.get("message-id"))
                    .unwrap_or_default()
                    .to_string();
                let reply = match verdict {
                    Verdict::Ack if self.cumulative => {
                        run = Some(ack);
                        handled += 1;
                        continue;
                    }
                    Verdict::Ack => Frame::new(Command::Ack).header("id", ack),
                    // A message left unacknowledged (tried again later, or
                    // not handled): a cumulative ACK or NACK after it would
                    // take it too, and an unacknowledged one would hold a
                    // prefetch slot until some reconnect. This connection
                    // acknowledges nothing more; it is given up and the
                    // broker delivers again from here (the inbox knows what
                    // took effect).
                    Verdict::Retry | Verdict::Leave => {
                        leave = true;
                        break;
                    }
                    Verdict::DeadLetter => {
                        if let Some(id) = run.take() {
                            conn.queue(&Frame::new(Command::Ack).header("id", id))?;
                        }
                        Frame::new(Command::Nack)
                            .header("id", ack)
                            .header("requeue", "false")
                    }
                };
                conn.queue(&reply)?;
                handled += 1;
            }
            if let Some(id) = run {
                conn.queue(&Frame::new(Command::Ack).header("id", id))?;
            }
            conn.flush()?;
            self.last_batch = Some((Instant::now(), handled_now));
            if leave {
                // Refused, terminating, or the subscriptions changed during
                // retries: what was not handled is delivered again after a
                // reconnect.
                self.disconnect();
                return Ok(());
            }
            let changed = generation() != self.generation;
            if started.elapsed() >= TICK || changed || latch::terminating() {
                // Back into the connection's buffer, in order, for later.
                while let Some(m) = pending.pop_back() {
                    conn.push_back(m);
                }
                break;
            }
        }
        self.report.count(handled);
        if handled > 0 {
            self.untrimmed = Some(Instant::now());
        }
        if self.callback.is_none() {
            // Found refused in a batch: say why, and leave the messages
            // not handled to the queue (they come again after a reconnect).
            self.check();
            self.disconnect();
            return Ok(());
        }
        let conn = self.link.conn.as_mut().expect("connected");
        conn.flush()?;
        conn.keepalive()
    }

    /// Sleeps until the socket is readable, the latch is set, or a tick
    /// passes.
    fn wait(&mut self) {
        let conn = self.link.conn.as_ref().expect("connected");
        if conn.has_buffered() || latch::take_woken() {
            return;
        }
        // The tick is short: held-back statistics go at a later one.
        let _ = super::idle();
        let mut timeout = TICK;
        if let Some(k) = conn.keepalive_due_in() {
            timeout = timeout.min(k.max(Duration::from_millis(1)));
        }
        // SAFETY: this process's latch and an open socket.
        let events = unsafe {
            let events = pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET
                    | pg_sys::WL_SOCKET_READABLE
                    | pg_sys::WL_TIMEOUT
                    | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                conn.as_raw_fd(),
                timeout.as_millis() as _,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            events
        };
        // Quiet for a while after work: what a burst left free goes back
        // (not after every batch of a slow stream: its pages would only be
        // faulted in again).
        if events == pg_sys::WL_TIMEOUT as i32
            && self.untrimmed.is_some_and(|t| t.elapsed() >= TRIM_AFTER)
        {
            self.untrimmed = None;
            super::release_free_memory();
        }
    }

    /// One message alone, each attempt its own transaction: attempts until
    /// the callback succeeds, discards it, or has failed
    /// `outbox.maximum_retry_attempts` times. Retrying here, not by NACK
    /// with requeue, works alike on every broker (ActiveMQ sends every
    /// NACKed message to the dead-letter queue at once). An error outside
    /// the callback ends the attempt, never the worker.
    fn handle(&mut self, p: &Prepared) -> Verdict {
        let mut transient = 0;
        loop {
            if latch::terminating() {
                latch::interrupts();
                return Verdict::Leave;
            }
            if generation() != self.generation {
                // Perhaps unsubscribed: look first (the message comes again).
                return Verdict::Leave;
            }
            let tried = tx::transaction(|| {
                if !self.refresh() {
                    return Ok(Verdict::Leave);
                }
                self.attempt(0, p, Run::Careful, None)
            });
            match tried {
                Ok(Ok(Verdict::Retry)) => continue,
                Ok(Ok(v)) => return v,
                Ok(Err(e)) | Err(e) if e.transient && transient < TRANSIENT_TRIES => {
                    transient += 1;
                    debug1!(
                        "outbox consumer \"{}\": message {} met \"{e}\", trying again",
                        self.sub.name,
                        p.id
                    );
                    std::thread::sleep(Duration::from_millis(10 << transient.min(6)));
                }
                Ok(Err(e)) | Err(e) => return self.failed_outside(p, &e.message),
            }
        }
    }

    /// Whether the callback may run (checked in the caller's transaction);
    /// marks the subscription refused otherwise.
    fn allowed(&self) -> bool {
        self.callback.as_ref().is_some_and(Callback::allowed)
    }

    /// An error outside the callback that trying again did not cure (a
    /// commit that failed, say): recorded `failed`, dead-lettered when its
    /// attempts are used up.
    fn failed_outside(&self, p: &Prepared, why: &str) -> Verdict {
        warning!(
            "outbox consumer \"{}\": message {}: {why}",
            self.sub.name,
            p.id
        );
        let recorded =
            tx::transaction(|| inbox::record_failed(p, &self.sub, why).map_err(|e| e.to_string()));
        match recorded {
            Ok(Ok(None)) => Verdict::Ack, // consumed before: the effect happened once
            Ok(Ok(Some(n))) if n < guc::MAXIMUM_RETRY_ATTEMPTS.get() => Verdict::Retry,
            Ok(Ok(Some(_))) => Verdict::DeadLetter,
            Ok(Err(e)) | Err(tx::Failure { message: e, .. }) => {
                warning!(
                    "outbox consumer \"{}\": could not record message {} as failed ({e}); sent to DLQ.{}",
                    self.sub.name,
                    p.id,
                    self.sub.queue
                );
                Verdict::DeadLetter
            }
        }
    }

    /// Attempts the messages in order in one transaction, stopping after
    /// the first that asks for a retry; one verdict per message attempted.
    ///
    /// First *plainly*: every callback in one subtransaction, so a SQL
    /// callback is planned once per batch, not once per message (a body
    /// known to be poison is recorded and dead-lettered on the way). Should
    /// anything raise or a callback return false, that work is rolled back
    /// and the batch is run again *carefully*: each record and each
    /// callback in a subtransaction of its own. The callback that raised or
    /// returned false in the plain run is not called again (that was its
    /// attempt); the ones before it are, their first run having been
    /// rolled back. Should even the careful run fail (a deadlock with
    /// another consumer recording the same ids in another order, say), the
    /// messages are handled one transaction each.
    fn batch(&mut self, messages: &[Frame]) -> Vec<Verdict> {
        let plain = Run::Plain {
            direct: !self.met_recorded.replace(false),
        };
        let prepared: Vec<Prepared> = messages.iter().map(Prepared::new).collect();
        let run = |how: Run,
                   preset: Option<&(usize, Preset)>|
         -> Result<Vec<Verdict>, Option<(usize, Preset)>> {
            let mut verdicts = Vec::with_capacity(prepared.len());
            for (i, p) in prepared.iter().enumerate() {
                let preset = preset.filter(|(k, _)| *k == i).map(|(_, p)| p);
                let v = match self.attempt(i, p, how, preset) {
                    Ok(v) => v,
                    Err(_) => return Err(None),
                };
                if how != Run::Careful && matches!(v, Verdict::Retry) {
                    // Plainly, a callback returned false: run carefully,
                    // with that outcome given.
                    return Err(Some((i, Preset::Discarded)));
                }
                let retry = matches!(v, Verdict::Retry);
                verdicts.push(v);
                if retry {
                    break;
                }
            }
            Ok(verdicts)
        };
        let tried = tx::transaction(|| {
            if !self.refresh() {
                return None;
            }
            self.calling.set(None);
            let preset = match tx::subtransaction(|| run(plain, None), Result::is_ok) {
                Ok(Ok(verdicts)) => return Some(Some(verdicts)),
                Ok(Err(preset)) => preset,
                // A callback that raised (or was cancelled) in the plain
                // run has had its attempt.
                Err(e) => self
                    .calling
                    .take()
                    .map(|i| (i, Preset::Failed(callback::explain(e.message)))),
            };
            Some(
                tx::subtransaction(|| run(Run::Careful, preset.as_ref()), Result::is_ok)
                    .ok()
                    .and_then(Result::ok),
            )
        });
        match tried {
            Ok(None) => {
                // Refused: nothing ran; the messages go back to the queue.
                self.mark_refused();
                vec![Verdict::Leave]
            }
            Ok(Some(Some(verdicts))) => verdicts,
            Ok(Some(None)) | Err(_) => {
                if let Err(e) = &tried {
                    log!(
                        "outbox consumer \"{}\": a batch of {} messages failed ({e}); handling them one by one",
                        self.sub.name,
                        messages.len()
                    );
                }
                let mut verdicts = Vec::with_capacity(prepared.len());
                for p in &prepared {
                    let v = self.handle(p);
                    let stop = matches!(v, Verdict::Leave);
                    verdicts.push(v);
                    if stop {
                        break;
                    }
                }
                if matches!(verdicts.last(), Some(Verdict::Leave)) && self.callback.is_some() {
                    let refused = tx::transaction(|| !self.allowed()).unwrap_or(false);
                    if refused {
                        self.mark_refused();
                    }
                }
                verdicts
            }
        }
    }

    /// Notes that the callback may no longer run (found inside a batch;
    /// `pump` looks at why).
    fn mark_refused(&mut self) {
        self.callback = None;
    }

    /// Whether the callback may run, resolved anew for this batch (in its
    /// transaction): a function altered since (SECURITY DEFINER, SET) is
    /// called as it is now.
    fn refresh(&self) -> bool {
        match &self.callback {
            Some(cb) if cb.allowed() => {
                cb.refresh();
                true
            }
            _ => false,
        }
    }

    /// One attempt inside the caller's transaction: record, call, and the
    /// outcome recorded. Plainly: an error anywhere fails the caller's
    /// subtransaction (the careful run sorts it out), and a callback
    /// returning false gives Retry with nothing recorded (the careful run
    /// records it). Carefully: the record in a subtransaction (an error
    /// there is the message's: recorded `failed`, dead-lettered; or, when
    /// trying again may help, returned), then the call in one of its own —
    /// unless `preset` gives the outcome of the call already made for it.
    fn attempt(&self, i: usize, p: &Prepared, how: Run, preset: Option<&Preset>) -> Attempt {
        let sub = &self.sub;
        let body = match p.body {
            Ok(b) => b,
            Err(reason) => return Ok(self.poison(p, reason)),
        };
        let cb = self.callback.as_ref().expect("checked before the batch");
        let calling = |headers, body| {
            cb.call(&Message {
                id: &p.id,
                destination: p.destination,
                headers,
                body,
                redelivered: p.redelivered,
            })
        };
        if let Run::Plain { direct } = how {
            // Parsed once, used by the record and by the callback.
            let (headers, body) = (p.headers_jsonb(), inbox::jsonb(body));
            // A plain run writes the row directly: a message id recorded
            // before fails the run, and the careful run's statement sorts it
            // out. Where that is likely (a redelivery, or a batch just now
            // that met ids recorded before) the statement is used from the
            // start.
            let direct = direct && !p.redelivered;
            let Some(_) = inbox::record(&p.id, sub, p.destination, headers, body, direct) else {
                self.met_recorded.set(true);
                return Ok(Verdict::Ack); // consumed or discarded before
            };
            self.calling.set(Some(i));
            let outcome = calling(headers, body);
            self.calling.set(None);
            return Ok(match outcome {
                Some(false) => Verdict::Retry,
                _ => Verdict::Ack,
            });
        }
        let recorded = tx::subtransaction(
            || {
                let (headers, body) = (p.headers_jsonb(), inbox::jsonb(body));
                let attempts = inbox::record(&p.id, sub, p.destination, headers, body, false);
                (headers, body, attempts)
            },
            |_| true,
        );
        let (headers, body, attempts) = match recorded {
            Ok(r) => r,
            Err(e) if e.transient => return Err(e),
            Err(e) => return Ok(self.poison(p, &format!("could not record the message: {e}"))),
        };
        let Some(attempts) = attempts else {
            self.met_recorded.set(true);
            return Ok(Verdict::Ack); // consumed or discarded before: the effect happened once
        };
        // A callback that returns false discards the message: nothing it
        // wrote persists.
        let outcome = match preset {
            Some(Preset::Failed(why)) => Err(why.clone()),
            Some(Preset::Discarded) => Ok(Some(false)),
            None => tx::subtransaction(|| calling(headers, body), |r| *r != Some(false))
                .map_err(|e| callback::explain(e.message)),
        };
        let verdict = match outcome {
            Ok(Some(false)) => {
                inbox::finish(&p.id, "discarded", None);
                Verdict::DeadLetter
            }
            Ok(_) => Verdict::Ack,
            Err(why) => {
                inbox::finish(&p.id, "failed", Some(&why));
                if attempts >= guc::MAXIMUM_RETRY_ATTEMPTS.get() {
                    Verdict::DeadLetter
                } else {
                    Verdict::Retry
                }
            }
        };
        if let Verdict::DeadLetter = verdict {
            debug1!(
                "outbox consumer \"{}\": message {} sent to DLQ.{}",
                sub.name,
                p.id,
                sub.queue
            );
        }
        Ok(verdict)
    }

    /// A message nothing of which can run: recorded `failed` with the
    /// reason (in a subtransaction: even that may fail) and dead-lettered.
    fn poison(&self, p: &Prepared, reason: &str) -> Verdict {
        let recorded = tx::subtransaction(
            || inbox::record_failed(p, &self.sub, reason).map_err(|e| e.to_string()),
            |r| r.is_ok(),
        );
        match recorded {
            // Consumed before under the same id: the effect happened once.
            Ok(Ok(None)) => return Verdict::Ack,
            Ok(Ok(Some(_))) => {}
            Ok(Err(e)) | Err(tx::Failure { message: e, .. }) => warning!(
                "outbox consumer \"{}\": could not record message {} as failed: {e}",
                self.sub.name,
                p.id
            ),
        }
        warning!(
            "outbox consumer \"{}\": message {}: {reason}; sent to DLQ.{}",
            self.sub.name,
            p.id,
            self.sub.queue
        );
        Verdict::DeadLetter
    }
}

/// A MESSAGE of the subscription (id `0`): not one of the dead-letter
/// queue's, delivered while it was being declared (never acknowledged, it
/// goes back to the DLQ when the connection closes).
fn is_ours(f: &Frame) -> bool {
    f.command == Command::Message && f.get("subscription") == Some("0")
}

/// A frame that is not the subscription's own MESSAGE. A MESSAGE of
/// another subscription (a dead letter delivered while the DLQ was
/// declared) stays unacknowledged until the connection closes, and a
/// cumulative ACK would take it too: with those, the connection is given
/// up (the broker puts it back) and made again (the DLQ is not declared
/// again).
fn stray(f: &Frame, cumulative: bool) -> Result<(), StompError> {
    if cumulative && f.command == Command::Message {
        return Err(StompError::Protocol(format!(
            "a message of subscription {:?} arrived; connecting again so that the broker keeps it",
            f.get("subscription").unwrap_or_default()
        )));
    }
    Ok(())
}

/// SUBSCRIBE as django-outbox-pattern does, after declaring the DLQ.
fn subscribe(
    c: &mut Connection,
    sub: &Subscription,
    queue_headers: &[(String, String)],
    dlq_declared: &mut bool,
    cumulative: bool,
) -> Result<(), StompError> {
    let dlq = format!("DLQ.{}", sub.queue);
    // Declare the dead-letter queue once per worker: subscribe without
    // acking anything and leave (anything delivered meanwhile goes back to
    // it). Not again at each reconnect: RabbitMQ closes the connection when
    // a dead letter reaches the subscription just cancelled, and a queue
    // once declared stays.
    if !*dlq_declared {
        let declare = Frame::new(Command::Subscribe)
            .header("id", "dlq")
            .header("destination", format!("/queue/{dlq}"))
            .header("ack", "client-individual")
            .header("prefetch-count", "1")
            .header("durable", "true")
            .header("auto-delete", "false")
            .header("receipt", "dlq-declared");
        c.queue(&declare)?;
        c.queue(
            &Frame::new(Command::Unsubscribe)
                .header("id", "dlq")
                .header("receipt", "dlq-left"),
        )?;
    }
    let mut frame = Frame::new(Command::Subscribe)
        .header("id", "0")
        .header("destination", &sub.destination)
        .header(
            "ack",
            if cumulative {
                "client"
            } else {
                "client-individual"
            },
        )
        .header("x-queue-name", &sub.queue);
    for (k, v) in queue_headers {
        frame = frame.header(k, v);
        if k == "prefetch-count" {
            frame = frame.header("activemq.prefetchSize", v);
        }
    }
    frame = frame
        .header("x-dead-letter-exchange", "")
        .header("x-dead-letter-routing-key", &dlq)
        .header("receipt", "subscribed");
    c.queue(&frame)?;
    c.flush()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StompError::Timeout("receipt"));
        }
        // Messages may arrive before the receipt: they stay buffered for pump().
        match c.read_frame(left)? {
            Some(f)
                if f.command == Command::Receipt && f.get("receipt-id") == Some("subscribed") =>
            {
                return Ok(());
            }
            Some(f)
                if f.command == Command::Receipt && f.get("receipt-id") == Some("dlq-declared") =>
            {
                *dlq_declared = true;
            }
            Some(f) if is_ours(&f) => {
                c.push_back(f);
                return Ok(());
            }
            Some(f) => stray(&f, cumulative)?,
            None => {}
        }
    }
}
