//! The keeper: while a consumer runs callbacks (its main thread busy in
//! PostgreSQL for as long as `outbox.callback_timeout`), a thread keeps the
//! broker session alive — it writes heart-beats when due and reads what
//! arrives into the connection's buffer. It touches nothing of PostgreSQL
//! and has the connection to itself while it *watches* it: the main thread
//! does not use the connection until the keeper has said it let go.
//!
//! One keeper thread lives as long as the process and watches a
//! connection per batch on request (a thread made and joined per batch
//! cost a clone, a stack mapping and its unmapping every batch).
//!
//! A FATAL exit during a batch (SIGTERM seen inside a callback) does not
//! unwind: the keeper goes on watching until the process's thread-locals
//! are dropped at `exit()`. Nothing run at exit may touch a lent
//! connection (none does: a consumer's exit callbacks never reach it).

use std::cell::RefCell;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use crate::stomp::client::Connection;

/// What the main thread asks of the keeper.
enum Ask {
    /// Watch this connection until `LetGo`.
    Watch(Borrowed),
    LetGo,
}

/// The connection, lent to the keeper between `Watch` and its answer to
/// `LetGo` (the main thread holds its `&mut` for that whole time and does
/// not touch it: see `keep_alive`).
struct Borrowed(*mut Connection);
// SAFETY: the pointer is used by one thread at a time (see `keep_alive`);
// the connection itself may move between threads (checked below).
unsafe impl Send for Borrowed {}
const _: fn() = || {
    fn sendable<T: Send>() {}
    sendable::<Connection>();
};

/// The keeper thread's two channels: asks go one way, *let go* answers the
/// other.
struct Keeper {
    asks: mpsc::Sender<Ask>,
    let_go: mpsc::Receiver<()>,
}

thread_local! {
    static KEEPER: RefCell<Option<Keeper>> = const { RefCell::new(None) };
}

/// Runs `work` while the keeper thread looks after `conn`; returns what
/// `work` returns, and false when the keeper died while it held the
/// connection (perhaps mid-write: the session is not to be trusted). An
/// error unwinding out of `work` takes the connection back first.
pub fn keep_alive<R>(conn: &mut Connection, work: impl FnOnce() -> R) -> (R, bool) {
    if conn.keepalive_due_in().is_none() {
        // Heart-beats are off: nothing to keep.
        return (work(), true);
    }
    // Nothing waits to be written: a heart-beat is one short write, so the
    // let-go comes within one write's timeout.
    debug_assert_eq!(conn.queued_len(), 0);
    // The latch hooks call into PostgreSQL: the keeper waits in the kernel.
    let hooks = conn.set_hooks(None);
    let conn = std::ptr::from_mut(conn);
    let lent = KEEPER.with(|k| {
        let mut k = k.borrow_mut();
        if k.is_none() {
            *k = start();
        }
        let sent = k
            .as_ref()
            .is_some_and(|keeper| keeper.asks.send(Ask::Watch(Borrowed(conn))).is_ok());
        if !sent {
            // No thread (this batch goes without heart-beats; a short one
            // needs none), or it is gone: a new one next time.
            *k = None;
        }
        sent
    });
    let back = Lent {
        conn,
        hooks,
        lent,
        kept: true,
    };
    let r = work();
    let kept = back.take_back();
    (r, kept)
}

/// The connection while `work` runs: dropped (after `work`, or while
/// unwinding from it), it asks the keeper to let go, waits until it has,
/// and gives the connection its hooks back.
struct Lent {
    conn: *mut Connection,
    hooks: Option<crate::stomp::client::Hooks>,
    lent: bool,
    /// The keeper let go by answering (not by dying).
    kept: bool,
}

impl Lent {
    /// Takes the connection back; false when the keeper had died.
    fn take_back(mut self) -> bool {
        self.let_go();
        self.kept
    }

    fn let_go(&mut self) {
        if !std::mem::take(&mut self.lent) {
            return;
        }
        KEEPER.with(|k| {
            let mut k = k.borrow_mut();
            let Some(keeper) = k.as_ref() else { return };
            // Either answer means the keeper no longer holds the
            // connection (a dead thread holds nothing).
            let gone = keeper.asks.send(Ask::LetGo).is_err() || keeper.let_go.recv().is_err();
            if gone {
                self.kept = false;
                *k = None;
            }
        });
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.let_go();
        // SAFETY: `keep_alive`'s `&mut` borrow outlives this guard, and the
        // keeper has let go.
        unsafe { (*self.conn).set_hooks(self.hooks.take()) };
    }
}

/// Starts the keeper thread (None when the system refuses a thread: the
/// batch then runs without heart-beats, as a short batch needs none).
fn start() -> Option<Keeper> {
    let (asks, asked) = mpsc::channel::<Ask>();
    let (answer, let_go) = mpsc::channel::<()>();
    // The thread starts with every signal blocked (it inherits the mask):
    // PostgreSQL's handlers must run on the main thread.
    let _blocked = SignalsBlocked::new();
    std::thread::Builder::new()
        .name("outbox keeper".into())
        .stack_size(512 << 10)
        .spawn(move || {
            while let Ok(ask) = asked.recv() {
                let Ask::Watch(Borrowed(conn)) = ask else {
                    let _ = answer.send(());
                    continue;
                };
                // SAFETY: lent by `keep_alive` until this thread answers
                // the `LetGo` below; the main thread does not touch it
                // meanwhile. The borrow ends before the answer.
                let conn = unsafe { &mut *conn };
                loop {
                    let nap = conn
                        .keepalive_due_in()
                        .unwrap_or(Duration::from_secs(1))
                        .max(Duration::from_millis(5));
                    match asked.recv_timeout(nap) {
                        // A broken connection is found again by the main
                        // thread's next read; until then, nothing to do.
                        Err(RecvTimeoutError::Timeout) if conn.keepalive().is_err() => {
                            match asked.recv() {
                                Ok(Ask::LetGo) => break,
                                Ok(Ask::Watch(_)) => {
                                    unreachable!("one connection is lent at a time")
                                }
                                Err(_) => return,
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                        Ok(Ask::LetGo) => break,
                        Ok(Ask::Watch(_)) => unreachable!("one connection is lent at a time"),
                    }
                }
                if answer.send(()).is_err() {
                    return;
                }
            }
        })
        .ok()?;
    Some(Keeper { asks, let_go })
}

/// Every signal blocked in the calling thread until dropped.
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn new() -> SignalsBlocked {
        // SAFETY: sigset_t values initialised by sigfillset/pthread_sigmask.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            debug_assert_eq!(rc, 0);
            SignalsBlocked(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}
