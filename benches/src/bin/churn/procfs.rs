//! What the kernel says about a process we started: CPU time, peak memory, and the run time of
//! the BPF programs it holds.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    os::fd::{FromRawFd as _, OwnedFd},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

/// Clock ticks per second, the unit of `utime`/`stime` in `/proc/<pid>/stat`.
pub fn clock_ticks_per_second() -> anyhow::Result<u64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok(ticks as u64)
}

/// User + system CPU time of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    stat_cpu_ticks(&stat, &path)
}

/// utime + stime of a `stat` file's text (a process's or one thread's).
fn stat_cpu_ticks(stat: &str, path: &str) -> anyhow::Result<u64> {
    // The command name (field 2) is in parentheses and may hold spaces; count from after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("{path}: no `)` after the command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0], so utime (14) and stime (15) are fields[11] and fields[12].
    let field = |i: usize, name: &str| -> anyhow::Result<u64> {
        fields
            .get(i)
            .ok_or_else(|| anyhow!("{path}: no {name} field"))?
            .parse()
            .with_context(|| format!("{path}: parsing {name}"))
    };
    Ok(field(11, "utime")? + field(12, "stime")?)
}

/// User + system CPU time of the threads of a process (`pid`, or `None` for this one) that
/// librdkafka runs: its own (`rdk:main`, `rdk:broker…`, named by librdkafka) and rust-rdkafka's
/// producer polling thread (`producer pollin…`), in clock ticks. What is left of the process's
/// time is the program's own work, which a slow broker does not inflate the way it inflates
/// librdkafka's (its broker threads poll in a loop while the in-flight window is full).
/// (The churn harness, which owns this module, has no librdkafka: only the harnesses that
/// share it call this.)
#[allow(dead_code)]
pub fn librdkafka_ticks(pid: Option<u32>) -> anyhow::Result<u64> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}/task"),
        None => "/proc/self/task".to_owned(),
    };
    let mut total = 0;
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let task = entry?.path();
        // A thread that exited since the listing has no files left: it counts nothing.
        let Ok(comm) = fs::read_to_string(task.join("comm")) else {
            continue;
        };
        if !(comm.starts_with("rdk:") || comm.starts_with("producer poll")) {
            continue;
        }
        let Ok(stat) = fs::read_to_string(task.join("stat")) else {
            continue;
        };
        total += stat_cpu_ticks(&stat, &task.display().to_string())?;
    }
    Ok(total)
}

/// Peak resident set size (`VmHWM`) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .ok_or_else(|| anyhow!("{path}: no VmHWM line"))?;
    line.trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("{path}: parsing VmHWM `{line}`"))
}

/// While alive, the kernel accounts the run time of every BPF program (`run_time_ns`,
/// `run_cnt`). Taken through `BPF_ENABLE_STATS` rather than the `kernel.bpf_stats_enabled`
/// sysctl so that it switches itself off when dropped or when the harness dies. Accounting
/// costs two clock reads per program run, so it is on only in the fixed-rate phase, never in the
/// throughput trials.
pub struct BpfStats(#[allow(dead_code)] OwnedFd);

impl BpfStats {
    pub fn enable() -> anyhow::Result<Self> {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        // `union bpf_attr` for this command is `struct { __u32 type; }`.
        let attr: u32 = BPF_STATS_RUN_TIME;
        // SAFETY: the kernel reads `size_of::<u32>()` bytes from a pointer to a live u32.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                &attr as *const u32,
                size_of::<u32>(),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("bpf(BPF_ENABLE_STATS)");
        }
        // SAFETY: the syscall returned a new descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }
}

/// The kernel's accounting of one BPF program (from its descriptor's fdinfo).
#[derive(Debug, Clone, Default)]
pub struct ProgRun {
    /// The program's name as bpftool shows it (full, from its BTF), or `prog <id>` without
    /// bpftool (the kernel's own copy of a name is cut at 15 characters).
    pub name: String,
    pub run_time_ns: u64,
    pub run_count: u64,
    /// Runs the kernel skipped because the program was already running on that CPU (a softirq
    /// interrupting it): what flowlog's destruction program and sweep catch.
    pub recursion_misses: u64,
}

/// The BPF programs a process holds open, by program id.
#[derive(Debug, Clone, Default)]
pub struct ProgRuns {
    pub programs: BTreeMap<u64, ProgRun>,
}

impl ProgRuns {
    /// Counts since `before`, per program (a program not in `before` counts from zero).
    pub fn since(&self, before: &ProgRuns) -> ProgRuns {
        let programs = self
            .programs
            .iter()
            .map(|(id, now)| {
                let then = before.programs.get(id).cloned().unwrap_or_default();
                let run = ProgRun {
                    name: now.name.clone(),
                    run_time_ns: now.run_time_ns.saturating_sub(then.run_time_ns),
                    run_count: now.run_count.saturating_sub(then.run_count),
                    recursion_misses: now.recursion_misses.saturating_sub(then.recursion_misses),
                };
                (*id, run)
            })
            .collect();
        ProgRuns { programs }
    }

    pub fn run_time_ns(&self) -> u64 {
        self.programs.values().map(|p| p.run_time_ns).sum()
    }

    pub fn run_count(&self) -> u64 {
        self.programs.values().map(|p| p.run_count).sum()
    }

    /// The programs that ran, most run time first.
    pub fn ran(&self) -> Vec<&ProgRun> {
        let mut ran: Vec<&ProgRun> = self.programs.values().filter(|p| p.run_count > 0).collect();
        ran.sort_by(|a, b| b.run_time_ns.cmp(&a.run_time_ns).then(a.name.cmp(&b.name)));
        ran
    }
}

/// Reads `/proc/<pid>/fdinfo/*` for BPF program descriptors (those with `prog_type:`), counting
/// each program once however many descriptors point at it, and names them with bpftool.
pub fn bpf_prog_runs(pid: u32) -> anyhow::Result<ProgRuns> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut programs = BTreeMap::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let entry = entry.with_context(|| format!("listing {dir}"))?;
        // A descriptor can close between listing and reading: skip it.
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        if !info.contains("prog_type:") {
            continue;
        }
        let value = |key: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(id), Some(run_time_ns), Some(run_count)) =
            (value("prog_id:"), value("run_time_ns:"), value("run_cnt:"))
        {
            let run = ProgRun {
                name: format!("prog {id}"),
                run_time_ns,
                run_count,
                recursion_misses: value("recursion_misses:").unwrap_or(0),
            };
            programs.insert(id, run);
        }
    }
    for (id, name) in prog_names() {
        if let Some(run) = programs.get_mut(&id) {
            run.name = name;
        }
    }
    Ok(ProgRuns { programs })
}

/// Program id → name, from `bpftool prog show --json`; empty if bpftool is missing or fails.
fn prog_names() -> HashMap<u64, String> {
    let Ok(out) = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
    else {
        return HashMap::new();
    };
    let Ok(serde_json::Value::Array(progs)) = serde_json::from_slice(&out.stdout) else {
        return HashMap::new();
    };
    progs
        .iter()
        .filter_map(|p| Some((p.get("id")?.as_u64()?, p.get("name")?.as_str()?.to_string())))
        .collect()
}

/// Host-wide CPU time from the first line of `/proc/stat`, in clock ticks: what the whole
/// machine spent (load, tracer, kernel, BPF programs), and what the hypervisor took from it.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostCpu {
    /// user + nice + system + irq + softirq.
    pub busy: u64,
    /// user + nice + system: time charged to tasks (busy without interrupt time).
    pub task: u64,
    /// idle + iowait.
    pub idle: u64,
    /// Time the hypervisor ran something else while this VM wanted to run.
    pub steal: u64,
}

impl HostCpu {
    pub fn read() -> anyhow::Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .ok_or_else(|| anyhow!("/proc/stat: no `cpu ` line"))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().context("/proc/stat: parsing the `cpu ` line"))
            .collect::<anyhow::Result<_>>()?;
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        Ok(Self {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            task: at(0) + at(1) + at(2),
            idle: at(3) + at(4),
            steal: at(7),
        })
    }

    /// Ticks since `before`.
    pub fn since(self, before: HostCpu) -> HostCpu {
        HostCpu {
            busy: self.busy.saturating_sub(before.busy),
            task: self.task.saturating_sub(before.task),
            idle: self.idle.saturating_sub(before.idle),
            steal: self.steal.saturating_sub(before.steal),
        }
    }

    /// Share of the VM's CPU time that the hypervisor stole, in percent.
    pub fn steal_pct(&self) -> f64 {
        self.pct(self.steal)
    }

    /// `ticks` as a share of all the VM's CPU time in this interval, in percent.
    pub fn pct(&self, ticks: u64) -> f64 {
        let total = self.busy + self.idle + self.steal;
        if total == 0 {
            0.0
        } else {
            ticks as f64 / total as f64 * 100.0
        }
    }
}

/// BPF program types that hook tracepoints or kernel functions (kprobe, tracepoint, perf_event,
/// raw_tracepoint, raw_tracepoint_writable, tracing): what another tracer would attach with.
const TRACING_PROG_TYPES: [u32; 6] = [2, 5, 7, 17, 24, 26];

/// Processes other than this one and `ours` that hold a tracing BPF program, as "pid (comm)".
/// Another flowlog-sidecar (say, an integration test running on the same machine) taxes every
/// connection of the load as much as ours does, so a trial that overlaps one is not clean.
pub fn foreign_tracers(ours: Option<u32>) -> Vec<String> {
    let me = std::process::id();
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || Some(pid) == ours {
            continue;
        }
        let Ok(fds) = fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        let holds_tracer = fds.flatten().any(|fd| {
            fs::read_to_string(fd.path()).is_ok_and(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("prog_type:"))
                    .and_then(|t| t.trim().parse::<u32>().ok())
                    .is_some_and(|t| TRACING_PROG_TYPES.contains(&t))
            })
        });
        if holds_tracer {
            let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!("{pid} ({})", comm.trim()));
        }
    }
    found
}
