//! Waiting the PostgreSQL way. Every network wait of the extension — a
//! worker's or `outbox.send()`'s in a user backend — sleeps on the process
//! *latch* and the socket together ([`HOOKS`], given to the STOMP client),
//! and looks at the *interrupts* each time it wakes: a cancel,
//! `statement_timeout` or a terminate acts at once instead of after a
//! socket timeout.
//!
//! Vocabulary: *user code* is a callback or anything else of the user's a
//! worker runs ([`UserCode`]); a cancel that comes outside user code has
//! nothing to cancel in a worker and is dropped. A latch set that a socket
//! wait consumed is remembered as *woken* ([`take_woken`]), so that a worker
//! whose commit wake-up arrived in the middle of a send does not then sleep.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgrx::pg_sys;

use crate::stomp::client::Hooks;

/// The STOMP client's waits, driven by the latch.
pub const HOOKS: Hooks = Hooks { connect, wait };

/// This process is a worker (interrupts are handled as in [`interrupts`]).
static IN_WORKER: AtomicBool = AtomicBool::new(false);
/// A worker is running user code: a cancel is meant for it.
static IN_USER_CODE: AtomicBool = AtomicBool::new(false);
/// A socket wait consumed a latch set.
static WOKEN: AtomicBool = AtomicBool::new(false);

/// Marks this process as a background worker of the extension: a cancel
/// (SIGINT, `pg_cancel_backend`) reaches only user code; anywhere else it
/// has nothing to cancel and is dropped.
pub fn in_worker() {
    IN_WORKER.store(true, Ordering::Relaxed);
    #[cfg(not(feature = "pg18"))]
    use pg_sys::pqsignal;
    // 18's pqsignal is a macro for the backend's pqsignal_be.
    #[cfg(feature = "pg18")]
    use pg_sys::pqsignal_be as pqsignal;
    // SAFETY: installing a signal handler of this module.
    unsafe { pqsignal(libc::SIGINT, Some(on_cancel)) };
}

// PostgreSQL's SIGINT handler for backends.
unsafe extern "C-unwind" {
    fn StatementCancelHandler(signal: std::ffi::c_int);
}

/// SIGINT in a worker: PostgreSQL's cancel, only while user code runs.
unsafe extern "C-unwind" fn on_cancel(signal: std::ffi::c_int) {
    if IN_USER_CODE.load(Ordering::Relaxed) {
        // SAFETY: PostgreSQL's own handler, in signal context as it expects.
        unsafe { StatementCancelHandler(signal) };
    }
}

/// While alive, the worker runs user code (a cancel reaches it).
pub struct UserCode(());

impl UserCode {
    pub fn enter() -> UserCode {
        IN_USER_CODE.store(true, Ordering::Relaxed);
        UserCode(())
    }
}

impl Drop for UserCode {
    fn drop(&mut self) {
        IN_USER_CODE.store(false, Ordering::Relaxed);
    }
}

/// Whether a socket wait consumed a latch set since the last call.
pub fn take_woken() -> bool {
    WOKEN.swap(false, Ordering::Relaxed)
}

/// Whether a terminate (`pg_terminate_backend`, a shutdown) is pending in a
/// process that handles SIGTERM with PostgreSQL's `die`.
pub fn terminating() -> bool {
    // SAFETY: a plain read of a flag the signal handler sets.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) != 0 }
}

/// Acts on pending interrupts. In a user backend: as any statement does
/// (an ERROR for a cancel or timeout, FATAL for a terminate). In a worker:
/// a terminate exits at once (the transaction rolls back; unacknowledged
/// messages come again); a cancel outside user code is dropped.
pub fn interrupts() {
    // SAFETY: reads and writes of the flags the signal handlers set, from
    // the main thread, as PostgreSQL's own code does.
    unsafe {
        if IN_WORKER.load(Ordering::Relaxed)
            && !IN_USER_CODE.load(Ordering::Relaxed)
            && std::ptr::read_volatile(&raw const pg_sys::QueryCancelPending) != 0
        {
            std::ptr::write_volatile(&raw mut pg_sys::QueryCancelPending, 0);
        }
        if std::ptr::read_volatile(&raw const pg_sys::InterruptPending) != 0 {
            pg_sys::ProcessInterrupts();
        }
    }
}

/// Waits for `fd` (readable, or writable) and the latch, at most `timeout`;
/// true when the socket is ready.
fn wait(fd: RawFd, writable: bool, timeout: Duration) -> io::Result<bool> {
    let socket = if writable {
        pg_sys::WL_SOCKET_WRITEABLE
    } else {
        pg_sys::WL_SOCKET_READABLE
    };
    // Whole milliseconds, rounded up: a zero wait would make callers spin.
    let ms = if timeout.is_zero() {
        0
    } else {
        timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as _
    };
    // SAFETY: MyLatch is this process's latch; fd is an open socket.
    let rc = unsafe {
        pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | socket | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                as i32,
            fd,
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        )
    };
    if rc & pg_sys::WL_LATCH_SET as i32 != 0 {
        // SAFETY: as above.
        unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
        WOKEN.store(true, Ordering::Relaxed);
    }
    interrupts();
    Ok(rc & socket as i32 != 0)
}

/// Linux's "connection in progress" for a non-blocking connect.
const EINPROGRESS: i32 = 115;

/// A TCP connect that waits through [`wait`].
fn connect(addr: &SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + timeout;
    let socket = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    match socket.connect(&(*addr).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(EINPROGRESS) => loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
            if wait(socket.as_raw_fd(), true, left)? {
                if let Some(e) = socket.take_error()? {
                    return Err(e);
                }
                break;
            }
        },
        Err(e) => return Err(e),
    }
    socket.set_nonblocking(false)?;
    Ok(socket.into())
}
