//! The agent's Prometheus metrics: names, help texts and the exporter. Names follow
//! `flowlog_sidecar_<what>_<unit>`; README lists them.
use std::net::SocketAddr;

use metrics::{describe_counter, describe_gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

pub const RECORDS: &str = "flowlog_sidecar_records_total";
pub const EVENTS: &str = "flowlog_sidecar_events_total";
pub const KERNEL_DROPS: &str = "flowlog_sidecar_kernel_drops_total";
pub const UNTRACKED_CLOSES: &str = "flowlog_sidecar_untracked_closes_total";
pub const ADOPTED_FLOWS: &str = "flowlog_sidecar_adopted_flows_total";
pub const LATE_STARTS: &str = "flowlog_sidecar_late_starts_total";
pub const SOCKETS_TRACKED: &str = "flowlog_sidecar_sockets_tracked";
pub const READ_PATH: &str = "flowlog_sidecar_read_path";
pub const PINNED: &str = "flowlog_sidecar_pinned";
pub const CPU_SECONDS: &str = "flowlog_sidecar_cpu_seconds_total";
pub const RESIDENT_BYTES: &str = "flowlog_sidecar_resident_memory_bytes";
pub const STALE_SNAPSHOTS: &str = "flowlog_sidecar_stale_snapshots_total";
pub const LATE_RESETS: &str = "flowlog_sidecar_late_resets_total";
pub const COUNTER_REGRESSIONS: &str = "flowlog_sidecar_counter_regressions_total";
pub const UNKNOWN_EVENTS: &str = "flowlog_sidecar_unknown_events_total";
pub const MISSED_ENDS: &str = "flowlog_sidecar_missed_ends_total";
pub const RECOVERED_ENDS: &str = "flowlog_sidecar_recovered_ends_total";
pub const CAUGHT_STATE_CHANGES: &str = "flowlog_sidecar_caught_state_changes_total";
pub const CAUGHT_ENDS: &str = "flowlog_sidecar_caught_ends_total";
pub const VANISHED_FLOWS: &str = "flowlog_sidecar_vanished_flows_total";
pub const VANISHED_EVENTS: &str = "flowlog_sidecar_vanished_events_total";
pub const SINK_ERRORS: &str = "flowlog_sidecar_sink_errors_total";
pub const KAFKA_RECORDS_SENT: &str = "flowlog_sidecar_kafka_records_sent_total";
pub const KAFKA_DELIVERY_ERRORS: &str = "flowlog_sidecar_kafka_delivery_errors_total";
pub const KAFKA_QUEUE_DEPTH: &str = "flowlog_sidecar_kafka_queue_depth";
pub const KAFKA_BYTES: &str = "flowlog_sidecar_kafka_bytes_total";
pub const KAFKA_UNDELIVERED: &str = "flowlog_sidecar_kafka_undelivered_total";
pub const KAFKA_QUEUE_FULL_WAITS: &str = "flowlog_sidecar_kafka_queue_full_waits_total";
pub const KAFKA_BROKER_ERRORS: &str = "flowlog_sidecar_kafka_broker_errors_total";
pub const SPOOL_RECORDS: &str = "flowlog_sidecar_spool_records";
pub const SPOOL_BYTES: &str = "flowlog_sidecar_spool_bytes";
pub const SPOOL_DROPPED: &str = "flowlog_sidecar_spool_dropped_total";
pub const SPOOL_ERRORS: &str = "flowlog_sidecar_spool_errors_total";

/// Installs the metrics recorder, serves `/metrics`, `/healthz` and `/readyz` (from `health`)
/// on `addr`, and describes every metric. Returns the address it listens on.
pub async fn serve(
    addr: SocketAddr,
    health: flowlog_cli::Health,
) -> Result<SocketAddr, flowlog_cli::telemetry::TelemetryError> {
    let bound = flowlog_cli::telemetry::serve(addr, PrometheusBuilder::new(), health).await?;
    describe_counter!(RECORDS, "Flow records written, by outcome.");
    describe_counter!(EVENTS, "Events read from the kernel ring buffer, by kind.");
    describe_counter!(
        KERNEL_DROPS,
        "Data lost in the kernel, by reason (ringbuf_full: records lost; map_full: flows not tracked; skipped_run: socket events no program saw, the kernel not re-entering a program already running on that CPU)."
    );
    describe_counter!(
        UNTRACKED_CLOSES,
        "Sockets that closed without having been tracked (opened before the agent started, or evicted)."
    );
    describe_counter!(
        LATE_STARTS,
        "Inbound flows whose start the kernel skipped the state-change program for, started when their process accepted them (start_ns is the accept's time)."
    );
    describe_counter!(
        ADOPTED_FLOWS,
        "Connections open before the programs were attached that the agent adopted at start (their records have adopted=true)."
    );
    describe_gauge!(
        SOCKETS_TRACKED,
        "Open sockets in the kernel flow map at the last sweep."
    );
    describe_gauge!(
        READ_PATH,
        "How the socket state-change programs read struct tcp_sock, chosen at start: 1 for the path in use (tp_btf: BTF-typed tracepoint, direct loads; probe_read: raw tracepoint with probe reads, the fallback), 0 for the other."
    );
    describe_gauge!(
        PINNED,
        "1 if the kernel state is pinned in bpffs (the programs keep tracking while no agent runs, and a restart loses nothing), 0 if the agent runs unpinned (--pin-dir '', or bpffs not mounted or writable)."
    );
    describe_counter!(
        CPU_SECONDS,
        "CPU time used by the agent process (user + system)."
    );
    describe_gauge!(RESIDENT_BYTES, "Resident memory of the agent process.");
    describe_counter!(
        STALE_SNAPSHOTS,
        "Interim snapshots that arrived after their flow's end record (ignored; nothing lost)."
    );
    describe_counter!(
        LATE_RESETS,
        "Resets sent after a flow's end record was released (not in any record)."
    );
    describe_counter!(
        COUNTER_REGRESSIONS,
        "Snapshots whose counters went backwards (snapshot raced a state change)."
    );
    describe_counter!(
        UNKNOWN_EVENTS,
        "Ring buffer events of an unknown kind or size."
    );
    describe_counter!(
        CAUGHT_STATE_CHANGES,
        "Socket state changes the kernel skipped the state-change program for (a softirq interrupting it on its CPU) whose work was done later: an end at the socket's destruction or by the sweep, an inbound start at its accept."
    );
    describe_counter!(
        CAUGHT_ENDS,
        "Flow ends the state-change program was skipped for, written when the socket was destroyed (end_ns is the destruction's time)."
    );
    describe_counter!(
        RECOVERED_ENDS,
        "Flow ends the state-change program never saw while the process still held the closed socket: the sweep wrote the end record from its final counters (end_ns at most one sweep period late)."
    );
    describe_counter!(
        MISSED_ENDS,
        "Tracked flows found with their socket re-used for another one: their end reached no program (destroyed unseen); dropped without an end record."
    );
    describe_counter!(
        VANISHED_FLOWS,
        "Flows with records that got no snapshot for three interim periods (evicted from the kernel map, or a missed end): forgotten."
    );
    describe_counter!(
        VANISHED_EVENTS,
        "Events of vanished flows that arrived after all: ignored, their counters since the last record unreported."
    );
    describe_counter!(SINK_ERRORS, "Failed writes to the output.");
    describe_counter!(
        KAFKA_RECORDS_SENT,
        "Flow records whose Kafka delivery report said they were written."
    );
    describe_counter!(
        KAFKA_DELIVERY_ERRORS,
        "Kafka messages librdkafka gave up on or refused, by error kind."
    );
    describe_gauge!(
        KAFKA_QUEUE_DEPTH,
        "Kafka messages produced whose delivery report has not arrived (in flight)."
    );
    describe_counter!(
        KAFKA_BYTES,
        "Key + value bytes of the Kafka messages acknowledged (before compression)."
    );
    describe_counter!(
        KAFKA_UNDELIVERED,
        "Flow records whose Kafka delivery failed (they stay in the spool and are produced again)."
    );
    describe_counter!(
        KAFKA_QUEUE_FULL_WAITS,
        "Times a produce waited because librdkafka's queue was full (backpressure)."
    );
    describe_counter!(
        KAFKA_BROKER_ERRORS,
        "Kafka client errors (brokers down, transport failures), by kind."
    );
    describe_gauge!(
        SPOOL_RECORDS,
        "Flow records in the Kafka spool not yet acknowledged by the broker."
    );
    describe_gauge!(
        SPOOL_BYTES,
        "Bytes of the Kafka spool's segment files (limited by --spool-max-bytes)."
    );
    describe_counter!(
        SPOOL_DROPPED,
        "Flow records dropped because the Kafka spool was full (drop-newest policy)."
    );
    describe_counter!(SPOOL_ERRORS, "Failed spool operations, by operation.");
    Ok(bound)
}

/// CPU seconds (user + system) used by this process so far.
pub fn process_cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Resident set size of this process in bytes.
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    pages * page
}
