//! Message ids: version 7 (time-ordered) for messages, version 4 for
//! correlation ids, from a per-process *pool* of random bytes.
//!
//! Asking the kernel for 16 random bytes per id cost two `getrandom`
//! system calls per message (6% of a captured message's write); the pool
//! asks once per `POOL` bytes. It is keyed by process id: a backend forked
//! from a postmaster that had filled it never hands out the same bytes as
//! its siblings.

use std::cell::RefCell;

use ring::rand::{SecureRandom, SystemRandom};

const POOL: usize = 1024;

struct Pool {
    pid: u32,
    used: usize,
    bytes: [u8; POOL],
}

thread_local! {
    static RANDOM: RefCell<Pool> = const { RefCell::new(Pool { pid: 0, used: POOL, bytes: [0; POOL] }) };
}

/// `N` bytes from the system's random source, by way of the pool.
fn random<const N: usize>() -> [u8; N] {
    RANDOM.with_borrow_mut(|p| {
        // The backend's own pid: no system call per id.
        #[cfg(not(test))]
        let pid = unsafe { pgrx::pg_sys::MyProcPid } as u32;
        #[cfg(test)]
        let pid = std::process::id();
        if p.pid != pid || p.used + N > POOL {
            SystemRandom::new()
                .fill(&mut p.bytes)
                .expect("the system's random source answers");
            p.pid = pid;
            p.used = 0;
        }
        let mut out = [0u8; N];
        out.copy_from_slice(&p.bytes[p.used..p.used + N]);
        // Handed out once: never again, not even to a later fork.
        p.bytes[p.used..p.used + N].fill(0);
        p.used += N;
        out
    })
}

/// A new message id: the current Unix time in milliseconds, then random
/// bits (ids of one millisecond are in no particular order).
#[cfg(test)]
pub fn message_id() -> uuid::Uuid {
    message_id_at(std::time::SystemTime::now())
}

/// A new message id written at `now` (the caller's one reading of the
/// clock).
pub fn message_id_at(now: std::time::SystemTime) -> uuid::Uuid {
    let ms = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    uuid::Builder::from_unix_timestamp_millis(ms, &random::<10>()).into_uuid()
}

/// A new random (version 4) id.
pub fn random_id() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(random::<16>()).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_well_formed_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let m = message_id();
            assert_eq!(m.get_version_num(), 7);
            assert_eq!(m.get_variant(), uuid::Variant::RFC4122);
            let r = random_id();
            assert_eq!(r.get_version_num(), 4);
            assert!(seen.insert(m) && seen.insert(r));
        }
    }

    #[test]
    fn message_ids_follow_the_clock() {
        let a = message_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = message_id();
        assert!(a < b, "{a} then {b}");
    }
}
