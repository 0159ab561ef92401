//! Attribution: both ends of a flow record → the identities that owned them **as of the flow's
//! start**, with the hold that keeps flows newer than the inventory from being attributed on a
//! stale view.
//!
//! - The lookup time of both ends is the record's `start_ns`: who owned the address when the
//!   connection was made (an interim or end record reports it later, when the owner may be gone).
//! - The remote end, and the local end when the record's own process context does not name it,
//!   are looked up in the [`IdentityIndex`]. On the reporting host itself (the embedded mode) the
//!   local end comes first from the process's cgroup ([`CgroupResolver`]): a container or unit
//!   is more specific than the host's address.
//! - **Clock skew**: `start_ns` is read on the flow's host, the inventory's times on other
//!   machines. With an allowance `skew` ([`Attributor::with_clock_skew`]) an end is looked up
//!   over the whole window `[start - skew, start + skew]`
//!   ([`IdentityIndex::lookup_around`]): `exact` only if one owner held the address for all of
//!   it, `ambiguous` naming both owners if it crosses a change of owner, `unknown` if part of it
//!   had no owner at all. Ends whose answer the window changed from the start's own are counted
//!   in `flowlog_enricher_skew_widened_total{end,status}`. Skew 0 is a lookup at the start.
//! - **What the flow proves** ([`Presence`]): an owner known only to within an uncertain span
//!   (a Kubernetes change dated between two probes) leaves "that owner or nobody" for a time
//!   inside the span. A remote end whose peer answered ([`FlowRecord::peer_answered`]: the
//!   handshake completed) and every local end (the host used its own address) rule nobody out,
//!   so such an end is that owner's, `exact`
//!   (`flowlog_enricher_presence_resolved_total{end}`). A failed connect proves nothing and stays
//!   `ambiguous`.
//! - **Hold, per source**: a flow waits only for the sources that could still change the answer
//!   for its addresses up to `start + skew` ([`IdentityIndex::unsettled`]): a source that
//!   streams its changes ([`Timing::Continuous`]) whenever its watermark is behind that time; a
//!   source that polls ([`Timing::Polled`], EC2) only for addresses it holds (its next poll may
//!   reveal a handover) or once the next poll is due. It waits for each such source at most that
//!   source's **patience**: `hold` for a continuous source, its period + `hold` for a polled one
//!   (so a flow to an EC2 address waits for EC2's next poll, not `hold`, and a flow nobody but a
//!   fast source can answer is not delayed by EC2 at all). When the sources it waits for have
//!   caught up, or the patience of each one still behind has run out, the flow goes out; an end
//!   that a source behind could still change is `unknown` — the inventory could not vouch for
//!   that time, and a guess must not pass as fact.
//! - Held flows are released by events, not by scanning: each waits on one source until that
//!   source's watermark reaches the flow's threshold ([`IdentityIndex::settles_at`]), then is
//!   checked again (and released, or set to wait on the next source); and in one deadline queue
//!   per patience it waits with, in arrival order. So no flow waits behind another (a flow to
//!   an EC2 address does not hold up a flow that only a faster source could change), and a
//!   flow's records, which share its start and addresses, come out in the order they came in.
//! - Counted: `flowlog_enricher_held_total`, `flowlog_enricher_held`,
//!   `flowlog_enricher_hold_expired_total`, and per source `flowlog_enricher_waits_total` and
//!   `flowlog_enricher_wait_expired_total`; the time held in `flowlog_enricher_hold_seconds`.
use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use flowlog_identity::{CgroupResolver, IdentityIndex, Presence, SharedIndex, SourceSet, Timing};
use flowlog_record::{Attribution, Endpoint, EnrichedFlow, FlowRecord, Identity};
use metrics::{Counter, Histogram, counter, gauge, histogram};
use smallvec::SmallVec;

use crate::metrics as m;

/// A record waiting for the sources that could still change its answer.
struct Held<T> {
    record: FlowRecord,
    token: T,
    /// The local end's identity from its cgroup, if it has one (then the index is not asked).
    local: Option<Arc<Identity>>,
    arrived: Instant,
    /// The `(source, threshold)` it waits on in [`HeldFlows::blocked`].
    blocker: (usize, u64),
}

/// The sources each end of a flow waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Waits {
    local: SourceSet,
    remote: SourceSet,
}

impl Waits {
    fn all(self) -> SourceSet {
        self.local.union(self.remote)
    }
}

/// The held flows and the two ways they leave: a watermark reaching their threshold, or the
/// patience of a source they wait for running out.
struct HeldFlows<T> {
    flows: HashMap<u64, Held<T>>,
    next: u64,
    /// `(source, threshold, flow)`: the flow waits until that source's watermark reaches the
    /// threshold.
    blocked: BTreeSet<(usize, u64, u64)>,
    /// Per patience, `(deadline, flow)` in arrival order, so deadlines are in order too. A flow
    /// is in the queue of every patience of the sources it waited for when it came in; entries
    /// of flows already gone are skipped.
    deadlines: Vec<(Duration, VecDeque<(Instant, u64)>)>,
}

/// What a held flow does now.
enum Verdict {
    /// Goes out, `unknown` at the ends that some source behind could still change.
    Release(Waits),
    /// Waits until `source`'s watermark reaches the threshold.
    Block(usize, u64),
}

/// The attribution stage. `T` is what the caller needs back with each enriched flow to settle
/// its input (a Kafka partition and offset; nothing in the embedded mode).
pub struct Attributor<T> {
    index: SharedIndex,
    counters: Counters,
    cgroups: Option<Arc<CgroupResolver>>,
    hold: Duration,
    skew_ns: u64,
    held: HeldFlows<T>,
    /// Per source number: its wait counters, made on first use.
    per_source: Vec<Option<SourceCounters>>,
}

/// `flowlog_enricher_attributed_total` by end (local, remote) and status, registered once: the
/// counters are bumped twice per flow, and looking them up by their labels each time would cost
/// about as much as the lookups they count. The same for the skew and hold metrics.
struct Counters {
    attributed: [[Counter; 3]; 2],
    /// `flowlog_enricher_skew_widened_total` by end and status (ambiguous, unknown).
    widened: [[Counter; 2]; 2],
    /// `flowlog_enricher_presence_resolved_total` by end.
    held_resolved: [Counter; 2],
    hold_seconds: Histogram,
}

impl Counters {
    fn new() -> Self {
        let end = |end: &'static str| {
            Attribution::ALL
                .map(|s| counter!(m::ATTRIBUTED_TOTAL, "end" => end, "status" => s.as_str()))
        };
        let widened = |end: &'static str| {
            [Attribution::Ambiguous, Attribution::Unknown]
                .map(|s| counter!(m::SKEW_WIDENED_TOTAL, "end" => end, "status" => s.as_str()))
        };
        Self {
            attributed: [end("local"), end("remote")],
            widened: [widened("local"), widened("remote")],
            held_resolved: ["local", "remote"]
                .map(|end| counter!(m::PRESENCE_RESOLVED_TOTAL, "end" => end)),
            hold_seconds: histogram!(m::HOLD_SECONDS),
        }
    }
}

/// One source's wait counters.
struct SourceCounters {
    waits: Counter,
    expired: Counter,
}

/// Current time in ns since the Unix epoch (the clock of the records' timestamps).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// How long a flow may wait for a source that dates its changes by `timing`: `hold` for a
/// continuous source; the poll period + `hold` for a polled one (its next report is due a
/// period after its last, and `hold` is the allowance for it to arrive).
pub fn patience(hold: Duration, timing: Timing) -> Duration {
    match timing {
        Timing::Continuous => hold,
        Timing::Polled { period } => period.saturating_add(hold),
    }
}

impl<T> Attributor<T> {
    /// `cgroups` resolves the local end from the record's cgroup id: give it only where the
    /// records come from this very host (cgroup ids are host-local). `hold`: the longest a flow
    /// waits for a continuous source, and the allowance beyond a polled source's period.
    pub fn new(index: SharedIndex, cgroups: Option<Arc<CgroupResolver>>, hold: Duration) -> Self {
        Self {
            index,
            counters: Counters::new(),
            cgroups,
            hold,
            skew_ns: 0,
            held: HeldFlows {
                flows: HashMap::new(),
                next: 0,
                blocked: BTreeSet::new(),
                deadlines: Vec::new(),
            },
            per_source: Vec::new(),
        }
    }

    /// Allows the flows' clocks to differ from the inventories' by up to `skew` (see the
    /// module's documentation). Default 0.
    pub fn with_clock_skew(mut self, skew: Duration) -> Self {
        self.skew_ns = u64::try_from(skew.as_nanos()).unwrap_or(u64::MAX);
        self
    }

    /// Flows held now.
    pub fn held(&self) -> usize {
        self.held.flows.len()
    }

    /// Attributes `record` into `out` at once if no source could still change its answer, or
    /// holds it. Releases whatever has become ready first.
    pub fn push(
        &mut self,
        record: FlowRecord,
        token: T,
        now: Instant,
        out: &mut Vec<(EnrichedFlow, T)>,
    ) {
        self.release(now, out);
        let local = self.local_identity(&record);
        let index = self.index.read();
        let waits = waits(&index, &record, local.is_some(), self.skew_ns);
        if waits.all().is_empty() {
            let flow = enrich(
                &index,
                &self.counters,
                record,
                local,
                Waits::default(),
                self.skew_ns,
            );
            out.push((flow, token));
            return;
        }
        let mut patiences: SmallVec<[Duration; 2]> = SmallVec::new();
        for n in waits.all().iter() {
            let p = patience(self.hold, index.source_timing(n).unwrap_or_default());
            if !patiences.contains(&p) {
                patiences.push(p);
            }
            source_counters(&mut self.per_source, &index, n)
                .waits
                .increment(1);
        }
        counter!(m::HELD_TOTAL).increment(1);
        let verdict = verdict(
            &index,
            &record,
            local.is_some(),
            now,
            now,
            self.hold,
            self.skew_ns,
        );
        let blocker = match verdict {
            Verdict::Block(source, threshold) => (source, threshold),
            // Out of patience at once (a hold of 0): out now, `unknown` where behind.
            Verdict::Release(waits) => {
                count_expired(&mut self.per_source, &index, waits);
                let flow = enrich(&index, &self.counters, record, local, waits, self.skew_ns);
                out.push((flow, token));
                return;
            }
        };
        drop(index);
        let id = self.held.next;
        self.held.next += 1;
        for p in patiences {
            let deadline = now + p;
            match self.held.deadlines.iter_mut().find(|(q, _)| *q == p) {
                Some((_, queue)) => queue.push_back((deadline, id)),
                None => self
                    .held
                    .deadlines
                    .push((p, VecDeque::from([(deadline, id)]))),
            }
        }
        self.held.blocked.insert((blocker.0, blocker.1, id));
        self.held.flows.insert(
            id,
            Held {
                record,
                token,
                local,
                arrived: now,
                blocker,
            },
        );
        gauge!(m::HELD).set(self.held.flows.len() as f64);
    }

    /// Attributes the held flows whose sources have caught up or have run out of patience.
    pub fn release(&mut self, now: Instant, out: &mut Vec<(EnrichedFlow, T)>) {
        if self.held.flows.is_empty() {
            return;
        }
        // Flows to check again: those with a deadline passed, and those whose blocking
        // source's watermark reached their threshold.
        let mut due: Vec<u64> = Vec::new();
        for (_, queue) in &mut self.held.deadlines {
            while let Some(&(deadline, id)) = queue.front() {
                if deadline > now {
                    break;
                }
                queue.pop_front();
                due.push(id);
            }
        }
        let index = self.index.read();
        for (n, _, _, watermark) in index.registered_sources() {
            let Some(w) = watermark else { continue };
            let reached: Vec<(usize, u64, u64)> = self
                .held
                .blocked
                .range((n, 0, 0)..=(n, w, u64::MAX))
                .copied()
                .collect();
            for entry in reached {
                self.held.blocked.remove(&entry);
                due.push(entry.2);
            }
        }
        // In arrival order, so that a flow's records leave in the order they came.
        due.sort_unstable();
        due.dedup();
        for id in due {
            let Some(held) = self.held.flows.get(&id) else {
                continue;
            };
            let (hold, skew_ns) = (self.hold, self.skew_ns);
            let verdict = verdict(
                &index,
                &held.record,
                held.local.is_some(),
                held.arrived,
                now,
                hold,
                skew_ns,
            );
            match verdict {
                Verdict::Block(source, threshold) => {
                    let held = self.held.flows.get_mut(&id).expect("present");
                    // Its old entry may be gone (it was reached) or still there (a deadline).
                    self.held
                        .blocked
                        .remove(&(held.blocker.0, held.blocker.1, id));
                    held.blocker = (source, threshold);
                    self.held.blocked.insert((source, threshold, id));
                }
                Verdict::Release(waits) => {
                    let held = self.held.flows.remove(&id).expect("present");
                    self.held
                        .blocked
                        .remove(&(held.blocker.0, held.blocker.1, id));
                    count_expired(&mut self.per_source, &index, waits);
                    self.counters
                        .hold_seconds
                        .record(now.saturating_duration_since(held.arrived).as_secs_f64());
                    let flow = enrich(
                        &index,
                        &self.counters,
                        held.record,
                        held.local,
                        waits,
                        skew_ns,
                    );
                    out.push((flow, held.token));
                }
            }
        }
        // Entries of flows already gone leave the front, so that `next_deadline` names a flow
        // still held.
        let flows = &self.held.flows;
        for (_, queue) in &mut self.held.deadlines {
            while queue.front().is_some_and(|(_, id)| !flows.contains_key(id)) {
                queue.pop_front();
            }
        }
        gauge!(m::HELD).set(self.held.flows.len() as f64);
    }

    /// Attributes every held flow now (shutdown), in arrival order: an end a source could still
    /// change is `unknown`.
    pub fn release_all(&mut self, out: &mut Vec<(EnrichedFlow, T)>) {
        let index = self.index.read();
        let mut flows: Vec<(u64, Held<T>)> = self.held.flows.drain().collect();
        flows.sort_unstable_by_key(|(id, _)| *id);
        for (_, held) in flows {
            let waits = waits(&index, &held.record, held.local.is_some(), self.skew_ns);
            let flow = enrich(
                &index,
                &self.counters,
                held.record,
                held.local,
                waits,
                self.skew_ns,
            );
            out.push((flow, held.token));
        }
        self.held.blocked.clear();
        self.held.deadlines.clear();
        gauge!(m::HELD).set(0.0);
    }

    /// When the next deadline of a held flow comes (its wait for one of its sources runs out).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held
            .deadlines
            .iter()
            .filter_map(|(_, q)| q.front().map(|(deadline, _)| *deadline))
            .min()
    }

    /// The local end's identity from the record's cgroup, where this host's cgroups are known.
    fn local_identity(&self, record: &FlowRecord) -> Option<Arc<Identity>> {
        record
            .cgroup_id
            .and_then(|id| self.cgroups.as_ref()?.resolve(id))
    }
}

/// The sources each end of `record` waits for: those that could still change its answer up to
/// `start + skew`. The local end waits for nothing when its cgroup names it.
fn waits(index: &IdentityIndex, record: &FlowRecord, local_known: bool, skew_ns: u64) -> Waits {
    let until = record.start_ns.saturating_add(skew_ns);
    Waits {
        local: match local_known {
            true => SourceSet::EMPTY,
            false => index.unsettled(record.local_addr, until),
        },
        remote: index.unsettled(record.remote_addr, until),
    }
}

/// What a held flow (arrived at `arrived`) does at `now`: goes out if every source its ends
/// wait for has caught up or run out of patience; else waits on the first source still within
/// its patience, until that source's watermark reaches the threshold that could settle it.
fn verdict(
    index: &IdentityIndex,
    record: &FlowRecord,
    local_known: bool,
    arrived: Instant,
    now: Instant,
    hold: Duration,
    skew_ns: u64,
) -> Verdict {
    let waits = waits(index, record, local_known, skew_ns);
    let until = record.start_ns.saturating_add(skew_ns);
    for n in waits.all().iter() {
        let timing = index.source_timing(n).unwrap_or_default();
        if arrived + patience(hold, timing) <= now {
            continue;
        }
        let ends = [
            (waits.local.contains(n), record.local_addr),
            (waits.remote.contains(n), record.remote_addr),
        ];
        let threshold = ends
            .iter()
            .filter(|(waiting, _)| *waiting)
            .filter_map(|(_, addr)| index.settles_at(n, *addr, until))
            .min()
            // Source numbers from 63 on share a bit: check again at its next watermark.
            .unwrap_or(0);
        return Verdict::Block(n, threshold);
    }
    Verdict::Release(waits)
}

/// Counts a flow that goes out with sources still behind (their patience ran out).
fn count_expired(
    per_source: &mut Vec<Option<SourceCounters>>,
    index: &IdentityIndex,
    waits: Waits,
) {
    if waits.all().is_empty() {
        return;
    }
    counter!(m::HOLD_EXPIRED_TOTAL).increment(1);
    for n in waits.all().iter() {
        source_counters(per_source, index, n).expired.increment(1);
    }
}

fn source_counters<'a>(
    per_source: &'a mut Vec<Option<SourceCounters>>,
    index: &IdentityIndex,
    n: usize,
) -> &'a SourceCounters {
    if per_source.len() <= n {
        per_source.resize_with(n + 1, || None);
    }
    per_source[n].get_or_insert_with(|| {
        let source = index.source_name(n).unwrap_or("?").to_owned();
        SourceCounters {
            waits: counter!(m::WAITS_TOTAL, "source" => source.clone()),
            expired: counter!(m::WAIT_EXPIRED_TOTAL, "source" => source),
        }
    })
}

/// The enriched flow of `record`: each end looked up over the skew window, or `unknown` where
/// a source it waited for is still behind (`waits`).
fn enrich(
    index: &IdentityIndex,
    counters: &Counters,
    record: FlowRecord,
    local_identity: Option<Arc<Identity>>,
    waits: Waits,
    skew_ns: u64,
) -> EnrichedFlow {
    let at = record.start_ns;
    let lookup = |addr, behind: SourceSet, end: usize, presence| {
        if !behind.is_empty() {
            return Endpoint::unknown();
        }
        let found = index.lookup_with(addr, at, skew_ns, presence);
        if found.by_presence {
            counters.held_resolved[end].increment(1);
        }
        let found = found.endpoint;
        if skew_ns > 0 && found.status != Attribution::Exact {
            let alone = index.lookup_with(addr, at, 0, presence).endpoint;
            if alone.status != found.status {
                counters.widened[end][found.status as usize - 1].increment(1);
            }
        }
        found
    };
    // The reporting host used its own address: something held it.
    let local = match local_identity {
        Some(identity) => Endpoint::exact(identity),
        None => lookup(record.local_addr, waits.local, 0, Presence::Held),
    };
    let remote_presence = if record.peer_answered() {
        Presence::Held
    } else {
        Presence::Unproven
    };
    let remote = lookup(record.remote_addr, waits.remote, 1, remote_presence);
    counters.attributed[0][local.status as usize].increment(1);
    counters.attributed[1][remote.status as usize].increment(1);
    EnrichedFlow {
        flow: record,
        local,
        remote,
        enriched_ns: now_ns(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use flowlog_identity::OwnershipChange;
    use flowlog_record::{Attribution, Identity, Outcome};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn record(id: u64, start_ns: u64) -> FlowRecord {
        FlowRecord {
            flow_id: id,
            host: "h".into(),
            start_ns,
            end_ns: start_ns + 1,
            local_addr: "192.0.2.1".parse().unwrap(),
            local_port: 40_000,
            remote_addr: "10.0.0.1".parse().unwrap(),
            remote_port: 443,
            ..FlowRecord::default()
        }
    }

    fn watermark(index: &SharedIndex, at_ns: u64) {
        index.write().apply(OwnershipChange::Watermark {
            source: "s".into(),
            at_ns,
        });
    }

    fn watermark_of(index: &SharedIndex, source: &str, at_ns: u64) {
        index.write().apply(OwnershipChange::Watermark {
            source: source.into(),
            at_ns,
        });
    }

    fn named(name: &str) -> Arc<Identity> {
        Arc::new(Identity {
            name: name.into(),
            ..Identity::default()
        })
    }

    fn open(index: &SharedIndex, source: &str, owner: &str, prefix: &str, at_ns: u64) {
        index.write().apply(OwnershipChange::Open {
            source: source.into(),
            owner: owner.into(),
            prefix: prefix.parse().unwrap(),
            identity: named(owner),
            at_ns,
        });
    }

    fn close(index: &SharedIndex, source: &str, owner: &str, prefix: &str, at_ns: u64) {
        index.write().apply(OwnershipChange::Close {
            source: source.into(),
            owner: owner.into(),
            prefix: prefix.parse().unwrap(),
            at_ns,
        });
    }

    fn to(id: u64, remote: &str, start_ns: u64) -> FlowRecord {
        FlowRecord {
            remote_addr: remote.parse().unwrap(),
            ..record(id, start_ns)
        }
    }

    /// `(token, remote status, remote owner or candidates)` of what came out.
    fn remotes(out: &[(EnrichedFlow, u64)]) -> Vec<(u64, Attribution, String)> {
        out.iter()
            .map(|(e, id)| {
                let who = match &e.remote.identity {
                    Some(i) => i.name.clone(),
                    None => e.remote.candidates.join(","),
                };
                (*id, e.remote.status, who)
            })
            .collect()
    }

    /// A counter's name, labels and value.
    type Counted = (String, Vec<(String, String)>, u64);

    /// Runs `test` with a debugging recorder of its own and returns the counters it recorded.
    fn counted_while(test: impl FnOnce()) -> Vec<Counted> {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, test);
        counters(&snapshotter)
    }

    /// The counters recorded so far. A snapshot of the debugging recorder resets what it
    /// reads, so it is taken once, by [`counted_while`].
    fn counters(snapshotter: &Snapshotter) -> Vec<Counted> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| {
                let DebugValue::Counter(n) = value else {
                    return None;
                };
                let key = key.key();
                let labels = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                Some((key.name().to_owned(), labels, n))
            })
            .collect()
    }

    /// The sum of counter `name` over the series with the label pairs `labels`, 0 if absent.
    fn counter_value(counters: &[Counted], name: &str, labels: &[(&str, &str)]) -> u64 {
        counters
            .iter()
            .filter(|(n, have, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
            })
            .map(|(.., value)| value)
            .sum()
    }

    /// An index with a static source (continuous) that owns 192.168.0.0/16 and has reported up
    /// to 1,000 s, and an EC2-like source polled every 10 s that holds 10.0.0.1 and last polled
    /// at 100 s.
    fn static_and_polled() -> SharedIndex {
        let mut index = IdentityIndex::new();
        index.register_source("static");
        index.register_source_with(
            "ec2",
            Timing::Polled {
                period: Duration::from_secs(10),
            },
        );
        let index = index.into_shared();
        open(&index, "static", "lan", "192.168.0.0/16", 0);
        open(&index, "ec2", "vm-a", "10.0.0.1/32", 0);
        watermark_of(&index, "static", 1_000 * S);
        watermark_of(&index, "ec2", 100 * S);
        index
    }

    /// A flow to an address the polled source holds waits for its next poll — longer than the
    /// hold — and comes out `exact` when the poll confirms the owner; flows the polled source
    /// cannot change go out at once, and are not queued behind it; a flow as new as the next
    /// poll's due time waits for it too.
    #[test]
    fn a_flow_waits_for_a_polled_source_only_where_its_next_poll_could_change_the_answer() {
        let counts = counted_while(|| {
            let index = static_and_polled();
            // EC2 last polled at 995 s: its next poll is due at 1,005 s.
            watermark_of(&index, "ec2", 995 * S);
            let hold = Duration::from_secs(2);
            let mut a: Attributor<u64> = Attributor::new(SharedIndex::clone(&index), None, hold);
            let t = Instant::now();
            let mut out = Vec::new();
            a.push(to(1, "10.0.0.1", 998 * S), 1, t, &mut out);
            assert!(
                out.is_empty(),
                "EC2 holds 10.0.0.1: its next poll may hand it over"
            );
            // EC2's patience: its period + the hold.
            assert_eq!(a.next_deadline(), Some(t + Duration::from_secs(12)));
            a.push(to(2, "192.168.1.1", 998 * S), 2, t, &mut out);
            assert_eq!(
                remotes(&out),
                vec![(2, Attribution::Exact, "lan".into())],
                "EC2 cannot change 192.168.1.1 before its next poll: out at once"
            );
            out.clear();
            // As new as EC2's next poll (995 s + 10 s): that poll may open it. Newer than the
            // static source's watermark too.
            a.push(to(3, "192.168.1.1", 1_005 * S), 3, t, &mut out);
            assert!(out.is_empty());
            // Newer than the static source's watermark, older than EC2's next poll: waits for
            // the static source alone, and is not held up behind the flows waiting for EC2.
            a.push(to(4, "192.168.1.2", 1_001 * S), 4, t, &mut out);
            assert!(out.is_empty());
            assert_eq!(a.held(), 3);
            watermark_of(&index, "static", 1_010 * S);
            a.release(t + Duration::from_secs(1), &mut out);
            assert_eq!(remotes(&out), vec![(4, Attribution::Exact, "lan".into())]);
            out.clear();
            // Past the hold, still within EC2's patience: waiting.
            a.release(t + Duration::from_secs(11), &mut out);
            assert!(out.is_empty(), "{:?}", remotes(&out));
            // EC2's next poll confirms: both come out exact, in arrival order.
            watermark_of(&index, "ec2", 1_005 * S);
            a.release(t + Duration::from_secs(11), &mut out);
            assert_eq!(
                remotes(&out),
                vec![
                    (1, Attribution::Exact, "vm-a".into()),
                    (3, Attribution::Exact, "lan".into())
                ]
            );
            assert_eq!(a.held(), 0);
            assert_eq!(a.next_deadline(), None);
        });
        let waits = |source| counter_value(&counts, m::WAITS_TOTAL, &[("source", source)]);
        assert_eq!((waits("ec2"), waits("static")), (2, 2));
        assert_eq!(counter_value(&counts, m::HELD_TOTAL, &[]), 3);
        assert_eq!(counter_value(&counts, m::HOLD_EXPIRED_TOTAL, &[]), 0);
    }

    /// The next poll reveals a handover between the two polls: the flow in between is
    /// `ambiguous` between both owners; if no poll comes within the period + hold, `unknown`.
    #[test]
    fn a_handover_seen_by_the_next_poll_is_ambiguous_and_no_poll_is_unknown() {
        let counts = counted_while(|| {
            let index = static_and_polled();
            let hold = Duration::from_secs(2);
            let mut a: Attributor<u64> = Attributor::new(SharedIndex::clone(&index), None, hold);
            let t = Instant::now();
            let mut out = Vec::new();
            a.push(to(1, "10.0.0.1", 105 * S), 1, t, &mut out);
            a.push(to(2, "10.0.0.1", 100 * S), 2, t, &mut out);
            assert_eq!(remotes(&out), vec![(2, Attribution::Exact, "vm-a".into())]);
            out.clear();
            // The poll at 110 s: 10.0.0.1 moved from vm-a to vm-b since the poll at 100 s.
            close(&index, "ec2", "vm-a", "10.0.0.1/32", 110 * S);
            a.release(t, &mut out);
            assert!(
                out.is_empty(),
                "the poll's changes are in, its watermark is not"
            );
            open(&index, "ec2", "vm-b", "10.0.0.1/32", 100 * S + 1);
            watermark_of(&index, "ec2", 110 * S);
            a.release(t, &mut out);
            assert_eq!(
                remotes(&out),
                vec![(1, Attribution::Ambiguous, "vm-a,vm-b".into())]
            );
            out.clear();
            // No poll after 110 s: a flow to the held address goes out `unknown` after exactly
            // the period + hold.
            a.push(to(3, "10.0.0.1", 111 * S), 3, t, &mut out);
            a.release(
                t + Duration::from_secs(12) - Duration::from_nanos(1),
                &mut out,
            );
            assert!(out.is_empty());
            a.release(t + Duration::from_secs(12), &mut out);
            assert_eq!(
                remotes(&out),
                vec![(3, Attribution::Unknown, String::new())]
            );
        });
        assert_eq!(
            counter_value(&counts, m::WAIT_EXPIRED_TOTAL, &[("source", "ec2")]),
            1
        );
        assert_eq!(counter_value(&counts, m::HOLD_EXPIRED_TOTAL, &[]), 1);
    }

    /// With a clock-skew allowance, a flow within the skew of a change of owner is `ambiguous`
    /// naming both (counted as widened), one outside it `exact`; a flow waits until the
    /// inventory has reported up to its start + skew. Skew 0 answers as before.
    #[test]
    fn a_clock_skew_allowance_widens_the_window_and_the_wait() {
        let counts = counted_while(|| {
            let mut index = IdentityIndex::new();
            index.register_source("s");
            let index = index.into_shared();
            open(&index, "s", "old", "10.0.0.1/32", 0);
            close(&index, "s", "old", "10.0.0.1/32", 100 * S);
            open(&index, "s", "new", "10.0.0.1/32", 100 * S);
            watermark(&index, 1_000 * S);
            let hold = Duration::from_secs(5);
            let skew = Duration::from_secs(1);
            let mut a: Attributor<u64> =
                Attributor::new(SharedIndex::clone(&index), None, hold).with_clock_skew(skew);
            let mut plain: Attributor<u64> =
                Attributor::new(SharedIndex::clone(&index), None, hold);
            let t = Instant::now();
            let mut out = Vec::new();
            for (id, start) in [(1, 99 * S - 1), (2, 99 * S), (3, 101 * S - 1), (4, 101 * S)] {
                a.push(to(id, "10.0.0.1", start), id, t, &mut out);
            }
            assert_eq!(
                remotes(&out),
                vec![
                    (1, Attribution::Exact, "old".into()),
                    (2, Attribution::Ambiguous, "new,old".into()),
                    (3, Attribution::Ambiguous, "new,old".into()),
                    (4, Attribution::Exact, "new".into()),
                ]
            );
            out.clear();
            for (id, start) in [(2, 99 * S), (3, 101 * S - 1)] {
                plain.push(to(id, "10.0.0.1", start), id, t, &mut out);
            }
            assert_eq!(
                remotes(&out),
                vec![
                    (2, Attribution::Exact, "old".into()),
                    (3, Attribution::Exact, "new".into()),
                ]
            );
            out.clear();
            // Within the skew of the watermark: held until the watermark passes start + skew.
            a.push(to(5, "10.0.0.1", 999 * S), 5, t, &mut out);
            assert_eq!(remotes(&out), vec![(5, Attribution::Exact, "new".into())]);
            out.clear();
            a.push(to(6, "10.0.0.1", 999 * S + 1), 6, t, &mut out);
            assert!(out.is_empty());
            watermark(&index, 1_000 * S + 1);
            a.release(t, &mut out);
            assert_eq!(remotes(&out), vec![(6, Attribution::Exact, "new".into())]);
        });
        let widened = |status| {
            counter_value(
                &counts,
                m::SKEW_WIDENED_TOTAL,
                &[("end", "remote"), ("status", status)],
            )
        };
        assert_eq!((widened("ambiguous"), widened("unknown")), (2, 0));
        // The local end (192.0.2.1) has no owner at any time: the window changes nothing.
        assert_eq!(
            counter_value(&counts, m::SKEW_WIDENED_TOTAL, &[("end", "local")]),
            0
        );
    }

    /// A flow whose start falls in an owner's uncertain span ("it or nobody") is that owner's
    /// when its peer answered (the handshake completed, or an open record with an RTT sample),
    /// counted as resolved by presence; a failed connect there stays `ambiguous`. The local end
    /// (the host's own address) is always held.
    #[test]
    fn a_peer_that_answered_rules_out_nobody_in_an_uncertain_span() {
        let counts = counted_while(|| {
            let mut index = IdentityIndex::new();
            index.register_source("s");
            let index = index.into_shared();
            // The pod that gets 10.0.0.1 did so somewhere in 100–101 s; the host 192.0.2.1's
            // address came up somewhere in 0–200 s.
            for (owner, prefix, from, to) in [
                ("new", "10.0.0.1/32", 100 * S, 101 * S),
                ("host", "192.0.2.1/32", 0, 200 * S),
            ] {
                index.write().apply(OwnershipChange::Uncertain {
                    source: "s".into(),
                    owner: owner.into(),
                    prefix: prefix.parse().unwrap(),
                    identity: named(owner),
                    from_ns: from,
                    to_ns: to,
                });
            }
            open(&index, "s", "new", "10.0.0.1/32", 101 * S);
            watermark(&index, 1_000 * S);
            let mut a: Attributor<u64> =
                Attributor::new(SharedIndex::clone(&index), None, Duration::from_secs(5));
            let t = Instant::now();
            let mut out = Vec::new();
            let at = 100 * S + S / 2;
            let failed = FlowRecord {
                outcome: Outcome::Failed,
                ..to(2, "10.0.0.1", at)
            };
            let open_answered = FlowRecord {
                outcome: Outcome::Open,
                srtt_us: 120,
                ..to(3, "10.0.0.1", at)
            };
            let open_silent = FlowRecord {
                outcome: Outcome::Open,
                ..to(4, "10.0.0.1", at)
            };
            for (id, r) in [
                (1, to(1, "10.0.0.1", at)),
                (2, failed),
                (3, open_answered),
                (4, open_silent),
            ] {
                a.push(r, id, t, &mut out);
            }
            assert_eq!(
                remotes(&out),
                vec![
                    (1, Attribution::Exact, "new".into()),
                    (2, Attribution::Ambiguous, "new".into()),
                    (3, Attribution::Exact, "new".into()),
                    (4, Attribution::Ambiguous, "new".into()),
                ]
            );
            for (e, _) in &out {
                assert_eq!(e.local.identity.as_ref().unwrap().name, "host");
            }
        });
        let resolved = |end| counter_value(&counts, m::PRESENCE_RESOLVED_TOTAL, &[("end", end)]);
        assert_eq!((resolved("local"), resolved("remote")), (4, 2));
    }

    /// Flows newer than the inventory wait for it (in arrival order), up to the hold; past it
    /// their ends are unknown, never guessed from a view that may be stale.
    #[test]
    fn flows_newer_than_the_inventory_are_held() {
        let mut index = IdentityIndex::new();
        index.register_source("s");
        let remote: IpAddr = "10.0.0.1".parse().unwrap();
        index.apply(OwnershipChange::Open {
            source: "s".into(),
            owner: "db".into(),
            prefix: remote.into(),
            identity: Arc::new(Identity {
                name: "db".into(),
                ..Identity::default()
            }),
            at_ns: 0,
        });
        let index = index.into_shared();
        watermark(&index, 100);
        let hold = Duration::from_secs(5);
        let mut a: Attributor<u64> = Attributor::new(SharedIndex::clone(&index), None, hold);
        let t = Instant::now();
        let mut out = Vec::new();
        a.push(record(1, 100), 1, t, &mut out);
        assert_eq!(out.len(), 1, "caught up to its start: attributed at once");
        assert_eq!(out[0].0.remote.status, Attribution::Exact);
        out.clear();
        a.push(record(2, 150), 2, t, &mut out);
        a.push(record(3, 300), 3, t, &mut out);
        assert!(out.is_empty());
        assert_eq!((a.held(), a.next_deadline()), (2, Some(t + hold)));
        watermark(&index, 200);
        a.release(t + Duration::from_secs(1), &mut out);
        let released: Vec<_> = out.iter().map(|(e, id)| (*id, e.remote.status)).collect();
        assert_eq!(released, vec![(2, Attribution::Exact)], "3 is still ahead");
        out.clear();
        a.release(t + hold - Duration::from_nanos(1), &mut out);
        assert!(out.is_empty());
        a.release(t + hold, &mut out);
        let expired: Vec<_> = out.iter().map(|(e, id)| (*id, e.remote.status)).collect();
        assert_eq!(expired, vec![(3, Attribution::Unknown)], "its hold ran out");
        assert_eq!(a.held(), 0);
    }
}
