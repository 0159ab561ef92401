//! A small Kubernetes list/watch API server for tests: it serves real object JSON for Pods,
//! Services, Nodes and EndpointSlices (all namespaces) the way kube-apiserver does, so that the
//! `kube` client and its watcher run unchanged over HTTP: lists carry `metadata.resourceVersion`
//! (the cluster's current one, as a consistent read does), and with `?limit=N` a page of N objects,
//! `metadata.continue` and `remainingItemCount`, the next pages served from the same snapshot;
//! `?watch=true&resourceVersion=N` streams newline-delimited `{"type":…,"object":…}` events after
//! N, then a BOOKMARK, then live events; with `timeoutSeconds` the watch ends at its deadline,
//! with one more BOOKMARK 2 s before it (and one a minute), as kube-apiserver's watch cache sends
//! them; a watch from a version older than what is kept gets an `ERROR` event with a `Status` of
//! code 410 (Gone), which makes the watcher re-list. The test drives it: objects are added,
//! modified and deleted at moments it controls, watches can be cut with history compacted (so
//! events are lost and a re-list must find out), every request can be made to fail, and watch
//! streams can lag ([`WatchLag`]: each message held back a random time, in order — an API server
//! under load).
//!
//! It also serves namespaced `coordination.k8s.io/v1` Leases for leader election (get, create,
//! update with optimistic concurrency: see [`lease`]), and records every request as the RBAC
//! authorizer sees it ([`ApiCall`], [`ApiServer::calls`]), so a test can compare what a client did
//! with what a Role grants.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    serve::ListenerExt,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use tokio::{sync::mpsc, time::Instant};

use super::lease;
use crate::now_ns;

/// The collections served, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Service,
    Node,
    EndpointSlice,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Pod, Kind::Service, Kind::Node, Kind::EndpointSlice];

    fn path(self) -> &'static str {
        match self {
            Kind::Pod => "/api/v1/pods",
            Kind::Service => "/api/v1/services",
            Kind::Node => "/api/v1/nodes",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::Node => "Node",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

/// How late the server delivers what it writes to watch streams: an API server under load,
/// whose watch events reach clients late. Each stream is delayed on its own and stays in order
/// (a message is never sent before the one ahead of it, so one long delay holds back
/// everything behind it); lists are answered at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WatchLag {
    /// Every message is sent as soon as it exists.
    #[default]
    None,
    /// Each message is held a random time, uniform in `0..=max`.
    Random { max: Duration },
    /// Messages written during a burst — the first `length` of every `every`, counted from
    /// [`ApiServer::set_watch_lag`] — are held a random time in `0..=max`; the others are not
    /// held (but still wait for the ones ahead of them).
    Bursts {
        every: Duration,
        length: Duration,
        max: Duration,
    },
}

/// One open watch stream: where its messages go, each with the instant it may be sent.
struct Watcher {
    tx: mpsc::UnboundedSender<(Instant, Bytes)>,
}

#[derive(Default)]
struct Collection {
    /// `namespace/name` → object (shared with list snapshots, so that a page costs no copy).
    objects: BTreeMap<String, Arc<Value>>,
    /// Events kept for watches that resume: (resourceVersion, JSON line).
    events: Vec<(u64, Bytes)>,
    /// Events up to this version were dropped: a watch from before it gets 410 Gone.
    compacted: u64,
    watchers: Vec<Watcher>,
}

/// The lag mode and its random numbers (seeded: a run can be repeated).
struct Lag {
    mode: WatchLag,
    since: Instant,
    rng: StdRng,
}

impl Default for Lag {
    fn default() -> Self {
        Self {
            mode: WatchLag::None,
            since: Instant::now(),
            rng: StdRng::seed_from_u64(0),
        }
    }
}

impl Lag {
    /// How long to hold a message written now.
    fn delay(&mut self) -> Duration {
        let max = match self.mode {
            WatchLag::None => return Duration::ZERO,
            WatchLag::Random { max } => max,
            WatchLag::Bursts { every, length, max } => {
                let into = self.since.elapsed().as_nanos() % every.as_nanos().max(1);
                if into >= length.as_nanos() {
                    return Duration::ZERO;
                }
                max
            }
        };
        Duration::from_nanos(self.rng.random_range(0..=max.as_nanos() as u64))
    }
}

/// Sends `line` to every watcher of `collection`, each held by its own lag.
fn broadcast(collection: &mut Collection, lag: &mut Lag, line: &Bytes) {
    collection.watchers.retain(|w| {
        w.tx.send((Instant::now() + lag.delay(), line.clone()))
            .is_ok()
    });
}

/// A list's remaining pages: the objects as of the first page, after the ones already sent.
struct Snapshot {
    rv: u64,
    rest: VecDeque<Arc<Value>>,
}

/// List snapshots kept for continue tokens at most; an older token is answered 410 Expired,
/// as kube-apiserver answers a token whose version was compacted.
const SNAPSHOTS: usize = 64;

#[derive(Default)]
pub(super) struct Inner {
    /// The cluster-wide resource version (etcd's revision): every write increments it.
    pub(super) rv: u64,
    failing: bool,
    /// Lists and watches of the watched kinds fail (Leases still work).
    failing_watches: bool,
    failed_requests: u64,
    /// Watches answered 410 Gone.
    gone: u64,
    collections: BTreeMap<Kind, Collection>,
    lag: Lag,
    /// Continue tokens of paged lists → what is left to send (oldest first).
    snapshots: VecDeque<(String, Snapshot)>,
    next_snapshot: u64,
    /// Leases by `(namespace, name)`.
    pub(super) leases: BTreeMap<(String, String), Value>,
    /// Every request, as the authorizer sees it.
    pub(super) calls: BTreeSet<ApiCall>,
}

/// One request as Kubernetes' RBAC authorizer sees it: a verb (`get`, `list`, `watch`, `create`,
/// `update`, `patch`, `delete`, `deletecollection`) on a resource of an API group (`""` for the
/// core group), in a namespace or cluster-wide (`namespace: None`), on one named object or a
/// collection. A subresource is `resource/subresource`, as in a Role's rules. A non-resource
/// request (discovery such as `/api` or `/version`) has its path as `resource`, an empty group
/// and the lower-cased HTTP method as its verb.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiCall {
    pub verb: String,
    pub api_group: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl ApiCall {
    /// What the authorizer sees of `method` on `path` (with `watch` from the query): the
    /// apiserver's RequestInfo rules for `/api/v1/...` and `/apis/<group>/<version>/...`.
    pub fn of(method: &Method, path: &str, watch: bool) -> Self {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (api_group, rest) = match segments.as_slice() {
            ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
            ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
            _ => {
                return Self {
                    verb: method.as_str().to_lowercase(),
                    api_group: String::new(),
                    resource: path.to_string(),
                    namespace: None,
                    name: None,
                };
            }
        };
        // `namespaces/<ns>/<resource>...` is namespaced; `namespaces/<ns>` alone is the
        // Namespace object itself.
        let (namespace, rest) = match rest {
            ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
                (Some(namespace.to_string()), rest)
            }
            _ => (None, rest),
        };
        let resource = match rest {
            [resource, _name, subresource, ..] => format!("{resource}/{subresource}"),
            [resource, ..] => resource.to_string(),
            [] => unreachable!("rest is not empty"),
        };
        let name = rest.get(1).map(|n| n.to_string());
        let verb = match (method.as_str(), &name) {
            ("GET" | "HEAD", _) if watch => "watch",
            ("GET" | "HEAD", Some(_)) => "get",
            ("GET" | "HEAD", None) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", Some(_)) => "delete",
            ("DELETE", None) => "deletecollection",
            (other, _) => return Self::of_unknown(other, path),
        };
        Self {
            verb: verb.to_string(),
            api_group: api_group.to_string(),
            resource,
            namespace,
            name,
        }
    }

    fn of_unknown(method: &str, path: &str) -> Self {
        Self {
            verb: method.to_lowercase(),
            api_group: String::new(),
            resource: path.to_string(),
            namespace: None,
            name: None,
        }
    }
}

/// The server; dropping it stops nothing (the runtime of the test ends it).
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Mutex<Inner>>,
    pub url: String,
}

fn line(value: &Value) -> Bytes {
    let mut text = serde_json::to_vec(value).expect("JSON");
    text.push(b'\n');
    Bytes::from(text)
}

pub(super) fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn key_of(object: &Value) -> String {
    let meta = &object["metadata"];
    format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or(""),
        meta["name"].as_str().expect("metadata.name")
    )
}

impl ApiServer {
    /// Starts the server on a free port of 127.0.0.1.
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&inner));
        // As kube-apiserver (Go sets TCP_NODELAY): without it, Nagle's algorithm can hold a
        // watch event back until the previous one is acknowledged.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { inner, url }
    }

    /// Adds or replaces an object (ADDED or MODIFIED); returns when it happened (ns, read
    /// before the event is visible to any watch), the ground truth for tests.
    pub fn apply(&self, kind: Kind, mut object: Value) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        // Before anyone can see the write: a watcher may stamp it before this call returns.
        let at = now_ns();
        inner.rv += 1;
        let rv = inner.rv;
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.kind());
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let Inner {
            collections, lag, ..
        } = &mut *inner;
        let collection = collections.entry(kind).or_default();
        let key = key_of(&object);
        let kind_of_event = if collection.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let event = line(&json!({"type": kind_of_event, "object": object}));
        collection.objects.insert(key, Arc::new(object));
        collection.events.push((rv, event.clone()));
        broadcast(collection, lag, &event);
        at
    }

    /// Deletes an object (DELETED, carrying its last state); returns when (ns).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        let at = now_ns();
        inner.rv += 1;
        let rv = inner.rv;
        let Inner {
            collections, lag, ..
        } = &mut *inner;
        let collection = collections.entry(kind).or_default();
        let object = collection
            .objects
            .remove(&format!("{namespace}/{name}"))
            .expect("deleting an object that exists");
        let mut object = Arc::unwrap_or_clone(object);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let event = line(&json!({"type": "DELETED", "object": object}));
        collection.events.push((rv, event.clone()));
        broadcast(collection, lag, &event);
        at
    }

    /// Cuts every watch of `kind`, deletes the object while nobody watches, and drops the event
    /// history (as etcd compaction does): the DELETED event is lost, and the watcher's resumed
    /// watch gets 410 Gone and must re-list to find out. Returns when the object went (ns).
    pub fn delete_unseen(&self, kind: Kind, namespace: &str, name: &str) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        let at = now_ns();
        inner.rv += 1;
        let rv = inner.rv;
        let collection = inner.collections.entry(kind).or_default();
        collection.watchers.clear();
        collection
            .objects
            .remove(&format!("{namespace}/{name}"))
            .expect("deleting an object that exists");
        collection.events.clear();
        collection.compacted = rv;
        at
    }

    /// While failing, every request is answered 500 and open watches are cut.
    pub fn set_failing(&self, failing: bool) {
        let mut inner = self.inner.lock().unwrap();
        inner.failing = failing;
        if failing {
            for collection in inner.collections.values_mut() {
                collection.watchers.clear();
            }
        }
    }

    /// While set, lists and watches of the watched kinds are answered 500 and open watches are
    /// cut, but Leases keep working: an elected leader whose sources cannot sync.
    pub fn set_failing_watches(&self, failing: bool) {
        let mut inner = self.inner.lock().unwrap();
        inner.failing_watches = failing;
        if failing {
            for collection in inner.collections.values_mut() {
                collection.watchers.clear();
            }
        }
    }

    /// From now on, watch streams lag as `lag` says (messages already queued keep their time);
    /// `seed` makes the random delays repeatable.
    pub fn set_watch_lag(&self, lag: WatchLag, seed: u64) {
        let mut inner = self.inner.lock().unwrap();
        inner.lag = Lag {
            mode: lag,
            since: Instant::now(),
            rng: StdRng::seed_from_u64(seed),
        };
    }

    /// The cluster's current resourceVersion (what a consistent list answers now).
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().unwrap().rv
    }

    /// Watches answered 410 Gone so far.
    pub fn gone_responses(&self) -> u64 {
        self.inner.lock().unwrap().gone
    }

    /// Requests answered with an error so far.
    pub fn failed_requests(&self) -> u64 {
        self.inner.lock().unwrap().failed_requests
    }

    /// Every request so far, as the RBAC authorizer saw it (also those answered with an error).
    pub fn calls(&self) -> BTreeSet<ApiCall> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// The Lease `namespace/name` as the server has it now, if it exists.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.inner
            .lock()
            .unwrap()
            .leases
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }
}

pub(super) fn json_response(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(value).unwrap(),
    )
        .into_response()
}

async fn handle(
    State(state): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let call = ApiCall::of(&method, uri.path(), watch);
    let mut inner = state.lock().unwrap();
    // The authorizer sees every request, whatever its answer.
    inner.calls.insert(call.clone());
    if inner.failing {
        inner.failed_requests += 1;
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status(500, "InternalError", "injected failure"),
        );
    }
    if call.api_group == lease::GROUP && call.resource == "leases" {
        return lease::handle(&mut inner, &method, &call, &body);
    }
    let kind = Kind::ALL.into_iter().find(|k| k.path() == uri.path());
    let Some(kind) = kind.filter(|_| method == Method::GET) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                &format!("no route {method} {}", uri.path()),
            ),
        );
    };
    if inner.failing_watches {
        inner.failed_requests += 1;
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status(500, "InternalError", "injected failure"),
        );
    }
    let current = inner.rv;
    if watch {
        return watch_response(&state, &mut inner, kind, &query, current);
    }
    list_response(&mut inner, kind, &query, current)
}

/// A query parameter parsed as a number; absent or unparseable is `None` (as kube-apiserver,
/// which rejects some of these with 400; clients here never send bad ones).
fn number(query: &HashMap<String, String>, name: &str) -> Option<u64> {
    query.get(name).and_then(|v| v.parse().ok())
}

/// `?watch=true`: replays events after `resourceVersion`, a BOOKMARK, then live events; ends at
/// `timeoutSeconds`, with a BOOKMARK 2 s before (and one every minute), as kube-apiserver's watch
/// cache does. Everything written to the stream goes through its lag.
fn watch_response(
    state: &Arc<Mutex<Inner>>,
    inner: &mut Inner,
    kind: Kind,
    query: &HashMap<String, String>,
    current: u64,
) -> Response {
    let from = number(query, "resourceVersion").unwrap_or(current);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let deadline = number(query, "timeoutSeconds")
        .filter(|&t| t > 0)
        .map(|t| Instant::now() + Duration::from_secs(t));
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let Inner {
        collections,
        lag,
        gone: gone_responses,
        ..
    } = inner;
    let collection = collections.entry(kind).or_default();
    let mut send = |line: Bytes| {
        let _ = tx.send((Instant::now() + lag.delay(), line));
    };
    if from < collection.compacted {
        *gone_responses += 1;
        let gone = status(
            410,
            "Expired",
            &format!(
                "too old resource version: {from} ({})",
                collection.compacted
            ),
        );
        send(line(&json!({"type": "ERROR", "object": gone})));
    } else {
        for (_, event) in collection.events.iter().filter(|(rv, _)| *rv > from) {
            send(event.clone());
        }
        if bookmarks {
            send(bookmark(kind, current));
            tokio::spawn(timed_bookmarks(
                Arc::clone(state),
                kind,
                tx.downgrade(),
                deadline,
            ));
        }
        collection.watchers.push(Watcher { tx });
    }
    // Each message waits for its time (and so for every message ahead of it); the stream ends
    // at the deadline, dropping what is still queued (the client resumes from what it saw).
    let body = futures::stream::unfold(rx, move |mut rx| async move {
        let next = async {
            let (due, line) = rx.recv().await?;
            tokio::time::sleep_until(due).await;
            Some(line)
        };
        let line = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, next).await.ok()??,
            None => next.await?,
        };
        Some((Ok::<_, Infallible>(line), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(body))
        .unwrap()
}

/// A BOOKMARK at `rv` for a watch of `kind`.
fn bookmark(kind: Kind, rv: u64) -> Bytes {
    line(&json!({"type": "BOOKMARK", "object": {
        "apiVersion": kind.api_version(), "kind": kind.kind(),
        "metadata": {"resourceVersion": rv.to_string()},
    }}))
}

/// kube-apiserver's periodic bookmarks (`cacheWatcher.nextBookmarkTime`): the next one at the
/// earlier of a minute from now and 2 s before the watch's deadline, none once that is past.
/// Each carries the version current when it is sent, after every event written before it. The
/// sender is weak: a watch cut by the server (its watcher dropped) ends at once.
async fn timed_bookmarks(
    state: Arc<Mutex<Inner>>,
    kind: Kind,
    tx: mpsc::WeakUnboundedSender<(Instant, Bytes)>,
    deadline: Option<Instant>,
) {
    const EVERY: Duration = Duration::from_secs(60);
    loop {
        let now = Instant::now();
        let (at, last) = match deadline.map(|d| d.checked_sub(Duration::from_secs(2))) {
            None => (now + EVERY, false),
            Some(Some(pre)) if pre >= now => match pre <= now + EVERY {
                true => (pre, true),
                false => (now + EVERY, false),
            },
            Some(_) => return,
        };
        tokio::time::sleep_until(at).await;
        {
            let mut inner = state.lock().unwrap();
            let Some(tx) = tx.upgrade() else { return };
            let rv = inner.rv;
            let due = Instant::now() + inner.lag.delay();
            if tx.send((due, bookmark(kind, rv))).is_err() {
                return;
            }
        }
        if last {
            return;
        }
    }
}

/// A list: every object (consistent, at the current version), or with `limit` a page of them
/// and a `continue` token whose next pages come from the same snapshot.
fn list_response(
    inner: &mut Inner,
    kind: Kind,
    query: &HashMap<String, String>,
    current: u64,
) -> Response {
    let limit = number(query, "limit")
        .filter(|&l| l > 0)
        .map(|l| l as usize);
    let (rv, mut rest) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let Some(pos) = inner.snapshots.iter().position(|(t, _)| t == token) else {
                return json_response(
                    StatusCode::GONE,
                    &status(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent \
                         list result. You can start a new list without the continue parameter.",
                    ),
                );
            };
            let (_, snapshot) = inner.snapshots.remove(pos).expect("found");
            (snapshot.rv, snapshot.rest)
        }
        None => (
            current,
            inner
                .collections
                .entry(kind)
                .or_default()
                .objects
                .values()
                .cloned()
                .collect(),
        ),
    };
    let page: Vec<Arc<Value>> = match limit {
        Some(limit) => rest.drain(..limit.min(rest.len())).collect(),
        None => rest.drain(..).collect(),
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if !rest.is_empty() {
        inner.next_snapshot += 1;
        let token = format!("{}-{}-{}", kind.kind(), rv, inner.next_snapshot);
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(rest.len());
        if inner.snapshots.len() == SNAPSHOTS {
            inner.snapshots.pop_front();
        }
        inner.snapshots.push_back((token, Snapshot { rv, rest }));
    }
    let items: Vec<&Value> = page.iter().map(|o| o.as_ref()).collect();
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.kind()),
            "metadata": metadata,
            "items": items,
        }),
    )
}
