//! The enriched flow: a [`FlowRecord`] with the workload identity of both of its ends, as the
//! enricher writes it to `flows.enriched` (Avro, `schemas/enriched_flow.v1.avsc`) and to Parquet.
//!
//! Attribution is never a guess passed as fact: each end carries an [`Attribution`] status. Only
//! an `exact` end has an [`Identity`]; an `ambiguous` end names the owners that overlapped at the
//! flow's time in `candidates`; an `unknown` end has neither.
use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::record::FlowRecord;

/// How an end of a flow was attributed.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Attribution {
    /// Exactly one owner held the address at the flow's time (at the most specific prefix).
    Exact,
    /// Two or more owners' intervals overlap at the flow's time (at the same prefix length).
    Ambiguous,
    /// No inventory knew an owner at the flow's time (or it had not caught up within `--hold`).
    Unknown,
}

impl Attribution {
    /// Every status, in declaration order (`status as usize` indexes it).
    pub const ALL: [Attribution; 3] = [
        Attribution::Exact,
        Attribution::Ambiguous,
        Attribution::Unknown,
    ];

    /// Label used in metrics and in the schemas' enum symbols.
    pub fn as_str(self) -> &'static str {
        match self {
            Attribution::Exact => "exact",
            Attribution::Ambiguous => "ambiguous",
            Attribution::Unknown => "unknown",
        }
    }
}

/// What kind of thing owned an address. Symbols are only ever appended (schema evolution).
#[derive(
    Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// A host as a whole (the embedded mode's own addresses; a host-network process).
    Host,
    /// A container or systemd unit on a host, found from the process's cgroup.
    Container,
    /// A Kubernetes pod.
    Pod,
    /// A Kubernetes node.
    Node,
    /// A Kubernetes service (cluster IP).
    Service,
    /// A cloud instance (EC2).
    Instance,
    /// A cloud network interface (EC2 ENI) not attached to an instance we know.
    NetworkInterface,
    /// A cloud load balancer.
    LoadBalancer,
    /// An entry of a static CIDR list.
    #[default]
    Static,
}

impl IdentityKind {
    /// Every kind, in declaration order (`kind as usize` indexes it).
    pub const ALL: [IdentityKind; 9] = [
        IdentityKind::Host,
        IdentityKind::Container,
        IdentityKind::Pod,
        IdentityKind::Node,
        IdentityKind::Service,
        IdentityKind::Instance,
        IdentityKind::NetworkInterface,
        IdentityKind::LoadBalancer,
        IdentityKind::Static,
    ];

    /// The schema's enum symbol.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Host => "host",
            IdentityKind::Container => "container",
            IdentityKind::Pod => "pod",
            IdentityKind::Node => "node",
            IdentityKind::Service => "service",
            IdentityKind::Instance => "instance",
            IdentityKind::NetworkInterface => "network_interface",
            IdentityKind::LoadBalancer => "load_balancer",
            IdentityKind::Static => "static",
        }
    }
}

/// The controller a pod belongs to, resolved to the top (a ReplicaSet's Deployment).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob`, ...
    pub kind: String,
    pub name: String,
}

/// Who owned an address: whatever the inventory source knows. Shared (`Arc`) between the index
/// and every flow attributed to it, so enriching a flow copies a pointer, not the strings.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Identity {
    pub kind: IdentityKind,
    /// The owner's name (pod, node, service, instance id, static entry name, host name).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: Option<String>,
    pub workload: Option<Workload>,
    /// Selected labels or tags (which ones is configuration).
    pub labels: BTreeMap<String, String>,
    /// Kubernetes node the owner runs on.
    pub node: Option<String>,
    pub zone: Option<String>,
    pub region: Option<String>,
    /// Cloud account.
    pub account: Option<String>,
    pub vpc: Option<String>,
    pub subnet: Option<String>,
    pub instance_id: Option<String>,
    /// Container id (from the cgroup path or the pod status).
    pub container_id: Option<String>,
    /// Kubernetes pod UID.
    pub pod_uid: Option<String>,
    /// The inventory source that said so: `static`, `host`, `kubernetes`, `ec2`.
    pub source: String,
}

impl Identity {
    /// `namespace/name`, or `name` without a namespace: how an owner is named in `candidates`
    /// and in summaries.
    pub fn display_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// One end of a flow, attributed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub status: Attribution,
    /// The owner, set exactly when `status` is `exact`.
    pub identity: Option<Arc<Identity>>,
    /// [`Identity::display_name`] of each overlapping owner when `status` is `ambiguous`
    /// (sorted); empty otherwise.
    pub candidates: Vec<String>,
}

impl Endpoint {
    /// An end nobody owned.
    pub fn unknown() -> Self {
        Self {
            status: Attribution::Unknown,
            identity: None,
            candidates: Vec::new(),
        }
    }

    /// An end with exactly one owner.
    pub fn exact(identity: Arc<Identity>) -> Self {
        Self {
            status: Attribution::Exact,
            identity: Some(identity),
            candidates: Vec::new(),
        }
    }

    /// An end with several overlapping owners.
    pub fn ambiguous(owners: &[Arc<Identity>]) -> Self {
        let mut candidates: Vec<String> = owners.iter().map(|o| o.display_name()).collect();
        candidates.sort();
        Self {
            status: Attribution::Ambiguous,
            identity: None,
            candidates,
        }
    }
}

/// A flow record with both ends attributed as of the flow's start time.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct EnrichedFlow {
    /// The record as the agent wrote it (every field of `flows.raw`, unchanged).
    pub flow: FlowRecord,
    /// The end on the reporting host (`local_addr`, plus the process's cgroup).
    pub local: Endpoint,
    /// The other end (`remote_addr`).
    pub remote: Endpoint,
    /// When the enricher attributed it, ns since the Unix epoch (`enriched_ns - flow.end_ns` is
    /// the pipeline's latency).
    pub enriched_ns: u64,
}
