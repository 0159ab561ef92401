//! Rate limit for repeated warnings: a condition is logged the first time, then at most once a
//! minute with its running count, so a persistent problem (broker down, ring buffer overflowing)
//! is visible without flooding the log.
use std::time::{Duration, Instant};

/// One condition's log throttle.
#[derive(Debug, Default)]
pub struct LogThrottle {
    /// Occurrences counted with [`LogThrottle::hit`].
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
}
