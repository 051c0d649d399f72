//! Message headers: the user's headers (validated), and the generated ones
//! stored on every outbox row — `dop-*` (django-outbox-pattern's names),
//! `content-type`, and `outbox-op`/`outbox-table` on trigger messages.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::error::{OutboxError, Result};

/// Header names the STOMP frame itself uses; a user header must not set them.
pub const RESERVED: [&str; 8] = [
    "destination",
    "content-length",
    "receipt",
    "transaction",
    "message-id",
    "subscription",
    "ack",
    "id",
];

pub const CONTENT_TYPE: &str = "application/json;charset=utf-8";

/// Validated user headers, in the order given.
pub type Headers = Vec<(String, String)>;

pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains(':') || name.chars().any(|c| c.is_control()) {
        return Err(OutboxError::HeaderName(name.to_string()));
    }
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err(OutboxError::ReservedHeader(name.to_string()));
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks that `value` is an object of string values with acceptable names.
pub fn from_json(value: &Value) -> Result<Headers> {
    let Value::Object(map) = value else {
        return Err(OutboxError::HeadersNotObject(kind(value)));
    };
    let mut out = Vec::with_capacity(map.len());
    for (name, v) in map {
        check_name(name)?;
        match v {
            Value::String(s) => out.push((name.clone(), s.clone())),
            other => {
                return Err(OutboxError::HeaderValue {
                    name: name.clone(),
                    kind: kind(other),
                });
            }
        }
    }
    Ok(out)
}

/// What the generated headers of one message are made of.
pub struct Generated<'a> {
    pub message_id: &'a str,
    pub destination: &'a str,
    /// `(operation, schema.table)` for trigger messages.
    pub trigger: Option<(&'a str, &'a str)>,
    /// When the message was written.
    pub sent: SystemTime,
    /// `dop-correlation-id` unless the user gave one.
    pub correlation: uuid::Uuid,
}

/// The headers stored on the row, each name once (jsonb orders them):
/// `content-type` (the user may override it), the user's headers,
/// `dop-correlation-id` (the user's, else a new one), then the generated
/// `dop-msg-*` and `outbox-*`, which win over user headers of those names.
pub fn stored<'a>(user: &'a [(String, String)], g: &Generated<'a>) -> Vec<(&'a str, Cow<'a, str>)> {
    let mut generated: Vec<(&'a str, Cow<'a, str>)> = vec![
        ("dop-msg-id", g.message_id.into()),
        ("dop-msg-destination", g.destination.into()),
        ("dop-msg-type", "Published".into()),
        ("dop-msg-sent-time", sent_time(g.sent).into()),
    ];
    if let Some((op, table)) = g.trigger {
        generated.push(("outbox-op", op.into()));
        generated.push(("outbox-table", table.into()));
    }
    let mut out = Vec::with_capacity(user.len() + generated.len() + 2);
    // User header names are distinct already (they come from one object).
    if !user.iter().any(|(k, _)| k == "content-type") {
        out.push(("content-type", CONTENT_TYPE.into()));
    }
    for (k, v) in user {
        if !generated.iter().any(|(g, _)| g == k) {
            out.push((k.as_str(), v.as_str().into()));
        }
    }
    if !user.iter().any(|(k, _)| k == "dop-correlation-id") {
        out.push(("dop-correlation-id", g.correlation.to_string().into()));
    }
    out.extend(generated);
    out
}

/// Stored headers (distinct names) as a JSON object's text, in their
/// order: serialised straight from the pairs (a map of owned strings per
/// message was a tenth of a captured message's cost).
pub fn to_json(headers: &[(&str, Cow<str>)]) -> String {
    struct Pairs<'a>(&'a [(&'a str, Cow<'a, str>)]);
    impl serde::Serialize for Pairs<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().map(|(k, v)| (k, v.as_ref())))
        }
    }
    serde_json::to_string(&Pairs(headers)).expect("strings serialise")
}

/// `2026-11-28 06:30:00.123456+00:00`: the form django-outbox-pattern sends
/// (Python's `str()` of an aware UTC datetime).
pub fn sent_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02} {:02}:{:02}:{:02}.{:06}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    proptest::proptest! {
        #[test]
        fn headers_json_reads_back_as_the_pairs(
            pairs in proptest::collection::btree_map(".*", ".*", 0..8),
        ) {
            let headers: Vec<(&str, Cow<str>)> =
                pairs.iter().map(|(k, v)| (k.as_str(), Cow::from(v.as_str()))).collect();
            let back: serde_json::Map<String, Value> = serde_json::from_str(&to_json(&headers)).unwrap();
            let want: serde_json::Map<String, Value> = pairs
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            proptest::prop_assert_eq!(back, want);
        }
    }

    #[test]
    fn every_character_json_escapes_reads_back() {
        let mut s: String = (0u8..0x20).map(char::from).collect();
        s.push_str("\"\\/\u{7f}é\u{2028}\u{2029}😀:end");
        let headers = [("k\n\"", Cow::from(s.as_str()))];
        let text = to_json(&headers);
        assert!(!text.bytes().any(|b| b < 0x20), "{text:?}");
        let back: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(back["k\n\""], Value::String(s));
    }

    #[test]
    fn sent_time_matches_known_instants() {
        let t = UNIX_EPOCH + Duration::from_micros(1_795_847_400_123_456);
        assert_eq!(sent_time(t), "2026-11-28 06:30:00.123456+00:00");
        assert_eq!(sent_time(UNIX_EPOCH), "1970-01-01 00:00:00.000000+00:00");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&sent_time(leap)[..10], "2000-02-29");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("team").is_ok());
        for bad in ["", "a:b", "a\nb"] {
            assert!(
                matches!(check_name(bad), Err(OutboxError::HeaderName(_))),
                "{bad:?}"
            );
        }
        for r in RESERVED {
            assert!(matches!(check_name(r), Err(OutboxError::ReservedHeader(_))));
        }
        assert!(matches!(
            check_name("Destination"),
            Err(OutboxError::ReservedHeader(_))
        ));
    }

    #[test]
    fn generated_headers_win_but_correlation_id_is_kept() {
        let user = vec![
            ("dop-msg-id".to_string(), "forged".to_string()),
            ("dop-correlation-id".to_string(), "corr-1".to_string()),
            ("team".to_string(), "billing".to_string()),
        ];
        let g = Generated {
            message_id: "m-1",
            destination: "/topic/a",
            trigger: Some(("INSERT", "public.t")),
            sent: SystemTime::now(),
            correlation: uuid::Uuid::nil(),
        };
        let pairs = stored(&user, &g);
        let mut names: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), pairs.len(), "each name once: {pairs:?}");
        let v: Value = serde_json::from_str(&to_json(&pairs)).unwrap();
        assert_eq!(v["dop-msg-id"], "m-1");
        assert_eq!(v["dop-correlation-id"], "corr-1");
        assert_eq!(v["team"], "billing");
        assert_eq!(v["dop-msg-type"], "Published");
        assert_eq!(v["dop-msg-destination"], "/topic/a");
        assert_eq!(v["content-type"], CONTENT_TYPE);
        assert_eq!(v["outbox-op"], "INSERT");
        assert_eq!(v["outbox-table"], "public.t");
    }

    #[test]
    fn a_user_content_type_wins_and_a_correlation_id_is_made() {
        let user = vec![("content-type".to_string(), "text/plain".to_string())];
        let g = Generated {
            message_id: "m-2",
            destination: "/queue/b",
            trigger: None,
            sent: UNIX_EPOCH + Duration::from_micros(1_795_847_400_123_456),
            correlation: uuid::Uuid::from_u128(7),
        };
        let v: Value = serde_json::from_str(&to_json(&stored(&user, &g))).unwrap();
        assert_eq!(v["dop-msg-sent-time"], "2026-11-28 06:30:00.123456+00:00");
        assert_eq!(
            v["dop-correlation-id"],
            "00000000-0000-0000-0000-000000000007"
        );
        assert_eq!(v["content-type"], "text/plain");
        assert_eq!(v["dop-correlation-id"].as_str().unwrap().len(), 36);
        assert!(v.get("outbox-op").is_none());
        assert_eq!(v.as_object().unwrap().len(), 6);
    }
}
