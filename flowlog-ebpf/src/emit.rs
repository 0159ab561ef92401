//! Records: a snapshot of a flow and its socket's counters, written into this CPU's batch or
//! straight into the ring buffer, and the wake-ups of the agent.

use core::{
    ffi::c_void,
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated as helper,
    macros::raw_tracepoint,
    maps::RingBuf,
    programs::RawTracePointContext,
};
use flowlog_common::{
    BATCH_LEN, Batch, FlowEvent, FlowState, counter, event_kind, flow_flag, tcp_state,
};

use crate::{
    CONFIG,
    maps::{BATCH, EVENTS, count},
    mem::{copy_words, copy16, zero_words},
    sock::SockRead,
};

/// Where a record goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Emit {
    /// Into this CPU's [`Batch`](flowlog_common::Batch) (flow ends).
    Batched,
    /// Into the ring buffer at once (the sweep's records).
    Direct,
}

/// Writes one snapshot of `state` and of the socket's counters, into this CPU's batch or the ring
/// buffer. `tcp_state` is the state the socket is in (or, for an end, the one it left). Returns
/// the flags it reported.
#[inline(always)]
pub(crate) fn emit_snapshot<S: SockRead>(
    sock: S,
    state: &mut FlowState,
    kind: u8,
    tcp_state: u8,
    now: u64,
    emit: Emit,
) -> u8 {
    let mut flags = state.flags;
    if tcp_state != tcp_state::SYN_SENT && tcp_state != tcp_state::SYN_RECV && tcp_state != 0 {
        flags |= flow_flag::ESTABLISHED;
    }
    if matches!(
        tcp_state,
        tcp_state::FIN_WAIT1
            | tcp_state::FIN_WAIT2
            | tcp_state::CLOSING
            | tcp_state::LAST_ACK
            | tcp_state::TIME_WAIT
    ) {
        flags |= flow_flag::FIN_SENT;
    }
    let peer_fin = (sock.read::<u64>(global!(CONFIG.layout.sk_flags))
        >> global!(CONFIG.layout.sock_done_bit))
        & 1
        != 0;
    if peer_fin {
        flags |= flow_flag::PEER_FIN;
    }
    if kind == event_kind::END && may_reset(tcp_state, peer_fin) {
        flags |= flow_flag::MAY_RESET;
    }
    if emit == Emit::Batched
        && let Some(batch) = BATCH.get_ptr_mut(0)
    {
        unsafe {
            let busy = &raw mut (*batch).busy;
            let len_at = &raw mut (*batch).len;
            if read_volatile(busy) == 0 {
                // `len` is read only once `busy` is set. Read before, it could be stale: a
                // softirq's run interrupting this one between the check and the mark would add
                // its record at `len`, and this run would then write over it.
                write_volatile(busy, 1);
                let len = read_volatile(len_at);
                // Full only if a flush failed half-way (cannot happen): then the ring buffer,
                // as when the batch is busy.
                if len < BATCH_LEN as u64 {
                    let ev = (&raw mut (*batch).events as *mut FlowEvent).add(len as usize);
                    let flags = write_event(ev, sock, state, kind, flags, tcp_state, now);
                    let first_at = &raw mut (*batch).first_ns;
                    let first = if len == 0 {
                        write_volatile(first_at, now);
                        now
                    } else {
                        read_volatile(first_at)
                    };
                    let len = len + 1;
                    // An end that a reset may follow goes out at once, so that the reset, sent
                    // straight to the ring buffer from any CPU, cannot overtake it. An old batch
                    // goes out here rather than by the agent's flush, which interrupts this CPU.
                    if len == BATCH_LEN as u64
                        || flags & flow_flag::MAY_RESET != 0
                        || now.wrapping_sub(first) >= global!(CONFIG.batch_age_ns)
                    {
                        output_batch(batch, len);
                        write_volatile(len_at, 0);
                    } else {
                        write_volatile(len_at, len);
                    }
                    write_volatile(busy, 0);
                    return flags;
                }
                write_volatile(busy, 0);
            }
        }
    }
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        count(counter::RINGBUF_FULL, 1);
        return flags;
    };
    let ev = entry.as_mut_ptr();
    let flags = unsafe { write_event(ev, sock, state, kind, flags, tcp_state, now) };
    if kind != event_kind::END {
        // In the ring buffer now (a failed reservation leaves `prev` as it was, so the next
        // snapshot's delta covers the lost one): the next record continues from this one.
        unsafe { set_reported(state, ev, flags) };
    }
    submit(entry);
    flags
}

/// Remembers the snapshot at `ev` as the flow's last record
/// ([`FlowState::prev`](flowlog_common::FlowState::prev)).
#[inline(always)]
pub(crate) unsafe fn set_reported(state: &mut FlowState, ev: *const FlowEvent, flags: u8) {
    let prev = &raw mut state.prev;
    unsafe {
        write_volatile(&raw mut (*prev).bytes_acked, (*ev).bytes_acked);
        write_volatile(&raw mut (*prev).bytes_received, (*ev).bytes_received);
        write_volatile(&raw mut (*prev).segs_out, (*ev).segs_out);
        write_volatile(&raw mut (*prev).segs_in, (*ev).segs_in);
        write_volatile(&raw mut (*prev).total_retrans, (*ev).total_retrans);
        write_volatile(&raw mut (*prev).resets_sent, (*ev).resets_sent);
        write_volatile(&raw mut (*prev).resets_received, (*ev).resets_received);
        write_volatile(&raw mut (*prev).seq, (*ev).prev.seq.wrapping_add(1));
        write_volatile(&raw mut (*prev).flags, flags);
    }
}

/// Fills the record at `ev`; returns `flags` with `FIN_ACKED` added where it applies.
#[inline(always)]
pub(crate) unsafe fn write_event<S: SockRead>(
    ev: *mut FlowEvent,
    sock: S,
    state: &FlowState,
    kind: u8,
    mut flags: u8,
    tcp_state: u8,
    now: u64,
) -> u8 {
    unsafe {
        (*ev).flow_id = state.flow_id;
        (*ev).start_ns = state.start_ns;
        (*ev).report_ns = now;
        (*ev).cgroup_id = state.cgroup_id;
        (*ev).bytes_acked = sock.read::<u64>(global!(CONFIG.layout.bytes_acked));
        (*ev).bytes_received = sock.read::<u64>(global!(CONFIG.layout.bytes_received));
        copy16(&raw mut (*ev).local_addr, &raw const state.local_addr);
        copy16(&raw mut (*ev).remote_addr, &raw const state.remote_addr);
        (*ev).segs_out = sock.read::<u32>(global!(CONFIG.layout.segs_out));
        (*ev).segs_in = sock.read::<u32>(global!(CONFIG.layout.segs_in));
        (*ev).total_retrans = sock.read::<u32>(global!(CONFIG.layout.total_retrans));
        (*ev).srtt_us = sock.read::<u32>(global!(CONFIG.layout.srtt_us)) >> 3;
        (*ev).min_rtt_us = sock.read::<u32>(global!(CONFIG.layout.min_rtt_us));
        (*ev).pid = state.pid;
        copy16(&raw mut (*ev).comm, &raw const state.comm);
        (*ev).resets_sent = state.resets_sent;
        (*ev).resets_received = state.resets_received;
        (*ev).local_port = state.local_port;
        (*ev).remote_port = state.remote_port;
        (*ev).kind = kind;
        (*ev).family = state.family;
        (*ev).direction = state.direction;
        if flags & flow_flag::FIN_SENT != 0
            && sock.read::<u32>(global!(CONFIG.layout.snd_una))
                == sock.read::<u32>(global!(CONFIG.layout.write_seq))
        {
            flags |= flow_flag::FIN_ACKED;
        }
        (*ev).flags = flags;
        (*ev).end_state = if kind == event_kind::END {
            tcp_state
        } else {
            0
        };
        copy_words(&raw mut (*ev).prev, &raw const state.prev);
        // Byte by byte and volatile: an array store, or three adjacent zero bytes that the
        // compiler may merge, becomes a `memset` call.
        let pad = &raw mut (*ev)._pad as *mut u8;
        write_volatile(pad, 0);
        write_volatile(pad.add(1), 0);
        write_volatile(pad.add(2), 0);
    }
    flags
}

/// Copies the first `len` records of `batch` into the ring buffer as one record (the agent splits
/// it); if the ring buffer is full, all of them are counted as lost. The caller holds `busy` and
/// empties the batch.
#[inline(always)]
pub(crate) unsafe fn output_batch(batch: *mut Batch, len: u64) {
    if len == 0 || len > BATCH_LEN as u64 {
        return;
    }
    let bytes = len * size_of::<FlowEvent>() as u64;
    let flag = wakeup_flag(
        EVENTS.query(BPF_RB_AVAIL_DATA.into()) + bytes + 8,
        bytes + 8,
    );
    let ret = unsafe {
        helper::bpf_ringbuf_output(
            &EVENTS as *const RingBuf as *mut c_void,
            &raw mut (*batch).events as *mut c_void,
            bytes,
            flag,
        )
    };
    if ret != 0 {
        count(counter::RINGBUF_FULL, len);
    }
}

/// Run by the agent on a CPU (`BPF_PROG_TEST_RUN` pinned to it) whose batch it found old at a
/// drain, and on every CPU at shutdown: moves that CPU's batch into the ring buffer. Left for the
/// next drain if the flush interrupted a run that is using the batch.
#[raw_tracepoint]
pub fn flowlog_flush(_ctx: RawTracePointContext) -> i32 {
    let Some(batch) = BATCH.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        let busy = &raw mut (*batch).busy;
        if read_volatile(busy) != 0 {
            return 1;
        }
        write_volatile(busy, 1);
        let len_at = &raw mut (*batch).len;
        output_batch(batch, read_volatile(len_at));
        write_volatile(len_at, 0);
        write_volatile(busy, 0);
    }
    0
}

/// Whether a close from `oldstate` can be followed by a reset of the same socket: the kernel's
/// `tcp_disconnect` (abortive close, close with unread data) moves to `TCP_CLOSE` first and sends
/// the reset from the states of `tcp_need_reset`. The ordinary ends — `LAST_ACK→CLOSE`, and
/// `FIN_WAIT2→CLOSE` after the peer's FIN (time-wait) — cannot, and are not held.
#[inline(always)]
pub(crate) fn may_reset(oldstate: u8, peer_fin: bool) -> bool {
    match oldstate {
        tcp_state::ESTABLISHED
        | tcp_state::CLOSE_WAIT
        | tcp_state::FIN_WAIT1
        | tcp_state::SYN_RECV => true,
        tcp_state::FIN_WAIT2 => !peer_fin,
        _ => false,
    }
}

#[inline(always)]
pub(crate) fn emit_reset_after_end(flow_id: u64) {
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        count(counter::RINGBUF_FULL, 1);
        return;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        zero_words(ev);
        (*ev).flow_id = flow_id;
        (*ev).resets_sent = 1;
        (*ev).kind = event_kind::RESET_AFTER_END;
    }
    submit(entry);
}

/// Submits a record, waking user space only when this record takes the ring buffer across the
/// wake-up threshold. Below it, records wait for the agent's periodic drain; above it, the agent
/// has been woken already, and waking it again for every record would only interrupt the CPU.
#[inline(always)]
pub(crate) fn submit(entry: aya_ebpf::maps::ring_buf::RingBufEntry<FlowEvent>) {
    // Includes this record: reserved space counts as produced.
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA.into());
    entry.submit(wakeup_flag(waiting, (size_of::<FlowEvent>() + 8) as u64));
}

/// `BPF_RB_FORCE_WAKEUP` if the record of `added` bytes (header included) that brings the data
/// waiting in the ring buffer to `waiting` takes it across the wake-up threshold, else
/// `BPF_RB_NO_WAKEUP`.
#[inline(always)]
pub(crate) fn wakeup_flag(waiting: u64, added: u64) -> u64 {
    let threshold = global!(CONFIG.wakeup_bytes);
    if waiting >= threshold && waiting < threshold + added {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}
