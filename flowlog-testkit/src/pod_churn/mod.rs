//! Pod address churn with a ground truth, for the attribution benchmark (`benches/attribution`)
//! and its smaller twin in the enricher's tests: pod addresses handed from pod to pod on the
//! list/watch server ([`crate::kubernetes`]), and flows whose start times sit right where
//! attribution goes wrong — just after a pod got its address, just before it gave it up, in the
//! gap between two owners, across a reassignment, and (with [`Shape::near`]) within a few
//! milliseconds either side of an open or a close. [`score`] counts a lookup's answers against
//! the truth.
//!
//! Everything runs on one thread from a schedule of timed actions. The ground truth is what the
//! API server did and when (the times [`ApiServer::apply`] and [`ApiServer::delete`] return,
//! read before any watch can see the change). A pod's flows are planned when it gets its
//! address — relative to that actual open and to its planned close, so that each record is
//! exported when an agent would export it — and scored against the actual times
//! ([`Truth::owner_at`]), so a late schedule never falsifies the truth.
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    net::Ipv4Addr,
    ops::Range,
    thread,
    time::Duration,
};

pub mod score;

use flowlog_record::{FlowRecord, Outcome};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    kubernetes::{ApiServer, Kind, PodSpec, pod},
    now_ns,
};

const MS: u64 = 1_000_000;
/// How long the short flows (just after an open, just before a close) last.
const SHORT: Range<Duration> = Duration::from_millis(5)..Duration::from_millis(300);

/// Where a flow starts relative to its address's tenures: what it tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Placement {
    /// Shortly after a pod got the address (a new pod's first connections).
    AfterOpen,
    /// Shortly before the pod gave the address up (its last connections).
    BeforeClose,
    /// While no pod held the address (traffic to a gone pod: nobody is the right answer). A
    /// flow whose start nobody's tenure covers is sent as a connect nobody answered (`failed`).
    InGap,
    /// Started during one tenure, ended seconds after the next pod got the address.
    AcrossReassignment,
    /// Within [`Shape::near`] either side of a pod getting the address (before it: in the gap,
    /// or before the first owner).
    NearOpen,
    /// Within [`Shape::near`] either side of a pod giving the address up.
    NearClose,
}

impl Placement {
    pub const ALL: [Placement; 6] = [
        Placement::AfterOpen,
        Placement::BeforeClose,
        Placement::InGap,
        Placement::AcrossReassignment,
        Placement::NearOpen,
        Placement::NearClose,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Placement::AfterOpen => "starts just after the pod got the address",
            Placement::BeforeClose => "starts just before the pod gave it up",
            Placement::InGap => "starts while no pod holds the address",
            Placement::AcrossReassignment => {
                "long-lived: starts mid-tenure, ends after the next pod got the address"
            }
            Placement::NearOpen => "starts within `near` either side of a pod getting the address",
            Placement::NearClose => "starts within `near` either side of a pod giving it up",
        }
    }
}

/// The scenario's shape (from the command line).
#[derive(Debug, Clone)]
pub struct Shape {
    pub addresses: u32,
    /// How long the churn runs; no address changes hands after this.
    pub duration: Duration,
    /// How long a pod holds its address.
    pub tenure: Range<Duration>,
    /// How long an address stays free between two pods.
    pub gap: Range<Duration>,
    /// How far from an open or close the "just after" / "just before" flows start.
    pub offset: Range<Duration>,
    /// How far either side of an open or a close the [`Placement::NearOpen`] and
    /// [`Placement::NearClose`] flows start (uniform in `0..near`, either side with equal
    /// chance); zero plans none. Keep it below the shortest gap, so that "before an open" is
    /// in the gap.
    pub near: Duration,
    /// From a flow's end to its record reaching the enricher's topic (the agent's batching).
    pub export_delay: Duration,
    pub seed: u64,
}

/// One pod's hold on an address, as the API server recorded it.
#[derive(Debug, Clone)]
pub struct Tenure {
    pub pod: String,
    pub from_ns: u64,
    /// None while the pod still holds it (at the end of the run).
    pub to_ns: Option<u64>,
}

/// A flow the scenario sent, with what a latest-owner lookup said when its record was exported.
#[derive(Debug, Clone)]
pub struct SentFlow {
    pub address: u32,
    pub placement: Placement,
    pub start_ns: u64,
    /// The address's owner at the moment the record was produced: what a join against the
    /// current owner gives, even with a perfectly fresh, zero-lag view of the cluster.
    pub latest_owner: Option<String>,
}

/// What the run did: the ground truth to score against.
pub struct Truth {
    /// Per address, its tenures in order.
    pub tenures: Vec<Vec<Tenure>>,
    pub flows: HashMap<u64, SentFlow>,
    /// Opens and closes that ran later than planned by more than 50 ms (a busy machine; the
    /// truth is what actually happened, so this only shifts the schedule).
    pub late_actions: u64,
    pub reassignments: u64,
}

impl Truth {
    /// The pod that held `address` at `at_ns`, or None if nobody did.
    pub fn owner_at(&self, address: u32, at_ns: u64) -> Option<&str> {
        self.tenures[address as usize]
            .iter()
            .find(|t| t.from_ns <= at_ns && t.to_ns.is_none_or(|to| at_ns < to))
            .map(|t| t.pod.as_str())
    }

    /// The truth times of every pod's tenure, by pod name.
    pub fn by_pod(&self) -> HashMap<&str, &Tenure> {
        self.tenures
            .iter()
            .flatten()
            .map(|t| (t.pod.as_str(), t))
            .collect()
    }
}

/// The pod address of address number `i`: 10.244.x.y, 250 per /24.
pub fn address(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1)
}

enum Action {
    Open {
        address: u32,
    },
    Close {
        address: u32,
        gap_ns: u64,
    },
    Produce {
        flow_id: u64,
        address: u32,
        record: Box<FlowRecord>,
    },
}

/// Makes `record` a connect nobody answered: `failed`, SYNs sent and nothing received.
fn unanswered(record: &mut FlowRecord) {
    record.outcome = Outcome::Failed;
    record.bytes_sent = 0;
    record.bytes_received = 0;
    record.segs_sent = 2;
    record.segs_received = 0;
    record.srtt_us = 0;
    record.min_rtt_us = 0;
}

/// Drives the churn; `produce` sends one record to the raw topic.
pub struct Scenario<'a> {
    shape: Shape,
    server: &'a ApiServer,
    rng: StdRng,
    schedule: BinaryHeap<Reverse<(u64, u64)>>,
    actions: HashMap<u64, Action>,
    next_action: u64,
    next_flow: u64,
    generation: Vec<u32>,
    out: Truth,
}

impl<'a> Scenario<'a> {
    pub fn new(shape: Shape, server: &'a ApiServer) -> Self {
        let n = shape.addresses as usize;
        Self {
            rng: StdRng::seed_from_u64(shape.seed),
            shape,
            server,
            schedule: BinaryHeap::new(),
            actions: HashMap::new(),
            next_action: 0,
            next_flow: 1,
            generation: vec![0; n],
            out: Truth {
                tenures: vec![Vec::new(); n],
                flows: HashMap::new(),
                late_actions: 0,
                reassignments: 0,
            },
        }
    }

    fn at(&mut self, at_ns: u64, action: Action) {
        let id = self.next_action;
        self.next_action += 1;
        self.actions.insert(id, action);
        self.schedule.push(Reverse((at_ns, id)));
    }

    fn between(&mut self, range: &Range<Duration>) -> u64 {
        let (lo, hi) = (range.start.as_nanos() as u64, range.end.as_nanos() as u64);
        if hi <= lo {
            lo
        } else {
            self.rng.random_range(lo..hi)
        }
    }

    /// A start time within [`Shape::near`] either side of `at_ns`, or None if `near` is zero.
    fn near(&mut self, at_ns: u64) -> Option<u64> {
        if self.shape.near.is_zero() {
            return None;
        }
        let by = self.between(&(Duration::ZERO..self.shape.near));
        Some(match self.rng.random_bool(0.5) {
            true => at_ns + by,
            false => at_ns - by,
        })
    }

    /// Plans a flow to `address` from `start_ns` for `duration_ns`; its record is produced
    /// once it has ended and the export delay has passed.
    fn flow(&mut self, address: u32, placement: Placement, start_ns: u64, duration_ns: u64) {
        let flow_id = self.next_flow;
        self.next_flow += 1;
        let end_ns = start_ns + duration_ns;
        let record = Box::new(FlowRecord {
            flow_id,
            host: "node-1".into(),
            start_ns,
            end_ns,
            local_addr: Ipv4Addr::new(192, 0, 2, 7).into(),
            local_port: 32_768 + (flow_id % 28_000) as u16,
            remote_addr: self::address(address).into(),
            remote_port: 8080,
            bytes_sent: 100,
            bytes_received: 1_000,
            segs_sent: 3,
            segs_received: 4,
            srtt_us: 50,
            min_rtt_us: 40,
            ..FlowRecord::default()
        });
        self.out.flows.insert(
            flow_id,
            SentFlow {
                address,
                placement,
                start_ns,
                latest_owner: None,
            },
        );
        let produce_at = end_ns + self.shape.export_delay.as_nanos() as u64;
        self.at(
            produce_at,
            Action::Produce {
                flow_id,
                address,
                record,
            },
        );
    }

    /// Runs the churn from now for the shape's duration, then until every planned record has
    /// been produced. Returns the truth.
    pub fn run(mut self, mut produce: impl FnMut(&FlowRecord)) -> Truth {
        let start = now_ns();
        let end = start + self.shape.duration.as_nanos() as u64;
        // First owners spread over one tenure, so the churn is steady from the start.
        for address in 0..self.shape.addresses {
            let offset = self.between(&(Duration::ZERO..self.shape.tenure.end));
            self.at(start + offset, Action::Open { address });
        }
        let mut last_report = start;
        while let Some(Reverse((planned, id))) = self.schedule.pop() {
            let now = now_ns();
            let action = self.actions.remove(&id).expect("a scheduled action");
            if planned > now {
                thread::sleep(Duration::from_nanos(planned - now));
            } else if now - planned > 50 * MS && !matches!(action, Action::Produce { .. }) {
                self.out.late_actions += 1;
            }
            match action {
                Action::Open { address } => self.open(address, end),
                Action::Close { address, gap_ns } => self.close(address, gap_ns, end),
                Action::Produce {
                    flow_id,
                    address,
                    mut record,
                } => {
                    // A connect to an address nobody held goes unanswered, as on a real network.
                    if self.out.owner_at(address, record.start_ns).is_none() {
                        unanswered(&mut record);
                    }
                    let current = self.out.tenures[address as usize]
                        .last()
                        .filter(|t| t.to_ns.is_none())
                        .map(|t| t.pod.clone());
                    self.out
                        .flows
                        .get_mut(&flow_id)
                        .expect("a planned flow")
                        .latest_owner = current;
                    produce(&record);
                }
            }
            if now_ns() - last_report > 10_000 * MS {
                last_report = now_ns();
                eprintln!(
                    "pod churn: {:.0} s in, {} reassignments, {} flows planned, {} actions pending",
                    (last_report - start) as f64 / 1e9,
                    self.out.reassignments,
                    self.next_flow - 1,
                    self.schedule.len()
                );
            }
        }
        self.out
    }

    fn open(&mut self, address: u32, end: u64) {
        let generation = self.generation[address as usize];
        self.generation[address as usize] += 1;
        let name = format!("pod-{address:04}-{generation}");
        let ip = self::address(address).to_string();
        let spec = PodSpec {
            name: &name,
            uid: &name,
            ip: Some(&ip),
            phase: "Running",
            ..PodSpec::default()
        };
        let from_ns = self.server.apply(Kind::Pod, pod(&spec));
        if generation > 0 {
            self.out.reassignments += 1;
        }
        self.out.tenures[address as usize].push(Tenure {
            pod: name,
            from_ns,
            to_ns: None,
        });
        let offset = self.between(&self.shape.offset.clone());
        let duration = self.between(&SHORT);
        self.flow(address, Placement::AfterOpen, from_ns + offset, duration);
        if let Some(start) = self.near(from_ns) {
            let duration = self.between(&SHORT);
            self.flow(address, Placement::NearOpen, start, duration);
        }
        // The close, the gap and the flows around them are planned now, so that each flow's
        // record is exported when it would be — a flow that ends before the close is exported
        // before it, as an agent would. The truth is still what the server did and when.
        let close_at = from_ns + self.between(&self.shape.tenure.clone());
        if close_at >= end {
            return;
        }
        let gap_ns = self.between(&self.shape.gap.clone());
        self.at(close_at, Action::Close { address, gap_ns });
        let offset = self.between(&self.shape.offset.clone());
        let duration = self.between(&SHORT);
        self.flow(address, Placement::BeforeClose, close_at - offset, duration);
        self.flow(address, Placement::InGap, close_at + gap_ns / 2, 2 * MS);
        if let Some(start) = self.near(close_at) {
            let duration = self.between(&SHORT);
            self.flow(address, Placement::NearClose, start, duration);
        }
        let mid = from_ns + (close_at - from_ns) / 2;
        let after_next = self.between(&(Duration::from_millis(500)..Duration::from_secs(2)));
        self.flow(
            address,
            Placement::AcrossReassignment,
            mid,
            close_at + gap_ns + after_next - mid,
        );
    }

    fn close(&mut self, address: u32, gap_ns: u64, end: u64) {
        let tenure = self.out.tenures[address as usize]
            .last_mut()
            .expect("closing an open tenure");
        let to_ns = self.server.delete(Kind::Pod, "default", &tenure.pod);
        tenure.to_ns = Some(to_ns);
        let reopen = to_ns + gap_ns;
        if reopen < end {
            self.at(reopen, Action::Open { address });
        }
    }
}
