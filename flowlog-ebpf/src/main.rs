//! flowlog's kernel programs: track every TCP socket of the host from its first state change to
//! `TCP_CLOSE` and emit one [`FlowEvent`] per flow end (and per interim report) through a ring
//! buffer. Flow ends are collected per CPU and enter the ring buffer several at a time
//! ([`Batch`]); `flowlog_flush`, run by the agent on every CPU at each drain, moves the rest.
//!
//! - `sock:inet_sock_set_state` starts a flow (`CLOSE→SYN_SENT` outbound, `LISTEN→SYN_RECV`
//!   inbound), completes it (`ESTABLISHED`, `FIN_WAIT1`/`LAST_ACK`), and ends it (`→CLOSE`),
//!   reading the socket's counters from `struct tcp_sock` at that moment. Two programs implement
//!   it, and the agent attaches one: `inet_sock_set_state_btf`, a BTF-typed raw tracepoint
//!   (`tp_btf`) whose socket is a typed pointer, so every field is one load instruction checked by
//!   the verifier ([`Direct`]); and `inet_sock_set_state`, a plain raw tracepoint that reads
//!   fields with `bpf_probe_read_kernel` ([`ProbeRead`]), for kernels that refuse the first.
//!   Both run the same code ([`on_set_state`]), generic over how fields are read.
//! - `tcp:tcp_send_reset` / `tcp:tcp_receive_reset` (raw) count resets per flow.
//! - `syscalls:sys_exit_accept{,4}` give an inbound flow its owning process (the accepting one);
//!   `accept_exit_btf` walks from the task to the socket with direct loads where it can,
//!   `accept_exit` with probe reads.
//! - `flowlog_sweep` is never attached: user space runs it with `BPF_PROG_TEST_RUN` to emit
//!   interim snapshots of long-lived flows (and of all open flows at shutdown).
//!
//! No offsets are compiled in: the agent finds them in the running kernel's BTF and overrides the
//! `CONFIG` and `ACCEPT` globals at load time (a frozen, read-only map: the verifier sees their
//! values as constants, which is what lets it check the direct loads). The hot path is kept
//! short: state changes that do not concern a tracked flow return after one map lookup, the
//! socket's 4-tuple is read once, and no struct is zeroed or copied by Rust's `memset`/`memmove`
//! (on BPF those are byte-by-byte loops in a subprogram: hundreds of instructions per flow).
#![no_std]
#![no_main]

use core::{
    ffi::c_void,
    mem::{MaybeUninit, offset_of},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, generated as helper,
    },
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use flowlog_common::{
    AF_INET6, AcceptLayout, BATCH_LEN, Batch, Config, FlowEvent, FlowState, IPPROTO_TCP, Reported,
    counter, direction, event_kind, flow_flag, pin_state, stat, tcp_state, tuple_block,
};

mod adopt;

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
    unsafe { read_volatile(field) }
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
/// ([`recover_failed_connect`]), and counts and drops any other (`missed_ends`).
#[repr(C)]
struct Handled {
    sk: u64,
    /// `oldstate << 8 | newstate`.
    states: u64,
}

#[map]
static HANDLED: PerCpuArray<Handled> = PerCpuArray::with_max_entries(1, 0);

/// Single values reported by the sweep (indexes in `flowlog_common::stat`).
#[map]
static STATS: Array<u64> = Array::with_max_entries(stat::COUNT, 0);

/// Records of this CPU not yet in the ring buffer (see [`Batch`]).
#[map]
static BATCH: PerCpuArray<Batch> = PerCpuArray::with_max_entries(1, 0);

/// What an agent taking over the pinned maps checks first (indexes in
/// `flowlog_common::pin_state`): written by the agent that created them, read by the next. No
/// program uses it; the sweep reads one value so that the linker keeps the map in the object.
#[map]
static PIN_STATE: Array<u64> = Array::with_max_entries(pin_state::COUNT, 0);

/// How a program reads the fields of a socket. The flow logic ([`on_set_state`] and what it
/// calls) is generic over it, so the BTF-typed and the plain raw tracepoint run the same code.
trait SockRead: Copy {
    /// A reader for the socket at `sk` if it is a TCP socket (`check_protocol`), or for a socket
    /// already known to be one (`!check_protocol`: found in the flow map).
    fn tcp(sk: u64, check_protocol: bool) -> Option<Self>;
    /// Reads a `T` (an integer) at `offset` bytes from the socket; zero if it cannot be read.
    fn read<T: Copy + Default>(self, offset: u32) -> T;
    /// Reads the 4-tuple block of `struct sock_common` ([`tuple_block`]): the IPv4 addresses
    /// (remote, local) as one word, the remote port (network order) and the family.
    fn tuple(self) -> (u64, u16, u16);
    /// Reads the IPv6 remote and local addresses (`skc_v6_daddr`, `skc_v6_rcv_saddr`).
    fn v6_addrs(self) -> [u64; 4];
}

/// Reads with `bpf_probe_read_kernel`: allowed in every program type, one helper call (a
/// fault-safe copy with its checks) per read, so contiguous fields are read together.
#[derive(Clone, Copy)]
struct ProbeRead(*const u8);

impl SockRead for ProbeRead {
    #[inline(always)]
    fn tcp(sk: u64, check_protocol: bool) -> Option<Self> {
        let sock = ProbeRead(sk as *const u8);
        if check_protocol {
            // `sk_protocol` (a bitfield before Linux 5.6, hence the word, shift and mask).
            let word: u32 = sock.read(global!(CONFIG.layout.sk_protocol_word));
            let protocol = (word >> global!(CONFIG.layout.sk_protocol_shift))
                & global!(CONFIG.layout.sk_protocol_mask);
            if protocol != u32::from(IPPROTO_TCP) {
                return None;
            }
        }
        Some(sock)
    }

    #[inline(always)]
    fn read<T: Copy + Default>(self, offset: u32) -> T {
        // SAFETY: the helper checks the address; a failed read leaves the default.
        unsafe { bpf_probe_read_kernel(self.0.add(offset as usize) as *const T) }
            .unwrap_or_default()
    }

    #[inline(always)]
    fn tuple(self) -> (u64, u16, u16) {
        // One read for the whole block instead of three.
        let block: [u64; 3] = self.words(global!(CONFIG.layout.sk_daddr));
        let dport = (block[tuple_block::DPORT / 8] >> ((tuple_block::DPORT % 8) * 8)) as u16;
        let family = (block[tuple_block::FAMILY / 8] >> ((tuple_block::FAMILY % 8) * 8)) as u16;
        (block[0], dport, family)
    }

    #[inline(always)]
    fn v6_addrs(self) -> [u64; 4] {
        self.words(global!(CONFIG.layout.sk_v6_daddr))
    }
}

impl ProbeRead {
    /// `N` words at `offset` in one helper call; zeros if it fails.
    #[inline(always)]
    fn words<const N: usize>(self, offset: u32) -> [u64; N] {
        let mut out = MaybeUninit::<[u64; N]>::uninit();
        let dst = out.as_mut_ptr() as *mut u64;
        let ret = unsafe {
            helper::bpf_probe_read_kernel(
                dst as *mut c_void,
                (N * 8) as u32,
                self.0.add(offset as usize) as *const c_void,
            )
        };
        if ret != 0 {
            for i in 0..N {
                unsafe { write_volatile(dst.add(i), 0) };
            }
        }
        // SAFETY: written by the helper, or zeroed above.
        unsafe { out.assume_init() }
    }
}

/// Direct loads through the `struct tcp_sock` pointer that `bpf_skc_to_tcp_sock` returns in a
/// BTF-typed program. The verifier checks each load against the kernel's BTF (the offset must
/// be a constant: it comes from the frozen `CONFIG`), and the JIT turns it into one load
/// instruction guarded by an exception-table entry: a few cycles, where a probe read is a
/// helper call costing tens of nanoseconds. Volatile loads, so that the compiler neither merges
/// neighbouring fields into one wider load (the verifier refuses a load that crosses a member)
/// nor splits them.
#[derive(Clone, Copy)]
struct Direct(*const u8);

impl SockRead for Direct {
    #[inline(always)]
    fn tcp(sk: u64, _check_protocol: bool) -> Option<Self> {
        // Always checked: the verifier only lets `tcp_sock` fields be read through the pointer
        // this returns (NULL unless a full socket with `sk_protocol == IPPROTO_TCP`).
        let tp = unsafe { helper::bpf_skc_to_tcp_sock(sk as *mut c_void) };
        if tp.is_null() {
            None
        } else {
            Some(Direct(tp as *const u8))
        }
    }

    #[inline(always)]
    fn read<T: Copy + Default>(self, offset: u32) -> T {
        // SAFETY: a checked load (see the type's documentation).
        unsafe { read_volatile(self.0.add(offset as usize) as *const T) }
    }

    #[inline(always)]
    fn tuple(self) -> (u64, u16, u16) {
        let daddr = global!(CONFIG.layout.sk_daddr);
        (
            // `skc_addrpair`: both IPv4 addresses as one member.
            self.read::<u64>(daddr),
            self.read::<u16>(daddr + tuple_block::DPORT as u32),
            self.read::<u16>(daddr + tuple_block::FAMILY as u32),
        )
    }

    #[inline(always)]
    fn v6_addrs(self) -> [u64; 4] {
        let at = global!(CONFIG.layout.sk_v6_daddr);
        [
            self.read(at),
            self.read(at + 8),
            self.read(at + 16),
            self.read(at + 24),
        ]
    }
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let sk: u64 = ctx.arg(0);
    let (old, new) = (ctx.arg::<u64>(1) as u8, ctx.arg::<u64>(2) as u8);
    handle_set_state::<ProbeRead>(sk, old, new);
    0
}

/// Attached after [`inet_sock_set_state`]: handles the state changes the kernel did not hand to
/// it (see [`HANDLED`]).
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
/// hand to it (see [`HANDLED`]).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf_catch(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let (old, new) = (ctx.arg::<u64>(1) as u8, ctx.arg::<u64>(2) as u8);
    catch_set_state::<Direct>(sk, old, new);
    0
}

/// The main state-change programs' work: the change, then its mark (see [`HANDLED`]).
#[inline(always)]
fn handle_set_state<S: SockRead>(sk: u64, oldstate: u8, newstate: u8) {
    on_set_state::<S>(sk, oldstate, newstate);
    mark_handled(sk, oldstate, newstate);
}

/// The catching programs' work: a change the main program did not mark as finished on this CPU.
#[inline(always)]
fn catch_set_state<S: SockRead>(sk: u64, oldstate: u8, newstate: u8) {
    if !was_handled(sk, oldstate, newstate) && on_set_state::<S>(sk, oldstate, newstate) {
        count(counter::CAUGHT_END, 1);
    }
}

/// Whether [`on_set_state`] has anything to do for this change; the others are not marked
/// handled nor caught.
#[inline(always)]
fn needs_work(oldstate: u8, newstate: u8) -> bool {
    !matches!(classify(oldstate, newstate), Change::Nothing)
}

/// Records, on this CPU, that the main state-change program has finished with this change.
#[inline(always)]
fn mark_handled(sk: u64, oldstate: u8, newstate: u8) {
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
fn was_handled(sk: u64, oldstate: u8, newstate: u8) -> bool {
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
fn on_set_state<S: SockRead>(sk: u64, oldstate: u8, newstate: u8) -> bool {
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
enum Change {
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
fn classify(oldstate: u8, newstate: u8) -> Change {
    match newstate {
        tcp_state::SYN_SENT => Change::Start(direction::OUTBOUND),
        tcp_state::SYN_RECV if oldstate == tcp_state::LISTEN => Change::Start(direction::INBOUND),
        tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK => Change::Closing,
        tcp_state::CLOSE if oldstate != tcp_state::LISTEN => Change::End,
        _ => Change::Nothing,
    }
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
    let _ = on_accept_exit::<false>(&ctx);
    0
}

/// The same, walking from the task to its descriptor table with direct loads through the typed
/// task pointer of `bpf_get_current_task_btf` (four fewer probe reads); the agent falls back to
/// [`accept_exit`] where the kernel refuses it.
#[tracepoint]
pub fn accept_exit_btf(ctx: TracePointContext) -> u32 {
    let _ = on_accept_exit::<true>(&ctx);
    0
}

#[inline(always)]
fn on_accept_exit<const DIRECT: bool>(ctx: &TracePointContext) -> Result<(), i32> {
    let fd = unsafe { ctx.read_at::<i64>(global!(ACCEPT.ret) as usize)? };
    if fd < 0 {
        return Ok(());
    }
    unsafe {
        let (max_fds, fds) = if DIRECT {
            // task_struct → files_struct → fdtable are typed pointers: checked loads. The
            // descriptor array (`struct file **`) is not, so the rest are probe reads.
            let task = Direct(helper::bpf_get_current_task_btf() as *const u8);
            let files = Direct(task.read::<u64>(global!(ACCEPT.task_files)) as *const u8);
            let fdt = Direct(files.read::<u64>(global!(ACCEPT.files_fdt)) as *const u8);
            (
                fdt.read::<u32>(global!(ACCEPT.fdtable_max_fds)),
                fdt.read::<u64>(global!(ACCEPT.fdtable_fd)) as *const *const u8,
            )
        } else {
            let task = helper::bpf_get_current_task() as *const u8;
            let files: *const u8 = read_field(task, global!(ACCEPT.task_files))?;
            let fdt: *const u8 = read_field(files, global!(ACCEPT.files_fdt))?;
            let max_fds: u32 = read_field(fdt, global!(ACCEPT.fdtable_max_fds))?;
            let fds: *const *const u8 = read_field(fdt, global!(ACCEPT.fdtable_fd))?;
            (max_fds, fds)
        };
        if fd as u64 >= u64::from(max_fds) || fds.is_null() {
            return Ok(());
        }
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
    // (and the state is stored only after the programs have run). Seen so, its end never reached
    // them (see `HANDLED`), or its memory now holds a new socket. A failed connect's end is
    // written from the socket as it is (`recover_failed_connect`); any other is dropped without
    // a record and counted. Checked for every flow at every sweep, so such a flow is dealt with
    // within a sweep period, not only once it is due for an interim record. A flow younger than
    // a second may be a socket whose state is stored just after its start was recorded.
    if !tracked_state(tcp_state) && sweep.now.saturating_sub(state.start_ns) >= 1_000_000_000 {
        let recovered =
            tcp_state == tcp_state::CLOSE && recover_failed_connect(sock, state, sweep.now);
        if FLOWS.remove(unsafe { *key }).is_ok() {
            count(
                if recovered {
                    counter::RECOVERED_END
                } else {
                    counter::MISSED_END
                },
                1,
            );
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

/// Writes the end record of an outbound flow whose socket closed unseen before the handshake
/// completed (`bytes_acked` counts the SYN once acknowledged: 0 means it never was), so that a
/// failed connect is reported even when its end never reached the programs. Such a flow has no
/// payload and its counters are final, so the record is exact but for `end_ns` (the sweep's
/// time, at most a sweep period late). Only if the socket still holds the flow's ports: memory
/// re-used for a socket not yet bound reads 0, and one that connected would have replaced the
/// flow at its start. Returns whether it wrote the record.
#[inline(always)]
fn recover_failed_connect(sock: ProbeRead, state: &mut FlowState, now: u64) -> bool {
    if state.direction != direction::OUTBOUND
        || sock.read::<u64>(global!(CONFIG.layout.bytes_acked)) != 0
    {
        return false;
    }
    let known = state.flags & flow_flag::TUPLE_KNOWN != 0;
    let (local_port, remote_port) = (state.local_port, state.remote_port);
    read_tuple(sock, state);
    let same = if known {
        state.local_port == local_port && state.remote_port == remote_port
    } else {
        state.local_port != 0 && state.remote_port != 0
    };
    if !same {
        return false;
    }
    emit_snapshot(
        sock,
        state,
        event_kind::END,
        tcp_state::SYN_SENT,
        now,
        Emit::Direct,
    );
    true
}

/// Whether a socket in `tcp_state` can be a tracked flow: any state between its start and its
/// close (not `TCP_CLOSE`, `TCP_LISTEN`, nor the request and inactive states above them).
#[inline(always)]
fn tracked_state(tcp_state: u8) -> bool {
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
fn start_flow<S: SockRead>(sk: u64, dir: u8) {
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
fn end_flow<S: SockRead>(sk: u64, oldstate: u8) -> bool {
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
fn take_process(state: &mut FlowState) {
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
fn read_tuple<S: SockRead>(sock: S, state: &mut FlowState) {
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

/// Where a record goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Emit {
    /// Into this CPU's [`Batch`] (flow ends).
    Batched,
    /// Into the ring buffer at once (the sweep's records).
    Direct,
}

/// Writes one snapshot of `state` and of the socket's counters, into this CPU's batch or the ring
/// buffer. `tcp_state` is the state the socket is in (or, for an end, the one it left). Returns
/// the flags it reported.
#[inline(always)]
fn emit_snapshot<S: SockRead>(
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

/// Remembers the snapshot at `ev` as the flow's last record ([`FlowState::prev`]).
#[inline(always)]
unsafe fn set_reported(state: &mut FlowState, ev: *const FlowEvent, flags: u8) {
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
unsafe fn write_event<S: SockRead>(
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
unsafe fn output_batch(batch: *mut Batch, len: u64) {
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
fn submit(entry: aya_ebpf::maps::ring_buf::RingBufEntry<FlowEvent>) {
    // Includes this record: reserved space counts as produced.
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA.into());
    entry.submit(wakeup_flag(waiting, (size_of::<FlowEvent>() + 8) as u64));
}

/// `BPF_RB_FORCE_WAKEUP` if the record of `added` bytes (header included) that brings the data
/// waiting in the ring buffer to `waiting` takes it across the wake-up threshold, else
/// `BPF_RB_NO_WAKEUP`.
#[inline(always)]
fn wakeup_flag(waiting: u64, added: u64) -> u64 {
    let threshold = global!(CONFIG.wakeup_bytes);
    if waiting >= threshold && waiting < threshold + added {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

/// Zeroes a `T` in 8-byte stores. Volatile, so that LLVM does not merge them back into a
/// `memset` call (a byte loop on BPF).
#[inline(always)]
unsafe fn zero_words<T>(p: *mut T) {
    let words = p as *mut u64;
    for i in 0..size_of::<T>() / 8 {
        unsafe { write_volatile(words.add(i), 0) };
    }
}

/// Copies a 16-byte array (address, command name) as two 8-byte words; a plain assignment
/// compiles to a byte-by-byte `memmove` subprogram. Both sides must be 8-byte aligned (checked
/// for the fields it is used on, below).
#[inline(always)]
unsafe fn copy16(dst: *mut [u8; 16], src: *const [u8; 16]) {
    let (dst, src) = (dst as *mut u64, src as *const u64);
    unsafe {
        write_volatile(dst, read_volatile(src));
        write_volatile(dst.add(1), read_volatile(src.add(1)));
    }
}

/// Copies a `T` in 8-byte words (see [`copy16`]); both sides 8-byte aligned.
#[inline(always)]
unsafe fn copy_words<T>(dst: *mut T, src: *const T) {
    let (dst, src) = (dst as *mut u64, src as *const u64);
    for i in 0..size_of::<T>() / 8 {
        unsafe { write_volatile(dst.add(i), read_volatile(src.add(i))) };
    }
}

/// Zeroes a 16-byte array (see [`copy16`]).
#[inline(always)]
unsafe fn zero16(dst: *mut [u8; 16]) {
    let dst = dst as *mut u64;
    unsafe {
        write_volatile(dst, 0);
        write_volatile(dst.add(1), 0);
    }
}

const _: () = {
    assert!(size_of::<FlowState>().is_multiple_of(8) && align_of::<FlowState>() == 8);
    assert!(size_of::<FlowEvent>().is_multiple_of(8) && align_of::<FlowEvent>() == 8);
    assert!(offset_of!(FlowState, local_addr).is_multiple_of(8));
    assert!(offset_of!(FlowState, remote_addr).is_multiple_of(8));
    assert!(offset_of!(FlowState, comm).is_multiple_of(8));
    assert!(offset_of!(FlowEvent, local_addr).is_multiple_of(8));
    assert!(offset_of!(FlowEvent, remote_addr).is_multiple_of(8));
    assert!(offset_of!(FlowEvent, comm).is_multiple_of(8));
    assert!(offset_of!(FlowState, prev).is_multiple_of(8));
    assert!(offset_of!(FlowEvent, prev).is_multiple_of(8));
    assert!(size_of::<Reported>().is_multiple_of(8));
};

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
fn count(index: u32, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        unsafe { *slot += n };
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
