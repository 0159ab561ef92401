//! Loads flowlog's kernel programs with the running kernel's layout, attaches them to their
//! tracepoints, and gives the agent what it needs from them: the ring buffer, the interim sweep,
//! and the kernel-side counters.
use std::{
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    time::Duration,
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, Program, ProgramError, RawTracePoint, RawTracePointRunOptions, TestRun,
        TracePoint, links::FdLink,
    },
};
use flowlog_common::{Batch, Config, counter, stat};

use tracing::{info, warn};

use crate::{
    adoption,
    layout::{self, LayoutError},
    pins::{self, Found, PinDir, PinError},
    privileges::{self, Operation, Refusal},
};

/// The compiled kernel programs (built by build.rs with aya-build).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowlog-ebpf"));

/// Why the probe could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("reading the tracepoints' formats from tracefs{refused}")]
    Tracefs {
        refused: Refused,
        source: Box<LayoutError>,
    },
    #[error("creating the eBPF maps in kernel {kernel}{refused}")]
    Load {
        kernel: String,
        refused: Refused,
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF program `{0}` is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map `{0}` is missing from the object")]
    MissingMap(&'static str),
    #[error("{action} on kernel {kernel}{refused}")]
    Program {
        action: Action,
        kernel: String,
        refused: Refused,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("reading the online CPUs from {path}")]
    Cpus {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("reading the kernel's accounting of eBPF program `{program}`")]
    Info {
        program: String,
        source: std::io::Error,
    },
    #[error("eBPF map `{map}`")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("keeping the kernel state pinned (run with --pin-dir '' to run without)")]
    Pin(#[from] PinError),
}

impl ProbeError {
    /// Whether the kernel refused an operation for want of a capability the process lacks (as
    /// opposed to not supporting it, or something other than capabilities refusing it).
    fn lacks_capabilities(&self) -> bool {
        let refused = match self {
            ProbeError::Load { refused, .. } | ProbeError::Program { refused, .. } => refused,
            _ => return false,
        };
        refused.0.as_ref().is_some_and(|r| !r.missing().is_empty())
    }
}

/// What the probe was doing with one of its programs when it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Loading it into the kernel (the verifier runs here).
    Load(&'static str),
    /// Attaching it to a raw tracepoint, or a BTF-typed one.
    AttachRaw {
        program: &'static str,
        tracepoint: &'static str,
    },
    /// Attaching it to a tracepoint (`category:name`) through a perf event.
    AttachTracepoint {
        program: &'static str,
        tracepoint: &'static str,
    },
    /// Running it on demand (`BPF_PROG_TEST_RUN`).
    Run(&'static str),
}

impl Action {
    /// The kernel operation, for the capabilities it needs.
    fn operation(&self, error: &ProgramError) -> Operation {
        match self {
            Action::Load(_) => Operation::LoadProgram,
            Action::AttachRaw { .. } => Operation::AttachRawTracepoint,
            // The tracepoint's id is read from tracefs before the perf event is opened.
            Action::AttachTracepoint { .. }
                if matches!(error, ProgramError::TracePointError(_)) =>
            {
                Operation::ReadTracefs
            }
            Action::AttachTracepoint { .. } => Operation::AttachTracepoint,
            Action::Run(_) => Operation::RunProgram,
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Load(program) => write!(f, "loading eBPF program `{program}`"),
            Action::AttachRaw {
                program,
                tracepoint,
            } => write!(
                f,
                "attaching eBPF program `{program}` to raw tracepoint {tracepoint}"
            ),
            Action::AttachTracepoint {
                program,
                tracepoint,
            } => write!(
                f,
                "attaching eBPF program `{program}` to tracepoint {}",
                tracepoint.replace('/', ":")
            ),
            Action::Run(program) => write!(
                f,
                "running eBPF program `{program}` on demand (BPF_PROG_TEST_RUN)"
            ),
        }
    }
}

/// The kernel's refusal (EPERM, EACCES) of what failed, when it was one, with what the process
/// lacks; shown after the operation in the error's message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Refused(pub Option<Box<Refusal>>);

impl Refused {
    /// A refusal of `operation` if `error` (or one of its causes) is EPERM or EACCES.
    fn of(operation: Operation, error: &(dyn std::error::Error + 'static)) -> Self {
        Self(privileges::is_refusal(error).then(|| Box::new(Refusal::of_this_process(operation))))
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(refusal) => write!(f, ", which the kernel refused: {refusal}"),
            None => Ok(()),
        }
    }
}

/// Settings for the kernel side.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    /// Where tracefs is mounted (`None`: the usual places).
    pub tracefs: Option<PathBuf>,
    /// The kernel's BTF (`/sys/kernel/btf/vmlinux`).
    pub btf: PathBuf,
    /// Interval between interim records of a long-lived flow.
    pub interim: Duration,
    /// Capacity of the flow map (open sockets tracked at once).
    pub max_flows: u32,
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
    /// How often the agent drains the ring buffer: a batched flow end waits at most one and a
    /// half of these (see `Batch`).
    pub drain_interval: Duration,
    /// Where to pin the kernel state so that it outlives the agent (`crate::pins`); `None`
    /// runs unpinned: the programs detach and the maps go when the agent exits.
    pub pin_dir: Option<PathBuf>,
    /// Adopt the connections open before the programs were attached (`crate::adoption`).
    pub adopt: bool,
}

/// Raw tracepoint programs: the program's name in the object is the tracepoint's name.
const RAW_PROGRAMS: [&str; 2] = ["tcp_send_reset", "tcp_receive_reset"];
/// The state-change tracepoint, and the BTF-typed program for it (its raw tracepoint program has
/// the tracepoint's name).
const SET_STATE: &str = "inet_sock_set_state";
const SET_STATE_BTF: &str = "inet_sock_set_state_btf";
/// Writes, when a socket is destroyed, the end of a flow the state-change program was skipped
/// for (the kernel does not re-enter a program that a softirq interrupts on its CPU): the raw
/// tracepoint program (named as the tracepoint), and the BTF-typed one beside
/// [`SET_STATE_BTF`].
const DESTROY: &str = "tcp_destroy_sock";
const DESTROY_BTF: &str = "tcp_destroy_sock_btf";
const SWEEP: &str = "flowlog_sweep";
const FLUSH: &str = "flowlog_flush";
const ACCEPT_PROGRAM: &str = "accept_exit";
/// The same with direct loads through the typed task pointer, where the kernel allows it.
const ACCEPT_BTF: &str = "accept_exit_btf";

/// How the socket state-change program reads `struct tcp_sock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SockAccess {
    /// A BTF-typed raw tracepoint (`tp_btf`): direct loads, checked by the verifier.
    Btf,
    /// A raw tracepoint: one `bpf_probe_read_kernel` call per field (or block of fields).
    ProbeRead,
}

impl SockAccess {
    /// Both paths, for exporting the one chosen as 1 and the other as 0: an alert on
    /// `path="probe_read"` then has a series to match on every agent.
    pub const ALL: [SockAccess; 2] = [SockAccess::Btf, SockAccess::ProbeRead];

    /// The path's name in the start-up log and the `path` label of
    /// `flowlog_sidecar_read_path` (README, Metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            SockAccess::Btf => "tp_btf",
            SockAccess::ProbeRead => "probe_read",
        }
    }
}

/// The loaded, attached programs. Dropping it detaches them.
pub struct Probe {
    ebpf: Ebpf,
    kernel: String,
    access: SockAccess,
    /// The online CPUs at start-up: whose batches `flush_batches` moves to the ring buffer should
    /// the list of online CPUs become unreadable later.
    cpus: Vec<u32>,
    /// A batch this old is moved by [`Probe::flush_batches`] (`Config::batch_age_ns`).
    batch_age: Duration,
    /// Whether the destruction program is attached: the state-change program's skipped runs are
    /// then caught (ends at the destruction or by the sweep, inbound starts at the accept), not
    /// lost.
    catching: bool,
    /// The pin directory, when the kernel state is pinned.
    pins: Option<PinDir>,
    /// What the start found there.
    found: Option<Found>,
    /// Links of an unpinned probe, detached when it is dropped (a pinned probe's are in bpffs).
    links: Vec<FdLink>,
}

/// Runs of the attached programs that the kernel skipped ([`Probe::skipped_runs`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkippedRuns {
    /// State changes the state-change program was skipped for, whose work was done later
    /// (an end at the socket's destruction or by the sweep, an inbound start at its accept).
    pub caught: u64,
    /// Events no program saw.
    pub lost: u64,
}

impl Probe {
    /// Discovers the kernel layout, loads and attaches the programs; sockets are read through the
    /// BTF-typed tracepoint where the kernel allows it. An operation the kernel refuses for want
    /// of a capability is an error naming the capability ([`Refused`]).
    pub fn start(settings: &ProbeSettings) -> Result<Self, ProbeError> {
        Self::start_with(settings, false)
    }

    /// [`Probe::start`], with the choice to read kernel structures with probe reads only (the
    /// plain raw tracepoint for socket state changes, the probe-read accept program) even where
    /// the kernel allows typed pointers (`--probe-reads`).
    pub fn start_with(settings: &ProbeSettings, probe_reads: bool) -> Result<Self, ProbeError> {
        let kernel = layout::kernel_release();
        let btf_path = settings.btf.as_path();
        let layout = layout::discover(btf_path)?;
        let mut state = pins::wanted(random_u64(), settings.max_flows, settings.ring_buffer_bytes);
        let (pins, found) = match &settings.pin_dir {
            None => (None, None),
            Some(dir) => match PinDir::open(dir) {
                Ok(pins) => {
                    let found = pins.check(&state)?;
                    if let Found::Compatible { flow_id_base } = found {
                        state.flow_id_base = flow_id_base;
                    }
                    (Some(pins), Some(found))
                }
                Err(e) => {
                    warn!(
                        error = flowlog_diag::error_chain(&e),
                        "cannot pin the kernel state: running unpinned (an agent restart loses \
                         the flows open across it; flowlog_sidecar_pinned is 0)"
                    );
                    (None, None)
                }
            },
        };
        let config = Config {
            layout,
            interim_ns: settings.interim.as_nanos() as u64,
            // Wake the agent early once an eighth of the ring buffer is in use.
            wakeup_bytes: u64::from(settings.ring_buffer_bytes / 8),
            flow_id_base: state.flow_id_base,
            flow_id_stride: possible_cpus(),
            batch_age_ns: (settings.drain_interval / 2).as_nanos() as u64,
        };
        let tracefs = match &settings.tracefs {
            Some(path) => Ok(path.clone()),
            None => layout::tracefs_root(),
        };
        let accept = match tracefs.and_then(|t| layout::discover_accept(&t, btf_path)) {
            Ok(accept) => Some(accept),
            // Not a kernel without these tracepoints: a process that may not read tracefs.
            Err(source) if privileges::is_refusal(&source) => {
                return Err(ProbeError::Tracefs {
                    refused: Refused::of(Operation::ReadTracefs, &source),
                    source: Box::new(source),
                });
            }
            Err(e) => {
                warn!(
                    error = flowlog_diag::error_chain(&e),
                    "accepted sockets cannot be traced on this kernel: inbound flows get their \
                     process when they close instead of when they are accepted"
                );
                None
            }
        };
        let accept_layout = accept.unwrap_or_default();
        let adopt_layout = if settings.adopt {
            match layout::discover_adopt(btf_path) {
                Ok(found) => Some(found),
                Err(e) => {
                    warn!(
                        error = flowlog_diag::error_chain(&e),
                        "connections open before the agent started cannot be adopted on this \
                         kernel: they are not reported"
                    );
                    None
                }
            }
        } else {
            None
        };
        let adopt_globals = adopt_layout.unwrap_or_default();
        let mut loader = EbpfLoader::new();
        loader
            .override_global("CONFIG", &config, true)
            .override_global("ACCEPT", &accept_layout, true)
            .override_global("ADOPT", &adopt_globals, true)
            .map_max_entries("FLOWS", settings.max_flows)
            .map_max_entries("EVENTS", settings.ring_buffer_bytes);
        if let Some(pins) = &pins {
            // A pinned map of that name is reused as it is; otherwise created and pinned.
            for name in pins::PINNED_MAPS {
                loader.map_pin_path(name, pins.map_path(name));
            }
        }
        let mut links: Vec<(String, FdLink)> = Vec::new();
        let mut ebpf = loader.load(OBJECT).map_err(|source| ProbeError::Load {
            kernel: kernel.clone(),
            refused: Refused::of(Operation::CreateMaps, &source),
            source: Box::new(source),
        })?;
        let btf_attached = if probe_reads {
            Err("disabled by --probe-reads".to_string())
        } else {
            // The kernel's own BTF names the attach point. Parsed only now that the loader,
            // which parses its own copy, is gone: two copies at once cost 12 MiB of peak RSS
            // (and kept the heap from shrinking back).
            match Btf::from_sys_fs() {
                Ok(vmlinux) => match attach_btf_set_state(&mut ebpf, &vmlinux, &kernel, &mut links)
                {
                    Ok(catching) => Ok(catching),
                    // Refused for want of a capability: the raw tracepoint would be refused
                    // too, and the error must name the capability rather than fall back.
                    Err(e) if e.lacks_capabilities() => return Err(e),
                    Err(e) => Err(flowlog_diag::error_chain(&e)),
                },
                Err(e) => Err(format!(
                    "reading /sys/kernel/btf/vmlinux: {}",
                    flowlog_diag::error_chain(&e)
                )),
            }
        };
        let (access, catching) = match btf_attached {
            Ok(catching) => (SockAccess::Btf, catching),
            Err(reason) => {
                if !probe_reads {
                    warn!(
                        error = reason,
                        "the BTF-typed tracepoint {SET_STATE} cannot be used on this kernel; \
                         falling back to the raw tracepoint, which reads sockets with probe \
                         reads (slower per connection, same records)"
                    );
                }
                let prog: &mut RawTracePoint = load_program(&mut ebpf, SET_STATE, &kernel)?;
                links.push((
                    SET_STATE.into(),
                    attach_raw_link(prog, SET_STATE, SET_STATE, &kernel)?,
                ));
                let catching =
                    load_program::<RawTracePoint>(&mut ebpf, DESTROY, &kernel).and_then(|prog| {
                        let link = attach_raw_link(prog, DESTROY, DESTROY, &kernel)?;
                        links.push((DESTROY.into(), link));
                        Ok(())
                    });
                (SockAccess::ProbeRead, caught_or_warn(catching))
            }
        };
        for program in RAW_PROGRAMS {
            let prog: &mut RawTracePoint = load_program(&mut ebpf, program, &kernel)?;
            links.push((
                program.into(),
                attach_raw_link(prog, program, program, &kernel)?,
            ));
        }
        if accept.is_some() {
            let btf_loaded = match access {
                SockAccess::ProbeRead => None,
                SockAccess::Btf => Some(load_program::<TracePoint>(&mut ebpf, ACCEPT_BTF, &kernel)),
            };
            let program = match btf_loaded {
                Some(Ok(_)) => ACCEPT_BTF,
                other => {
                    if let Some(Err(e)) = other {
                        warn!(
                            error = flowlog_diag::error_chain(&e),
                            "the accept program with typed task pointers cannot be loaded on \
                             this kernel; using the one with probe reads"
                        );
                    }
                    let _: &mut TracePoint = load_program(&mut ebpf, ACCEPT_PROGRAM, &kernel)?;
                    ACCEPT_PROGRAM
                }
            };
            let prog: &mut TracePoint = ebpf
                .program_mut(program)
                .ok_or(ProbeError::MissingProgram(program))?
                .try_into()
                .map_err(program_error(Action::Load(program), &kernel))?;
            for tracepoint in layout::ACCEPT_TRACEPOINTS {
                let (category, name) = tracepoint
                    .split_once('/')
                    .unwrap_or(("syscalls", tracepoint));
                let action = Action::AttachTracepoint {
                    program,
                    tracepoint,
                };
                let id = prog
                    .attach(category, name)
                    .map_err(program_error(action.clone(), &kernel))?;
                if pins.is_some() {
                    let link = prog
                        .take_link(id)
                        .map_err(program_error(action.clone(), &kernel))?;
                    match FdLink::try_from(link) {
                        Ok(link) => links.push((format!("{program}-{name}"), link)),
                        // A kernel before 5.15 attaches through the perf event itself, which
                        // cannot be pinned: attached again, it detaches when the agent exits,
                        // and inbound flows accepted while no agent runs get their process at
                        // their close instead.
                        Err(_) => {
                            warn!(
                                program,
                                "this kernel cannot pin a tracepoint's link: inbound flows \
                                 accepted while no agent runs get their process at their close"
                            );
                            prog.attach(category, name)
                                .map_err(program_error(action, &kernel))?;
                        }
                    }
                }
            }
        }
        // Loaded, never attached: run on demand by `sweep` and `flush_batches`.
        let _: &mut RawTracePoint = load_program(&mut ebpf, SWEEP, &kernel)?;
        let _: &mut RawTracePoint = load_program(&mut ebpf, FLUSH, &kernel)?;
        let cpus =
            aya::util::online_cpus().map_err(|(path, source)| ProbeError::Cpus { path, source })?;
        let links = match &pins {
            None => links.into_iter().map(|(_, link)| link).collect(),
            Some(pins) => {
                // This agent's programs are attached: the previous agent's can go (both ran
                // for the few microseconds in between; see `crate::pins`).
                for (name, link) in links {
                    pins.pin_link(link, &name)?;
                }
                let replaced = pins.remove_old_links()?;
                let map = ebpf
                    .map_mut("PIN_STATE")
                    .ok_or(ProbeError::MissingMap("PIN_STATE"))?;
                pins::write_state(map, &state).map_err(map_error("PIN_STATE"))?;
                log_found(pins, found.as_ref(), replaced);
                Vec::new()
            }
        };
        let mut probe = Self {
            ebpf,
            kernel,
            access,
            cpus,
            batch_age: settings.drain_interval / 2,
            catching,
            pins,
            found,
            links,
        };
        if adopt_layout.is_some() {
            probe.adopt();
        }
        Ok(probe)
    }

    /// Adopts the connections open before the programs were attached, and says how many; a
    /// failure is a warning (the agent runs on without them).
    fn adopt(&mut self) {
        let before = self.counters().map(|c| c[counter::ADOPTED as usize]);
        let ran = Btf::from_sys_fs()
            .map_err(|e| {
                format!(
                    "reading /sys/kernel/btf/vmlinux: {}",
                    flowlog_diag::error_chain(&e)
                )
            })
            .and_then(|vmlinux| {
                adoption::adopt(&mut self.ebpf, &vmlinux).map_err(|e| flowlog_diag::error_chain(&e))
            });
        match (ran, before, self.counters()) {
            (Ok(took), Ok(before), Ok(after)) => info!(
                adopted = after[counter::ADOPTED as usize] - before,
                took_ms = took.as_millis() as u64,
                "adopted the connections open before the agent started (their records are \
                 marked adopted)"
            ),
            (Err(error), _, _) => warn!(
                error,
                "connections open before the agent started cannot be adopted: they are not \
                 reported"
            ),
            (Ok(_), Err(e), _) | (Ok(_), _, Err(e)) => warn!(
                error = flowlog_diag::error_chain(&e),
                "adopted the connections open before the agent started, but cannot count them"
            ),
        }
    }

    /// The pin directory, if the kernel state is pinned (it then outlives the agent).
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        self.pins.as_ref().map(PinDir::path)
    }

    /// What the start found in the pin directory (`None`: unpinned).
    pub fn found(&self) -> Option<&Found> {
        self.found.as_ref()
    }

    /// Detaches the programs, pinned or not (a final stop: `--unpin`, or an unpinned agent's
    /// shutdown): no record is written after this but those already batched or in the ring.
    pub fn detach(&mut self) -> Result<(), ProbeError> {
        self.links.clear();
        if let Some(pins) = &self.pins {
            pins.remove_links()?;
        }
        Ok(())
    }

    /// Removes every pin (call after [`Probe::detach`] and the last drain): the kernel frees the
    /// maps when the agent exits.
    pub fn unpin(&mut self) -> Result<(), ProbeError> {
        if let Some(pins) = self.pins.take() {
            pins.remove_all()?;
        }
        Ok(())
    }

    /// How the state-change program reads sockets on this kernel.
    pub fn sock_access(&self) -> SockAccess {
        self.access
    }

    /// Takes the ring buffer out of the probe (call once).
    pub fn take_ring_buffer(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(ProbeError::MissingMap("EVENTS"))?;
        RingBuf::try_from(map).map_err(map_error("EVENTS"))
    }

    /// A program that is loaded but never attached (run with `BPF_PROG_TEST_RUN`), and how to
    /// wrap its errors.
    fn run_on_demand(
        &self,
        program: &'static str,
    ) -> Result<(&RawTracePoint, impl Fn(ProgramError) -> ProbeError), ProbeError> {
        let err = program_error(Action::Run(program), &self.kernel);
        let prog: &RawTracePoint = self
            .ebpf
            .program(program)
            .ok_or(ProbeError::MissingProgram(program))?
            .try_into()
            .map_err(&err)?;
        Ok((prog, err))
    }

    /// Runs the sweep: interim snapshots of flows due for one, or of every open flow (`flush`).
    pub fn sweep(&self, flush: bool) -> Result<(), ProbeError> {
        let (prog, err) = self.run_on_demand(SWEEP)?;
        let mut args = [0u64; 12];
        args[0] = u64::from(flush);
        prog.test_run(RawTracePointRunOptions { args, cpu: None })
            .map_err(err)?;
        Ok(())
    }

    /// Moves the records that CPUs have batched into the ring buffer (flow ends go there several
    /// at a time; see [`Batch`]): every CPU's batch (`all`, at shutdown), or only those whose
    /// first record is older than the batch age. Run before each drain. A CPU that keeps ending
    /// flows moves its batch itself, so it is not interrupted: running the flush program on a CPU
    /// is an interrupt to it, and on an idle VM waking its vCPU was most of the agent's CPU
    /// time at 1,000 connections/s. The online CPUs are read each time (a few microseconds): a
    /// CPU brought online later must not keep its records.
    pub fn flush_batches(&self, all: bool) -> Result<(), ProbeError> {
        let (prog, err) = self.run_on_demand(FLUSH)?;
        let batches = if all { None } else { Some(self.batches()?) };
        // The clock of `bpf_ktime_get_ns`, which stamps `first_ns`.
        let now = crate::flows::clock_ns(libc::CLOCK_MONOTONIC) as u64;
        let age = self.batch_age.as_nanos() as u64;
        let online = aya::util::online_cpus();
        let cpus = online.as_deref().unwrap_or(&self.cpus);
        for &cpu in cpus {
            if let Some(batches) = &batches {
                let Some(batch) = batches.get(cpu as usize) else {
                    continue;
                };
                if batch.len == 0 || now.saturating_sub(batch.first_ns) < age {
                    continue;
                }
            }
            prog.test_run(RawTracePointRunOptions {
                args: [0; 12],
                cpu: Some(cpu),
            })
            .map_err(&err)?;
        }
        Ok(())
    }

    /// Every possible CPU's batch, indexed by CPU.
    fn batches(&self) -> Result<Vec<Batch>, ProbeError> {
        let map: PerCpuArray<_, Batch> = self.typed_map("BATCH")?;
        let batches = map.get(&0, 0).map_err(map_error("BATCH"))?;
        Ok(batches.iter().copied().collect())
    }

    /// The loaded map `name` as a typed view, with errors naming it.
    fn typed_map<'a, T>(&'a self, name: &'static str) -> Result<T, ProbeError>
    where
        T: TryFrom<&'a Map, Error = MapError>,
    {
        let map = self.ebpf.map(name).ok_or(ProbeError::MissingMap(name))?;
        T::try_from(map).map_err(map_error(name))
    }

    /// Kernel-side counters summed over CPUs, indexed by `flowlog_common::counter`.
    pub fn counters(&self) -> Result<[u64; counter::COUNT as usize], ProbeError> {
        let map_err = map_error("COUNTERS");
        let map: PerCpuArray<_, u64> = self.typed_map("COUNTERS")?;
        let mut out = [0u64; counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = map.get(&(i as u32), 0).map_err(&map_err)?.iter().sum();
        }
        Ok(out)
    }

    /// Runs of the attached programs that the kernel skipped: a program is not re-entered on a
    /// CPU where it is already running, so an event raised by a softirq that interrupted it goes
    /// unseen by it. The state-change program's are caught when the destruction program is
    /// attached (its ends are written at the destruction or by the sweep, its inbound starts at
    /// the accept); any other is lost (a missed start of a flow nobody accepts leaves it
    /// untracked; a missed reset is not counted). The kernel counts them per program
    /// (`recursion_misses` in `/proc/<pid>/fdinfo/<program fd>`, Linux 5.12+; `None` before).
    pub fn skipped_runs(&self) -> Result<Option<SkippedRuns>, ProbeError> {
        let mut total: Option<SkippedRuns> = None;
        for (name, program) in self.ebpf.programs() {
            // Programs not loaded on this kernel (the other variant of one) have no descriptor.
            let Ok(fd) = program.fd() else { continue };
            let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
            let info = std::fs::read_to_string(&path).map_err(|source| ProbeError::Info {
                program: name.to_string(),
                source,
            })?;
            if let Some(misses) = recursion_misses(&info) {
                let total = total.get_or_insert_default();
                match name {
                    SET_STATE | SET_STATE_BTF if self.catching => total.caught += misses,
                    // A skipped destruction matters only for a flow whose end was skipped too,
                    // and the sweep finds that one's socket: it writes the end, or counts a
                    // missed end if the memory holds another socket by then.
                    DESTROY | DESTROY_BTF => {}
                    _ => total.lost += misses,
                }
            }
        }
        Ok(total)
    }

    /// Sockets in the flow map at the last sweep.
    pub fn tracked(&self) -> Result<u64, ProbeError> {
        let map: Array<_, u64> = self.typed_map("STATS")?;
        map.get(&stat::TRACKED, 0).map_err(map_error("STATS"))
    }
}

/// The `recursion_misses` field of a program's fdinfo text.
fn recursion_misses(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("recursion_misses:"))
        .and_then(|value| value.trim().parse().ok())
}

/// Loads and attaches the BTF-typed state-change program. Kernels refuse it where BTF-typed
/// tracing programs are not allowed (some lock them down with EPERM, as they do fentry), and
/// the verifier refuses it where a socket field cannot be read directly; the caller then falls
/// back to the raw tracepoint. A failed load leaves nothing attached.
fn attach_btf_set_state(
    ebpf: &mut Ebpf,
    vmlinux: &Btf,
    kernel: &str,
    links: &mut Vec<(String, FdLink)>,
) -> Result<bool, ProbeError> {
    links.push((
        SET_STATE_BTF.into(),
        attach_btf(ebpf, SET_STATE_BTF, SET_STATE, vmlinux, kernel)?,
    ));
    let catching = attach_btf(ebpf, DESTROY_BTF, DESTROY, vmlinux, kernel)
        .map(|link| links.push((DESTROY_BTF.into(), link)));
    Ok(caught_or_warn(catching))
}

/// Attaches a raw tracepoint program and takes its link (dropped: detached; pinned: kept).
fn attach_raw_link(
    prog: &mut RawTracePoint,
    program: &'static str,
    tracepoint: &'static str,
    kernel: &str,
) -> Result<FdLink, ProbeError> {
    let err = program_error(attach_raw(program, tracepoint), kernel);
    let id = prog.attach(tracepoint).map_err(&err)?;
    Ok(prog.take_link(id).map_err(&err)?.into())
}

/// Says once what the start found in the pin directory and what that means for the flows open.
fn log_found(pins: &PinDir, found: Option<&Found>, replaced: usize) {
    let dir = pins.path().display();
    match found {
        Some(Found::Compatible { .. }) => info!(
            dir = %dir,
            replaced_links = replaced,
            "took over the kernel state a previous agent pinned: flows open across the restart \
             keep their flow_id and seq, and records written meanwhile are read now"
        ),
        Some(Found::Incompatible(reason)) => warn!(
            dir = %dir,
            reason = reason.as_str(),
            "the pinned kernel state cannot be taken over, so it was removed and the capture \
             starts afresh: connections open before this start are not tracked (their closes \
             count in flowlog_sidecar_untracked_closes_total)"
        ),
        Some(Found::Nothing) | None => info!(dir = %dir, "pinned the kernel state"),
    }
}

/// Loads `program` as a BTF-typed tracepoint on `tracepoint` and attaches it.
fn attach_btf(
    ebpf: &mut Ebpf,
    program: &'static str,
    tracepoint: &'static str,
    vmlinux: &Btf,
    kernel: &str,
) -> Result<FdLink, ProbeError> {
    let load_error = program_error(Action::Load(program), kernel);
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or(ProbeError::MissingProgram(program))?
        .try_into()
        .map_err(&load_error)?;
    prog.load(tracepoint, vmlinux).map_err(&load_error)?;
    let err = program_error(attach_raw(program, tracepoint), kernel);
    let id = prog.attach().map_err(&err)?;
    Ok(prog.take_link(id).map_err(&err)?.into())
}

/// Whether the destruction program is attached; if not, says once what that costs.
fn caught_or_warn<T>(attached: Result<T, ProbeError>) -> bool {
    match attached {
        Ok(_) => true,
        Err(e) => {
            warn!(
                error = flowlog_diag::error_chain(&e),
                "the socket destruction program (tcp:tcp_destroy_sock) cannot be attached: \
                 state changes made by a softirq that interrupts the state-change program are \
                 missed (counted as skipped_run), except ends the sweep finds"
            );
            false
        }
    }
}

/// Wraps a map error with the map's name.
fn map_error(map: &'static str) -> impl Fn(MapError) -> ProbeError {
    move |source| ProbeError::Map { map, source }
}

/// Attaching `program` to the raw tracepoint `tracepoint`.
fn attach_raw(program: &'static str, tracepoint: &'static str) -> Action {
    Action::AttachRaw {
        program,
        tracepoint,
    }
}

/// Wraps a program error with what was being done and the kernel, and with what the process
/// lacks if the kernel refused it.
fn program_error(action: Action, kernel: &str) -> impl Fn(ProgramError) -> ProbeError {
    let kernel = kernel.to_string();
    move |source| ProbeError::Program {
        refused: Refused::of(action.operation(&source), &source),
        action: action.clone(),
        kernel: kernel.clone(),
        source: Box::new(source),
    }
}

/// Finds `program` in the object as a `T` and loads it into the kernel (the verifier runs here).
fn load_program<'a, T>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
    kernel: &str,
) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
    T: LoadProgram + 'a,
{
    let prog: &mut T = ebpf
        .program_mut(program)
        .ok_or(ProbeError::MissingProgram(program))?
        .try_into()
        .map_err(program_error(Action::Load(program), kernel))?;
    prog.load_program()
        .map_err(program_error(Action::Load(program), kernel))?;
    Ok(prog)
}

/// The program types this agent loads (aya has no common trait for `load`).
trait LoadProgram {
    fn load_program(&mut self) -> Result<(), ProgramError>;
}

impl LoadProgram for TracePoint {
    fn load_program(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl LoadProgram for RawTracePoint {
    fn load_program(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

/// A random 64-bit value from the kernel's CSPRNG (`getrandom(2)`), for the run's flow id base;
/// falls back to the clock and pid mixed, should the call fail (ids stay distinct within the
/// run; only the odds of overlapping an earlier run's range get worse).
fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into the buffer we own.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == buf.len() as isize {
        return u64::from_ne_bytes(buf);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (now ^ u64::from(std::process::id()).rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Possible CPUs (every CPU id the kernel may report is below it): the flow id stride.
fn possible_cpus() -> u64 {
    aya::util::nr_cpus().map_or(1024, |n| n as u64)
}

#[cfg(test)]
mod tests {
    use super::recursion_misses;

    #[test]
    fn recursion_misses_is_read_from_fdinfo() {
        // As Linux 6.18 prints it for a program descriptor.
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2077\nprog_type:\t26\n\
                      prog_jited:\t1\nprog_tag:\t5c8a4bc5d4e1a3f2\nmemlock:\t8192\n\
                      prog_id:\t412\nrun_time_ns:\t0\nrun_cnt:\t0\nrecursion_misses:\t17\n\
                      verified_insns:\t312\n";
        assert_eq!(recursion_misses(fdinfo), Some(17));
        // Before Linux 5.12 the line is absent.
        assert_eq!(recursion_misses("prog_type:\t26\nrun_cnt:\t0\n"), None);
    }
}
