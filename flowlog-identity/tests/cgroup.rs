//! The cgroup resolver: the path parser on the paths container runtimes and systemd really make,
//! real cgroups created under this host's cgroup v2 hierarchy resolved from their inode numbers
//! (and removed afterwards), and this test process's own cgroup.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use flowlog_identity::{CgroupPath, CgroupResolver, cgroup2_mount, parse_cgroup_path};
use flowlog_record::IdentityKind;

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const ID2: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
const UID: &str = "6f2a1c3e-9b8d-4e7f-a1b2-c3d4e5f60718";
const UID_: &str = "6f2a1c3e_9b8d_4e7f_a1b2_c3d4e5f60718";

fn parsed(container: Option<&str>, pod: Option<&str>, unit: Option<&str>) -> CgroupPath {
    CgroupPath {
        container_id: container.map(str::to_owned),
        pod_uid: pod.map(str::to_owned),
        unit: unit.map(str::to_owned),
    }
}

#[test]
fn cgroup_paths_of_runtimes_and_systemd() {
    let cases = [
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            parsed(Some(ID), Some(UID), None),
        ),
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope"),
            parsed(Some(ID), Some(UID), None),
        ),
        (
            // CRI-O's monitor process is not the container.
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope"),
            parsed(None, Some(UID), Some(&format!("crio-conmon-{ID}.scope"))),
        ),
        (
            format!("/system.slice/docker-{ID}.scope"),
            parsed(Some(ID), None, None),
        ),
        (
            format!("/machine.slice/libpod-{ID}.scope"),
            parsed(Some(ID), None, None),
        ),
        // cgroupfs drivers.
        (format!("/docker/{ID}"), parsed(Some(ID), None, None)),
        (
            format!("/kubepods/besteffort/pod{UID}/{ID2}"),
            parsed(Some(ID2), Some(UID), None),
        ),
        (
            "/system.slice/sshd.service".into(),
            parsed(None, None, Some("sshd.service")),
        ),
        (
            "/user.slice/user-0.slice/session-3.scope".into(),
            parsed(None, None, Some("session-3.scope")),
        ),
        ("/".into(), parsed(None, None, None)),
        (
            "/system.slice/docker-compose.scope".into(),
            parsed(None, None, Some("docker-compose.scope")),
        ),
    ];
    for (path, expected) in cases {
        assert_eq!(parse_cgroup_path(&path), expected, "{path}");
    }
}

/// Cgroups made for one test under the cgroup v2 root, removed (deepest first) when it ends.
struct TestCgroups {
    base: PathBuf,
    made: Vec<PathBuf>,
}

impl TestCgroups {
    fn new(root: &Path, tag: &str) -> Self {
        let base = root.join(format!("flowlog-test-{tag}-{}", std::process::id()));
        fs::create_dir(&base).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", base.display()));
        Self {
            made: vec![base.clone()],
            base,
        }
    }

    /// Makes `rel` (and its parents) under the base; returns the leaf's inode (= cgroup id).
    fn make(&mut self, rel: &str) -> u64 {
        let mut dir = self.base.clone();
        for part in rel.split('/') {
            dir.push(part);
            if !dir.exists() {
                fs::create_dir(&dir).unwrap();
                self.made.push(dir.clone());
            }
        }
        fs::metadata(&dir).unwrap().ino()
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        for dir in self.made.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

#[test]
fn real_cgroups_resolve_from_their_inode_to_container_pod_and_unit() {
    let root = cgroup2_mount().expect("a cgroup2 mount in /proc/self/mountinfo");
    let mut cgroups = TestCgroups::new(&root, "resolve");
    let docker = cgroups.make(&format!("docker-{ID}.scope"));
    let pod = cgroups.make(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID2}.scope"
    ));
    let sshd = cgroups.make("system.slice/sshd.service");
    let resolver = CgroupResolver::new(&root, "node-a");
    let base = format!("/flowlog-test-resolve-{}", std::process::id());

    let found = resolver.resolve(docker).expect("the docker cgroup");
    assert_eq!(found.kind, IdentityKind::Container);
    assert_eq!(found.name, ID);
    assert_eq!(found.container_id.as_deref(), Some(ID));
    assert_eq!(found.pod_uid, None);
    assert_eq!(found.node.as_deref(), Some("node-a"));
    assert_eq!(found.source, "host");
    assert_eq!(found.labels["cgroup"], format!("{base}/docker-{ID}.scope"));

    let found = resolver.resolve(pod).expect("the pod's container cgroup");
    assert_eq!(found.name, ID2);
    assert_eq!(found.container_id.as_deref(), Some(ID2));
    assert_eq!(found.pod_uid.as_deref(), Some(UID));

    let found = resolver.resolve(sshd).expect("the sshd cgroup");
    assert_eq!(found.name, "sshd.service");
    assert_eq!(found.container_id, None);

    // Not a cgroup (the inode of a regular file in the hierarchy): unknown.
    let file_ino = fs::metadata(root.join("cgroup.procs")).unwrap().ino();
    assert_eq!(resolver.resolve(file_ino), None);
    // Cached: the same Arc again.
    let again = resolver.resolve(docker).unwrap();
    assert!(std::sync::Arc::ptr_eq(
        &again,
        &resolver.resolve(docker).unwrap()
    ));
}

#[test]
fn a_cgroup_made_after_a_scan_is_found_by_an_explicit_rescan() {
    let root = cgroup2_mount().expect("a cgroup2 mount in /proc/self/mountinfo");
    let mut cgroups = TestCgroups::new(&root, "rescan");
    // A re-scan interval no test run can outlast, so the outcome does not depend on timing.
    let resolver = CgroupResolver::new(&root, "node-a")
        .with_timing(Duration::from_secs(3_600), Duration::from_secs(3_600));
    resolver.rescan();
    let late = cgroups.make(&format!("crio-{ID}.scope"));
    // A miss within the re-scan interval does not scan again...
    assert_eq!(resolver.resolve(late), None);
    // ...an explicit re-scan does.
    resolver.rescan();
    assert_eq!(
        resolver.resolve(late).unwrap().container_id.as_deref(),
        Some(ID)
    );
}

#[test]
fn this_process_cgroup_resolves_from_its_inode() {
    let root = cgroup2_mount().expect("a cgroup2 mount in /proc/self/mountinfo");
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line in /proc/self/cgroup")
        .to_owned();
    let ino = fs::metadata(root.join(path.trim_start_matches('/')))
        .unwrap()
        .ino();
    let resolver = CgroupResolver::new(&root, "node-a");
    // The root cgroup is the host itself (its addresses name it), never a container.
    let root_ino = fs::metadata(&root).unwrap().ino();
    assert_eq!(resolver.resolve(root_ino), None);
    if path == "/" {
        assert_eq!(
            resolver.resolve(ino),
            None,
            "this process runs in the root cgroup"
        );
    } else {
        let found = resolver.resolve(ino).expect("this process's cgroup");
        assert_eq!(found.labels["cgroup"], path);
        assert_eq!(found.kind, IdentityKind::Container);
    }
}
