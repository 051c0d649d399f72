//! Capture in the WAL (`outbox.capture = 'wal'`): a message written as a
//! transactional logical-decoding message instead of a row, and the
//! extension's own output plugin that hands such messages back.
//!
//! Vocabulary: the *payload* is one logical message's content in the
//! extension's compact form: a *chunk* of messages, each with its
//! *sequence* number in its transaction (see `Pending::put`; formats 1
//! and 2, as 0.3 wrote them, are still read). A message's *context* is
//! what the messages of one trigger or call site share: destination,
//! version, user headers, table. It is written once and then marked the
//! same for the messages that follow it in the chunk; the generated
//! headers are made when the message is read back (`decode`), from its
//! id, its time and the context. A transaction's messages wait in
//! its *pending* chunk and are written as one logical message at
//! pre-commit, or sooner when it grows large (then as a chunk of the
//! (sub)transaction that wrote them, so a rollback to a savepoint takes
//! them away); the reader puts a transaction's messages back in sequence
//! order. The *slot* is the database's logical replication
//! slot, `outbox_pg_<database oid>`, which the publisher creates and reads
//! (worker/wal.rs). The plugin emits one row per message of ours (`M` and
//! the payload) and, at the commit of a transaction that had any, one
//! *commit row* (`C` and the commit time): its position is the end of the
//! commit record, where the slot may advance once every message before it
//! is confirmed.

use std::cell::{Cell, RefCell};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::{OutboxError, Result};

/// The logical message prefix of the extension.
pub const PREFIX: &std::ffi::CStr = c"outbox_pg";
/// The output plugin's name (the library).
pub const PLUGIN: &str = "outbox_pg";
/// One message per payload (written by 0.3; still read).
const FORMAT_ONE: u8 = 1;
/// A chunk: messages, each after its sequence number, headers made
/// (written by 0.3; still read).
const FORMAT_CHUNK: u8 = 2;
/// A chunk in the compact form (`Pending::put`).
const FORMAT_COMPACT: u8 = 3;
/// Flags of a compact message: its sequence number is the previous
/// message's plus one (else it follows, 4 bytes); its context is the
/// previous message's (else it follows); bits 2-3 its operation.
const SEQ_NEXT: u8 = 1;
const SAME_CONTEXT: u8 = 2;
const OP_SHIFT: u8 = 2;
const OPS: [&str; 3] = ["INSERT", "UPDATE", "DELETE"];
/// The largest message captured (body, destination and user headers); a
/// larger one is written to the table.
pub const MESSAGE_MAX: usize = 256 << 20;
/// A context is shared by the messages after it only up to this size: a
/// reader makes each message whole again, so a large one written once and
/// read thousands of times would take the publisher's memory with it.
const SHARED_CONTEXT: usize = 1024;

/// The cluster's *key*: captured messages carry an HMAC-SHA256 made with
/// it, and the plugin hands back only messages whose HMAC is right. Anyone
/// may call `pg_logical_emit_message` with the extension's prefix; only
/// `outbox.publish()` and the trigger (behind their privileges and checks)
/// know the key. A file of the data directory, made at the first start
/// with the library preloaded: a base backup copies it, so a standby reads
/// its primary's messages after a promotion.
const KEY_FILE: &str = "outbox_pg.key";
static KEY: std::sync::OnceLock<ring::hmac::Key> = std::sync::OnceLock::new();
const TAG: usize = 32;

/// Whether the key is loaded (the publisher reads the slot only then).
pub fn has_key() -> bool {
    KEY.get().is_some()
}

/// Loads (or makes) the key; from `_PG_init` in the postmaster, whose
/// working directory is the data directory. Every process it starts has it.
pub fn load_key() {
    match read_or_make_key() {
        Ok(bytes) => {
            let _ = KEY.set(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes));
        }
        Err(why) => warning!(
            "outbox_pg: {why}; outbox.capture = 'wal' is refused and captured messages are not read until it is fixed"
        ),
    }
}

/// The key's bytes: read, or made when the cluster can have written no
/// message with another one (no slot of the extension, not in recovery).
/// A key made anew where messages wait would make them unreadable.
fn read_or_make_key() -> std::result::Result<Vec<u8>, String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::read(KEY_FILE) {
        Ok(b) if b.len() == 32 => return Ok(b),
        Ok(b) => return Err(format!("{KEY_FILE} holds {} bytes, not 32", b.len())),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("could not read {KEY_FILE}: {e}"));
        }
        Err(_) => {}
    }
    let slots_of_ours = std::fs::read_dir("pg_replslot")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("outbox_pg_"))
        })
        .unwrap_or(false);
    let recovering = ["standby.signal", "recovery.signal"]
        .iter()
        .any(|f| std::path::Path::new(f).exists());
    if slots_of_ours || recovering {
        return Err(format!(
            "{KEY_FILE} is missing{}; copy it from the server that wrote the captured messages (a base backup carries it)",
            if recovering {
                " on a server in recovery"
            } else {
                " while an outbox slot exists"
            }
        ));
    }
    let mut b = vec![0u8; 32];
    // SAFETY: fills the buffer.
    if !unsafe { pg_sys::pg_strong_random(b.as_mut_ptr().cast(), b.len()) } {
        return Err(format!("no random bytes for {KEY_FILE}"));
    }
    // Readable as the data directory's files are (group too with initdb -g).
    let group = std::fs::metadata(".")
        .map(|m| m.permissions().mode() & 0o050 != 0)
        .unwrap_or(false);
    let tmp = format!("{KEY_FILE}.tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if group { 0o640 } else { 0o600 })
        .open(&tmp)
        .and_then(|mut f| f.write_all(&b).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, KEY_FILE))
        .and_then(|_| std::fs::File::open(".").and_then(|d| d.sync_all()));
    written.map_err(|e| format!("could not write {KEY_FILE}: {e}"))?;
    Ok(b)
}

/// The payload with its HMAC appended (None: no key).
fn signed(mut payload: Vec<u8>) -> Option<Vec<u8>> {
    let tag = ring::hmac::sign(KEY.get()?, &payload);
    payload.extend_from_slice(tag.as_ref());
    Some(payload)
}

/// The payload of a signed message whose HMAC is right.
fn verified(data: &[u8]) -> Option<&[u8]> {
    let key = KEY.get()?;
    let (payload, tag) = data.split_at(data.len().checked_sub(TAG)?);
    ring::hmac::verify(key, payload, tag).ok()?;
    Some(payload)
}

/// The database's slot.
pub fn slot_name(database: pg_sys::Oid) -> String {
    format!("outbox_pg_{}", database.to_u32())
}

/// One captured message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub message_id: [u8; 16],
    /// The wire destination (version suffix applied).
    pub destination: String,
    /// The stored headers, a JSON object.
    pub headers: String,
    /// The body, JSON text.
    pub body: String,
    pub version: Option<String>,
}

/// One message as `outbox.publish()` or the trigger hands it over.
pub struct Outgoing<'a> {
    pub message_id: [u8; 16],
    /// When it was written: microseconds since the Unix epoch.
    pub sent: i64,
    /// The wire destination (version suffix applied).
    pub destination: &'a str,
    pub version: Option<&'a str>,
    pub user_headers: &'a [(String, String)],
    /// `(operation, schema.table)` of a trigger's message.
    pub trigger: Option<(&'a str, &'a str)>,
    /// JSON text.
    pub body: &'a str,
}

fn put(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put(out, s),
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
}

/// A message's context: destination, version, table (or none), then the
/// count of user headers and each name and value.
fn put_context(out: &mut Vec<u8>, m: &Outgoing) {
    put(out, m.destination);
    put_opt(out, m.version);
    put_opt(out, m.trigger.map(|t| t.1));
    out.extend_from_slice(&(m.user_headers.len() as u32).to_be_bytes());
    for (k, v) in m.user_headers {
        put(out, k);
        put(out, v);
    }
}

/// The `dop-correlation-id` of a message whose writer gave none: made
/// from its id, so that every reading of the message says the same.
fn correlation(message_id: &[u8; 16]) -> uuid::Uuid {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"outbox_pg correlation ".as_slice(), message_id].concat(),
    );
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&d.as_ref()[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// One message of format 1 or 2: the id, then length-prefixed texts
/// (destination, headers, body, version; a missing version has length
/// `u32::MAX`).
#[cfg(test)]
fn put_message(out: &mut Vec<u8>, m: &Captured) {
    out.reserve(16 + 16 + m.destination.len() + m.headers.len() + m.body.len());
    out.extend_from_slice(&m.message_id);
    put(out, &m.destination);
    put(out, &m.headers);
    put(out, &m.body);
    put_opt(out, m.version.as_deref());
}

/// Appends one message and its sequence number to a chunk's messages.
#[cfg(test)]
fn put_in_chunk(out: &mut Vec<u8>, seq: u32, m: &Captured) {
    out.extend_from_slice(&seq.to_be_bytes());
    put_message(out, m);
}

/// A chunk's payload: the format byte, then each message after its
/// sequence number.
#[cfg(test)]
fn encode_chunk<'a>(messages: impl IntoIterator<Item = (u32, &'a Captured)>) -> Vec<u8> {
    let mut out = vec![FORMAT_CHUNK];
    for (seq, m) in messages {
        put_in_chunk(&mut out, seq, m);
    }
    out
}

/// A payload of format 1 (one message), as 0.3 wrote it.
#[cfg(test)]
fn encode_one(m: &Captured) -> Vec<u8> {
    let mut out = vec![FORMAT_ONE];
    put_message(&mut out, m);
    out
}

/// Reads a payload back: its messages with their sequence numbers (0 for
/// format 1); None when it is not one (another format, or cut).
pub fn decode(data: &[u8]) -> Option<Vec<(u32, Captured)>> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if data.len() < n {
            return None;
        }
        let (head, rest) = data.split_at(n);
        *data = rest;
        Some(head)
    }
    fn u32_(data: &mut &[u8]) -> Option<u32> {
        Some(u32::from_be_bytes(take(data, 4)?.try_into().ok()?))
    }
    fn text(data: &mut &[u8]) -> Option<Option<String>> {
        let len = u32_(data)?;
        if len == u32::MAX {
            return Some(None);
        }
        let bytes = take(data, len as usize)?;
        Some(Some(String::from_utf8(bytes.to_vec()).ok()?))
    }
    fn message(data: &mut &[u8]) -> Option<Captured> {
        let message_id: [u8; 16] = take(data, 16)?.try_into().ok()?;
        let destination = text(data)??;
        let headers = text(data)??;
        let body = text(data)??;
        let version = text(data)?;
        Some(Captured {
            message_id,
            destination,
            headers,
            body,
            version,
        })
    }
    struct Context {
        destination: String,
        version: Option<String>,
        table: Option<String>,
        headers: Vec<(String, String)>,
    }
    fn context(data: &mut &[u8]) -> Option<Context> {
        let destination = text(data)??;
        let version = text(data)?;
        let table = text(data)?;
        let n = u32_(data)?;
        // Each header takes 8 bytes at least: a count beyond what is
        // left is a bad payload, not an allocation.
        if n as usize > data.len() / 8 {
            return None;
        }
        let headers = (0..n)
            .map(|_| Some((text(data)??, text(data)??)))
            .collect::<Option<Vec<_>>>()?;
        Some(Context {
            destination,
            version,
            table,
            headers,
        })
    }
    let mut data = data;
    match take(&mut data, 1)? {
        [FORMAT_ONE] => {
            let m = message(&mut data)?;
            data.is_empty().then(|| vec![(0, m)])
        }
        [FORMAT_CHUNK] => {
            let mut out = Vec::new();
            while !data.is_empty() {
                let seq = u32_(&mut data)?;
                out.push((seq, message(&mut data)?));
            }
            (!out.is_empty()).then_some(out)
        }
        [FORMAT_COMPACT] => {
            let mut out = Vec::new();
            let mut seq: Option<u32> = None;
            let mut ctx: Option<Context> = None;
            while !data.is_empty() {
                let flags = take(&mut data, 1)?[0];
                if flags >> (OP_SHIFT + 2) != 0 {
                    return None;
                }
                let s = if flags & SEQ_NEXT != 0 {
                    seq?.checked_add(1)?
                } else {
                    u32_(&mut data)?
                };
                seq = Some(s);
                let message_id: [u8; 16] = take(&mut data, 16)?.try_into().ok()?;
                let sent = i64::from_be_bytes(take(&mut data, 8)?.try_into().ok()?);
                if flags & SAME_CONTEXT == 0 {
                    ctx = Some(context(&mut data)?);
                }
                let c = ctx.as_ref()?;
                let op = match flags >> OP_SHIFT {
                    0 => None,
                    n => Some(OPS[usize::from(n) - 1]),
                };
                let trigger = match (op, &c.table) {
                    (None, None) => None,
                    (Some(op), Some(table)) => Some((op, table.as_str())),
                    _ => return None,
                };
                let body = text(&mut data)??;
                let id = uuid::Uuid::from_bytes(message_id);
                let id_text = id.hyphenated().to_string();
                let headers = crate::headers::stored(
                    &c.headers,
                    &crate::headers::Generated {
                        message_id: &id_text,
                        destination: &c.destination,
                        trigger,
                        sent: std::time::UNIX_EPOCH
                            + std::time::Duration::from_micros(sent.max(0) as u64),
                        correlation: correlation(&message_id),
                    },
                );
                out.push((
                    s,
                    Captured {
                        message_id,
                        destination: c.destination.clone(),
                        headers: crate::headers::to_json(&headers),
                        body,
                        version: c.version.clone(),
                    },
                ));
            }
            (!out.is_empty()).then_some(out)
        }
        _ => None,
    }
}

// The C function behind pg_logical_emit_message (message.h, which the
// bindings leave out); 17 added `flush`. Called through
// pg_guard_ffi_boundary: its ERROR must come back through Rust's frames.
unsafe extern "C-unwind" {
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
        flush: bool,
    ) -> pg_sys::XLogRecPtr;
}

/// Whether this message goes to the WAL (the setting, and no delay: a
/// delayed message waits in the table).
pub fn wanted(delayed: bool) -> bool {
    !delayed && crate::guc::CAPTURE.get() == crate::guc::Capture::Wal
}

/// Checks that a captured message can be read back: `wal_level = logical`
/// and the database's slot exists (a message written before it would be
/// lost).
pub fn check() -> Result<()> {
    // As the table's INSERT would be refused (a hot standby's transactions
    // are read-only too): here, not at commit.
    // SAFETY: raises the usual ERROR in a read-only transaction.
    unsafe { pg_sys::PreventCommandIfReadOnly(c"outbox.publish()".as_ptr()) };
    // SAFETY: reading a GUC variable.
    if unsafe { pg_sys::wal_level } < pg_sys::WalLevel::WAL_LEVEL_LOGICAL as i32 {
        return Err(OutboxError::WalLevel);
    }
    if KEY.get().is_none() {
        return Err(OutboxError::NoSlot);
    }
    let name = std::ffi::CString::new(slot_name(unsafe { pg_sys::MyDatabaseId })).expect("no NUL");
    // Looked at every time (a shared-memory scan): a slot still being
    // made (not yet consistent), invalidated or dropped would not read the
    // message back.
    // SAFETY: a look-up in the slots' shared memory under its lock; the
    // fields read are single words.
    let usable = unsafe {
        let slot = pg_sys::SearchNamedReplicationSlot(name.as_ptr(), true);
        !slot.is_null() && {
            let d = &(*slot).data;
            #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
            let valid = d.invalidated_at == 0 && d.restart_lsn != 0;
            #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
            let valid = d.invalidated == pg_sys::ReplicationSlotInvalidationCause::RS_INVAL_NONE;
            d.persistency == pg_sys::ReplicationSlotPersistency::RS_PERSISTENT
                && d.confirmed_flush != 0
                && valid
        }
    };
    if !usable {
        return Err(OutboxError::NoSlot);
    }
    Ok(())
}

// ---- the pending chunk -----------------------------------------------------

/// A transaction's pending messages are written without waiting for its
/// commit once they take this many bytes (memory stays bounded however
/// many a transaction publishes).
const CHUNK_BYTES: usize = 64 << 10;

/// The current transaction's messages not yet in the WAL.
struct Pending {
    /// The messages in the compact form (`put`), in order.
    buf: Vec<u8>,
    /// Where the messages of each open subtransaction start: (nesting
    /// level, offset in `buf`), one per level from 2 to the deepest that
    /// wrote, levels increasing. The top level's start at 0.
    marks: Vec<(i32, usize)>,
    /// The next message's sequence number.
    next: u32,
    /// The chunk was written at pre-commit: a message written after that
    /// (by another extension's pre-commit callback) goes at once.
    closing: bool,
    /// The last message's sequence number and context, while the next
    /// message may refer to them (it lands in the same chunk).
    last_seq: Option<u32>,
    context: Vec<u8>,
    /// The message being put's context.
    scratch: Vec<u8>,
}

thread_local! {
    static PENDING: RefCell<Pending> = const { RefCell::new(Pending::new()) };
}

/// Registers the pending chunk's transaction callbacks (from `_PG_init`:
/// registered during another callback's run, they would miss that
/// transaction's end).
pub fn register_callbacks() {
    // SAFETY: registering this library's callbacks, once per process.
    unsafe {
        pg_sys::RegisterXactCallback(Some(at_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(at_subxact_event), std::ptr::null_mut());
    }
}

impl Pending {
    const fn new() -> Pending {
        Pending {
            buf: Vec::new(),
            marks: Vec::new(),
            next: 0,
            closing: false,
            last_seq: None,
            context: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Where the current level's messages start.
    fn tail(&self) -> usize {
        self.marks.last().map_or(0, |m| m.1)
    }

    /// The next message starts afresh: what is before it may be written in
    /// another chunk, or not at all.
    fn forget(&mut self) {
        self.last_seq = None;
        self.context.clear();
    }

    /// Appends one message: its flags, its sequence number unless it is
    /// the last one's plus one, its id and time, its context unless it is
    /// the last one's, and its body.
    fn put(&mut self, seq: u32, m: &Outgoing) {
        let op = match m.trigger {
            None => 0,
            // The trigger names only these (a panic is an ERROR here).
            Some((op, _)) => match OPS.iter().position(|o| *o == op) {
                Some(i) => i as u8 + 1,
                None => panic!("outbox: unknown trigger operation {op}"),
            },
        };
        self.scratch.clear();
        put_context(&mut self.scratch, m);
        let same = !self.context.is_empty() && self.context == self.scratch;
        let keep = self.scratch.len() <= SHARED_CONTEXT;
        let next = self.last_seq.and_then(|s| s.checked_add(1)) == Some(seq);
        let flags =
            op << OP_SHIFT | if next { SEQ_NEXT } else { 0 } | if same { SAME_CONTEXT } else { 0 };
        let b = &mut self.buf;
        b.reserve(1 + 4 + 16 + 8 + 4 + m.body.len() + if same { 0 } else { self.scratch.len() });
        b.push(flags);
        if !next {
            b.extend_from_slice(&seq.to_be_bytes());
        }
        b.extend_from_slice(&m.message_id);
        b.extend_from_slice(&m.sent.to_be_bytes());
        if !same {
            b.extend_from_slice(&self.scratch);
            if keep {
                std::mem::swap(&mut self.context, &mut self.scratch);
            } else {
                self.context.clear();
            }
        }
        put(b, m.body);
        self.last_seq = Some(seq);
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.marks.clear();
        self.next = 0;
        self.closing = false;
        self.forget();
        self.scratch.clear();
        self.scratch.shrink_to(SHARED_CONTEXT);
        self.context.shrink_to(SHARED_CONTEXT);
        // What one huge transaction needed is not kept for the next.
        if self.buf.capacity() > 2 * CHUNK_BYTES {
            self.buf.shrink_to(CHUNK_BYTES);
        }
    }
}

/// Adds the message to the transaction's pending chunk (written at
/// pre-commit, or now when the chunk is large).
pub fn emit(m: &Outgoing) {
    // SAFETY: reads of the transaction's state.
    if unsafe { pg_sys::IsInParallelMode() } {
        // A parallel worker's transaction end writes nothing.
        error!("outbox: cannot capture a message during a parallel operation");
    }
    // SAFETY: a backend in a transaction.
    let level = unsafe { pg_sys::GetCurrentTransactionNestLevel() };
    let due = PENDING.with_borrow_mut(|p| {
        debug_assert!(p.marks.last().is_none_or(|m| m.0 <= level));
        let deepest = p.marks.last().map_or(1, |m| m.0);
        for l in deepest + 1..=level {
            let at = p.buf.len();
            p.marks.push((l, at));
            // Its messages may go in a chunk of their own.
            p.forget();
        }
        let seq = p.next;
        let Some(next) = p.next.checked_add(1) else {
            error!("outbox: more than 4294967295 messages captured in one transaction");
        };
        p.next = next;
        p.put(seq, m);
        p.closing || p.buf.len() - p.tail() >= CHUNK_BYTES
    });
    if due {
        write_tail();
    }
}

/// Writes the current level's pending messages as one chunk of the
/// current (sub)transaction.
fn write_tail() {
    let messages = PENDING.with_borrow_mut(|p| {
        let tail = p.tail();
        p.forget();
        p.buf.split_off(tail)
    });
    if messages.is_empty() {
        return;
    }
    let mut payload = Vec::with_capacity(1 + messages.len() + TAG);
    payload.push(FORMAT_COMPACT);
    payload.extend_from_slice(&messages);
    drop(messages);
    write_payload(payload);
}

#[pg_guard]
unsafe extern "C-unwind" fn at_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE => {
            // Every subtransaction has ended: all of it is the top level's.
            PENDING.with_borrow_mut(|p| {
                p.marks.clear();
                p.closing = true;
            });
            write_tail();
        }
        XACT_EVENT_COMMIT
        | XACT_EVENT_ABORT
        | XACT_EVENT_PREPARE
        | XACT_EVENT_PARALLEL_COMMIT
        | XACT_EVENT_PARALLEL_ABORT => PENDING.with_borrow_mut(Pending::clear),
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn at_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    _mine: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    // The ending subtransaction is still the current one.
    // SAFETY: a backend in a transaction.
    let level = unsafe { pg_sys::GetCurrentTransactionNestLevel() };
    match event {
        // Its messages become its parent's at COMMIT_SUB; when they would
        // make the parent's too large, they are written now instead, as
        // its own chunk (still the current subtransaction), so that a run
        // of released savepoints cannot pile up messages without bound.
        SUBXACT_EVENT_PRE_COMMIT_SUB => {
            let due = PENDING.with_borrow(|p| {
                let parent = p
                    .marks
                    .iter()
                    .rev()
                    .find(|m| m.0 < level)
                    .map_or(0, |m| m.1);
                p.marks.last().is_some_and(|m| m.0 == level) && p.buf.len() - parent >= CHUNK_BYTES
            });
            if due {
                write_tail();
            }
        }
        SUBXACT_EVENT_COMMIT_SUB => PENDING.with_borrow_mut(|p| p.marks.retain(|m| m.0 < level)),
        // Its messages (and its children's) are gone with it; what it
        // wrote already is skipped by decoding, as it aborted.
        SUBXACT_EVENT_ABORT_SUB => PENDING.with_borrow_mut(|p| {
            if let Some(i) = p.marks.iter().position(|m| m.0 >= level) {
                let at = p.marks[i].1;
                p.buf.truncate(at);
                p.marks.truncate(i);
                p.forget();
            }
        }),
        _ => {}
    }
}

/// Writes one payload into the WAL as a transactional logical message of
/// the current (sub)transaction.
fn write_payload(payload: Vec<u8>) {
    let Some(payload) = signed(payload) else {
        OutboxError::NoSlot.raise();
    };
    // SAFETY: a WAL record from a backend in a transaction.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
            LogLogicalMessage(
                PREFIX.as_ptr(),
                payload.as_ptr().cast(),
                payload.len(),
                true,
            );
            #[cfg(not(any(
                feature = "pg13",
                feature = "pg14",
                feature = "pg15",
                feature = "pg16"
            )))]
            LogLogicalMessage(
                PREFIX.as_ptr(),
                payload.as_ptr().cast(),
                payload.len(),
                true,
                false,
            );
        });
    }
}

// ---- the output plugin ----------------------------------------------------

thread_local! {
    /// The transaction being decoded had a message of ours.
    static HAD_MESSAGE: Cell<bool> = const { Cell::new(false) };
}

/// Called by PostgreSQL when a slot uses the plugin `outbox_pg`.
///
/// # Safety
/// Called by PostgreSQL with a valid callbacks struct.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    unsafe {
        (*cb).startup_cb = Some(startup);
        (*cb).begin_cb = Some(begin);
        (*cb).change_cb = Some(change);
        (*cb).commit_cb = Some(commit);
        (*cb).message_cb = Some(message);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    options: *mut pg_sys::OutputPluginOptions,
    _is_init: bool,
) {
    unsafe {
        (*options).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT;
        (*options).receive_rewrites = false;
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
) {
    HAD_MESSAGE.set(false);
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    _relation: pg_sys::Relation,
    _change: *mut pg_sys::ReorderBufferChange,
) {
    // Rows are not messages: nothing to say.
}

#[pg_guard]
unsafe extern "C-unwind" fn commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _commit_lsn: pg_sys::XLogRecPtr,
) {
    if !HAD_MESSAGE.replace(false) {
        return;
    }
    unsafe {
        let at: i64 = (*txn).xact_time.commit_time;
        pg_sys::OutputPluginPrepareWrite(ctx, true);
        let out = (*ctx).out;
        let mut row = [0u8; 9];
        row[0] = b'C';
        row[1..].copy_from_slice(&at.to_be_bytes());
        pg_sys::appendBinaryStringInfo(out, row.as_ptr().cast(), row.len() as i32);
        pg_sys::OutputPluginWrite(ctx, true);
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    _lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const std::ffi::c_char,
    size: pg_sys::Size,
    data: *const std::ffi::c_char,
) {
    // Only ours, and only transactional ones (what outbox.publish writes).
    if !transactional || unsafe { std::ffi::CStr::from_ptr(prefix) } != PREFIX {
        return;
    }
    // SAFETY: the message's bytes, as PostgreSQL hands them over.
    let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), size) };
    if KEY.get().is_none() {
        // Never skip what might be genuine: the reader stops instead.
        error!("outbox_pg: {KEY_FILE} could not be loaded: captured messages cannot be checked");
    }
    let Some(payload) = verified(bytes) else {
        // Anyone may write such messages: said once per thousand.
        thread_local! {
            static FORGED: Cell<u64> = const { Cell::new(0) };
        }
        let n = FORGED.get();
        FORGED.set(n + 1);
        if n.is_multiple_of(1000) {
            warning!(
                "outbox_pg: skipped a logical message with the prefix outbox_pg that outbox.publish() did not write (its signature is wrong; {} so far)",
                n + 1
            );
        }
        return;
    };
    HAD_MESSAGE.set(true);
    unsafe {
        pg_sys::OutputPluginPrepareWrite(ctx, true);
        let out = (*ctx).out;
        pg_sys::appendStringInfoChar(out, b'M' as std::ffi::c_char);
        pg_sys::appendBinaryStringInfo(out, payload.as_ptr().cast(), payload.len() as i32);
        pg_sys::OutputPluginWrite(ctx, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_payload_reads_back_as_written(
            id in any::<[u8; 16]>(),
            destination in ".*",
            headers in ".*",
            body in ".*",
            version in proptest::option::of(".*"),
        ) {
            let m = Captured { message_id: id, destination, headers, body, version };
            prop_assert_eq!(decode(&encode_one(&m)), Some(vec![(0, m)]));
        }

        #[test]
        fn a_chunk_reads_back_as_written(
            messages in proptest::collection::vec(
                (any::<u32>(), any::<[u8; 16]>(), ".*", ".*", ".*", proptest::option::of(".*")),
                1..8,
            ),
        ) {
            let messages: Vec<(u32, Captured)> = messages
                .into_iter()
                .map(|(seq, message_id, destination, headers, body, version)| {
                    (seq, Captured { message_id, destination, headers, body, version })
                })
                .collect();
            let p = encode_chunk(messages.iter().map(|(s, m)| (*s, m)));
            prop_assert_eq!(decode(&p), Some(messages));
        }

        #[test]
        fn any_bytes_decode_without_a_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&data);
        }
    }

    type Spec = (
        u32,
        u8,
        &'static str,
        Option<&'static str>,
        usize,
        Option<(&'static str, &'static str)>,
    );

    /// Messages put into a pending chunk (forgetting before the ones
    /// marked so), and the payload written of them.
    fn compact(specs: &[Spec], forget_before: &[usize]) -> (Vec<Outgoing<'static>>, Vec<u8>) {
        static HEADERS: std::sync::LazyLock<Vec<Vec<(String, String)>>> =
            std::sync::LazyLock::new(|| {
                vec![
                    vec![],
                    vec![("team".into(), "billing".into())],
                    vec![
                        ("dop-correlation-id".into(), "mine".into()),
                        ("dop-msg-id".into(), "forged".into()),
                    ],
                    vec![("big".into(), "x".repeat(SHARED_CONTEXT))],
                ]
            });
        let mut p = Pending::new();
        let mut out = Vec::new();
        for (i, &(seq, id, destination, version, headers, trigger)) in specs.iter().enumerate() {
            if forget_before.contains(&i) {
                p.forget();
            }
            let m = Outgoing {
                message_id: [id; 16],
                sent: 1_795_847_400_123_456 + i64::from(id),
                destination,
                version,
                user_headers: &HEADERS[headers],
                trigger,
                body: if id % 2 == 0 {
                    "{\"a\": 1}"
                } else {
                    "[\"é\"]"
                },
            };
            p.put(seq, &m);
            out.push(m);
        }
        let mut payload = vec![FORMAT_COMPACT];
        payload.extend_from_slice(&p.buf);
        (out, payload)
    }

    #[test]
    fn a_compact_chunk_reads_back_with_its_headers_made() {
        let t = Some(("INSERT", "public.orders"));
        let specs: [Spec; 7] = [
            (0, 1, "/topic/a", None, 0, t),
            (1, 2, "/topic/a", None, 0, Some(("UPDATE", "public.orders"))),
            (2, 3, "/topic/a", None, 0, Some(("DELETE", "public.orders"))),
            (7, 4, "/topic/a", None, 0, t),
            (8, 5, "/queue/b.v2", Some("v2"), 1, None),
            (9, 6, "/queue/b.v2", Some("v2"), 2, None),
            (10, 7, "/queue/b.v2", Some("v2"), 2, None),
        ];
        let (messages, payload) = compact(&specs, &[]);
        // The context is written three times, not seven.
        assert_eq!(
            payload.windows(8).filter(|w| w == b"/topic/a").count()
                + payload.windows(11).filter(|w| w == b"/queue/b.v2").count(),
            3
        );
        let back = decode(&payload).expect("a compact chunk");
        assert_eq!(back.len(), messages.len());
        for ((seq, c), (spec, m)) in back.iter().zip(specs.iter().zip(&messages)) {
            assert_eq!(*seq, spec.0);
            assert_eq!(c.message_id, m.message_id);
            assert_eq!(c.destination, m.destination);
            assert_eq!(c.version.as_deref(), m.version);
            assert_eq!(c.body, m.body);
            let h: serde_json::Value = serde_json::from_str(&c.headers).unwrap();
            let id = uuid::Uuid::from_bytes(m.message_id).to_string();
            assert_eq!(h["dop-msg-id"], id.as_str());
            assert_eq!(h["dop-msg-destination"], m.destination);
            assert_eq!(h["dop-msg-type"], "Published");
            assert_eq!(h["content-type"], crate::headers::CONTENT_TYPE);
            let sent = crate::headers::sent_time(
                std::time::UNIX_EPOCH + std::time::Duration::from_micros(m.sent as u64),
            );
            assert_eq!(h["dop-msg-sent-time"], sent.as_str());
            match m.trigger {
                Some((op, table)) => {
                    assert_eq!(h["outbox-op"], op);
                    assert_eq!(h["outbox-table"], table);
                }
                None => assert!(h.get("outbox-op").is_none() && h.get("outbox-table").is_none()),
            }
            for (k, v) in m.user_headers {
                if k == "dop-msg-id" {
                    continue;
                }
                assert_eq!(h[k.as_str()], v.as_str());
            }
            if !m
                .user_headers
                .iter()
                .any(|(k, _)| k == "dop-correlation-id")
            {
                // Made from the id: the same at every reading, another per message.
                assert_eq!(
                    h["dop-correlation-id"],
                    correlation(&m.message_id).to_string().as_str()
                );
                assert_ne!(h["dop-correlation-id"], id.as_str());
            }
        }
        // Read twice, the same headers (a re-sent message says the same).
        assert_eq!(decode(&payload), Some(back));
    }

    #[test]
    fn a_large_context_is_written_with_each_message() {
        let s: [Spec; 3] = [
            (0, 1, "/topic/a", None, 3, None),
            (1, 2, "/topic/a", None, 3, None),
            (2, 3, "/topic/a", None, 3, None),
        ];
        let (messages, p) = compact(&s, &[]);
        let big = "x".repeat(SHARED_CONTEXT);
        assert_eq!(
            p.windows(big.len())
                .filter(|w| *w == big.as_bytes())
                .count(),
            3
        );
        let back = decode(&p).unwrap();
        assert_eq!(back.len(), 3);
        for ((_, c), m) in back.iter().zip(&messages) {
            let h: serde_json::Value = serde_json::from_str(&c.headers).unwrap();
            assert_eq!(h["big"], big.as_str());
            assert_eq!(c.message_id, m.message_id);
        }
    }

    #[test]
    fn a_compact_chunk_after_a_forget_stands_alone() {
        let s: [Spec; 3] = [
            (0, 1, "/topic/a", None, 1, None),
            (1, 2, "/topic/a", None, 1, None),
            (2, 3, "/topic/a", None, 1, None),
        ];
        let (_, whole) = compact(&s, &[]);
        let (_, forgot) = compact(&s, &[2]);
        // The third message repeats its sequence number and context.
        assert!(forgot.len() > whole.len() + 4 + "/topic/a".len());
        assert_eq!(decode(&whole), decode(&forgot));
        // What follows a forget decodes without what came before it.
        let mut p = Pending::new();
        let m = |id| Outgoing {
            message_id: [id; 16],
            sent: 0,
            destination: "/topic/a",
            version: None,
            user_headers: &[],
            trigger: None,
            body: "1",
        };
        p.put(0, &m(1));
        p.forget();
        let at = p.buf.len();
        p.put(1, &m(2));
        let mut tail = vec![FORMAT_COMPACT];
        tail.extend_from_slice(&p.buf[at..]);
        let back = decode(&tail).expect("a chunk of its own");
        assert_eq!((back[0].0, back[0].1.message_id), (1, [2; 16]));
    }

    #[test]
    fn a_cut_or_bent_compact_chunk_is_not_one() {
        let t = Some(("INSERT", "public.t"));
        let (_, p) = compact(
            &[
                (0, 1, "/topic/a", None, 1, t),
                (1, 2, "/topic/a", None, 1, t),
            ],
            &[],
        );
        let first = decode(&p).unwrap()[0].clone();
        let mut whole_first = 0;
        for n in 0..p.len() {
            match decode(&p[..n]) {
                None => {}
                Some(v) => {
                    // Only where the first message ends.
                    assert_eq!(v, vec![first.clone()], "cut at {n}");
                    whole_first += 1;
                }
            }
        }
        assert_eq!(whole_first, 1);
        // A message that says "as before" first, unknown flags.
        let mut b = p.clone();
        b[1] |= SEQ_NEXT;
        assert_eq!(decode(&b), None);
        let mut b = p.clone();
        b[1] |= SAME_CONTEXT;
        assert_eq!(decode(&b), None);
        let mut b = p.clone();
        b[1] |= 0x10;
        assert_eq!(decode(&b), None);
        // An operation without a table.
        let (_, p) = compact(&[(0, 1, "/topic/a", None, 0, None)], &[]);
        let mut b = p.clone();
        b[1] |= 1 << OP_SHIFT;
        assert_eq!(decode(&b), None);
    }

    #[test]
    fn a_cut_payload_is_not_one() {
        let m = Captured {
            message_id: [7; 16],
            destination: "/topic/x".into(),
            headers: "{}".into(),
            body: "1".into(),
            version: None,
        };
        let p = encode_one(&m);
        for n in 0..p.len() {
            assert_eq!(decode(&p[..n]), None, "cut at {n}");
        }
        let p = encode_chunk([(0, &m), (1, &m)]);
        let whole = p.len() - (p.len() - 1) / 2;
        for n in 0..p.len() {
            // Cut between its two messages, a chunk is a chunk of one.
            let expected = (n == whole).then(|| vec![(0, m.clone())]);
            assert_eq!(decode(&p[..n]), expected, "cut at {n}");
        }
    }
}
