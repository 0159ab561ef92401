//! Leader election against the test API server (real HTTP, the real `kube` client), in process:
//! the Lease's optimistic concurrency as kube-apiserver answers it, who acquires when (timed
//! with the observer's clock), release, the fence, and the exact API calls a candidate makes.
use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use flowlog_kubernetes::election::{
    Attempt, ElectionConfig, Elector, LeaseLock, Lost, spawn_fence,
};
use flowlog_testkit::kubernetes::{ApiCall, ApiServer};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, api::PostParams};

const NS: &str = "flowlog";
const NAME: &str = "flowlog-inventory";
/// The shortest lease allowed: renew every 1 s, renew deadline 2 s, retry every 0.4 s.
const DURATION: Duration = Duration::from_secs(3);

fn client(server: &ApiServer) -> Client {
    Client::try_from(kube::Config::new(server.url.parse().unwrap())).unwrap()
}

fn config(identity: &str) -> ElectionConfig {
    ElectionConfig::new(NS, NAME, identity, DURATION).unwrap()
}

fn holder(server: &ApiServer) -> (Option<String>, i64) {
    let lease = server.lease(NS, NAME).expect("the Lease exists");
    (
        lease["spec"]["holderIdentity"].as_str().map(String::from),
        lease["spec"]["leaseTransitions"].as_i64().unwrap(),
    )
}

#[test]
fn durations_are_whole_seconds_of_at_least_three() {
    assert!(ElectionConfig::new(NS, NAME, "a", Duration::from_millis(2500)).is_err());
    assert!(ElectionConfig::new(NS, NAME, "a", Duration::from_secs(2)).is_err());
    let c = ElectionConfig::new(NS, NAME, "a", Duration::from_secs(15)).unwrap();
    // client-go's defaults for a 15 s lease: renew deadline 10 s, retry period 2 s.
    assert_eq!(c.renew_deadline(), Duration::from_secs(10));
    assert_eq!(c.retry_period(), Duration::from_secs(2));
    assert_eq!(c.renew_period(), Duration::from_secs(5));
}

/// The server's optimistic concurrency, through the `kube` client: create once, then an update
/// carrying a stale `resourceVersion` is refused with 409 Conflict.
#[tokio::test]
async fn the_server_refuses_stale_updates_and_second_creates() {
    let server = ApiServer::start().await;
    let api: Api<Lease> = Api::namespaced(client(&server), NS);
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": NAME},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 3},
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &lease).await.unwrap();
    let again = api
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert!(
        matches!(&again, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{again:?}"
    );
    let mut first = created.clone();
    first.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let updated = api
        .replace(NAME, &PostParams::default(), &first)
        .await
        .unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );
    // The same stale version again: someone else wrote in between.
    let mut second = created.clone();
    second.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let stale = api
        .replace(NAME, &PostParams::default(), &second)
        .await
        .unwrap_err();
    assert!(
        matches!(&stale, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
        "{stale:?}"
    );
    assert_eq!(
        server.lease(NS, NAME).unwrap()["spec"]["holderIdentity"],
        "b"
    );
    let missing = api.get("nothing").await.unwrap_err();
    assert!(
        matches!(&missing, kube::Error::Api(s) if s.code == 404),
        "{missing:?}"
    );
}

/// A creates and holds the Lease; B sees it held and would wait a whole lease duration from its
/// own first look; once A stops renewing, B takes it no sooner than that, and no later than a
/// retry period after; A's release hands it over at B's next round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_after_expiry_by_its_own_clock_or_at_once_on_release() {
    let server = ApiServer::start().await;
    let mut a = LeaseLock::new(client(&server), config("a"));
    let mut b = LeaseLock::new(client(&server), config("b"));
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Held);
    assert_eq!(holder(&server), (Some("a".into()), 0));
    let first_look = Instant::now();
    match b.try_acquire_or_renew().await.unwrap() {
        Attempt::HeldBy { holder, wait } => {
            assert_eq!(holder, "a");
            assert!(
                wait > DURATION - Duration::from_millis(200) && wait <= DURATION,
                "{wait:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A renews: B's clock starts again from its next look.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Held);
    let mut standby = Elector::new(client(&server), config("b"));
    let renewed_seen = Instant::now();
    let term = tokio::time::timeout(Duration::from_secs(10), standby.acquire())
        .await
        .expect("b acquires within 10 s");
    let took = renewed_seen.elapsed();
    assert!(
        took >= DURATION
            && took <= DURATION + config("b").retry_period() + Duration::from_millis(500),
        "b took the Lease {took:?} after it saw a's renewal"
    );
    assert!(first_look.elapsed() > DURATION + Duration::from_millis(1500));
    assert_eq!(holder(&server), (Some("b".into()), 1));
    assert!(term.deadline() > Instant::now());

    // A is a candidate again and sees b; b releases; a takes it at its next round.
    let mut candidate = Elector::new(client(&server), config("a"));
    let waiting = tokio::spawn(async move {
        let term = candidate.acquire().await;
        (Instant::now(), term)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a took a Lease that b holds");
    let released = Instant::now();
    assert!(standby.release().await.unwrap());
    term.retire();
    let (acquired, _term) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    let handover = acquired - released;
    assert!(
        handover <= config("a").retry_period() + Duration::from_millis(300),
        "{handover:?}"
    );
    assert_eq!(holder(&server), (Some("a".into()), 2));

    // Exactly the verbs of tryAcquireOrRenew and release, on the one Lease in its namespace.
    let lease_call = |verb: &str, name: Option<&str>| ApiCall {
        verb: verb.to_string(),
        api_group: "coordination.k8s.io".to_string(),
        resource: "leases".to_string(),
        namespace: Some(NS.to_string()),
        name: name.map(String::from),
    };
    assert_eq!(
        server.calls(),
        BTreeSet::from([
            lease_call("get", Some(NAME)),
            lease_call("create", None),
            lease_call("update", Some(NAME)),
        ])
    );
}

/// A leader whose renewals fail (the API server answers 500) loses its term at the renew
/// deadline, counted from the start of its last successful renewal: the fence fires then, and
/// `hold` reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_fires_at_the_renew_deadline_when_renewals_fail() {
    let server = ApiServer::start().await;
    let mut leader = Elector::new(client(&server), config("a"));
    let term = leader.acquire().await;
    let fired = Arc::new(AtomicBool::new(false));
    let fence = spawn_fence(term.clone(), {
        let fired = Arc::clone(&fired);
        move || fired.store(true, Ordering::SeqCst)
    })
    .unwrap();
    let holding = tokio::spawn({
        let term = term.clone();
        async move { leader.hold(&term).await }
    });
    // Two renewals succeed, then every request fails.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    server.set_failing(true);
    let failing_since = Instant::now();
    let deadline = term.deadline();
    assert!(!fired.load(Ordering::SeqCst));
    let lost = tokio::time::timeout(Duration::from_secs(5), holding)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lost, Lost::Deadline);
    fence.join().unwrap();
    assert!(fired.load(Ordering::SeqCst));
    let after = failing_since.elapsed();
    // The last success started at most a renew period before the failures began.
    assert!(
        after <= config("a").renew_deadline() + Duration::from_millis(300),
        "{after:?}"
    );
    assert!(Instant::now() >= deadline);
}
