//! Settings: every `outbox.*` GUC, its default, and when it takes effect.
//!
//! `outbox.max_consumers` is read by the postmaster (PGC_POSTMASTER); every
//! other setting is reloadable (PGC_SIGHUP), and
//! `outbox.stomp_passcode` is visible to superusers only.

use std::ffi::{CStr, CString};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static STOMP_HOSTS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"127.0.0.1:61613"));
pub static STOMP_USERNAME: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"guest"));
pub static STOMP_PASSCODE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"guest"));
pub static STOMP_VHOST: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"/"));
pub static STOMP_HEARTBEATS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"10000,10000"));
pub static STOMP_USE_SSL: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static STOMP_KEY_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static STOMP_CERT_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static STOMP_CA_CERTS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static STOMP_QUEUE_HEADERS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(
    Some(cr#"{"durable":"true","auto-delete":"false","prefetch-count":"100"}"#),
);
pub static STOMP_CONNECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);
pub static MAXIMUM_BACKOFF_MS: GucSetting<i32> = GucSetting::<i32>::new(3_600_000);
pub static MAXIMUM_RETRY_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(50);
pub static PAUSE_FOR_RETRY_MS: GucSetting<i32> = GucSetting::<i32>::new(240_000);
pub static WAIT_RETRY_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static DAYS_TO_KEEP_DATA: GucSetting<i32> = GucSetting::<i32>::new(30);
pub static CLEANUP_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(86_400);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(500);
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
/// Most consumer workers: the upper bound of `outbox.max_consumers`, and
/// the consumer slots in shared memory.
pub const CONSUMER_SLOTS: usize = 64;

pub static MAX_CONSUMERS: GucSetting<i32> = GucSetting::<i32>::new(8);
pub static MAX_MESSAGE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
pub static CALLBACK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(300_000);

/// Where `outbox.publish()` and the trigger put a message.
#[derive(pgrx::PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Capture {
    /// A row of `outbox.published`.
    #[name = c"table"]
    Table,
    /// A transactional logical-decoding message (see capture.rs).
    #[name = c"wal"]
    Wal,
}

pub static CAPTURE: GucSetting<Capture> = GucSetting::<Capture>::new(Capture::Table);
pub static WAL_SPILL_AFTER_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// What `outbox.database` asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Databases {
    /// `*`: every database in which the extension is installed.
    All,
    /// The databases named.
    Names(Vec<String>),
}

impl Databases {
    /// Parses the setting: `*`, or names separated by commas (blanks
    /// around a name are dropped; a name may be double-quoted, `""` inside
    /// quotes standing for one `"`).
    pub fn parse(text: &str) -> Databases {
        if text.trim() == "*" {
            return Databases::All;
        }
        let mut names = Vec::new();
        let mut chars = text.chars().peekable();
        loop {
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            let mut name = String::new();
            if chars.next_if_eq(&'"').is_some() {
                while let Some(c) = chars.next() {
                    if c == '"' && chars.next_if_eq(&'"').is_none() {
                        break;
                    }
                    name.push(c);
                }
                while chars.next_if(|c| *c != ',').is_some() {}
            } else {
                while let Some(c) = chars.next_if(|c| *c != ',') {
                    name.push(c);
                }
                name.truncate(name.trim_end().len());
            }
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
            if chars.next().is_none() {
                break;
            }
        }
        Databases::Names(names)
    }

    /// Whether a database of this name is served (for `*`: when the
    /// extension is installed there, which the caller checks).
    pub fn serves(&self, name: &str) -> bool {
        match self {
            Databases::All => true,
            Databases::Names(names) => names.iter().any(|n| n == name),
        }
    }
}

/// The `outbox.database` setting, parsed.
pub fn databases() -> Databases {
    Databases::parse(&text(&DATABASE))
}

/// Registers every setting; called from `_PG_init` in every process that
/// loads the library.
pub fn init() {
    let ms = GucFlags::UNIT_MS;
    let s = GucFlags::UNIT_S;
    let none = GucFlags::default();
    let sighup = || GucContext::Sighup;

    // Postgres accepts PGC_POSTMASTER settings only while preloading; a
    // backend that loads the library later has no workers to configure.
    let preloading = unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress };
    string(
        c"outbox.database",
        c"Databases the outbox workers serve: a name, a comma-separated list, or * for every database with the extension.",
        &DATABASE,
        sighup(),
        none,
    );
    if preloading {
        GucRegistry::define_int_guc(
            c"outbox.max_consumers",
            c"Most consumer workers that may run at once.",
            c"",
            &MAX_CONSUMERS,
            0,
            CONSUMER_SLOTS as i32,
            GucContext::Postmaster,
            none,
        );
    }
    GucRegistry::define_enum_guc(
        c"outbox.capture",
        c"Where outbox.publish() and the trigger put a message: table (a row of outbox.published) or wal (a logical-decoding message).",
        c"",
        &CAPTURE,
        GucContext::Userset,
        none,
    );
    GucRegistry::define_int_guc(
        c"outbox.wal_spill_after",
        c"How long captured messages wait for an unreachable broker before they move into outbox.published.",
        c"",
        &WAL_SPILL_AFTER_MS,
        0,
        i32::MAX,
        sighup(),
        ms,
    );
    string(
        c"outbox.stomp_hosts",
        c"Comma-separated broker host:port list, tried in turn (failover).",
        &STOMP_HOSTS,
        sighup(),
        none,
    );
    string(
        c"outbox.stomp_username",
        c"STOMP login.",
        &STOMP_USERNAME,
        sighup(),
        none,
    );
    string(
        c"outbox.stomp_passcode",
        c"STOMP passcode (visible to superusers only).",
        &STOMP_PASSCODE,
        sighup(),
        GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
    );
    string(
        c"outbox.stomp_vhost",
        c"STOMP virtual host (the CONNECT host header).",
        &STOMP_VHOST,
        sighup(),
        none,
    );
    string(
        c"outbox.stomp_heartbeats",
        c"STOMP heart-beats in milliseconds: outgoing,incoming (0 turns one off).",
        &STOMP_HEARTBEATS,
        sighup(),
        none,
    );
    GucRegistry::define_bool_guc(
        c"outbox.stomp_use_ssl",
        c"Connect to the broker over TLS.",
        c"",
        &STOMP_USE_SSL,
        sighup(),
        none,
    );
    string(
        c"outbox.stomp_key_file",
        c"Client private key (PEM) for TLS.",
        &STOMP_KEY_FILE,
        sighup(),
        none,
    );
    string(
        c"outbox.stomp_cert_file",
        c"Client certificate (PEM) for TLS.",
        &STOMP_CERT_FILE,
        sighup(),
        none,
    );
    string(
        c"outbox.stomp_ca_certs",
        c"CA certificates (PEM) that sign the broker's certificate.",
        &STOMP_CA_CERTS,
        sighup(),
        none,
    );
    string(
        c"outbox.stomp_queue_headers",
        c"JSON object of headers added to every SUBSCRIBE (queue arguments).",
        &STOMP_QUEUE_HEADERS,
        sighup(),
        none,
    );
    int(
        c"outbox.stomp_connect_timeout",
        c"How long to wait for a broker connection and its CONNECTED answer.",
        &STOMP_CONNECT_TIMEOUT_MS,
        1,
        i32::MAX,
        ms,
    );
    int(
        c"outbox.maximum_backoff",
        c"Longest wait between two reconnection attempts.",
        &MAXIMUM_BACKOFF_MS,
        1,
        i32::MAX,
        ms,
    );
    int(
        c"outbox.maximum_retry_attempts",
        c"Failed attempts after which a message is marked failed.",
        &MAXIMUM_RETRY_ATTEMPTS,
        1,
        i32::MAX,
        none,
    );
    int(
        c"outbox.pause_for_retry",
        c"Wait before the third attempt.",
        &PAUSE_FOR_RETRY_MS,
        0,
        i32::MAX,
        ms,
    );
    int(
        c"outbox.wait_retry",
        c"Wait before each attempt after the third.",
        &WAIT_RETRY_MS,
        0,
        i32::MAX,
        ms,
    );
    int(
        c"outbox.days_to_keep_data",
        c"Age in days after which finished rows are deleted.",
        &DAYS_TO_KEEP_DATA,
        0,
        i32::MAX,
        none,
    );
    int(
        c"outbox.cleanup_interval",
        c"Least time between two retention runs of the worker.",
        &CLEANUP_INTERVAL_S,
        1,
        i32::MAX,
        s,
    );
    int(
        c"outbox.batch_size",
        c"Messages sent per batch and transaction.",
        &BATCH_SIZE,
        1,
        100_000,
        none,
    );
    int(
        c"outbox.poll_interval",
        c"Fallback wake-up of the publisher when no commit woke it.",
        &POLL_INTERVAL_MS,
        10,
        i32::MAX,
        ms,
    );
    int(
        c"outbox.callback_timeout",
        c"Longest run of one subscription callback; 0 means no limit.",
        &CALLBACK_TIMEOUT_MS,
        0,
        i32::MAX,
        ms,
    );
    int(
        c"outbox.max_message_bytes",
        c"Largest message body accepted by outbox.publish.",
        &MAX_MESSAGE_BYTES,
        1,
        i32::MAX,
        GucFlags::UNIT_BYTE,
    );
}

fn string(
    name: &'static CStr,
    short: &'static CStr,
    setting: &'static GucSetting<Option<CString>>,
    context: GucContext,
    flags: GucFlags,
) {
    GucRegistry::define_string_guc(name, short, c"", setting, context, flags);
}

fn int(
    name: &'static CStr,
    short: &'static CStr,
    setting: &'static GucSetting<i32>,
    min: i32,
    max: i32,
    flags: GucFlags,
) {
    GucRegistry::define_int_guc(
        name,
        short,
        c"",
        setting,
        min,
        max,
        GucContext::Sighup,
        flags,
    );
}

/// The current value of a string setting ('' when unset).
pub fn text(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod parse_tests {
    use super::Databases::{self, All, Names};

    fn names(list: &[&str]) -> Databases {
        Names(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn the_database_setting_takes_a_star_a_name_or_a_list() {
        assert_eq!(Databases::parse("*"), All);
        assert_eq!(Databases::parse("  * "), All);
        assert_eq!(Databases::parse("postgres"), names(&["postgres"]));
        assert_eq!(Databases::parse("a, b ,c"), names(&["a", "b", "c"]));
        assert_eq!(Databases::parse("a,,a, "), names(&["a"]));
        assert_eq!(Databases::parse(""), names(&[]));
        assert_eq!(
            Databases::parse(r#""x,y", "say ""hi""" ,z"#),
            names(&["x,y", r#"say "hi""#, "z"])
        );
        assert_eq!(Databases::parse("*x"), names(&["*x"]));
        assert!(All.serves("anything"));
        assert!(names(&["a", "b"]).serves("b"));
        assert!(!names(&["a", "b"]).serves("B"));
    }
}
