//! The images under test and how they run: builds them once per test process with
//! `scripts/images --profile <the test's profile>` from the binaries cargo already built, and
//! runs containers with podman exactly as the manifests run them ([`ContainerSpec`]: user,
//! capabilities, read-only root, mounts, environment, seccomp), so that what the manifests say
//! is what the tests prove.
//!
//! Podman runs here only with runc and cgroupfs and with low ulimits (see DESIGN.md); every
//! `podman run` gets those settings from [`podman_run`].
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{binaries_dir, repo_root};

/// The workspace's version: scripts/images tags release images with it, and the tests' images
/// with `<version>-<profile>` ([`test_tag`]), so that a test run never replaces release images.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The tag of the images the tests build: `<version>-<profile of the test's binaries>`.
pub fn test_tag() -> String {
    format!("{VERSION}-{}", profile())
}

/// The cargo profile of the workspace's binaries the tests use (`debug` under `cargo test`).
fn profile() -> String {
    binaries_dir()
        .file_name()
        .and_then(|p| p.to_str())
        .unwrap_or("debug")
        .to_owned()
}

/// How long a container gets to do what it should (start, answer, exit).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// One of the images `scripts/images` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// `flowlog/flowlog-agent`: flowlog-sidecar.
    Agent,
    /// `flowlog/flowlog-enricher`: flowlog-enricher and flowlog-inventory.
    Enricher,
    /// `flowlog/flowlog`: the one-host binary.
    Flowlog,
}

impl Image {
    /// The reference of the image the tests built.
    pub fn reference(self) -> String {
        let name = match self {
            Image::Agent => "flowlog/flowlog-agent",
            Image::Enricher => "flowlog/flowlog-enricher",
            Image::Flowlog => "flowlog/flowlog",
        };
        format!("{name}:{}", test_tag())
    }
}

/// `podman` with the settings every podman command needs here (cgroupfs: systemd does not
/// manage this machine's cgroups).
pub fn podman() -> Command {
    let mut command = Command::new("podman");
    command.arg("--cgroup-manager=cgroupfs");
    command
}

/// `podman run` with the runtime and limits that work on this machine: runc (crun fails on the
/// VM's hybrid cgroups) and ulimits no higher than the VM's hard limits. The caller adds the
/// container's settings, the image and its arguments.
pub fn podman_run() -> Command {
    let mut command = podman();
    command.args(["run", "--rm", "--runtime", "runc"]);
    command.args([
        "--ulimit",
        "nofile=1024:20000",
        "--ulimit",
        "nproc=1024:1024",
    ]);
    command
}

/// Builds the three images from the binaries of the test's profile (`scripts/images --profile
/// debug --tag <version>-debug` under `cargo test`), once per test process; later calls wait
/// for the first and share its result.
pub fn build_images() -> anyhow::Result<()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| run_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn run_build() -> anyhow::Result<()> {
    ensure!(
        Command::new("podman")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "podman is not installed: run scripts/bootstrap"
    );
    let binaries = binaries_dir();
    let profile = profile();
    let started = Instant::now();
    let out = Command::new(repo_root().join("scripts/images"))
        .args(["--profile", &profile, "--tag", &test_tag(), "--binaries"])
        .arg(&binaries)
        .output()
        .context("running scripts/images")?;
    ensure!(
        out.status.success(),
        "scripts/images --profile {profile} --binaries {} failed ({}):\n{}{}",
        binaries.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "built the images in {:.1} s:\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// A bind mount of a host path into the container (a Kubernetes hostPath volume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    pub container: PathBuf,
    pub read_only: bool,
}

/// The container's seccomp profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seccomp {
    /// Kubernetes' `RuntimeDefault` as containerd (EKS and most clusters) has it since 1.7:
    /// the runtime's default profile, which allows `bpf` with CAP_BPF and `perf_event_open`
    /// with CAP_PERFMON. Podman's own default allows them only with CAP_SYS_ADMIN, so the tests
    /// run podman's default profile with containerd's rules for those two calls
    /// ([`containerd_like_profile`]).
    RuntimeDefault,
    /// Podman's default profile as it is (bpf and perf_event_open only with CAP_SYS_ADMIN, as
    /// CRI-O's default).
    PodmanDefault,
}

/// How a container runs: the part of a Kubernetes container spec (and pod spec) that podman
/// can reproduce. [`agent_spec`], [`enricher_spec`] and [`inventory_spec`] are the manifests'.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub image: Image,
    /// `--entrypoint` (Kubernetes `command`), when not the image's.
    pub entrypoint: Option<String>,
    /// `runAsUser:runAsGroup`.
    pub user: String,
    /// `capabilities.add` after `drop: [ALL]` (names without `CAP_`).
    pub capabilities: Vec<String>,
    /// `readOnlyRootFilesystem`.
    pub read_only_root: bool,
    pub mounts: Vec<Mount>,
    pub env: Vec<(String, String)>,
    /// `hostNetwork`.
    pub host_network: bool,
    pub seccomp: Seccomp,
}

/// The rendered `deploy/kubernetes/base` (rendered once per test process).
fn base_objects() -> &'static [serde_json::Value] {
    static OBJECTS: OnceLock<Vec<serde_json::Value>> = OnceLock::new();
    OBJECTS.get_or_init(|| {
        let dir = crate::kubernetes::kubernetes_dir().join("base");
        crate::kubernetes::kustomize(&dir)
            .and_then(|yaml| crate::kubernetes::parse_objects(&yaml))
            .unwrap_or_else(|e| panic!("rendering {}: {e:#}", dir.display()))
    })
}

/// The container `name` of the workload `kind`/`name` in `deploy/kubernetes/base`, as podman
/// runs it ([`ContainerSpec::from_manifest`]); panics naming what is missing.
fn manifest_spec(kind: &str, name: &str, image: Image) -> ContainerSpec {
    let object = base_objects()
        .iter()
        .find(|o| {
            crate::kubernetes::str_at(o, "/kind") == kind
                && crate::kubernetes::str_at(o, "/metadata/name") == name
        })
        .unwrap_or_else(|| panic!("deploy/kubernetes/base has no {kind} {name}"));
    ContainerSpec::from_manifest(object, image)
        .unwrap_or_else(|e| panic!("{kind} {name} of deploy/kubernetes/base: {e:#}"))
}

/// The agent's container, read from the DaemonSet `flowlog-agent` of deploy/kubernetes/base:
/// the tests run the image with exactly the manifest's privileges.
pub fn agent_spec() -> ContainerSpec {
    manifest_spec("DaemonSet", "flowlog-agent", Image::Agent)
}

/// The enricher's container, read from the Deployment `flowlog-enricher` of
/// deploy/kubernetes/base (a non-root user, no capabilities, a read-only root).
pub fn enricher_spec() -> ContainerSpec {
    manifest_spec("Deployment", "flowlog-enricher", Image::Enricher)
}

/// The inventory publisher's container, read from the Deployment `flowlog-inventory` of
/// deploy/kubernetes/base: the enricher's image with `flowlog-inventory` as its command.
pub fn inventory_spec() -> ContainerSpec {
    manifest_spec("Deployment", "flowlog-inventory", Image::Enricher)
}

/// The one-host image's container (`flowlog`, not in the Kubernetes manifests): the agent's
/// privileges and mounts, plus the host's network namespace (the host inventory names the
/// host's own interface addresses) and the host's cgroup v2 hierarchy, read-only at the same
/// path `cgroup2` as on the host (the local end's container, from the process's cgroup id).
/// Parquet files go to the working directory, /var/lib/flowlog, the agent's spool mount.
pub fn flowlog_spec(cgroup2: &str) -> ContainerSpec {
    let mut spec = agent_spec();
    spec.image = Image::Flowlog;
    spec.mounts.push(Mount {
        host: PathBuf::from(cgroup2),
        container: PathBuf::from(cgroup2),
        read_only: true,
    });
    spec.host_network = true;
    spec
}

impl ContainerSpec {
    /// How podman runs the (first) container of a workload `object` (a DaemonSet or
    /// Deployment): its command, `runAsUser:runAsGroup` (the container's, else the pod's),
    /// `capabilities.add` (after `drop: [ALL]`, which every container has: the posture tests
    /// check it), `readOnlyRootFilesystem`, its hostPath volumes at their mount paths, the
    /// environment variables whose literal values are absolute paths (where it finds its
    /// mounts; the rest — brokers, topics — belongs to the test), `hostNetwork` and a
    /// `RuntimeDefault` seccomp profile.
    pub fn from_manifest(object: &serde_json::Value, image: Image) -> anyhow::Result<Self> {
        use serde_json::Value;
        let pod = crate::kubernetes::pod_spec(object).context("not a workload with a pod")?;
        let container = pod
            .pointer("/containers/0")
            .context("the pod has no container")?;
        let field = |pointer: &str| {
            container
                .pointer(&format!("/securityContext{pointer}"))
                .or_else(|| pod.pointer(&format!("/securityContext{pointer}")))
        };
        let id = |pointer: &str| {
            field(pointer)
                .and_then(Value::as_u64)
                .with_context(|| format!("no securityContext{pointer}"))
        };
        let user = format!("{}:{}", id("/runAsUser")?, id("/runAsGroup")?);
        let capabilities = container
            .pointer("/securityContext/capabilities/add")
            .and_then(Value::as_array)
            .map(|add| {
                add.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let read_only_root = container
            .pointer("/securityContext/readOnlyRootFilesystem")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let volumes = pod.get("volumes").and_then(Value::as_array);
        let mut mounts = Vec::new();
        for mount in container
            .get("volumeMounts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = crate::kubernetes::str_at(mount, "/name");
            let host = volumes
                .into_iter()
                .flatten()
                .find(|v| crate::kubernetes::str_at(v, "/name") == name)
                .and_then(|v| v.pointer("/hostPath/path"))
                .and_then(Value::as_str);
            if let Some(host) = host {
                mounts.push(Mount {
                    host: PathBuf::from(host),
                    container: PathBuf::from(crate::kubernetes::str_at(mount, "/mountPath")),
                    read_only: mount
                        .get("readOnly")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                });
            }
        }
        let env = container
            .get("env")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let value = e.get("value")?.as_str()?;
                value.starts_with('/').then(|| {
                    (
                        crate::kubernetes::str_at(e, "/name").to_owned(),
                        value.to_owned(),
                    )
                })
            })
            .collect();
        let seccomp = match field("/seccompProfile/type").and_then(Value::as_str) {
            Some("RuntimeDefault") => Seccomp::RuntimeDefault,
            other => bail!("seccompProfile {other:?}: the tests know RuntimeDefault only"),
        };
        Ok(Self {
            image,
            entrypoint: container
                .pointer("/command/0")
                .and_then(Value::as_str)
                .map(str::to_owned),
            user,
            capabilities,
            read_only_root,
            mounts,
            env,
            host_network: pod
                .get("hostNetwork")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            seccomp,
        })
    }

    /// Replaces the host side of the mount at `container` (a test's own directory for the
    /// manifests' hostPath); panics if the spec has no such mount.
    pub fn with_host_path(mut self, container: &str, host: &Path) -> Self {
        let mount = self
            .mounts
            .iter_mut()
            .find(|m| m.container == Path::new(container))
            .unwrap_or_else(|| panic!("the spec mounts nothing at {container}"));
        mount.host = host.to_path_buf();
        self
    }

    /// The spec without capability `name`.
    pub fn without_capability(mut self, name: &str) -> Self {
        let before = self.capabilities.len();
        self.capabilities.retain(|c| c != name);
        assert_ne!(
            before,
            self.capabilities.len(),
            "the spec does not add {name}"
        );
        self
    }

    /// `podman run` arguments for this spec, up to the image (the caller adds the name and
    /// other options before, the container's arguments after).
    pub fn podman_args(&self) -> anyhow::Result<Vec<String>> {
        let mut args = vec![
            "--user".to_owned(),
            self.user.clone(),
            "--cap-drop=ALL".to_owned(),
            // Kubernetes has no private /tmp on a read-only root: nor do the tests.
            "--read-only-tmpfs=false".to_owned(),
            // Kubernetes sets it when allowPrivilegeEscalation is false (the manifests').
            "--security-opt=no-new-privileges".to_owned(),
        ];
        for cap in &self.capabilities {
            args.push(format!("--cap-add={cap}"));
        }
        if self.read_only_root {
            args.push("--read-only".to_owned());
        }
        for m in &self.mounts {
            args.push("--volume".to_owned());
            args.push(format!(
                "{}:{}:{}",
                m.host.display(),
                m.container.display(),
                if m.read_only { "ro" } else { "rw" }
            ));
        }
        for (key, value) in &self.env {
            args.push("--env".to_owned());
            args.push(format!("{key}={value}"));
        }
        args.push(if self.host_network {
            "--network=host".to_owned()
        } else {
            // The pod's own network namespace; none of these tests needs more than loopback.
            "--network=none".to_owned()
        });
        match self.seccomp {
            Seccomp::RuntimeDefault => args.push(format!(
                "--security-opt=seccomp={}",
                containerd_like_profile()?.display()
            )),
            Seccomp::PodmanDefault => {}
        }
        if let Some(entrypoint) = &self.entrypoint {
            args.push("--entrypoint".to_owned());
            args.push(entrypoint.clone());
        }
        args.push(self.image.reference());
        Ok(args)
    }
}

/// Podman's default seccomp profile (`/usr/share/containers/seccomp.json`) with containerd's
/// rules for `bpf` and `perf_event_open` (allowed with CAP_BPF, respectively CAP_PERFMON, as
/// well as with CAP_SYS_ADMIN; containerd PR 7301, in 1.7 and late 1.6 releases): what
/// `seccompProfile: RuntimeDefault` gives a container on containerd. Written once per test
/// process, beside the binaries.
pub fn containerd_like_profile() -> anyhow::Result<PathBuf> {
    static PROFILE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PROFILE
        .get_or_init(|| write_containerd_like_profile().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn write_containerd_like_profile() -> anyhow::Result<PathBuf> {
    use serde_json::{Value, json};
    const DEFAULT: &str = "/usr/share/containers/seccomp.json";
    let text = std::fs::read_to_string(DEFAULT).with_context(|| format!("reading {DEFAULT}"))?;
    let mut profile: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {DEFAULT}"))?;
    let syscalls = profile["syscalls"]
        .as_array_mut()
        .with_context(|| format!("{DEFAULT} has no syscalls list"))?;
    const GATED: [(&str, &str); 2] = [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")];
    // Podman refuses them (EPERM) unless the container has CAP_SYS_ADMIN (its rule for that
    // stays); containerd refuses them (EPERM, its default action) unless it has CAP_SYS_ADMIN
    // or the capability that gates each.
    for rule in syscalls.iter_mut() {
        if rule["action"] == "SCMP_ACT_ERRNO"
            && let Some(names) = rule["names"].as_array_mut()
        {
            names.retain(|n| !GATED.iter().any(|(call, _)| n == call));
        }
    }
    syscalls.retain(|rule| rule["names"].as_array().is_none_or(|n| !n.is_empty()));
    for (call, cap) in GATED {
        syscalls.push(json!({
            "names": [call],
            "action": "SCMP_ACT_ALLOW",
            "args": [],
            "includes": { "caps": [cap] },
            "excludes": {}
        }));
        syscalls.push(json!({
            "names": [call],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
            "args": [],
            "includes": {},
            "excludes": { "caps": [cap, "CAP_SYS_ADMIN"] }
        }));
    }
    // Beside the binaries, not in /tmp: one file, replaced whole (renamed over) by each run.
    let path = binaries_dir().join("flowlog-test-seccomp-containerd.json");
    let partial = path.with_extension(format!("json.{}", std::process::id()));
    std::fs::write(&partial, serde_json::to_vec_pretty(&profile)?)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A container running in the foreground of a `podman run --rm --name <name>` child process,
/// its stdout and stderr collected; removed (`podman rm --force`) on drop.
pub struct Container {
    pub name: String,
    child: Option<Child>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    lines: mpsc::Receiver<String>,
}

impl Container {
    /// Starts `spec` as container `name` with `args` for its entrypoint. Its output is echoed
    /// to the test's stderr, prefixed with the name.
    pub fn start(name: &str, spec: &ContainerSpec, args: &[&str]) -> anyhow::Result<Self> {
        let mut command = podman_run();
        command.args(["--name", name]).args(spec.podman_args()?);
        command.args(args);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting podman run")?;
        let (tx, lines) = mpsc::channel();
        let collect = |pipe: Box<dyn std::io::Read + Send>, into: &Arc<Mutex<String>>| {
            let (into, tx, tag) = (Arc::clone(into), tx.clone(), name.to_owned());
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    eprintln!("{tag}: {line}");
                    let mut text = into.lock().unwrap_or_else(|e| e.into_inner());
                    text.push_str(&line);
                    text.push('\n');
                    let _ = tx.send(line);
                }
            });
        };
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(Box::new(child.stdout.take().expect("piped")), &stdout);
        collect(Box::new(child.stderr.take().expect("piped")), &stderr);
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            stdout,
            stderr,
            lines,
        })
    }

    /// Waits until an output line contains `text`; fails if the container exits first or
    /// [`PATIENCE`] passes.
    pub fn wait_for_line(&mut self, text: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.contains(text) => return Ok(()),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = self.try_wait()? {
                        bail!(
                            "container {} exited ({status}) before logging {text:?}:\n{}",
                            self.name,
                            self.stderr()
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        bail!(
            "container {} did not log {text:?} within {PATIENCE:?}:\n{}",
            self.name,
            self.stderr()
        )
    }

    fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let child = self
            .child
            .as_mut()
            .context("the container was waited for")?;
        Ok(child.try_wait()?)
    }

    /// Waits up to `limit` for the container to exit by itself; its exit status.
    pub fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait()? {
                self.child = None;
                // The output threads end with the pipes; give them a moment to drain.
                thread::sleep(Duration::from_millis(100));
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "container {} still runs after {limit:?}:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM to the container's process (as the kubelet does) and waits for its exit.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let out = podman()
            .args(["kill", "--signal", "TERM", &self.name])
            .output()
            .context("running podman kill")?;
        ensure!(
            out.status.success(),
            "podman kill {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait(PATIENCE)
    }

    /// The pid, on the host, of the container's main process.
    pub fn host_pid(&self) -> anyhow::Result<u32> {
        let out = podman()
            .args(["inspect", "--format", "{{.State.Pid}}", &self.name])
            .output()
            .context("running podman inspect")?;
        ensure!(
            out.status.success(),
            "podman inspect {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .parse()
            .with_context(|| format!("pid {text:?} of container {}", self.name))
    }

    /// `/proc/<pid>/status` of the container's main process, as the host sees it.
    pub fn host_status(&self) -> anyhow::Result<String> {
        let path = format!("/proc/{}/status", self.host_pid()?);
        std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))
    }

    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = podman()
                .args(["rm", "--force", "--time", "0", &self.name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A container name no other test or run uses.
pub fn unique_name(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("flowlog-test-{what}-{}-{nanos}", std::process::id())
}
