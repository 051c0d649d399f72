//! A worker's link to the broker, shared by the publisher and the
//! consumers: the connection, failover through `outbox.stomp_hosts` (each
//! attempt tries the next host), the reconnection backoff, the status in
//! shared memory, and each distinct problem logged once.

use std::time::{Duration, Instant};

use pgrx::prelude::*;

use crate::broker::{self, Backoff};
use crate::status::Reporter;
use crate::stomp::client::{Config, Connection, StompError};

pub struct Link {
    pub config: Config,
    pub conn: Option<Connection>,
    backoff: Backoff,
    reconnect_at: Option<Instant>,
    next_host: usize,
    /// The last problem logged (logged once until it changes or clears).
    logged: Option<String>,
    /// How log lines start: `outbox publisher`, `outbox consumer "name"`.
    who: String,
    report: Reporter,
}

impl Link {
    pub fn new(who: String, report: Reporter) -> Link {
        Link {
            config: broker::config(),
            conn: None,
            backoff: Backoff::default(),
            reconnect_at: None,
            next_host: 0,
            logged: None,
            who,
            report,
        }
    }

    /// Re-reads the settings after a reload; when any `outbox.stomp_*`
    /// changed, disconnects (the next attempt uses the new ones).
    pub fn reload(&mut self) {
        let config = broker::config();
        if config != self.config {
            log!("{}: broker settings changed, reconnecting", self.who);
            self.config = config;
            self.disconnect();
            self.reconnect_at = None;
            self.backoff.reset();
            self.next_host = 0;
        }
    }

    pub fn disconnect(&mut self) {
        if let Some(c) = self.conn.take() {
            let _ = c.disconnect(Duration::from_millis(500));
        }
    }

    /// Forgets the backoff: the next attempt is due now.
    pub fn retry_now(&mut self) {
        self.reconnect_at = None;
        self.backoff.reset();
    }

    /// How long until the next connection attempt is due (zero: now).
    pub fn backing_off(&self) -> Duration {
        self.reconnect_at
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Connects to the next host and runs `setup` on the new connection
    /// (a SUBSCRIBE, say). Some((host, recovered)) on success, `recovered`
    /// when a problem had been logged; None (backoff set) on failure,
    /// worded by `describe`.
    pub fn connect(
        &mut self,
        setup: impl FnOnce(&mut Connection) -> Result<(), StompError>,
        describe: impl FnOnce(&str, &StompError) -> String,
    ) -> Option<(String, bool)> {
        if self.config.hosts.is_empty() {
            self.problem("outbox.stomp_hosts is empty".into());
            self.reconnect_at = Some(Instant::now() + self.backoff.next_delay());
            return None;
        }
        let host = self.config.hosts[self.next_host % self.config.hosts.len()].clone();
        match Connection::open(&self.config, &host).and_then(|mut c| setup(&mut c).map(|()| c)) {
            Ok(c) => {
                self.conn = Some(c);
                self.report.connected(&host);
                self.backoff.reset();
                self.reconnect_at = None;
                let recovered = self.logged.take().is_some();
                Some((host, recovered))
            }
            Err(e) => {
                self.next_host = (self.next_host + 1) % self.config.hosts.len();
                let why = describe(&host, &e);
                self.report.failed(&host, &why);
                self.problem(why);
                self.reconnect_at = Some(Instant::now() + self.backoff.next_delay());
                None
            }
        }
    }

    /// The connection broke with `why`: drop it, try the next host after a
    /// backoff.
    pub fn broke(&mut self, why: impl std::fmt::Display) {
        let host = self
            .conn
            .as_ref()
            .map(|c| c.host().to_string())
            .unwrap_or_default();
        self.lost(format!("connection to {host} lost: {why}"));
    }

    /// The connection broke: drop it, try the next host after a backoff.
    pub fn lost(&mut self, why: String) {
        let host = self
            .conn
            .as_ref()
            .map(|c| c.host().to_string())
            .unwrap_or_default();
        self.report.failed(&host, &why);
        self.conn = None;
        self.next_host = (self.next_host + 1) % self.config.hosts.len().max(1);
        self.problem(why);
        self.reconnect_at = Some(Instant::now() + self.backoff.next_delay());
    }

    /// Logs a problem once, until another one (or a recovery) comes.
    pub fn problem(&mut self, what: String) {
        if self.logged.as_deref() != Some(what.as_str()) {
            warning!("{}: {what}", self.who);
            self.logged = Some(what);
        }
    }
}
