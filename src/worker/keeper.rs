//! The keeper: while a consumer runs callbacks (its main thread busy in
//! PostgreSQL for as long as `outbox.callback_timeout`), a thread keeps the
//! broker session alive — it writes heart-beats when due and reads what
//! arrives into the connection's buffer. It touches nothing of PostgreSQL
//! and has the connection to itself: the main thread does not use it
//! until the keeper has been joined.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use crate::stomp::client::Connection;

/// Runs `work` while a keeper thread looks after `conn`; returns what `work`
/// returns (an error unwinding out of `work` stops the keeper first).
pub fn keep_alive<R>(conn: &mut Connection, work: impl FnOnce() -> R) -> R {
    if conn.keepalive_due_in().is_none() {
        // Heart-beats are off: nothing to keep.
        return work();
    }
    let (stop, stopped) = mpsc::channel::<()>();
    // The latch hooks call into PostgreSQL: the keeper waits in the kernel.
    let hooks = conn.set_hooks(None);
    let borrowed = &mut *conn;
    let r = std::thread::scope(|s| {
        let keeper = {
            // The thread starts with every signal blocked (it inherits the
            // mask): PostgreSQL's handlers must run on the main thread.
            let _blocked = SignalsBlocked::new();
            s.spawn(move || {
                loop {
                    let nap = borrowed
                        .keepalive_due_in()
                        .unwrap_or(Duration::from_secs(1))
                        .max(Duration::from_millis(5));
                    match stopped.recv_timeout(nap) {
                        Err(RecvTimeoutError::Timeout) => {
                            // A broken connection is found again by the main
                            // thread's next read.
                            if borrowed.keepalive().is_err() {
                                return;
                            }
                        }
                        _ => return,
                    }
                }
            })
        };
        let r = work();
        drop(stop);
        let _ = keeper.join();
        r
    });
    conn.set_hooks(hooks);
    r
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
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
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
