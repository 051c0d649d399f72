//! Capture in the WAL (`outbox.capture = 'wal'`): a message written as a
//! transactional logical-decoding *message* instead of a row, and the
//! extension's own output plugin that hands such messages back.
//!
//! Vocabulary: the *payload* is one message in the extension's compact
//! form (see `encode`); the *slot* is the database's logical replication
//! slot, `outbox_pg_<database oid>`, which the publisher creates and reads
//! (worker/wal.rs). The plugin emits one row per message of ours (`M` and
//! the payload) and, at the commit of a transaction that had any, one
//! *commit row* (`C` and the commit time): its position is the end of the
//! commit record, where the slot may advance once every message before it
//! is confirmed.

use std::cell::Cell;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::{OutboxError, Result};

/// The logical message prefix of the extension.
pub const PREFIX: &std::ffi::CStr = c"outbox_pg";
/// The output plugin's name (the library).
pub const PLUGIN: &str = "outbox_pg";
const FORMAT: u8 = 1;

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

fn put(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The payload: a format byte, the id, then length-prefixed texts
/// (destination, headers, body, version; a missing version has length
/// `u32::MAX`).
pub fn encode(m: &Captured) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(1 + 16 + 20 + m.destination.len() + m.headers.len() + m.body.len());
    out.push(FORMAT);
    out.extend_from_slice(&m.message_id);
    put(&mut out, &m.destination);
    put(&mut out, &m.headers);
    put(&mut out, &m.body);
    match &m.version {
        Some(v) => put(&mut out, v),
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
    out
}

/// Reads a payload back; None when it is not one (another format).
pub fn decode(data: &[u8]) -> Option<Captured> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if data.len() < n {
            return None;
        }
        let (head, rest) = data.split_at(n);
        *data = rest;
        Some(head)
    }
    fn text(data: &mut &[u8]) -> Option<Option<String>> {
        let len = u32::from_be_bytes(take(data, 4)?.try_into().ok()?);
        if len == u32::MAX {
            return Some(None);
        }
        let bytes = take(data, len as usize)?;
        Some(Some(String::from_utf8(bytes.to_vec()).ok()?))
    }
    let mut data = data;
    if take(&mut data, 1)? != [FORMAT] {
        return None;
    }
    let message_id: [u8; 16] = take(&mut data, 16)?.try_into().ok()?;
    let destination = text(&mut data)??;
    let headers = text(&mut data)??;
    let body = text(&mut data)??;
    let version = text(&mut data)?;
    data.is_empty().then_some(Captured {
        message_id,
        destination,
        headers,
        body,
        version,
    })
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

/// Writes the message into the WAL, in the current transaction.
pub fn emit(m: &Captured) {
    let Some(payload) = signed(encode(m)) else {
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
            prop_assert_eq!(decode(&encode(&m)), Some(m));
        }

        #[test]
        fn any_bytes_decode_without_a_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&data);
        }
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
        let p = encode(&m);
        for n in 0..p.len() {
            assert_eq!(decode(&p[..n]), None, "cut at {n}");
        }
    }
}
