//! The broker as the workers see it: connection settings read from the
//! `outbox.stomp_*` GUCs, SEND frames built from outbox rows, and the
//! reconnection backoff (exponential, with jitter, capped by
//! `outbox.maximum_backoff`).

use std::time::Duration;

use crate::guc;
use crate::headers::RESERVED;
use crate::stomp::client::{Config, TlsConfig};
use crate::stomp::frame::{Command, Frame};

/// Connection settings from the current GUC values.
pub fn config() -> Config {
    let hosts = guc::text(&guc::STOMP_HOSTS)
        .split(',')
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    Config {
        hosts,
        login: guc::text(&guc::STOMP_USERNAME),
        passcode: guc::text(&guc::STOMP_PASSCODE),
        vhost: guc::text(&guc::STOMP_VHOST),
        heartbeat: heartbeats(&guc::text(&guc::STOMP_HEARTBEATS)),
        connect_timeout: Duration::from_millis(guc::STOMP_CONNECT_TIMEOUT_MS.get().max(1) as u64),
        tls: guc::STOMP_USE_SSL.get().then(|| TlsConfig {
            ca_certs: guc::text(&guc::STOMP_CA_CERTS),
            cert_file: guc::text(&guc::STOMP_CERT_FILE),
            key_file: guc::text(&guc::STOMP_KEY_FILE),
        }),
        // Every wait on the broker also wakes for interrupts.
        hooks: Some(crate::latch::HOOKS),
    }
}

/// `outbox.stomp_heartbeats` as (outgoing, incoming) ms; malformed → off.
fn heartbeats(text: &str) -> (u32, u32) {
    text.split_once(',')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
        .unwrap_or((0, 0))
}

/// A SEND frame for one outbox row: its stored headers (the reserved STOMP
/// names are skipped: the frame sets those), `persistent:true`; the caller
/// adds a receipt or a transaction.
pub fn send_frame(destination: &str, headers_json: &str, body: &str) -> Frame {
    let mut frame = Frame::new(Command::Send)
        .header("destination", destination)
        .header("persistent", "true");
    if let Ok(serde_json::Value::Object(map)) =
        serde_json::from_str::<serde_json::Value>(headers_json)
    {
        for (k, v) in map {
            if let serde_json::Value::String(v) = v
                && !RESERVED.iter().any(|r| r.eq_ignore_ascii_case(&k))
                && k != "persistent"
            {
                frame = frame.header(k, v);
            }
        }
    }
    frame.body(body.as_bytes().to_vec())
}

/// Reconnection delays: 100 ms doubling per failure, with up to 50 %
/// jitter, capped by `outbox.maximum_backoff`.
#[derive(Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The wait before the next attempt, counting this failure.
    pub fn next_delay(&mut self) -> Duration {
        let cap = Duration::from_millis(guc::MAXIMUM_BACKOFF_MS.get().max(1) as u64);
        let exp = Duration::from_millis(100).saturating_mul(1u32 << self.failures.min(20));
        self.failures = self.failures.saturating_add(1);
        let base = exp.min(cap);
        // Jitter from the clock's nanoseconds: enough to spread workers apart.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let jitter = base.mul_f64(f64::from(nanos % 1000) / 2000.0);
        (base - jitter).max(Duration::from_millis(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_parse_or_turn_off() {
        assert_eq!(heartbeats("10000,10000"), (10000, 10000));
        assert_eq!(heartbeats(" 0 , 5000"), (0, 5000));
        assert_eq!(heartbeats("nonsense"), (0, 0));
    }

    #[test]
    fn send_frames_skip_reserved_headers_and_are_persistent() {
        let f = send_frame(
            "/queue/a",
            r#"{"dop-msg-id":"m","destination":"/queue/evil","n":"1","x":2}"#,
            "{}",
        );
        assert_eq!(f.get("destination"), Some("/queue/a"));
        assert_eq!(f.get("persistent"), Some("true"));
        assert_eq!(f.get("dop-msg-id"), Some("m"));
        assert_eq!(f.get("receipt"), None);
        assert_eq!(
            f.headers.iter().filter(|(k, _)| k == "destination").count(),
            1
        );
        assert_eq!(f.get("x"), None);
    }
}
