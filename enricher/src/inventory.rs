//! Starting the inventory: the identity sources run as tasks that send ownership changes into
//! one channel; one task applies them to the shared index, and another forgets intervals that
//! closed longer ago than the retention (no flow that old is still arriving), so memory stays
//! bounded however long the enricher runs.
use std::time::Duration;

use flowlog_identity::{
    IdentityIndex, InventorySource, SharedIndex, SourceRegistry, apply_changes, now_ns,
};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Changes waiting to be applied, at most: a source that outruns the index waits.
const CHANGES_QUEUE: usize = 65_536;

/// The running inventory: the index it feeds and its tasks.
pub struct Inventory {
    pub index: SharedIndex,
    tasks: JoinSet<()>,
}

impl Inventory {
    /// Registers every source in a new index, with how it dates its changes (so that flows are
    /// held until each source that could change them has reported), and starts them.
    /// `retention` is how long closed intervals are kept.
    pub fn start(
        sources: Vec<Box<dyn InventorySource>>,
        retention: Duration,
        shutdown: &CancellationToken,
    ) -> Self {
        let mut index = IdentityIndex::new();
        for s in &sources {
            index.register_source_with(s.name(), s.timing());
        }
        let index = SharedIndex::new(index.into());
        let (tx, rx) = mpsc::channel(CHANGES_QUEUE);
        let mut tasks = JoinSet::new();
        for mut source in sources {
            source.relay_into(SourceRegistry::new(SharedIndex::clone(&index)));
            let name = source.name().to_string();
            let run = source.run(tx.clone(), shutdown.clone());
            tasks.spawn(async move {
                match run.await {
                    Ok(()) => info!(source = name, "inventory source stopped"),
                    Err(e) => error!(
                        source = name,
                        "inventory source failed: {}; flows are held, then attributed unknown",
                        flowlog_diag::error_chain(&e)
                    ),
                }
            });
        }
        drop(tx);
        tasks.spawn(apply_changes(SharedIndex::clone(&index), rx));
        let pruned = SharedIndex::clone(&index);
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => {}
                }
                // The index exports its own size (flowlog_identity_intervals, _prefixes).
                pruned
                    .write()
                    .prune(now_ns().saturating_sub(retention.as_nanos() as u64));
            }
        });
        Self { index, tasks }
    }

    /// Waits for the sources to stop (after `shutdown`).
    pub async fn stopped(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM (handlers installed now).
pub fn cancel_on_signal(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        shutdown.cancel();
    });
    Ok(())
}
