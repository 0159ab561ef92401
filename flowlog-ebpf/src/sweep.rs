//! The sweep, run by the agent: interim records of long-lived flows (all open flows at
//! shutdown), and the flows whose end never reached the state-change program while their
//! process still holds the closed socket.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated as helper},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use flowlog_common::{
    FlowState, counter, event_kind, flow_flag, pin_state, stat, tcp_state, tuple_block,
};

use crate::{
    CONFIG,
    destroy::end_unseen,
    emit::{Emit, emit_snapshot},
    lifecycle::{read_tuple, tracked_state},
    maps::{FLOWS, PIN_STATE, STATS, count},
    sock::{ProbeRead, SockRead},
};

/// What the sweep callback needs; lives on the sweep program's stack.
#[repr(C)]
pub(crate) struct SweepContext {
    now: u64,
    interim_ns: u64,
    /// Report every flow regardless of age (agent shutdown).
    flush: u64,
    visited: u64,
}

/// Emits interim snapshots of flows whose last report is older than `interim_ns`, or of every
/// flow when argument 0 is 1 (flush). Run from user space with `BPF_PROG_TEST_RUN`.
#[raw_tracepoint]
pub fn flowlog_sweep(ctx: RawTracePointContext) -> i32 {
    let flush: u64 = ctx.arg(0);
    let mut sweep = SweepContext {
        now: unsafe { bpf_ktime_get_ns() },
        interim_ns: global!(CONFIG.interim_ns),
        flush,
        visited: 0,
    };
    unsafe {
        helper::bpf_for_each_map_elem(
            &FLOWS as *const _ as *mut c_void,
            sweep_one as *mut c_void,
            &mut sweep as *mut SweepContext as *mut c_void,
            0,
        );
    }
    if let Some(tracked) = STATS.get_ptr_mut(stat::TRACKED) {
        unsafe { *tracked = sweep.visited };
    }
    // Keeps `PIN_STATE` in the object (an unused map is dropped by the linker): the agent's
    // check that the pinned maps have its layout is then also visible to a reader of the
    // sweep's statistics.
    if let (Some(layout), Some(seen)) = (
        PIN_STATE.get(pin_state::LAYOUT_ID),
        STATS.get_ptr_mut(stat::PIN_LAYOUT_ID),
    ) {
        unsafe { *seen = *layout };
    }
    0
}

extern "C" fn sweep_one(
    _map: *mut c_void,
    key: *const u64,
    value: *mut FlowState,
    ctx: *mut SweepContext,
) -> i64 {
    let (sweep, state) = unsafe { (&mut *ctx, &mut *value) };
    sweep.visited += 1;
    // The sweep is a plain raw tracepoint program (run with BPF_PROG_TEST_RUN): probe reads.
    let sock = ProbeRead(unsafe { *key } as *const u8);
    let tcp_state: u8 = sock.read(global!(CONFIG.layout.sk_daddr) + tuple_block::STATE as u32);
    // A tracked socket is never seen closed or listening: its move to `TCP_CLOSE` ends the flow
    // (and the state is stored only after the programs have run). Seen closed, its close never
    // reached the state-change program and its process still holds it (not destroyed yet): its
    // end is written now, from its final counters (see `crate::destroy`). Seen in any other
    // untracked state, its memory now holds another socket: dropped without a record and
    // counted. Checked for every flow at every sweep, so such a flow is dealt with within a sweep
    // period, not only once it is due for an interim record. A flow younger than a second may be
    // a socket whose state is stored just after its start was recorded.
    if !tracked_state(tcp_state) && sweep.now.saturating_sub(state.start_ns) >= 1_000_000_000 {
        if tcp_state == tcp_state::CLOSE {
            if end_unseen(sock, unsafe { *key }, state, sweep.now, Emit::Direct) {
                count(counter::RECOVERED_END, 1);
            }
        } else if FLOWS.remove(unsafe { *key }).is_ok() {
            count(counter::MISSED_END, 1);
        }
        return 0;
    }
    let due = sweep.now.saturating_sub(state.last_report_ns) >= sweep.interim_ns;
    if sweep.flush != 0 || due {
        let kind = if sweep.flush != 0 {
            event_kind::FLUSH
        } else {
            event_kind::INTERIM
        };
        if state.flags & flow_flag::TUPLE_KNOWN == 0 {
            read_tuple(sock, state);
        }
        // Straight into the ring buffer: the sweep runs on any CPU, and an interim record must
        // not wait behind that CPU's batch.
        emit_snapshot(sock, state, kind, tcp_state, sweep.now, Emit::Direct);
        state.last_report_ns = sweep.now;
    }
    0
}
