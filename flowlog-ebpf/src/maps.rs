//! The maps the programs share: open flows, recently closed ones, the ring buffer and its
//! per-CPU batches, counters and statistics for the agent.

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

/// Touched by `inet_sock_set_state` and, for a late start, by the accept program. Kernels since about 6.1 never nest a raw tracepoint
/// program within itself on one CPU (a nested hit is skipped and counted as a miss of the
/// program); older ones can, when a softirq's state change interrupts a process-context one,
/// hence the `busy` mark (per-CPU data, no atomics needed: an interrupt runs to completion before
/// the code it interrupted resumes).
#[map]
pub(crate) static FLOW_SEQ: PerCpuArray<FlowSeq> = PerCpuArray::with_max_entries(1, 0);

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
