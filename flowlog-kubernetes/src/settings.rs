//! What can be tuned about the Kubernetes source: which labels travel with identities, how often
//! the watermark is sent, and how failing watches are retried and judged recovered. Defaults suit
//! a production cluster; tests shorten the times.
use std::time::Duration;

/// Settings of [`crate::KubernetesSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// Label keys copied from objects into identities (a label not listed is dropped: labels
    /// end up in every enriched record, so only the ones worth grouping by are kept).
    pub labels: Vec<String>,
    /// How often a Watermark(now) is sent while every watch is healthy.
    pub watermark_interval: Duration,
    /// First delay before a failed list or watch is retried; doubled per failure up to
    /// `backoff_max`, and back to this once failures stop for twice `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long a failed watch must go without a new error to count as recovered when it has
    /// no event to show for it. A watch that resumes from its resource version says nothing
    /// until something changes, so in a quiet cluster silence is the only sign of recovery. It
    /// must exceed `backoff_max` plus the longest a failing request takes to fail (the client's
    /// 30 s connect timeout against an unreachable server), so that a retry still failing is
    /// seen first: hence 45 s. In a busy cluster the next event ends the stall sooner.
    pub recovery_quiet: Duration,
}

impl Default for KubernetesSettings {
    fn default() -> Self {
        Self {
            labels: [
                "app",
                "app.kubernetes.io/name",
                "app.kubernetes.io/component",
                "team",
            ]
            .map(String::from)
            .to_vec(),
            watermark_interval: Duration::from_secs(1),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            recovery_quiet: Duration::from_secs(45),
        }
    }
}
