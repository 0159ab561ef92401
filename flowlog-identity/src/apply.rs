//! The one task per process that writes to the index: it drains the sources' channel in batches,
//! taking the write lock once per batch so that lookups (readers) wait as little as possible.
use tokio::sync::mpsc;

use crate::{change::OwnershipChange, index::SharedIndex};

/// Most changes applied under one write lock.
const BATCH: usize = 1024;

/// Applies changes from the channel into the index until the channel closes (one task per process).
pub async fn apply_changes(index: SharedIndex, mut changes: mpsc::Receiver<OwnershipChange>) {
    let mut batch = Vec::with_capacity(BATCH);
    while changes.recv_many(&mut batch, BATCH).await > 0 {
        let (intervals, prefixes) = {
            let mut index = index.write();
            for change in batch.drain(..) {
                index.apply(change);
            }
            (index.intervals(), index.prefixes())
        };
        metrics::gauge!(crate::metrics::INTERVALS).set(intervals as f64);
        metrics::gauge!(crate::metrics::PREFIXES).set(prefixes as f64);
    }
}
