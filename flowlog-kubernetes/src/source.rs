//! The Kubernetes inventory source: one task that runs a list/watch loop per kind (Pods,
//! Services, Nodes, EndpointSlices; all namespaces, [`crate::watch`]), merges their messages,
//! turns them into ownership changes through a [`Tracker`] per kind, probes every kind with a
//! consistent read every `probe_interval`, and from both knows each kind's [`Progress`]: when
//! each change happened, and up to when every stream is complete — the watermark.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use flowlog_identity::{
    BoxFuture, FailureLog, InventorySource, OwnershipChange, SourceError, now_ns, send_all,
};
use futures::{StreamExt, stream::FuturesUnordered, stream::SelectAll};
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Client, runtime::utils::Backoff};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    claims::{
        Claim, KUBERNETES_SOURCE, endpoint_slice_claims, node_claims, node_place, place_pod,
        pod_claims, service_claims,
    },
    progress::{Probe, Progress, Version},
    settings::KubernetesSettings,
    tracker::Tracker,
    watch::{Msg, MsgStream, Seen, probe, watch},
};

/// Why the Kubernetes source could not start, or what a failing list, watch or probe reported.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("building a Kubernetes client from the kubeconfig or the in-cluster service account")]
    Client(#[source] kube::Error),
    #[error("listing {kind} in all namespaces")]
    List {
        kind: &'static str,
        source: kube::Error,
    },
    #[error("watching {kind} in all namespaces")]
    Watch {
        kind: &'static str,
        source: kube::Error,
    },
    #[error("watching {kind} in all namespaces: the server answered {code}: {message}")]
    WatchStatus {
        kind: &'static str,
        code: u16,
        message: String,
    },
    #[error("watching {kind} in all namespaces: nothing for {secs} s, past the watch's timeout")]
    Silent { kind: &'static str, secs: u64 },
    #[error("probing {kind} (a consistent list of one object, for its resourceVersion)")]
    Probe {
        kind: &'static str,
        source: kube::Error,
    },
    #[error("{kind}: the API server sent no resourceVersion")]
    NoVersion { kind: &'static str },
    /// Fatal: the watchers retry every error themselves, so this means the streams are gone.
    #[error("every watch stream ended")]
    StreamsEnded,
}

/// The watched kinds: the index of each in `KubernetesSource::kinds` and in `Msg`s.
const KINDS: [&str; 4] = ["pods", "services", "nodes", "endpointslices"];
const PODS: usize = 0;
const SERVICES: usize = 1;
const NODES: usize = 2;
const ENDPOINT_SLICES: usize = 3;

/// The retry delay of failed lists and watches: exponential from `backoff_min` to
/// `backoff_max`, back to the minimum once a failure comes more than twice `backoff_max` after
/// the previous one (the watch had been working).
#[derive(Debug, Clone)]
pub(crate) struct Exponential {
    min: Duration,
    max: Duration,
    next: Duration,
    last: Option<Instant>,
}

impl Exponential {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
            last: None,
        }
    }
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

/// One watched kind's state.
#[derive(Debug, Default)]
struct KindState {
    tracker: Tracker,
    progress: Progress,
    /// A first list has completed.
    listed: bool,
    /// Lists completed (the second and later are re-lists).
    lists: u64,
    /// A probe is in flight, started at this time (one at a time, so that answers come in
    /// the order they were sent).
    probing: Option<u64>,
    /// Messages that arrived while a probe sent before them was in flight: held until it is
    /// answered, because its answer may date their changes more closely (a change the probe
    /// did not see happened after it was sent). In arrival order.
    waiting: Vec<Msg>,
}

/// A probe's answer: the kind, and (sent, answered, version) or why not.
type ProbeResult = (usize, Result<(u64, u64, Version), KubernetesError>);

/// Pods, Services, Nodes and EndpointSlices of one cluster as an inventory source. See the
/// crate documentation for what each kind contributes, the interval rules and the watermark.
pub struct KubernetesSource {
    client: Client,
    settings: KubernetesSettings,
    kinds: [KindState; 4],
    failures: FailureLog,
    /// The last arrival time used: arrivals are made non-decreasing, so that a step back of the
    /// wall clock cannot date a change before the one ahead of it in the stream.
    last_at: u64,
    /// The last watermark sent.
    watermark: Option<u64>,
    /// Each node's place, for its pods' identities. Kept after a node is deleted, so that its
    /// terminating pods' identities do not change under them.
    places: HashMap<String, crate::claims::Place>,
    /// Pod messages that arrived before the nodes' first list was complete, replayed after it,
    /// so that no pod is first opened without its node's zone and then reopened with it.
    deferred: Vec<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Msg::Init(_) => "Init",
            Msg::InitApply(..) => "InitApply",
            Msg::InitDone(..) => "InitDone",
            Msg::Apply(..) => "Apply",
            Msg::Delete(..) => "Delete",
            Msg::Bookmark(..) => "Bookmark",
            Msg::Error(..) => "Error",
        };
        write!(f, "{name}({})", KINDS[self.kind()])
    }
}

impl std::fmt::Debug for KubernetesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSource")
            .field("settings", &self.settings)
            .field("kinds", &self.kinds)
            .field("watermark", &self.watermark)
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
            watermark: None,
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

    /// `at_ns`, never earlier than a time already used.
    fn monotonic(&mut self, at_ns: u64) -> u64 {
        self.last_at = self.last_at.max(at_ns);
        self.last_at
    }

    /// A pod's or node's object as the tracker takes it: a node's place remembered, a pod's
    /// claims placed in its node's zone and region.
    fn claims(&mut self, kind: usize, seen: Seen) -> (String, Vec<Claim>, bool) {
        if let Some((name, place)) = seen.place {
            self.places.insert(name, place);
        }
        let claims = if kind == PODS {
            place_pod(seen.claims, |node| self.places.get(node).cloned())
        } else {
            seen.claims
        };
        (seen.key, claims, seen.terminating)
    }

    /// Takes one message from the watches: applied now, or held behind a probe in flight that
    /// was sent before it arrived (and behind the kind's messages already held). Returns the
    /// changes to send.
    fn receive(&mut self, msg: Msg) -> Vec<OwnershipChange> {
        let state = &mut self.kinds[msg.kind()];
        let arrived = match &msg {
            Msg::Apply(_, _, stamp) | Msg::Delete(_, _, stamp) => Some(stamp.arrived_ns),
            Msg::InitDone(_, listed) => Some(listed.done_ns),
            _ => None,
        };
        let behind_probe = state
            .probing
            .zip(arrived)
            .is_some_and(|(sent, arrived)| sent <= arrived);
        if !matches!(msg, Msg::Error(..)) && (behind_probe || !state.waiting.is_empty()) {
            state.waiting.push(msg);
            return Vec::new();
        }
        self.handle(msg)
    }

    /// Applies one message; returns the changes to send.
    fn handle(&mut self, msg: Msg) -> Vec<OwnershipChange> {
        if msg.kind() == PODS && !self.kinds[NODES].listed {
            self.deferred.push(msg);
            return Vec::new();
        }
        let mut out = Vec::new();
        let kind = msg.kind();
        match msg {
            Msg::Init(k) => self.kinds[k].tracker.init(),
            Msg::InitApply(k, seen) => {
                let (key, claims, terminating) = self.claims(k, seen);
                self.kinds[k].tracker.init_apply(key, claims, terminating);
            }
            Msg::InitDone(k, listed) => {
                let done = self.monotonic(listed.done_ns);
                let state = &mut self.kinds[k];
                let when = state.progress.when(None, &listed.version, done);
                state.tracker.init_done(when, &mut out);
                state.progress.listed(listed.version, listed.sent_ns);
                state.listed = true;
                state.lists += 1;
                if state.lists > 1 {
                    metrics::counter!(crate::metrics::RELISTS, "kind" => KINDS[k]).increment(1);
                }
                tracing::debug!(
                    kind = KINDS[k],
                    open = state.tracker.open_claims(),
                    "list complete"
                );
            }
            Msg::Apply(k, seen, stamp) => {
                let arrived = self.monotonic(stamp.arrived_ns);
                let (key, claims, terminating) = self.claims(k, seen);
                let state = &mut self.kinds[k];
                let when = state.progress.when_event(&stamp.version, arrived);
                state
                    .tracker
                    .apply(key, claims, terminating, when, &mut out);
                state.progress.deliver(stamp.version);
            }
            Msg::Delete(k, key, stamp) => {
                let arrived = self.monotonic(stamp.arrived_ns);
                let state = &mut self.kinds[k];
                let when = state.progress.when_event(&stamp.version, arrived);
                state.tracker.delete(&key, when, &mut out);
                state.progress.deliver(stamp.version);
            }
            Msg::Bookmark(k, version) => self.kinds[k].progress.deliver(version),
            Msg::Error(_, error) => self.failures.failed(&error),
        }
        if kind == NODES && self.kinds[NODES].listed && !self.deferred.is_empty() {
            for msg in std::mem::take(&mut self.deferred) {
                out.extend(self.handle(msg));
            }
        }
        out
    }

    /// A probe's answer; then the kind's messages held for it are applied. Returns the changes
    /// to send.
    fn probed(&mut self, (kind, result): ProbeResult) -> Vec<OwnershipChange> {
        let state = &mut self.kinds[kind];
        state.probing = None;
        match result {
            Ok((sent_ns, answered_ns, version)) => state.progress.probed(Probe {
                sent_ns,
                answered_ns,
                version,
            }),
            Err(error) => self.failures.failed(&error),
        }
        let mut out = Vec::new();
        for msg in std::mem::take(&mut self.kinds[kind].waiting) {
            out.extend(self.handle(msg));
        }
        out
    }

    /// A Watermark if every kind is listed and the oldest of their complete-to times has moved
    /// on since the last one sent.
    fn watermark(&mut self) -> Option<OwnershipChange> {
        let mut at = u64::MAX;
        for state in &self.kinds {
            if !state.listed {
                return None;
            }
            at = at.min(state.progress.complete_to()?);
        }
        if self.watermark.is_some_and(|w| w >= at) {
            return None;
        }
        self.watermark = Some(at);
        self.failures.succeeded();
        Some(OwnershipChange::Watermark {
            source: KUBERNETES_SOURCE.to_owned(),
            at_ns: at,
        })
    }

    /// Starts a probe of every kind that has none in flight.
    fn probe_all(&mut self, probes: &mut FuturesUnordered<BoxFuture<'static, ProbeResult>>) {
        for (kind, state) in self.kinds.iter_mut().enumerate() {
            if state.probing.is_some() {
                continue;
            }
            state.probing = Some(now_ns());
            let client = self.client.clone();
            let name = KINDS[kind];
            let answer = match kind {
                PODS => probe::<Pod>(client, name),
                SERVICES => probe::<Service>(client, name),
                NODES => probe::<Node>(client, name),
                _ => probe::<EndpointSlice>(client, name),
            };
            probes.push(Box::pin(async move { (kind, answer.await) }));
        }
    }

    fn streams(&self) -> SelectAll<MsgStream> {
        let (client, settings) = (&self.client, &self.settings);
        futures::stream::select_all([
            watch::<Pod>(
                client.clone(),
                PODS,
                KINDS[PODS],
                settings,
                pod_claims,
                |_| None,
            ),
            watch::<Service>(
                client.clone(),
                SERVICES,
                KINDS[SERVICES],
                settings,
                service_claims,
                |_| None,
            ),
            watch::<Node>(
                client.clone(),
                NODES,
                KINDS[NODES],
                settings,
                node_claims,
                node_place,
            ),
            watch::<EndpointSlice>(
                client.clone(),
                ENDPOINT_SLICES,
                KINDS[ENDPOINT_SLICES],
                settings,
                endpoint_slice_claims,
                |_| None,
            ),
        ])
    }

    async fn run_loop(
        mut self,
        changes: mpsc::Sender<OwnershipChange>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut events = self.streams();
        let mut probes = FuturesUnordered::new();
        let mut ticks = tokio::time::interval(self.settings.probe_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut batch = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                msg = events.next() => match msg {
                    Some(msg) => self.receive(msg),
                    None => {
                        return Err(SourceError::new(
                            KUBERNETES_SOURCE,
                            KubernetesError::StreamsEnded,
                        ));
                    }
                },
                Some(answer) = probes.next(), if !probes.is_empty() => self.probed(answer),
                _ = ticks.tick() => {
                    self.probe_all(&mut probes);
                    Vec::new()
                }
            };
            batch.extend(self.watermark());
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
    use crate::{claims::object_key, watch::Listed};

    fn listed(version: u64) -> Listed {
        Listed {
            version: Version::Number(version),
            sent_ns: 1,
            done_ns: 2,
        }
    }

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
            terminating: false,
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
            terminating: false,
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
        out.extend(source.handle(Msg::InitDone(PODS, listed(5))));
        assert_eq!(out, []);
        out.extend(source.handle(Msg::Init(NODES)));
        out.extend(source.handle(Msg::InitApply(NODES, seen_node(&settings))));
        out.extend(source.handle(Msg::InitDone(NODES, listed(6))));
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
