//! The systemd units as the tests see them: their directives, `systemd-analyze verify` in a
//! root directory made for it (so that the units' `ExecStart=` binaries exist without installing
//! anything on the host), and the exposure score of `systemd-analyze security --offline=true`.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

use crate::deploy_dir;

/// Each unit with the workspace binary its `ExecStart=` runs from `/usr/local/bin/`.
pub const UNITS: [(&str, &str); 3] = [
    ("flowlog-agent.service", "flowlog-sidecar"),
    ("flowlog-enricher.service", "flowlog-enricher"),
    ("flowlog-inventory.service", "flowlog-inventory"),
];

/// `deploy/systemd/`.
pub fn systemd_dir() -> PathBuf {
    deploy_dir().join("systemd")
}

/// The values of every `KEY=` line of a unit file (comments skipped), in order.
pub fn directive(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && !line.starts_with(';'))
        .filter_map(|line| line.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// A root directory for `systemd-analyze verify --root`: the host's system units (the targets
/// the units order themselves after), the units under `etc/systemd/system/`, and the
/// workspace's binaries from `binaries` at `usr/local/bin/<name>` (hard links, or copies across
/// file systems). Made under `parent`, replacing what a previous run left there.
pub fn verify_root(parent: &Path, binaries: &Path) -> anyhow::Result<PathBuf> {
    let root = parent.join(format!("systemd-verify-root-{}", std::process::id()));
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    let bin = root.join("usr/local/bin");
    let units = root.join("etc/systemd/system");
    let lib = root.join("usr/lib/systemd");
    for dir in [&bin, &units, &lib] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // The host's system units (targets such as network-online.target), symlinks kept.
    let status = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(&lib)
        .status()
        .context("copying /usr/lib/systemd/system into the verify root")?;
    ensure!(
        status.success(),
        "cp -a /usr/lib/systemd/system failed: {status}"
    );
    for (unit, binary) in UNITS {
        let from = binaries.join(binary);
        ensure!(
            from.is_file(),
            "{} does not exist: build the workspace's binaries first (`cargo build --bins`; \
             `cargo test --all-targets` does)",
            from.display()
        );
        let to = bin.join(binary);
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
        let source = systemd_dir().join(unit);
        std::fs::copy(&source, units.join(unit))
            .with_context(|| format!("copying {}", source.display()))?;
    }
    Ok(root)
}

/// What `systemd-analyze verify` printed for a unit, and whether it exited 0.
#[derive(Debug, Clone)]
pub struct Verified {
    pub success: bool,
    pub output: String,
}

/// `systemd-analyze verify --root=ROOT UNIT` (the unit as installed under the root).
pub fn verify(root: &Path, unit: &str) -> anyhow::Result<Verified> {
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .context("running systemd-analyze verify (systemd-analyze is part of systemd)")?;
    Ok(Verified {
        success: output.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

/// The overall exposure level of `systemd-analyze security --offline=true UNIT_FILE` (0 to 10,
/// lower is better).
pub fn exposure(unit_file: &Path) -> anyhow::Result<f64> {
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit_file)
        .output()
        .context("running systemd-analyze security --offline=true")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .with_context(|| {
            format!(
                "no exposure level for {} in: {text}{}",
                unit_file.display(),
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let score = line
        .rsplit_once(": ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .with_context(|| format!("no score in {line:?}"))?;
    score
        .parse()
        .with_context(|| format!("the score {score:?} in {line:?}"))
}

/// A capability as `setpriv` names it: `CAP_BPF` → `bpf`.
fn setpriv_name(capability: &str) -> String {
    capability
        .strip_prefix("CAP_")
        .unwrap_or(capability)
        .to_lowercase()
}

/// How a run of the agent as a non-root user ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRun {
    /// It logged "capturing TCP flows" (programs loaded and attached), then exited with this
    /// code on SIGTERM; its warnings and errors until it captured (a degraded start, e.g. a
    /// tracepoint it could not attach).
    Captured {
        exit_code: Option<i32>,
        warnings: Vec<String>,
    },
    /// It exited before capturing; its log.
    Failed { exit_code: Option<i32>, log: String },
}

/// Runs the agent binary `agent` as `uid`:`uid` (not root) with exactly `capabilities`
/// (`CAP_*` names) as its ambient, inheritable and bounding sets, as systemd's `User=` and
/// `AmbientCapabilities=` would, through `setpriv`; JSON lines to /dev/null, metrics on
/// `metrics_addr`. Waits up to `timeout` for the agent to capture, then stops it with SIGTERM.
/// It pins its kernel state in a directory of its own on bpffs, made for `uid` as the unit's
/// `ExecStartPre=` makes /sys/fs/bpf/flowlog, and removed afterwards (unpinned where no bpffs
/// is mounted).
pub fn run_agent_as(
    agent: &Path,
    uid: u32,
    capabilities: &[String],
    metrics_addr: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<AgentRun> {
    use std::io::{BufRead as _, BufReader};
    let caps = capabilities
        .iter()
        .map(|c| format!(",+{}", setpriv_name(c)))
        .collect::<String>();
    let pins = PinDir::for_uid(uid)?;
    let mut child = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(format!("--inh-caps=-all{caps}"))
        .arg(format!("--ambient-caps=-all{caps}"))
        .arg(format!("--bounding-set=-all{caps}"))
        .arg("--")
        .arg(agent)
        .args(["--output", "jsonl", "--metrics-addr", metrics_addr])
        .args(["--pin-dir", &pins.arg()])
        .args([
            "--tracefs",
            "/sys/kernel/tracing",
            "--btf",
            "/sys/kernel/btf/vmlinux",
        ])
        .env("FLOWLOG_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running the agent through setpriv (util-linux)")?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + timeout;
    let mut log = String::new();
    let mut captured = false;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
                if line.contains("capturing TCP flows") {
                    captured = true;
                    break;
                }
            }
            Err(_) => break,
        }
    }
    if captured {
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .context("sending SIGTERM to the agent")?;
    } else if child.try_wait()?.is_none() {
        child.kill()?;
    }
    let status = child.wait()?;
    let _ = reader.join();
    drop(pins);
    Ok(if captured {
        AgentRun::Captured {
            exit_code: status.code(),
            warnings: log
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .map(str::to_string)
                .collect(),
        }
    } else {
        log.extend(rx.try_iter().map(|l| l + "\n"));
        AgentRun::Failed {
            exit_code: status.code(),
            log,
        }
    })
}

/// A pin directory on bpffs for one run of the agent as `uid`; removed with its pins on drop.
struct PinDir(Option<PathBuf>);

impl PinDir {
    fn for_uid(uid: u32) -> anyhow::Result<Self> {
        static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let bpffs = Path::new("/sys/fs/bpf");
        // SAFETY: statfs writes into the struct we own; the path is NUL-terminated.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statfs(c"/sys/fs/bpf".as_ptr(), &mut st) };
        if rc != 0 || st.f_type as i64 != 0xcafe_4a11 {
            return Ok(Self(None));
        }
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = bpffs.join(format!("flowlog-deploy-{}-{run}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid))
            .with_context(|| format!("giving {} to uid {uid}", dir.display()))?;
        Ok(Self(Some(dir.join("flowlog"))))
    }

    fn arg(&self) -> String {
        self.0
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Some(parent) = self.0.as_ref().and_then(|d| d.parent()) {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}
