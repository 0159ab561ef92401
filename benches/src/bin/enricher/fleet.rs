//! A fleet's flows for the throughput run: what `flows.raw` carries from many hosts of a cluster,
//! not from one loopback. Hosts (nodes) talk to pods, services, other nodes and addresses on
//! the Internet; pods run on the hosts; every address the flows name is in the static inventory
//! the enricher is given, except the Internet ones (which come out `unknown`, as they would).
//! Addresses are only written into records: no traffic goes anywhere.
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
};

use flowlog_record::{Direction, FlowRecord, Outcome};

/// The fleet's shape.
#[derive(Debug, Clone, Copy)]
pub struct Fleet {
    /// Hosts reporting flows (Kubernetes nodes), 10.0.0.0/16.
    pub hosts: u32,
    /// Pod addresses, 10.64.0.0/10, spread over the hosts.
    pub pods: u32,
    /// Service cluster IPs, 172.20.0.0/16.
    pub services: u32,
    /// Internet addresses flows go to (not in the inventory).
    pub internet: u32,
}

impl Fleet {
    fn host_addr(i: u32) -> Ipv4Addr {
        Ipv4Addr::from_bits(0x0a00_0000 + 1 + i)
    }
    fn host_name(i: u32) -> String {
        let [_, _, c, d] = Self::host_addr(i).octets();
        format!("ip-10-0-{c}-{d}.eu-west-1.compute.internal")
    }
    fn pod_addr(i: u32) -> Ipv4Addr {
        Ipv4Addr::from_bits(0x0a40_0000 + 1 + i)
    }
    fn service_addr(i: u32) -> Ipv4Addr {
        Ipv4Addr::from_bits(0xac14_0000 + 1 + i)
    }
    /// Scattered over a few public /8s, as a fleet's egress is.
    fn internet_addr(i: u32) -> Ipv4Addr {
        const FIRST: [u8; 8] = [3, 13, 18, 34, 35, 52, 104, 151];
        let h = i.wrapping_mul(0x9e37_79b9);
        Ipv4Addr::new(
            FIRST[(i % 8) as usize],
            (h >> 8) as u8,
            (h >> 16) as u8,
            h as u8,
        )
    }

    /// The static inventory (`--static`): every host, pod and service by its own address.
    pub fn static_inventory(&self) -> String {
        let mut toml =
            String::with_capacity(200 * (self.hosts + self.pods + self.services) as usize);
        for i in 0..self.hosts {
            let _ = writeln!(
                toml,
                "[[entry]]\ncidr = \"{}\"\nname = \"{}\"\nkind = \"node\"\nzone = \"eu-west-1{}\"\n",
                Self::host_addr(i),
                Self::host_name(i),
                ["a", "b", "c"][(i % 3) as usize]
            );
        }
        for i in 0..self.pods {
            let _ = writeln!(
                toml,
                "[[entry]]\ncidr = \"{}\"\nname = \"app-{}-{:05x}\"\nkind = \"pod\"\n\
                 namespace = \"team-{}\"\nnode = \"{}\"\nworkload = {{ kind = \"Deployment\", name = \"app-{}\" }}\n",
                Self::pod_addr(i),
                i % 400,
                i,
                i % 40,
                Self::host_name(i % self.hosts),
                i % 400
            );
        }
        for i in 0..self.services {
            let _ = writeln!(
                toml,
                "[[entry]]\ncidr = \"{}\"\nname = \"svc-{i}\"\nkind = \"service\"\nnamespace = \"team-{}\"\n",
                Self::service_addr(i),
                i % 40
            );
        }
        toml
    }

    /// Record `i` of a run of flows that ended in the `span_ns` before `now_ns`: deterministic in
    /// `i` (so every run measures the same records), varied in every field a consumer reads.
    pub fn record(&self, i: u64, now_ns: u64, span_ns: u64) -> FlowRecord {
        let mut rng = Mix(i.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5851_f42d_4c95_7f2d);
        let host = (rng.next() % u64::from(self.hosts)) as u32;
        // A quarter of the flows are the host's own (kubelet, node agents), the rest its pods'.
        let local = if rng.next().is_multiple_of(4) {
            Self::host_addr(host)
        } else {
            let per_host = (self.pods / self.hosts).max(1);
            let pod = (rng.next() % u64::from(per_host)) as u32 * self.hosts + host;
            Self::pod_addr(pod % self.pods)
        };
        let (remote, remote_port) = match rng.next() % 100 {
            0..=59 => (
                Self::pod_addr((rng.next() % u64::from(self.pods)) as u32),
                [8080, 8443, 9090, 5432][(rng.next() % 4) as usize],
            ),
            60..=84 => (
                Self::service_addr((rng.next() % u64::from(self.services)) as u32),
                [80, 443, 6379, 9092][(rng.next() % 4) as usize],
            ),
            85..=94 => (
                Self::host_addr((rng.next() % u64::from(self.hosts)) as u32),
                10250,
            ),
            _ => (
                Self::internet_addr((rng.next() % u64::from(self.internet)) as u32),
                443,
            ),
        };
        let outcome = match rng.next() % 200 {
            0 => Outcome::Failed,
            1..=3 => Outcome::Reset,
            _ => Outcome::Closed,
        };
        let established = outcome != Outcome::Failed;
        let duration = (200_000 + rng.next() % 30_000_000_000) >> (rng.next() % 12);
        let end_ns = now_ns - rng.next() % span_ns;
        let sent = if established {
            1 << (rng.next() % 20)
        } else {
            0
        };
        let received = if established {
            1 << (rng.next() % 24)
        } else {
            0
        };
        let inbound = rng.next().is_multiple_of(3);
        FlowRecord {
            // A base per host plus a counter, as the agent draws them.
            flow_id: (u64::from(host) << 40) ^ 0x7f3a_0000_0000_0000 ^ i,
            host: Self::host_name(host),
            start_ns: end_ns - duration,
            end_ns,
            local_addr: IpAddr::V4(local),
            local_port: if inbound {
                remote_port
            } else {
                32_768 + (rng.next() % 28_000) as u16
            },
            remote_addr: IpAddr::V4(remote),
            remote_port: if inbound {
                32_768 + (rng.next() % 28_000) as u16
            } else {
                remote_port
            },
            direction: if inbound {
                Direction::Inbound
            } else {
                Direction::Outbound
            },
            outcome,
            bytes_sent: sent,
            bytes_received: received,
            segs_sent: 2 + sent / 1400 + rng.next() % 4,
            segs_received: 2 + received / 1400 + rng.next() % 4,
            retransmits: u64::from(rng.next().is_multiple_of(50)) * (1 + rng.next() % 5),
            resets_sent: u64::from(outcome == Outcome::Reset && rng.next().is_multiple_of(2)),
            resets_received: u64::from(outcome == Outcome::Reset),
            srtt_us: 40 + (rng.next() % 3_000) as u32,
            min_rtt_us: 30 + (rng.next() % 500) as u32,
            pid: Some(1 + (rng.next() % 60_000) as u32),
            comm: Some(
                ["java", "envoy", "node", "python3", "kubelet"][(rng.next() % 5) as usize].into(),
            ),
            cgroup_id: Some(4_000 + rng.next() % 300),
            ..FlowRecord::default()
        }
    }
}

/// splitmix64: choices need to vary, not to be unpredictable.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
