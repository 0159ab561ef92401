//! The Kubernetes inventory: who held each pod, service and node address of a cluster, and
//! when, as ownership intervals for flowlog's identity index, from list/watch of the API server.
//!
//! [`KubernetesSource`] implements [`flowlog_identity::InventorySource`] (name `kubernetes`). It
//! is built from any `kube::Client` ([`KubernetesSource::new`]; tests point one at an HTTP URL)
//! or from the in-cluster / kubeconfig defaults ([`KubernetesSource::from_default_config`]), with
//! [`KubernetesSettings`] (label allow-list, watermark period, retry backoff).
//!
//! [`election`] is leader election on a `coordination.k8s.io/v1` Lease, so that one of several
//! `flowlog-inventory` replicas publishes at a time.
//!
//! # What each watched kind contributes (all namespaces)
//! - **Pods**: each pod IP (`status.podIPs`, or `podIP`; IPv4 and IPv6) as a `Pod` identity with
//!   namespace, name, workload (the controlling owner; a ReplicaSet made by a Deployment is named
//!   as that Deployment, see [`claims::pod_workload`]), node and its zone and region, pod UID
//!   and the allowed labels. (Pod events wait for the nodes' first list, so that no pod opens
//!   without its zone and reopens with it.)
//!   Owner key `pod/<uid>/<ip>`. Host-network pods contribute nothing: their address is their
//!   node's. Container ids are left out: a pod's containers share its address, so the remote end
//!   of a flow is the pod, and the local end gets its container from the process's cgroup.
//! - **Services**: each cluster IP (`spec.clusterIPs`, or `clusterIP`; not `None`) as a `Service`
//!   identity, owner `service/<uid>/<ip>`.
//! - **Nodes**: each `InternalIP` and `ExternalIP` as a `Node` identity with zone and region from
//!   the `topology.kubernetes.io/*` labels, owner `node/<uid>/<ip>`. Host-network pods resolve here.
//! - **EndpointSlices**: only endpoints without a `targetRef` (a selector-less Service whose
//!   endpoints are kept by hand, typically an address outside the cluster) are attributed, to
//!   their Service, owner `endpointslice/<uid>/<ip>`. Pod-backed endpoints add nothing: the pod
//!   is the owner of its address and its own events say when; readiness says nothing about
//!   ownership. See [`claims::endpoint_slice_claims`] (and why `default/kubernetes` is skipped).
//!
//! # Interval rules
//! An object's claim opens when it is first seen making it and closes when it stops: for a pod,
//! when it reaches a terminal phase (`Succeeded`/`Failed`, even if the object stays), loses its
//! IP, or is DELETED. A `deletionTimestamp` is a deadline (now + grace period), not the release:
//! a terminating pod still holds its address. `creationTimestamp` and `startTime` have one
//! second's precision and precede the IP's assignment, and the objects carry no time for the
//! assignment or the release, so **the time of every change is its watch event's arrival**
//! (`now_ns()` on receipt, made non-decreasing). A label change is an Open with the new identity
//! (the index splits the tenure there; earlier flows keep the old identity).
//!
//! Error bound: an Open is late by the watch delay (assignment → kubelet's status write →
//! event arrival), so flows in that window are `unknown`, never wrong; a Close is late by the
//! same delay, so flows in it still go to the old owner — which is right unless the address has
//! already been handed to a new pod. Could the new owner's interval overlap the old one's, or be
//! attributed to it? Within one stream, events come in the API server's (etcd's) order and we
//! stamp them in that order; the old pod's release (terminal status or deletion) is written
//! before the new pod's status carries the reused address whenever the IPAM's reuse delay exceeds
//! the kubelet's status-write lag (host-local allocates round-robin through the node's range;
//! the AWS VPC CNI keeps a released address for 30 s). Then the Close is stamped at or before
//! the Open, the intervals `[a, c)` `[o, …)` with `c ≤ o` cannot overlap, and only flows
//! between the real reassignment and our Close of the old owner (empty unless the address is
//! reused faster than the watch delay) could get the old owner. If the writes ever come the
//! other way round, the intervals overlap from the Open to the Close and the index answers
//! `ambiguous` there — never a wrong owner. The churn test reassigns 50 addresses every 200 ms
//! and counts none misattributed.
//!
//! # Re-lists
//! After a 410 Gone or a restart of its watch, the `kube` watcher lists again (`Init`,
//! `InitApply`…, `InitDone`). Each kind's [`tracker::Tracker`] keeps its open claims and buffers
//! the list: at `InitDone` it closes, at that time, every object that was open and is not listed
//! (its DELETED event was lost in the gap), then applies the listed objects' differences —
//! nothing is re-sent for owners still open with the same identity.
//!
//! # Watermarks and failures
//! Once the first list of every kind is complete, and then every `watermark_interval` while all
//! four watches are current, a `Watermark{source: "kubernetes", at_ns: now}` is sent. A watch
//! error (the watcher retries with exponential backoff) or a re-list in progress holds the
//! watermark until that kind recovers: an event arrives, its re-list completes, or its watch has
//! gone `recovery_quiet` without a new error (a resumed watch in a quiet cluster says nothing).
//! Every error counts in `flowlog_identity_source_errors_total{source="kubernetes"}` and a run
//! of them is logged once with a count; each completed re-list counts in
//! `flowlog_kubernetes_relists_total{kind}`. The enricher holds flows newer than the
//! watermark: a stuck watermark is the honest answer while the view may be missing changes, and
//! changes that happened during an outage are dated when they are seen after it.
pub mod claims;
pub mod election;
pub mod settings;
pub mod source;
pub mod tracker;

pub use claims::{Claim, KUBERNETES_SOURCE};
pub use settings::KubernetesSettings;
pub use source::{KubernetesError, KubernetesSource};
