//! The Kubernetes inventory: who held each pod, service and node address of a cluster, and
//! when, as ownership intervals for flowlog's identity index, from list/watch of the API server.
//!
//! [`KubernetesSource`] implements [`flowlog_identity::InventorySource`] (name `kubernetes`). It
//! is built from any `kube::Client` ([`KubernetesSource::new`]; tests point one at an HTTP URL)
//! or from the in-cluster / kubeconfig defaults ([`KubernetesSource::from_default_config`]), with
//! [`KubernetesSettings`] (label allow-list, probe interval, watch timeout, retry backoff).
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
//! a terminating pod still holds its address. A label change is an Open with the new identity
//! (the index splits the tenure there; earlier flows keep the old identity).
//!
//! # When a change happened: probes, not arrivals
//! `creationTimestamp` and `startTime` have one second's precision and precede the IP's
//! assignment, and the objects carry no time for the assignment or the release; a watch event
//! may arrive late (an API server under load). So every change is dated by **probes**
//! ([`progress`]): every `probe_interval` each kind gets a consistent LIST with `limit=1`, whose
//! answer carries the collection's current `resourceVersion` at a known time. A change with
//! version v happened after the send time of the last probe answered below v, and by the
//! earlier of its arrival and the answer of the first probe answered at or past v (events that
//! arrive while a probe sent before them is in flight wait for its answer). An Open is dated at
//! the span's end (held for sure from then) and a Close at its start, each with an
//! `OwnershipChange::Uncertain` span over the rest, in which the index names the owner only as
//! a candidate: flows there come out `ambiguous`, never wrong (unless the flow proves the
//! address was held — its peer answered — which makes the one candidate exact: the enricher's
//! `Presence`). A pod given an address that a
//! terminating pod still holds may have had it since the termination began ([`tracker`]).
//! The spans are about a probe interval wide, whatever the watch's lag; the churn test
//! reassigns 50 addresses every 200 ms, also with every watch event 0–1 s late, and counts none
//! misattributed.
//!
//! # Re-lists
//! After a 410 Gone or a restart, a kind's list/watch loop ([`watch`]: paged consistent lists,
//! then a watch with bookmarks resumed from the last version, each lasting `watch_timeout`)
//! lists again (`Init`, `InitApply`…, `InitDone`). Each kind's [`tracker::Tracker`] keeps its
//! open claims and buffers the list: at `InitDone` it closes every object that was open and is
//! not listed (its DELETED event was lost in the gap; dated from the last time the stream was
//! complete to the list), then applies the listed objects' differences — nothing is re-sent for
//! owners still open with the same identity.
//!
//! # Watermarks and failures
//! The watermark is a time up to which every stream is **known complete**, not the wall clock:
//! a kind's stream is complete up to the send time of the latest probe whose version it has
//! delivered (an event or bookmark at or past it; kube-apiserver sends a bookmark 2 s before a
//! watch's `timeoutSeconds`, which is how a quiet kind catches up), and
//! `Watermark{source: "kubernetes"}` is the oldest of the four, sent whenever it moves. A lagging
//! or failing watch holds it back, and the enricher holds flows newer than it. Every error
//! counts in `flowlog_identity_source_errors_total{source="kubernetes"}` and a run of them is
//! logged once with a count; each completed re-list counts in
//! `flowlog_kubernetes_relists_total{kind}`.
pub mod claims;
pub mod election;
pub mod metrics;
pub mod progress;
pub mod settings;
pub mod source;
pub mod tracker;
pub mod watch;

pub use claims::{Claim, KUBERNETES_SOURCE};
pub use settings::KubernetesSettings;
pub use source::{KubernetesError, KubernetesSource};
