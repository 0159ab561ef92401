//! `flowlog-inventory --leader-election` with real processes: replicas of the binary elect a
//! leader on a Lease of the test Kubernetes API server (`flowlog_testkit::kubernetes`, which
//! serves the Leases and the pods they watch), and publish to an ownership topic of the test's
//! own on the real broker. Checked from outside: the topic's messages (one publisher: one tenure
//! per owner), each replica's `/metrics` and `/readyz`, the Lease's fields, and the times of
//! every handover against the bounds the election's design gives (lease duration D = 3 s: the
//! leader renews every 1 s and stops 2 s after the start of its last successful renewal;
//! standbys look every 0.4 s).
mod inventory_support;

use std::{
    thread,
    time::{Duration, Instant},
};

use flowlog_testkit::{Topic, kubernetes::ApiServer, kubernetes::Kind};
use inventory_support::*;

/// What a loaded 2-core test machine may add to a bound: process scheduling, a request or two.
const SLACK: Duration = Duration::from_millis(1500);

fn owners() -> Vec<String> {
    vec![
        pod_owner("web-1", "10.1.0.1"),
        pod_owner("web-2", "10.1.0.2"),
        pod_owner("db-1", "10.1.0.3"),
        "node/node-uid/192.0.2.1".to_string(),
    ]
}

fn server() -> (tokio::runtime::Runtime, ApiServer) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(ApiServer::start());
    cluster(&server);
    (runtime, server)
}

fn sigterm(replica: &Replica) {
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(replica.child.0.id() as libc::pid_t, libc::SIGTERM) };
}

/// Waits for `replica` to exit; returns when (after `since`) and its exit code.
fn exited(replica: &mut Replica, since: Instant, limit: Duration) -> (Duration, Option<i32>) {
    loop {
        if let Some(status) = replica.child.0.try_wait().unwrap() {
            return (since.elapsed(), status.code());
        }
        assert!(
            since.elapsed() < limit,
            "{} did not exit within {limit:?}",
            replica.identity
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn one_replica_publishes_and_a_standby_takes_over_after_kill_and_sigterm() {
    let topic = Topic::create("lease-ownership", 1);
    let (_runtime, server) = server();
    let mut a = replica(&server, &topic, "inventory-a", "publishing ownership");
    let b = replica(
        &server,
        &topic,
        "inventory-b",
        "standing by: the Lease is held",
    );
    assert_eq!(lease(&server), (Some("inventory-a".to_string()), 0));

    // One publisher: the leader's first complete view, every owner once.
    let tenures = read_tenures(&topic, |t| owners().iter().all(|o| open(t, o)));
    assert_eq!(
        tenures.keys().cloned().collect::<Vec<_>>(),
        {
            let mut o = owners();
            o.sort();
            o
        },
        "exactly the cluster's owners"
    );
    assert_one_tenure_each(&tenures);
    wait_for(PATIENT, "the leader's /readyz", || {
        get(&a.metrics, "/readyz").0 == 200
    });
    assert_eq!(get(&b.metrics, "/readyz"), (200, "ok\n".to_string()));
    assert_eq!(get(&a.metrics, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(metric(&a.metrics, "flowlog_inventory_leader"), Some(1.0));
    assert_eq!(
        metric(&a.metrics, "flowlog_inventory_leader_transitions_total"),
        Some(1.0)
    );
    assert!(metric(&a.metrics, "flowlog_inventory_published_total").unwrap() >= 5.0);
    assert_eq!(metric(&b.metrics, "flowlog_inventory_leader"), Some(0.0));
    assert_eq!(
        metric(&b.metrics, "flowlog_inventory_published_total"),
        None,
        "the standby published"
    );
    assert_eq!(
        metric(&b.metrics, "flowlog_inventory_leader_transitions_total"),
        None
    );

    // kill -9 the leader; a pod goes away while nobody leads.
    a.child.0.kill().unwrap();
    let killed = Instant::now();
    a.child.0.wait().unwrap();
    let gone_at = server.delete(Kind::Pod, "shop", "web-2");
    wait_for(PATIENT, "the standby takes the Lease", || {
        holder_is(&server, "inventory-b")
    });
    let takeover = killed.elapsed();
    eprintln!("takeover after kill -9 of the leader: {takeover:?}");
    // Not before the lease expired by the standby's clock (the leader's last renewal was at most
    // a renew period before the kill), and at most a retry period after it expired.
    assert!(
        takeover >= DURATION - RENEW_PERIOD - Duration::from_millis(50),
        "{takeover:?}"
    );
    assert!(takeover <= DURATION + RETRY_PERIOD + SLACK, "{takeover:?}");
    assert_eq!(lease(&server), (Some("inventory-b".to_string()), 1));

    // The new leader publishes what changed after the kill, and closes what went meanwhile.
    let added = pod_owner("web-3", "10.1.0.4");
    add_pod(&server, "web-3", "10.1.0.4");
    let db_gone_at = server.delete(Kind::Pod, "shop", "db-1");
    let (web2, db1) = (
        pod_owner("web-2", "10.1.0.2"),
        pod_owner("db-1", "10.1.0.3"),
    );
    let tenures = read_tenures(&topic, |t| {
        open(t, &added) && closed_at(t, &web2).is_some() && closed_at(t, &db1).is_some()
    });
    assert!(closed_at(&tenures, &web2).unwrap() >= gone_at);
    assert!(closed_at(&tenures, &db1).unwrap() >= db_gone_at);
    assert!(open(&tenures, &pod_owner("web-1", "10.1.0.1")));
    assert_one_tenure_each(&tenures);
    wait_for(PATIENT, "the new leader's /readyz", || {
        get(&b.metrics, "/readyz").0 == 200
    });
    assert_eq!(metric(&b.metrics, "flowlog_inventory_leader"), Some(1.0));
    assert_eq!(
        metric(&b.metrics, "flowlog_inventory_leader_transitions_total"),
        Some(1.0)
    );

    // The killed replica comes back (same identity) as a standby; SIGTERM of the leader hands
    // the Lease over at the standby's next look, well before it could have expired.
    let a = replica(
        &server,
        &topic,
        "inventory-a",
        "standing by: the Lease is held",
    );
    let mut b = b;
    sigterm(&b);
    let terminated = Instant::now();
    wait_for(PATIENT, "the standby takes the released Lease", || {
        holder_is(&server, "inventory-a")
    });
    let handover = terminated.elapsed();
    eprintln!("takeover after SIGTERM of the leader: {handover:?}");
    assert!(
        handover < DURATION - RENEW_PERIOD,
        "{handover:?}: as slow as an expiry, the Lease was not released"
    );
    let (_, code) = exited(&mut b, terminated, Duration::from_secs(10));
    assert_eq!(code, Some(0), "the leader's exit after SIGTERM");
    assert_eq!(lease(&server), (Some("inventory-a".to_string()), 2));
    let last = pod_owner("web-4", "10.1.0.5");
    add_pod(&server, "web-4", "10.1.0.5");
    let tenures = read_tenures(&topic, |t| open(t, &last));
    assert_one_tenure_each(&tenures);
    assert_eq!(metric(&a.metrics, "flowlog_inventory_leader"), Some(1.0));
}

#[test]
fn a_leader_that_cannot_renew_stops_before_a_standby_can_take_over() {
    let topic = Topic::create("lease-fence", 1);
    let (_runtime, server) = server();
    // A leader whose source cannot list is not ready, and says why.
    server.set_failing_watches(true);
    let mut a = replica(&server, &topic, "inventory-a", "publishing ownership");
    let b = replica(
        &server,
        &topic,
        "inventory-b",
        "standing by: the Lease is held",
    );
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        get(&a.metrics, "/readyz"),
        (
            503,
            "publishing: not yet (needed at least every 60.0 s)\n\
             sources: waiting for the first complete view of kubernetes\n"
                .to_string()
        )
    );
    assert_eq!(get(&a.metrics, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(&b.metrics, "/readyz"), (200, "ok\n".to_string()));
    server.set_failing_watches(false);
    wait_for(PATIENT, "the leader's /readyz", || {
        get(&a.metrics, "/readyz").0 == 200
    });

    // Every API request fails: the leader's renewals, the standby's looks.
    server.set_failing(true);
    let failing = Instant::now();
    let (a_exit, code) = exited(&mut a, failing, Duration::from_secs(10));
    server.set_failing(false);
    eprintln!("the leader stopped {a_exit:?} after the API server began failing");
    assert_eq!(code, Some(1), "a leader that lost its Lease exits 1");
    // Its last successful renewal started at most a renew period before the failures.
    assert!(
        a_exit <= RENEW_DEADLINE + Duration::from_millis(300),
        "{a_exit:?}"
    );
    wait_for(PATIENT, "the standby takes the Lease", || {
        holder_is(&server, "inventory-b")
    });
    let b_took = failing.elapsed();
    eprintln!("the standby took the Lease {b_took:?} after the API server began failing");
    assert!(
        a_exit < b_took,
        "the leader still ran when the standby took over"
    );
    assert_eq!(lease(&server), (Some("inventory-b".to_string()), 1));

    // A standby that cannot read the Lease is not ready (and the leader stops again).
    let c = replica(
        &server,
        &topic,
        "inventory-c",
        "standing by: the Lease is held",
    );
    wait_for(PATIENT, "the standby's /readyz", || {
        get(&c.metrics, "/readyz").0 == 200
    });
    server.set_failing(true);
    let waited = wait_for(DURATION + SLACK * 2, "the standby's /readyz fails", || {
        get(&c.metrics, "/readyz").0 == 503
    });
    assert!(waited >= DURATION - RETRY_PERIOD, "{waited:?}");
    let (status, body) = get(&c.metrics, "/readyz");
    assert_eq!(status, 503);
    assert!(body.starts_with("lease: last "), "{body}");
    assert_eq!(get(&c.metrics, "/healthz"), (200, "ok\n".to_string()));
    server.set_failing(false);
    wait_for(PATIENT, "the last standby takes the Lease", || {
        holder_is(&server, "inventory-c")
    });
    drop(b);
}
