//! Churn: 50 pod addresses, each handed to a new pod every 200 ms for 3 s (the old pod deleted,
//! the new one created with the same address 100 ms later), watched through the source's own
//! list/watch loops and probes — once with watch events on time, once with every watch message
//! held a random 0–1 s (in order, an API server under load). Flows with known owners — starting
//! just after a pod got its address, just before it lost it, and long-lived ones that outlast
//! three reassignments — are attributed two ways from the same run's changes: by flowlog's
//! time-ranged index at the flow's start, and by a latest-owner map as it stood when the flow's
//! record would arrive (its end). Both rows are printed. flowlog must misattribute none, answer
//! `unknown` to none (every flow's address had an owner), and be ambiguous only for flows within
//! a probe interval of a change; and every change must be dated honestly: the server's own time
//! of each write lies within the span the source gave it.
mod support;

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use flowlog_identity::OwnershipChange;
use flowlog_record::{Attribution, Identity};
use flowlog_testkit::kubernetes::{ApiServer, Kind, PodSpec, WatchLag, pod};
use support::{fast_settings, start};

const ADDRESSES: u32 = 50;
const GENERATIONS: u32 = 15;
const PERIOD_MS: u64 = 200;
/// An address is free this long between its owners.
const GAP_MS: u64 = 100;
/// How often each kind is probed: the precision of change times.
const PROBE_MS: u64 = 10;
/// How far from an open or a close the short flows start.
const NEAR_MS: u64 = 20;
const MS: u64 = 1_000_000;

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    correct: u64,
    misattributed: u64,
    ambiguous: u64,
    unknown: u64,
}

impl Tally {
    fn count(&mut self, status: Attribution, identity: Option<&Arc<Identity>>, truth: &str) {
        match (status, identity) {
            (Attribution::Exact, Some(i)) if i.name == truth => self.correct += 1,
            (Attribution::Exact, _) => self.misattributed += 1,
            (Attribution::Ambiguous, _) => self.ambiguous += 1,
            (Attribution::Unknown, _) => self.unknown += 1,
        }
    }

    fn flows(&self) -> u64 {
        self.correct + self.misattributed + self.ambiguous + self.unknown
    }
}

struct Flow {
    addr: IpAddr,
    start: u64,
    /// When the flow's record reaches the enricher (a latest-owner map is read then).
    end: u64,
    owner: String,
}

fn name(i: u32, g: u32) -> String {
    format!("churn-{i}-{g}")
}

fn address(i: u32) -> IpAddr {
    IpAddr::from([10, 245, 0, u8::try_from(i + 1).unwrap()])
}

/// `(i, g)` of a churn pod's owner key `pod/uid-<i>-<g>/<ip>`.
fn pod_of(owner: &str) -> (u32, u32) {
    let uid = owner.split('/').nth(1).unwrap();
    let mut parts = uid.trim_start_matches("uid-").split('-');
    let i = parts.next().unwrap().parse().unwrap();
    let g = parts.next().unwrap().parse().unwrap();
    (i, g)
}

/// What one run measured.
struct Run {
    flowlog: Tally,
    map: Tally,
    /// Changes whose dating was checked against the server's write time.
    dated: usize,
    /// The widest span the source sent.
    widest_ns: u64,
    /// Ambiguous flows that start farther than the widest span from every change of their
    /// address (there must be none: ambiguity only where a change may have been).
    far_ambiguous: u64,
}

async fn churn(lag: WatchLag) -> Run {
    let server = ApiServer::start().await;
    server.set_watch_lag(lag, 11);
    let settings = flowlog_kubernetes::KubernetesSettings {
        probe_interval: Duration::from_millis(PROBE_MS),
        ..fast_settings()
    };
    let mut source = start(&server, settings);
    assert_eq!(source.ready().await, []);

    // The schedule: (due in ms from the start, address, generation, add or delete).
    let mut schedule = Vec::new();
    for i in 0..ADDRESSES {
        let stagger = u64::from(i) * PERIOD_MS / u64::from(ADDRESSES);
        for g in 0..GENERATIONS {
            let born = stagger + u64::from(g) * PERIOD_MS;
            schedule.push((born, i, g, true));
            schedule.push((born + PERIOD_MS - GAP_MS, i, g, false));
        }
    }
    schedule.sort_unstable();
    let begin = tokio::time::Instant::now();
    let mut added = HashMap::new();
    let mut deleted = HashMap::new();
    let mut last_write = 0;
    for (due, i, g, add) in schedule {
        tokio::time::sleep_until(begin + Duration::from_millis(due)).await;
        let (name, ip) = (name(i, g), address(i).to_string());
        if add {
            let uid = format!("uid-{i}-{g}");
            let spec = PodSpec {
                name: &name,
                uid: &uid,
                ip: Some(&ip),
                phase: "Running",
                ..PodSpec::default()
            };
            last_write = server.apply(Kind::Pod, pod(&spec));
            added.insert((i, g), last_write);
        } else {
            last_write = server.delete(Kind::Pod, "default", &name);
            deleted.insert((i, g), last_write);
        }
    }
    // Everything up to the last write, spans included: the watermark passes it only once the
    // stream has delivered it.
    let (_, got) = source.changes_until_watermark(last_write).await;
    let total = (ADDRESSES * GENERATIONS) as usize;
    assert_eq!(got.len(), 2 * total, "one Open and one Close per pod");

    // Every change dated honestly: an Open at or after the write, with a span from before it
    // (the pod may have held the address since then); a Close at or before the write, with a
    // span past it.
    let mut opens: HashMap<(u32, u32), (u64, Option<u64>)> = HashMap::new();
    let mut closes: HashMap<(u32, u32), (u64, Option<u64>)> = HashMap::new();
    for change in &source.all {
        match change {
            OwnershipChange::Open { owner, at_ns, .. } => {
                opens.entry(pod_of(owner)).or_insert((0, None)).0 = *at_ns;
            }
            OwnershipChange::Close { owner, at_ns, .. } => {
                closes.entry(pod_of(owner)).or_insert((0, None)).0 = *at_ns;
            }
            OwnershipChange::Uncertain {
                owner,
                from_ns,
                to_ns,
                ..
            } => {
                let pod = pod_of(owner);
                // An Open's span comes before it (ends at its time), a Close's after it.
                match closes.get_mut(&pod) {
                    Some(close) if close.0 == *from_ns => close.1 = Some(*to_ns),
                    _ => {
                        opens.insert(pod, (*to_ns, Some(*from_ns)));
                    }
                }
            }
            OwnershipChange::Watermark { .. } => {}
        }
    }
    for (pod, truth) in &added {
        let (at, from) = opens[pod];
        assert!(
            at >= *truth,
            "{pod:?} opened at {at}, before its write at {truth}"
        );
        let from = from.unwrap_or(at);
        assert!(
            from <= *truth,
            "{pod:?}: span from {from}, after its write at {truth}"
        );
    }
    for (pod, truth) in &deleted {
        let (at, to) = closes[pod];
        assert!(
            at <= *truth,
            "{pod:?} closed at {at}, after its delete at {truth}"
        );
        let to = to.unwrap_or(at);
        assert!(
            to >= *truth,
            "{pod:?}: span to {to}, before its delete at {truth}"
        );
    }

    // Flows of three kinds per pod.
    let mut flows = Vec::new();
    for i in 0..ADDRESSES {
        for g in 0..GENERATIONS {
            let (born, gone) = (added[&(i, g)], deleted[&(i, g)]);
            let owner = name(i, g);
            let addr = address(i);
            for (start, end) in [
                (born + NEAR_MS * MS, born + (NEAR_MS + 10) * MS),
                (gone - NEAR_MS * MS, gone - (NEAR_MS - 10) * MS),
                (born + 50 * MS, born + 50 * MS + 3 * PERIOD_MS * MS),
            ] {
                flows.push(Flow {
                    addr,
                    start,
                    end,
                    owner: owner.clone(),
                });
            }
        }
    }

    // flowlog: every change in the index, each flow looked up at its start.
    let index = source.index();
    let widest_ns = source
        .all
        .iter()
        .filter_map(|c| match c {
            OwnershipChange::Uncertain { from_ns, to_ns, .. } => Some(to_ns - from_ns),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let near_a_change = |flow: &Flow| {
        (0..ADDRESSES)
            .filter(|&i| address(i) == flow.addr)
            .any(|i| {
                (0..GENERATIONS).any(|g| {
                    [added[&(i, g)], deleted[&(i, g)]]
                        .iter()
                        .any(|&t| t.abs_diff(flow.start) <= widest_ns)
                })
            })
    };
    let mut flowlog = Tally::default();
    let mut ambiguous_by_kind = [0; 3];
    let mut far_ambiguous = 0;
    for (n, flow) in flows.iter().enumerate() {
        let e = index.lookup(flow.addr, flow.start);
        flowlog.count(e.status, e.identity.as_ref(), &flow.owner);
        if e.status == Attribution::Ambiguous {
            ambiguous_by_kind[n % 3] += 1;
            far_ambiguous += u64::from(!near_a_change(flow));
        }
    }

    // Latest owner: the same changes replayed into a map, read when each flow's record arrives.
    let changes: Vec<&OwnershipChange> = source
        .all
        .iter()
        .filter(|c| {
            matches!(
                c,
                OwnershipChange::Open { .. } | OwnershipChange::Close { .. }
            )
        })
        .collect();
    flows.sort_by_key(|f| f.end);
    let mut latest: HashMap<IpAddr, (String, Arc<Identity>)> = HashMap::new();
    let mut next = 0;
    let mut map = Tally::default();
    for flow in &flows {
        while next < changes.len() && changes[next].at_ns() <= flow.end {
            match changes[next] {
                OwnershipChange::Open {
                    owner,
                    prefix,
                    identity,
                    ..
                } => {
                    latest.insert(prefix.addr(), (owner.clone(), Arc::clone(identity)));
                }
                OwnershipChange::Close { owner, prefix, .. }
                    if latest.get(&prefix.addr()).is_some_and(|(o, _)| o == owner) =>
                {
                    latest.remove(&prefix.addr());
                }
                _ => {}
            }
            next += 1;
        }
        match latest.get(&flow.addr) {
            Some((_, identity)) => map.count(Attribution::Exact, Some(identity), &flow.owner),
            None => map.count(Attribution::Unknown, None, &flow.owner),
        }
    }

    println!(
        "churn ({lag:?}): {ADDRESSES} addresses x {GENERATIONS} owners each, reassigned every \
         {PERIOD_MS} ms ({GAP_MS} ms free between owners), probes every {PROBE_MS} ms, {} flows",
        flows.len()
    );
    println!(
        "{:<24} {:>8} {:>14} {:>10} {:>8}",
        "", "correct", "misattributed", "ambiguous", "unknown"
    );
    for (row, t) in [
        ("flowlog (time-ranged)", &flowlog),
        ("latest owner (map)", &map),
    ] {
        println!(
            "{row:<24} {:>8} {:>14} {:>10} {:>8}",
            t.correct, t.misattributed, t.ambiguous, t.unknown
        );
    }
    println!(
        "flowlog ambiguous: {} just after an open, {} just before a close, {} long-lived; \
         widest span {:.1} ms",
        ambiguous_by_kind[0],
        ambiguous_by_kind[1],
        ambiguous_by_kind[2],
        widest_ns as f64 / 1e6
    );
    Run {
        flowlog,
        map,
        dated: added.len() + deleted.len(),
        widest_ns,
        far_ambiguous,
    }
}

/// What every run must show: nothing misattributed, nothing unknown (every flow's address had
/// an owner and the index has every change), ambiguity only within a span of a change, and on an
/// unloaded machine (spans of a probe interval and a round trip) few ambiguous flows. How wide
/// the spans get depends on how promptly the source runs, so the share is bounded loosely: a
/// machine busy with builds stretches them.
fn check(run: &Run) {
    let (flowlog, map) = (&run.flowlog, &run.map);
    assert_eq!(run.dated, 2 * (ADDRESSES * GENERATIONS) as usize);
    assert_eq!(flowlog.flows(), 3 * u64::from(ADDRESSES * GENERATIONS));
    assert_eq!(flowlog.misattributed, 0, "{flowlog:?}");
    assert_eq!(flowlog.unknown, 0, "{flowlog:?}");
    assert_eq!(
        run.far_ambiguous, 0,
        "ambiguous far from every change: {flowlog:?}"
    );
    assert!(
        run.widest_ns < 1_000_000_000,
        "a span of {} ms: probes every {PROBE_MS} ms should date every change far closer",
        run.widest_ns / MS
    );
    assert!(
        flowlog.ambiguous * 100 <= flowlog.flows() * MAX_AMBIGUOUS_PERCENT,
        "ambiguous above {MAX_AMBIGUOUS_PERCENT}%: {flowlog:?}"
    );
    assert!(
        map.misattributed > 0,
        "long-lived flows outlast their owner: {map:?}"
    );
}

/// Short flows start 20 ms from a change, long-lived ones 50 ms: with spans of 10–20 ms (2%
/// ambiguous measured with events 0–1 s late on an idle machine) few fall in one; 12% was
/// measured with both CPUs busy compiling.
const MAX_AMBIGUOUS_PERCENT: u64 = 25;

/// Both runs in one test, one after the other, so that they do not slow each other's source.
/// The second holds every watch message a random 0–1 s, in order: flowlog still misattributes
/// none (the probes date each change to within their interval, however late its event arrives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_time_ranged_index_against_latest_owner_map_with_and_without_watch_lag() {
    check(&churn(WatchLag::None).await);
    check(
        &churn(WatchLag::Random {
            max: Duration::from_secs(1),
        })
        .await,
    );
}
