//! flowlog's per-host agent: loads the kernel programs (`flowlog-ebpf`) with the running
//! kernel's layout, turns their events into exact per-flow records, and writes them to a sink.
//!
//! Modules, in data-flow order: [`btf`] and [`layout`] (kernel layout discovery), [`probe`]
//! (load/attach, ring buffer, sweep), [`flows`] (snapshots → records), [`record`] (the record),
//! [`sink`] (outputs), [`agent`] (the event loop), [`metrics`].
pub mod agent;
pub mod btf;
pub mod flows;
pub mod layout;
pub mod metrics;
pub mod probe;
pub mod record;
pub mod sink;
