//! What one Kubernetes object says it owns right now: a list of [`Claim`]s (owner key, address,
//! identity), computed from the object alone. Pure functions, so that the rules (which pods hold
//! an address, how a workload is named, which service IPs count) are tested without a server;
//! turning claims into intervals over time is [`crate::tracker`]'s job.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use flowlog_record::{Identity, IdentityKind, Workload};
use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::settings::KubernetesSettings;

/// The source name in changes, watermarks and identities.
pub const KUBERNETES_SOURCE: &str = "kubernetes";

/// The label the Deployment controller puts on every pod of a ReplicaSet it made, and appends
/// (after a dash) to that ReplicaSet's name.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// Zone and region of a node (kubelet sets them from the cloud provider); the deprecated
/// `failure-domain.beta` labels are read when the current ones are missing.
const ZONE_LABELS: [&str; 2] = [
    "topology.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/zone",
];
const REGION_LABELS: [&str; 2] = [
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/region",
];

/// An object's claim on one address: `owner` (unique within the source, stable for the object's
/// life) holds `prefix` (a single address) as `identity`.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub owner: String,
    pub prefix: IpNet,
    pub identity: Arc<Identity>,
}

/// The key that tells objects of one kind apart across events: the UID (a pod deleted and
/// re-created under the same name is another object), or `namespace/name` if the server sent
/// none.
pub fn object_key(meta: &ObjectMeta) -> String {
    match &meta.uid {
        Some(uid) if !uid.is_empty() => uid.clone(),
        _ => format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or(""),
            meta.name.as_deref().unwrap_or("")
        ),
    }
}

/// The configured labels that the object carries.
fn selected_labels(meta: &ObjectMeta, settings: &KubernetesSettings) -> BTreeMap<String, String> {
    let Some(labels) = &meta.labels else {
        return BTreeMap::new();
    };
    settings
        .labels
        .iter()
        .filter_map(|key| labels.get(key).map(|v| (key.clone(), v.clone())))
        .collect()
}

fn first_label(meta: &ObjectMeta, keys: &[&str]) -> Option<String> {
    let labels = meta.labels.as_ref()?;
    keys.iter().find_map(|k| labels.get(*k).cloned())
}

/// Where a node is: its zone and region (from its topology labels), which its pods share.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Place {
    pub zone: Option<String>,
    pub region: Option<String>,
}

/// A node's name and place, for the pods that run on it.
pub fn node_place(node: &Node) -> Option<(String, Place)> {
    let meta = &node.metadata;
    Some((
        meta.name.clone()?,
        Place {
            zone: first_label(meta, &ZONE_LABELS),
            region: first_label(meta, &REGION_LABELS),
        },
    ))
}

/// A pod's claims with the zone and region of its node (all of a pod's claims share one
/// identity, so one new identity serves them all).
pub fn place_pod(claims: Vec<Claim>, place: impl Fn(&str) -> Option<Place>) -> Vec<Claim> {
    let Some(first) = claims.first() else {
        return claims;
    };
    let Some(place) = first.identity.node.as_deref().and_then(place) else {
        return claims;
    };
    if first.identity.zone == place.zone && first.identity.region == place.region {
        return claims;
    }
    let placed = Arc::new(Identity {
        zone: place.zone,
        region: place.region,
        ..(*first.identity).clone()
    });
    claims
        .into_iter()
        .map(|c| Claim {
            identity: Arc::clone(&placed),
            ..c
        })
        .collect()
}

/// A single-address prefix, or None for text that is not an address (logged: the server sent
/// something we cannot attribute).
fn address(text: &str, what: &str, object: &str) -> Option<IpNet> {
    match text.parse::<IpAddr>() {
        Ok(ip) => Some(IpNet::from(ip.to_canonical())),
        Err(_) => {
            tracing::debug!(address = text, what, object, "not an IP address, skipped");
            None
        }
    }
}

/// The pod's controller, resolved one level up for ReplicaSets made by a Deployment.
///
/// A ReplicaSet is resolved to its Deployment by the Deployment controller's naming convention
/// rather than by watching ReplicaSets: the controller names every ReplicaSet it makes
/// `<deployment>-<pod-template-hash>` and stamps that hash on the pods as the
/// `pod-template-hash` label. So a pod owned by ReplicaSet `web-5d8f7c` with label
/// `pod-template-hash=5d8f7c` belongs to Deployment `web`. This needs no ReplicaSet watch (no
/// extra memory for the ten old ReplicaSets each Deployment keeps, no extra stream whose initial
/// list could arrive after the pods', which would make a pod's workload change under it). A
/// ReplicaSet that does not match the convention (made by hand, or by another controller such
/// as Argo Rollouts, whose label is `rollouts-pod-template-hash`) stays a `ReplicaSet`; the only
/// miss would be a hand-made ReplicaSet that copies the convention exactly, which is then named
/// after the Deployment it imitates.
pub fn pod_workload(meta: &ObjectMeta) -> Option<Workload> {
    let owners = meta.owner_references.as_ref()?;
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())?;
    if owner.kind == "ReplicaSet"
        && let Some(hash) = meta.labels.as_ref().and_then(|l| l.get(POD_TEMPLATE_HASH))
        && !hash.is_empty()
        && let Some(deployment) = owner
            .name
            .strip_suffix(hash.as_str())
            .and_then(|rest| rest.strip_suffix('-'))
        && !deployment.is_empty()
    {
        return Some(Workload {
            kind: "Deployment".to_owned(),
            name: deployment.to_owned(),
        });
    }
    Some(Workload {
        kind: owner.kind.clone(),
        name: owner.name.clone(),
    })
}

/// The addresses a pod holds now, each as `pod/<uid>/<ip>`.
///
/// None when the pod cannot hold an address: it has none yet (Pending, not scheduled, sandbox
/// not up), it reached a terminal phase (`Succeeded`, `Failed`: its sandbox and address are
/// released, and the address may be handed to another pod while this object lives on), or it
/// runs in the host's network namespace (its address is its node's, which the node's own
/// interval covers). A pod being deleted (`deletionTimestamp` set) still holds its address until
/// it is gone: the timestamp is a deadline, not the release.
pub fn pod_claims(pod: &Pod, settings: &KubernetesSettings) -> Vec<Claim> {
    let meta = &pod.metadata;
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Vec::new();
    }
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Vec::new();
    }
    let mut ips: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .filter(|ip| !ip.is_empty())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())
    {
        ips.push(ip);
    }
    if ips.is_empty() {
        return Vec::new();
    }
    let key = object_key(meta);
    let name = meta.name.clone().unwrap_or_default();
    let identity = Arc::new(Identity {
        kind: IdentityKind::Pod,
        name: name.clone(),
        namespace: meta.namespace.clone(),
        workload: pod_workload(meta),
        labels: selected_labels(meta, settings),
        node: spec.and_then(|s| s.node_name.clone()),
        pod_uid: meta.uid.clone(),
        source: KUBERNETES_SOURCE.to_owned(),
        ..Identity::default()
    });
    let mut claims: Vec<Claim> = ips
        .into_iter()
        .filter_map(|ip| address(ip, "pod IP", &name))
        .map(|prefix| Claim {
            owner: format!("pod/{key}/{}", prefix.addr()),
            prefix,
            identity: Arc::clone(&identity),
        })
        .collect();
    claims.dedup_by(|a, b| a.prefix == b.prefix);
    claims
}

/// A service's cluster IPs (`spec.clusterIPs`, or `clusterIP` from older servers), each as
/// `service/<uid>/<ip>`. Headless services (`None`) and ExternalName services have none.
pub fn service_claims(service: &Service, settings: &KubernetesSettings) -> Vec<Claim> {
    let meta = &service.metadata;
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let listed: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let key = object_key(meta);
    let name = meta.name.clone().unwrap_or_default();
    let identity = Arc::new(Identity {
        kind: IdentityKind::Service,
        name: name.clone(),
        namespace: meta.namespace.clone(),
        labels: selected_labels(meta, settings),
        source: KUBERNETES_SOURCE.to_owned(),
        ..Identity::default()
    });
    listed
        .into_iter()
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .filter_map(|ip| address(ip, "cluster IP", &name))
        .map(|prefix| Claim {
            owner: format!("service/{key}/{}", prefix.addr()),
            prefix,
            identity: Arc::clone(&identity),
        })
        .collect()
}

/// A node's `InternalIP` and `ExternalIP` addresses, each as `node/<uid>/<ip>`, with the node's
/// zone and region. Host-network pods on the node resolve to it through these.
pub fn node_claims(node: &Node, settings: &KubernetesSettings) -> Vec<Claim> {
    let meta = &node.metadata;
    let key = object_key(meta);
    let name = meta.name.clone().unwrap_or_default();
    let identity = Arc::new(Identity {
        kind: IdentityKind::Node,
        name: name.clone(),
        labels: selected_labels(meta, settings),
        node: Some(name.clone()),
        zone: first_label(meta, &ZONE_LABELS),
        region: first_label(meta, &REGION_LABELS),
        source: KUBERNETES_SOURCE.to_owned(),
        ..Identity::default()
    });
    let mut claims: Vec<Claim> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| address(&a.address, "node address", &name))
        .map(|prefix| Claim {
            owner: format!("node/{key}/{}", prefix.addr()),
            prefix,
            identity: Arc::clone(&identity),
        })
        .collect();
    claims.sort_by_key(|c| c.prefix);
    claims.dedup_by(|a, b| a.prefix == b.prefix);
    claims
}

/// Endpoint addresses of an EndpointSlice that no object stands behind (no `targetRef`): a
/// Service without a selector whose endpoints someone maintains by hand, typically an address
/// outside the cluster (a database VM, a partner). They are attributed to that Service
/// (`kubernetes.io/service-name`), as `endpointslice/<uid>/<ip>`.
///
/// Endpoints with a `targetRef` (a Pod, or a Node for kubelet-scraping services) contribute
/// nothing: the pod or node is the owner of its address, from its own events, and an endpoint's
/// readiness says nothing about who holds the address. The `default/kubernetes` slice is skipped
/// too: its addresses are the API servers', which in self-hosted clusters are the control-plane
/// nodes' own addresses, and claiming them would make every flow to those nodes ambiguous. Any
/// other hand-made endpoint whose address is also a pod's or a node's is reported as ambiguous
/// by the index, never as one of them. Slices of type FQDN carry names, not addresses.
pub fn endpoint_slice_claims(slice: &EndpointSlice, settings: &KubernetesSettings) -> Vec<Claim> {
    if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
        return Vec::new();
    }
    let meta = &slice.metadata;
    let Some(service) = meta
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .filter(|s| !s.is_empty())
    else {
        return Vec::new();
    };
    if service == "kubernetes" && meta.namespace.as_deref() == Some("default") {
        return Vec::new();
    }
    let key = object_key(meta);
    let identity = Arc::new(Identity {
        kind: IdentityKind::Service,
        name: service.clone(),
        namespace: meta.namespace.clone(),
        labels: selected_labels(meta, settings),
        source: KUBERNETES_SOURCE.to_owned(),
        ..Identity::default()
    });
    let mut claims: Vec<Claim> = slice
        .endpoints
        .iter()
        .filter(|e| e.target_ref.is_none())
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| address(a, "endpoint address", service))
        .map(|prefix| Claim {
            owner: format!("endpointslice/{key}/{}", prefix.addr()),
            prefix,
            identity: Arc::clone(&identity),
        })
        .collect();
    claims.sort_by_key(|c| c.prefix);
    claims.dedup_by(|a, b| a.prefix == b.prefix);
    claims
}

#[cfg(test)]
mod tests {
    use k8s_openapi::serde_json::{self, json};

    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn owners_and_prefixes(claims: &[Claim]) -> Vec<(String, String)> {
        claims
            .iter()
            .map(|c| (c.owner.clone(), c.prefix.to_string()))
            .collect()
    }

    #[test]
    fn dual_stack_pod_claims_both_addresses_and_podip_is_the_fallback() {
        let settings = KubernetesSettings::default();
        let both = pod(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]},
        }));
        assert_eq!(
            owners_and_prefixes(&pod_claims(&both, &settings)),
            [
                ("pod/u/10.0.0.1".to_owned(), "10.0.0.1/32".to_owned()),
                ("pod/u/fd00::1".to_owned(), "fd00::1/128".to_owned()),
            ]
        );
        let old = pod(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "status": {"phase": "Running", "podIP": "10.0.0.2"},
        }));
        assert_eq!(
            owners_and_prefixes(&pod_claims(&old, &settings)),
            [("pod/u/10.0.0.2".to_owned(), "10.0.0.2/32".to_owned())]
        );
    }

    #[test]
    fn pods_that_cannot_hold_an_address_claim_none() {
        let settings = KubernetesSettings::default();
        for (phase, host_network, ip) in [
            ("Failed", false, Some("10.0.0.1")),
            ("Succeeded", false, Some("10.0.0.1")),
            ("Running", true, Some("192.0.2.1")),
            ("Pending", false, None),
        ] {
            let mut value = json!({
                "metadata": {"name": "p", "uid": "u"},
                "spec": {"containers": [], "hostNetwork": host_network},
                "status": {"phase": phase},
            });
            if let Some(ip) = ip {
                value["status"]["podIP"] = json!(ip);
            }
            assert_eq!(
                pod_claims(&pod(value), &settings),
                [],
                "{phase} {host_network}"
            );
        }
    }

    #[test]
    fn workload_from_the_controlling_owner() {
        let meta = |labels: serde_json::Value, kind: &str, name: &str| -> ObjectMeta {
            serde_json::from_value(json!({
                "labels": labels,
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Other", "name": "x", "uid": "1"},
                    {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "2", "controller": true},
                ],
            }))
            .unwrap()
        };
        let workload = |m: &ObjectMeta| pod_workload(m).map(|w| format!("{}/{}", w.kind, w.name));
        let hash = json!({"pod-template-hash": "6d4cf56db6"});
        assert_eq!(
            workload(&meta(hash.clone(), "ReplicaSet", "api-gw-6d4cf56db6")).as_deref(),
            Some("Deployment/api-gw")
        );
        assert_eq!(
            workload(&meta(hash.clone(), "ReplicaSet", "api-gw-other")).as_deref(),
            Some("ReplicaSet/api-gw-other")
        );
        assert_eq!(
            workload(&meta(json!({}), "ReplicaSet", "api-gw-6d4cf56db6")).as_deref(),
            Some("ReplicaSet/api-gw-6d4cf56db6")
        );
        assert_eq!(
            workload(&meta(hash, "DaemonSet", "agent")).as_deref(),
            Some("DaemonSet/agent")
        );
        assert_eq!(workload(&ObjectMeta::default()), None);
    }

    #[test]
    fn the_api_servers_own_slice_is_skipped() {
        let settings = KubernetesSettings::default();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "kubernetes", "namespace": "default", "uid": "k",
                         "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["192.0.2.1"]}],
        }))
        .unwrap();
        assert_eq!(endpoint_slice_claims(&slice, &settings), []);
    }
}
