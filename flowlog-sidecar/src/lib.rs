//! flowlog's per-host agent: loads the kernel programs (`flowlog-ebpf`) with the running
//! kernel's layout, turns their events into exact per-flow records, and writes them to a sink.
//!
//! Modules, in data-flow order: [`btf`] and [`layout`] (kernel layout discovery), [`probe`]
//! (load/attach, ring buffer, sweep; [`privileges`]: what the kernel refused it and why),
//! [`flows`] (snapshots → records), [`record`] (the record),
//! [`sink`] (outputs: JSON lines; [`kafka`] through the disk [`spool`]), [`agent`] (the event
//! loop), [`metrics`] and [`throttle`] (rate-limited warnings).
pub mod agent;
pub mod btf;
pub mod flows;
pub mod kafka;
pub mod layout;
pub mod metrics;
pub mod privileges;
pub mod probe;
/// The flow record lives in `flowlog-record` (shared with the enricher); re-exported here so
/// `flowlog_sidecar::record::FlowRecord` keeps working.
pub use flowlog_record::record;
pub mod sink;
pub mod spool;
/// Rate-limited warnings, shared with the enricher through `flowlog-kafka`.
pub use flowlog_kafka::throttle;

/// Formats an error with its chain of causes (`outer: cause: root cause`), for log fields:
/// library errors keep their causes as `source()` rather than repeating them in the message.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
