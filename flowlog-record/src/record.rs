//! The flow record: what the agent emits for each flow end and each interim report. Field names
//! are part of the product's interface (JSON lines, and the Avro schema `schemas/flow_record.v1.avsc`,
//! which has one field per struct field with the same name); keep them.
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

/// Address family of the flow. IPv4-mapped IPv6 sockets (`::ffff:a.b.c.d`) report `ipv4`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// Which side opened the connection.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// This host connected.
    Outbound,
    /// This host accepted.
    Inbound,
}

/// How the flow ended (or that it has not).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Ended without a reset (FIN exchange, or timeout after the handshake).
    Closed,
    /// A reset was sent or received during the flow.
    Reset,
    /// The handshake never completed: refused or timed out.
    Failed,
    /// Still open: an interim record, or a flow open when the agent stopped.
    Open,
}

impl Outcome {
    /// Every outcome, in declaration order (`outcome as usize` indexes it).
    pub const ALL: [Outcome; 4] = [
        Outcome::Closed,
        Outcome::Reset,
        Outcome::Failed,
        Outcome::Open,
    ];

    /// Label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::Reset => "reset",
            Outcome::Failed => "failed",
            Outcome::Open => "open",
        }
    }
}

/// One flow record. Counters are deltas since the previous record of the same flow, so summing
/// them over all records of a `flow_id` gives the flow's totals exactly.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FlowRecord {
    /// The flow's id, the same on every record of one flow on this host (across agent restarts
    /// too, while the kernel state stays pinned) and distinct from every other flow of those
    /// runs: a random base drawn when the pins are created plus a per-CPU counter
    /// (`flowlog_common::Config::flow_id_base`). Opaque to consumers.
    pub flow_id: u64,
    /// The reporting host.
    pub host: String,
    /// 0, 1, 2… over the records of one flow. `(host, flow_id, seq)` is unique.
    pub seq: u32,
    /// When the flow started (SYN sent; for inbound flows, when the handshake completed), ns
    /// since the Unix epoch.
    pub start_ns: u64,
    /// When the flow ended, or for an `open` record when it was reported, ns since the epoch.
    pub end_ns: u64,
    pub family: Family,
    pub local_addr: IpAddr,
    pub local_port: u16,
    pub remote_addr: IpAddr,
    pub remote_port: u16,
    pub direction: Direction,
    pub outcome: Outcome,
    /// Payload bytes this host sent that the peer acknowledged (SYN and FIN excluded).
    pub bytes_sent: u64,
    /// Payload bytes this host received in order (SYN and FIN excluded).
    pub bytes_received: u64,
    /// Segments sent, all kinds (the kernel's `segs_out`).
    pub segs_sent: u64,
    /// Segments received, all kinds (the kernel's `segs_in`).
    pub segs_received: u64,
    /// Retransmitted segments (the kernel's `total_retrans`, as in `tcpi_total_retrans`).
    pub retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    /// Smoothed RTT at report time, µs.
    pub srtt_us: u32,
    /// Minimum RTT seen (windowed), µs.
    pub min_rtt_us: u32,
    /// Process that owned the socket when known: the connecting process for outbound flows; for
    /// inbound flows the accepting process (or, if its `accept()` was not seen, the process that
    /// closed or shut the socket down).
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// cgroup v2 id of that process (identifies its container).
    pub cgroup_id: Option<u64>,
    /// The connection was already open when the agent first started and was adopted then
    /// (schema v2): `start_ns` is the adoption time, not the connection's start, and the flow's
    /// first record counts everything the socket carried since it was opened. `direction` is
    /// inferred (inbound when a listener holds the local port in the socket's network namespace).
    #[serde(default)]
    pub adopted: bool,
}

/// An all-zero record: IPv4, outbound, closed, unspecified addresses, no process. It is the base
/// that tests and benchmarks override with struct update syntax (`FlowRecord { flow_id: 7,
/// ..FlowRecord::default() }`), so that a new field is added to them in one place. The agent and
/// the decoders build records field by field instead, so that a new field must be decided there.
impl Default for FlowRecord {
    fn default() -> Self {
        FlowRecord {
            flow_id: 0,
            host: String::new(),
            seq: 0,
            start_ns: 0,
            end_ns: 0,
            family: Family::Ipv4,
            local_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            local_port: 0,
            remote_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            remote_port: 0,
            direction: Direction::Outbound,
            outcome: Outcome::Closed,
            bytes_sent: 0,
            bytes_received: 0,
            segs_sent: 0,
            segs_received: 0,
            retransmits: 0,
            resets_sent: 0,
            resets_received: 0,
            srtt_us: 0,
            min_rtt_us: 0,
            pid: None,
            comm: None,
            cgroup_id: None,
            adopted: false,
        }
    }
}

impl FlowRecord {
    /// Whether the peer is proven to have answered, so that something held `remote_addr` at
    /// the flow's start: the handshake completed (`closed`, `reset`), or an `open` record has
    /// an RTT sample (the peer acknowledged a segment). A `failed` connect proves nothing: a
    /// SYN to an address nobody holds fails as one to a pod that drops it does.
    pub fn peer_answered(&self) -> bool {
        match self.outcome {
            Outcome::Closed | Outcome::Reset => true,
            Outcome::Open => self.srtt_us > 0,
            Outcome::Failed => false,
        }
    }
}
