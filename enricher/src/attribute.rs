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
//! - **Hold**: the index is complete only up to [`IdentityIndex::caught_up_to`] (the oldest
//!   watermark of its sources). A flow that started after that is held, in arrival order, until
//!   the inventory catches up to its start or `hold` has passed; past the hold its index lookups
//!   are `unknown` — the inventory could not vouch for that time, and a guess must not pass as
//!   fact. Held flows are counted (`flowlog_enricher_held_total`, `flowlog_enricher_held`).
use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use flowlog_identity::{CgroupResolver, IdentityIndex, SharedIndex};
use flowlog_record::{Attribution, Endpoint, EnrichedFlow, FlowRecord};
use metrics::{Counter, counter, gauge};

use crate::metrics as m;

/// A record waiting for the inventory to catch up to its start.
struct Held<T> {
    record: FlowRecord,
    token: T,
    deadline: Instant,
}

/// The attribution stage. `T` is what the caller needs back with each enriched flow to settle
/// its input (a Kafka partition and offset; nothing in the embedded mode).
pub struct Attributor<T> {
    index: SharedIndex,
    counters: Counters,
    cgroups: Option<Arc<CgroupResolver>>,
    hold: Duration,
    held: VecDeque<Held<T>>,
}

/// `flowlog_enricher_attributed_total` by end (local, remote) and status, registered once: the
/// counters are bumped twice per flow, and looking them up by their labels each time would cost
/// about as much as the lookups they count.
struct Counters {
    attributed: [[Counter; 3]; 2],
}

impl Counters {
    fn new() -> Self {
        let end = |end: &'static str| {
            Attribution::ALL
                .map(|s| counter!(m::ATTRIBUTED_TOTAL, "end" => end, "status" => s.as_str()))
        };
        Self {
            attributed: [end("local"), end("remote")],
        }
    }
}

/// Current time in ns since the Unix epoch (the clock of the records' timestamps).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl<T> Attributor<T> {
    /// `cgroups` resolves the local end from the record's cgroup id: give it only where the
    /// records come from this very host (cgroup ids are host-local).
    pub fn new(index: SharedIndex, cgroups: Option<Arc<CgroupResolver>>, hold: Duration) -> Self {
        Self {
            index,
            counters: Counters::new(),
            cgroups,
            hold,
            held: VecDeque::new(),
        }
    }

    /// Flows held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Attributes `record` into `out` at once if the inventory has caught up to its start, or
    /// holds it. Releases whatever the inventory caught up to first.
    pub fn push(
        &mut self,
        record: FlowRecord,
        token: T,
        now: Instant,
        out: &mut Vec<(EnrichedFlow, T)>,
    ) {
        self.release(now, out);
        let index = self.index.read();
        if caught_up(&index, record.start_ns) {
            out.push((
                enrich(
                    &index,
                    &self.counters,
                    self.cgroups.as_deref(),
                    record,
                    true,
                ),
                token,
            ));
            return;
        }
        drop(index);
        counter!(m::HELD_TOTAL).increment(1);
        self.held.push_back(Held {
            record,
            token,
            deadline: now + self.hold,
        });
        gauge!(m::HELD).set(self.held.len() as f64);
    }

    /// Attributes the held flows, in arrival order, that the inventory has caught up to or whose
    /// hold has passed.
    pub fn release(&mut self, now: Instant, out: &mut Vec<(EnrichedFlow, T)>) {
        if self.held.is_empty() {
            return;
        }
        let index = self.index.read();
        while let Some(front) = self.held.front() {
            let ready = caught_up(&index, front.record.start_ns);
            if !ready && front.deadline > now {
                break;
            }
            let Held { record, token, .. } = self.held.pop_front().expect("front exists");
            if !ready {
                counter!(m::HOLD_EXPIRED_TOTAL).increment(1);
            }
            out.push((
                enrich(
                    &index,
                    &self.counters,
                    self.cgroups.as_deref(),
                    record,
                    ready,
                ),
                token,
            ));
        }
        gauge!(m::HELD).set(self.held.len() as f64);
    }

    /// Attributes every held flow now (shutdown): those the inventory has not caught up to are
    /// `unknown`.
    pub fn release_all(&mut self, out: &mut Vec<(EnrichedFlow, T)>) {
        let index = self.index.read();
        for Held { record, token, .. } in self.held.drain(..) {
            let ready = caught_up(&index, record.start_ns);
            out.push((
                enrich(
                    &index,
                    &self.counters,
                    self.cgroups.as_deref(),
                    record,
                    ready,
                ),
                token,
            ));
        }
        gauge!(m::HELD).set(0.0);
    }

    /// When the oldest held flow's hold ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.front().map(|h| h.deadline)
    }
}

/// The enriched flow of `record`; index lookups only where the inventory has `caught_up`.
fn enrich(
    index: &IdentityIndex,
    counters: &Counters,
    cgroups: Option<&CgroupResolver>,
    record: FlowRecord,
    caught_up: bool,
) -> EnrichedFlow {
    let at = record.start_ns;
    let lookup = |addr| {
        if caught_up {
            index.lookup(addr, at)
        } else {
            Endpoint::unknown()
        }
    };
    let local = record
        .cgroup_id
        .and_then(|id| cgroups?.resolve(id))
        .map(Endpoint::exact)
        .unwrap_or_else(|| lookup(record.local_addr));
    let remote = lookup(record.remote_addr);
    counters.attributed[0][local.status as usize].increment(1);
    counters.attributed[1][remote.status as usize].increment(1);
    EnrichedFlow {
        flow: record,
        local,
        remote,
        enriched_ns: now_ns(),
    }
}

/// Whether every source of `index` has reported up to `at_ns`.
fn caught_up(index: &IdentityIndex, at_ns: u64) -> bool {
    index.caught_up_to().is_some_and(|t| t >= at_ns)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use flowlog_identity::OwnershipChange;
    use flowlog_record::{Attribution, Direction, Family, Identity, Outcome};

    use super::*;

    fn record(id: u64, start_ns: u64) -> FlowRecord {
        FlowRecord {
            flow_id: id,
            host: "h".into(),
            seq: 0,
            start_ns,
            end_ns: start_ns + 1,
            family: Family::Ipv4,
            local_addr: "192.0.2.1".parse().unwrap(),
            local_port: 40_000,
            remote_addr: "10.0.0.1".parse().unwrap(),
            remote_port: 443,
            direction: Direction::Outbound,
            outcome: Outcome::Closed,
            bytes_sent: 0,
            bytes_received: 0,
            segs_sent: 0,
            segs_received: 0,
            retransmits: 0,
            resets_sent: 0,
            resets_received: 0,
            srtt_us: 0,
            min_rtt_us: 0,
            pid: None,
            comm: None,
            cgroup_id: None,
        }
    }

    fn watermark(index: &SharedIndex, at_ns: u64) {
        index.write().apply(OwnershipChange::Watermark {
            source: "s".into(),
            at_ns,
        });
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
