//! Shared test scaffolding: the list/watch server ([`apiserver`]), object JSON as the API server
//! writes it, and a collector that runs a [`KubernetesSource`] against the server and reads what
//! it sends.
#![allow(dead_code)] // each test file uses a part

pub mod apiserver;

use std::{sync::Arc, time::Duration};

use flowlog_identity::{IdentityIndex, InventorySource, OwnershipChange, spawn_source};
use flowlog_kubernetes::{KubernetesSettings, KubernetesSource};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use apiserver::{ApiServer, Kind};

/// Settings with short times, so that failures and recoveries show within a test.
pub fn fast_settings() -> KubernetesSettings {
    KubernetesSettings {
        watermark_interval: Duration::from_millis(100),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        recovery_quiet: Duration::from_secs(1),
        ..KubernetesSettings::default()
    }
}

/// A pod as the API server has it. `ip: None` is a pod without an address yet.
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub ip: Option<&'a str>,
    pub phase: &'a str,
    pub node: &'a str,
    pub labels: Value,
    pub owner: Option<(&'a str, &'a str)>,
    pub host_network: bool,
    pub deleting: bool,
}

impl Default for PodSpec<'_> {
    fn default() -> Self {
        Self {
            namespace: "default",
            name: "pod",
            uid: "uid",
            ip: None,
            phase: "Pending",
            node: "node-1",
            labels: json!({}),
            owner: None,
            host_network: false,
            deleting: false,
        }
    }
}

pub fn pod(spec: &PodSpec<'_>) -> Value {
    let mut pod = json!({
        "metadata": {
            "name": spec.name, "namespace": spec.namespace, "uid": spec.uid,
            "creationTimestamp": "2026-11-26T01:00:00Z", "labels": spec.labels,
        },
        "spec": {
            "nodeName": spec.node, "hostNetwork": spec.host_network,
            "containers": [{"name": "main", "image": "registry.example/app:1"}],
        },
        "status": {"phase": spec.phase},
    });
    if let Some((kind, name)) = spec.owner {
        pod["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": kind, "name": name,
            "uid": format!("owner-{name}"), "controller": true, "blockOwnerDeletion": true,
        }]);
    }
    if let Some(ip) = spec.ip {
        pod["status"]["podIP"] = json!(ip);
        pod["status"]["podIPs"] = json!([{"ip": ip}]);
        pod["status"]["startTime"] = json!("2026-11-26T01:00:01Z");
    }
    if spec.deleting {
        pod["metadata"]["deletionTimestamp"] = json!("2026-11-26T01:05:00Z");
        pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    }
    pod
}

pub fn service(namespace: &str, name: &str, uid: &str, cluster_ips: &[&str]) -> Value {
    json!({
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": {"app": name}},
        "spec": {
            "clusterIP": cluster_ips.first().copied().unwrap_or("None"),
            "clusterIPs": cluster_ips,
            "ports": [{"port": 80, "protocol": "TCP"}],
        },
    })
}

pub fn node(name: &str, uid: &str, internal: &str, external: Option<&str>, zone: &str) -> Value {
    let mut addresses = vec![
        json!({"type": "Hostname", "address": name}),
        json!({"type": "InternalIP", "address": internal}),
    ];
    if let Some(external) = external {
        addresses.push(json!({"type": "ExternalIP", "address": external}));
    }
    json!({
        "metadata": {"name": name, "uid": uid, "labels": {
            "kubernetes.io/hostname": name,
            "topology.kubernetes.io/zone": zone,
            "topology.kubernetes.io/region": "eu-west-1",
        }},
        "status": {"addresses": addresses},
    })
}

/// Starts a source against `server` into a channel that the returned [`Collector`] reads.
pub fn start(server: &ApiServer, settings: KubernetesSettings) -> Collector {
    let (tx, rx) = mpsc::channel(65_536);
    let shutdown = CancellationToken::new();
    let source: Box<dyn InventorySource> =
        Box::new(KubernetesSource::new(server.client(), settings));
    spawn_source(source, tx, shutdown.clone());
    Collector {
        rx,
        shutdown,
        all: Vec::new(),
    }
}

/// What the source sent, kept in order.
pub struct Collector {
    rx: mpsc::Receiver<OwnershipChange>,
    shutdown: CancellationToken,
    /// Every change received so far, watermarks included.
    pub all: Vec<OwnershipChange>,
}

/// Longest wait for something the source must send (generous: failures show as a timeout
/// naming what was awaited, never as a flaky comparison).
const PATIENCE: Duration = Duration::from_secs(20);

impl Collector {
    /// The next change, or a panic naming `what` was awaited once [`PATIENCE`] has passed
    /// since `since` (a deadline for the whole wait: watermarks keep coming meanwhile).
    async fn next(&mut self, since: tokio::time::Instant, what: &str) -> OwnershipChange {
        let change = tokio::time::timeout_at(since + PATIENCE, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("waited {PATIENCE:?} for {what}; received {:?}", self.all))
            .expect("source stopped");
        self.all.push(change.clone());
        change
    }

    /// Receives until `n` more Opens or Closes have come; returns them (watermarks skipped).
    pub async fn changes(&mut self, n: usize) -> Vec<OwnershipChange> {
        let since = tokio::time::Instant::now();
        let mut got = Vec::new();
        while got.len() < n {
            let change = self.next(since, &format!("{n} changes")).await;
            if !matches!(change, OwnershipChange::Watermark { .. }) {
                got.push(change);
            }
        }
        got
    }

    /// Receives until the first watermark, which comes once every kind's first list is
    /// complete: mutations after this are seen as watch events, not folded into a list.
    /// Returns the changes the lists made.
    pub async fn ready(&mut self) -> Vec<OwnershipChange> {
        let since = tokio::time::Instant::now();
        let mut got = Vec::new();
        loop {
            match self.next(since, "the first watermark").await {
                OwnershipChange::Watermark { .. } => return got,
                change => got.push(change),
            }
        }
    }

    /// Receives until a watermark at or after `at_ns` comes; returns its time.
    pub async fn watermark_after(&mut self, at_ns: u64) -> u64 {
        let since = tokio::time::Instant::now();
        loop {
            match self
                .next(since, &format!("a watermark after {at_ns}"))
                .await
            {
                OwnershipChange::Watermark { at_ns: w, .. } if w >= at_ns => return w,
                OwnershipChange::Watermark { .. } => {}
                other => panic!("expected only watermarks, got {other:?}"),
            }
        }
    }

    /// Takes whatever has arrived, without waiting.
    pub fn drain(&mut self) -> Vec<OwnershipChange> {
        let mut got = Vec::new();
        while let Ok(change) = self.rx.try_recv() {
            self.all.push(change.clone());
            got.push(change);
        }
        got
    }

    /// An index with everything received so far applied.
    pub fn index(&self) -> IdentityIndex {
        let mut index = IdentityIndex::new();
        index.register_source("kubernetes");
        for change in &self.all {
            index.apply(change.clone());
        }
        index
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `open <owner> <name>` / `close <owner>`: a change in a form that compares exactly.
pub fn brief(change: &OwnershipChange) -> String {
    match change {
        OwnershipChange::Open {
            owner,
            prefix,
            identity,
            ..
        } => format!("open {owner} {prefix} {}", identity.display_name()),
        OwnershipChange::Close { owner, prefix, .. } => format!("close {owner} {prefix}"),
        OwnershipChange::Watermark { .. } => "watermark".to_owned(),
    }
}

pub fn briefs(changes: &[OwnershipChange]) -> Vec<String> {
    changes.iter().map(brief).collect()
}

/// The identity of an Open.
pub fn identity_of(change: &OwnershipChange) -> Arc<flowlog_record::Identity> {
    match change {
        OwnershipChange::Open { identity, .. } => Arc::clone(identity),
        other => panic!("not an Open: {other:?}"),
    }
}
