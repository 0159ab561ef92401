//! The maps the programs share: open flows, recently closed ones, the ring buffer and its
//! per-CPU batches, counters and statistics for the agent, and the per-CPU marks that keep a
//! state change from being handled twice or lost when a softirq interrupts a program.

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use flowlog_common::{Batch, FlowState, counter, pin_state, stat};

/// Open flows, keyed by the kernel address of their socket. The agent sets its size.
#[map]
pub(crate) static FLOWS: LruHashMap<u64, FlowState> = LruHashMap::with_max_entries(131_072, 0);

/// Flows whose close may be followed by a reset (socket address → flow id), so that the reset,
/// which the kernel sends after moving to `TCP_CLOSE` in `tcp_disconnect`, is charged to its flow.
#[map]
pub(crate) static CLOSED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16_384, 0);

/// Records for user space. The agent sets its size.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Per-CPU counts of data the kernel side lost or skipped (indexes in `flowlog_common::counter`).
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per CPU: the counter part of the flow id
/// ([`next_flow_id`](crate::lifecycle::next_flow_id)) and a mark set while it is taken.
#[repr(C)]
pub(crate) struct FlowSeq {
    /// Non-zero while a run of the program on this CPU is between reading and storing `next`.
    pub(crate) busy: u64,
    /// Flows started on this CPU since load.
    pub(crate) next: u64,
}

/// Only `inet_sock_set_state` touches it. Kernels since about 6.1 never nest a raw tracepoint
/// program within itself on one CPU (a nested hit is skipped and counted as a miss of the
/// program); older ones can, when a softirq's state change interrupts a process-context one,
/// hence the `busy` mark (per-CPU data, no atomics needed: an interrupt runs to completion before
/// the code it interrupted resumes).
#[map]
pub(crate) static FLOW_SEQ: PerCpuArray<FlowSeq> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the last socket state change the main state-change program finished.
///
/// The kernel does not re-enter a program already running on a CPU: a state change made by a
/// softirq that interrupts the program in process context (a SYN timeout, a received FIN) is
/// skipped for it, and was lost. A second program on the same tracepoint, attached after the
/// first and so run right after it for every change, finds its change marked here when the first
/// ran, and handles it itself when not. An interrupted first program's change is marked only
/// once it finishes, so the interrupting change is not mistaken for it. Left: an interrupt in
/// the few instructions between the second program's start and its read of the mark sees the
/// interrupting change's mark, and handles a change twice (a second start replaces the first's
/// fresh entry; a second end finds no entry and counts an untracked close).
///
/// Neither program can see a change the kernel runs no program for. On this project's VMs
/// (kernel 6.18, Firecracker) that happens to every change made by a softirq that interrupts one
/// thread of the VM's init process (`process_api`, a thread that stays in the kernel): in
/// `flowlog-sidecar/tests/nested.rs`, about one run in four loses a whole timer softirq's batch
/// of SYN timeouts (11–26) that way. tracefs records each of those changes; the programs' entry
/// counts (a temporary counter at the top of each) fall short by exactly that batch; no
/// `recursion_misses` is counted for either program; and an ftrace `stacktrace` trigger records
/// no stack for those events while it does for every other. What the kernel does on that thread
/// could not be inspected here (lockdown denies its stack, `/proc/kcore` and KVM statistics).
/// The sweep finds such flows' sockets closed: it writes a failed connect's end record itself
/// ([`recover_failed_connect`](crate::sweep::recover_failed_connect)), and counts and drops any
/// other (`missed_ends`).
#[repr(C)]
pub(crate) struct Handled {
    pub(crate) sk: u64,
    /// `oldstate << 8 | newstate`.
    pub(crate) states: u64,
}

#[map]
pub(crate) static HANDLED: PerCpuArray<Handled> = PerCpuArray::with_max_entries(1, 0);

/// Single values reported by the sweep (indexes in `flowlog_common::stat`).
#[map]
pub(crate) static STATS: Array<u64> = Array::with_max_entries(stat::COUNT, 0);

/// Records of this CPU not yet in the ring buffer (see [`Batch`](flowlog_common::Batch)).
#[map]
pub(crate) static BATCH: PerCpuArray<Batch> = PerCpuArray::with_max_entries(1, 0);

/// What an agent taking over the pinned maps checks first (indexes in
/// `flowlog_common::pin_state`): written by the agent that created them, read by the next. No
/// program uses it; the sweep reads one value so that the linker keeps the map in the object.
#[map]
pub(crate) static PIN_STATE: Array<u64> = Array::with_max_entries(pin_state::COUNT, 0);

#[inline(always)]
pub(crate) fn count(index: u32, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        unsafe { *slot += n };
    }
}
