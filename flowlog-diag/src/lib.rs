//! How flowlog reports trouble, in one place for every crate that logs: [`error_chain`] renders
//! an error with its causes (library errors keep a cause as their `source()`, never as text in
//! their own message, so a log line needs the whole chain), and [`LogThrottle`] rate-limits a
//! warning that would otherwise repeat per event or per attempt.
//!
//! Its own crate, with no dependencies, because it has to sit below all of its users:
//! `flowlog-common` is `no_std` (it is shared with the eBPF programs), and neither
//! `flowlog-kafka` (librdkafka) nor `flowlog-identity` is a dependency the other should take.
use std::{
    error::Error,
    time::{Duration, Instant},
};

/// Formats an error with its chain of causes (`outer: cause: root cause`), for log fields and
/// for messages that must carry the whole story (what `{:#}` of an `anyhow::Error` prints).
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// One condition's log throttle: a condition is logged the first time, then at most once a
/// minute with its running count, so a persistent problem (broker down, ring buffer
/// overflowing, an inventory source failing) is visible without flooding the log. Callers count
/// the condition in their own metric; this only decides when to log.
#[derive(Debug, Default)]
pub struct LogThrottle {
    /// Occurrences counted with [`LogThrottle::hit`] since the last [`LogThrottle::clear`].
    pub count: u64,
    last: Option<Instant>,
}

impl LogThrottle {
    /// Least time between two log lines of one condition.
    pub const EVERY: Duration = Duration::from_secs(60);

    /// Counts one occurrence; true when it should be logged.
    pub fn hit(&mut self) -> bool {
        self.count += 1;
        self.due()
    }

    /// True (and restarts the period) when the condition may be logged now.
    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= Self::EVERY)
        {
            self.last = Some(now);
            return true;
        }
        false
    }

    /// The condition ended (a source recovered): returns how many occurrences it had and starts
    /// afresh, so that the next occurrence is logged at once.
    pub fn clear(&mut self) -> u64 {
        std::mem::take(self).count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_first_then_once_a_minute() {
        let mut t = LogThrottle::default();
        assert!(t.hit());
        assert!(!t.hit());
        assert!(!t.due());
        assert_eq!(t.count, 2);
    }

    #[test]
    fn clear_returns_the_count_and_logs_the_next_hit() {
        let mut t = LogThrottle::default();
        t.hit();
        t.hit();
        assert_eq!(t.clear(), 2);
        assert_eq!(t.count, 0);
        assert!(t.hit(), "a new condition is logged at once");
    }

    #[test]
    fn chain_names_every_cause() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("reading the spool")
            }
        }
        impl Error for Outer {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(error_chain(&e), "reading the spool: disk on fire");
    }
}
