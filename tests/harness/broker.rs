//! The broker side of the tests: the machine's RabbitMQ (STOMP on
//! 127.0.0.1:61613), a plain STOMP subscriber to see what arrived, and a
//! lock that keeps tests which stop the broker away from the others.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../../src/stomp/mod.rs"]
pub mod stomp;

use stomp::client::{Config, Connection, StompError};
use stomp::frame::{Command, Frame};

pub const STOMP: &str = "127.0.0.1:61613";

static BROKER: RwLock<()> = RwLock::new(());

/// Held by tests that need the broker up.
pub fn shared_broker() -> RwLockReadGuard<'static, ()> {
    BROKER.read().unwrap_or_else(|e| e.into_inner())
}

/// Held by tests that stop or restart the broker.
pub fn exclusive_broker() -> RwLockWriteGuard<'static, ()> {
    BROKER.write().unwrap_or_else(|e| e.into_inner())
}

pub fn config() -> Config {
    Config {
        hosts: vec![STOMP.into()],
        login: "guest".into(),
        passcode: "guest".into(),
        vhost: "/".into(),
        heartbeat: (0, 0),
        connect_timeout: Duration::from_secs(5),
        tls: None,
        hooks: None,
    }
}

/// A subscriber on one destination (auto ack).
pub struct Subscriber {
    conn: Connection,
}

impl Subscriber {
    /// Subscribes and waits for the broker's receipt, so that nothing
    /// published afterwards is missed (topics keep nothing for absentees).
    pub fn new(destination: &str) -> Subscriber {
        Subscriber::with_headers(destination, &[])
    }

    pub fn with_headers(destination: &str, extra: &[(&str, &str)]) -> Subscriber {
        Subscriber::at(&config(), destination, extra)
    }

    /// A subscriber on the first host of `cfg` (another broker).
    pub fn at(cfg: &Config, destination: &str, extra: &[(&str, &str)]) -> Subscriber {
        crate::wait_for("the broker", Duration::from_secs(60), || {
            Subscriber::try_at(cfg, destination, extra).ok()
        })
    }

    /// One attempt to subscribe (for callers that expect the broker to go
    /// away and come back).
    pub fn try_at(
        cfg: &Config,
        destination: &str,
        extra: &[(&str, &str)],
    ) -> Result<Subscriber, StompError> {
        let mut conn = Connection::open(cfg, &cfg.hosts[0])?;
        let mut f = Frame::new(Command::Subscribe)
            .header("id", "0")
            .header("destination", destination)
            .header("ack", "auto")
            .header("receipt", "sub");
        for (k, v) in extra {
            f = f.header(*k, *v);
        }
        conn.queue(&f)?;
        conn.flush()?;
        match conn.read_frame(Duration::from_secs(10))? {
            Some(r) if r.command == Command::Receipt => Ok(Subscriber { conn }),
            other => Err(StompError::Protocol(format!(
                "subscribe answered {other:?}"
            ))),
        }
    }

    /// The next MESSAGE, None after `timeout`, or the connection's error.
    pub fn try_next(&mut self, timeout: Duration) -> Result<Option<Frame>, StompError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.conn.read_frame(left)? {
                Some(f) if f.command == Command::Message => return Ok(Some(f)),
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }

    /// The next MESSAGE, or None after `timeout` (panics if the connection
    /// fails).
    pub fn next(&mut self, timeout: Duration) -> Option<Frame> {
        self.try_next(timeout)
            .unwrap_or_else(|e| panic!("subscriber: {e}"))
    }

    /// Exactly `n` messages (panics if fewer arrive within `timeout`).
    pub fn take(&mut self, n: usize, timeout: Duration) -> Vec<Frame> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match self.next(deadline.saturating_duration_since(Instant::now())) {
                Some(f) => got.push(f),
                None => panic!("received {} of {n} messages within {timeout:?}", got.len()),
            }
        }
        got
    }
}

/// Runs `rabbitmqctl` with the given arguments (as root, or through sudo).
pub fn rabbitmqctl(args: &[&str]) {
    rabbitmqctl_output(args);
}

fn rabbitmqctl_output(args: &[&str]) -> String {
    let mut cmd = if unsafe { geteuid() } == 0 {
        std::process::Command::new("rabbitmqctl")
    } else {
        let mut c = std::process::Command::new("sudo");
        c.arg("rabbitmqctl");
        c
    };
    let out = cmd.args(args).output().expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Messages in a queue, ready or delivered and not yet ACKed; None when
/// the queue does not exist.
pub fn queue_depth(queue: &str) -> Option<i64> {
    rabbitmqctl_output(&["-q", "list_queues", "name", "messages"])
        .lines()
        .find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next() == Some(queue)).then(|| cols.next()?.parse().ok())?
        })
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

/// Waits until the broker accepts STOMP connections again.
pub fn wait_until_up() {
    crate::wait_for("the broker's STOMP port", Duration::from_secs(60), || {
        Connection::open(&config(), STOMP).ok()
    });
}

/// Sends raw STOMP messages to `destination`, each with its extra headers
/// (message ids set by hand) and its body bytes (any, also what the outbox
/// would never write), all receipted.
pub fn send_raw<B: AsRef<[u8]>>(destination: &str, messages: &[(&[(&str, &str)], B)]) {
    let mut conn = Connection::open(&config(), STOMP).unwrap();
    let frames: Vec<Frame> = messages
        .iter()
        .enumerate()
        .map(|(i, (headers, body))| {
            let mut f = Frame::new(Command::Send)
                .header("destination", destination)
                .header("receipt", format!("r{i}"))
                .header("persistent", "true");
            for (k, v) in *headers {
                f = f.header(*k, *v);
            }
            f.body(body.as_ref().to_vec())
        })
        .collect();
    let out = stomp::client::send_batch(&mut conn, &frames, Duration::from_secs(10));
    assert!(out.all_ok(), "{:?}", out.errors);
}
