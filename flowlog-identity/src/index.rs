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

use crate::{
    change::OwnershipChange,
    timing::{SourceSet, Timing},
};

/// The end of an interval that has not closed.
const OPEN_END: u64 = u64::MAX;

/// What a flow proves about one of its addresses at the time it is looked up at, beyond what
/// the inventory says.
///
/// An uncertain span (an owner known only to have got or given up the address somewhere inside
/// it) leaves two answers open for a time inside it: that owner, or nobody. A flow can rule
/// nobody out: an address that completed a TCP handshake, or that the reporting host itself
/// used, was held by someone. If the inventory's only candidate then is one owner, that owner
/// held it. The assumption this rests on: an address the inventory tracks answers only while
/// one of the inventory's owners holds it (for pod addresses, only while a pod has it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Nothing is proven: the address may have had nobody (a connect nobody answered).
    Unproven,
    /// Something held the address: the peer answered, or it is the reporting host's own.
    Held,
}

/// An end's answer from [`IdentityIndex::lookup_with`], and whether the flow's [`Presence`]
/// decided it: `exact` only because nobody was ruled out (the one candidate of an uncertain
/// span, or a window that also meets times of nobody).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub endpoint: Endpoint,
    pub by_presence: bool,
}

impl Found {
    fn of(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            by_presence: false,
        }
    }
}

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
    /// The index's number of the source that reported it (see [`IdentityIndex::unsettled`]).
    source: u16,
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

/// Disjoint half-open time spans `[from, to)`.
type Spans = SmallVec<[(u64, u64); 4]>;

/// `spans` without the times in `[from, to)`.
fn subtract(spans: Spans, (from, to): (u64, u64)) -> Spans {
    spans
        .into_iter()
        .flat_map(|(a, b)| {
            let left = (a < from.min(b)).then_some((a, from.min(b)));
            let right = (to.max(a) < b).then_some((to.max(a), b));
            left.into_iter().chain(right)
        })
        .collect()
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

    fn insert(&mut self, from: u64, to: u64, id: u64, source: u16, identity: Arc<Identity>) {
        self.insert_interval(from, to, id, source, identity, false);
    }

    fn insert_interval(
        &mut self,
        from: u64,
        to: u64,
        id: u64,
        source: u16,
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
                source,
                identity,
                maybe,
            },
        );
        self.fix_reach(pos);
    }

    /// The intervals that meet the window `[lo, hi)`, newest first: those starting before `hi`,
    /// scanned back until nothing earlier reaches past `lo`.
    fn meeting(&self, lo: u64, hi: u64) -> impl Iterator<Item = &Interval> {
        let ivs = &self.intervals;
        let end = ivs.partition_point(|iv| iv.from < hi);
        ivs[..end]
            .iter()
            .rev()
            .take_while(move |iv| iv.reach > lo)
            .filter(move |iv| iv.to > lo)
    }

    /// Whether `source` held this prefix at some time after `after` (an interval of it ending
    /// later, or still open).
    fn held_after(&self, source: u16, after: u64) -> bool {
        self.intervals
            .iter()
            .rev()
            .take_while(|iv| iv.reach > after)
            .any(|iv| iv.source == source && iv.to > after)
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
    /// also when the only candidate is one that only may have held it, unless `presence`
    /// rules out nobody.
    fn containing(&self, at: u64, presence: Presence) -> Option<Found> {
        let ivs = &self.intervals;
        // Fast path, the common case of a flow looked up soon after it happened: the newest
        // interval contains `at` and nothing before it reaches `at`.
        if let Some((last, earlier)) = ivs.split_last()
            && !last.maybe
            && last.from <= at
            && at < last.to
            && earlier.last().is_none_or(|b| b.reach <= at)
        {
            return Some(Found::of(Endpoint::exact(Arc::clone(&last.identity))));
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
            return Some(Found::of(Endpoint::exact(Arc::clone(one))));
        }
        // One owner that only may have held it, or nobody: a held address was that owner's.
        if let ([], [one]) = (held.as_slice(), maybe.as_slice())
            && presence == Presence::Held
        {
            return Some(Found {
                endpoint: Endpoint::exact(Arc::clone(one)),
                by_presence: true,
            });
        }
        for m in maybe {
            add_distinct(&mut held, m);
        }
        if held.is_empty() {
            return None;
        }
        let owners: SmallVec<[Arc<Identity>; 4]> = held.into_iter().map(Arc::clone).collect();
        Some(Found::of(Endpoint::ambiguous(&owners)))
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

    fn lookup(&self, addr: K, at: u64, presence: Presence) -> Option<Found> {
        self.lens.iter().find_map(|(len, map)| {
            map.get(&addr.masked(*len))
                .and_then(|slot| slot.containing(at, presence))
        })
    }

    /// Who owned `addr` throughout the window `[lo, hi)`: every owner that any time of the
    /// window gets from a point lookup (the most specific prefix with an interval at that time),
    /// and whether some time of the window gets nobody. A time that only an uncertain span
    /// answers has no sure owner, so the window is then ambiguous even with one candidate, as
    /// a point lookup there would be. With [`Presence::Held`] nobody is not an answer: the
    /// owners any time of the window gets are the candidates, and one of them is exact.
    fn lookup_window(&self, addr: K, lo: u64, hi: u64, presence: Presence) -> Found {
        // The parts of the window no more specific prefix has answered yet.
        let mut open: Spans = SmallVec::new();
        open.push((lo, hi));
        let mut owners: SmallVec<[&Arc<Identity>; 4]> = SmallVec::new();
        let mut only_maybe = false;
        for (len, map) in &self.lens {
            let Some(slot) = map.get(&addr.masked(*len)) else {
                continue;
            };
            let mut covered: Spans = SmallVec::new();
            let mut maybe: Spans = SmallVec::new();
            for iv in slot.meeting(lo, hi) {
                if !open.iter().any(|&(a, b)| iv.from < b && a < iv.to) {
                    continue;
                }
                if iv.maybe {
                    maybe.push((iv.from, iv.to));
                } else {
                    covered.push((iv.from, iv.to));
                }
                add_distinct(&mut owners, &iv.identity);
            }
            // Times this prefix answers with candidates only.
            if !maybe.is_empty() {
                let mut unsure: Spans = open
                    .iter()
                    .flat_map(|&(a, b)| {
                        maybe.iter().filter_map(move |&(f, t)| {
                            (a.max(f) < b.min(t)).then_some((a.max(f), b.min(t)))
                        })
                    })
                    .collect();
                for &span in &covered {
                    unsure = subtract(unsure, span);
                }
                only_maybe |= !unsure.is_empty();
            }
            for span in covered.into_iter().chain(maybe) {
                open = subtract(open, span);
            }
            if open.is_empty() {
                break;
            }
        }
        let held = presence == Presence::Held;
        // Times of nobody, or of an owner that only may have held it: nobody is an answer
        // unless the flow proves the address was held.
        let nobody = !open.is_empty() || only_maybe;
        match owners.as_slice() {
            [] => Found::of(Endpoint::unknown()),
            _ if !open.is_empty() && !held => Found::of(Endpoint::unknown()),
            [one] if !nobody || held => Found {
                endpoint: Endpoint::exact(Arc::clone(one)),
                by_presence: nobody,
            },
            many => {
                let many: SmallVec<[Arc<Identity>; 4]> =
                    many.iter().map(|o| Arc::clone(o)).collect();
                Found::of(Endpoint::ambiguous(&many))
            }
        }
    }

    /// Whether `source` held a prefix containing `addr` at some time after `after`.
    fn held_after(&self, addr: K, source: u16, after: u64) -> bool {
        self.lens.iter().any(|(len, map)| {
            map.get(&addr.masked(*len))
                .is_some_and(|slot| slot.held_after(source, after))
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

/// A source's progress. Sources are numbered in the order the index first hears of them (a
/// registration or a change); intervals carry the number.
#[derive(Debug, Clone)]
struct SourceState {
    name: String,
    /// Registered sources gate [`IdentityIndex::caught_up_to`] and [`IdentityIndex::unsettled`].
    registered: bool,
    watermark: Option<u64>,
    timing: Timing,
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
#[derive(Debug)]
pub struct IdentityIndex {
    v4: Family<u32>,
    v6: Family<u128>,
    open: Map<OwnerKey, OpenInterval>,
    /// Closes that arrived with no open interval, by owner: the close time.
    pending_closes: Map<OwnerKey, u64>,
    sources: Vec<SourceState>,
    source_numbers: Map<String, u16>,
    /// [`IdentityIndex::caught_up_to`], kept as watermarks and registrations change (it is read
    /// for every flow).
    caught_up_to: Option<u64>,
    next_id: u64,
    /// Intervals held, kept as they change so that reading it is free.
    interval_count: usize,
    counts: ChangeCounts,
}

impl Default for IdentityIndex {
    fn default() -> Self {
        Self {
            v4: Family::default(),
            v6: Family::default(),
            open: Map::default(),
            pending_closes: Map::default(),
            sources: Vec::new(),
            source_numbers: Map::default(),
            // No source registered: nothing to wait for.
            caught_up_to: Some(u64::MAX),
            next_id: 0,
            interval_count: 0,
            counts: ChangeCounts::default(),
        }
    }
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
        self.register_source_with(source, Timing::Continuous);
    }

    /// [`register_source`](Self::register_source) with how the source dates its changes, which
    /// decides which flows wait for it ([`Self::unsettled`]). Registering again updates it.
    pub fn register_source_with(&mut self, source: &str, timing: Timing) {
        let n = self.source_number(source);
        let state = &mut self.sources[usize::from(n)];
        state.registered = true;
        state.timing = timing;
        self.update_caught_up_to();
    }

    /// The number of `source`, given it on first sight. Past 65,535 names (never in practice)
    /// the last number stands for the rest.
    fn source_number(&mut self, source: &str) -> u16 {
        if let Some(&n) = self.source_numbers.get(source) {
            return n;
        }
        let Ok(n) = u16::try_from(self.sources.len()) else {
            return u16::MAX;
        };
        self.sources.push(SourceState {
            name: source.to_owned(),
            registered: false,
            watermark: None,
            timing: Timing::Continuous,
        });
        self.source_numbers.insert(source.to_owned(), n);
        n
    }

    fn update_caught_up_to(&mut self) {
        self.caught_up_to = self
            .sources
            .iter()
            .filter(|s| s.registered)
            .try_fold(u64::MAX, |min, s| s.watermark.map(|w| min.min(w)));
    }

    /// Applies one change. Never fails: odd changes are counted (see [`ChangeCounts`]).
    pub fn apply(&mut self, change: OwnershipChange) {
        metrics::counter!(crate::metrics::CHANGES, "kind" => change.kind()).increment(1);
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
                source,
                prefix,
                identity,
                from_ns,
                to_ns,
                ..
            } => {
                self.counts.uncertain += 1;
                self.uncertain(&source, canonical(prefix), identity, from_ns, to_ns);
            }
            OwnershipChange::Watermark { source, at_ns } => {
                self.counts.watermarks += 1;
                self.watermark(source, at_ns);
            }
        }
    }

    /// A span `[from, to)` in which `identity` may have held `prefix`: held as a candidate for
    /// lookups in it (an empty or re-sent span adds nothing).
    fn uncertain(
        &mut self,
        source: &str,
        prefix: IpNet,
        identity: Arc<Identity>,
        from: u64,
        to: u64,
    ) {
        if from >= to
            || self
                .slot(prefix)
                .is_some_and(|slot| slot.has_maybe(from, to, &identity))
        {
            return;
        }
        let id = self.next_id();
        let source = self.source_number(source);
        self.slot_or_insert(prefix)
            .insert_interval(from, to, id, source, identity, true);
        self.interval_count += 1;
    }

    fn open(&mut self, key: OwnerKey, identity: Arc<Identity>, at: u64) {
        let prefix = key.prefix;
        if let Some(open) = self.open.get(&key).copied() {
            self.counts.duplicate_opens += 1;
            metrics::counter!(crate::metrics::DUPLICATE_OPENS).increment(1);
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
                    slot.insert(at, iv.to, iv.id, iv.source, iv.identity);
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
                let source = slot.intervals[pos].source;
                slot.intervals[pos].to = at;
                slot.fix_reach(pos);
                slot.insert(at, OPEN_END, id, source, identity);
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
                metrics::counter!(crate::metrics::LATE_OPENS).increment(1);
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
            metrics::counter!(crate::metrics::STALE_OPENS).increment(1);
            return;
        }
        let id = self.next_id();
        let source = self.source_number(&key.source);
        self.slot_or_insert(prefix)
            .insert(at, closed_at.unwrap_or(OPEN_END), id, source, identity);
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
            metrics::counter!(crate::metrics::UNMATCHED_CLOSES).increment(1);
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
            metrics::counter!(crate::metrics::INVERTED_CLOSES).increment(1);
        }
    }

    fn count_stale_close(&mut self) {
        self.counts.stale_closes += 1;
        metrics::counter!(crate::metrics::STALE_CLOSES).increment(1);
    }

    fn watermark(&mut self, source: String, at: u64) {
        let n = self.source_number(&source);
        let state = &mut self.sources[usize::from(n)];
        if !state.registered {
            self.counts.unregistered_watermarks += 1;
            metrics::counter!(crate::metrics::UNREGISTERED_WATERMARKS).increment(1);
        }
        match state.watermark {
            Some(w) if at < w => {
                self.counts.watermark_regressions += 1;
                metrics::counter!(crate::metrics::WATERMARK_REGRESSIONS).increment(1);
            }
            _ => {
                state.watermark = Some(at);
                if state.registered {
                    self.update_caught_up_to();
                }
            }
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
        self.lookup_point(addr, at_ns, Presence::Unproven).endpoint
    }

    fn lookup_point(&self, addr: IpAddr, at_ns: u64, presence: Presence) -> Found {
        let found = match addr.to_canonical() {
            IpAddr::V4(a) => self.v4.lookup(a.to_bits(), at_ns, presence),
            IpAddr::V6(a) => self.v6.lookup(a.to_bits(), at_ns, presence),
        };
        found.unwrap_or_else(|| Found::of(Endpoint::unknown()))
    }

    /// Who owned `addr` throughout the window `[at_ns - skew_ns, at_ns + skew_ns]` (both ends
    /// included): a flow's start read on one host's clock, compared with inventory times read
    /// on others, is only known to within the skew. Every time of the window is looked up as
    /// [`Self::lookup`] does; the window's answer is
    /// - `exact` if every time gets the same single owner,
    /// - `unknown` if any time gets nobody (no prefix has an interval then: "nobody" is one of
    ///   the possible answers, and it cannot be named as a candidate),
    /// - otherwise `ambiguous`, naming every owner any time gets (the owners on both sides of a
    ///   change inside the window, or overlapping owners).
    ///
    /// `skew_ns` 0 is exactly [`Self::lookup`] at `at_ns`.
    pub fn lookup_around(&self, addr: IpAddr, at_ns: u64, skew_ns: u64) -> Endpoint {
        self.lookup_with(addr, at_ns, skew_ns, Presence::Unproven)
            .endpoint
    }

    /// [`Self::lookup_around`], with what the flow proves about the address
    /// ([`Presence`]): with [`Presence::Held`], nobody is not one of the answers, so an end
    /// whose only candidate is an owner known to within an uncertain span (or a window that
    /// meets one owner and times of nobody) is that owner's, `exact`, and
    /// [`Found::by_presence`] says so.
    pub fn lookup_with(&self, addr: IpAddr, at_ns: u64, skew_ns: u64, presence: Presence) -> Found {
        if skew_ns == 0 {
            return self.lookup_point(addr, at_ns, presence);
        }
        let (lo, hi) = (
            at_ns.saturating_sub(skew_ns),
            at_ns.saturating_add(skew_ns).saturating_add(1),
        );
        match addr.to_canonical() {
            IpAddr::V4(a) => self.v4.lookup_window(a.to_bits(), lo, hi, presence),
            IpAddr::V6(a) => self.v6.lookup_window(a.to_bits(), lo, hi, presence),
        }
    }

    /// The minimum watermark over registered sources: flows newer than this must be held.
    /// `None` while a registered source has sent no watermark; `Some(u64::MAX)` when no source is
    /// registered (there is nothing to wait for).
    pub fn caught_up_to(&self) -> Option<u64> {
        self.caught_up_to
    }

    /// Whether a flow at `at_ns` can be attributed now: every registered source's view is
    /// complete at that time (`at_ns <= caught_up_to`). Otherwise the flow is held.
    pub fn is_caught_up(&self, at_ns: u64) -> bool {
        self.caught_up_to().is_some_and(|w| at_ns <= w)
    }

    /// The latest watermark `source` sent, registered or not.
    pub fn watermark_of(&self, source: &str) -> Option<u64> {
        let n = self.source_numbers.get(source)?;
        self.sources[usize::from(*n)].watermark
    }

    /// The registered sources whose next report could still change who owned `addr` at a time
    /// up to `until_ns` (a flow's start, plus the clock-skew allowance): a flow looked up there
    /// now could get an answer that a later report contradicts, so it waits for them. Empty
    /// when every registered source's watermark has reached `until_ns`. Otherwise, per source
    /// lagging behind it ([`Timing`]): a [`Timing::Continuous`] source, or one that has sent no
    /// watermark yet, is unsettled for every address; a [`Timing::Polled`] source only where it
    /// held a prefix containing `addr` after its watermark (its next poll could hand that prefix
    /// over from just after the watermark), or where `until_ns` reaches its next poll's start
    /// (`watermark + period`).
    pub fn unsettled(&self, addr: IpAddr, until_ns: u64) -> SourceSet {
        let mut set = SourceSet::EMPTY;
        if self.caught_up_to.is_some_and(|w| w >= until_ns) {
            return set;
        }
        for n in 0..self.sources.len() {
            if self.settles_at(n, addr, until_ns).is_some() {
                set.insert(n);
            }
        }
        set
    }

    /// For source number `n`, unsettled for `addr` up to `until_ns` ([`Self::unsettled`]): the
    /// lowest watermark of it worth checking again at — the flow cannot be settled by it
    /// before. `None` if it is settled now (or not registered). A continuous source settles
    /// the flow when its watermark reaches `until_ns`; a polled one may at its next watermark
    /// (the address it held may be gone by then), at the latest when its watermark has passed
    /// `until_ns - period`.
    pub fn settles_at(&self, n: usize, addr: IpAddr, until_ns: u64) -> Option<u64> {
        let s = self.sources.get(n).filter(|s| s.registered)?;
        match (s.watermark, s.timing) {
            (Some(w), _) if w >= until_ns => None,
            (None, Timing::Continuous) | (Some(_), Timing::Continuous) => Some(until_ns),
            (None, Timing::Polled { .. }) => Some(0),
            (Some(w), timing) => {
                let due = w.saturating_add(timing.period_ns());
                if self.held_after(addr, n as u16, w) {
                    Some(w.saturating_add(1))
                } else if until_ns >= due {
                    Some((until_ns - timing.period_ns()).saturating_add(1).max(w + 1))
                } else {
                    None
                }
            }
        }
    }

    /// Whether source number `source` held a prefix containing `addr` after `after`.
    fn held_after(&self, addr: IpAddr, source: u16, after: u64) -> bool {
        match addr.to_canonical() {
            IpAddr::V4(a) => self.v4.held_after(a.to_bits(), source, after),
            IpAddr::V6(a) => self.v6.held_after(a.to_bits(), source, after),
        }
    }

    /// The name of source number `n` (as in [`Self::unsettled`]'s sets).
    pub fn source_name(&self, n: usize) -> Option<&str> {
        self.sources.get(n).map(|s| s.name.as_str())
    }

    /// How source number `n` dates its changes.
    pub fn source_timing(&self, n: usize) -> Option<Timing> {
        self.sources.get(n).map(|s| s.timing)
    }

    /// The registered sources: number, name, timing and latest watermark.
    pub fn registered_sources(
        &self,
    ) -> impl Iterator<Item = (usize, &str, Timing, Option<u64>)> + '_ {
        self.sources
            .iter()
            .enumerate()
            .filter(|(_, s)| s.registered)
            .map(|(n, s)| (n, s.name.as_str(), s.timing, s.watermark))
    }

    /// Forgets intervals that closed before `before_ns` (bounded memory); returns how many.
    /// An interval `[from, to)` with `to <= before_ns` contains no time at or after `before_ns`,
    /// so lookups at those times answer as before. Pending closes as old go too.
    pub fn prune(&mut self, before_ns: u64) -> usize {
        let removed = self.v4.prune(before_ns) + self.v6.prune(before_ns);
        self.interval_count -= removed;
        self.pending_closes.retain(|_, at| *at > before_ns);
        metrics::counter!(crate::metrics::PRUNED_INTERVALS).increment(removed as u64);
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
