//! The window's bounds as a person types them: an RFC 3339 time (`2026-12-07T22:00:00Z`), a
//! time relative to now (`-1h`, `-30m`, `now`), or ns since the epoch (what scripts and the
//! shipped SQL's variables use).
use chrono::{DateTime, SecondsFormat, Utc};

use crate::{BoxError, ReportError};

/// `input` as ns since the epoch; `now_ns` is what `now` and relative times count from.
pub fn parse_time(what: &'static str, input: &str, now_ns: u64) -> Result<u64, ReportError> {
    let error = |source: BoxError| ReportError::Time {
        what,
        input: input.to_string(),
        source,
    };
    let text = input.trim();
    if text == "now" {
        return Ok(now_ns);
    }
    if let Some(ago) = text.strip_prefix('-') {
        let ago = humantime::parse_duration(ago).map_err(|e| error(Box::new(e)))?;
        let ago = u64::try_from(ago.as_nanos()).unwrap_or(u64::MAX);
        return now_ns
            .checked_sub(ago)
            .ok_or_else(|| error("before 1970".into()));
    }
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<u64>().map_err(|e| error(Box::new(e)));
    }
    let time = DateTime::parse_from_rfc3339(text).map_err(|e| error(Box::new(e)))?;
    let ns = time
        .timestamp_nanos_opt()
        .ok_or_else(|| error("out of range (1677..2262)".into()))?;
    u64::try_from(ns).map_err(|_| error("before 1970".into()))
}

/// Now, in ns since the epoch.
pub fn now_ns() -> u64 {
    Utc::now()
        .timestamp_nanos_opt()
        .and_then(|ns| u64::try_from(ns).ok())
        .unwrap_or(u64::MAX)
}

/// `ns` since the epoch as RFC 3339 (UTC), for messages.
pub fn display_ns(ns: u64) -> String {
    DateTime::from_timestamp_nanos(i64::try_from(ns).unwrap_or(i64::MAX))
        .to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_796_680_800_000_000_000; // 2026-12-07T22:00:00Z

    #[test]
    fn rfc3339_relative_now_and_nanoseconds() {
        assert_eq!(
            parse_time("--from", "2026-12-07T22:00:00Z", 0).unwrap(),
            NOW
        );
        assert_eq!(
            parse_time("--from", "2026-12-07T23:00:00+01:00", 0).unwrap(),
            NOW
        );
        assert_eq!(
            parse_time("--from", "-1h", NOW).unwrap(),
            NOW - 3_600_000_000_000
        );
        assert_eq!(parse_time("--to", "now", NOW).unwrap(), NOW);
        assert_eq!(parse_time("--from", "0", NOW).unwrap(), 0);
        assert_eq!(display_ns(NOW), "2026-12-07T22:00:00Z");
    }

    #[test]
    fn a_bad_time_says_what_was_expected() {
        let err = parse_time("--from", "yesterday", NOW)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--from \"yesterday\" is not a time"), "{err}");
        assert!(err.contains("RFC 3339"), "{err}");
        assert!(parse_time("--from", "-1x", NOW).is_err());
        assert!(parse_time("--from", "1969-12-31T23:00:00Z", NOW).is_err());
    }
}
