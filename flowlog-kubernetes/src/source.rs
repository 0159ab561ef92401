//! The Kubernetes inventory source: one task that runs a `kube` watcher per kind (Pods,
//! Services, Nodes, EndpointSlices; all namespaces), merges their events, turns them into
//! ownership changes through a [`Tracker`] per kind, and sends watermarks while every watch is
//! healthy. List/watch mechanics (resource versions, bookmarks, re-lists after 410 Gone) are the
//! `kube` watcher's; this file decides what the events mean and when the view is complete.
use std::{
    collections::HashMap,
    pin::Pin,
    time::{Duration, Instant},
};

use flowlog_identity::{
    BoxFuture, FailureLog, InventorySource, OwnershipChange, SourceError, now_ns, send_all,
};
use futures::{Stream, StreamExt, stream::SelectAll};
use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        utils::Backoff,
        watcher::{self, Event},
    },
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    claims::{
        Claim, KUBERNETES_SOURCE, Place, endpoint_slice_claims, node_claims, node_place,
        object_key, place_pod, pod_claims, service_claims,
    },
    settings::KubernetesSettings,
    tracker::Tracker,
};

/// Why the Kubernetes source could not start, or what a failing watch reported.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error(
        "building a Kubernetes client from the kubeconfig or the in-cluster service account: {0}"
    )]
    Client(#[source] kube::Error),
    #[error("watching {kind} in all namespaces: {source}")]
    Watch {
        kind: &'static str,
        source: watcher::Error,
    },
}

/// The watched kinds: the index of each in `KubernetesSource::kinds` and in `Msg`s.
const KINDS: [&str; 4] = ["pods", "services", "nodes", "endpointslices"];
const PODS: usize = 0;
const NODES: usize = 2;

/// An object as it is now, reduced to what the source uses: its key, its claims, and for a
/// node, its name and place.
struct Seen {
    key: String,
    claims: Vec<Claim>,
    place: Option<(String, Place)>,
}

/// One event of one watched kind, with the kind's claims already computed (so the merged stream
/// carries no generic object types).
enum Msg {
    Init(usize),
    InitApply(usize, Seen),
    InitDone(usize),
    Apply(usize, Seen),
    Delete(usize, String),
    Error(usize, watcher::Error),
}

impl Msg {
    fn kind(&self) -> usize {
        match self {
            Msg::Init(k)
            | Msg::InitApply(k, _)
            | Msg::InitDone(k)
            | Msg::Apply(k, _)
            | Msg::Delete(k, _)
            | Msg::Error(k, _) => *k,
        }
    }
}

type MsgStream = Pin<Box<dyn Stream<Item = Msg> + Send>>;

/// The watcher's retry delay: exponential from `backoff_min` to `backoff_max`, back to the
/// minimum once a failure comes more than twice `backoff_max` after the previous one (the watch
/// had been working). `StreamBackoff`'s reset on every successful event is ignored on purpose:
/// a failing list makes the watcher emit `Init` (a success) before each attempt, which would
/// otherwise hold the delay at its minimum and hammer a struggling API server.
#[derive(Debug, Clone)]
struct Exponential {
    min: Duration,
    max: Duration,
    next: Duration,
    last: Option<Instant>,
}

impl Iterator for Exponential {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.last.is_some_and(|t| t.elapsed() > self.max * 2) {
            self.next = self.min;
        }
        self.last = Some(Instant::now());
        let delay = self.next;
        self.next = (delay * 2).min(self.max);
        Some(delay)
    }
}

impl Backoff for Exponential {
    fn reset(&mut self) {}
}

/// A watcher of all objects of `K`, with backoff, mapped to [`Msg`]s of kind `kind`.
fn watch<K>(
    client: Client,
    kind: usize,
    settings: &KubernetesSettings,
    claims_of: fn(&K, &KubernetesSettings) -> Vec<Claim>,
    place_of: fn(&K) -> Option<(String, Place)>,
) -> MsgStream
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let backoff = Exponential {
        min: settings.backoff_min,
        max: settings.backoff_max,
        next: settings.backoff_min,
        last: None,
    };
    let settings = settings.clone();
    let api: Api<K> = Api::all(client);
    let seen = move |o: &K| Seen {
        key: object_key(o.meta()),
        claims: claims_of(o, &settings),
        place: place_of(o),
    };
    watcher::watcher(api, watcher::Config::default())
        .backoff(backoff)
        .map(move |event| match event {
            Ok(Event::Init) => Msg::Init(kind),
            Ok(Event::InitApply(o)) => Msg::InitApply(kind, seen(&o)),
            Ok(Event::InitDone) => Msg::InitDone(kind),
            Ok(Event::Apply(o)) => Msg::Apply(kind, seen(&o)),
            Ok(Event::Delete(o)) => Msg::Delete(kind, object_key(o.meta())),
            Err(e) => Msg::Error(kind, e),
        })
        .boxed()
}

/// One watched kind's state.
#[derive(Debug, Default)]
struct KindState {
    tracker: Tracker,
    /// A first list has completed.
    listed: bool,
    /// Lists completed (the second and later are re-lists).
    lists: u64,
    /// When the watch last failed, while it has not recovered.
    failing_since: Option<Instant>,
}

impl KindState {
    /// The kind's view is complete: listed, not re-listing, not failing.
    fn current(&self) -> bool {
        self.listed && !self.tracker.relisting() && self.failing_since.is_none()
    }
}

/// Pods, Services, Nodes and EndpointSlices of one cluster as an inventory source. See the
/// crate documentation for what each kind contributes and the interval rules.
pub struct KubernetesSource {
    client: Client,
    settings: KubernetesSettings,
    kinds: [KindState; 4],
    failures: FailureLog,
    /// The last time stamped on a change: times are made non-decreasing, so that a step back of
    /// the wall clock cannot put a Close before the Open that followed it in the stream.
    last_at: u64,
    /// Whether the last watermark check found every kind current.
    healthy: bool,
    /// Each node's place, for its pods' identities. Kept after a node is deleted, so that its
    /// terminating pods' identities do not change under them.
    places: HashMap<String, Place>,
    /// Pod events that arrived before the nodes' first list was complete, replayed after it,
    /// so that no pod is first opened without its node's zone and then reopened with it.
    deferred: Vec<Msg>,
}

impl std::fmt::Debug for KubernetesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSource")
            .field("settings", &self.settings)
            .field("kinds", &self.kinds)
            .field("healthy", &self.healthy)
            .finish_non_exhaustive()
    }
}

impl KubernetesSource {
    /// A source that watches the cluster `client` talks to (any `kube::Client`: in-cluster,
    /// from a kubeconfig, or `kube::Config::new(url)` for a test server).
    pub fn new(client: Client, settings: KubernetesSettings) -> Self {
        Self {
            client,
            settings,
            kinds: Default::default(),
            failures: FailureLog::new(KUBERNETES_SOURCE),
            last_at: 0,
            healthy: false,
            places: HashMap::new(),
            deferred: Vec::new(),
        }
    }

    /// A source for the cluster of the in-cluster service account or the local kubeconfig
    /// (`kube::Client::try_default`).
    pub async fn from_default_config(
        settings: KubernetesSettings,
    ) -> Result<Self, KubernetesError> {
        let client = Client::try_default()
            .await
            .map_err(KubernetesError::Client)?;
        Ok(Self::new(client, settings))
    }

    /// The current wall clock, never earlier than a time already sent.
    fn stamp(&mut self) -> u64 {
        self.last_at = self.last_at.max(now_ns());
        self.last_at
    }

    /// A pod's or node's event as the tracker takes it: a node's place remembered, a pod's
    /// claims placed in its node's zone and region.
    fn claims(&mut self, kind: usize, seen: Seen) -> (String, Vec<Claim>) {
        if let Some((name, place)) = seen.place {
            self.places.insert(name, place);
        }
        let claims = if kind == PODS {
            place_pod(seen.claims, |node| self.places.get(node).cloned())
        } else {
            seen.claims
        };
        (seen.key, claims)
    }

    /// Applies one event; returns the changes to send.
    fn handle(&mut self, msg: Msg) -> Vec<OwnershipChange> {
        if msg.kind() == PODS && !self.kinds[NODES].listed {
            self.deferred.push(msg);
            return Vec::new();
        }
        let at = self.stamp();
        let mut out = Vec::new();
        let kind = match msg {
            Msg::Init(k) => {
                self.kinds[k].tracker.init();
                k
            }
            Msg::InitApply(k, seen) => {
                let (key, claims) = self.claims(k, seen);
                self.kinds[k].tracker.init_apply(key, claims);
                k
            }
            Msg::InitDone(k) => {
                let state = &mut self.kinds[k];
                state.tracker.init_done(at, &mut out);
                state.listed = true;
                state.lists += 1;
                if state.lists > 1 {
                    metrics::counter!("flowlog_kubernetes_relists_total", "kind" => KINDS[k])
                        .increment(1);
                }
                tracing::debug!(
                    kind = KINDS[k],
                    open = state.tracker.open_claims(),
                    "list complete"
                );
                k
            }
            Msg::Apply(k, seen) => {
                let (key, claims) = self.claims(k, seen);
                self.kinds[k].tracker.apply(key, claims, at, &mut out);
                k
            }
            Msg::Delete(k, key) => {
                self.kinds[k].tracker.delete(&key, at, &mut out);
                k
            }
            Msg::Error(k, source) => {
                self.kinds[k].failing_since = Some(Instant::now());
                self.healthy = false;
                self.failures.failed(&KubernetesError::Watch {
                    kind: KINDS[k],
                    source,
                });
                return out;
            }
        };
        // Any event is the watch working again.
        self.kinds[kind].failing_since = None;
        if kind == NODES && self.kinds[NODES].listed && !self.deferred.is_empty() {
            for msg in std::mem::take(&mut self.deferred) {
                out.extend(self.handle(msg));
            }
        }
        if !self.healthy
            && let Some(watermark) = self.watermark(at)
        {
            out.push(watermark);
        }
        out
    }

    /// A Watermark(at) if every kind is current. A kind that failed and has been quiet for
    /// `recovery_quiet` is taken to have recovered (its watch resumed with nothing to say).
    fn watermark(&mut self, at: u64) -> Option<OwnershipChange> {
        let quiet = self.settings.recovery_quiet;
        for state in &mut self.kinds {
            if state.failing_since.is_some_and(|t| t.elapsed() >= quiet) {
                state.failing_since = None;
            }
        }
        self.healthy = self.kinds.iter().all(KindState::current);
        if !self.healthy {
            return None;
        }
        self.failures.succeeded();
        Some(OwnershipChange::Watermark {
            source: KUBERNETES_SOURCE.to_owned(),
            at_ns: at,
        })
    }

    fn streams(&self) -> SelectAll<MsgStream> {
        let (client, settings) = (&self.client, &self.settings);
        futures::stream::select_all([
            watch::<Pod>(client.clone(), PODS, settings, pod_claims, |_| None),
            watch::<Service>(client.clone(), 1, settings, service_claims, |_| None),
            watch::<Node>(client.clone(), NODES, settings, node_claims, node_place),
            watch::<EndpointSlice>(client.clone(), 3, settings, endpoint_slice_claims, |_| None),
        ])
    }

    async fn run_loop(
        mut self,
        changes: mpsc::Sender<OwnershipChange>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut events = self.streams();
        let mut ticks = tokio::time::interval(self.settings.watermark_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                msg = events.next() => match msg {
                    Some(msg) => self.handle(msg),
                    None => {
                        return Err(SourceError::Other {
                            name: KUBERNETES_SOURCE.to_owned(),
                            message: "every watch stream ended".to_owned(),
                        });
                    }
                },
                _ = ticks.tick() => {
                    let at = self.stamp();
                    self.watermark(at).into_iter().collect()
                }
            };
            if !send_all(&changes, batch).await {
                return Ok(());
            }
        }
    }
}

impl InventorySource for KubernetesSource {
    fn name(&self) -> &str {
        KUBERNETES_SOURCE
    }

    fn run(
        self: Box<Self>,
        changes: mpsc::Sender<OwnershipChange>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin((*self).run_loop(changes, shutdown))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::serde_json::{self, json};

    use super::*;

    fn seen_pod(settings: &KubernetesSettings) -> Seen {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "spec": {"containers": [], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
        }))
        .unwrap();
        Seen {
            key: object_key(&pod.metadata),
            claims: pod_claims(&pod, settings),
            place: None,
        }
    }

    fn seen_node(settings: &KubernetesSettings) -> Seen {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "uid": "n",
                         "labels": {"topology.kubernetes.io/zone": "z1"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]},
        }))
        .unwrap();
        Seen {
            key: object_key(&node.metadata),
            claims: node_claims(&node, settings),
            place: node_place(&node),
        }
    }

    /// Pods listed before the nodes wait for them, and open once, with their node's zone.
    #[tokio::test]
    async fn pods_listed_before_nodes_wait_and_open_placed() {
        let settings = KubernetesSettings::default();
        let client =
            Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let mut source = KubernetesSource::new(client, settings.clone());
        let mut out = Vec::new();
        out.extend(source.handle(Msg::Init(PODS)));
        out.extend(source.handle(Msg::InitApply(PODS, seen_pod(&settings))));
        out.extend(source.handle(Msg::InitDone(PODS)));
        assert_eq!(out, []);
        out.extend(source.handle(Msg::Init(NODES)));
        out.extend(source.handle(Msg::InitApply(NODES, seen_node(&settings))));
        out.extend(source.handle(Msg::InitDone(NODES)));
        let opened: Vec<(String, Option<String>)> = out
            .iter()
            .map(|c| match c {
                OwnershipChange::Open {
                    owner, identity, ..
                } => (owner.clone(), identity.zone.clone()),
                other => panic!("only Opens before every kind is listed: {other:?}"),
            })
            .collect();
        assert_eq!(
            opened,
            [
                ("node/n/192.0.2.1".to_owned(), Some("z1".to_owned())),
                ("pod/u/10.0.0.1".to_owned(), Some("z1".to_owned())),
            ]
        );
    }
}
