//! This host as an inventory: its own addresses (every interface, IPv4 and IPv6; loopback
//! networks whole) owned by a `Host` identity named by the hostname, re-polled so that address
//! changes become Opens and Closes. The embedded mode needs it to name the local end of flows between processes on one
//! host and flows to its own addresses. The cgroup side (which container or service a process
//! ran in) is [`crate::cgroup`].
use std::{collections::BTreeSet, sync::Arc, time::Duration};

use flowlog_record::{Identity, IdentityKind};
use ipnet::IpNet;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    change::OwnershipChange,
    source::{BoxFuture, FailureLog, InventorySource, SourceError, check_every},
};

/// The source name in changes and watermarks (also the `source` of cgroup identities).
pub const HOST_SOURCE: &str = "host";

/// Why this host's inventory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("reading the hostname from {path}: {source}")]
    Hostname {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("listing this host's interface addresses: {0}")]
    Interfaces(std::io::Error),
    #[error("scanning cgroups under {path}: {source}")]
    Cgroups {
        path: String,
        source: std::io::Error,
    },
}

const HOSTNAME_PATH: &str = "/proc/sys/kernel/hostname";

/// This host's name, as the kernel has it (`uname -n`).
pub fn hostname() -> Result<String, HostError> {
    std::fs::read_to_string(HOSTNAME_PATH)
        .map(|s| s.trim().to_owned())
        .map_err(|source| HostError::Hostname {
            path: HOSTNAME_PATH,
            source,
        })
}

/// When this host booted, ns since the epoch (`btime` in `/proc/stat`), if the kernel says.
pub fn boot_time_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(secs * 1_000_000_000)
}

/// The prefixes this host owns: each interface address as a single-address prefix, and a
/// loopback interface's whole network (127.0.0.0/8: every address in it is this host's, and
/// services listen on more than 127.0.0.1).
fn interface_prefixes() -> Result<BTreeSet<IpNet>, HostError> {
    let mut prefixes = BTreeSet::new();
    for interface in if_addrs::get_if_addrs().map_err(HostError::Interfaces)? {
        let ip = interface.ip().to_canonical();
        prefixes.insert(IpNet::from(ip));
        if interface.is_loopback() {
            let len = match &interface.addr {
                if_addrs::IfAddr::V4(a) => a.prefixlen,
                if_addrs::IfAddr::V6(a) => a.prefixlen,
            };
            if let Ok(net) = IpNet::new(ip, len) {
                prefixes.insert(net.trunc());
            }
        }
    }
    Ok(prefixes)
}

/// This host's addresses as an inventory source.
#[derive(Debug)]
pub struct HostSource {
    interval: Duration,
    identity: Arc<Identity>,
    owner: String,
    /// Prefixes opened and not closed.
    current: BTreeSet<IpNet>,
    /// When the addresses found by the first poll are taken to have started: boot time, since
    /// they were most likely configured then and flows from before this process started may
    /// still be in the topic.
    first_from: u64,
    first: bool,
    failures: FailureLog,
}

impl HostSource {
    /// A source named by this host's hostname, polling every `interval`.
    pub fn new(interval: Duration) -> Result<Self, HostError> {
        Ok(Self::with_hostname(hostname()?, interval))
    }

    /// A source for a given hostname (tests, or a name from configuration).
    pub fn with_hostname(hostname: String, interval: Duration) -> Self {
        let identity = Arc::new(Identity {
            kind: IdentityKind::Host,
            name: hostname.clone(),
            source: HOST_SOURCE.to_owned(),
            ..Identity::default()
        });
        Self {
            interval,
            identity,
            owner: format!("host/{hostname}"),
            current: BTreeSet::new(),
            first_from: boot_time_ns().unwrap_or(0),
            first: true,
            failures: FailureLog::new(HOST_SOURCE),
        }
    }

    /// The identity every address of this host resolves to.
    pub fn identity(&self) -> Arc<Identity> {
        Arc::clone(&self.identity)
    }

    /// Prefixes currently held (each address; loopback networks whole).
    pub fn prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.current.iter().copied()
    }

    /// One poll at `now_ns`: Opens for new addresses (the first poll's at boot time), Closes for
    /// addresses gone, then a Watermark(now). If the interfaces cannot be listed the failure is
    /// counted and logged once, and nothing (no watermark) is returned.
    pub fn check(&mut self, now_ns: u64) -> Vec<OwnershipChange> {
        let found = match interface_prefixes() {
            Ok(found) => found,
            Err(e) => {
                self.failures.failed(&e);
                return Vec::new();
            }
        };
        self.failures.succeeded();
        let opened_at = if self.first {
            self.first_from.min(now_ns)
        } else {
            now_ns
        };
        self.first = false;
        let mut changes = Vec::new();
        for gone in self.current.difference(&found) {
            changes.push(OwnershipChange::Close {
                source: HOST_SOURCE.to_owned(),
                owner: self.owner.clone(),
                prefix: *gone,
                at_ns: now_ns,
            });
        }
        for new in found.difference(&self.current) {
            changes.push(OwnershipChange::Open {
                source: HOST_SOURCE.to_owned(),
                owner: self.owner.clone(),
                prefix: *new,
                identity: Arc::clone(&self.identity),
                at_ns: opened_at,
            });
        }
        self.current = found;
        changes.push(OwnershipChange::Watermark {
            source: HOST_SOURCE.to_owned(),
            at_ns: now_ns,
        });
        changes
    }
}

impl InventorySource for HostSource {
    fn name(&self) -> &str {
        HOST_SOURCE
    }

    fn run(
        mut self: Box<Self>,
        changes: mpsc::Sender<OwnershipChange>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let interval = self.interval;
            check_every(interval, &changes, &shutdown, |now| self.check(now)).await;
            Ok(())
        })
    }
}
