//! The agent's event loop: drains the kernel ring buffer, runs the interim sweep, hands records
//! to the sink, exports metrics. On shutdown, an agent whose kernel state is pinned
//! (`crate::pins`) reads what waits in the kernel and leaves the programs tracking for the next
//! agent; an unpinned one, or a final stop (`--unpin`), flushes every open flow as an `open`
//! record.
//!
//! Reading is batched: the kernel wakes us only when the ring buffer fills past a threshold, and
//! otherwise we drain it every `drain_interval`. That bounds the agent's wake-ups (and so its
//! CPU cost) however many connections the host makes, at the price of up to `drain_interval`
//! of latency.
use std::{
    future::Future,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use flowlog_common::{FlowEvent, counter, event_kind};
use flowlog_diag::LogThrottle;
use metrics::{counter, gauge};
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::{MissedTickBehavior, interval},
};
use tracing::{info, warn};

use crate::{
    flows::{Assembler, AssemblyStats, Clock},
    metrics as m,
    probe::{Probe, SockAccess},
    record::{FlowRecord, Outcome},
    sink::RecordSink,
};

/// Settings of the event loop.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub host: String,
    pub interim: Duration,
    pub drain_interval: Duration,
    /// What `/healthz` and `/readyz` answer: the loop beats it at every turn, and it is ready
    /// while the programs are attached ([`PROGRAMS_ATTACHED`]) and the ring buffer was drained
    /// recently ([`RING_BUFFER_DRAINED`]).
    pub health: flowlog_cli::Health,
    /// A final stop: at shutdown, detach the programs, report the open flows and remove the
    /// pins, rather than leave the kernel side tracking for the next agent.
    pub unpin: bool,
}

/// Readiness check: the kernel programs are loaded and attached (set by the caller while the
/// probe starts, and by [`run`] once it holds the started probe).
pub const PROGRAMS_ATTACHED: &str = "programs_attached";
/// Readiness check: the ring buffer was drained within [`AgentSettings::drained_within`].
pub const RING_BUFFER_DRAINED: &str = "ring_buffer_drained";
/// Readiness check that fails once shutdown began (the agent is flushing, then exits).
pub const NOT_STOPPING: &str = "not_stopping";
/// How long the loop may go without a turn before `/healthz` fails: the drain tick turns it
/// every `--drain-interval`, so only a loop stuck for this long (a blocked thread) fails it.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

impl AgentSettings {
    /// The sweep walks every open flow, so it runs only as often as the interim interval needs:
    /// an interim record is at most a twelfth of the interval late (5 s for the default 60 s),
    /// and the sweep runs at most ten times a second.
    fn sweep_period(&self) -> Duration {
        (self.interim / 12).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The agent is not ready when its last drain of the ring buffer is older than this: twenty
    /// drain intervals, at least 10 s (a loaded host may delay a few ticks).
    pub fn drained_within(&self) -> Duration {
        (self.drain_interval * 20).max(Duration::from_secs(10))
    }
}

/// The kernel's hostname (the default `host` of records), or `localhost` if unreadable.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

/// Installs the SIGTERM and SIGINT handlers now, and returns a future that completes on either
/// (the `shutdown` of [`run`]). Installing them before the probe starts matters: a signal that
/// arrived between "capturing" and the first poll of a lazily installed handler would kill the
/// agent without its flush.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Runs until `shutdown` completes, then flushes. Errors only for conditions the agent cannot
/// survive (the ring buffer's descriptor failing).
pub async fn run<S: RecordSink>(
    mut probe: Probe,
    mut sink: S,
    settings: AgentSettings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let ring = probe.take_ring_buffer()?;
    // SAFETY: the RingBuf owns its map's file descriptor, which stays open and unchanged until
    // the RingBuf is dropped together with this AsyncFd.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("registering the ring buffer with the event loop")?;
    let mut assembler = Assembler::new(
        settings.host.clone(),
        Clock::now(),
        settings.interim,
        Instant::now(),
    );
    let mut reporter = Reporter::default();
    let mut out: Vec<FlowRecord> = Vec::new();

    let mut drain_tick = interval(settings.drain_interval);
    let mut sweep_tick = interval(settings.sweep_period());
    let mut stats_tick = interval(Duration::from_secs(1));
    for tick in [&mut drain_tick, &mut sweep_tick, &mut stats_tick] {
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    }
    tokio::pin!(shutdown);
    let health = settings.health.clone();
    health.set_ready(PROGRAMS_ATTACHED);
    health.set_ready(NOT_STOPPING);
    health.expect_fresh(RING_BUFFER_DRAINED, settings.drained_within());
    // Said once, in the log and as a gauge: a fallback to probe reads keeps the records the
    // same but costs more per connection, and an operator (or a test) must be able to see it.
    let read_path = probe.sock_access();
    for path in SockAccess::ALL {
        gauge!(m::READ_PATH, "path" => path.as_str()).set(f64::from(u8::from(path == read_path)));
    }
    gauge!(m::PINNED).set(f64::from(u8::from(probe.pin_dir().is_some())));
    let pin_dir = probe.pin_dir().map(|d| d.display().to_string());
    info!(
        host = %settings.host,
        interim = ?settings.interim,
        read_path = read_path.as_str(),
        pinned = pin_dir.as_deref().unwrap_or("no"),
        "capturing TCP flows"
    );

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                drain(guard.get_inner_mut(), &mut assembler, &mut out);
                guard.clear_ready();
                health.touch(RING_BUFFER_DRAINED);
            }
            _ = drain_tick.tick() => {
                if let Err(e) = probe.flush_batches(false) {
                    reporter.flush_failed(&e);
                }
                drain(ring.get_mut(), &mut assembler, &mut out);
                health.touch(RING_BUFFER_DRAINED);
            }
            _ = sweep_tick.tick() => {
                if let Err(e) = probe.sweep(false) {
                    reporter.sweep_failed(&e);
                }
                drain(ring.get_mut(), &mut assembler, &mut out);
                let lost = reporter.take_snapshots_lost();
                assembler.forget_vanished(Instant::now(), lost);
            }
            _ = stats_tick.tick() => {
                assembler.set_clock(Clock::now());
                reporter.export(&probe, assembler.stats());
            }
        }
        assembler.release_due(Instant::now(), &mut out);
        emit(&mut sink, &mut out, &mut reporter).await;
        health.beat();
    }

    match (&pin_dir, settings.unpin) {
        (Some(dir), false) => {
            // The programs keep tracking: no `open` record for a flow that is not over, only
            // what waits in the kernel now. The next agent continues every flow from the maps.
            health.set_not_ready(
                NOT_STOPPING,
                "shutting down: the kernel side keeps tracking",
            );
            info!(
                pin_dir = dir.as_str(),
                "shutting down: the kernel programs stay attached and keep tracking for the \
                 next agent (`flowlog-sidecar --unpin` stops them)"
            );
            if let Err(e) = probe.flush_batches(true) {
                reporter.flush_failed(&e);
            }
            drain(ring.get_mut(), &mut assembler, &mut out);
        }
        _ => {
            health.set_not_ready(NOT_STOPPING, "shutting down: reporting open flows");
            info!("shutting down: reporting open flows");
            if settings.unpin {
                // Detached first, so that no flow ends after its `open` record below.
                if let Err(e) = probe.detach() {
                    warn!(
                        error = flowlog_diag::error_chain(&e),
                        "could not detach the pinned programs"
                    );
                }
            }
            if let Err(e) = probe.flush_batches(true) {
                reporter.flush_failed(&e);
            }
            drain(ring.get_mut(), &mut assembler, &mut out);
            assembler.start_flush();
            if let Err(e) = probe.sweep(true) {
                warn!(
                    error = flowlog_diag::error_chain(&e),
                    "could not report open flows at shutdown"
                );
            }
            // Ends batched on the CPUs since the first flush.
            if let Err(e) = probe.flush_batches(true) {
                reporter.flush_failed(&e);
            }
            drain(ring.get_mut(), &mut assembler, &mut out);
        }
    }
    assembler.release_all(&mut out);
    emit(&mut sink, &mut out, &mut reporter).await;
    if let Err(e) = sink.close().await {
        counter!(m::SINK_ERRORS).increment(1);
        reporter.sink_failed(&e, 0);
    }
    reporter.export(&probe, assembler.stats());
    if settings.unpin {
        probe
            .unpin()
            .context("removing the pinned kernel state (--unpin)")?;
        if let Some(dir) = &pin_dir {
            info!(pin_dir = dir.as_str(), "removed the pinned kernel state");
        }
    }
    info!("stopped");
    Ok(())
}

/// Event kinds by their metric label; events are counted per drain, not per event, to keep the
/// metrics registry off the per-event path.
const EVENT_KINDS: [(u8, &str); 5] = [
    (event_kind::END, "end"),
    (event_kind::INTERIM, "interim"),
    (event_kind::FLUSH, "flush"),
    (event_kind::RESET_AFTER_END, "reset_after_end"),
    (0, "unknown"),
];

/// Reads every event waiting in the ring buffer.
fn drain(ring: &mut RingBuf<MapData>, assembler: &mut Assembler, out: &mut Vec<FlowRecord>) {
    let now = Instant::now();
    let mut counts = [0u64; EVENT_KINDS.len()];
    while let Some(item) = ring.next() {
        // One FlowEvent, or a CPU's batch of them.
        if item.is_empty() || !item.len().is_multiple_of(size_of::<FlowEvent>()) {
            assembler.note_malformed();
            continue;
        }
        for bytes in item.chunks_exact(size_of::<FlowEvent>()) {
            // SAFETY: the kernel wrote a FlowEvent (repr(C), valid for any bytes) of this size.
            let ev: FlowEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let slot = EVENT_KINDS
                .iter()
                .position(|(kind, _)| *kind == ev.kind)
                .unwrap_or(EVENT_KINDS.len() - 1);
            counts[slot] += 1;
            assembler.on_event(&ev, now, out);
        }
    }
    for ((_, label), n) in EVENT_KINDS.iter().zip(counts) {
        if n > 0 {
            counter!(m::EVENTS, "kind" => *label).increment(n);
        }
    }
}

/// Writes and flushes a batch; a failed write is counted and logged, and the agent carries on.
async fn emit<S: RecordSink>(sink: &mut S, out: &mut Vec<FlowRecord>, reporter: &mut Reporter) {
    if out.is_empty() {
        if let Err(e) = sink.idle().await {
            counter!(m::SINK_ERRORS).increment(1);
            reporter.sink_failed(&e, 0);
        }
        return;
    }
    let mut by_outcome = [0u64; Outcome::ALL.len()];
    for record in out.iter() {
        by_outcome[record.outcome as usize] += 1;
    }
    for (outcome, n) in Outcome::ALL.iter().zip(by_outcome) {
        if n > 0 {
            counter!(m::RECORDS, "outcome" => outcome.as_str()).increment(n);
        }
    }
    let result = match sink.write(out).await {
        Ok(()) => sink.flush().await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        counter!(m::SINK_ERRORS).increment(1);
        reporter.sink_failed(&e, out.len());
    }
    out.clear();
}

/// Exports gauges and counters, and logs each kind of trouble once (then at most once a minute)
/// with its running count, so a persistent problem does not flood the log.
#[derive(Default)]
struct Reporter {
    ringbuf_full_log: LogThrottle,
    map_full_log: LogThrottle,
    skipped_run_log: LogThrottle,
    missed_end_log: LogThrottle,
    vanished_log: LogThrottle,
    sweep_log: LogThrottle,
    flush_log: LogThrottle,
    sink_log: LogThrottle,
    ringbuf_full: u64,
    map_full: u64,
    skipped_runs: u64,
    missed_ends: u64,
    vanished_flows: u64,
    /// Set when `ringbuf_full` grows; taken by [`Reporter::take_snapshots_lost`].
    snapshots_lost: bool,
}

impl Reporter {
    fn export(&mut self, probe: &Probe, stats: AssemblyStats) {
        match probe.counters() {
            Ok(c) => {
                let ringbuf_full = c[counter::RINGBUF_FULL as usize];
                let map_full = c[counter::MAP_FULL as usize];
                counter!(m::KERNEL_DROPS, "reason" => "ringbuf_full").absolute(ringbuf_full);
                counter!(m::KERNEL_DROPS, "reason" => "map_full").absolute(map_full);
                counter!(m::UNTRACKED_CLOSES).absolute(c[counter::UNTRACKED_CLOSE as usize]);
                counter!(m::ADOPTED_FLOWS).absolute(c[counter::ADOPTED as usize]);
                counter!(m::LATE_STARTS).absolute(c[counter::LATE_START as usize]);
                counter!(m::CAUGHT_ENDS).absolute(c[counter::CAUGHT_END as usize]);
                counter!(m::RECOVERED_ENDS).absolute(c[counter::RECOVERED_END as usize]);
                let missed_ends = c[counter::MISSED_END as usize];
                counter!(m::MISSED_ENDS).absolute(missed_ends);
                if missed_ends > self.missed_ends && self.missed_end_log.due() {
                    warn!(
                        missed_ends,
                        "flows whose socket was destroyed unseen were dropped from the kernel flow \
                         map without an end record (the kernel ran no program for their close)"
                    );
                }
                self.missed_ends = missed_ends;
                if ringbuf_full > self.ringbuf_full && self.ringbuf_full_log.due() {
                    warn!(
                        lost_records = ringbuf_full,
                        "kernel ring buffer overflowed: flow records were lost; raise \
                         --ring-buffer-bytes or lower --drain-interval"
                    );
                }
                if map_full > self.map_full && self.map_full_log.due() {
                    warn!(
                        untracked_flows = map_full,
                        "kernel flow map full: new flows were not tracked; raise --max-flows"
                    );
                }
                if ringbuf_full > self.ringbuf_full {
                    self.snapshots_lost = true;
                }
                self.ringbuf_full = ringbuf_full;
                self.map_full = map_full;
            }
            Err(e) => warn!(
                error = flowlog_diag::error_chain(&e),
                "reading kernel counters"
            ),
        }
        match probe.skipped_runs() {
            Ok(Some(skipped)) => {
                counter!(m::KERNEL_DROPS, "reason" => "skipped_run").absolute(skipped.lost);
                counter!(m::CAUGHT_STATE_CHANGES).absolute(skipped.caught);
                if skipped.lost > self.skipped_runs && self.skipped_run_log.due() {
                    warn!(
                        skipped_runs = skipped.lost,
                        "the kernel skipped flowlog programs that interrupted themselves on one \
                         CPU: those socket events were not seen (a flow untracked, or its end \
                         missed)"
                    );
                }
                self.skipped_runs = skipped.lost;
            }
            Ok(None) => {}
            Err(e) => warn!(
                error = flowlog_diag::error_chain(&e),
                "reading kernel program counters"
            ),
        }
        if let Ok(tracked) = probe.tracked() {
            gauge!(m::SOCKETS_TRACKED).set(tracked as f64);
        }
        gauge!(m::CPU_SECONDS).set(m::process_cpu_seconds());
        gauge!(m::RESIDENT_BYTES).set(m::resident_bytes() as f64);
        counter!(m::STALE_SNAPSHOTS).absolute(stats.stale_snapshots);
        counter!(m::LATE_RESETS).absolute(stats.late_resets);
        counter!(m::COUNTER_REGRESSIONS).absolute(stats.counter_regressions);
        counter!(m::UNKNOWN_EVENTS).absolute(stats.unknown_events);
        counter!(m::VANISHED_FLOWS).absolute(stats.vanished_flows);
        if stats.vanished_flows > self.vanished_flows && self.vanished_log.due() {
            warn!(
                vanished_flows = stats.vanished_flows,
                "flows with interim records left the kernel flow map without an end (evicted: \
                 raise --max-flows if map_full also grows; or a missed end); their last record \
                 stands as their last"
            );
        }
        self.vanished_flows = stats.vanished_flows;
        counter!(m::VANISHED_EVENTS).absolute(stats.vanished_events);
    }

    /// Whether records were lost in the kernel since the last call: an interim snapshot may be
    /// among them, so a quiet flow is not proof that it left the map.
    fn take_snapshots_lost(&mut self) -> bool {
        std::mem::take(&mut self.snapshots_lost)
    }

    fn sweep_failed(&mut self, e: &crate::probe::ProbeError) {
        if self.sweep_log.due() {
            warn!(
                error = flowlog_diag::error_chain(e),
                "interim sweep failed; long-lived flows get no interim record"
            );
        }
    }

    fn flush_failed(&mut self, e: &crate::probe::ProbeError) {
        if self.flush_log.due() {
            warn!(
                error = flowlog_diag::error_chain(e),
                "moving the CPUs' batched flow records to the ring buffer failed; they wait \
                 for the next drain"
            );
        }
    }

    fn sink_failed(&mut self, e: &crate::sink::SinkError, records: usize) {
        if self.sink_log.due() {
            warn!(
                error = flowlog_diag::error_chain(e),
                records, "writing flow records failed"
            );
        }
    }
}
