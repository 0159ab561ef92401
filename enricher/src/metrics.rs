//! The Prometheus metrics of the enricher and of `flowlog-inventory`: names (README lists them;
//! every name is a constant here, none spelled where it is counted) and the exporter.
use std::{net::SocketAddr, sync::Arc};

use flowlog_cli::histogram::FixedHistogram;

use metrics_exporter_prometheus::PrometheusBuilder;

/// Messages read from the input topic.
pub const RECORDS_IN: &str = "flowlog_enricher_records_in_total";
/// Enriched flows produced and acknowledged by the output topic (or written, without Kafka).
pub const RECORDS_OUT: &str = "flowlog_enricher_records_out_total";
/// Input messages that could not be decoded, by `reason` (truncated, wrong_magic_byte,
/// unknown_schema_id, malformed); each went to the dead-letter topic.
pub const DLQ_TOTAL: &str = "flowlog_enricher_dlq_total";
/// Ends attributed, by `end` (local/remote) and `status` (exact/ambiguous/unknown).
pub const ATTRIBUTED_TOTAL: &str = "flowlog_enricher_attributed_total";
/// Flows held for the inventory to catch up to their start.
pub const HELD_TOTAL: &str = "flowlog_enricher_held_total";
/// Held flows whose hold ran out before the inventory caught up (their lookups are `unknown`).
pub const HOLD_EXPIRED_TOTAL: &str = "flowlog_enricher_hold_expired_total";
/// Flows held now.
pub const HELD: &str = "flowlog_enricher_held";
/// Held flows that waited for a source, by `source` (a flow waiting for two counts for both).
pub const WAITS_TOTAL: &str = "flowlog_enricher_waits_total";
/// Held flows released with an end `unknown` because `source` had not reported far enough
/// within its patience.
pub const WAIT_EXPIRED_TOTAL: &str = "flowlog_enricher_wait_expired_total";
/// How long held flows were held, seconds.
pub const HOLD_SECONDS: &str = "flowlog_enricher_hold_seconds";
/// Ends whose answer over the clock-skew window was `ambiguous` or `unknown` where the flow's
/// start alone gave another answer, by `end` and `status`.
pub const SKEW_WIDENED_TOTAL: &str = "flowlog_enricher_skew_widened_total";
/// Ends that came out `exact` only because the flow proves its address was held (the peer
/// answered, or the reporting host's own address) while the inventory knew its owner's change
/// only to within an uncertain span, by `end`.
pub const PRESENCE_RESOLVED_TOTAL: &str = "flowlog_enricher_presence_resolved_total";
/// How far behind now each registered source has reported (now minus its watermark), by
/// `source`, seconds; +Inf before its first report.
pub const SOURCE_LAG: &str = "flowlog_enricher_source_lag_seconds";
/// Consumer lag in messages, by `partition` (librdkafka's statistics).
pub const CONSUMER_LAG: &str = "flowlog_enricher_consumer_lag";
/// Output deliveries that failed and were retried, by `kind`.
pub const DELIVERY_ERRORS: &str = "flowlog_enricher_delivery_errors_total";
/// Kafka client errors (brokers unreachable, ...), by `kind`.
pub const KAFKA_ERRORS: &str = "flowlog_enricher_kafka_errors_total";
/// Flow end → enriched flow acknowledged by the output topic (or written), seconds.
pub const LATENCY: &str = "flowlog_enricher_latency_seconds";
/// How far behind now the inventory is complete (now minus the oldest source watermark), in
/// seconds; +Inf while a source has not reported at all. Flows newer than that are held.
pub const INVENTORY_LAG: &str = "flowlog_enricher_inventory_lag_seconds";
/// Input offsets stored for commit (every output durable up to them).
pub const OFFSETS_STORED: &str = "flowlog_enricher_offsets_stored_total";

/// Parquet files written (uploaded completely).
pub const PARQUET_FILES: &str = "flowlog_enricher_parquet_files_total";
/// Rows in the Parquet files written.
pub const PARQUET_ROWS: &str = "flowlog_enricher_parquet_rows_total";
/// Bytes of the Parquet files written.
pub const PARQUET_BYTES: &str = "flowlog_enricher_parquet_bytes_total";
/// Failed Parquet upload attempts (each is retried).
pub const PARQUET_UPLOAD_ERRORS: &str = "flowlog_enricher_parquet_upload_errors_total";

/// Kafka client errors of the ownership topic's reader and publisher, by `kind`.
pub const OWNERSHIP_KAFKA_ERRORS: &str = "flowlog_ownership_kafka_errors_total";
/// Ownership records that could not be read (not JSON of an ownership record): skipped.
pub const OWNERSHIP_MALFORMED: &str = "flowlog_ownership_malformed_total";

/// Ownership records `flowlog-inventory` published to the ownership topic.
pub const INVENTORY_PUBLISHED: &str = "flowlog_inventory_published_total";
/// Failed attempts (retried) to publish an ownership record, by `kind`.
pub const INVENTORY_PUBLISH_ERRORS: &str = "flowlog_inventory_publish_errors_total";
/// Closes for no open tenure, which `flowlog-inventory` ignores.
pub const INVENTORY_UNMATCHED_CLOSES: &str = "flowlog_inventory_unmatched_closes_total";
/// 1 while this `flowlog-inventory` is the one that publishes (always, without
/// `--leader-election`).
pub const INVENTORY_LEADER: &str = "flowlog_inventory_leader";
/// Times this `flowlog-inventory` became the leader.
pub const INVENTORY_LEADER_TRANSITIONS: &str = "flowlog_inventory_leader_transitions_total";

/// The buckets of the time histograms (seconds): [`LATENCY`] and [`HOLD_SECONDS`].
pub const TIME_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];

/// The Prometheus recorder's settings: the hold histogram's buckets. ([`LATENCY`], one sample
/// per flow, is a [`latency_histogram`] beside the recorder.)
pub fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(HOLD_SECONDS.to_string()),
            TIME_BUCKETS,
        )
        .expect("the buckets are not empty")
}

/// [`LATENCY`], served on `/metrics` as a Prometheus histogram with [`TIME_BUCKETS`] like the
/// recorder's histograms, but counted per batch of delivery reports
/// ([`flowlog_cli::histogram`]): one sample per flow through the recorder cost 6% of the
/// pipeline's thread.
pub fn latency_histogram() -> Arc<FixedHistogram> {
    FixedHistogram::register(LATENCY, TIME_BUCKETS)
}

/// Installs the recorder and serves `/metrics`, `/healthz` and `/readyz` (from `health`) on
/// `addr`. Returns the address it listens on.
pub async fn serve(
    addr: SocketAddr,
    health: flowlog_cli::Health,
) -> Result<SocketAddr, flowlog_cli::telemetry::TelemetryError> {
    flowlog_cli::telemetry::serve(addr, builder(), health).await
}
