//! A small Kubernetes list/watch API server for tests: it serves real object JSON for Pods,
//! Services, Nodes and EndpointSlices (all namespaces) the way kube-apiserver does, so that the
//! `kube` client and its watcher run unchanged over HTTP: lists carry `metadata.resourceVersion`;
//! `?watch=true&resourceVersion=N` streams newline-delimited `{"type":…,"object":…}` events after
//! N, then a BOOKMARK, then live events; a watch from a version older than what is kept gets an
//! `ERROR` event with a `Status` of code 410 (Gone), which makes the watcher re-list. The test
//! drives it: objects are added, modified and deleted at moments it controls, watches can be cut
//! with history compacted (so events are lost and a re-list must find out), and every request
//! can be made to fail.
//!
//! It also serves namespaced `coordination.k8s.io/v1` Leases for leader election (get, create,
//! update with optimistic concurrency: see [`lease`]), and records every request as the RBAC
//! authorizer sees it ([`ApiCall`], [`ApiServer::calls`]), so a test can compare what a client did
//! with what a Role grants.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    convert::Infallible,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    serve::ListenerExt,
};
use serde_json::{Value, json};

use super::lease;
use crate::now_ns;
use tokio::sync::mpsc;

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

#[derive(Default)]
struct Collection {
    /// `namespace/name` → object.
    objects: BTreeMap<String, Value>,
    /// Events kept for watches that resume: (resourceVersion, JSON line).
    events: Vec<(u64, Bytes)>,
    /// Events up to this version were dropped: a watch from before it gets 410 Gone.
    compacted: u64,
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
}

impl Collection {
    fn broadcast(&mut self, line: &Bytes) {
        self.watchers.retain(|w| w.send(line.clone()).is_ok());
    }
}

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
        let collection = inner.collections.entry(kind).or_default();
        let key = key_of(&object);
        let kind_of_event = if collection.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let event = line(&json!({"type": kind_of_event, "object": object}));
        collection.objects.insert(key, object);
        collection.events.push((rv, event.clone()));
        collection.broadcast(&event);
        at
    }

    /// Deletes an object (DELETED, carrying its last state); returns when (ns).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        let at = now_ns();
        inner.rv += 1;
        let rv = inner.rv;
        let collection = inner.collections.entry(kind).or_default();
        let mut object = collection
            .objects
            .remove(&format!("{namespace}/{name}"))
            .expect("deleting an object that exists");
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let event = line(&json!({"type": "DELETED", "object": object}));
        collection.events.push((rv, event.clone()));
        collection.broadcast(&event);
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
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let call = ApiCall::of(&method, uri.path(), watch);
    let mut inner = inner.lock().unwrap();
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
    let mut gone_count = 0;
    let collection = inner.collections.entry(kind).or_default();
    if watch {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(current);
        let (tx, rx) = mpsc::unbounded_channel();
        if from < collection.compacted {
            gone_count = 1;
            let gone = status(
                410,
                "Expired",
                &format!(
                    "too old resource version: {from} ({})",
                    collection.compacted
                ),
            );
            tx.send(line(&json!({"type": "ERROR", "object": gone})))
                .unwrap();
        } else {
            for (_, event) in collection.events.iter().filter(|(rv, _)| *rv > from) {
                tx.send(event.clone()).unwrap();
            }
            if query
                .get("allowWatchBookmarks")
                .is_some_and(|b| b == "true")
            {
                let bookmark = json!({"type": "BOOKMARK", "object": {
                    "apiVersion": kind.api_version(), "kind": kind.kind(),
                    "metadata": {"resourceVersion": current.to_string()},
                }});
                tx.send(line(&bookmark)).unwrap();
            }
            collection.watchers.push(tx);
        }
        inner.gone += gone_count;
        let body = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
        });
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(body))
            .unwrap();
    }
    let items: Vec<Value> = collection.objects.values().cloned().collect();
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.kind()),
            "metadata": {"resourceVersion": current.to_string()},
            "items": items,
        }),
    )
}
