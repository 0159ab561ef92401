//! Turns the kernel's snapshots ([`FlowEvent`]: cumulative counters since the flow started) into
//! flow records (counters as deltas since the flow's previous record).
//!
//! Three kernel facts shape this module:
//! - `bytes_acked` and `bytes_received` count sequence space, not payload: the connecting side's
//!   SYN, each side's FIN once acknowledged, and the peer's FIN once received are in them. The
//!   flags in each snapshot say which were, and [`payload`] takes them out.
//! - The interim sweep and the socket's close can run at once on two CPUs, so an interim snapshot
//!   can reach us after the flow's end. Ended flows that were old enough to be swept are
//!   remembered for a while ([`Tombstones`]) and late snapshots of them are ignored (their
//!   counters are already in the end record).
//! - A flow can leave the kernel's map without an end: evicted when the map is full, or dropped
//!   by the sweep when its end was missed. The sweep reports every tracked flow once per interim
//!   period, so a flow with records that gets no snapshot for [`VANISH_PERIODS`] periods is gone;
//!   it is forgotten ([`Assembler::forget_vanished`]), so the agent's memory stays bounded, and
//!   any later event of it is ignored rather than restarting its records at `seq` 0. Silence
//!   counts only while the agent keeps up: after kernel record losses or a stall of the agent
//!   every flow starts its three periods afresh.
//! - A flow can be older than the agent: with the kernel state pinned, a restarted agent reads
//!   snapshots of flows an earlier agent reported. The kernel keeps each flow's last snapshot
//!   written by the sweep and its number, and sends them with every snapshot
//!   (`FlowEvent::prev`): the first record of a flow this agent has not seen continues from
//!   there (its `seq`, and the delta since that snapshot), so `seq` goes on and sums stay exact.
//!   Flows this agent has seen use its own memory, as a snapshot racing the close can carry a
//!   `prev` that the close's end record carries too.
//! - The kernel moves a socket to `TCP_CLOSE` *before* it sends the reset of an abortive close,
//!   so an end record that the kernel marks `MAY_RESET` waits [`RESET_GRACE`] for a
//!   `RESET_AFTER_END` amendment before it is released. Ordinary closes are released at once.
use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use flowlog_common::{AF_INET6, FlowEvent, direction, event_kind, flow_flag, tcp_state};

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::record::{Direction, Family, FlowRecord, Outcome};

/// How long an end record waits for a reset that the kernel sends right after the close. The
/// reset follows within microseconds on the same CPU; the margin covers the agent's batching.
pub const RESET_GRACE: Duration = Duration::from_millis(300);

/// How long an ended flow is remembered, to recognise interim snapshots that lost the race with
/// its end. Far longer than the ring buffer's delivery delay.
const TOMBSTONE_GENERATION: Duration = Duration::from_secs(10);

/// Interim periods without a snapshot after which a flow with records is taken to have left
/// the kernel's map. The sweep reports each tracked flow at most a twelfth of a period late.
pub const VANISH_PERIODS: u32 = 3;

/// Cumulative counters of a flow, payload-adjusted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segs_sent: u64,
    pub segs_received: u64,
    pub retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
}

impl Counters {
    /// `self - earlier`, per counter (saturating), and whether any counter went backwards (a
    /// snapshot raced with a state change); the caller then keeps the higher baseline.
    fn since(&self, earlier: &Counters) -> (Counters, bool) {
        let mut regressed = false;
        let mut d = |a: u64, b: u64| {
            if a < b {
                regressed = true;
            }
            a.saturating_sub(b)
        };
        let delta = Counters {
            bytes_sent: d(self.bytes_sent, earlier.bytes_sent),
            bytes_received: d(self.bytes_received, earlier.bytes_received),
            segs_sent: d(self.segs_sent, earlier.segs_sent),
            segs_received: d(self.segs_received, earlier.segs_received),
            retransmits: d(self.retransmits, earlier.retransmits),
            resets_sent: d(self.resets_sent, earlier.resets_sent),
            resets_received: d(self.resets_received, earlier.resets_received),
        };
        (delta, regressed)
    }

    fn max(&self, other: &Counters) -> Counters {
        Counters {
            bytes_sent: self.bytes_sent.max(other.bytes_sent),
            bytes_received: self.bytes_received.max(other.bytes_received),
            segs_sent: self.segs_sent.max(other.segs_sent),
            segs_received: self.segs_received.max(other.segs_received),
            retransmits: self.retransmits.max(other.retransmits),
            resets_sent: self.resets_sent.max(other.resets_sent),
            resets_received: self.resets_received.max(other.resets_received),
        }
    }
}

/// Payload bytes (sent, received) in a snapshot: sequence space minus SYN and FIN.
///
/// - sent: `bytes_acked` counts the connecting side's SYN once the SYN-ACK acknowledges it (the
///   accepting side's SYN-ACK is not counted: its child socket starts past it), and this side's
///   FIN once acknowledged.
/// - received: `bytes_received` counts the peer's FIN once processed (`SOCK_DONE`), never its SYN.
pub fn payload(ev: &FlowEvent) -> (u64, u64) {
    let syn =
        u64::from(ev.direction == direction::OUTBOUND && ev.flags & flow_flag::ESTABLISHED != 0);
    let fin = u64::from(ev.flags & flow_flag::FIN_ACKED != 0);
    let peer_fin = u64::from(ev.flags & flow_flag::PEER_FIN != 0);
    (
        ev.bytes_acked.saturating_sub(syn + fin),
        ev.bytes_received.saturating_sub(peer_fin),
    )
}

/// The flow's previous snapshot written by the sweep (`FlowEvent::prev`) as a snapshot of its own.
fn previous(ev: &FlowEvent) -> FlowEvent {
    FlowEvent {
        bytes_acked: ev.prev.bytes_acked,
        bytes_received: ev.prev.bytes_received,
        segs_out: ev.prev.segs_out,
        segs_in: ev.prev.segs_in,
        total_retrans: ev.prev.total_retrans,
        resets_sent: ev.prev.resets_sent,
        resets_received: ev.prev.resets_received,
        flags: ev.prev.flags,
        direction: ev.direction,
        ..FlowEvent::default()
    }
}

fn cumulative(ev: &FlowEvent) -> Counters {
    let (bytes_sent, bytes_received) = payload(ev);
    Counters {
        bytes_sent,
        bytes_received,
        segs_sent: u64::from(ev.segs_out),
        segs_received: u64::from(ev.segs_in),
        retransmits: u64::from(ev.total_retrans),
        resets_sent: u64::from(ev.resets_sent),
        resets_received: u64::from(ev.resets_received),
    }
}

/// Now on `clock`, in ns.
pub(crate) fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Converts kernel timestamps (`CLOCK_MONOTONIC`, what `bpf_ktime_get_ns` returns) to ns since
/// the Unix epoch.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    offset_ns: i128,
}

impl Clock {
    /// Measures the current offset between the realtime and monotonic clocks. The two clocks
    /// run at the same rate (NTP slews both), so the offset changes only when the realtime clock
    /// is stepped; the error of a measurement is the time between its two reads. Each try reads
    /// the realtime clock between two monotonic reads and takes the bracket's middle: off by at
    /// most half the bracket. The narrowest of a few tries is kept, so a try the scheduler
    /// interrupted (the agent may run at a low priority on a busy host) does not shift every
    /// `start_ns` and `end_ns` until the next measurement.
    pub fn now() -> Self {
        Self::measure(
            || clock_ns(libc::CLOCK_MONOTONIC),
            || clock_ns(libc::CLOCK_REALTIME),
        )
    }

    /// [`Clock::now`] over given clocks.
    fn measure(mut monotonic: impl FnMut() -> i128, mut realtime: impl FnMut() -> i128) -> Self {
        const TRIES: usize = 5;
        let mut best: Option<(i128, i128)> = None; // (bracket width, offset)
        for _ in 0..TRIES {
            let before = monotonic();
            let real = realtime();
            let after = monotonic();
            let width = after - before;
            if best.is_none_or(|(w, _)| width < w) {
                best = Some((width, real - (before + width / 2)));
            }
        }
        let (_, offset_ns) = best.expect("at least one try");
        Self { offset_ns }
    }

    /// A clock with a fixed offset (tests).
    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    pub fn to_epoch_ns(&self, monotonic_ns: u64) -> u64 {
        (i128::from(monotonic_ns) + self.offset_ns).max(0) as u64
    }
}

/// What the assembler noticed besides records; the agent turns these into metrics and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AssemblyStats {
    /// Interim snapshots that arrived after their flow's end (ignored, nothing lost).
    pub stale_snapshots: u64,
    /// Resets that arrived after their flow's end record was released (not in any record).
    pub late_resets: u64,
    /// Snapshots whose counters went backwards (a snapshot raced the handshake).
    pub counter_regressions: u64,
    /// Events of a kind this agent does not know (a newer kernel program?).
    pub unknown_events: u64,
    /// Flows with records that stopped getting snapshots (left the kernel's map without an
    /// end): forgotten, their last record stands as their last.
    pub vanished_flows: u64,
    /// Events of vanished flows that arrived after all: ignored (their counters since the last
    /// record are not reported).
    pub vanished_events: u64,
}

/// Remembers flow ids for one to two `generation`s, in two rotating sets.
struct Tombstones {
    current: HashSet<u64>,
    previous: HashSet<u64>,
    rotated_at: Instant,
    generation: Duration,
}

impl Tombstones {
    fn new(now: Instant, generation: Duration) -> Self {
        Self {
            current: HashSet::default(),
            previous: HashSet::default(),
            rotated_at: now,
            generation,
        }
    }

    fn insert(&mut self, flow_id: u64, now: Instant) {
        if now.duration_since(self.rotated_at) >= self.generation {
            self.previous = std::mem::take(&mut self.current);
            self.rotated_at = now;
        }
        self.current.insert(flow_id);
    }

    fn contains(&self, flow_id: u64) -> bool {
        self.current.contains(&flow_id) || self.previous.contains(&flow_id)
    }
}

/// A flow that has had at least one record: what the next record's deltas start from.
struct Reported {
    next_seq: u32,
    baseline: Counters,
    /// `start_ns` as first reported, so every record of the flow carries the same value even
    /// if the clock offset is re-measured in between.
    start_ns: u64,
    /// When its last snapshot was processed.
    seen_at: Instant,
}

/// An end record held back for [`RESET_GRACE`].
struct PendingEnd {
    record: FlowRecord,
    release_at: Instant,
}

/// Builds flow records from kernel events. Single-threaded: the agent's event loop owns it.
pub struct Assembler {
    host: String,
    clock: Clock,
    /// Flows younger than this at their end cannot have raced an interim sweep.
    interim_ns: u64,
    /// Set before the shutdown flush: every end is then remembered, since the flush snapshots
    /// flows of any age.
    flushing: bool,
    reported: HashMap<u64, Reported>,
    ended: Tombstones,
    /// Flows forgotten by [`Assembler::forget_vanished`].
    vanished: Tombstones,
    /// A flow in `reported` without a snapshot for this long has vanished.
    vanish_after: Duration,
    /// When `reported` was last and is next scanned for vanished flows.
    last_vanish_scan: Instant,
    next_vanish_scan: Instant,
    pending: HashMap<u64, PendingEnd>,
    pending_order: VecDeque<u64>,
    stats: AssemblyStats,
}

impl Assembler {
    pub fn new(host: String, clock: Clock, interim: Duration, now: Instant) -> Self {
        let vanish_after = interim * VANISH_PERIODS;
        Self {
            host,
            clock,
            interim_ns: interim.as_nanos() as u64,
            flushing: false,
            reported: HashMap::default(),
            ended: Tombstones::new(now, TOMBSTONE_GENERATION),
            vanished: Tombstones::new(now, vanish_after),
            vanish_after,
            last_vanish_scan: now,
            next_vanish_scan: now + interim,
            pending: HashMap::default(),
            pending_order: VecDeque::new(),
            stats: AssemblyStats::default(),
        }
    }

    pub fn stats(&self) -> AssemblyStats {
        self.stats
    }

    /// Flows with at least one interim record (what the agent keeps per open flow).
    pub fn open_reported(&self) -> usize {
        self.reported.len()
    }

    /// Forgets the flows with records that got no snapshot for [`VANISH_PERIODS`] interim
    /// periods: they left the kernel's map without an end (see the module docs). Scans at most
    /// once per interim period; call right after draining the ring buffer, so that snapshots
    /// waiting in it are not mistaken for absent ones.
    ///
    /// Absence proves nothing when snapshots may have been lost on the way (`snapshots_lost`:
    /// the ring buffer overflowed since the last call) or when the agent itself did not run for
    /// two periods: then every flow gets a fresh start instead, and a live flow is never
    /// forgotten for the agent's own trouble.
    pub fn forget_vanished(&mut self, now: Instant, snapshots_lost: bool) {
        if now < self.next_vanish_scan {
            return;
        }
        let period = self.vanish_after / VANISH_PERIODS;
        let stalled = now.saturating_duration_since(self.last_vanish_scan) > 2 * period;
        self.last_vanish_scan = now;
        self.next_vanish_scan = now + period;
        if stalled || snapshots_lost {
            for r in self.reported.values_mut() {
                r.seen_at = now;
            }
            return;
        }
        let vanish_after = self.vanish_after;
        let mut gone = Vec::new();
        self.reported.retain(|&flow_id, r| {
            let keep = now.saturating_duration_since(r.seen_at) < vanish_after;
            if !keep {
                gone.push(flow_id);
            }
            keep
        });
        self.stats.vanished_flows += gone.len() as u64;
        for flow_id in gone {
            self.vanished.insert(flow_id, now);
        }
    }

    /// Call before running the shutdown flush sweep.
    pub fn start_flush(&mut self) {
        self.flushing = true;
    }

    /// Counts an event that could not be decoded (shorter than a [`FlowEvent`]).
    pub fn note_malformed(&mut self) {
        self.stats.unknown_events += 1;
    }

    /// Adopts a new measurement of the clock offset if it moved by more than a millisecond (the
    /// realtime clock was stepped); smaller differences are measurement noise and would only
    /// make timestamps jitter.
    pub fn set_clock(&mut self, clock: Clock) {
        if (clock.offset_ns - self.clock.offset_ns).abs() > 1_000_000 {
            self.clock = clock;
        }
    }

    /// Processes one kernel event; records that are ready are pushed to `out`.
    pub fn on_event(&mut self, ev: &FlowEvent, now: Instant, out: &mut Vec<FlowRecord>) {
        if matches!(
            ev.kind,
            event_kind::INTERIM | event_kind::FLUSH | event_kind::END
        ) && self.vanished.contains(ev.flow_id)
        {
            self.stats.vanished_events += 1;
            return;
        }
        match ev.kind {
            event_kind::INTERIM | event_kind::FLUSH => {
                if self.ended.contains(ev.flow_id) {
                    self.stats.stale_snapshots += 1;
                    return;
                }
                let record = self.record(ev, Outcome::Open, now);
                if ev.kind == event_kind::FLUSH {
                    self.reported.remove(&ev.flow_id);
                }
                out.push(record);
            }
            event_kind::END => {
                let outcome = end_outcome(ev);
                let record = self.record(ev, outcome, now);
                self.reported.remove(&ev.flow_id);
                let age = ev.report_ns.saturating_sub(ev.start_ns);
                if self.flushing || age >= self.interim_ns {
                    self.ended.insert(ev.flow_id, now);
                }
                if ev.flags & flow_flag::MAY_RESET != 0 {
                    self.pending_order.push_back(ev.flow_id);
                    self.pending.insert(
                        ev.flow_id,
                        PendingEnd {
                            record,
                            release_at: now + RESET_GRACE,
                        },
                    );
                } else {
                    out.push(record);
                }
            }
            event_kind::RESET_AFTER_END => match self.pending.get_mut(&ev.flow_id) {
                Some(p) => {
                    p.record.resets_sent += u64::from(ev.resets_sent);
                    if p.record.outcome == Outcome::Closed {
                        p.record.outcome = Outcome::Reset;
                    }
                }
                None => self.stats.late_resets += 1,
            },
            _ => self.stats.unknown_events += 1,
        }
    }

    /// Releases end records whose grace period has passed.
    pub fn release_due(&mut self, now: Instant, out: &mut Vec<FlowRecord>) {
        while let Some(flow_id) = self.pending_order.front() {
            match self.pending.get(flow_id) {
                Some(p) if p.release_at > now => break,
                _ => {}
            }
            let flow_id = self.pending_order.pop_front().expect("front exists");
            if let Some(p) = self.pending.remove(&flow_id) {
                out.push(p.record);
            }
        }
    }

    /// Releases every held end record (shutdown).
    pub fn release_all(&mut self, out: &mut Vec<FlowRecord>) {
        for flow_id in self.pending_order.drain(..) {
            if let Some(p) = self.pending.remove(&flow_id) {
                out.push(p.record);
            }
        }
    }

    fn record(&mut self, ev: &FlowEvent, outcome: Outcome, now: Instant) -> FlowRecord {
        let now_cum = cumulative(ev);
        let mut start_ns = self.clock.to_epoch_ns(ev.start_ns);
        let (seq, delta) = match self.reported.get_mut(&ev.flow_id) {
            Some(r) => {
                let (delta, regressed) = now_cum.since(&r.baseline);
                if regressed {
                    self.stats.counter_regressions += 1;
                }
                let seq = r.next_seq;
                r.next_seq += 1;
                start_ns = r.start_ns;
                r.baseline = now_cum.max(&r.baseline);
                r.seen_at = now;
                (seq, delta)
            }
            None => {
                // Records of it written before this agent started end at `prev` (none: 0).
                let (seq, baseline) = match ev.prev.seq {
                    0 => (0, Counters::default()),
                    seq => (seq, cumulative(&previous(ev))),
                };
                let (delta, regressed) = now_cum.since(&baseline);
                if regressed {
                    self.stats.counter_regressions += 1;
                }
                if outcome == Outcome::Open {
                    self.reported.insert(
                        ev.flow_id,
                        Reported {
                            next_seq: seq + 1,
                            baseline: now_cum.max(&baseline),
                            start_ns,
                            seen_at: now,
                        },
                    );
                }
                (seq, delta)
            }
        };
        let (family, local_addr, remote_addr) = addresses(ev);
        let process_known = ev.flags & flow_flag::PROCESS_KNOWN != 0;
        FlowRecord {
            flow_id: ev.flow_id,
            host: self.host.clone(),
            seq,
            start_ns,
            end_ns: self.clock.to_epoch_ns(ev.report_ns),
            family,
            local_addr,
            local_port: ev.local_port,
            remote_addr,
            remote_port: ev.remote_port,
            direction: if ev.direction == direction::OUTBOUND {
                Direction::Outbound
            } else {
                Direction::Inbound
            },
            outcome,
            bytes_sent: delta.bytes_sent,
            bytes_received: delta.bytes_received,
            segs_sent: delta.segs_sent,
            segs_received: delta.segs_received,
            retransmits: delta.retransmits,
            resets_sent: delta.resets_sent,
            resets_received: delta.resets_received,
            srtt_us: ev.srtt_us,
            min_rtt_us: ev.min_rtt_us,
            pid: process_known.then_some(ev.pid),
            comm: process_known.then(|| comm(&ev.comm)),
            cgroup_id: process_known.then_some(ev.cgroup_id),
            adopted: ev.flags & flow_flag::ADOPTED != 0,
        }
    }
}

/// Outcome of an ended flow: `failed` if the handshake never completed, `reset` if a reset was
/// seen in either direction, else `closed`.
fn end_outcome(ev: &FlowEvent) -> Outcome {
    let handshake_done = ev.flags & flow_flag::ESTABLISHED != 0;
    if !handshake_done || ev.end_state == tcp_state::SYN_SENT || ev.end_state == tcp_state::SYN_RECV
    {
        Outcome::Failed
    } else if ev.resets_sent > 0 || ev.resets_received > 0 {
        Outcome::Reset
    } else {
        Outcome::Closed
    }
}

/// The flow's family and addresses; IPv4-mapped IPv6 addresses become IPv4.
fn addresses(ev: &FlowEvent) -> (Family, IpAddr, IpAddr) {
    if u16::from(ev.family) == AF_INET6 {
        let local = Ipv6Addr::from(ev.local_addr);
        let remote = Ipv6Addr::from(ev.remote_addr);
        match (local.to_ipv4_mapped(), remote.to_ipv4_mapped()) {
            (Some(l), Some(r)) => (Family::Ipv4, IpAddr::V4(l), IpAddr::V4(r)),
            _ => (Family::Ipv6, IpAddr::V6(local), IpAddr::V6(remote)),
        }
    } else {
        let v4 = |a: &[u8; 16]| IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]));
        (Family::Ipv4, v4(&ev.local_addr), v4(&ev.remote_addr))
    }
}

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowlog_common::AF_INET;

    const INTERIM: Duration = Duration::from_nanos(1_000);

    fn event(kind: u8, bytes_acked: u64, bytes_received: u64, flags: u8) -> FlowEvent {
        let mut local_addr = [0u8; 16];
        local_addr[..4].copy_from_slice(&[198, 51, 100, 1]);
        let mut remote_addr = [0u8; 16];
        remote_addr[..4].copy_from_slice(&[198, 51, 100, 2]);
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        FlowEvent {
            flow_id: 42,
            start_ns: 1_000,
            report_ns: 5_000,
            bytes_acked,
            bytes_received,
            local_addr,
            remote_addr,
            local_port: 40000,
            remote_port: 80,
            kind,
            family: AF_INET as u8,
            direction: direction::OUTBOUND,
            flags: flags | flow_flag::ESTABLISHED | flow_flag::PROCESS_KNOWN,
            end_state: tcp_state::FIN_WAIT2,
            pid: 7,
            comm,
            ..FlowEvent::default()
        }
    }

    #[test]
    fn payload_excludes_syn_and_fins() {
        // Connecting side, full close: 100 sent + SYN + FIN acked; 50 received + peer FIN.
        let ev = event(
            event_kind::END,
            102,
            51,
            flow_flag::FIN_SENT | flow_flag::FIN_ACKED | flow_flag::PEER_FIN,
        );
        assert_eq!(payload(&ev), (100, 50));
        // Accepting side: its SYN-ACK is never in bytes_acked.
        let mut ev = event(
            event_kind::END,
            51,
            101,
            flow_flag::FIN_SENT | flow_flag::FIN_ACKED | flow_flag::PEER_FIN,
        );
        ev.direction = direction::INBOUND;
        assert_eq!(payload(&ev), (50, 100));
        // Reset mid-flow: no FIN either way.
        assert_eq!(payload(&event(event_kind::END, 11, 7, 0)), (10, 7));
    }

    #[test]
    fn clock_offset_comes_from_the_narrowest_bracket() {
        // The realtime clock is 10 s ahead. Each try: (monotonic before, when the realtime clock
        // is read on the monotonic clock, monotonic after). The first is interrupted for 1 ms
        // between its reads; the third, 100 ns wide, is the narrowest.
        const AHEAD: i128 = 10_000_000_000;
        let tries: [(i128, i128, i128); 5] = [
            (1_000, 1_000_500, 1_001_000),
            (2_000_000, 2_000_300, 2_000_400),
            (3_000_000, 3_000_050, 3_000_100),
            (4_000_000, 4_000_390, 4_000_400),
            (5_000_000, 5_000_010, 5_000_300),
        ];
        let mut mono = tries.iter().flat_map(|&(before, _, after)| [before, after]);
        let mut real = tries.iter().map(|&(_, at, _)| at + AHEAD);
        let clock = Clock::measure(|| mono.next().unwrap(), || real.next().unwrap());
        assert_eq!(clock.offset_ns, AHEAD);
    }

    #[test]
    fn interim_deltas_sum_to_the_end_totals() {
        let t0 = Instant::now();
        let mut a = Assembler::new("h".into(), Clock::with_offset(10), INTERIM, t0);
        let mut out = Vec::new();
        a.on_event(&event(event_kind::INTERIM, 1 + 1000, 300, 0), t0, &mut out);
        a.on_event(&event(event_kind::INTERIM, 1 + 2500, 300, 0), t0, &mut out);
        let end = event(
            event_kind::END,
            1 + 4000 + 1,
            901,
            flow_flag::FIN_SENT | flow_flag::FIN_ACKED | flow_flag::PEER_FIN,
        );
        a.on_event(&end, t0, &mut out);
        assert_eq!(out.len(), 3, "an ordinary close is released at once");
        let seqs: Vec<u32> = out.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
        let sent: Vec<u64> = out.iter().map(|r| r.bytes_sent).collect();
        assert_eq!(sent, [1000, 1500, 1500]);
        assert_eq!(out.iter().map(|r| r.bytes_received).sum::<u64>(), 900);
        assert_eq!(out[0].outcome, Outcome::Open);
        assert_eq!(out[2].outcome, Outcome::Closed);
        assert_eq!(out[2].start_ns, 1_010);
        assert_eq!(out[2].end_ns, 5_010);
        assert_eq!(out[2].comm.as_deref(), Some("curl"));
        assert_eq!(out[2].local_addr, "198.51.100.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_flow_reported_by_an_earlier_agent_continues_from_its_last_record() {
        // The earlier agent wrote seq 0 and 1; the kernel's `prev` is its seq 1 snapshot
        // (1 + 2500 acked with the SYN, 300 received). The snapshot after the restart carries
        // it, so this agent's first record is seq 2 with the delta since it.
        let t0 = Instant::now();
        let mut a = Assembler::new("h".into(), Clock::with_offset(0), INTERIM, t0);
        let mut out = Vec::new();
        let mut ev = event(event_kind::INTERIM, 1 + 4000, 700, 0);
        ev.prev = flowlog_common::Reported {
            bytes_acked: 1 + 2500,
            bytes_received: 300,
            seq: 2,
            flags: flow_flag::ESTABLISHED | flow_flag::PROCESS_KNOWN,
            ..Default::default()
        };
        a.on_event(&ev, t0, &mut out);
        let mut end = event(
            event_kind::END,
            1 + 5000 + 1,
            901,
            flow_flag::FIN_SENT | flow_flag::FIN_ACKED | flow_flag::PEER_FIN,
        );
        // The end carries the kernel's `prev` too; this agent goes by its own memory.
        end.prev = ev.prev;
        a.on_event(&end, t0, &mut out);
        let got: Vec<(u32, u64, u64)> = out
            .iter()
            .map(|r| (r.seq, r.bytes_sent, r.bytes_received))
            .collect();
        assert_eq!(got, [(2, 1500, 400), (3, 1000, 200)]);
    }

    #[test]
    fn flows_without_snapshots_for_three_periods_are_forgotten() {
        let interim = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut a = Assembler::new("h".into(), Clock::with_offset(0), interim, t0);
        let mut out = Vec::new();
        let mut quiet = event(event_kind::INTERIM, 101, 50, 0);
        quiet.flow_id = 1;
        let mut live = event(event_kind::INTERIM, 201, 70, 0);
        live.flow_id = 2;
        a.on_event(&quiet, t0, &mut out);
        a.on_event(&live, t0, &mut out);
        // `live` gets its snapshot every period; `quiet` none after its first.
        for period in 1..=3u32 {
            let now = t0 + interim * period;
            live.bytes_acked += 10;
            a.on_event(&live, now, &mut out);
            a.forget_vanished(now, false);
        }
        assert_eq!(
            a.open_reported(),
            1,
            "the quiet flow is forgotten after 3 periods"
        );
        assert_eq!(a.stats().vanished_flows, 1);
        // Its end, should it come after all, does not restart its records at seq 0.
        let mut end = event(event_kind::END, 501, 90, 0);
        end.flow_id = 1;
        let records = out.len();
        a.on_event(&end, t0 + interim * 3, &mut out);
        assert_eq!(
            out.len(),
            records,
            "no record for an event of a vanished flow"
        );
        assert_eq!(a.stats().vanished_events, 1);
        // The live flow's records carry on: seq 0..=3, 10 bytes a period after the first 100.
        let live_sent: Vec<(u32, u64)> = out
            .iter()
            .filter(|r| r.flow_id == 2)
            .map(|r| (r.seq, r.bytes_sent))
            .collect();
        assert_eq!(live_sent, [(0, 200), (1, 10), (2, 10), (3, 10)]);
        assert_eq!(a.stats().vanished_flows, 1);
    }

    #[test]
    fn vanished_scan_runs_once_per_period() {
        let interim = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut a = Assembler::new("h".into(), Clock::with_offset(0), interim, t0);
        let mut out = Vec::new();
        a.on_event(&event(event_kind::INTERIM, 101, 50, 0), t0, &mut out);
        let half = interim / 2;
        a.forget_vanished(t0 + interim, false);
        // Scanned half a period late: the next scan is a period after this one.
        a.forget_vanished(t0 + interim * 2 + half, false);
        assert_eq!(a.open_reported(), 1);
        // Three periods and a second since its snapshot, but not a period since the last scan.
        a.forget_vanished(t0 + interim * 3 + Duration::from_secs(1), false);
        assert_eq!(a.open_reported(), 1);
        a.forget_vanished(t0 + interim * 3 + half, false);
        assert_eq!(a.open_reported(), 0);
        assert_eq!(a.stats().vanished_flows, 1);
    }

    #[test]
    fn lost_snapshots_or_a_stalled_agent_give_flows_a_fresh_start() {
        let interim = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut a = Assembler::new("h".into(), Clock::with_offset(0), interim, t0);
        let mut out = Vec::new();
        a.on_event(&event(event_kind::INTERIM, 101, 50, 0), t0, &mut out);
        a.forget_vanished(t0 + interim, false);
        a.forget_vanished(t0 + interim * 2, false);
        // Three quiet periods, but the ring buffer overflowed: its snapshot may have been lost.
        a.forget_vanished(t0 + interim * 3, true);
        assert_eq!(a.open_reported(), 1);
        a.forget_vanished(t0 + interim * 4, false);
        assert_eq!(
            a.open_reported(),
            1,
            "quiet for one period since the fresh start"
        );
        // The agent did not scan for three periods (its loop was stuck): absence proves nothing.
        a.forget_vanished(t0 + interim * 7, false);
        assert_eq!(a.open_reported(), 1);
        a.forget_vanished(t0 + interim * 8, false);
        a.forget_vanished(t0 + interim * 9, false);
        assert_eq!(a.open_reported(), 1);
        a.forget_vanished(t0 + interim * 10, false);
        assert_eq!(
            a.open_reported(),
            0,
            "three quiet periods after the fresh start"
        );
        assert_eq!(a.stats().vanished_flows, 1);
    }

    #[test]
    fn late_interim_after_end_is_ignored() {
        let t0 = Instant::now();
        let mut a = Assembler::new("h".into(), Clock::with_offset(0), INTERIM, t0);
        let mut out = Vec::new();
        a.on_event(&event(event_kind::END, 11, 5, 0), t0, &mut out);
        a.on_event(&event(event_kind::INTERIM, 6, 5, 0), t0, &mut out);
        a.release_all(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bytes_sent, 10);
        assert_eq!(a.stats().stale_snapshots, 1);
    }

    #[test]
    fn reset_after_end_amends_the_held_record() {
        let t0 = Instant::now();
        let mut a = Assembler::new("h".into(), Clock::with_offset(0), INTERIM, t0);
        let mut out = Vec::new();
        a.on_event(
            &event(event_kind::END, 11, 5, flow_flag::MAY_RESET),
            t0,
            &mut out,
        );
        assert!(
            out.is_empty(),
            "a close that may be followed by a reset is held"
        );
        let rst = FlowEvent {
            flow_id: 42,
            resets_sent: 1,
            kind: event_kind::RESET_AFTER_END,
            ..FlowEvent::default()
        };
        a.on_event(&rst, t0, &mut out);
        a.release_due(t0 + RESET_GRACE, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].outcome, Outcome::Reset);
        assert_eq!(out[0].resets_sent, 1);
        // Once released, a reset can no longer be attributed: counted, not lost silently.
        a.on_event(&rst, t0, &mut out);
        assert_eq!(a.stats().late_resets, 1);
    }

    #[test]
    fn failed_connect_and_mapped_addresses() {
        let t0 = Instant::now();
        let mut a = Assembler::new("h".into(), Clock::with_offset(0), INTERIM, t0);
        let mut ev = event(event_kind::END, 0, 0, 0);
        ev.flags &= !flow_flag::ESTABLISHED;
        ev.end_state = tcp_state::SYN_SENT;
        ev.resets_received = 1;
        ev.family = AF_INET6 as u8;
        ev.local_addr = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets();
        ev.remote_addr = Ipv4Addr::new(127, 0, 0, 2).to_ipv6_mapped().octets();
        let mut out = Vec::new();
        a.on_event(&ev, t0, &mut out);
        a.release_all(&mut out);
        assert_eq!(out[0].outcome, Outcome::Failed);
        assert_eq!(out[0].family, Family::Ipv4);
        assert_eq!(out[0].remote_addr, "127.0.0.2".parse::<IpAddr>().unwrap());
    }
}
