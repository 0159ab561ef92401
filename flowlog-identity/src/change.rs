//! What inventory sources say: an owner took or released a prefix at a time, or the source's view
//! is complete up to a time. One small enum, because every source (static file, this host,
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
    /// `source` has reported every change that happened up to `at_ns`: its view is complete as of then.
    Watermark { source: String, at_ns: u64 },
}

impl OwnershipChange {
    /// The inventory source that emitted the change.
    pub fn source(&self) -> &str {
        match self {
            OwnershipChange::Open { source, .. }
            | OwnershipChange::Close { source, .. }
            | OwnershipChange::Watermark { source, .. } => source,
        }
    }

    /// When the change happened (for a watermark: up to when the source is complete).
    pub fn at_ns(&self) -> u64 {
        match self {
            OwnershipChange::Open { at_ns, .. }
            | OwnershipChange::Close { at_ns, .. }
            | OwnershipChange::Watermark { at_ns, .. } => *at_ns,
        }
    }

    /// A metrics label for the kind of change.
    pub fn kind(&self) -> &'static str {
        match self {
            OwnershipChange::Open { .. } => "open",
            OwnershipChange::Close { .. } => "close",
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
