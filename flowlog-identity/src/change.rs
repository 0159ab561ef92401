//! What inventory sources say: an owner took or released a prefix at a time, may have held it
//! during a span (a change whose time is known only that well), or the source's view is
//! complete up to a time. One small enum, because every source (static file, this host,
//! Kubernetes, EC2) speaks the same language to the index, and because the same changes are later
//! published to the compacted Kafka topic `flows.ownership` (as JSON, hence serde).
use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use flowlog_record::Identity;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// One ownership event of an inventory source. Times are ns since the Unix epoch.
///
/// JSON form (internally tagged, so that a consumer in any language can switch on `type`):
/// `{"type":"open","source":"static","owner":"static/lan","prefix":"10.0.0.0/16","identity":{..},"at_ns":0}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OwnershipChange {
    /// `owner` (a key stable for this owner within its source, e.g. `pod/<uid>`, `static/<name>`)
    /// holds `prefix` from `at_ns` (ns since the Unix epoch).
    Open {
        source: String,
        owner: String,
        prefix: IpNet,
        identity: Arc<Identity>,
        at_ns: u64,
    },
    /// The owner released `prefix` at `at_ns`.
    Close {
        source: String,
        owner: String,
        prefix: IpNet,
        at_ns: u64,
    },
    /// `owner` may or may not have held `prefix` during `[from_ns, to_ns)`: one of its changes
    /// (taking or releasing the prefix, or a new identity) happened in that span, at a time the
    /// source cannot tell more precisely (e.g. a Kubernetes watch event that arrived late). A
    /// flow in the span is `ambiguous` — `owner` is one of its candidates — never attributed to
    /// `owner` or to another owner alone. Sent besides the Open (dated at the span's end: held
    /// for sure from then) or the Close (at its start: held for sure until then).
    Uncertain {
        source: String,
        owner: String,
        prefix: IpNet,
        identity: Arc<Identity>,
        from_ns: u64,
        to_ns: u64,
    },
    /// `source` has reported every change that happened up to `at_ns`: its view is complete as of then.
    Watermark { source: String, at_ns: u64 },
}

impl OwnershipChange {
    /// The inventory source that emitted the change.
    pub fn source(&self) -> &str {
        match self {
            OwnershipChange::Open { source, .. }
            | OwnershipChange::Close { source, .. }
            | OwnershipChange::Uncertain { source, .. }
            | OwnershipChange::Watermark { source, .. } => source,
        }
    }

    /// The source's name, to rename it (a relay such as the ownership topic's follower
    /// reports each upstream source under a name of its own).
    pub fn source_mut(&mut self) -> &mut String {
        match self {
            OwnershipChange::Open { source, .. }
            | OwnershipChange::Close { source, .. }
            | OwnershipChange::Uncertain { source, .. }
            | OwnershipChange::Watermark { source, .. } => source,
        }
    }

    /// When the change happened (for a watermark: up to when the source is complete; for an
    /// uncertain span: its end, by when the change had happened).
    pub fn at_ns(&self) -> u64 {
        match self {
            OwnershipChange::Open { at_ns, .. }
            | OwnershipChange::Close { at_ns, .. }
            | OwnershipChange::Watermark { at_ns, .. } => *at_ns,
            OwnershipChange::Uncertain { to_ns, .. } => *to_ns,
        }
    }

    /// A metrics label for the kind of change.
    pub fn kind(&self) -> &'static str {
        match self {
            OwnershipChange::Open { .. } => "open",
            OwnershipChange::Close { .. } => "close",
            OwnershipChange::Uncertain { .. } => "uncertain",
            OwnershipChange::Watermark { .. } => "watermark",
        }
    }
}

/// The wall clock in ns since the Unix epoch, the time base of flows and of every change (a clock
/// set before 1970 reads as 0 rather than panicking).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
