//! A consumer worker: one per subscription, calling its SQL callback once
//! per message id.
//!
//! Vocabulary: the worker *claims* its slot (see supervisor.rs), SUBSCRIBEs
//! as django-outbox-pattern does (client-individual acks, `x-queue-name`,
//! the queue headers, a dead-letter queue `DLQ.<queue>` declared first),
//! and handles each MESSAGE inside one transaction: *record* the message id
//! in `outbox.received` (the unique index decides, so a duplicate — even
//! one arriving at the same moment — is seen inside the transaction),
//! *call* the callback as the subscription's owner, commit, then ACK. The
//! messages already received share that transaction (a *batch*, see
//! `Consumer::batch`), so a busy queue costs one commit per batch. A
//! callback that raises is rolled back and *retried* (at once, each attempt
//! its own transaction) until `outbox.maximum_retry_attempts`, then
//! *dead-lettered* (NACK `requeue:false` → `DLQ.<queue>`); one that returns
//! false is *discarded* (its work rolled back, dead-lettered).

use std::borrow::Cow;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::spi::Spi;

use super::link::Link;
use crate::guc;
use crate::stomp::client::{Connection, StompError};
use crate::stomp::frame::{Command, Frame};
use crate::wake::{self, SLOTS};

/// Longest sleep between two looks at the subscription and the signals.
const TICK: Duration = Duration::from_millis(500);

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

/// One row of `outbox.subscriptions`, as this worker uses it.
#[derive(PartialEq)]
struct Subscription {
    name: String,
    destination: String,
    queue: String,
    callback: pg_sys::Oid,
    owner: pg_sys::Oid,
    returns_bool: bool,
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
pub extern "C-unwind" fn outbox_consumer_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let name = BackgroundWorker::get_extra().to_string();
    let database = guc::text(&guc::DATABASE);
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    super::ignore_session_limits();
    if !claim_slot(&name) {
        // Another worker serves this subscription already.
        unsafe { pg_sys::proc_exit(0) };
    }
    if let Ok(app) = std::ffi::CString::new(name.clone()) {
        unsafe { pg_sys::pgstat_report_appname(app.as_ptr()) };
    }
    let Some(sub) = load(&name) else {
        release_slot(&name);
        unsafe { pg_sys::proc_exit(0) };
    };
    log!(
        "outbox consumer \"{name}\" started: {} (queue {})",
        sub.destination,
        sub.queue
    );
    let code = Consumer::new(sub).run();
    release_slot_if(&name, code == 0);
    unsafe { pg_sys::proc_exit(code) };
}

/// Takes the slot the supervisor reserved for `name` (or a free one after
/// a restart of shared memory); false if a live worker holds it.
fn claim_slot(name: &str) -> bool {
    let me = unsafe { pg_sys::MyProcPid };
    let mut slots = SLOTS.exclusive();
    if let Some(s) = slots.0.iter_mut().find(|s| s.used && s.name() == name) {
        if s.pid != 0 && s.pid != me && unsafe { !pg_sys::BackendPidGetProc(s.pid).is_null() } {
            return false;
        }
        s.pid = me;
        return true;
    }
    match slots.0.iter_mut().find(|s| !s.used) {
        Some(s) => {
            *s = wake::Slot::EMPTY;
            s.used = true;
            s.pid = me;
            s.set_name(name);
            true
        }
        None => false,
    }
}

fn release_slot(name: &str) {
    release_slot_if(name, true);
}

/// Frees the slot for good (the subscription is gone), or only forgets
/// the pid (the worker will be restarted into it).
fn release_slot_if(name: &str, for_good: bool) {
    let mut slots = SLOTS.exclusive();
    if let Some(s) = slots.0.iter_mut().find(|s| s.used && s.name() == name) {
        if for_good {
            *s = wake::Slot::EMPTY;
        } else {
            s.pid = 0;
            s.reserved_at = crate::wake::now_ms();
        }
    }
}

/// The subscription's row, or None when it no longer exists.
fn load(name: &str) -> Option<Subscription> {
    BackgroundWorker::transaction(|| {
        if !super::table_exists("subscriptions") {
            return None;
        }
        Spi::connect(|c| {
            let mut rows = c
                .select(
                    "SELECT s.destination, s.queue, s.callback::oid, s.owner::oid, p.prorettype = 'boolean'::regtype \
                     FROM outbox.subscriptions s JOIN pg_catalog.pg_proc p ON p.oid = s.callback \
                     WHERE s.name = $1",
                    None,
                    &[DatumWithOid::from(name)],
                )
                .ok()?;
            let r = rows.next()?;
            Some(Subscription {
                name: name.to_string(),
                destination: r.get::<String>(1).ok()??,
                queue: r.get::<String>(2).ok()??,
                callback: r.get::<pg_sys::Oid>(3).ok()??,
                owner: r.get::<pg_sys::Oid>(4).ok()??,
                returns_bool: r.get::<bool>(5).ok()??,
            })
        })
    })
}

struct Consumer {
    sub: Subscription,
    report: wake::Reporter,
    link: Link,
    generation: u64,
    /// The callback, resolved once (TopMemoryContext).
    finfo: *mut pg_sys::FmgrInfo,
    message_type: pg_sys::Oid,
    /// Messages per batch, from the prefetch the last SUBSCRIBE asked for.
    batch: usize,
    /// When the last batch was handled, and its size.
    last_batch: Option<(Instant, usize)>,
    /// The current batch met a message id recorded before (so the next
    /// one's plain run records with the statement).
    met_recorded: std::cell::Cell<bool>,
}

/// How `Consumer::attempt` runs a message: *plainly*, inside the batch's
/// one subtransaction, its inbox row written directly or by the statement;
/// or *carefully*, the callback in a subtransaction of its own.
#[derive(Clone, Copy, PartialEq)]
enum Run {
    Plain { direct: bool },
    Careful,
}

impl Consumer {
    fn new(sub: Subscription) -> Consumer {
        // Catalog lookups need a transaction.
        let callback = sub.callback;
        let (finfo, message_type) = BackgroundWorker::transaction(|| unsafe {
            let finfo = pg_sys::MemoryContextAllocZero(
                pg_sys::TopMemoryContext,
                size_of::<pg_sys::FmgrInfo>(),
            )
            .cast::<pg_sys::FmgrInfo>();
            pg_sys::fmgr_info_cxt(callback, finfo, pg_sys::TopMemoryContext);
            let t = Spi::get_one::<pg_sys::Oid>("SELECT 'outbox.message'::regtype::oid")
                .ok()
                .flatten();
            (finfo as usize, t.unwrap_or(pg_sys::InvalidOid))
        });
        let finfo = finfo as *mut pg_sys::FmgrInfo;
        let report = wake::Reporter::Consumer(sub.name.clone());
        report.started();
        let link = Link::new(format!("outbox consumer \"{}\"", sub.name), report.clone());
        Consumer {
            report,
            link,
            sub,
            generation: wake::SHARED
                .get()
                .subscriptions
                .load(std::sync::atomic::Ordering::Acquire),
            finfo,
            message_type,
            batch: 1,
            last_batch: None,
            met_recorded: std::cell::Cell::new(false),
        }
    }

    /// The worker's life; returns its exit code (0: gone for good).
    fn run(&mut self) -> i32 {
        loop {
            if BackgroundWorker::sigterm_received() {
                self.disconnect();
                // Terminated, not unsubscribed: come back.
                return 1;
            }
            if BackgroundWorker::sighup_received() {
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                self.link.reload();
            }
            let generation = wake::SHARED
                .get()
                .subscriptions
                .load(std::sync::atomic::Ordering::Acquire);
            if generation != self.generation {
                self.generation = generation;
                match load(&self.sub.name) {
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
            if self.link.conn.is_none() && !self.connect() {
                let wait = self.link.backing_off();
                if !BackgroundWorker::wait_latch(Some(wait.min(TICK).max(Duration::from_millis(1))))
                {
                    self.disconnect();
                    return 1;
                }
                continue;
            }
            if let Err(e) = self.pump() {
                self.link.broke(e);
                continue;
            }
            if !self.wait() {
                self.disconnect();
                return 1;
            }
        }
    }

    fn disconnect(&mut self) {
        self.link.disconnect();
    }

    /// Connects and subscribes; false (with a backoff set) on failure.
    fn connect(&mut self) -> bool {
        if !self.link.backing_off().is_zero() {
            return false;
        }
        let sub = &self.sub;
        let queue_headers = queue_headers();
        self.batch = batch_size(&queue_headers);
        let connected = self.link.connect(
            |c| subscribe(c, sub, &queue_headers),
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
                    Some(f) if f.command == Command::Message => pending.push_back(f),
                    Some(_) => {}
                    None => break,
                }
            }
            if pending.is_empty() {
                break;
            }
            let mut verdicts = self.batch(pending.make_contiguous());
            // A batch stops at a message whose callback failed with attempts
            // left: retry it now, before anything later, to keep the order.
            if let Some(Verdict::Retry) = verdicts.last() {
                let m = Prepared::new(&pending[verdicts.len() - 1]);
                *verdicts.last_mut().expect("not empty") = self.handle(&m);
            }
            let leave = matches!(verdicts.last(), Some(Verdict::Leave));
            let handled_now = verdicts.len();
            for verdict in verdicts {
                let m = pending.pop_front().expect("a verdict per message");
                let ack = m
                    .get("ack")
                    .or(m.get("message-id"))
                    .unwrap_or_default()
                    .to_string();
                let reply = match verdict {
                    Verdict::Ack => Frame::new(Command::Ack).header("id", ack),
                    Verdict::Retry | Verdict::Leave => continue,
                    Verdict::DeadLetter => Frame::new(Command::Nack)
                        .header("id", ack)
                        .header("requeue", "false"),
                };
                self.link.conn.as_mut().expect("connected").queue(&reply)?;
                handled += 1;
            }
            let conn = self.link.conn.as_mut().expect("connected");
            conn.flush()?;
            self.last_batch = Some((Instant::now(), handled_now));
            if leave {
                // Terminating: the rest is delivered again after we leave.
                break;
            }
            let changed = wake::SHARED
                .get()
                .subscriptions
                .load(std::sync::atomic::Ordering::Acquire)
                != self.generation;
            if started.elapsed() >= TICK || changed || BackgroundWorker::sigterm_received() {
                // Back into the connection's buffer, in order, for later.
                while let Some(m) = pending.pop_back() {
                    conn.push_back(m);
                }
                break;
            }
        }
        self.report.count(handled);
        let conn = self.link.conn.as_mut().expect("connected");
        conn.flush()?;
        conn.keepalive()
    }

    /// Sleeps until the socket is readable, the latch is set, or a tick
    /// passes; false when the worker must exit.
    fn wait(&mut self) -> bool {
        let conn = self.link.conn.as_ref().expect("connected");
        if conn.has_buffered() {
            return true;
        }
        let mut timeout = TICK;
        if let Some(k) = conn.keepalive_due_in() {
            timeout = timeout.min(k.max(Duration::from_millis(1)));
        }
        let events = unsafe {
            let rc = pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET
                    | pg_sys::WL_SOCKET_READABLE
                    | pg_sys::WL_TIMEOUT
                    | pg_sys::WL_POSTMASTER_DEATH) as i32,
                conn.as_raw_fd(),
                timeout.as_millis() as _,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            rc
        };
        events & pg_sys::WL_POSTMASTER_DEATH as i32 == 0
    }

    /// One message: attempts until the callback succeeds, discards it, or
    /// has failed `outbox.maximum_retry_attempts` times. Retrying here, not
    /// by NACK with requeue, works alike on every broker (ActiveMQ sends
    /// every NACKed message to the dead-letter queue at once).
    fn handle(&mut self, p: &Prepared) -> Verdict {
        loop {
            if BackgroundWorker::sigterm_received() {
                return Verdict::Leave;
            }
            match BackgroundWorker::transaction(AssertUnwindSafe(|| self.attempt(p, Run::Careful)))
            {
                Verdict::Retry => continue,
                v => return v,
            }
        }
    }

    /// Attempts the messages in order in one transaction, stopping after
    /// the first that asks for a retry; one verdict per message attempted.
    ///
    /// First *plainly*: every callback in one subtransaction, so a SQL
    /// callback is planned once per batch, not once per message. Should a
    /// callback raise or return false, that work is rolled back and the
    /// batch is run again *carefully*: each callback in a subtransaction
    /// of its own. Should even that fail (a deadlock with another consumer
    /// recording the same ids in another order, say), the messages are
    /// handled one transaction each.
    fn batch(&mut self, messages: &[Frame]) -> Vec<Verdict> {
        let plain = Run::Plain {
            direct: !self.met_recorded.replace(false),
        };
        let prepared: Vec<Prepared> = messages.iter().map(Prepared::new).collect();
        let run = |how: Run| {
            let mut verdicts = Vec::with_capacity(prepared.len());
            for p in &prepared {
                let v = self.attempt(p, how);
                let stop = !matches!(v, Verdict::Ack);
                verdicts.push(v);
                if stop && how != Run::Careful {
                    return None;
                }
                if matches!(verdicts.last(), Some(Verdict::Retry)) {
                    break;
                }
            }
            Some(verdicts)
        };
        let tried = BackgroundWorker::transaction(AssertUnwindSafe(|| unsafe {
            match call_in_subtransaction(|| run(plain), Option::is_some) {
                Ok(Some(verdicts)) => Ok(verdicts),
                _ => call_in_subtransaction(|| run(Run::Careful), |_| true)
                    .map(|v| v.expect("a careful run always finishes")),
            }
        }));
        match tried {
            Ok(verdicts) => verdicts,
            Err(why) => {
                log!(
                    "outbox consumer \"{}\": a batch of {} messages failed ({why}); handling them one by one",
                    self.sub.name,
                    messages.len()
                );
                let mut verdicts = Vec::with_capacity(prepared.len());
                for p in &prepared {
                    let v = self.handle(p);
                    let stop = matches!(v, Verdict::Leave);
                    verdicts.push(v);
                    if stop {
                        break;
                    }
                }
                verdicts
            }
        }
    }

    /// One attempt inside the caller's transaction: record, call, and the
    /// outcome recorded. Carefully: the call in a subtransaction of its own
    /// (plainly, a raising callback aborts the caller's subtransaction, and
    /// one returning false is reported as DeadLetter with nothing
    /// recorded, for the caller to run again carefully).
    fn attempt(&self, p: &Prepared, how: Run) -> Verdict {
        let sub = &self.sub;
        let Prepared {
            id,
            destination,
            headers,
            body,
            redelivered,
        } = p;
        let Some(body) = body else {
            record_malformed(
                id,
                sub,
                destination,
                &crate::headers::to_json(&pairs(headers)),
            );
            return Verdict::DeadLetter;
        };
        // Parsed once, used by the record and by the callback.
        let (headers, body) = (crate::jsonb::object(&pairs(headers)), jsonb(body));
        // A plain run writes the row directly: a message id recorded before
        // fails the run, and the careful run's statement sorts it out. Where
        // that is likely (a redelivery, or a batch just now that met ids
        // recorded before) the statement is used from the start.
        let direct = how == Run::Plain { direct: true } && !*redelivered;
        let Some(attempts) = record(id, sub, destination, headers, body, direct) else {
            self.met_recorded.set(true);
            return Verdict::Ack; // consumed or discarded before: the effect happened once
        };
        let call = || {
            call(
                self.finfo,
                sub,
                self.message_type,
                id,
                destination,
                headers,
                body,
                *redelivered,
            )
        };
        if how != Run::Careful {
            return match call() {
                Some(false) => Verdict::DeadLetter,
                _ => Verdict::Ack,
            };
        }
        // A callback that returns false discards the message: nothing it
        // wrote persists.
        let outcome = unsafe { call_in_subtransaction(call, |r| *r != Some(false)) };
        let verdict = match outcome {
            Ok(Some(false)) => {
                finish(id, "discarded", None);
                Verdict::DeadLetter
            }
            Ok(_) => Verdict::Ack,
            Err(why) => {
                finish(id, "failed", Some(&why));
                if attempts >= guc::MAXIMUM_RETRY_ATTEMPTS.get() {
                    Verdict::DeadLetter
                } else {
                    Verdict::Retry
                }
            }
        };
        if let Verdict::DeadLetter = verdict {
            debug1!(
                "outbox consumer \"{}\": message {id} sent to DLQ.{}",
                sub.name,
                sub.queue
            );
        }
        verdict
    }
}

/// A MESSAGE's parts as the inbox stores them, borrowed from the frame
/// where they need no change.
struct Prepared<'a> {
    id: String,
    destination: &'a str,
    headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// None: not JSON that jsonb accepts (the message is dead-lettered).
    body: Option<&'a str>,
    redelivered: bool,
}

impl Prepared<'_> {
    fn new(m: &Frame) -> Prepared<'_> {
        // Valid JSON that jsonb also accepts (jsonb has no \u0000): a body
        // Postgres would refuse must not make the worker fail over and over.
        let body = std::str::from_utf8(&m.body).ok().filter(|b| {
            !b.contains("\\u0000") && serde_json::from_str::<serde::de::IgnoredAny>(b).is_ok()
        });
        Prepared {
            id: message_id(m),
            destination: m.get("destination").unwrap_or_default(),
            headers: stored_headers(m),
            body,
            redelivered: m.get("redelivered") == Some("true"),
        }
    }
}

/// SUBSCRIBE as django-outbox-pattern does, after declaring the DLQ.
fn subscribe(
    c: &mut Connection,
    sub: &Subscription,
    queue_headers: &[(String, String)],
) -> Result<(), StompError> {
    let dlq = format!("DLQ.{}", sub.queue);
    // Declare the dead-letter queue: subscribe without acking anything and
    // leave (anything delivered meanwhile goes back to it).
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
    let mut frame = Frame::new(Command::Subscribe)
        .header("id", "0")
        .header("destination", &sub.destination)
        .header("ack", "client-individual")
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
            Some(f) if f.command == Command::Message => {
                c.push_back(f);
                return Ok(());
            }
            _ => {}
        }
    }
}

/// cap-msg-id, else dop-msg-id, else amqp-message-id, else message-id.
fn message_id(m: &Frame) -> String {
    ["cap-msg-id", "dop-msg-id", "amqp-message-id", "message-id"]
        .iter()
        .find_map(|h| m.get(h).filter(|v| !v.is_empty()))
        .unwrap_or_default()
        .replace('\0', "\u{FFFD}")
}

/// A jsonb datum from JSON text that is known to be valid.
fn jsonb(text: &str) -> pg_sys::Datum {
    let c = std::ffi::CString::new(text).unwrap_or_default();
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::jsonb_in,
            &[Some(pg_sys::Datum::from(c.as_ptr()))],
        )
        .expect("jsonb_in returns a value")
    }
}

/// The MESSAGE's headers as the inbox stores them: each name once (the
/// first of repeated names, as STOMP 1.2 reads them); NUL, which STOMP
/// allows and jsonb does not, becomes U+FFFD.
fn stored_headers(m: &Frame) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    fn clean(s: &str) -> Cow<'_, str> {
        if s.contains('\0') {
            Cow::Owned(s.replace('\0', "\u{FFFD}"))
        } else {
            Cow::Borrowed(s)
        }
    }
    let mut seen = std::collections::HashSet::with_capacity(m.headers.len());
    m.headers
        .iter()
        .map(|(k, v)| (clean(k), v))
        .filter(|(k, _)| seen.insert(k.clone()))
        .map(|(k, v)| (k, clean(v)))
        .collect()
}

/// Stored headers as borrowed pairs, for `jsonb::object` and `headers::to_json`.
fn pairs<'a>(headers: &'a [(Cow<'_, str>, Cow<'_, str>)]) -> Vec<(&'a str, Cow<'a, str>)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_ref(), Cow::Borrowed(v.as_ref())))
        .collect()
}

const RECORD: &std::ffi::CStr = c"INSERT INTO outbox.received AS r \
     (message_id, subscription, destination, headers, body, status, processed_at) \
     VALUES ($1, $2, $3, $4, $5, 'consumed', pg_catalog.clock_timestamp()) \
     ON CONFLICT (message_id) DO UPDATE SET attempts = r.attempts OPERATOR(pg_catalog.+) 1, \
         subscription = excluded.subscription, body = excluded.body, headers = excluded.headers, \
         status = 'consumed', last_error = NULL, processed_at = excluded.processed_at \
     WHERE r.status = 'failed' \
     RETURNING r.attempts";

thread_local! {
    /// RECORD, prepared once per worker.
    static RECORD_PLAN: std::cell::Cell<pg_sys::SPIPlanPtr> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// Records the message id as consumed; Some(attempts) when the callback
/// must run (new, or failed before), None when it was consumed or
/// discarded already. The row says `consumed` unless the callback's
/// outcome changes it (`finish`), so success costs no second write.
///
/// `direct`: insert the row without a statement (see `direct`) where the
/// table allows it; an id recorded before then raises a unique violation
/// instead of being looked at.
fn record(
    id: &str,
    sub: &Subscription,
    destination: &str,
    headers: pg_sys::Datum,
    body: pg_sys::Datum,
    direct: bool,
) -> Option<i32> {
    let text = |s: &str| unsafe {
        pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
            s.as_ptr().cast(),
            s.len() as i32,
        ))
    };
    let (id_text, sub_text, destination_text) = (text(id), text(&sub.name), text(destination));
    if direct
        && crate::direct::insert_received(&crate::direct::Received {
            message_id: id_text,
            subscription: sub_text,
            destination: destination_text,
            headers,
            body,
        })
    {
        // As after a statement: the callback's own statements see the row.
        unsafe { pg_sys::CommandCounterIncrement() };
        return Some(1);
    }
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("outbox consumer: could not connect to SPI");
        }
        let mut plan = RECORD_PLAN.with(|p| p.get());
        if plan.is_null() {
            let mut types = [
                pg_sys::TEXTOID,
                pg_sys::TEXTOID,
                pg_sys::TEXTOID,
                pg_sys::JSONBOID,
                pg_sys::JSONBOID,
            ];
            plan = pg_sys::SPI_prepare(RECORD.as_ptr(), 5, types.as_mut_ptr());
            pg_sys::SPI_keepplan(plan);
            RECORD_PLAN.with(|p| p.set(plan));
        }
        let mut values = [id_text, sub_text, destination_text, headers, body];
        let nulls = [b' ' as std::ffi::c_char; 5];
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        if rc != pg_sys::SPI_OK_INSERT_RETURNING as i32 {
            error!("outbox consumer: could not record message {id} (SPI code {rc})");
        }
        let attempts = if pg_sys::SPI_processed == 0 {
            None
        } else {
            let table = pg_sys::SPI_tuptable;
            let mut isnull = false;
            let d = pg_sys::SPI_getbinval(*(*table).vals, (*table).tupdesc, 1, &mut isnull);
            (!isnull).then(|| d.value() as i32)
        };
        pg_sys::SPI_finish();
        attempts
    }
}

fn record_malformed(id: &str, sub: &Subscription, destination: &str, headers: &str) {
    Spi::connect_mut(|c| {
        let _ = c.update(
            "INSERT INTO outbox.received AS r (message_id, subscription, destination, headers, status, last_error, processed_at) \
             VALUES ($1, $2, $3, $4::jsonb, 'failed', 'malformed body: not JSON (or JSON that jsonb cannot store)', pg_catalog.clock_timestamp()) \
             ON CONFLICT (message_id) DO UPDATE SET attempts = r.attempts + 1, last_error = excluded.last_error, \
                 processed_at = excluded.processed_at WHERE r.status = 'failed'",
            None,
            &[
                DatumWithOid::from(id),
                DatumWithOid::from(sub.name.as_str()),
                DatumWithOid::from(destination),
                DatumWithOid::from(headers),
            ],
        );
    });
    warning!(
        "outbox consumer \"{}\": message {id} is not JSON; sent to DLQ.{}",
        sub.name,
        sub.queue
    );
}

fn finish(id: &str, status: &str, error: Option<&str>) {
    Spi::connect_mut(|c| {
        c.update(
            "UPDATE outbox.received SET status = $2::outbox.receipt_status, last_error = $3, \
                 processed_at = pg_catalog.clock_timestamp() WHERE message_id = $1",
            None,
            &[
                DatumWithOid::from(id),
                DatumWithOid::from(status),
                DatumWithOid::from(error),
            ],
        )
        .unwrap_or_else(|e| error!("outbox consumer: could not record message {id}: {e}"));
    });
}

/// Runs `f` in a subtransaction: its work is kept when `keep` approves the
/// result, rolled back otherwise and on error (whose message is returned).
unsafe fn call_in_subtransaction<R>(
    f: impl FnOnce() -> R,
    keep: impl FnOnce(&R) -> bool,
) -> Result<R, String> {
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        let result = pgrx::PgTryBuilder::new(AssertUnwindSafe(|| {
            let r = f();
            if keep(&r) {
                pg_sys::ReleaseCurrentSubTransaction();
            } else {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            }
            Ok(r)
        }))
        .catch_others(|e| {
            pg_sys::MemoryContextSwitchTo(cxt);
            let message = match &e {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
                    r.message().to_string()
                }
                CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            };
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            Err(message)
        })
        .execute();
        pg_sys::MemoryContextSwitchTo(cxt);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

/// Calls the callback with an `outbox.message`, as the subscription's
/// owner in a security-restricted operation (no SET ROLE, no escaping to
/// the worker's superuser). Some(b) for a boolean result.
#[allow(clippy::too_many_arguments)]
fn call(
    finfo: *mut pg_sys::FmgrInfo,
    sub: &Subscription,
    message_type: pg_sys::Oid,
    id: &str,
    destination: &str,
    headers: pg_sys::Datum,
    body: pg_sys::Datum,
    redelivered: bool,
) -> Option<bool> {
    unsafe {
        let desc = pg_sys::lookup_rowtype_tupdesc(message_type, -1);
        let text = |s: &str| {
            pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
                s.as_ptr().cast(),
                s.len() as i32,
            ))
        };
        let mut values = [
            text(id),
            text(destination),
            headers,
            body,
            pg_sys::Datum::from(redelivered),
        ];
        let mut nulls = [false; 5];
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let row = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
        pg_sys::DecrTupleDescRefCount(desc);

        let (mut user, mut sec) = (pg_sys::InvalidOid, 0);
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec);
        pg_sys::SetUserIdAndSecContext(
            sub.owner,
            sec | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION)
                as i32,
        );
        let size =
            size_of::<pg_sys::FunctionCallInfoBaseData>() + size_of::<pg_sys::NullableDatum>();
        let fcinfo = pg_sys::palloc0(size).cast::<pg_sys::FunctionCallInfoBaseData>();
        (*fcinfo).flinfo = finfo;
        (*fcinfo).nargs = 1;
        (*fcinfo).fncollation = pg_sys::InvalidOid;
        (*fcinfo).args.as_mut_slice(1)[0] = pg_sys::NullableDatum {
            value: row,
            isnull: false,
        };
        let f = (*finfo).fn_addr.expect("fmgr_info sets fn_addr");
        // Settings the callback changes (SET, SET LOCAL) end with the call:
        // callbacks of a batch share a transaction, and none may change
        // the worker's session for the messages after it.
        let guc_level = pg_sys::NewGUCNestLevel();
        // An error unwinds past the restores below: aborting the
        // subtransaction restores the user id and the settings.
        let result = pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| f(fcinfo));
        pg_sys::AtEOXact_GUC(false, guc_level);
        pg_sys::SetUserIdAndSecContext(user, sec);
        (sub.returns_bool && !(*fcinfo).isnull).then(|| result.value() != 0)
    }
}
