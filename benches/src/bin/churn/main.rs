//! `churn`: how much `flowlog-sidecar` costs the host it watches, measured in one run on
//! loopback (127.0.0.1 only). Run it through `benches/run`, as root; it is not a test.
//!
//! 1. Throughput: a connect/close churn (client threads against accept-loop threads in this
//!    process) at full speed, with nothing attached, with the sidecar attached, and with a
//!    tcplife-style bpftrace script attached as a reference point. Conditions are interleaved
//!    round by round so that drift of the machine (the hypervisor, other work) spreads over all
//!    of them; medians are reported because single trials on a small shared VM are noisy; and
//!    each trial waits for, and is flagged if it overlaps, other work (watch.rs). Besides conn/s,
//!    the machine's CPU time per connection shows what the tracing costs in CPU.
//! 2. Cost at a fixed rate: the churn paced at `--rate` connections/s (two flows each) with each
//!    tracer attached: its CPU time from `/proc/<pid>/stat`, peak RSS, the kernel-side run time of
//!    its BPF programs, its drop counters, and whether every flow made it into its output.
//! 3. Kernel cost per connection: the sidecar's programs one by one (runs, ns per run, ns per
//!    connection, recursion misses), in one more full-speed trial with BPF run-time stats on and
//!    in the fixed-rate phase, against the capture issue's ≤ 1 µs per connection.
mod attach;
mod load;
mod procfs;
mod records;
mod watch;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use attach::{Attached, TCPLIFE_BT, Tracer};
use clap::Parser;
use load::{ChurnResult, Pace, Server};
use records::RecordCount;
use watch::Interference;

/// Target from DESIGN.md: the churn loses at most this share of its throughput to the sidecar.
const MAX_THROUGHPUT_LOSS_PCT: f64 = 3.0;
/// Target from DESIGN.md: the sidecar uses at most this share of one core at 1,000 conn/s.
const MAX_CORE_PCT: f64 = 1.0;
/// Target of the capture issue: the kernel programs' run time per connection (both ends), in ns.
const MAX_KERNEL_NS_PER_CONN: f64 = 1000.0;

/// Connect/close churn benchmark of flowlog-sidecar (with bpftrace's tcplife as a reference).
#[derive(Debug, Parser)]
struct Args {
    /// The release build of flowlog-sidecar.
    #[arg(long, env = "FLOWLOG_BENCH_SIDECAR")]
    sidecar: PathBuf,
    /// bpftrace binary for the reference tracer.
    #[arg(long, env = "FLOWLOG_BENCH_BPFTRACE", default_value = "bpftrace")]
    bpftrace: PathBuf,
    /// Client/server thread pairs, each with its own listener; each thread handles one
    /// connection at a time.
    #[arg(long, default_value_t = 2)]
    pairs: usize,
    /// Let the scheduler place the load's threads instead of pinning pair i to CPU i (much
    /// noisier on a small VM; see load.rs).
    #[arg(long)]
    no_pin: bool,
    /// Length of one throughput trial.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    trial: Duration,
    /// Rounds of (baseline, sidecar, bpftrace) throughput trials. More, shorter rounds make the
    /// medians more robust to bursts of hypervisor steal than a few long ones.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Unreported churn before the first trial (warms caches and brings the servers' TIME_WAIT
    /// sockets to their steady-state number).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// New connections per second in the fixed-rate phase.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Length of the fixed-rate phase, per tracer.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    paced: Duration,
    /// Wait after the load before reading counters, so the last flows are written and the
    /// sidecar's once-a-second metrics are current.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Only run the bare full-speed load for this long and print its rate and host CPU per
    /// connection: for profiling the host (e.g. `perf record -a -g -e cpu-clock`) with a tracer
    /// started by hand.
    #[arg(long, value_parser = humantime::parse_duration)]
    load_only: Option<Duration>,
    /// Before each trial, wait up to this long for other tracers and other CPU load on the
    /// machine to go away (trials that overlap them anyway are flagged and left out of medians).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    quiet_timeout: Duration,
    /// Which code is measured (a commit), printed in the report.
    #[arg(long, env = "FLOWLOG_BENCH_REVISION", default_value = "unknown")]
    revision: String,
    /// Work directory for tracer outputs and logs (default: a new one under the temp dir,
    /// removed at the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// What is attached during a trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Condition {
    Baseline,
    Sidecar,
    Bpftrace,
}

impl Condition {
    const ALL: [Condition; 3] = [Condition::Baseline, Condition::Sidecar, Condition::Bpftrace];

    fn label(self) -> &'static str {
        match self {
            Condition::Baseline => "baseline (nothing attached)",
            Condition::Sidecar => "flowlog-sidecar",
            Condition::Bpftrace => "bpftrace tcplife (reference)",
        }
    }
}

/// One throughput trial.
#[derive(Debug, Clone)]
struct Trial {
    load: ChurnResult,
    /// The whole machine's CPU time during the load.
    host: procfs::HostCpu,
    /// What else ran meanwhile.
    interference: Interference,
    /// The tracer's own CPU time during the load, in seconds.
    tracer_cpu: Option<f64>,
    records: Option<RecordCount>,
    kernel_drops: Option<u64>,
}

/// The fixed-rate phase for one tracer.
#[derive(Debug, Clone)]
struct Paced {
    load: ChurnResult,
    interference: Interference,
    /// Tracer CPU seconds over `window`.
    cpu_seconds: f64,
    window: Duration,
    peak_rss_kib: u64,
    prog_runs: Option<procfs::ProgRuns>,
    records: RecordCount,
    kernel_drops: Option<(u64, String)>,
}

/// The sidecar's kernel programs, accounted per program, during one full-speed trial with
/// BPF run-time stats on (the throughput trials run without them: accounting costs two clock
/// reads per program run).
struct FullChurnCost {
    load: ChurnResult,
    interference: Interference,
    runs: procfs::ProgRuns,
}

/// The work directory; removed on drop unless the user chose it.
struct WorkDir {
    path: PathBuf,
    remove: bool,
}

impl WorkDir {
    fn create(chosen: Option<PathBuf>) -> anyhow::Result<Self> {
        let (path, remove) = match chosen {
            Some(p) => (p, false),
            None => (
                std::env::temp_dir().join(format!("flowlog-churn.{}", std::process::id())),
                true,
            ),
        };
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, remove })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Everything the harness needs while running.
struct Bench {
    args: Args,
    server: Server,
    work: WorkDir,
    script: PathBuf,
    ticks_per_second: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rounds == 0 || args.rate <= 0.0 {
        bail!("--rounds and --rate must be positive");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "run as root: the tracers load BPF programs and the harness enables BPF run-time stats"
        );
    }
    if !args.sidecar.is_file() {
        bail!(
            "{} is not a file: build it with `cargo build --release -p flowlog-sidecar`",
            args.sidecar.display()
        );
    }
    let work = WorkDir::create(args.work_dir.clone())?;
    let script = work.path.join("tcplife.bt");
    fs::write(&script, TCPLIFE_BT).with_context(|| format!("writing {}", script.display()))?;
    let server = Server::start(args.pairs, !args.no_pin)?;
    if let Some(duration) = args.load_only {
        return load_only(&server, duration);
    }
    let bench = Bench {
        ticks_per_second: procfs::clock_ticks_per_second()? as f64,
        args,
        server,
        work,
        script,
    };
    bench.run()
}

/// `--load-only`: the bare load, for profiling with a tracer started by hand.
fn load_only(server: &Server, duration: Duration) -> anyhow::Result<()> {
    let (load, host, seen) = watch::watched(None, || load::churn(server, duration, Pace::Flat))?;
    let ticks = procfs::clock_ticks_per_second()? as f64;
    println!(
        "{:.0} conn/s ({} connections, {} failed), {:.1} µs host CPU per connection, steal \
             {:.0}%, other processes {:.1}% CPU, other tracers: {:?}",
        load.per_second(),
        load.connections,
        load.errors,
        host.busy as f64 / ticks / load.connections.max(1) as f64 * 1e6,
        host.steal_pct(),
        seen.others_pct,
        seen.tracers
    );
    Ok(())
}

impl Bench {
    fn run(&self) -> anyhow::Result<()> {
        let a = &self.args;
        progress(format_args!(
            "churn servers on 127.0.0.1 ports {:?}{}; warm-up {:?}, then {} rounds of {:?} trials",
            self.server.ports(),
            if a.no_pin {
                ""
            } else {
                ", pair i pinned to CPU i"
            },
            a.warmup,
            a.rounds,
            a.trial
        ));
        let warm = load::churn(&self.server, a.warmup, Pace::Flat)?;
        progress(format_args!("warm-up: {:.0} conn/s", warm.per_second()));

        let mut trials: [Vec<Trial>; 3] = Default::default();
        for round in 1..=a.rounds {
            for (i, condition) in Condition::ALL.into_iter().enumerate() {
                let tag = format!("r{round}-{condition:?}").to_lowercase();
                let trial = self
                    .trial(condition, &tag)
                    .with_context(|| format!("round {round}, {}", condition.label()))?;
                progress(format_args!(
                    "round {round}/{} {:<30} {:>8.0} conn/s, {:.1} µs CPU/conn, steal {:.0}%{}{}",
                    a.rounds,
                    condition.label(),
                    trial.load.per_second(),
                    self.cpu_us_per_conn(&trial),
                    trial.host.steal_pct(),
                    match trial.records {
                        Some(r) =>
                            format!(", {} of {} records", r.records, 2 * trial.load.connections),
                        None => String::new(),
                    },
                    if trial.interference.is_clean() {
                        String::new()
                    } else {
                        format!(" [not clean: {}]", trial.interference.describe())
                    }
                ));
                trials[i].push(trial);
            }
        }

        let full = self
            .full_churn_cost()
            .context("full-speed trial with BPF run-time stats")?;
        progress(format_args!(
            "full speed with BPF stats: {:.0} conn/s, {:.0} ns of BPF time per connection",
            full.load.per_second(),
            full.runs.run_time_ns() as f64 / full.load.connections.max(1) as f64
        ));

        let mut paced = Vec::new();
        for tracer in [Tracer::Sidecar, Tracer::Bpftrace] {
            let result = self
                .paced(tracer)
                .with_context(|| format!("fixed-rate phase with {tracer:?}"))?;
            progress(format_args!(
                "fixed rate with {tracer:?}: {:.0} conn/s, tracer CPU {:.3} s",
                result.load.per_second(),
                result.cpu_seconds
            ));
            paced.push(result);
        }
        print!("{}", self.report(&trials, &paced));
        print!("{}", kernel_cost_report(&full, paced.first()));
        Ok(())
    }

    fn attach(&self, tracer: Tracer, tag: &str) -> anyhow::Result<Attached> {
        match tracer {
            Tracer::Sidecar => Attached::sidecar(&self.args.sidecar, &self.work.path, tag),
            Tracer::Bpftrace => {
                Attached::bpftrace(&self.args.bpftrace, &self.script, &self.work.path, tag)
            }
        }
    }

    fn count(&self, tracer: Tracer, output: &Path) -> anyhow::Result<RecordCount> {
        let ports = self.server.ports();
        let count = match tracer {
            Tracer::Sidecar => records::count_sidecar(output, &ports),
            Tracer::Bpftrace => records::count_bpftrace(output, &ports),
        }?;
        // Outputs of a full-speed trial run to hundreds of MB: drop them once counted.
        fs::remove_file(output).with_context(|| format!("removing {}", output.display()))?;
        Ok(count)
    }

    /// Waits for the machine to be ours (see watch.rs); says so if it gave up waiting.
    fn quiet(&self) -> anyhow::Result<()> {
        if let Some(busy) = watch::wait_until_quiet(self.args.quiet_timeout)? {
            progress(format_args!(
                "machine still busy after {:?} ({}); running anyway, the trial will be flagged",
                self.args.quiet_timeout,
                busy.describe()
            ));
        }
        Ok(())
    }

    /// The full-speed churn of one trial, watched.
    fn flat_churn(
        &self,
        ours: Option<u32>,
    ) -> anyhow::Result<(ChurnResult, procfs::HostCpu, Interference)> {
        watch::watched(ours, || {
            load::churn(&self.server, self.args.trial, Pace::Flat)
        })
    }

    /// One full-speed trial. A tracer is started before and stopped after the timed load, so
    /// its start-up and shutdown cost are not in the figure.
    fn trial(&self, condition: Condition, tag: &str) -> anyhow::Result<Trial> {
        let a = &self.args;
        let tracer = match condition {
            Condition::Baseline => None,
            Condition::Sidecar => Some(Tracer::Sidecar),
            Condition::Bpftrace => Some(Tracer::Bpftrace),
        };
        self.quiet()?;
        let Some(tracer) = tracer else {
            let (load, host, interference) = self.flat_churn(None)?;
            return Ok(Trial {
                load,
                host,
                interference,
                tracer_cpu: None,
                records: None,
                kernel_drops: None,
            });
        };
        let attached = self.attach(tracer, tag)?;
        let before = procfs::cpu_ticks(attached.pid())?;
        let (load, host, interference) = self.flat_churn(Some(attached.pid()))?;
        let after = procfs::cpu_ticks(attached.pid())?;
        thread::sleep(a.settle);
        let kernel_drops = match tracer {
            Tracer::Sidecar => records::kernel_drops(&attached.scrape_metrics()?).map(|d| d.0),
            Tracer::Bpftrace => None,
        };
        let output = attached.stop()?;
        Ok(Trial {
            load,
            host,
            interference,
            tracer_cpu: Some((after - before) as f64 / self.ticks_per_second),
            records: Some(self.count(tracer, &output)?),
            kernel_drops,
        })
    }

    /// One more full-speed trial with the sidecar, with BPF run-time stats on: its programs'
    /// cost per connection at full speed (not a throughput figure: the stats slow the programs).
    fn full_churn_cost(&self) -> anyhow::Result<FullChurnCost> {
        self.quiet()?;
        let attached = self.attach(Tracer::Sidecar, "full-stats")?;
        let pid = attached.pid();
        let stats = procfs::BpfStats::enable()?;
        let before = procfs::bpf_prog_runs(pid)?;
        let (load, _, interference) = self.flat_churn(Some(pid))?;
        let runs = procfs::bpf_prog_runs(pid)?.since(&before);
        drop(stats);
        let output = attached.stop()?;
        fs::remove_file(&output).with_context(|| format!("removing {}", output.display()))?;
        Ok(FullChurnCost {
            load,
            interference,
            runs,
        })
    }

    /// The fixed-rate phase for one tracer.
    fn paced(&self, tracer: Tracer) -> anyhow::Result<Paced> {
        let a = &self.args;
        self.quiet()?;
        let attached = self.attach(tracer, &format!("paced-{tracer:?}").to_lowercase())?;
        let pid = attached.pid();
        let stats = procfs::BpfStats::enable()
            .map_err(|e| progress(format_args!("BPF run-time stats unavailable: {e:#}")))
            .ok();
        let runs_before = procfs::bpf_prog_runs(pid)?;
        let ticks_before = procfs::cpu_ticks(pid)?;
        let started = Instant::now();
        let (load, _, interference) = watch::watched(Some(pid), || {
            let load = load::churn(&self.server, a.paced, Pace::Rate(a.rate))?;
            thread::sleep(a.settle);
            Ok(load)
        })?;
        let ticks_after = procfs::cpu_ticks(pid)?;
        let window = started.elapsed();
        let runs_after = procfs::bpf_prog_runs(pid)?;
        drop(stats);
        let peak_rss_kib = procfs::peak_rss_kib(pid)?;
        let kernel_drops = match tracer {
            Tracer::Sidecar => records::kernel_drops(&attached.scrape_metrics()?),
            Tracer::Bpftrace => None,
        };
        let output = attached.stop()?;
        Ok(Paced {
            load,
            interference,
            cpu_seconds: (ticks_after - ticks_before) as f64 / self.ticks_per_second,
            window,
            peak_rss_kib,
            prog_runs: (!runs_after.programs.is_empty()).then(|| runs_after.since(&runs_before)),
            records: self.count(tracer, &output)?,
            kernel_drops,
        })
    }

    /// The whole machine's CPU time per connection in a trial (load, tracer and BPF programs,
    /// without steal), in µs. Unlike conn/s it barely moves when the hypervisor steals time.
    fn cpu_us_per_conn(&self, trial: &Trial) -> f64 {
        trial.host.busy as f64 / self.ticks_per_second / trial.load.connections.max(1) as f64 * 1e6
    }

    fn report(&self, trials: &[Vec<Trial>; 3], paced: &[Paced]) -> String {
        let a = &self.args;
        let mut out = String::new();
        let w = &mut out;
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cpus = thread::available_parallelism().map_or(0, |n| n.get());
        let rate = |t: &Trial| t.load.per_second();
        let cost = |t: &Trial| self.cpu_us_per_conn(t);
        // A value of a trial that overlapped other work is marked and left out of medians.
        let mark = |t: &Trial, v: String| {
            if t.interference.is_clean() {
                v
            } else {
                format!("{v}*")
            }
        };
        let counted = |runs: &[Trial]| -> Vec<Trial> {
            let clean: Vec<Trial> = runs
                .iter()
                .filter(|t| t.interference.is_clean())
                .cloned()
                .collect();
            if clean.is_empty() {
                runs.to_vec()
            } else {
                clean
            }
        };
        let base = counted(&trials[0]);
        let base_rate = median(base.iter().map(rate));
        let base_cost = median(base.iter().map(cost));

        let _ = writeln!(
            w,
            "\n## Churn throughput: 127.0.0.1, {} client/server thread pairs{}, {} rounds × {:?} \
             per condition, interleaved\n\nflowlog {}; kernel {}, {cpus} CPUs. Medians over rounds: single \
             trials on a small shared VM are noisy. `*` marks a trial that overlapped other work \
             on the machine (see the notes); it is left out of the medians unless every trial of \
             its condition is marked. Each connection is two flows.\n",
            a.pairs,
            if a.no_pin {
                ""
            } else {
                " (pair i pinned to CPU i)"
            },
            a.rounds,
            a.trial,
            a.revision,
            kernel.trim()
        );
        let _ = writeln!(
            w,
            "| condition | conn/s per round | median conn/s | vs baseline (ratio of medians) | \
             per-round ratios | target |"
        );
        let _ = writeln!(w, "|---|---|---|---|---|---|");
        for (condition, runs) in Condition::ALL.iter().zip(trials) {
            let med = median(counted(runs).iter().map(rate));
            let per_round = join(runs.iter().map(|t| mark(t, format!("{:.0}", rate(t)))));
            let (vs, ratios, target) = if *condition == Condition::Baseline {
                ("–".to_string(), "–".to_string(), "–".to_string())
            } else {
                let loss = (1.0 - med / base_rate) * 100.0;
                let ratios = join(runs.iter().zip(&trials[0]).map(|(t, b)| {
                    let r = format!("{:.3}", rate(t) / rate(b));
                    if b.interference.is_clean() {
                        mark(t, r)
                    } else {
                        format!("{r}*")
                    }
                }));
                let target = if *condition == Condition::Sidecar {
                    verdict(
                        loss <= MAX_THROUGHPUT_LOSS_PCT,
                        format!("loss ≤ {MAX_THROUGHPUT_LOSS_PCT}%"),
                    )
                } else {
                    "reference".to_string()
                };
                (
                    format!("{:.3} ({:+.1}%)", med / base_rate, -loss),
                    ratios,
                    target,
                )
            };
            let _ = writeln!(
                w,
                "| {} | {per_round} | {med:.0} | {vs} | {ratios} | {target} |",
                condition.label()
            );
        }

        let _ = writeln!(
            w,
            "\nThe same trials, by cost. Host CPU per connection is all the machine's busy time \
             (user+system+irq+softirq from /proc/stat, steal excluded: the load, the tracer and \
             its BPF programs) over completed connections. Tracer CPU is the tracer process \
             alone (/proc/<pid>/stat).\n"
        );
        let _ = writeln!(
            w,
            "| condition | host CPU µs/conn per round | median | vs baseline | tracer CPU, % of a \
             core | tracer CPU per 1,000 flows | records / expected | kernel drops | steal % per \
             round |"
        );
        let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
        for (condition, runs) in Condition::ALL.iter().zip(trials) {
            let used = counted(runs);
            let med = median(used.iter().map(cost));
            let per_round = join(runs.iter().map(|t| mark(t, format!("{:.1}", cost(t)))));
            let steal = join(runs.iter().map(|t| format!("{:.0}", t.host.steal_pct())));
            let (vs, cpu, per_flows, recs, drops) = if *condition == Condition::Baseline {
                let dash = || "–".to_string();
                (dash(), dash(), dash(), dash(), dash())
            } else {
                let tracer_secs = |t: &Trial| t.tracer_cpu.unwrap_or(0.0);
                let cpu = median(
                    used.iter()
                        .map(|t| tracer_secs(t) / t.load.elapsed.as_secs_f64() * 100.0),
                );
                let per_flows = median(
                    used.iter()
                        .map(|t| tracer_secs(t) / (2 * t.load.connections.max(1)) as f64 * 1e6),
                );
                let got: u64 = runs
                    .iter()
                    .filter_map(|t| t.records)
                    .map(|r| r.records)
                    .sum();
                let expected: u64 = runs.iter().map(|t| 2 * t.load.connections).sum();
                let lost: u64 = runs.iter().filter_map(|t| t.records).map(|r| r.lost).sum();
                let mut recs = format!("{got} / {expected}");
                if lost > 0 {
                    let _ = write!(recs, " ({lost} reported lost)");
                }
                let drops = runs
                    .iter()
                    .map(|t| t.kernel_drops)
                    .sum::<Option<u64>>()
                    .map_or("n/a".to_string(), |d| d.to_string());
                (
                    format!("{:+.1}%", (med / base_cost - 1.0) * 100.0),
                    format!("{cpu:.1}%"),
                    format!("{per_flows:.1} ms"),
                    recs,
                    drops,
                )
            };
            let _ = writeln!(
                w,
                "| {} | {per_round} | {med:.1} | {vs} | {cpu} | {per_flows} | {recs} | {drops} | \
                 {steal} |",
                condition.label()
            );
        }
        let failures: u64 = trials.iter().flatten().map(|t| t.load.errors).sum();
        let _ = writeln!(
            w,
            "\nNotes: client-side failed connections over all trials: {failures}; server-side \
             failed accepts/exchanges over the whole run: {}.",
            self.server.failures()
        );
        for (condition, runs) in Condition::ALL.iter().zip(trials) {
            for (round, t) in runs.iter().enumerate() {
                if !t.interference.is_clean() {
                    let _ = writeln!(
                        w,
                        "- round {} {}: {}",
                        round + 1,
                        condition.label(),
                        t.interference.describe()
                    );
                }
            }
        }

        let _ = writeln!(
            w,
            "\n## Fixed rate: {:.0} new connections/s ({:.0} flows/s) for {:?}, per tracer\n\n\
             CPU is utime+stime from /proc/<pid>/stat over the load plus {:?} of settling \
             ({:.0} Hz ticks). BPF time is the kernel's run-time accounting (BPF_ENABLE_STATS) of \
             the tracer's programs; it is spent in the churning threads, not in the tracer.\n",
            a.rate,
            2.0 * a.rate,
            a.paced,
            a.settle,
            self.ticks_per_second
        );
        let _ = writeln!(
            w,
            "| | flowlog-sidecar | bpftrace tcplife (reference) | target |"
        );
        let _ = writeln!(w, "|---|---|---|---|");
        let row = |w: &mut String, name: &str, f: &dyn Fn(&Paced) -> String, target: &str| {
            let cells: Vec<String> = paced.iter().map(f).collect();
            let _ = writeln!(w, "| {name} | {} | {target} |", cells.join(" | "));
        };
        let pct = |p: &Paced| p.cpu_seconds / p.window.as_secs_f64() * 100.0;
        let flows = |p: &Paced| (2 * p.load.connections.max(1)) as f64;
        row(
            w,
            "achieved rate, conn/s",
            &|p| format!("{:.0}", p.load.per_second()),
            "",
        );
        row(
            w,
            "connections (failed)",
            &|p| format!("{} ({})", p.load.connections, p.load.errors),
            "",
        );
        row(
            w,
            "tracer CPU seconds",
            &|p| format!("{:.2} over {:.1} s", p.cpu_seconds, p.window.as_secs_f64()),
            "",
        );
        let sidecar_target = paced.first().map_or(String::new(), |p| {
            format!(
                "sidecar {}",
                verdict(pct(p) <= MAX_CORE_PCT, format!("≤ {MAX_CORE_PCT}%"))
            )
        });
        row(
            w,
            "tracer CPU, % of one core",
            &|p| format!("{:.2}%", pct(p)),
            &sidecar_target,
        );
        row(
            w,
            "tracer CPU per 1,000 flows",
            &|p| format!("{:.1} ms", p.cpu_seconds / flows(p) * 1e3 * 1e3),
            "",
        );
        row(
            w,
            "kernel BPF time per flow (program runs per flow)",
            &|p| match &p.prog_runs {
                Some(r) if r.run_count() > 0 => format!(
                    "{:.0} ns ({:.1} runs of {} programs)",
                    r.run_time_ns() as f64 / flows(p),
                    r.run_count() as f64 / flows(p),
                    r.ran().len()
                ),
                _ => "n/a".to_string(),
            },
            "",
        );
        row(
            w,
            "peak RSS (VmHWM)",
            &|p| format!("{:.1} MiB", p.peak_rss_kib as f64 / 1024.0),
            "",
        );
        row(
            w,
            "records / expected (2 × connections)",
            &|p| {
                let expected = 2 * p.load.connections;
                let mut s = format!("{} / {expected}", p.records.records);
                s.push_str(if p.records.records == expected {
                    " (exact)"
                } else {
                    " (MISMATCH)"
                });
                if p.records.lost > 0 {
                    let _ = write!(s, ", {} reported lost", p.records.lost);
                }
                s
            },
            "",
        );
        row(
            w,
            "flowlog_sidecar_kernel_drops_total",
            &|p| match &p.kernel_drops {
                Some((total, detail)) => format!("{total} ({detail})"),
                None => "n/a".to_string(),
            },
            "0",
        );
        row(
            w,
            "other work on the machine",
            &|p| {
                if p.interference.is_clean() {
                    "none".to_string()
                } else {
                    p.interference.describe()
                }
            },
            "",
        );
        out
    }
}

/// The sidecar's kernel cost per connection (both ends), program by program, at full speed and
/// at the fixed rate, against the capture issue's target.
fn kernel_cost_report(full: &FullChurnCost, paced: Option<&Paced>) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "\n## Kernel BPF time per connection, by program (flowlog-sidecar)\n\n\
         Run time and runs from the kernel's accounting (BPF_ENABLE_STATS, two clock reads per \
         run included) over completed connections; each connection is two flows (its client and \
         server ends). Full speed: one more sidecar trial with the stats on ({:.0} conn/s{}). \
         Fixed rate: the phase below. Recursion misses are runs the kernel skipped because the \
         program was already running on that CPU.\n",
        full.load.per_second(),
        if full.interference.is_clean() {
            String::new()
        } else {
            format!(", overlapped other work: {}", full.interference.describe())
        }
    );
    let loads: Vec<(&str, &procfs::ProgRuns, u64)> =
        std::iter::once(("full speed", &full.runs, full.load.connections))
            .chain(paced.and_then(|p| {
                p.prog_runs
                    .as_ref()
                    .map(|r| ("fixed rate", r, p.load.connections))
            }))
            .collect();
    let _ = writeln!(
        w,
        "| load | program | runs per connection | ns per run | ns per connection | recursion misses |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for (label, runs, connections) in &loads {
        let conns = (*connections).max(1) as f64;
        for p in runs.ran() {
            let _ = writeln!(
                w,
                "| {label} | `{}` | {:.2} | {:.0} | {:.0} | {} |",
                p.name,
                p.run_count as f64 / conns,
                p.run_time_ns as f64 / p.run_count.max(1) as f64,
                p.run_time_ns as f64 / conns,
                p.recursion_misses
            );
        }
        let total = runs.run_time_ns() as f64 / conns;
        let _ = writeln!(
            w,
            "| {label} | **all** | {:.2} | {:.0} | **{total:.0}** | {} |",
            runs.run_count() as f64 / conns,
            runs.run_time_ns() as f64 / runs.run_count().max(1) as f64,
            runs.ran().iter().map(|p| p.recursion_misses).sum::<u64>()
        );
    }
    let _ = writeln!(w);
    for (label, runs, connections) in &loads {
        let total = runs.run_time_ns() as f64 / (*connections).max(1) as f64;
        let _ = writeln!(
            w,
            "- {label}: {}",
            verdict(
                total <= MAX_KERNEL_NS_PER_CONN,
                format!(
                    "{:.2} µs per connection against ≤ {:.1} µs",
                    total / 1e3,
                    MAX_KERNEL_NS_PER_CONN / 1e3
                )
            )
        );
    }
    out
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

fn verdict(ok: bool, target: String) -> String {
    format!("{target}: {}", if ok { "met" } else { "**MISSED**" })
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Progress goes to stderr; the report alone goes to stdout.
fn progress(args: std::fmt::Arguments) {
    eprintln!("[churn] {args}");
}
