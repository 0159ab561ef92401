//! A failing EC2 API, through the source's own run loop: the source reaches moto through a TCP
//! relay that the test stops (the port is then closed: every poll fails) and starts again. While
//! it fails, errors are counted (`flowlog_identity_source_errors_total{source="ec2",kind=
//! "dispatch"}`) and logged once, nothing is closed and no watermark is sent; after it, the
//! source carries on without re-opening what was open. Own test binary: it installs the global
//! metrics recorder.
mod common;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use common::*;
use flowlog_ec2::Ec2Source;
use flowlog_identity::{OwnershipChange, spawn_source};
use flowlog_testkit::LogCapture;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

/// Relays connections from `listen` to `target` until dropped; dropping it closes the port and
/// every relayed connection.
struct Relay {
    tasks: JoinSet<()>,
}

impl Relay {
    async fn start(listen: SocketAddr, target: SocketAddr) -> Self {
        let listener = TcpListener::bind(listen)
            .await
            .expect("bind the relay port");
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { tasks }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// A port nobody listens on (bound, then released).
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `flowlog_identity_source_errors_total{source="ec2"}` by `kind`, summed over snapshots (a
/// snapshot drains the counters).
#[derive(Default)]
struct Errors(BTreeMap<String, u64>);

impl Errors {
    fn add(&mut self, snapshotter: &Snapshotter) {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            if key.name() != "flowlog_identity_source_errors_total"
                || !key
                    .labels()
                    .any(|l| l.key() == "source" && l.value() == "ec2")
            {
                continue;
            }
            let kind = key
                .labels()
                .find(|l| l.key() == "kind")
                .map_or_else(String::new, |l| l.value().to_owned());
            if let DebugValue::Counter(n) = value {
                *self.0.entry(kind).or_default() += n;
            }
        }
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }

    fn kinds(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

#[tokio::test]
async fn a_failing_api_closes_nothing_and_sends_no_watermark() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    let logs = LogCapture::default();
    let subscriber = logs.subscriber();
    // This test's runtime is single-threaded: the source task logs on this thread.
    let _log_guard = tracing::subscriber::set_default(subscriber);

    let endpoint = endpoint();
    let moto = socket_addr(&endpoint);
    let mut fx = Fixture::new(&endpoint, "10.66.0.0/16", "10.66.1.0/24").await;
    let a = fx.instance("10.66.1.10", &[("Name", "steady")]).await;
    let id_a = fx.instance_identity(&a, "steady", &[("Name", "steady")]);

    let relay_addr = free_port();
    let relay = Relay::start(relay_addr, moto).await;
    // One attempt per call, so that each failed poll is one error.
    let client = client(&format!("http://{relay_addr}"), 1).await;
    let source = Ec2Source::new(
        client,
        flowlog_ec2::Ec2Settings {
            interval: Duration::from_millis(100),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            ..settings(&fx.vpc)
        },
    );
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let task = spawn_source(Box::new(source), tx, shutdown.clone());

    // A good poll: the instance opens, then a watermark.
    let open_change = rx.recv().await.unwrap();
    let OwnershipChange::Open {
        at_ns: opened_at, ..
    } = open_change
    else {
        panic!("expected an Open first, got {open_change:?}");
    };
    assert_eq!(
        open_change,
        open(
            &format!("eni/{}/{}", a.eni, a.id),
            "10.66.1.10/32",
            &id_a,
            opened_at
        )
    );
    assert_eq!(rx.recv().await.unwrap(), watermark(opened_at));

    // The API goes away: polls fail until at least three have been counted.
    drop(relay);
    let mut errors = Errors::default();
    while errors.total() < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        errors.add(&snapshotter);
    }
    // Whatever else the source did while failing, it sent nothing: no Close, no watermark
    // (changes sent after a poll are in the channel before the next poll starts).
    assert_eq!(rx.try_recv().ok(), None);
    // One kind (connection refused is a dispatch failure), logged once.
    assert_eq!(errors.kinds(), vec!["dispatch"]);
    assert_eq!(logs.lines_containing("inventory source failing"), 1);
    // The log line carries the whole chain down to the refused connection, not only the
    // SDK's "dispatch failure".
    let failing = logs.text();
    let failing = failing
        .lines()
        .find(|l| l.contains("inventory source failing"))
        .unwrap();
    assert!(
        failing.contains("dispatch failure") && failing.contains("Connection refused"),
        "{failing}"
    );

    // Back: the next good poll sends only a watermark (nothing re-opened, nothing closed).
    let _relay = Relay::start(relay_addr, moto).await;
    let next = rx.recv().await.unwrap();
    let OwnershipChange::Watermark { at_ns, .. } = next else {
        panic!("expected only a watermark after recovery, got {next:?}");
    };
    assert!(at_ns > opened_at);
    assert_eq!(logs.lines_containing("inventory source recovered"), 1);
    assert_eq!(logs.lines_containing("inventory source failing"), 1);

    shutdown.cancel();
    task.await.unwrap().unwrap();
}
