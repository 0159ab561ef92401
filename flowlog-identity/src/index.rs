//! The time-ranged identity index: for every prefix an inventory source reported, the history of
//! its owners as intervals `[from, to)`, so that a flow is joined with whoever held the remote
//! address *at the flow's time*, not with whoever holds it now (IPs are reused: pods churn, ENIs
//! move).
//!
//! Layout, chosen for the enricher's target (≥ 1M lookups/s/core with 1M intervals over 250k
//! addresses): per address family, one hash map per prefix length present (keyed by the masked
//! network as an integer), visited most specific first; per prefix, a small vector of intervals
//! sorted by `from`, searched from the newest (flows are looked up soon after they happen), by
//! binary search when there are many. Each interval also carries `reach`, the largest `to`
//! of itself and every interval before it, so the backward scan for intervals that contain a
//! time stops as soon as nothing earlier can reach it: a lookup touches only the intervals that
//! contain the time plus one. An exact hit clones one `Arc` and allocates nothing.
//!
//! Odd input is counted, never a panic: a duplicate Open of an open `(source, owner, prefix)` (a
//! Kubernetes re-list re-sends everything), re-sent Opens and Closes of tenures already closed, a
//! Close with no Open (kept pending, so a Close that overtook its Open is not lost), a Close
//! earlier than its Open, a watermark going backwards.
use std::{collections::HashMap, hash::Hash, net::IpAddr, sync::Arc};

use flowlog_record::{Endpoint, Identity};
use ipnet::{IpNet, Ipv4Net};
use smallvec::SmallVec;

use crate::change::OwnershipChange;

/// The end of an interval that has not closed.
const OPEN_END: u64 = u64::MAX;

/// The index shared between the task that applies changes and the enricher's lookups
/// (`parking_lot`'s lock: no poisoning, and readers are cheap).
pub type SharedIndex = Arc<parking_lot::RwLock<IdentityIndex>>;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One owner's tenure of a prefix, or a span in which it may or may not have held it.
#[derive(Debug, Clone)]
struct Interval {
    from: u64,
    /// Exclusive end; [`OPEN_END`] while the owner still holds the prefix.
    to: u64,
    /// `max(to)` over this interval and every interval before it in its slot.
    reach: u64,
    /// Serial number, so that a Close finds its own interval among several starting together.
    id: u64,
    identity: Arc<Identity>,
    /// An [`OwnershipChange::Uncertain`] span: the owner is a candidate there, never the answer
    /// alone. Always closed, and never matched by an Open or a Close.
    maybe: bool,
}

/// Whether `a` and `b` are the same owner's identity (one owner twice is not ambiguity).
fn same(a: &Arc<Identity>, b: &Arc<Identity>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

/// Adds `identity` to `set` unless an equal one is there.
fn add_distinct<'a>(set: &mut SmallVec<[&'a Arc<Identity>; 4]>, identity: &'a Arc<Identity>) {
    if !set.iter().any(|o| same(o, identity)) {
        set.push(identity);
    }
}

/// The owners of one prefix, sorted by `from` (ties in arrival order).
#[derive(Debug, Default)]
struct Slot {
    intervals: SmallVec<[Interval; 4]>,
}

impl Slot {
    /// Restores `reach` from position `from_pos` on (after an insert, a removal or a close).
    fn fix_reach(&mut self, from_pos: usize) {
        let mut reach = if from_pos == 0 {
            0
        } else {
            self.intervals[from_pos - 1].reach
        };
        for iv in &mut self.intervals[from_pos..] {
            reach = reach.max(iv.to);
            iv.reach = reach;
        }
    }

    fn insert(&mut self, from: u64, to: u64, id: u64, identity: Arc<Identity>) {
        self.insert_interval(from, to, id, identity, false);
    }

    fn insert_interval(
        &mut self,
        from: u64,
        to: u64,
        id: u64,
        identity: Arc<Identity>,
        maybe: bool,
    ) {
        let pos = self.intervals.partition_point(|iv| iv.from <= from);
        self.intervals.insert(
            pos,
            Interval {
                from,
                to,
                reach: 0,
                id,
                identity,
                maybe,
            },
        );
        self.fix_reach(pos);
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.intervals.iter().position(|iv| iv.id == id)
    }

    fn remove(&mut self, pos: usize) -> Interval {
        let iv = self.intervals.remove(pos);
        self.fix_reach(pos);
        iv
    }

    /// Whether a closed interval `[from, to)` of an equal identity is already held (a re-sent
    /// event for a tenure that is already complete).
    fn has_closed(&self, from: u64, to: Option<u64>, identity: &Identity) -> bool {
        self.intervals.iter().any(|iv| {
            !iv.maybe
                && iv.from == from
                && iv.to != OPEN_END
                && to.is_none_or(|to| iv.to == to)
                && *iv.identity == *identity
        })
    }

    /// Whether an uncertain span equal to this one is already held (a re-sent span).
    fn has_maybe(&self, from: u64, to: u64, identity: &Identity) -> bool {
        self.intervals
            .iter()
            .any(|iv| iv.maybe && iv.from == from && iv.to == to && *iv.identity == *identity)
    }

    /// The identities of the intervals containing `at`, or `None` if none does: exact if one
    /// owner held it for sure and no other may have; ambiguous (all of them) otherwise —
    /// also when the only candidate is one that only may have held it.
    fn containing(&self, at: u64) -> Option<Endpoint> {
        let ivs = &self.intervals;
        // Fast path, the common case of a flow looked up soon after it happened: the newest
        // interval contains `at` and nothing before it reaches `at`.
        if let Some((last, earlier)) = ivs.split_last()
            && !last.maybe
            && last.from <= at
            && at < last.to
            && earlier.last().is_none_or(|b| b.reach <= at)
        {
            return Some(Endpoint::exact(Arc::clone(&last.identity)));
        }
        // The number of intervals starting at or before `at`. Flows are mostly looked up soon
        // after they happen, at the newest intervals: a short slot is scanned from its end.
        let mut i = if ivs.len() <= 8 {
            let mut k = ivs.len();
            while k > 0 && ivs[k - 1].from > at {
                k -= 1;
            }
            k
        } else {
            ivs.partition_point(|iv| iv.from <= at)
        };
        let mut held: SmallVec<[&Arc<Identity>; 4]> = SmallVec::new();
        let mut maybe: SmallVec<[&Arc<Identity>; 4]> = SmallVec::new();
        while i > 0 {
            i -= 1;
            let iv = &ivs[i];
            if iv.reach <= at {
                break;
            }
            if iv.to > at {
                add_distinct(if iv.maybe { &mut maybe } else { &mut held }, &iv.identity);
            }
        }
        if let [one] = held.as_slice()
            && maybe.iter().all(|m| same(m, one))
        {
            return Some(Endpoint::exact(Arc::clone(one)));
        }
        for m in maybe {
            add_distinct(&mut held, m);
        }
        if held.is_empty() {
            return None;
        }
        let owners: SmallVec<[Arc<Identity>; 4]> = held.into_iter().map(Arc::clone).collect();
        Some(Endpoint::ambiguous(&owners))
    }
}

/// An address family's network number as an integer, masked to a prefix length.
trait NetKey: Copy + Eq + Hash {
    fn masked(self, len: u8) -> Self;
}

impl NetKey for u32 {
    fn masked(self, len: u8) -> Self {
        if len == 0 {
            0
        } else {
            self & (u32::MAX << (32 - u32::from(len)))
        }
    }
}

impl NetKey for u128 {
    fn masked(self, len: u8) -> Self {
        if len == 0 {
            0
        } else {
            self & (u128::MAX << (128 - u32::from(len)))
        }
    }
}

/// One address family: a map per prefix length present, most specific first.
#[derive(Debug)]
struct Family<K> {
    lens: Vec<(u8, Map<K, Slot>)>,
}

impl<K: NetKey> Default for Family<K> {
    fn default() -> Self {
        Self { lens: Vec::new() }
    }
}

impl<K: NetKey> Family<K> {
    fn slot(&self, net: K, len: u8) -> Option<&Slot> {
        let (_, map) = self.lens.iter().find(|(l, _)| *l == len)?;
        map.get(&net)
    }

    fn slot_mut(&mut self, net: K, len: u8) -> Option<&mut Slot> {
        let (_, map) = self.lens.iter_mut().find(|(l, _)| *l == len)?;
        map.get_mut(&net)
    }

    fn slot_or_insert(&mut self, net: K, len: u8) -> &mut Slot {
        let i = match self.lens.iter().position(|(l, _)| *l == len) {
            Some(i) => i,
            None => {
                let i = self.lens.partition_point(|(l, _)| *l > len);
                self.lens.insert(i, (len, Map::default()));
                i
            }
        };
        self.lens[i].1.entry(net).or_default()
    }

    /// Drops the slot if it holds nothing any more, and the prefix length's map with it.
    fn remove_if_empty(&mut self, net: K, len: u8) {
        if let Some(i) = self.lens.iter().position(|(l, _)| *l == len) {
            let map = &mut self.lens[i].1;
            if map.get(&net).is_some_and(|s| s.intervals.is_empty()) {
                map.remove(&net);
            }
            if map.is_empty() {
                self.lens.remove(i);
            }
        }
    }

    fn lookup(&self, addr: K, at: u64) -> Option<Endpoint> {
        self.lens.iter().find_map(|(len, map)| {
            map.get(&addr.masked(*len))
                .and_then(|slot| slot.containing(at))
        })
    }

    /// Removes closed intervals that ended at or before `before`; returns how many.
    fn prune(&mut self, before: u64) -> usize {
        let mut removed = 0;
        for (_, map) in &mut self.lens {
            map.retain(|_, slot| {
                let n = slot.intervals.len();
                slot.intervals
                    .retain(|iv| iv.to == OPEN_END || iv.to > before);
                if slot.intervals.len() != n {
                    removed += n - slot.intervals.len();
                    slot.fix_reach(0);
                }
                !slot.intervals.is_empty()
            });
        }
        self.lens.retain(|(_, map)| !map.is_empty());
        removed
    }

    fn intervals(&self) -> usize {
        self.lens
            .iter()
            .flat_map(|(_, map)| map.values())
            .map(|s| s.intervals.len())
            .sum()
    }

    fn prefixes(&self) -> usize {
        self.lens.iter().map(|(_, map)| map.len()).sum()
    }
}

/// A prefix in canonical form: host bits cleared, IPv4-mapped IPv6 as IPv4.
fn canonical(prefix: IpNet) -> IpNet {
    match prefix {
        IpNet::V6(net) if net.prefix_len() >= 96 => match net.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, net.prefix_len() - 96)
                .map(|n| IpNet::V4(n.trunc()))
                .unwrap_or(IpNet::V6(net.trunc())),
            None => IpNet::V6(net.trunc()),
        },
        net => net.trunc(),
    }
}

/// Which open interval a Close refers to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct OwnerKey {
    source: String,
    owner: String,
    prefix: IpNet,
}

/// The open interval of an owner.
#[derive(Debug, Clone, Copy)]
struct OpenInterval {
    from: u64,
    id: u64,
}

/// A source's progress.
#[derive(Debug, Clone, Copy, Default)]
struct SourceState {
    /// Registered sources gate [`IdentityIndex::caught_up_to`].
    registered: bool,
    watermark: Option<u64>,
}

/// How many changes of each kind the index has applied, odd ones included (each is also a
/// `flowlog_identity_*_total` counter; kept here too so that tests and status pages can read them
/// without a metrics recorder).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    pub opens: u64,
    pub closes: u64,
    pub watermarks: u64,
    /// An Open of an already open `(source, owner, prefix)`: ignored if the identity is the same
    /// (the earlier start is kept), otherwise the identity changes at the new Open's time.
    pub duplicate_opens: u64,
    /// An Open re-sent for a tenure that is already closed (same start, equal identity): ignored.
    pub stale_opens: u64,
    /// A Close with no open interval: kept pending, in case its Open arrives late.
    pub unmatched_closes: u64,
    /// A Close re-sent for a tenure that already ended at that time: ignored.
    pub stale_closes: u64,
    /// An Open that arrived after its Close (it matched a pending Close): a closed interval.
    pub late_opens: u64,
    /// A Close earlier than its interval's start: the interval is dropped (it never held).
    pub inverted_closes: u64,
    /// Uncertain spans applied (a re-sent one is counted but not held twice).
    pub uncertain: u64,
    /// A watermark older than the source's previous one: ignored.
    pub watermark_regressions: u64,
    /// A watermark from a source that was never registered: recorded, does not gate.
    pub unregistered_watermarks: u64,
}

/// Who owned which prefix, when. See the module documentation for the layout and the crate's
/// for the semantics.
#[derive(Debug, Default)]
pub struct IdentityIndex {
    v4: Family<u32>,
    v6: Family<u128>,
    open: Map<OwnerKey, OpenInterval>,
    /// Closes that arrived with no open interval, by owner: the close time.
    pending_closes: Map<OwnerKey, u64>,
    sources: Map<String, SourceState>,
    next_id: u64,
    /// Intervals held, kept as they change so that reading it is free.
    interval_count: usize,
    counts: ChangeCounts,
}

impl IdentityIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// The index behind the lock that the apply task and the lookups share.
    pub fn into_shared(self) -> SharedIndex {
        Arc::new(parking_lot::RwLock::new(self))
    }

    /// Declares a source whose watermark gates `caught_up_to` (a registered source that has sent
    /// no watermark yet holds `caught_up_to` at None).
    pub fn register_source(&mut self, source: &str) {
        self.sources
            .entry(source.to_owned())
            .or_default()
            .registered = true;
    }

    /// Applies one change. Never fails: odd changes are counted (see [`ChangeCounts`]).
    pub fn apply(&mut self, change: OwnershipChange) {
        metrics::counter!("flowlog_identity_changes_total", "kind" => change.kind()).increment(1);
        match change {
            OwnershipChange::Open {
                source,
                owner,
                prefix,
                identity,
                at_ns,
            } => {
                self.counts.opens += 1;
                self.open(
                    OwnerKey {
                        source,
                        owner,
                        prefix: canonical(prefix),
                    },
                    identity,
                    at_ns,
                );
            }
            OwnershipChange::Close {
                source,
                owner,
                prefix,
                at_ns,
            } => {
                self.counts.closes += 1;
                self.close(
                    OwnerKey {
                        source,
                        owner,
                        prefix: canonical(prefix),
                    },
                    at_ns,
                );
            }
            OwnershipChange::Uncertain {
                prefix,
                identity,
                from_ns,
                to_ns,
                ..
            } => {
                self.counts.uncertain += 1;
                self.uncertain(canonical(prefix), identity, from_ns, to_ns);
            }
            OwnershipChange::Watermark { source, at_ns } => {
                self.counts.watermarks += 1;
                self.watermark(source, at_ns);
            }
        }
    }

    /// A span `[from, to)` in which `identity` may have held `prefix`: held as a candidate for
    /// lookups in it (an empty or re-sent span adds nothing).
    fn uncertain(&mut self, prefix: IpNet, identity: Arc<Identity>, from: u64, to: u64) {
        if from >= to
            || self
                .slot(prefix)
                .is_some_and(|slot| slot.has_maybe(from, to, &identity))
        {
            return;
        }
        let id = self.next_id();
        self.slot_or_insert(prefix)
            .insert_interval(from, to, id, identity, true);
        self.interval_count += 1;
    }

    fn open(&mut self, key: OwnerKey, identity: Arc<Identity>, at: u64) {
        let prefix = key.prefix;
        if let Some(open) = self.open.get(&key).copied() {
            self.counts.duplicate_opens += 1;
            metrics::counter!("flowlog_identity_duplicate_opens_total").increment(1);
            let id = self.next_id();
            let Some(slot) = self.slot_mut(prefix) else {
                return;
            };
            let Some(pos) = slot.position(open.id) else {
                return;
            };
            let reopened = if *slot.intervals[pos].identity == *identity {
                // A re-list re-sends the same tenure: keep one interval, from the earlier start.
                (at < open.from).then(|| {
                    let iv = slot.remove(pos);
                    slot.insert(at, iv.to, iv.id, iv.identity);
                    OpenInterval {
                        from: at,
                        id: open.id,
                    }
                })
            } else if at <= open.from {
                // The owner's identity as known from its start: replace it.
                slot.intervals[pos].identity = identity;
                None
            } else {
                // The owner's identity changed (e.g. relabelled) at `at`: split the tenure.
                slot.intervals[pos].to = at;
                slot.fix_reach(pos);
                slot.insert(at, OPEN_END, id, identity);
                self.interval_count += 1;
                Some(OpenInterval { from: at, id })
            };
            if let Some(reopened) = reopened {
                self.open.insert(key, reopened);
            }
            return;
        }
        let closed_at = match self.pending_closes.remove(&key) {
            Some(close) if close >= at => {
                self.counts.late_opens += 1;
                metrics::counter!("flowlog_identity_late_opens_total").increment(1);
                Some(close)
            }
            // A pending close older than this Open ended an earlier tenure we never saw open.
            _ => None,
        };
        if closed_at == Some(at) {
            return; // an empty tenure
        }
        if self
            .slot(prefix)
            .is_some_and(|slot| slot.has_closed(at, closed_at, &identity))
        {
            self.counts.stale_opens += 1;
            metrics::counter!("flowlog_identity_stale_opens_total").increment(1);
            return;
        }
        let id = self.next_id();
        self.slot_or_insert(prefix)
            .insert(at, closed_at.unwrap_or(OPEN_END), id, identity);
        self.interval_count += 1;
        if closed_at.is_none() {
            self.open.insert(key, OpenInterval { from: at, id });
        }
    }

    fn close(&mut self, key: OwnerKey, at: u64) {
        let prefix = key.prefix;
        let Some(open) = self.open.get(&key).copied() else {
            // A tenure of this prefix already ended exactly then: a re-sent Close.
            if self
                .slot(prefix)
                .is_some_and(|slot| slot.intervals.iter().any(|iv| !iv.maybe && iv.to == at))
            {
                self.count_stale_close();
                return;
            }
            self.counts.unmatched_closes += 1;
            metrics::counter!("flowlog_identity_unmatched_closes_total").increment(1);
            let pending = self.pending_closes.entry(key).or_insert(at);
            *pending = (*pending).max(at);
            return;
        };
        let Some(slot) = self.slot_mut(prefix) else {
            self.open.remove(&key);
            return;
        };
        let Some(pos) = slot.position(open.id) else {
            self.open.remove(&key);
            return;
        };
        if at > open.from {
            slot.intervals[pos].to = at;
            slot.fix_reach(pos);
            self.open.remove(&key);
            return;
        }
        if at < open.from {
            // A Close re-sent for this owner's previous tenure (one of the same identity ended
            // exactly then) must not end the current one.
            let current = &slot.intervals[pos].identity;
            if slot
                .intervals
                .iter()
                .any(|iv| !iv.maybe && iv.to == at && *iv.identity == **current)
            {
                self.count_stale_close();
                return;
            }
        }
        slot.remove(pos);
        self.open.remove(&key);
        self.interval_count -= 1;
        self.remove_if_empty(prefix);
        if at < open.from {
            self.counts.inverted_closes += 1;
            metrics::counter!("flowlog_identity_inverted_closes_total").increment(1);
        }
    }

    fn count_stale_close(&mut self) {
        self.counts.stale_closes += 1;
        metrics::counter!("flowlog_identity_stale_closes_total").increment(1);
    }

    fn watermark(&mut self, source: String, at: u64) {
        let state = self.sources.entry(source).or_default();
        if !state.registered {
            self.counts.unregistered_watermarks += 1;
            metrics::counter!("flowlog_identity_unregistered_watermarks_total").increment(1);
        }
        match state.watermark {
            Some(w) if at < w => {
                self.counts.watermark_regressions += 1;
                metrics::counter!("flowlog_identity_watermark_regressions_total").increment(1);
            }
            _ => state.watermark = Some(at),
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn slot(&self, prefix: IpNet) -> Option<&Slot> {
        match prefix {
            IpNet::V4(n) => self.v4.slot(n.network().to_bits(), n.prefix_len()),
            IpNet::V6(n) => self.v6.slot(n.network().to_bits(), n.prefix_len()),
        }
    }

    fn slot_mut(&mut self, prefix: IpNet) -> Option<&mut Slot> {
        match prefix {
            IpNet::V4(n) => self.v4.slot_mut(n.network().to_bits(), n.prefix_len()),
            IpNet::V6(n) => self.v6.slot_mut(n.network().to_bits(), n.prefix_len()),
        }
    }

    fn slot_or_insert(&mut self, prefix: IpNet) -> &mut Slot {
        match prefix {
            IpNet::V4(n) => self
                .v4
                .slot_or_insert(n.network().to_bits(), n.prefix_len()),
            IpNet::V6(n) => self
                .v6
                .slot_or_insert(n.network().to_bits(), n.prefix_len()),
        }
    }

    fn remove_if_empty(&mut self, prefix: IpNet) {
        match prefix {
            IpNet::V4(n) => self
                .v4
                .remove_if_empty(n.network().to_bits(), n.prefix_len()),
            IpNet::V6(n) => self
                .v6
                .remove_if_empty(n.network().to_bits(), n.prefix_len()),
        }
    }

    /// Who owned `addr` at `at_ns`: the intervals `[from, to)` containing `at_ns` at the most
    /// specific prefix that has any (a /32 pod IP beats a /16 static range); one → Endpoint::exact,
    /// two or more overlapping → Endpoint::ambiguous, none at any prefix → Endpoint::unknown.
    /// IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are looked up as IPv4.
    pub fn lookup(&self, addr: IpAddr, at_ns: u64) -> Endpoint {
        let found = match addr.to_canonical() {
            IpAddr::V4(a) => self.v4.lookup(a.to_bits(), at_ns),
            IpAddr::V6(a) => self.v6.lookup(a.to_bits(), at_ns),
        };
        found.unwrap_or_else(Endpoint::unknown)
    }

    /// The minimum watermark over registered sources: flows newer than this must be held.
    /// `None` while a registered source has sent no watermark; `Some(u64::MAX)` when no source is
    /// registered (there is nothing to wait for).
    pub fn caught_up_to(&self) -> Option<u64> {
        self.sources
            .values()
            .filter(|s| s.registered)
            .try_fold(u64::MAX, |min, s| s.watermark.map(|w| min.min(w)))
    }

    /// Whether a flow at `at_ns` can be attributed now: every registered source's view is
    /// complete at that time (`at_ns <= caught_up_to`). Otherwise the flow is held.
    pub fn is_caught_up(&self, at_ns: u64) -> bool {
        self.caught_up_to().is_some_and(|w| at_ns <= w)
    }

    /// The latest watermark `source` sent, registered or not.
    pub fn watermark_of(&self, source: &str) -> Option<u64> {
        self.sources.get(source).and_then(|s| s.watermark)
    }

    /// Forgets intervals that closed before `before_ns` (bounded memory); returns how many.
    /// An interval `[from, to)` with `to <= before_ns` contains no time at or after `before_ns`,
    /// so lookups at those times answer as before. Pending closes as old go too.
    pub fn prune(&mut self, before_ns: u64) -> usize {
        let removed = self.v4.prune(before_ns) + self.v6.prune(before_ns);
        self.interval_count -= removed;
        self.pending_closes.retain(|_, at| *at > before_ns);
        metrics::counter!("flowlog_identity_pruned_intervals_total").increment(removed as u64);
        removed
    }

    /// Live + closed intervals held.
    pub fn intervals(&self) -> usize {
        self.interval_count
    }

    /// Counts the intervals by walking every prefix (a check on [`Self::intervals`]).
    pub fn count_intervals(&self) -> usize {
        self.v4.intervals() + self.v6.intervals()
    }

    /// Distinct prefixes held (each with one or more intervals).
    pub fn prefixes(&self) -> usize {
        self.v4.prefixes() + self.v6.prefixes()
    }

    /// Intervals still open (owners that hold their prefix now).
    pub fn open_intervals(&self) -> usize {
        self.open.len()
    }

    /// Closes waiting for an Open that may arrive late.
    pub fn pending_closes(&self) -> usize {
        self.pending_closes.len()
    }

    /// Changes applied so far, odd ones included.
    pub fn counts(&self) -> ChangeCounts {
        self.counts
    }
}
