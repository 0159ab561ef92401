//! The Kubernetes source's own Prometheus metric names (README lists them), in one place rather
//! than spelled where they are counted. Its failures count in flowlog-identity's
//! `flowlog_identity_source_errors_total{source="kubernetes"}` (`FailureLog`).

/// Re-lists of a watched kind (the watch could not resume), by `kind`.
pub const RELISTS: &str = "flowlog_kubernetes_relists_total";
/// Failed reads and writes of the leader-election Lease (retried).
pub const LEASE_ERRORS: &str = "flowlog_kubernetes_lease_errors_total";
