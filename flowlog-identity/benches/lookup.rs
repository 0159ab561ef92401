//! Lookup throughput of the time-ranged identity index beside a plain latest-owner map, in one
//! run, so the ratio holds whatever the machine is doing (`cargo bench -p flowlog-identity`; a
//! plain harness like flowlog-record's, no criterion, to keep builds light).
//!
//! The index holds 1M intervals over 250k addresses (4 owners per address in time order, each
//! with its own identity: three closed tenures and the current one) plus a few thousand CIDR
//! entries of other lengths (/12 … /28 and IPv6 /64, /128). Queries are random (address, time)
//! pairs: 90% of the addresses are owned ones, 10% fall through to the CIDRs or to nothing;
//! times span the whole history, gaps between tenures included (and, measured apart, only the
//! current tenures: an enricher that keeps up looks flows up at recent times). The baselines answer the same
//! addresses from a map of latest owners, building the same `Endpoint`: a plain
//! `HashMap<IpAddr, Arc<Identity>>` (std's hasher), and the fastest plain form, keyed by the IPv4
//! address's bits with the index's hasher (foldhash hashing an `IpAddr` enum probed far worse
//! than a `u32`, which is why the index keys its maps by integers). Prints lookups/s on one core
//! for each, the index with one read guard and with a read lock per lookup, and the ratios.
//! DESIGN.md's target: ≥ 1M lookups/s/core.
use std::{
    collections::HashMap,
    hint::black_box,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use flowlog_identity::{IdentityIndex, OwnershipChange, SharedIndex};
use flowlog_record::{Attribution, Endpoint, Identity, IdentityKind};
use ipnet::IpNet;

const S: u64 = 1_000_000_000;
/// 2026-01-01T00:00:00Z.
const BASE: u64 = 1_767_225_600 * S;
/// Each tenure: 900 s, then a 100 s gap before the next owner.
const TENURE: u64 = 900 * S;
const STEP: u64 = 1_000 * S;
const OWNERS: u64 = 4;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The `i`th owned address: spread over 10.0.0.0/8.
fn owned(i: u64) -> Ipv4Addr {
    Ipv4Addr::from_bits(0x0a00_0000 + (i * 37) as u32 % 0x00ff_ffff)
}

fn pod(i: u64, k: u64) -> Arc<Identity> {
    Arc::new(Identity {
        kind: IdentityKind::Pod,
        name: format!("web-{i}-{k}"),
        namespace: Some("shop".into()),
        pod_uid: Some(format!("{i:08x}-{k:04x}")),
        source: "kubernetes".into(),
        ..Identity::default()
    })
}

fn range(name: String) -> Arc<Identity> {
    Arc::new(Identity {
        kind: IdentityKind::Static,
        name,
        source: "static".into(),
        ..Identity::default()
    })
}

/// The plain baseline: latest owner by address, std's hasher (what a first version would write).
type Latest = HashMap<IpAddr, Arc<Identity>>;
/// The fastest plain baseline: latest owner by IPv4 address bits, with the index's own hasher.
type LatestBits = HashMap<u32, Arc<Identity>, foldhash::fast::RandomState>;

/// The index, the latest-owner map, and how many static ranges the index holds.
fn build(ips: u64) -> (IdentityIndex, Latest, usize) {
    let mut index = IdentityIndex::new();
    let mut latest = HashMap::default();
    for i in 0..ips {
        let addr = owned(i);
        let prefix = IpNet::from(IpAddr::V4(addr));
        let jitter = (i % 97) * S;
        for k in 0..OWNERS {
            let identity = pod(i, k);
            let owner = format!("pod/{i}-{k}");
            let from = BASE + jitter + k * STEP;
            index.apply(OwnershipChange::Open {
                source: "kubernetes".into(),
                owner: owner.clone(),
                prefix,
                identity: Arc::clone(&identity),
                at_ns: from,
            });
            if k + 1 < OWNERS {
                index.apply(OwnershipChange::Close {
                    source: "kubernetes".into(),
                    owner,
                    prefix,
                    at_ns: from + TENURE,
                });
            }
            latest.insert(IpAddr::V4(addr), identity);
        }
    }
    // A few thousand static ranges of other lengths, some overlapping the pods' addresses.
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut cidrs = std::collections::BTreeSet::new();
    for (len, n) in [(12u8, 1u64), (16, 200), (20, 500), (24, 1_500), (28, 1_000)] {
        for _ in 0..n {
            let addr = Ipv4Addr::from_bits(0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff));
            cidrs.insert(IpNet::V4(ipnet::Ipv4Net::new(addr, len).unwrap().trunc()));
        }
    }
    for _ in 0..300 {
        let addr = Ipv6Addr::from_bits((0x2001_0db8u128 << 96) | u128::from(rng.next()) << 64);
        cidrs.insert(IpNet::V6(ipnet::Ipv6Net::new(addr, 64).unwrap()));
        let host = Ipv6Addr::from_bits(addr.to_bits() | 5);
        cidrs.insert(IpNet::from(IpAddr::V6(host)));
    }
    let statics = cidrs.len();
    for (n, cidr) in cidrs.into_iter().enumerate() {
        index.apply(OwnershipChange::Open {
            source: "static".into(),
            owner: format!("static/range-{n}"),
            prefix: cidr,
            identity: range(format!("range-{n}")),
            at_ns: 0,
        });
    }
    (index, latest, statics)
}

/// Random (address, time) queries over the whole history, or (`recent`) within the current
/// owners' tenures, as an enricher keeping up with the stream sees them.
fn queries(ips: u64, n: usize, recent: bool) -> Vec<(IpAddr, u64)> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    (0..n)
        .map(|_| {
            let r = rng.next();
            let addr = if r.is_multiple_of(10) {
                IpAddr::V4(Ipv4Addr::from_bits(
                    0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff),
                ))
            } else {
                IpAddr::V4(owned(rng.next() % ips))
            };
            let t = if recent {
                BASE + (OWNERS - 1) * STEP + 100 * S + rng.next() % (800 * S)
            } else {
                BASE - 500 * S + rng.next() % (OWNERS * STEP + 500 * S)
            };
            (addr, t)
        })
        .collect()
}

/// Runs `lookup` over all queries, over and over for about `time`; returns lookups/s.
fn measure(
    queries: &[(IpAddr, u64)],
    time: Duration,
    mut lookup: impl FnMut(IpAddr, u64) -> Endpoint,
) -> f64 {
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < time {
        for &(addr, t) in queries {
            black_box(lookup(black_box(addr), black_box(t)));
        }
        done += queries.len() as u64;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    // `cargo test --benches` runs bench targets with no `--bench` flag: keep that a smoke run.
    let quick = !std::env::args().any(|a| a == "--bench");
    let ips = if quick { 10_000 } else { 250_000 };
    let time = Duration::from_millis(if quick { 50 } else { 2_000 });

    let rss_before = rss_mib();
    let started = Instant::now();
    let (index, latest, statics) = build(ips);
    let built = started.elapsed();
    println!(
        "built: {} intervals over {} prefixes ({} addresses × {OWNERS} owners + static ranges) in {:.2} s, RSS +{:.0} MiB",
        index.intervals(),
        index.prefixes(),
        ips,
        built.as_secs_f64(),
        rss_mib() - rss_before
    );
    assert_eq!(index.intervals() as u64, ips * OWNERS + statics as u64);

    // The index answers as the history was written: owner k from BASE + jitter + k·STEP for TENURE.
    for i in [0, 1, ips / 2, ips - 1] {
        let addr = IpAddr::V4(owned(i));
        for k in 0..OWNERS {
            let from = BASE + (i % 97) * S + k * STEP;
            assert_eq!(
                index.lookup(addr, from + TENURE / 2),
                Endpoint::exact(pod(i, k))
            );
        }
        let gap = BASE + (i % 97) * S + TENURE + 50 * S;
        assert_ne!(
            index.lookup(addr, gap).identity.map(|id| id.kind),
            Some(IdentityKind::Pod)
        );
    }

    let queries_recent = queries(ips, 1_000_000, true);
    let queries = queries(ips, 1_000_000, false);
    let mut statuses = [0u64; 3];
    for &(addr, t) in &queries {
        statuses[index.lookup(addr, t).status as usize] += 1;
    }
    println!(
        "queries: {} — exact {}, ambiguous {}, unknown {}",
        queries.len(),
        statuses[Attribution::Exact as usize],
        statuses[Attribution::Ambiguous as usize],
        statuses[Attribution::Unknown as usize]
    );

    let bits: LatestBits = latest
        .iter()
        .filter_map(|(a, id)| match a {
            IpAddr::V4(a) => Some((a.to_bits(), Arc::clone(id))),
            IpAddr::V6(_) => None,
        })
        .collect();
    let shared: SharedIndex = Arc::new(parking_lot::RwLock::new(index));
    let mut rounds = Vec::new();
    for _ in 0..if quick { 1 } else { 5 } {
        // The read lock taken once for the whole run, as the enricher holds it over a batch.
        let guard = shared.read();
        let ranged = measure(&queries, time, |addr, t| guard.lookup(addr, t));
        let recent = measure(&queries_recent, time, |addr, t| guard.lookup(addr, t));
        drop(guard);
        let locked = measure(&queries, time, |addr, t| shared.read().lookup(addr, t));
        let plain = measure(&queries, time, |addr, _| match latest.get(&addr) {
            Some(id) => Endpoint::exact(Arc::clone(id)),
            None => Endpoint::unknown(),
        });
        let fast = measure(&queries, time, |addr, _| {
            let key = match addr {
                IpAddr::V4(a) => a.to_bits(),
                IpAddr::V6(_) => 0,
            };
            match bits.get(&key) {
                Some(id) => Endpoint::exact(Arc::clone(id)),
                None => Endpoint::unknown(),
            }
        });
        println!(
            "time-ranged index: {ranged:>10.0}/s ({locked:>10.0}/s locking per lookup, {recent:>10.0}/s at recent times) | latest-owner HashMap<IpAddr, Arc>: {plain:>10.0}/s (ratio {:.2}) | latest-owner u32 map: {fast:>10.0}/s (ratio {:.2})",
            ranged / plain,
            ranged / fast
        );
        rounds.push([ranged, locked, plain, fast, recent]);
    }
    let median = |i: usize| {
        let mut v: Vec<f64> = rounds.iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [ranged, locked, plain, fast, recent] = [0, 1, 2, 3, 4].map(median);
    println!(
        "median of {} rounds, lookups/s on one core: time-ranged index {ranged:.0} ({locked:.0} locking per lookup, {recent:.0} at recent times); \
         latest-owner HashMap<IpAddr, Arc<Identity>> {plain:.0} (ratio {:.2}); latest-owner u32-keyed map {fast:.0} (ratio {:.2})",
        rounds.len(),
        ranged / plain,
        ranged / fast
    );
}
