//! A flow's life from the socket's state changes (`sock:inet_sock_set_state`): its start
//! (connect, or a handshake on a listener), its owner, and its end record; the flow id it gets;
//! and the catching programs that handle the changes the kernel did not hand to the main ones.

use core::{
    ffi::c_void,
    mem::MaybeUninit,
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated as helper},
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use flowlog_common::{AF_INET6, FlowState, counter, direction, event_kind, flow_flag, tcp_state};

use crate::{
    CONFIG,
    emit::{Emit, emit_snapshot},
    maps::{CLOSED, FLOW_SEQ, FLOWS, HANDLED, count},
    mem::{zero_words, zero16},
    sock::{Direct, ProbeRead, SockRead},
};

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let sk: u64 = ctx.arg(0);
    let (old, new) = (ctx.arg::<u64>(1) as u8, ctx.arg::<u64>(2) as u8);
    handle_set_state::<ProbeRead>(sk, old, new);
    0
}

/// Attached after [`inet_sock_set_state`]: handles the state changes the kernel did not hand to
/// it (see [`HANDLED`](crate::maps::HANDLED)).
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_catch(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let (old, new) = (ctx.arg::<u64>(1) as u8, ctx.arg::<u64>(2) as u8);
    catch_set_state::<ProbeRead>(sk, old, new);
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    // The same arguments, with `sk` typed (`struct sock *`) for the verifier.
    let sk: u64 = ctx.arg(0);
    let (old, new) = (ctx.arg::<u64>(1) as u8, ctx.arg::<u64>(2) as u8);
    handle_set_state::<Direct>(sk, old, new);
    0
}

/// Attached after [`inet_sock_set_state_btf`]: handles the state changes the kernel did not
/// hand to it (see [`HANDLED`](crate::maps::HANDLED)).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf_catch(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let (old, new) = (ctx.arg::<u64>(1) as u8, ctx.arg::<u64>(2) as u8);
    catch_set_state::<Direct>(sk, old, new);
    0
}

/// The main state-change programs' work: the change, then its mark (see
/// [`HANDLED`](crate::maps::HANDLED)).
#[inline(always)]
pub(crate) fn handle_set_state<S: SockRead>(sk: u64, oldstate: u8, newstate: u8) {
    on_set_state::<S>(sk, oldstate, newstate);
    mark_handled(sk, oldstate, newstate);
}

/// The catching programs' work: a change the main program did not mark as finished on this CPU.
#[inline(always)]
pub(crate) fn catch_set_state<S: SockRead>(sk: u64, oldstate: u8, newstate: u8) {
    if !was_handled(sk, oldstate, newstate) && on_set_state::<S>(sk, oldstate, newstate) {
        count(counter::CAUGHT_END, 1);
    }
}

/// Whether [`on_set_state`] has anything to do for this change; the others are not marked
/// handled nor caught.
#[inline(always)]
pub(crate) fn needs_work(oldstate: u8, newstate: u8) -> bool {
    !matches!(classify(oldstate, newstate), Change::Nothing)
}

/// Records, on this CPU, that the main state-change program has finished with this change.
#[inline(always)]
pub(crate) fn mark_handled(sk: u64, oldstate: u8, newstate: u8) {
    if !needs_work(oldstate, newstate) {
        return;
    }
    if let Some(last) = HANDLED.get_ptr_mut(0) {
        unsafe {
            write_volatile(&raw mut (*last).sk, sk);
            write_volatile(
                &raw mut (*last).states,
                u64::from(oldstate) << 8 | u64::from(newstate),
            );
        }
    }
}

/// Whether the main program handled this change: it marks every change it finishes, and the
/// catching program runs right after it for the same change, unless the main one was skipped.
#[inline(always)]
pub(crate) fn was_handled(sk: u64, oldstate: u8, newstate: u8) -> bool {
    if !needs_work(oldstate, newstate) {
        return true;
    }
    match HANDLED.get_ptr(0) {
        Some(last) => unsafe {
            read_volatile(&raw const (*last).sk) == sk
                && read_volatile(&raw const (*last).states)
                    == u64::from(oldstate) << 8 | u64::from(newstate)
        },
        // Cannot happen (a per-CPU array of one); handling twice would be worse than missing.
        None => true,
    }
}

/// One state change of socket `sk`; true if it ended a tracked flow (its end record written).
/// Four of the ten changes of a typical connection need no work (`ESTABLISHED`, `CLOSE_WAIT`,
/// `FIN_WAIT2`, `TIME_WAIT`) and return at the `match`.
#[inline(always)]
pub(crate) fn on_set_state<S: SockRead>(sk: u64, oldstate: u8, newstate: u8) -> bool {
    match classify(oldstate, newstate) {
        Change::Start(dir) => start_flow::<S>(sk, dir),
        Change::Closing => {
            if let Some(state) = FLOWS.get_ptr_mut(sk) {
                let state = unsafe { &mut *state };
                if state.flags & flow_flag::PROCESS_KNOWN == 0 {
                    take_process(state);
                }
            }
        }
        Change::End => return end_flow::<S>(sk, oldstate),
        Change::Nothing => {}
    }
    false
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

/// The one place that decides which changes [`on_set_state`] acts on ([`needs_work`] too).
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

#[inline(always)]
pub(crate) fn start_flow<S: SockRead>(sk: u64, dir: u8) {
    if S::tcp(sk, true).is_none() {
        return;
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
    if dir == direction::OUTBOUND {
        take_process(state);
    }
    // By reference: a copy of the value would be a `memcpy` call.
    let value = unsafe { slot.assume_init_ref() };
    if FLOWS.insert(sk, value, 0).is_err() {
        count(counter::MAP_FULL, 1);
    }
    // A CLOSED entry left by an earlier socket at this address is harmless: resets are charged
    // to the live flow first, and a reset of this socket after its own close replaces the entry.
}

/// Writes the end record of the flow of `sk`, if tracked; true if it did.
#[inline(always)]
pub(crate) fn end_flow<S: SockRead>(sk: u64, oldstate: u8) -> bool {
    let Some(state) = FLOWS.get_ptr_mut(sk) else {
        count(counter::UNTRACKED_CLOSE, 1);
        return false;
    };
    let state = unsafe { &mut *state };
    let Some(sock) = S::tcp(sk, false) else {
        // Tracked, so a TCP socket: cannot happen. Dropped from the map, not reported.
        let _ = FLOWS.remove(sk);
        return false;
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
    true
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
