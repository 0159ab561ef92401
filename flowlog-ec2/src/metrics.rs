//! The EC2 source's own Prometheus metric names (README lists them), in one place rather than
//! spelled where they are counted. Its failures count in flowlog-identity's
//! `flowlog_identity_source_errors_total{source="ec2",kind}` (`FailureLog`).

/// EC2 polls, by `result` (`ok` or `error`).
pub const POLLS: &str = "flowlog_ec2_polls_total";
/// (ENI, prefix) pairs owned as of the last good EC2 poll.
pub const PREFIXES: &str = "flowlog_ec2_prefixes";
