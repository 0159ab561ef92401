//! The Kubernetes inventory source: one task that runs a `kube` watcher per kind (Pods,
//! Services, Nodes, EndpointSlices; all namespaces), merges their events, turns them into
//! ownership changes through a [`Tracker`] per kind, and sends watermarks while every watch is
//! healthy. List/watch mechanics (resource versions, bookmarks, re-lists after 410 Gone) are the
//! `kube` watcher's; this file decides what the events mean and when the view is complete.
use std::{
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
        Claim, KUBERNETES_SOURCE, endpoint_slice_claims, node_claims, object_key, pod_claims,
        service_claims,
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

/// One event of one watched kind, with the kind's claims already computed (so the merged stream
/// carries no generic object types).
enum Msg {
    Init(usize),
    InitApply(usize, String, Vec<Claim>),
    InitDone(usize),
    Apply(usize, String, Vec<Claim>),
    Delete(usize, String),
    Error(usize, watcher::Error),
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
    watcher::watcher(api, watcher::Config::default())
        .backoff(backoff)
        .map(move |event| match event {
            Ok(Event::Init) => Msg::Init(kind),
            Ok(Event::InitApply(o)) => {
                Msg::InitApply(kind, object_key(o.meta()), claims_of(&o, &settings))
            }
            Ok(Event::InitDone) => Msg::InitDone(kind),
            Ok(Event::Apply(o)) => Msg::Apply(kind, object_key(o.meta()), claims_of(&o, &settings)),
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

    /// Applies one event; returns the changes to send.
    fn handle(&mut self, msg: Msg) -> Vec<OwnershipChange> {
        let at = self.stamp();
        let mut out = Vec::new();
        let kind = match msg {
            Msg::Init(k) => {
                self.kinds[k].tracker.init();
                k
            }
            Msg::InitApply(k, key, claims) => {
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
            Msg::Apply(k, key, claims) => {
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
            watch::<Pod>(client.clone(), 0, settings, pod_claims),
            watch::<Service>(client.clone(), 1, settings, service_claims),
            watch::<Node>(client.clone(), 2, settings, node_claims),
            watch::<EndpointSlice>(client.clone(), 3, settings, endpoint_slice_claims),
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
