//! flowlog's kernel programs: track every TCP socket of the host from its first state change to
//! `TCP_CLOSE` and emit one [`FlowEvent`] per flow end (and per interim report) through a ring
//! buffer.
//!
//! - `sock:inet_sock_set_state` starts a flow (`CLOSE→SYN_SENT` outbound, `LISTEN→SYN_RECV`
//!   inbound), completes it (`ESTABLISHED`, `FIN_WAIT1`/`LAST_ACK`), and ends it (`→CLOSE`),
//!   reading the socket's counters from `struct tcp_sock` at that moment.
//! - `tcp:tcp_send_reset` / `tcp:tcp_receive_reset` count resets per flow.
//! - `syscalls:sys_exit_accept{,4}` give an inbound flow its owning process (the accepting one).
//! - `flowlog_sweep` is never attached: user space runs it with `BPF_PROG_TEST_RUN` once a second
//!   to emit interim snapshots of long-lived flows (and all open flows at shutdown).
//!
//! No offsets are compiled in: the agent finds them in the running kernel's BTF and tracefs
//! `format` files and overrides the `CONFIG` global at load time.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    Global,
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
    event_kind, flow_flag, stat, tcp_state,
};

/// Layout and settings, overridden by the agent at load time (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(unsafe { core::mem::zeroed() });

/// How to reach the socket behind an accepted file descriptor; zero when the agent found no
/// syscall tracepoints (the accept program is then not attached).
#[unsafe(no_mangle)]
static ACCEPT: Global<AcceptLayout> = Global::new(unsafe { core::mem::zeroed() });

/// Open flows, keyed by the kernel address of their socket. The agent sets its size.
#[map]
static FLOWS: LruHashMap<u64, FlowState> = LruHashMap::with_max_entries(131_072, 0);

/// Flows that reached `TCP_CLOSE` recently (socket address → flow id), so that a reset sent just
/// after the close (the kernel's order for `SO_LINGER` 0) is attributed to its flow.
#[map]
static CLOSED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16_384, 0);

/// Records for user space. The agent sets its size.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Per-CPU counts of data the kernel side lost or skipped (indexes in `flowlog_common::counter`).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Single values reported by the sweep (indexes in `flowlog_common::stat`).
#[map]
static STATS: Array<u64> = Array::with_max_entries(stat::COUNT, 0);

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = on_set_state(&ctx);
    0
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let offset = CONFIG.load().layout.send_reset_skaddr as usize;
    let Ok(sk) = (unsafe { ctx.read_at::<u64>(offset) }) else {
        return 0;
    };
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

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let offset = CONFIG.load().layout.receive_reset_skaddr as usize;
    let Ok(sk) = (unsafe { ctx.read_at::<u64>(offset) }) else {
        return 0;
    };
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
    let l = ACCEPT.load();
    let fd = unsafe { ctx.read_at::<i64>(l.ret as usize)? };
    if fd < 0 {
        return Ok(());
    }
    let task = unsafe { helper::bpf_get_current_task() } as *const u8;
    unsafe {
        let files: *const u8 = read_field(task, l.task_files)?;
        let fdt: *const u8 = read_field(files, l.files_fdt)?;
        let max_fds: u32 = read_field(fdt, l.fdtable_max_fds)?;
        if fd as u64 >= u64::from(max_fds) {
            return Ok(());
        }
        let fds: *const *const u8 = read_field(fdt, l.fdtable_fd)?;
        let file = bpf_probe_read_kernel(fds.add(fd as usize))?;
        let socket: *const u8 = read_field(file, l.file_private_data)?;
        let sk: u64 = read_field(socket, l.socket_sk)?;
        if let Some(state) = FLOWS.get_ptr_mut(sk) {
            let state = &mut *state;
            if state.flags & flow_flag::PROCESS_KNOWN == 0 {
                take_process(state);
            }
        }
    }
    Ok(())
}

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
unsafe fn read_field<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    if base.is_null() {
        return Err(-1);
    }
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T) }
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
        interim_ns: CONFIG.load().interim_ns,
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
        if state.local_port == 0 {
            read_local_from_socket(sk, state);
        }
        emit_snapshot(sk, state, kind, 0, sweep.now);
        state.last_report_ns = sweep.now;
    }
    0
}

#[inline(always)]
fn on_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    let l = CONFIG.load().layout;
    let protocol = if l.state_protocol_size == 1 {
        u16::from(unsafe { ctx.read_at::<u8>(l.state_protocol as usize)? })
    } else {
        unsafe { ctx.read_at::<u16>(l.state_protocol as usize)? }
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let newstate = unsafe { ctx.read_at::<i32>(l.state_newstate as usize)? } as u8;
    let oldstate = unsafe { ctx.read_at::<i32>(l.state_oldstate as usize)? } as u8;
    let sk = unsafe { ctx.read_at::<u64>(l.state_skaddr as usize)? };
    match newstate {
        tcp_state::SYN_SENT => start_flow(ctx, sk, direction::OUTBOUND),
        tcp_state::SYN_RECV if oldstate == tcp_state::LISTEN => {
            start_flow(ctx, sk, direction::INBOUND)
        }
        tcp_state::ESTABLISHED => {
            if let Some(state) = FLOWS.get_ptr_mut(sk) {
                let state = unsafe { &mut *state };
                state.flags |= flow_flag::ESTABLISHED;
                read_tuple(ctx, state)?;
            }
            Ok(())
        }
        // Both come from close()/shutdown() in the socket owner's context: an inbound flow whose
        // accept() was not seen (io_uring, no syscall tracepoints) gets its process here.
        tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK => {
            if let Some(state) = FLOWS.get_ptr_mut(sk) {
                let state = unsafe { &mut *state };
                state.flags |= flow_flag::FIN_SENT;
                if state.flags & flow_flag::PROCESS_KNOWN == 0 {
                    take_process(state);
                }
            }
            Ok(())
        }
        tcp_state::CLOSE if oldstate != tcp_state::LISTEN => end_flow(ctx, sk, oldstate),
        _ => Ok(()),
    }
}

#[inline(always)]
fn start_flow(ctx: &TracePointContext, sk: u64, dir: u8) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let mut state = FlowState {
        flow_id: random_flow_id(),
        start_ns: now,
        last_report_ns: now,
        direction: dir,
        ..FlowState::default()
    };
    if dir == direction::OUTBOUND {
        take_process(&mut state);
    }
    read_tuple(ctx, &mut state)?;
    if FLOWS.insert(sk, state, 0).is_err() {
        count(counter::MAP_FULL);
    }
    let _ = CLOSED.remove(sk);
    Ok(())
}

#[inline(always)]
fn end_flow(ctx: &TracePointContext, sk: u64, oldstate: u8) -> Result<(), i32> {
    let Some(state) = FLOWS.get_ptr_mut(sk) else {
        count(counter::UNTRACKED_CLOSE);
        return Ok(());
    };
    let state = unsafe { &mut *state };
    read_tuple(ctx, state)?;
    let now = unsafe { bpf_ktime_get_ns() };
    emit_snapshot(sk, state, event_kind::END, oldstate, now);
    let flow_id = state.flow_id;
    let _ = FLOWS.remove(sk);
    let _ = CLOSED.insert(sk, flow_id, 0);
    Ok(())
}

/// Records the task on the CPU as the flow's process. Only called where the kernel runs in the
/// socket owner's context (connect, close, shutdown).
#[inline(always)]
fn take_process(state: &mut FlowState) {
    state.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    state.cgroup_id = unsafe { helper::bpf_get_current_cgroup_id() };
    if let Ok(comm) = bpf_get_current_comm() {
        state.comm = comm;
    }
    state.flags |= flow_flag::PROCESS_KNOWN;
}

/// Copies the 4-tuple from the tracepoint record. Ports are 0 until the kernel picks them (the
/// `SYN_SENT` event of a `connect()` comes before the local port is bound), so a tuple without
/// ports never overwrites one with ports.
#[inline(always)]
fn read_tuple(ctx: &TracePointContext, state: &mut FlowState) -> Result<(), i32> {
    let l = CONFIG.load().layout;
    let sport = unsafe { ctx.read_at::<u16>(l.state_sport as usize)? };
    let dport = unsafe { ctx.read_at::<u16>(l.state_dport as usize)? };
    if sport == 0 && state.local_port != 0 {
        return Ok(());
    }
    let family = unsafe { ctx.read_at::<u16>(l.state_family as usize)? };
    state.family = family as u8;
    state.local_port = sport;
    state.remote_port = dport;
    if family == AF_INET6 {
        state.local_addr = unsafe { ctx.read_at::<[u8; 16]>(l.state_saddr_v6 as usize)? };
        state.remote_addr = unsafe { ctx.read_at::<[u8; 16]>(l.state_daddr_v6 as usize)? };
    } else {
        let saddr = unsafe { ctx.read_at::<[u8; 4]>(l.state_saddr as usize)? };
        let daddr = unsafe { ctx.read_at::<[u8; 4]>(l.state_daddr as usize)? };
        state.local_addr = [0; 16];
        state.remote_addr = [0; 16];
        state.local_addr[..4].copy_from_slice(&saddr);
        state.remote_addr[..4].copy_from_slice(&daddr);
    }
    Ok(())
}

/// Fills the local port and address from the socket itself: a connect still in `SYN_SENT` was
/// reported by its tracepoint before the kernel bound them.
#[inline(always)]
fn read_local_from_socket(sk: u64, state: &mut FlowState) {
    let l = CONFIG.load().layout;
    let base = sk as *const u8;
    unsafe {
        state.local_port = read_sock::<u16>(base, l.sk_num);
        if u16::from(state.family) == AF_INET6 {
            state.local_addr = read_sock::<[u8; 16]>(base, l.sk_v6_rcv_saddr);
        } else {
            let v4 = read_sock::<[u8; 4]>(base, l.sk_rcv_saddr);
            state.local_addr[..4].copy_from_slice(&v4);
        }
    }
}

/// Writes one snapshot of `state` and of the socket's counters into the ring buffer.
#[inline(always)]
fn emit_snapshot(sk: u64, state: &FlowState, kind: u8, end_state: u8, now: u64) {
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        count(counter::RINGBUF_FULL);
        return;
    };
    let l = CONFIG.load().layout;
    let base = sk as *const u8;
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).flow_id = state.flow_id;
        (*ev).start_ns = state.start_ns;
        (*ev).report_ns = now;
        (*ev).cgroup_id = state.cgroup_id;
        (*ev).bytes_acked = read_sock::<u64>(base, l.bytes_acked);
        (*ev).bytes_received = read_sock::<u64>(base, l.bytes_received);
        (*ev).local_addr = state.local_addr;
        (*ev).remote_addr = state.remote_addr;
        (*ev).segs_out = read_sock::<u32>(base, l.segs_out);
        (*ev).segs_in = read_sock::<u32>(base, l.segs_in);
        (*ev).total_retrans = read_sock::<u32>(base, l.total_retrans);
        (*ev).srtt_us = read_sock::<u32>(base, l.srtt_us) >> 3;
        (*ev).min_rtt_us = read_sock::<u32>(base, l.min_rtt_us);
        (*ev).pid = state.pid;
        (*ev).comm = state.comm;
        (*ev).resets_sent = state.resets_sent;
        (*ev).resets_received = state.resets_received;
        (*ev).local_port = state.local_port;
        (*ev).remote_port = state.remote_port;
        (*ev).kind = kind;
        (*ev).family = state.family;
        (*ev).direction = state.direction;
        let mut flags = state.flags;
        if flags & flow_flag::FIN_SENT != 0
            && read_sock::<u32>(base, l.snd_una) == read_sock::<u32>(base, l.write_seq)
        {
            flags |= flow_flag::FIN_ACKED;
        }
        if (read_sock::<u64>(base, l.sk_flags) >> l.sock_done_bit) & 1 != 0 {
            flags |= flow_flag::PEER_FIN;
        }
        (*ev).flags = flags;
        (*ev).end_state = end_state;
        (*ev)._pad = [0; 3];
    }
    entry.submit(wakeup_flag());
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
    entry.submit(wakeup_flag());
}

/// Wakes user space only when enough data is waiting; otherwise the agent's periodic drain picks
/// the record up. One wake-up per record would cost the host more CPU than the tracing itself.
#[inline(always)]
fn wakeup_flag() -> u64 {
    let threshold = CONFIG.load().wakeup_bytes;
    if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= threshold {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

#[inline(always)]
unsafe fn read_sock<T: Default>(base: *const u8, offset: u32) -> T {
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T) }.unwrap_or_default()
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
