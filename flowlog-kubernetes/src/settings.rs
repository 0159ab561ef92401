//! What can be tuned about the Kubernetes source: which labels travel with identities, how often
//! each kind is probed (the precision of change times and the watermark's step), how long each
//! watch request lasts, and how failing ones are retried. Defaults suit a production cluster;
//! tests shorten the times.
use std::time::Duration;

/// Settings of [`crate::KubernetesSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// Label keys copied from objects into identities (a label not listed is dropped: labels
    /// end up in every enriched record, so only the ones worth grouping by are kept).
    pub labels: Vec<String>,
    /// How often each watched kind is probed: a consistent list of one object, whose answer
    /// carries the collection's current resourceVersion (see `crate::progress`). A change is
    /// dated to within the probes around it, so this is the width of the spans in which flows
    /// come out `ambiguous`, and the step of the watermark. Each probe is one request per kind.
    pub probe_interval: Duration,
    /// How long each watch request lasts (`timeoutSeconds`); it is then resumed from the last
    /// version seen. kube-apiserver sends a bookmark 2 s before a watch's timeout: that is how a
    /// kind with nothing to say proves that its stream has reached a probe's version, so this
    /// is also how long such a kind can hold the watermark back. At least 3 s (kube-apiserver
    /// sends no bookmark in a shorter watch).
    pub watch_timeout: Duration,
    /// First delay before a failed list or watch is retried; doubled per failure up to
    /// `backoff_max`, and back to this once failures stop for twice `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
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
            probe_interval: Duration::from_millis(100),
            watch_timeout: Duration::from_secs(3),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
        }
    }
}
