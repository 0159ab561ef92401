//! Churn: 50 pod addresses, each handed to a new pod every 200 ms for 3 s (the old pod deleted,
//! the new one created with the same address 100 ms later), watched through the real `kube`
//! watcher. Flows with known owners — starting just after a pod got its address, just before it
//! lost it, and long-lived ones that outlast three reassignments — are attributed two ways from
//! the same run's changes: by flowlog's time-ranged index at the flow's start, and by a
//! latest-owner map as it stood when the flow's record would arrive (its end). Both rows are
//! printed; flowlog must misattribute none.
mod support;

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use flowlog_identity::OwnershipChange;
use flowlog_record::{Attribution, Identity};
use flowlog_testkit::kubernetes::{ApiServer, Kind, PodSpec, pod};
use support::{fast_settings, start};

const ADDRESSES: u32 = 50;
const GENERATIONS: u32 = 15;
const PERIOD_MS: u64 = 200;
/// An address is free this long between its owners.
const GAP_MS: u64 = 100;
const MS: u64 = 1_000_000;

#[derive(Debug, Default)]
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_time_ranged_index_against_latest_owner_map() {
    let server = ApiServer::start().await;
    let mut source = start(&server, fast_settings());
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
            added.insert((i, g), server.apply(Kind::Pod, pod(&spec)));
        } else {
            deleted.insert((i, g), server.delete(Kind::Pod, "default", &name));
        }
    }
    let total = (ADDRESSES * GENERATIONS) as usize;
    source.changes(2 * total).await;

    let mut flows = Vec::new();
    for i in 0..ADDRESSES {
        for g in 0..GENERATIONS {
            let (born, gone) = (added[&(i, g)], deleted[&(i, g)]);
            let owner = name(i, g);
            let addr = address(i);
            for (start, end) in [
                (born + 20 * MS, born + 30 * MS),
                (gone - 20 * MS, gone - 10 * MS),
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

    // The watch delay: from the server's write to the change's stamp, for every Open and Close.
    let mut delays: Vec<u64> = source
        .all
        .iter()
        .filter_map(|c| match c {
            OwnershipChange::Open { owner, at_ns, .. } => Some((owner, *at_ns, &added)),
            OwnershipChange::Close { owner, at_ns, .. } => Some((owner, *at_ns, &deleted)),
            OwnershipChange::Watermark { .. } => None,
        })
        .map(|(owner, at_ns, truth)| {
            // owner = pod/uid-<i>-<g>/<ip>
            let uid = owner.split('/').nth(1).unwrap();
            let mut parts = uid.trim_start_matches("uid-").split('-');
            let i: u32 = parts.next().unwrap().parse().unwrap();
            let g: u32 = parts.next().unwrap().parse().unwrap();
            at_ns.saturating_sub(truth[&(i, g)])
        })
        .collect();
    delays.sort_unstable();
    let delay_ms = |q: usize| delays[(delays.len() - 1) * q / 100] as f64 / 1e6;

    // flowlog: every change in the index, each flow looked up at its start.
    let index = source.index();
    let mut flowlog = Tally::default();
    for flow in &flows {
        let e = index.lookup(flow.addr, flow.start);
        flowlog.count(e.status, e.identity.as_ref(), &flow.owner);
    }

    // Latest owner: the same changes replayed into a map, read when each flow's record arrives.
    let changes: Vec<&OwnershipChange> = source
        .all
        .iter()
        .filter(|c| !matches!(c, OwnershipChange::Watermark { .. }))
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
                OwnershipChange::Close { owner, prefix, .. } => {
                    if latest.get(&prefix.addr()).is_some_and(|(o, _)| o == owner) {
                        latest.remove(&prefix.addr());
                    }
                }
                OwnershipChange::Watermark { .. } => {}
            }
            next += 1;
        }
        match latest.get(&flow.addr) {
            Some((_, identity)) => map.count(Attribution::Exact, Some(identity), &flow.owner),
            None => map.count(Attribution::Unknown, None, &flow.owner),
        }
    }

    println!(
        "churn: {ADDRESSES} addresses x {GENERATIONS} owners each, reassigned every {PERIOD_MS} ms \
         ({GAP_MS} ms free between owners), {} flows",
        flows.len()
    );
    println!(
        "watch delay (server write to stamp): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        delay_ms(50),
        delay_ms(99),
        delay_ms(100)
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
    assert_eq!(flowlog.misattributed, 0, "{flowlog:?}");
    assert_eq!(flowlog.ambiguous, 0, "{flowlog:?}");
    assert_eq!(
        flowlog.correct + flowlog.unknown,
        flows.len() as u64,
        "{flowlog:?}"
    );
    assert!(
        map.misattributed > 0,
        "long-lived flows outlast their owner: {map:?}"
    );
}
