//! A Kubernetes API server for tests and benchmarks ([`ApiServer`]: lists, watches, bookmarks,
//! `410 Gone`; Leases; every call recorded as the RBAC authorizer sees it), and object JSON as kube-apiserver writes it for the kinds flowlog watches.
mod apiserver;
mod lease;

use serde_json::{Value, json};

pub use apiserver::{ApiCall, ApiServer, Kind, WatchLag};

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
