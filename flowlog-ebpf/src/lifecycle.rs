//! A flow's life from the socket's state changes (`sock:inet_sock_set_state`): its start
//! (connect, or a handshake on a listener), its owner, and its end record; and the flow id it
//! gets.

use core::{ffi::c_void, mem::MaybeUninit, ptr::write_volatile};

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated as helper},
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use flowlog_common::{AF_INET6, FlowState, counter, direction, event_kind, flow_flag, tcp_state};

use crate::{
    CONFIG,
    emit::{Emit, emit_snapshot},
    maps::{CLOSED, FLOW_SEQ, FLOWS, count},
    mem::{zero_words, zero16},
    sock::{Direct, ProbeRead, SockRead},
};

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let sk: u64 = ctx.arg(0);
    let (old, new) = (ctx.arg::<u64>(1) as u8, ctx.arg::<u64>(2) as u8);
    on_set_state::<ProbeRead>(sk, old, new);
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    // The same arguments, with `sk` typed (`struct sock *`) for the verifier.
    let sk: u64 = ctx.arg(0);
    let (old, new) = (ctx.arg::<u64>(1) as u8, ctx.arg::<u64>(2) as u8);
    on_set_state::<Direct>(sk, old, new);
    0
}

/// One state change of socket `sk`. Four of the ten changes of a typical connection need no
/// work (`ESTABLISHED`, `CLOSE_WAIT`, `FIN_WAIT2`, `TIME_WAIT`) and return at the `match`.
///
/// The kernel does not re-enter a program already running on a CPU: a change made by a softirq
/// that interrupts this program in process context (a SYN timeout, a received FIN or reset, a
/// handshake completing) is skipped for it. Of the changes that matter, a skipped end is written
/// when the socket is destroyed ([`crate::destroy`]) or by the sweep, and a skipped inbound start
/// is taken when the process accepts the connection ([`crate::accept`]); an outbound start and
/// the closing changes happen in the process's own context, which nothing interrupts.
#[inline(always)]
pub(crate) fn on_set_state<S: SockRead>(sk: u64, oldstate: u8, newstate: u8) {
    match classify(oldstate, newstate) {
        Change::Start(dir) => {
            start_flow::<S>(sk, dir, dir == direction::OUTBOUND);
        }
        Change::Closing => {
            if let Some(state) = FLOWS.get_ptr_mut(sk) {
                let state = unsafe { &mut *state };
                // Kept for an end written without the state it left (see `FIN_SENT`).
                state.flags |= flow_flag::FIN_SENT;
                if state.flags & flow_flag::PROCESS_KNOWN == 0 {
                    take_process(state);
                }
            }
        }
        Change::End => end_flow::<S>(sk, oldstate),
        Change::Nothing => {}
    }
}

/// What a socket state change means for its flow.
#[derive(Clone, Copy)]
pub(crate) enum Change {
    /// A connect (`SYN_SENT`) or a handshake completed on a listener (`LISTEN→SYN_RECV`).
    Start(u8),
    /// `FIN_WAIT1` or `LAST_ACK`: both come from close()/shutdown() in the socket owner's
    /// context, so an inbound flow whose accept() was not seen (io_uring, no syscall
    /// tracepoints) gets its process here.
    Closing,
    /// `→CLOSE`, except from `LISTEN` (a listener closing is no flow).
    End,
    /// Nothing to do (`ESTABLISHED` included): whether the handshake completed and whether a FIN
    /// was sent follow from the state a snapshot is taken in.
    Nothing,
}

/// The one place that decides which changes [`on_set_state`] acts on.
#[inline(always)]
pub(crate) fn classify(oldstate: u8, newstate: u8) -> Change {
    match newstate {
        tcp_state::SYN_SENT => Change::Start(direction::OUTBOUND),
        tcp_state::SYN_RECV if oldstate == tcp_state::LISTEN => Change::Start(direction::INBOUND),
        tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK => Change::Closing,
        tcp_state::CLOSE if oldstate != tcp_state::LISTEN => Change::End,
        _ => Change::Nothing,
    }
}

/// Whether a socket in `tcp_state` can be a tracked flow: any state between its start and its
/// close (not `TCP_CLOSE`, `TCP_LISTEN`, nor the request and inactive states above them).
#[inline(always)]
pub(crate) fn tracked_state(tcp_state: u8) -> bool {
    matches!(
        tcp_state,
        tcp_state::ESTABLISHED
            | tcp_state::SYN_SENT
            | tcp_state::SYN_RECV
            | tcp_state::FIN_WAIT1
            | tcp_state::FIN_WAIT2
            | tcp_state::TIME_WAIT
            | tcp_state::CLOSE_WAIT
            | tcp_state::LAST_ACK
            | tcp_state::CLOSING
    )
}

/// Starts tracking the flow of `sk` now, if it is a TCP socket; `in_owner` when the task on the
/// CPU is the socket's process (a connect, an accept), whose pid, comm and cgroup the flow then
/// gets. Returns whether the flow is in the map.
#[inline(always)]
pub(crate) fn start_flow<S: SockRead>(sk: u64, dir: u8, in_owner: bool) -> bool {
    if S::tcp(sk, true).is_none() {
        return false;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let mut slot = MaybeUninit::<FlowState>::uninit();
    let state = unsafe {
        zero_words(slot.as_mut_ptr());
        slot.assume_init_mut()
    };
    state.flow_id = next_flow_id();
    state.start_ns = now;
    state.last_report_ns = now;
    state.direction = dir;
    if in_owner {
        take_process(state);
    }
    // By reference: a copy of the value would be a `memcpy` call.
    let value = unsafe { slot.assume_init_ref() };
    // A CLOSED entry left by an earlier socket at this address is harmless: resets are charged
    // to the live flow first, and a reset of this socket after its own close replaces the entry.
    if FLOWS.insert(sk, value, 0).is_err() {
        count(counter::MAP_FULL, 1);
        return false;
    }
    true
}

/// Writes the end record of the flow of `sk`, if tracked.
#[inline(always)]
pub(crate) fn end_flow<S: SockRead>(sk: u64, oldstate: u8) {
    let Some(state) = FLOWS.get_ptr_mut(sk) else {
        count(counter::UNTRACKED_CLOSE, 1);
        return;
    };
    let state = unsafe { &mut *state };
    let Some(sock) = S::tcp(sk, false) else {
        // Tracked, so a TCP socket: cannot happen. Dropped from the map, not reported.
        let _ = FLOWS.remove(sk);
        return;
    };
    // The tuple is read here, once, unless a sweep needed it earlier: by now the kernel has
    // bound the local port, and it clears the addresses only after this state change.
    if state.flags & flow_flag::TUPLE_KNOWN == 0 {
        read_tuple(sock, state);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let flags = emit_snapshot(sock, state, event_kind::END, oldstate, now, Emit::Batched);
    let flow_id = state.flow_id;
    let _ = FLOWS.remove(sk);
    if flags & flow_flag::MAY_RESET != 0 {
        let _ = CLOSED.insert(sk, flow_id, 0);
    }
}

/// Records the task on the CPU as the flow's process. Only called where the kernel runs in the
/// socket owner's context (connect, accept, close, shutdown).
#[inline(always)]
pub(crate) fn take_process(state: &mut FlowState) {
    state.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    state.cgroup_id = unsafe { helper::bpf_get_current_cgroup_id() };
    // Straight into the state (aya's wrapper zeroes a stack copy first, then copies it).
    let comm = &raw mut state.comm;
    if unsafe { helper::bpf_get_current_comm(comm as *mut c_void, 16) } != 0 {
        unsafe { zero16(comm) };
    }
    state.flags |= flow_flag::PROCESS_KNOWN;
}

/// Reads the 4-tuple and family from the socket. Until the kernel binds the local port
/// (a `connect()` enters `SYN_SENT` before it picks one) the tuple is incomplete, so it is marked
/// known only once the local port is set.
#[inline(always)]
pub(crate) fn read_tuple<S: SockRead>(sock: S, state: &mut FlowState) {
    let (addrpair, dport, family) = sock.tuple();
    state.family = family as u8;
    state.local_port = u16::from_be(sock.read::<u16>(global!(CONFIG.layout.inet_sport)));
    state.remote_port = u16::from_be(dport);
    let remote = &raw mut state.remote_addr as *mut u64;
    let local = &raw mut state.local_addr as *mut u64;
    unsafe {
        if family == AF_INET6 {
            let addrs = sock.v6_addrs();
            write_volatile(remote, addrs[0]);
            write_volatile(remote.add(1), addrs[1]);
            write_volatile(local, addrs[2]);
            write_volatile(local.add(1), addrs[3]);
        } else {
            // Little-endian word: the remote address (`skc_daddr`) is its low half, as it is
            // in memory; the address bytes keep their order.
            write_volatile(remote, addrpair & 0xffff_ffff);
            write_volatile(remote.add(1), 0);
            write_volatile(local, addrpair >> 32);
            write_volatile(local.add(1), 0);
        }
    }
    if state.local_port != 0 {
        state.flags |= flow_flag::TUPLE_KNOWN;
    }
}

/// `base + n × stride + cpu` (see `Config::flow_id_base`): distinct for every flow of this run
/// on any CPU, and close to the ids of the flows around it, so that compressed batches of
/// records on Kafka do not pay for 64 random bits per record (twice: key and value).
#[inline(always)]
pub(crate) fn next_flow_id() -> u64 {
    let cpu = u64::from(unsafe { helper::bpf_get_smp_processor_id() });
    let Some(seq) = FLOW_SEQ.get_ptr_mut(0) else {
        // Index 0 of a per-CPU array always exists; the verifier wants the check.
        return random_flow_id();
    };
    // Volatile accesses keep their order. A run that interrupts this one before `busy` is set
    // completes first, and its increment is read below; one that interrupts it after sees
    // `busy` and takes a random id instead of the number being taken.
    let n = unsafe {
        let busy = &raw mut (*seq).busy;
        let next = &raw mut (*seq).next;
        if core::ptr::read_volatile(busy) != 0 {
            return random_flow_id();
        }
        core::ptr::write_volatile(busy, 1);
        let n = core::ptr::read_volatile(next);
        core::ptr::write_volatile(next, n + 1);
        core::ptr::write_volatile(busy, 0);
        n
    };
    global!(CONFIG.flow_id_base)
        .wrapping_add(n.wrapping_mul(global!(CONFIG.flow_id_stride)))
        .wrapping_add(cpu)
}

#[inline(always)]
pub(crate) fn random_flow_id() -> u64 {
    let (hi, lo) = unsafe { (helper::bpf_get_prandom_u32(), helper::bpf_get_prandom_u32()) };
    (u64::from(hi) << 32) | u64::from(lo)
}
