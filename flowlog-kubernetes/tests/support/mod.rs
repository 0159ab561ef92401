//! Shared test scaffolding: the list/watch server and object JSON (from
//! `flowlog_testkit::kubernetes`), a kube client of the server, and a collector that runs a [`KubernetesSource`] against the server and reads what
//! it sends.
#![allow(dead_code)] // each test file uses a part

use std::{sync::Arc, time::Duration};

use flowlog_identity::{IdentityIndex, InventorySource, OwnershipChange, spawn_source};
use flowlog_kubernetes::{KubernetesSettings, KubernetesSource};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use flowlog_testkit::kubernetes::ApiServer;

/// Settings with short times, so that failures and recoveries show within a test.
pub fn fast_settings() -> KubernetesSettings {
    KubernetesSettings {
        probe_interval: Duration::from_millis(100),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ..KubernetesSettings::default()
    }
}

/// A `kube` client of `server` (plain HTTP, no auth).
pub fn client(server: &ApiServer) -> kube::Client {
    let config = kube::Config::new(server.url.parse().expect("the server's URL"));
    kube::Client::try_from(config).expect("a kube client")
}

/// Starts a source against `server` into a channel that the returned [`Collector`] reads.
pub fn start(server: &ApiServer, settings: KubernetesSettings) -> Collector {
    let (tx, rx) = mpsc::channel(65_536);
    let shutdown = CancellationToken::new();
    let source: Box<dyn InventorySource> =
        Box::new(KubernetesSource::new(client(server), settings));
    spawn_source(source, tx, shutdown.clone());
    Collector {
        rx,
        shutdown,
        all: Vec::new(),
    }
}

/// What the source sent, kept in order.
pub struct Collector {
    rx: mpsc::Receiver<OwnershipChange>,
    shutdown: CancellationToken,
    /// Every change received so far, watermarks included.
    pub all: Vec<OwnershipChange>,
}

/// Longest wait for something the source must send (generous: failures show as a timeout
/// naming what was awaited, never as a flaky comparison).
const PATIENCE: Duration = Duration::from_secs(20);

impl Collector {
    /// The next change, or a panic naming `what` was awaited once [`PATIENCE`] has passed
    /// since `since` (a deadline for the whole wait: watermarks keep coming meanwhile).
    async fn next(&mut self, since: tokio::time::Instant, what: &str) -> OwnershipChange {
        let change = tokio::time::timeout_at(since + PATIENCE, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("waited {PATIENCE:?} for {what}; received {:?}", self.all))
            .expect("source stopped");
        self.all.push(change.clone());
        change
    }

    /// Receives until `n` more Opens or Closes have come; returns them (watermarks and
    /// uncertain spans skipped: `all` keeps them).
    pub async fn changes(&mut self, n: usize) -> Vec<OwnershipChange> {
        let since = tokio::time::Instant::now();
        let mut got = Vec::new();
        while got.len() < n {
            let change = self.next(since, &format!("{n} changes")).await;
            if is_tenure_change(&change) {
                got.push(change);
            }
        }
        got
    }

    /// Receives until the first watermark, which comes once every kind's first list is
    /// complete: mutations after this are seen as watch events, not folded into a list.
    /// Returns the changes the lists made.
    pub async fn ready(&mut self) -> Vec<OwnershipChange> {
        let since = tokio::time::Instant::now();
        let mut got = Vec::new();
        loop {
            match self.next(since, "the first watermark").await {
                OwnershipChange::Watermark { .. } => return got,
                change if is_tenure_change(&change) => got.push(change),
                _ => {}
            }
        }
    }

    /// Receives until a watermark at or after `at_ns` comes; returns its time.
    pub async fn watermark_after(&mut self, at_ns: u64) -> u64 {
        let since = tokio::time::Instant::now();
        loop {
            match self
                .next(since, &format!("a watermark after {at_ns}"))
                .await
            {
                OwnershipChange::Watermark { at_ns: w, .. } if w >= at_ns => return w,
                OwnershipChange::Watermark { .. } => {}
                other => panic!("expected only watermarks, got {other:?}"),
            }
        }
    }

    /// Receives until a watermark at or after `at_ns` comes; returns its time and the Opens and
    /// Closes that came before it.
    pub async fn changes_until_watermark(&mut self, at_ns: u64) -> (u64, Vec<OwnershipChange>) {
        let since = tokio::time::Instant::now();
        let mut got = Vec::new();
        loop {
            match self
                .next(since, &format!("a watermark after {at_ns}"))
                .await
            {
                OwnershipChange::Watermark { at_ns: w, .. } if w >= at_ns => return (w, got),
                change if is_tenure_change(&change) => got.push(change),
                _ => {}
            }
        }
    }

    /// The uncertain span of `owner` sent with one of its changes at `at_ns`: an Open's (sent
    /// before it, ending at its time: the owner may have held the address since the span's
    /// start) or a Close's (sent after it, starting at its time: it may have held the address
    /// until the span's end). Receives until it has come.
    pub async fn span_at(&mut self, owner: &str, at_ns: u64) -> (u64, u64) {
        let since = tokio::time::Instant::now();
        let mut after_close = false;
        let mut seen = 0;
        loop {
            while seen < self.all.len() {
                match &self.all[seen] {
                    OwnershipChange::Close {
                        owner: o, at_ns: a, ..
                    } if o == owner && *a == at_ns => after_close = true,
                    OwnershipChange::Uncertain {
                        owner: o,
                        from_ns,
                        to_ns,
                        ..
                    } if o == owner
                        && ((after_close && *from_ns == at_ns)
                            || (!after_close && *to_ns == at_ns)) =>
                    {
                        return (*from_ns, *to_ns);
                    }
                    _ => {}
                }
                seen += 1;
            }
            self.next(since, &format!("a span of {owner} at {at_ns}"))
                .await;
        }
    }

    /// Takes whatever has arrived, without waiting.
    pub fn drain(&mut self) -> Vec<OwnershipChange> {
        let mut got = Vec::new();
        while let Ok(change) = self.rx.try_recv() {
            self.all.push(change.clone());
            got.push(change);
        }
        got
    }

    /// An index with everything received so far applied.
    pub fn index(&self) -> IdentityIndex {
        let mut index = IdentityIndex::new();
        index.register_source("kubernetes");
        for change in &self.all {
            index.apply(change.clone());
        }
        index
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An Open or a Close (not a watermark or an uncertain span).
pub fn is_tenure_change(change: &OwnershipChange) -> bool {
    matches!(
        change,
        OwnershipChange::Open { .. } | OwnershipChange::Close { .. }
    )
}

/// `open <owner> <name>` / `close <owner>`: a change in a form that compares exactly.
pub fn brief(change: &OwnershipChange) -> String {
    match change {
        OwnershipChange::Open {
            owner,
            prefix,
            identity,
            ..
        } => format!("open {owner} {prefix} {}", identity.display_name()),
        OwnershipChange::Close { owner, prefix, .. } => format!("close {owner} {prefix}"),
        OwnershipChange::Uncertain { owner, prefix, .. } => format!("maybe {owner} {prefix}"),
        OwnershipChange::Watermark { .. } => "watermark".to_owned(),
    }
}

pub fn briefs(changes: &[OwnershipChange]) -> Vec<String> {
    changes.iter().map(brief).collect()
}

/// The identity of an Open.
pub fn identity_of(change: &OwnershipChange) -> Arc<flowlog_record::Identity> {
    match change {
        OwnershipChange::Open { identity, .. } => Arc::clone(identity),
        other => panic!("not an Open: {other:?}"),
    }
}
