//! flowlog's per-host agent: loads the kernel programs (`flowlog-ebpf`) with the running
//! kernel's layout, turns their events into exact per-flow records, and writes them to a sink.
//!
//! Modules, in data-flow order: [`btf`] and [`layout`] (kernel layout discovery), [`probe`]
//! (load/attach, ring buffer, sweep; [`adoption`]: connections older than the agent; [`privileges`]: what the kernel refused it and why),
//! [`flows`] (snapshots → records), [`record`] (the record),
//! [`sink`] (outputs: JSON lines; [`kafka`] through the disk [`spool`]), [`agent`] (the event
//! loop) and [`metrics`]. Error chains and rate-limited warnings come from `flowlog-diag`.
//!
//! Cargo feature `kafka` (default): the Kafka output and its spool. Without it the crate has no
//! librdkafka in its tree: the one-host `flowlog` reuses the capture and writes its own outputs.
pub mod adoption;
pub mod agent;
pub mod btf;
pub mod flows;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod layout;
pub mod metrics;
pub mod pins;
pub mod privileges;
pub mod probe;
/// The flow record lives in `flowlog-record` (shared with the enricher); re-exported here so
/// `flowlog_sidecar::record::FlowRecord` keeps working.
pub use flowlog_record::record;
pub mod sink;
#[cfg(feature = "kafka")]
pub mod spool;
