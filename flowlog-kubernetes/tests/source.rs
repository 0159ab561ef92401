//! The Kubernetes source against a list/watch server over HTTP, through the real `kube` client
//! and watcher: exact identities and the exact sequence of Opens and Closes for a pod's life,
//! address reuse, terminal phases, host-network pods, services, nodes, a re-list after 410 Gone
//! that must find a deletion it never saw, and the watermark's stall and recovery while the
//! server fails.
mod support;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use flowlog_identity::OwnershipChange;
use flowlog_record::{Attribution, Identity, IdentityKind, Workload};
use flowlog_testkit::kubernetes::{ApiServer, Kind, PodSpec, node, pod, service};
use serde_json::json;
use support::{briefs, fast_settings, identity_of, is_tenure_change, start};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn at(change: &OwnershipChange) -> u64 {
    change.at_ns()
}

/// A pod's life: Pending without an address (nothing), Running with one (one Open with the
/// exact identity: its Deployment found through its ReplicaSet, its node's zone), terminating (nothing: it still
/// holds the address), DELETED (the Close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lifecycle_opens_once_and_closes_on_delete() {
    let server = ApiServer::start().await;
    server.apply(
        Kind::Node,
        node("node-1", "n1", "192.0.2.10", None, "eu-west-1a"),
    );
    let mut source = start(&server, fast_settings());
    assert_eq!(
        briefs(&source.ready().await),
        ["open node/n1/192.0.2.10 192.0.2.10/32 node-1"]
    );
    let mut spec = PodSpec {
        namespace: "shop",
        name: "web-7c9d8f6b5-x2k4p",
        uid: "u-web",
        labels: json!({"app": "web", "pod-template-hash": "7c9d8f6b5", "team": "payments", "ignored": "x"}),
        owner: Some(("ReplicaSet", "web-7c9d8f6b5")),
        ..PodSpec::default()
    };
    server.apply(Kind::Pod, pod(&spec));
    spec.ip = Some("10.244.1.7");
    spec.phase = "Running";
    let assigned = server.apply(Kind::Pod, pod(&spec));
    let opened = source.changes(1).await;
    assert_eq!(
        briefs(&opened),
        ["open pod/u-web/10.244.1.7 10.244.1.7/32 shop/web-7c9d8f6b5-x2k4p"]
    );
    assert!(at(&opened[0]) >= assigned, "opened at its arrival");
    assert_eq!(
        *identity_of(&opened[0]),
        Identity {
            kind: IdentityKind::Pod,
            name: "web-7c9d8f6b5-x2k4p".into(),
            namespace: Some("shop".into()),
            workload: Some(Workload {
                kind: "Deployment".into(),
                name: "web".into()
            }),
            labels: labels(&[("app", "web"), ("team", "payments")]),
            node: Some("node-1".into()),
            zone: Some("eu-west-1a".into()),
            region: Some("eu-west-1".into()),
            pod_uid: Some("u-web".into()),
            source: "kubernetes".into(),
            ..Identity::default()
        }
    );
    spec.deleting = true;
    server.apply(Kind::Pod, pod(&spec));
    let deleted = server.delete(Kind::Pod, "shop", "web-7c9d8f6b5-x2k4p");
    let closed = source.changes(1).await;
    assert_eq!(
        briefs(&closed),
        ["close pod/u-web/10.244.1.7 10.244.1.7/32"]
    );
    // The DELETED event says the pod is gone, not when: the Close is dated no later than the
    // delete, with a span past it in which the pod may still have held the address.
    assert!(at(&closed[0]) <= deleted, "closed no later than the delete");
    let (_, until) = source.span_at("pod/u-web/10.244.1.7", at(&closed[0])).await;
    assert!(
        until >= deleted,
        "may have held it until the delete: {:?}",
        source.all
    );
    // A bare ReplicaSet (no pod-template-hash convention) and a StatefulSet name themselves.
    server.apply(
        Kind::Pod,
        pod(&PodSpec {
            name: "db-0",
            uid: "u-db",
            ip: Some("10.244.1.8"),
            phase: "Running",
            owner: Some(("StatefulSet", "db")),
            ..PodSpec::default()
        }),
    );
    server.apply(
        Kind::Pod,
        pod(&PodSpec {
            name: "batch-abc",
            uid: "u-rs",
            ip: Some("10.244.1.9"),
            phase: "Running",
            labels: json!({"pod-template-hash": "zzz"}),
            owner: Some(("ReplicaSet", "batch")),
            ..PodSpec::default()
        }),
    );
    let workloads: Vec<_> = source
        .changes(2)
        .await
        .iter()
        .map(|c| identity_of(c).workload.clone().unwrap())
        .collect();
    assert_eq!(
        workloads,
        [
            Workload {
                kind: "StatefulSet".into(),
                name: "db".into()
            },
            Workload {
                kind: "ReplicaSet".into(),
                name: "batch".into()
            },
        ]
    );
}

/// Pod A deleted, pod B given the same address a second later: looked up in the index, flows
/// before the switch are A's, after it B's, in between nobody's, and never ambiguous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_address_goes_to_the_owner_of_the_time() {
    let server = ApiServer::start().await;
    let mut source = start(&server, fast_settings());
    assert_eq!(source.ready().await, []);
    let a = PodSpec {
        name: "a",
        uid: "u-a",
        ip: Some("10.244.2.5"),
        phase: "Running",
        ..PodSpec::default()
    };
    let a_added = server.apply(Kind::Pod, pod(&a));
    source.changes(1).await;
    let a_deleted = server.delete(Kind::Pod, "default", "a");
    source.changes(1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b_added = server.apply(
        Kind::Pod,
        pod(&PodSpec {
            name: "b",
            uid: "u-b",
            ..a
        }),
    );
    let last = source.changes(1).await;
    assert_eq!(
        briefs(
            &source
                .all
                .iter()
                .filter(|c| is_tenure_change(c))
                .cloned()
                .collect::<Vec<_>>()
        ),
        [
            "open pod/u-a/10.244.2.5 10.244.2.5/32 default/a",
            "close pod/u-a/10.244.2.5 10.244.2.5/32",
            "open pod/u-b/10.244.2.5 10.244.2.5/32 default/b",
        ]
    );
    let b_open = at(&last[0]);
    let index = source.index();
    let addr = "10.244.2.5".parse().unwrap();
    let names = |t: u64| {
        let e = index.lookup(addr, t);
        let names: Vec<String> = match e.status {
            Attribution::Ambiguous => e.candidates.clone(),
            _ => e.identity.iter().map(|i| i.name.clone()).collect(),
        };
        (e.status, names)
    };
    // Every millisecond from A's start to a second after B's: exactly the owner of the time
    // (A up to its deletion, B from its creation) or nobody in between — or, within a probe
    // interval (100 ms) and a round trip of a change, ambiguous among candidates that include
    // the owner of the time. Never the wrong owner, never unknown while a pod held it.
    let end = b_open + 1_000_000_000;
    let near = |t: u64| {
        [a_added, a_deleted, b_added]
            .iter()
            .any(|&c| t.abs_diff(c) <= 300_000_000)
    };
    let mut t = a_added;
    let mut ambiguous = 0;
    while t < end {
        let truth = if t < a_deleted {
            Some("a")
        } else if t >= b_added {
            Some("b")
        } else {
            None
        };
        match names(t) {
            (Attribution::Exact, got) => assert_eq!(got, [truth.unwrap_or("none")], "at {t}"),
            (Attribution::Unknown, _) => assert_eq!(truth, None, "unknown at {t}"),
            (Attribution::Ambiguous, got) => {
                ambiguous += 1;
                assert!(near(t), "ambiguous at {t}, far from every change");
                if let Some(truth) = truth {
                    let truth = format!("default/{truth}");
                    assert!(got.contains(&truth), "at {t}: {got:?}");
                }
            }
        }
        t += 1_000_000;
    }
    assert!(
        ambiguous > 0,
        "a pod's changes are known only to within a probe interval"
    );
    assert_eq!(names(b_open), (Attribution::Exact, vec!["b".to_owned()]));
    assert_eq!(
        names(a_deleted + (b_added - a_deleted) / 2),
        (Attribution::Unknown, vec![]),
        "nobody in the second between"
    );
}

/// A pod that completes releases its address though the object stays; a host-network pod
/// makes no pod interval (its address is its node's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_phase_closes_and_host_network_is_the_node() {
    let server = ApiServer::start().await;
    server.apply(
        Kind::Node,
        node("node-1", "n1", "192.0.2.10", None, "eu-west-1a"),
    );
    let mut source = start(&server, fast_settings());
    assert_eq!(source.ready().await.len(), 1, "the node");
    let mut job = PodSpec {
        name: "job-x",
        uid: "u-job",
        ip: Some("10.244.3.3"),
        phase: "Running",
        owner: Some(("Job", "job")),
        ..PodSpec::default()
    };
    server.apply(Kind::Pod, pod(&job));
    server.apply(
        Kind::Pod,
        pod(&PodSpec {
            name: "agent",
            uid: "u-agent",
            ip: Some("192.0.2.10"),
            phase: "Running",
            host_network: true,
            owner: Some(("DaemonSet", "agent")),
            ..PodSpec::default()
        }),
    );
    job.phase = "Succeeded";
    server.apply(Kind::Pod, pod(&job));
    // A marker, so that anything the host-network pod caused would show before it.
    server.apply(
        Kind::Pod,
        pod(&PodSpec {
            name: "marker",
            uid: "u-m",
            ip: Some("10.244.3.4"),
            phase: "Running",
            ..PodSpec::default()
        }),
    );
    assert_eq!(
        briefs(&source.changes(3).await),
        [
            "open pod/u-job/10.244.3.3 10.244.3.3/32 default/job-x",
            "close pod/u-job/10.244.3.3 10.244.3.3/32",
            "open pod/u-m/10.244.3.4 10.244.3.4/32 default/marker",
        ]
    );
    let index = source.index();
    let now = flowlog_identity::now_ns();
    let at_node = index.lookup("192.0.2.10".parse().unwrap(), now);
    assert_eq!(at_node.status, Attribution::Exact);
    assert_eq!(at_node.identity.unwrap().kind, IdentityKind::Node);
}

/// Service cluster IPs (v4 and v6; headless ones skipped), node addresses with zone and
/// region, and a hand-kept endpoint outside the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_nodes_and_hand_kept_endpoints() {
    let server = ApiServer::start().await;
    server.apply(
        Kind::Service,
        service("shop", "web", "s-web", &["10.96.0.20", "fd00:10:96::20"]),
    );
    server.apply(Kind::Service, service("shop", "headless", "s-h", &["None"]));
    server.apply(
        Kind::Node,
        node(
            "node-2",
            "n2",
            "192.0.2.11",
            Some("203.0.113.11"),
            "eu-west-1b",
        ),
    );
    server.apply(
        Kind::EndpointSlice,
        json!({
            "metadata": {"name": "db-abc", "namespace": "shop", "uid": "es-db",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["198.51.100.7"], "conditions": {"ready": true}},
                {"addresses": ["10.244.9.9"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "name": "db-0", "namespace": "shop", "uid": "p"}},
            ],
        }),
    );
    let mut source = start(&server, fast_settings());
    let mut got = source.ready().await;
    got.sort_by_key(|c| briefs(std::slice::from_ref(c)));
    assert_eq!(
        briefs(&got),
        [
            "open endpointslice/es-db/198.51.100.7 198.51.100.7/32 shop/db",
            "open node/n2/192.0.2.11 192.0.2.11/32 node-2",
            "open node/n2/203.0.113.11 203.0.113.11/32 node-2",
            "open service/s-web/10.96.0.20 10.96.0.20/32 shop/web",
            "open service/s-web/fd00:10:96::20 fd00:10:96::20/128 shop/web",
        ]
    );
    assert_eq!(
        *identity_of(&got[1]),
        Identity {
            kind: IdentityKind::Node,
            name: "node-2".into(),
            node: Some("node-2".into()),
            zone: Some("eu-west-1b".into()),
            region: Some("eu-west-1".into()),
            source: "kubernetes".into(),
            ..Identity::default()
        }
    );
    assert_eq!(
        *identity_of(&got[3]),
        Identity {
            kind: IdentityKind::Service,
            name: "web".into(),
            namespace: Some("shop".into()),
            labels: labels(&[("app", "web")]),
            source: "kubernetes".into(),
            ..Identity::default()
        }
    );
    assert!(
        Arc::ptr_eq(&identity_of(&got[3]), &identity_of(&got[4])),
        "one identity for both of a service's addresses"
    );
}

/// The watch is cut and a pod deleted while nobody watched, its event compacted away: the
/// resumed watch gets 410 Gone, the watcher re-lists, and the re-list closes the vanished pod
/// without re-opening the pods that are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relist_after_gone_closes_what_vanished_and_reopens_nothing() {
    let server = ApiServer::start().await;
    for (name, uid, ip) in [
        ("p1", "u1", "10.244.4.1"),
        ("p2", "u2", "10.244.4.2"),
        ("p3", "u3", "10.244.4.3"),
    ] {
        server.apply(
            Kind::Pod,
            pod(&PodSpec {
                name,
                uid,
                ip: Some(ip),
                phase: "Running",
                ..PodSpec::default()
            }),
        );
    }
    let mut source = start(&server, fast_settings());
    let first = source.ready().await;
    assert_eq!(first.len(), 3);
    let listed_at = at(&first[0]);
    assert!(
        first.iter().all(|c| at(c) == listed_at),
        "one list, one time"
    );
    let gone_at = server.delete_unseen(Kind::Pod, "default", "p2");
    // A pod added after the re-list marks the end of what the re-list sent.
    let after = source.changes(1).await;
    server.apply(
        Kind::Pod,
        pod(&PodSpec {
            name: "p4",
            uid: "u4",
            ip: Some("10.244.4.4"),
            phase: "Running",
            ..PodSpec::default()
        }),
    );
    let marker = source.changes(1).await;
    assert_eq!(briefs(&after), ["close pod/u2/10.244.4.2 10.244.4.2/32"]);
    // The re-list shows that p2 is gone, not when: its Close is dated no later than that, and
    // the span past it reaches the re-list.
    assert!(at(&after[0]) <= gone_at);
    let (_, until) = source.span_at("pod/u2/10.244.4.2", at(&after[0])).await;
    assert!(until >= gone_at);
    assert_eq!(
        server.gone_responses(),
        1,
        "the resumed watch was told 410 Gone"
    );
    assert_eq!(
        briefs(&marker),
        ["open pod/u4/10.244.4.4 10.244.4.4/32 default/p4"]
    );
    let opens = source
        .all
        .iter()
        .filter(|c| matches!(c, OwnershipChange::Open { .. }))
        .count();
    assert_eq!(opens, 4, "p1..p3 once each, then p4");
    let index = source.index();
    assert_eq!(index.counts().duplicate_opens, 0);
}

/// Watermarks advance while every watch is healthy, stop while the server fails (none is
/// stamped after the source has seen the failure), and resume once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermark_stalls_while_failing_and_recovers() {
    let server = ApiServer::start().await;
    // Retries come every 200 ms at most; a second without one is recovery.
    let mut source = start(&server, fast_settings());
    assert_eq!(source.ready().await, []);
    let w1 = source.watermark_after(0).await;
    let w2 = source.watermark_after(w1 + 1).await;
    assert!(w2 > w1);
    server.set_failing(true);
    // Two failed requests: the watcher retries only after the source has taken the first
    // error from its stream, so by now the source knows.
    let waiting = std::time::Instant::now();
    while server.failed_requests() < 2 {
        assert!(
            waiting.elapsed() < Duration::from_secs(20),
            "the watcher never retried against the failing server"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let known_failing = flowlog_identity::now_ns();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during: Vec<u64> = source
        .drain()
        .iter()
        .map(|c| match c {
            OwnershipChange::Watermark { at_ns, .. } => *at_ns,
            other => panic!("no changes expected, got {other:?}"),
        })
        .collect();
    assert!(
        during.iter().all(|w| *w < known_failing),
        "watermarks after the failure was seen: {during:?} (failing from {known_failing})"
    );
    server.set_failing(false);
    let recovered = flowlog_identity::now_ns();
    let w3 = source.watermark_after(recovered).await;
    assert!(w3 >= recovered);
}

/// A relabelled pod is one owner with a new identity from the change on (earlier flows keep
/// the labels they had); nothing closes, and one interval of the index ends where the next
/// begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relabelled_pod_changes_identity_from_then_on() {
    let server = ApiServer::start().await;
    let mut source = start(&server, fast_settings());
    assert_eq!(source.ready().await, []);
    let mut spec = PodSpec {
        name: "web-0",
        uid: "u-w",
        ip: Some("10.244.5.5"),
        phase: "Running",
        labels: json!({"app": "web", "team": "a"}),
        ..PodSpec::default()
    };
    server.apply(Kind::Pod, pod(&spec));
    let first = source.changes(1).await;
    // Longer than a probe interval: the relabelling's span does not reach back past the Open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    spec.labels = json!({"app": "web", "team": "b"});
    server.apply(Kind::Pod, pod(&spec));
    let second = source.changes(1).await;
    assert_eq!(
        briefs(&[first[0].clone(), second[0].clone()]),
        [
            "open pod/u-w/10.244.5.5 10.244.5.5/32 default/web-0",
            "open pod/u-w/10.244.5.5 10.244.5.5/32 default/web-0",
        ]
    );
    let index = source.index();
    let lookup = |t: u64| index.lookup("10.244.5.5".parse().unwrap(), t);
    let team = |t: u64| {
        let e = lookup(t);
        assert_eq!(e.status, Attribution::Exact, "at {t}");
        e.identity.unwrap().labels["team"].clone()
    };
    // The relabelling is known to within a span before the second Open: either identity there.
    let (since, until) = source.span_at("pod/u-w/10.244.5.5", at(&second[0])).await;
    assert_eq!(until, at(&second[0]));
    assert_eq!(team(since - 1), "a");
    assert_eq!(lookup(since).status, Attribution::Ambiguous);
    assert_eq!(team(at(&second[0])), "b");
}
