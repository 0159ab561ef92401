//! Flow ends the state-change program never saw, written when the socket is destroyed
//! (`tcp:tcp_destroy_sock`) or, while its process still holds it, by the sweep.
//!
//! The kernel does not re-enter a program already running on a CPU: a `→CLOSE` change made by a
//! softirq that interrupts the state-change program in process context (a SYN timeout, a reset
//! received) is skipped for it, and the flow stays in the map. Every TCP socket is destroyed once,
//! after its close, so one run per socket finds those flows: almost always the map has no entry
//! (the end was written at the close) and the program returns after that one lookup. This costs
//! one program entry per socket, where a second program on the state-change tracepoint, run after
//! the first for every change to handle the ones it was skipped for, cost ten per connection.
//!
//! What such an end loses: the state it left, which the socket no longer says. It is inferred
//! ([`left_state`]): a FIN sent (the flow's `FIN_SENT`, kept from its closing change), a connect
//! that never completed (nothing acknowledged), or else an established connection. Its `end_ns`
//! is the time of the destruction, or of the sweep. Its counters are exact: a closed socket sends
//! and receives nothing more, and a reset sent after the close was counted on the flow still in
//! the map.
//!
//! Neither program sees a change the kernel runs no program for. On this project's VMs (kernel
//! 6.18, Firecracker) that happens to every change made by a softirq that interrupts one thread of
//! the VM's init process (`process_api`, a thread that stays in the kernel): in
//! `flowlog-sidecar/tests/nested.rs`, about one run in four loses a whole timer softirq's batch of
//! SYN timeouts (11–26) that way. tracefs records each of those changes; the programs' entry counts
//! fall short by exactly that batch; no `recursion_misses` is counted; and an ftrace `stacktrace`
//! trigger records no stack for those events while it does for every other. What the kernel does
//! on that thread could not be inspected here (lockdown denies its stack, `/proc/kcore` and KVM
//! statistics). Those sockets' ends are written here or by the sweep all the same, since the
//! destruction happens later, in the process that closes them.

use core::mem::MaybeUninit;

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use flowlog_common::{FlowState, counter, direction, event_kind, flow_flag, tcp_state};

use crate::{
    CONFIG,
    emit::{Emit, emit_snapshot},
    lifecycle::read_tuple,
    maps::{FLOWS, count},
    mem::copy_words,
    sock::{Direct, ProbeRead, SockRead},
};

#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct sock *sk)
    let sk: u64 = ctx.arg(0);
    on_destroy::<ProbeRead>(sk);
    0
}

#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcp_destroy_sock_btf(ctx: BtfTracePointContext) -> i32 {
    // The same argument, typed (`struct sock *`) for the verifier.
    let sk: u64 = ctx.arg(0);
    on_destroy::<Direct>(sk);
    0
}

#[inline(always)]
fn on_destroy<S: SockRead>(sk: u64) {
    // The usual case: the flow's end was written at its close, or the socket was never a flow.
    let Some(state) = FLOWS.get_ptr_mut(sk) else {
        return;
    };
    let Some(sock) = S::tcp(sk, false) else {
        let _ = FLOWS.remove(sk);
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if end_unseen(sock, sk, unsafe { &*state }, now, Emit::Batched) {
        count(counter::CAUGHT_END, 1);
    }
}

/// Writes the end record of the tracked flow of `sk`, whose close the state-change program did not
/// see, from the socket as it is now. Claims the flow by removing it from the map first: the sweep
/// and the destruction may find it at the same moment on two CPUs, and only the one whose removal
/// succeeds writes the end (from its copy of the state, since the map may hand the entry to another
/// socket once it is removed). Written only if the socket still holds the flow's ports: memory
/// re-used for a socket not yet bound reads 0 (counted as a missed end), and one that connected
/// would have replaced the flow at its start. Returns whether it wrote the record.
#[inline(always)]
pub(crate) fn end_unseen<S: SockRead>(
    sock: S,
    sk: u64,
    state: &FlowState,
    now: u64,
    emit: Emit,
) -> bool {
    let mut copy = MaybeUninit::<FlowState>::uninit();
    let copy = unsafe {
        copy_words(copy.as_mut_ptr(), state);
        copy.assume_init_mut()
    };
    if FLOWS.remove(sk).is_err() {
        return false;
    }
    let known = copy.flags & flow_flag::TUPLE_KNOWN != 0;
    let (local_port, remote_port) = (copy.local_port, copy.remote_port);
    read_tuple(sock, copy);
    let same = if known {
        copy.local_port == local_port && copy.remote_port == remote_port
    } else {
        copy.local_port != 0 && copy.remote_port != 0
    };
    if !same {
        count(counter::MISSED_END, 1);
        return false;
    }
    let left = left_state(sock, copy);
    emit_snapshot(sock, copy, event_kind::END, left, now, emit);
    true
}

/// The state a flow most likely left at a close nobody saw, for its end record's flags and
/// outcome: `LAST_ACK` once it sent a FIN (established, FIN sent, no reset to wait for),
/// `SYN_SENT` for an outbound flow of which nothing was acknowledged (a failed connect: the SYN
/// counts in `bytes_acked` once the SYN-ACK acknowledges it), else `ESTABLISHED` (an inbound
/// flow's socket exists only once its handshake completed).
#[inline(always)]
pub(crate) fn left_state<S: SockRead>(sock: S, state: &FlowState) -> u8 {
    if state.flags & flow_flag::FIN_SENT != 0 {
        tcp_state::LAST_ACK
    } else if state.direction == direction::OUTBOUND
        && sock.read::<u64>(global!(CONFIG.layout.bytes_acked)) == 0
    {
        tcp_state::SYN_SENT
    } else {
        tcp_state::ESTABLISHED
    }
}
