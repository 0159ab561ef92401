//! The inventory-source abstraction: anything that knows who owns which addresses (a static
//! file, this host's interfaces, Kubernetes, EC2) runs as one task that sends
//! [`OwnershipChange`]s into a bounded channel, which one [`apply_changes`](crate::apply_changes)
//! task drains into the index. Sources never touch the index themselves, so they can also feed
//! the `flows.ownership` topic unchanged.
use std::{future::Future, pin::Pin};

use flowlog_diag::{LogThrottle, error_chain};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{change::OwnershipChange, index::SharedIndex, timing::Timing};

/// A boxed, sendable future: the same type as `futures::future::BoxFuture`, spelled out so that
/// this crate needs neither `futures` nor `async-trait`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a source stopped for good. Errors a source can survive are counted and logged instead.
///
/// One type for every source, here or in other crates (Kubernetes, EC2), so this module knows no
/// source's own error type: the source's error is kept as this one's `source()` (boxed), and
/// [`error_chain`] of it reads `inventory source <name>: <cause>: <its cause>...`.
#[derive(Debug, thiserror::Error)]
#[error("inventory source {name}")]
pub struct SourceError {
    name: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl SourceError {
    /// Source `name` stopped because of `cause`.
    pub fn new(
        name: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            source: Box::new(cause),
        }
    }

    /// The source that stopped.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A producer of ownership changes.
pub trait InventorySource: Send + 'static {
    /// The source's name, as in [`OwnershipChange::source`] and `register_source`.
    fn name(&self) -> &str;

    /// How the source dates its changes, which decides which flows wait for it
    /// ([`Timing`]; registered with `register_source_with`). Default: any time after its
    /// watermark, so every newer flow waits.
    fn timing(&self) -> Timing {
        Timing::Continuous
    }

    /// For a source that relays other sources (the enricher's follower of the ownership
    /// topic): where to register them, with their timings, as it discovers them. Called once,
    /// before [`run`](Self::run); other sources ignore it.
    fn relay_into(&mut self, registry: SourceRegistry) {
        let _ = registry;
    }

    /// Runs until `shutdown` is cancelled, sending changes (and watermarks, at least every few
    /// seconds while healthy) into `changes`. Errors the source can survive are counted and logged
    /// once (rate-limited), never returned; a returned error is fatal for this source. A closed
    /// channel means the process is stopping: the source returns `Ok(())`.
    fn run(
        self: Box<Self>,
        changes: mpsc::Sender<OwnershipChange>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// Registers sources in an index: what a relaying source is given
/// ([`InventorySource::relay_into`]) instead of the index itself, which sources never touch.
#[derive(Clone)]
pub struct SourceRegistry(SharedIndex);

impl SourceRegistry {
    pub fn new(index: SharedIndex) -> Self {
        Self(index)
    }

    /// Registers (or re-registers with a new timing) `source`, whose watermark then gates the
    /// flows it could change ([`IdentityIndex::register_source_with`](crate::IdentityIndex)).
    pub fn register(&self, source: &str, timing: Timing) {
        self.0.write().register_source_with(source, timing);
    }
}

impl std::fmt::Debug for SourceRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceRegistry")
    }
}

/// Runs `source` as a task. A fatal error is logged (with the source's name) and returned by the
/// handle; the index keeps what the source sent, and its watermark stops, so flows newer than it
/// are held and then go out unattributed rather than wrongly attributed.
pub fn spawn_source(
    source: Box<dyn InventorySource>,
    changes: mpsc::Sender<OwnershipChange>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), SourceError>> {
    let name = source.name().to_owned();
    let run = source.run(changes, shutdown);
    tokio::spawn(async move {
        let result = run.await;
        if let Err(error) = &result {
            metrics::counter!(crate::metrics::SOURCE_FAILURES, "source" => name.clone())
                .increment(1);
            tracing::error!(source = %name, error = %error_chain(error), "inventory source stopped");
        }
        result
    })
}

/// Logs a repeated failure once, then at most once a minute with its running count
/// ([`LogThrottle`]), and the recovery with how many attempts failed — instead of once per
/// attempt; counts every failure in `flowlog_identity_source_errors_total{source}` (plus `kind`
/// when the source names one). Public so that sources in other crates (EC2, Kubernetes) log and
/// count the same way.
#[derive(Debug)]
pub struct FailureLog {
    source: &'static str,
    /// Failures since the last success, and when they were last logged.
    throttle: LogThrottle,
}

impl FailureLog {
    pub fn new(source: &'static str) -> Self {
        Self {
            source,
            throttle: LogThrottle::default(),
        }
    }

    /// Records a failure; logs it if it is the first since the last success, or if the last log
    /// of it is a minute old.
    pub fn failed(&mut self, error: &(dyn std::error::Error + 'static)) {
        metrics::counter!(crate::metrics::SOURCE_ERRORS, "source" => self.source).increment(1);
        self.note(error);
    }

    /// [`failed`](Self::failed), counted with a `kind` label too (a small fixed set per source,
    /// e.g. `throttled`, `timeout`, `dispatch`), so that throttling can be told from an outage.
    pub fn failed_kind(&mut self, kind: &'static str, error: &(dyn std::error::Error + 'static)) {
        metrics::counter!(
            crate::metrics::SOURCE_ERRORS,
            "source" => self.source,
            "kind" => kind
        )
        .increment(1);
        self.note(error);
    }

    fn note(&mut self, error: &(dyn std::error::Error + 'static)) {
        if self.throttle.hit() {
            tracing::warn!(
                source = self.source,
                failures = self.throttle.count,
                error = %error_chain(error),
                "inventory source failing (logged again at most once a minute)"
            );
        }
    }

    /// Records a success; logs the recovery (with how many attempts failed) after failures.
    pub fn succeeded(&mut self) {
        if self.throttle.count > 0 {
            // Outside the macro: its fields are evaluated only when the event is enabled.
            let failures = self.throttle.clear();
            tracing::info!(source = self.source, failures, "inventory source recovered");
        }
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u64 {
        self.throttle.count
    }
}

/// The run loop of a source that checks synchronously (a file, this host's interfaces): `check`
/// at the current time, send what it found, sleep `interval`, until `shutdown` or until the
/// receiver is gone.
pub async fn check_every(
    interval: std::time::Duration,
    changes: &mpsc::Sender<OwnershipChange>,
    shutdown: &CancellationToken,
    mut check: impl FnMut(u64) -> Vec<OwnershipChange>,
) {
    loop {
        if !send_all(changes, check(crate::change::now_ns())).await {
            return;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Sends `changes` in order; false if the receiver is gone (the process is stopping).
pub async fn send_all(tx: &mpsc::Sender<OwnershipChange>, changes: Vec<OwnershipChange>) -> bool {
    for change in changes {
        if tx.send(change).await.is_err() {
            return false;
        }
    }
    true
}
