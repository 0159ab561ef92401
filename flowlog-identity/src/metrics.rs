//! The identity index's and inventory sources' Prometheus metric names (README lists them), in
//! one place rather than spelled where they are counted. Sources in other crates count their
//! failures here too, through [`FailureLog`](crate::FailureLog).

/// Ownership changes applied, by `kind` (`open`, `close`, `watermark`).
pub const CHANGES: &str = "flowlog_identity_changes_total";
/// Opens of an already open owner/prefix (re-lists): no second interval.
pub const DUPLICATE_OPENS: &str = "flowlog_identity_duplicate_opens_total";
/// Opens re-sent for a tenure already closed (ignored).
pub const STALE_OPENS: &str = "flowlog_identity_stale_opens_total";
/// Closes re-sent for a tenure that already ended then (ignored).
pub const STALE_CLOSES: &str = "flowlog_identity_stale_closes_total";
/// Closes with no open interval (kept pending for a late Open).
pub const UNMATCHED_CLOSES: &str = "flowlog_identity_unmatched_closes_total";
/// Opens that arrived after their Close (became closed intervals).
pub const LATE_OPENS: &str = "flowlog_identity_late_opens_total";
/// Closes earlier than their Open (the interval is dropped).
pub const INVERTED_CLOSES: &str = "flowlog_identity_inverted_closes_total";
/// Watermarks older than the source's last one (ignored).
pub const WATERMARK_REGRESSIONS: &str = "flowlog_identity_watermark_regressions_total";
/// Watermarks from sources that do not gate the index.
pub const UNREGISTERED_WATERMARKS: &str = "flowlog_identity_unregistered_watermarks_total";
/// Closed intervals forgotten by pruning.
pub const PRUNED_INTERVALS: &str = "flowlog_identity_pruned_intervals_total";
/// Intervals held.
pub const INTERVALS: &str = "flowlog_identity_intervals";
/// Prefixes held.
pub const PREFIXES: &str = "flowlog_identity_prefixes";
/// Failed checks of an inventory source, by `source` (and `kind` where the source names one).
pub const SOURCE_ERRORS: &str = "flowlog_identity_source_errors_total";
/// Inventory sources that stopped with a fatal error, by `source`.
pub const SOURCE_FAILURES: &str = "flowlog_identity_source_failures_total";
/// Static files that failed to read or parse (previous entries kept).
pub const STATIC_RELOAD_ERRORS: &str = "flowlog_identity_static_reload_errors_total";
