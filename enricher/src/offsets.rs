//! Which input offsets may be committed: an offset is stored only once the record it carried is
//! durable in **every** output — its enriched flow (or its dead letter) acknowledged by Kafka,
//! and the Parquet file it was written to closed and uploaded. That is what makes the enricher
//! at-least-once across crashes and rebalances (after Vector's Kafka source: `store_offset` only
//! after the output acknowledged).
//!
//! Offsets of a partition complete out of order (a held flow finishes after later ones; Kafka
//! acknowledges in batches; Parquet files close every roll), so each partition keeps its
//! pending offsets in order and commits up to the first one still pending. A partition's
//! offsets are read in increasing order, so its pending ones are a deque sorted by offset:
//! appended at the back, found by binary search, committed from the front.
use std::collections::{HashMap, VecDeque};

/// What an input message still waits for.
#[derive(Debug, Clone, Copy, Default)]
struct Pending {
    /// Written to the output topic or the dead-letter topic, acknowledgement not in yet.
    kafka: bool,
    /// Written to Parquet as the `n`-th record ([`crate::storage::ParquetSink::written`] before the
    /// write); done once the sink's `durable()` passes it.
    parquet: Option<u64>,
    /// Not yet handed to the outputs at all (held, or decoded but not written).
    unwritten: bool,
}

impl Pending {
    fn done(&self, parquet_durable: u64) -> bool {
        !self.unwritten && !self.kafka && self.parquet.is_none_or(|n| n < parquet_durable)
    }
}

/// Pending input offsets per partition of one topic.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<i32, VecDeque<(i64, Pending)>>,
}

impl OffsetTracker {
    /// A message was read: it is pending until [`written`](Self::written). Read again (after
    /// a rebalance or a seek back), it is pending again from the start.
    pub fn consumed(&mut self, partition: i32, offset: i64) {
        let fresh = Pending {
            unwritten: true,
            ..Pending::default()
        };
        let pending = self.partitions.entry(partition).or_default();
        match pending.back() {
            Some(&(last, _)) if last >= offset => {
                match pending.binary_search_by_key(&offset, |&(o, _)| o) {
                    Ok(i) => pending[i].1 = fresh,
                    Err(i) => pending.insert(i, (offset, fresh)),
                }
            }
            _ => pending.push_back((offset, fresh)),
        }
    }

    /// The message's output was handed over: to Kafka if `kafka` (awaiting its acknowledgement),
    /// and to Parquet as record number `parquet`.
    pub fn written(&mut self, partition: i32, offset: i64, kafka: bool, parquet: Option<u64>) {
        if let Some(p) = self.get(partition, offset) {
            p.unwritten = false;
            p.kafka = kafka;
            p.parquet = parquet;
        }
    }

    /// Kafka acknowledged the message's output.
    pub fn acknowledged(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.get(partition, offset) {
            p.kafka = false;
        }
    }

    fn get(&mut self, partition: i32, offset: i64) -> Option<&mut Pending> {
        let pending = self.partitions.get_mut(&partition)?;
        let i = pending.binary_search_by_key(&offset, |&(o, _)| o).ok()?;
        Some(&mut pending[i].1)
    }

    /// Drops every done offset at the front of each partition and returns, for each partition
    /// that moved, the offset to commit (the next one to read: the last done one + 1).
    pub fn committable(&mut self, parquet_durable: u64) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        for (&partition, pending) in &mut self.partitions {
            let mut next = None;
            while let Some(&(offset, p)) = pending.front() {
                if !p.done(parquet_durable) {
                    break;
                }
                next = Some(offset + 1);
                pending.pop_front();
            }
            if let Some(next) = next {
                out.push((partition, next));
            }
        }
        out.sort_unstable();
        out
    }

    /// Forgets the partitions this consumer no longer owns (a rebalance): their records are read
    /// again by the new owner from the last committed offset.
    pub fn revoke(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.partitions.remove(p);
        }
    }

    /// Input messages not yet committable.
    pub fn pending(&self) -> usize {
        self.partitions.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_up_to_the_first_pending_offset() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.consumed(0, o);
        }
        t.consumed(1, 7);
        // Offsets 10, 11, 13 written to Kafka and Parquet (records 0, 1, 2); 12 still held.
        t.written(0, 10, true, Some(0));
        t.written(0, 11, true, Some(1));
        t.written(0, 13, true, Some(2));
        t.acknowledged(0, 11);
        t.acknowledged(0, 10);
        t.acknowledged(0, 13);
        assert_eq!(t.committable(0), vec![], "Parquet has nothing durable yet");
        assert_eq!(t.committable(1), vec![(0, 11)], "record 0 durable");
        assert_eq!(t.committable(3), vec![(0, 12)], "12 is still held");
        // A dead letter: Kafka only.
        t.written(0, 12, true, None);
        t.acknowledged(0, 12);
        t.written(0, 14, true, Some(3));
        assert_eq!(t.committable(3), vec![(0, 14)], "14's record 3 not durable");
        t.acknowledged(0, 14);
        t.written(1, 7, false, Some(4));
        assert_eq!(t.committable(5), vec![(0, 15), (1, 8)]);
        assert_eq!(t.pending(), 0);
        assert_eq!(t.committable(5), vec![]);
    }

    /// Offsets read again after a seek back are pending again, in order, once each.
    #[test]
    fn offsets_read_again_are_pending_again_in_order() {
        let mut t = OffsetTracker::default();
        for o in 5..8 {
            t.consumed(0, o);
            t.written(0, o, false, None);
        }
        t.consumed(0, 6);
        t.consumed(0, 3);
        assert_eq!(t.pending(), 4);
        assert_eq!(t.committable(0), vec![], "3 is pending");
        t.written(0, 3, false, None);
        assert_eq!(t.committable(0), vec![(0, 6)], "6 was read again");
        t.written(0, 6, false, None);
        assert_eq!(t.committable(0), vec![(0, 8)]);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn revoked_partitions_are_forgotten() {
        let mut t = OffsetTracker::default();
        t.consumed(0, 1);
        t.consumed(2, 1);
        t.revoke(&[0]);
        assert_eq!(t.pending(), 1);
        t.written(0, 1, false, None);
        t.written(2, 1, false, None);
        assert_eq!(t.committable(0), vec![(2, 2)]);
    }
}
