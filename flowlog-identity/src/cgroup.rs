//! Which container or service a local process ran in: the capture records the process's cgroup
//! v2 id (`bpf_get_current_cgroup_id`, the inode number of the cgroup's directory), and
//! [`CgroupResolver`] turns it into a `Container` identity by finding that directory and reading
//! its path: `cri-containerd-<id>.scope` (containerd), `crio-<id>.scope` (CRI-O),
//! `docker-<id>.scope` (Docker), `libpod-<id>.scope` (Podman), a bare 64-hex directory
//! (cgroupfs drivers) give the container id; `kubepods-…-pod<uid>.slice` (`_` → `-`) or
//! `pod<uid>` the pod UID; a plain systemd unit (`system.slice/sshd.service`) is named by its unit.
//!
//! Cgroups come and go, so results are cached and the hierarchy re-scanned on a miss, at most
//! once per `min_rescan` (default 1 s); a cgroup that disappeared is remembered for `retain`
//! (default 10 min) so late flows of a container that just exited still resolve.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use flowlog_record::{Identity, IdentityKind};
use parking_lot::RwLock;

use crate::{
    host_source::{HOST_SOURCE, HostError},
    source::FailureLog,
};

/// What a cgroup's path says about the workload in it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupPath {
    /// 64 hex digits, from the innermost component that names a container.
    pub container_id: Option<String>,
    /// Kubernetes pod UID with dashes.
    pub pod_uid: Option<String>,
    /// The innermost systemd unit (`*.service`, or a `*.scope` that is not a container).
    pub unit: Option<String>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_pod_uid(s: &str) -> bool {
    s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

fn container_id(component: &str) -> Option<&str> {
    let c = component.strip_suffix(".scope").unwrap_or(component);
    ["cri-containerd-", "crio-", "docker-", "libpod-"]
        .iter()
        .find_map(|p| c.strip_prefix(p))
        .or(Some(c))
        .filter(|id| is_container_id(id))
}

fn pod_uid(component: &str) -> Option<String> {
    let uid = match component.strip_suffix(".slice") {
        // systemd driver: kubepods-burstable-pod<uid with _>.slice
        Some(slice) => slice.rsplit_once("-pod")?.1,
        // cgroupfs driver: pod<uid>
        None => component.strip_prefix("pod")?,
    };
    let uid = uid.replace('_', "-");
    is_pod_uid(&uid).then_some(uid)
}

/// Reads a cgroup path (as in `/proc/<pid>/cgroup`, e.g.
/// `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`).
pub fn parse_cgroup_path(path: &str) -> CgroupPath {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let id = components
        .iter()
        .rev()
        .find_map(|c| container_id(c))
        .map(str::to_owned);
    let uid = components.iter().rev().find_map(|c| pod_uid(c));
    let unit = components
        .iter()
        .rev()
        .find(|c| c.ends_with(".service") || (c.ends_with(".scope") && container_id(c).is_none()))
        .map(|c| (*c).to_owned());
    CgroupPath {
        container_id: id,
        pod_uid: uid,
        unit,
    }
}

/// The identity of the cgroup at `path` (relative to the hierarchy's root, starting with `/`):
/// named by its container id, else its unit, else its path.
pub fn cgroup_identity(path: &str, node: &str) -> Identity {
    let parsed = parse_cgroup_path(path);
    let name = parsed
        .container_id
        .clone()
        .or_else(|| parsed.unit.clone())
        .unwrap_or_else(|| path.to_owned());
    Identity {
        kind: IdentityKind::Container,
        name,
        labels: [("cgroup".to_owned(), path.to_owned())].into(),
        node: Some(node.to_owned()),
        container_id: parsed.container_id,
        pod_uid: parsed.pod_uid,
        source: HOST_SOURCE.to_owned(),
        ..Identity::default()
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split(' ').next()? != "cgroup2" {
            return None;
        }
        // Fields: id parent major:minor root mount-point ...
        mount.split(' ').nth(4).map(PathBuf::from)
    })
}

#[derive(Debug)]
struct Known {
    /// `None` for the root cgroup: a process there is the host itself, not a container.
    identity: Option<Arc<Identity>>,
    path: String,
    /// When a scan first missed its directory.
    gone_since: Option<Instant>,
}

#[derive(Debug)]
struct Cache {
    by_id: HashMap<u64, Known>,
    last_scan: Option<Instant>,
    failures: FailureLog,
}

/// Cgroup id → `Container` identity, cached, for one host.
#[derive(Debug)]
pub struct CgroupResolver {
    root: PathBuf,
    node: String,
    min_rescan: Duration,
    retain: Duration,
    cache: RwLock<Cache>,
}

impl CgroupResolver {
    /// A resolver for the hierarchy at `root`; identities carry `node` (this host's name).
    pub fn new(root: impl Into<PathBuf>, node: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            node: node.into(),
            min_rescan: Duration::from_secs(1),
            retain: Duration::from_secs(600),
            cache: RwLock::new(Cache {
                by_id: HashMap::new(),
                last_scan: None,
                failures: FailureLog::new("cgroup"),
            }),
        }
    }

    /// A resolver for this host's cgroup v2 hierarchy, named by its hostname.
    pub fn system() -> Result<Self, HostError> {
        let root = cgroup2_mount().ok_or_else(|| HostError::Cgroups {
            path: "/proc/self/mountinfo".to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no cgroup2 mount"),
        })?;
        Ok(Self::new(root, crate::host_source::hostname()?))
    }

    /// How long a scan result stands before a miss may re-scan, and how long a vanished cgroup
    /// is remembered.
    pub fn with_timing(mut self, min_rescan: Duration, retain: Duration) -> Self {
        self.min_rescan = min_rescan;
        self.retain = retain;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The identity of cgroup `cgroup_id`, or `None` if no cgroup has that id (after a re-scan,
    /// unless one ran less than `min_rescan` ago) or it is the root cgroup (the host itself,
    /// which its addresses name).
    pub fn resolve(&self, cgroup_id: u64) -> Option<Arc<Identity>> {
        if let Some(k) = self.cache.read().by_id.get(&cgroup_id) {
            return k.identity.clone();
        }
        let mut cache = self.cache.write();
        if let Some(k) = cache.by_id.get(&cgroup_id) {
            return k.identity.clone();
        }
        if cache
            .last_scan
            .is_some_and(|t| t.elapsed() < self.min_rescan)
        {
            return None;
        }
        self.scan(&mut cache);
        cache.by_id.get(&cgroup_id).and_then(|k| k.identity.clone())
    }

    /// Re-scans now; returns how many cgroups are known (live or recently gone).
    pub fn rescan(&self) -> usize {
        let mut cache = self.cache.write();
        self.scan(&mut cache);
        cache.by_id.len()
    }

    fn scan(&self, cache: &mut Cache) {
        let now = Instant::now();
        cache.last_scan = Some(now);
        let mut found: HashMap<u64, String> = HashMap::new();
        let root_ino = match std::fs::metadata(&self.root) {
            Ok(m) => m.ino(),
            Err(source) => {
                cache.failures.failed(&HostError::Cgroups {
                    path: self.root.display().to_string(),
                    source,
                });
                return;
            }
        };
        cache.failures.succeeded();
        found.insert(root_ino, "/".to_owned());
        let mut stack = vec![(self.root.clone(), String::new())];
        while let Some((dir, rel)) = stack.pop() {
            // A cgroup removed while we walk is simply not found.
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                if !kind.is_dir() {
                    continue;
                }
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                let rel = format!("{rel}/{}", entry.file_name().to_string_lossy());
                found.insert(meta.ino(), rel.clone());
                stack.push((entry.path(), rel));
            }
        }
        for (id, known) in &mut cache.by_id {
            if !found.contains_key(id) {
                known.gone_since.get_or_insert(now);
            }
        }
        cache.by_id.retain(|_, k| {
            k.gone_since
                .is_none_or(|t| now.duration_since(t) < self.retain)
        });
        for (id, path) in found {
            match cache.by_id.get_mut(&id) {
                Some(k) if k.path == path => k.gone_since = None,
                _ => {
                    let identity =
                        (path != "/").then(|| Arc::new(cgroup_identity(&path, &self.node)));
                    cache.by_id.insert(
                        id,
                        Known {
                            identity,
                            path,
                            gone_since: None,
                        },
                    );
                }
            }
        }
    }
}
