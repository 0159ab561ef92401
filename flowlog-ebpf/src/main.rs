//! flowlog's kernel programs: track every TCP socket of the host from its first state change to
//! `TCP_CLOSE` and emit one [`FlowEvent`] per flow end (and per interim report) through a ring
//! buffer.
//!
//! - `sock:inet_sock_set_state` (raw tracepoint: the socket and both states come as arguments,
//!   without the cost of formatting a trace record) starts a flow (`CLOSE→SYN_SENT` outbound,
//!   `LISTEN→SYN_RECV` inbound), completes it (`ESTABLISHED`, `FIN_WAIT1`/`LAST_ACK`), and ends it
//!   (`→CLOSE`), reading the socket's counters from `struct tcp_sock` at that moment.
//! - `tcp:tcp_send_reset` / `tcp:tcp_receive_reset` (raw) count resets per flow.
//! - `syscalls:sys_exit_accept{,4}` give an inbound flow its owning process (the accepting one).
//! - `flowlog_sweep` is never attached: user space runs it with `BPF_PROG_TEST_RUN` to emit
//!   interim snapshots of long-lived flows (and of all open flows at shutdown).
//!
//! No offsets are compiled in: the agent finds them in the running kernel's BTF and overrides the
//! `CONFIG` and `ACCEPT` globals at load time. The hot path is kept short: state changes that do
//! not concern a tracked flow return after one map lookup, and the socket's 4-tuple is read once.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated as helper,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use flowlog_common::{
    AF_INET6, AcceptLayout, Config, FlowEvent, FlowState, IPPROTO_TCP, counter, direction,
    event_kind, flow_flag, stat, tcp_state, tuple_block,
};

/// Layout and settings, overridden by the agent at load time (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static CONFIG: Config = unsafe { core::mem::zeroed() };

/// How to reach the socket behind an accepted file descriptor; zero when the agent found no
/// syscall tracepoints (the accept program is then not attached).
#[unsafe(no_mangle)]
static ACCEPT: AcceptLayout = unsafe { core::mem::zeroed() };

/// Reads one field of a load-time global. Volatile, so the compiler cannot fold the zero it was
/// compiled with; one load instruction, where copying the whole struct would cost dozens.
macro_rules! global {
    ($($field:tt)+) => {
        load_global(&raw const $($field)+)
    };
}

#[inline(always)]
fn load_global<T: Copy>(field: *const T) -> T {
    // SAFETY: `field` points into one of the immutable globals above.
    unsafe { core::ptr::read_volatile(field) }
}

/// Open flows, keyed by the kernel address of their socket. The agent sets its size.
#[map]
static FLOWS: LruHashMap<u64, FlowState> = LruHashMap::with_max_entries(131_072, 0);

/// Flows whose close may be followed by a reset (socket address → flow id), so that the reset,
/// which the kernel sends after moving to `TCP_CLOSE` in `tcp_disconnect`, is charged to its flow.
#[map]
static CLOSED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16_384, 0);

/// Records for user space. The agent sets its size.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Per-CPU counts of data the kernel side lost or skipped (indexes in `flowlog_common::counter`).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per CPU: the counter part of the flow id ([`next_flow_id`]) and a mark set while it is taken.
#[repr(C)]
struct FlowSeq {
    /// Non-zero while a run of the program on this CPU is between reading and storing `next`.
    busy: u64,
    /// Flows started on this CPU since load.
    next: u64,
}

/// Only `inet_sock_set_state` touches it. Kernels since about 6.1 never nest a raw tracepoint
/// program within itself on one CPU (a nested hit is skipped and counted as a miss of the
/// program); older ones can, when a softirq's state change interrupts a process-context one,
/// hence the `busy` mark (per-CPU data, no atomics needed: an interrupt runs to completion before
/// the code it interrupted resumes).
#[map]
static FLOW_SEQ: PerCpuArray<FlowSeq> = PerCpuArray::with_max_entries(1, 0);

/// Single values reported by the sweep (indexes in `flowlog_common::stat`).
#[map]
static STATS: Array<u64> = Array::with_max_entries(stat::COUNT, 0);

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let sk: u64 = ctx.arg(0);
    let oldstate = ctx.arg::<u64>(1) as u8;
    let newstate = ctx.arg::<u64>(2) as u8;
    match newstate {
        tcp_state::SYN_SENT => start_flow(sk, direction::OUTBOUND),
        tcp_state::SYN_RECV if oldstate == tcp_state::LISTEN => start_flow(sk, direction::INBOUND),
        // Both come from close()/shutdown() in the socket owner's context: an inbound flow whose
        // accept() was not seen (io_uring, no syscall tracepoints) gets its process here.
        tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK => {
            if let Some(state) = FLOWS.get_ptr_mut(sk) {
                let state = unsafe { &mut *state };
                if state.flags & flow_flag::PROCESS_KNOWN == 0 {
                    take_process(state);
                }
            }
        }
        // Nothing to do on the other changes (ESTABLISHED included): whether the handshake
        // completed and whether a FIN was sent follow from the state a snapshot is taken in.
        tcp_state::CLOSE if oldstate != tcp_state::LISTEN => end_flow(sk, oldstate),
        _ => {}
    }
    0
}

#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const struct sk_buff *skb[, reason])
    let sk: u64 = ctx.arg(0);
    if sk == 0 {
        return 0; // a reset for a packet that matched no socket: no flow to charge
    }
    if let Some(state) = FLOWS.get_ptr_mut(sk) {
        unsafe { (*state).resets_sent = (*state).resets_sent.saturating_add(1) };
    } else if let Some(flow_id) = unsafe { CLOSED.get(sk) } {
        let flow_id = *flow_id;
        emit_reset_after_end(flow_id);
    }
    0
}

#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct sock *sk)
    let sk: u64 = ctx.arg(0);
    if let Some(state) = FLOWS.get_ptr_mut(sk) {
        unsafe { (*state).resets_received = (*state).resets_received.saturating_add(1) };
    }
    0
}

/// On return from `accept()`/`accept4()` (in the accepting process): finds the socket of the new
/// descriptor and records this process as the inbound flow's owner.
#[tracepoint]
pub fn accept_exit(ctx: TracePointContext) -> u32 {
    let _ = on_accept_exit(&ctx);
    0
}

#[inline(always)]
fn on_accept_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let fd = unsafe { ctx.read_at::<i64>(global!(ACCEPT.ret) as usize)? };
    if fd < 0 {
        return Ok(());
    }
    let task = unsafe { helper::bpf_get_current_task() } as *const u8;
    unsafe {
        let files: *const u8 = read_field(task, global!(ACCEPT.task_files))?;
        let fdt: *const u8 = read_field(files, global!(ACCEPT.files_fdt))?;
        let max_fds: u32 = read_field(fdt, global!(ACCEPT.fdtable_max_fds))?;
        if fd as u64 >= u64::from(max_fds) {
            return Ok(());
        }
        let fds: *const *const u8 = read_field(fdt, global!(ACCEPT.fdtable_fd))?;
        let file = bpf_probe_read_kernel(fds.add(fd as usize))?;
        let socket: *const u8 = read_field(file, global!(ACCEPT.file_private_data))?;
        let sk: u64 = read_field(socket, global!(ACCEPT.socket_sk))?;
        if let Some(state) = FLOWS.get_ptr_mut(sk) {
            let state = &mut *state;
            if state.flags & flow_flag::PROCESS_KNOWN == 0 {
                take_process(state);
            }
        }
    }
    Ok(())
}

/// What the sweep callback needs; lives on the sweep program's stack.
#[repr(C)]
struct SweepContext {
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
    let due = sweep.now.saturating_sub(state.last_report_ns) >= sweep.interim_ns;
    if sweep.flush != 0 || due {
        let kind = if sweep.flush != 0 {
            event_kind::FLUSH
        } else {
            event_kind::INTERIM
        };
        let sk = unsafe { *key };
        if state.flags & flow_flag::TUPLE_KNOWN == 0 {
            read_tuple(sk, state);
        }
        let tcp_state: u8 = unsafe {
            read_sock(
                sk as *const u8,
                global!(CONFIG.layout.sk_daddr) + tuple_block::STATE as u32,
            )
        };
        emit_snapshot(sk, state, kind, tcp_state, sweep.now);
        state.last_report_ns = sweep.now;
    }
    0
}

#[inline(always)]
fn start_flow(sk: u64, dir: u8) {
    if protocol(sk) != IPPROTO_TCP {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let mut state = FlowState {
        flow_id: next_flow_id(),
        start_ns: now,
        last_report_ns: now,
        direction: dir,
        ..FlowState::default()
    };
    if dir == direction::OUTBOUND {
        take_process(&mut state);
    }
    if FLOWS.insert(sk, state, 0).is_err() {
        count(counter::MAP_FULL);
    }
    // A CLOSED entry left by an earlier socket at this address is harmless: resets are charged
    // to the live flow first, and a reset of this socket after its own close replaces the entry.
}

#[inline(always)]
fn end_flow(sk: u64, oldstate: u8) {
    let Some(state) = FLOWS.get_ptr_mut(sk) else {
        count(counter::UNTRACKED_CLOSE);
        return;
    };
    let state = unsafe { &mut *state };
    // The tuple is read here, once, unless a sweep needed it earlier: by now the kernel has
    // bound the local port, and it clears the addresses only after this state change.
    if state.flags & flow_flag::TUPLE_KNOWN == 0 {
        read_tuple(sk, state);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let flags = emit_snapshot(sk, state, event_kind::END, oldstate, now);
    let flow_id = state.flow_id;
    let _ = FLOWS.remove(sk);
    if flags & flow_flag::MAY_RESET != 0 {
        let _ = CLOSED.insert(sk, flow_id, 0);
    }
}

/// `sk_protocol` of the socket (a bitfield before Linux 5.6, hence the word, shift and mask).
#[inline(always)]
fn protocol(sk: u64) -> u16 {
    let word: u32 = unsafe { read_sock(sk as *const u8, global!(CONFIG.layout.sk_protocol_word)) };
    ((word >> global!(CONFIG.layout.sk_protocol_shift)) & global!(CONFIG.layout.sk_protocol_mask))
        as u16
}

/// Records the task on the CPU as the flow's process. Only called where the kernel runs in the
/// socket owner's context (connect, accept, close, shutdown).
#[inline(always)]
fn take_process(state: &mut FlowState) {
    state.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    state.cgroup_id = unsafe { helper::bpf_get_current_cgroup_id() };
    if let Ok(comm) = bpf_get_current_comm() {
        state.comm = comm;
    }
    state.flags |= flow_flag::PROCESS_KNOWN;
}

/// Reads the 4-tuple and family from the socket. Until the kernel binds the local port
/// (a `connect()` enters `SYN_SENT` before it picks one) the tuple is incomplete, so it is marked
/// known only once the local port is set.
#[inline(always)]
fn read_tuple(sk: u64, state: &mut FlowState) {
    let base = sk as *const u8;
    let block: [u8; tuple_block::SIZE] =
        unsafe { read_sock(base, global!(CONFIG.layout.sk_daddr)) };
    let u16_at = |at: usize| u16::from_ne_bytes([block[at], block[at + 1]]);
    let family = u16_at(tuple_block::FAMILY);
    state.family = family as u8;
    state.local_port =
        u16::from_be(unsafe { read_sock::<u16>(base, global!(CONFIG.layout.inet_sport)) });
    state.remote_port = u16::from_be(u16_at(tuple_block::DPORT));
    if family == AF_INET6 {
        let addrs: [u8; 32] = unsafe { read_sock(base, global!(CONFIG.layout.sk_v6_daddr)) };
        state.remote_addr.copy_from_slice(&addrs[..16]);
        state.local_addr.copy_from_slice(&addrs[16..]);
    } else {
        state.remote_addr = [0; 16];
        state.local_addr = [0; 16];
        state.remote_addr[..4].copy_from_slice(&block[tuple_block::DADDR..tuple_block::DADDR + 4]);
        state.local_addr[..4]
            .copy_from_slice(&block[tuple_block::RCV_SADDR..tuple_block::RCV_SADDR + 4]);
    }
    if state.local_port != 0 {
        state.flags |= flow_flag::TUPLE_KNOWN;
    }
}

/// Writes one snapshot of `state` and of the socket's counters into the ring buffer.
/// `tcp_state` is the state the socket is in (or, for an end, the one it left). Returns the flags
/// it reported.
#[inline(always)]
fn emit_snapshot(sk: u64, state: &FlowState, kind: u8, tcp_state: u8, now: u64) -> u8 {
    let base = sk as *const u8;
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
    let peer_fin = unsafe {
        (read_sock::<u64>(base, global!(CONFIG.layout.sk_flags))
            >> global!(CONFIG.layout.sock_done_bit))
            & 1
            != 0
    };
    if peer_fin {
        flags |= flow_flag::PEER_FIN;
    }
    if kind == event_kind::END && may_reset(tcp_state, peer_fin) {
        flags |= flow_flag::MAY_RESET;
    }
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        count(counter::RINGBUF_FULL);
        return flags;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).flow_id = state.flow_id;
        (*ev).start_ns = state.start_ns;
        (*ev).report_ns = now;
        (*ev).cgroup_id = state.cgroup_id;
        (*ev).bytes_acked = read_sock::<u64>(base, global!(CONFIG.layout.bytes_acked));
        (*ev).bytes_received = read_sock::<u64>(base, global!(CONFIG.layout.bytes_received));
        (*ev).local_addr = state.local_addr;
        (*ev).remote_addr = state.remote_addr;
        (*ev).segs_out = read_sock::<u32>(base, global!(CONFIG.layout.segs_out));
        (*ev).segs_in = read_sock::<u32>(base, global!(CONFIG.layout.segs_in));
        (*ev).total_retrans = read_sock::<u32>(base, global!(CONFIG.layout.total_retrans));
        (*ev).srtt_us = read_sock::<u32>(base, global!(CONFIG.layout.srtt_us)) >> 3;
        (*ev).min_rtt_us = read_sock::<u32>(base, global!(CONFIG.layout.min_rtt_us));
        (*ev).pid = state.pid;
        (*ev).comm = state.comm;
        (*ev).resets_sent = state.resets_sent;
        (*ev).resets_received = state.resets_received;
        (*ev).local_port = state.local_port;
        (*ev).remote_port = state.remote_port;
        (*ev).kind = kind;
        (*ev).family = state.family;
        (*ev).direction = state.direction;
        if flags & flow_flag::FIN_SENT != 0
            && read_sock::<u32>(base, global!(CONFIG.layout.snd_una))
                == read_sock::<u32>(base, global!(CONFIG.layout.write_seq))
        {
            flags |= flow_flag::FIN_ACKED;
        }
        (*ev).flags = flags;
        (*ev).end_state = if kind == event_kind::END {
            tcp_state
        } else {
            0
        };
        (*ev)._pad = [0; 3];
    }
    submit(entry);
    flags
}

/// Whether a close from `oldstate` can be followed by a reset of the same socket: the kernel's
/// `tcp_disconnect` (abortive close, close with unread data) moves to `TCP_CLOSE` first and sends
/// the reset from the states of `tcp_need_reset`. The ordinary ends — `LAST_ACK→CLOSE`, and
/// `FIN_WAIT2→CLOSE` after the peer's FIN (time-wait) — cannot, and are not held.
#[inline(always)]
fn may_reset(oldstate: u8, peer_fin: bool) -> bool {
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
fn emit_reset_after_end(flow_id: u64) {
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        count(counter::RINGBUF_FULL);
        return;
    };
    entry.write(FlowEvent {
        flow_id,
        resets_sent: 1,
        kind: event_kind::RESET_AFTER_END,
        ..FlowEvent::default()
    });
    submit(entry);
}

/// Submits a record, waking user space only when this record takes the ring buffer across the
/// wake-up threshold. Below it, records wait for the agent's periodic drain; above it, the agent
/// has been woken already, and waking it again for every record would only interrupt the CPU.
#[inline(always)]
fn submit(entry: aya_ebpf::maps::ring_buf::RingBufEntry<FlowEvent>) {
    let threshold = global!(CONFIG.wakeup_bytes);
    // Includes this record: reserved space counts as produced.
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA.into());
    let record = (size_of::<FlowEvent>() + 8) as u64;
    let flag = if waiting >= threshold && waiting < threshold + record {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flag.into());
}

/// Reads a `T` at `base + offset` in kernel memory; zero if it cannot be read.
#[inline(always)]
unsafe fn read_sock<T: Default>(base: *const u8, offset: u32) -> T {
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T) }.unwrap_or_default()
}

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
unsafe fn read_field<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    if base.is_null() {
        return Err(-1);
    }
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T) }
}

/// `base + n × stride + cpu` (see `Config::flow_id_base`): distinct for every flow of this run
/// on any CPU, and close to the ids of the flows around it, so that compressed batches of
/// records on Kafka do not pay for 64 random bits per record (twice: key and value).
#[inline(always)]
fn next_flow_id() -> u64 {
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
fn random_flow_id() -> u64 {
    let (hi, lo) = unsafe { (helper::bpf_get_prandom_u32(), helper::bpf_get_prandom_u32()) };
    (u64::from(hi) << 32) | u64::from(lo)
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
