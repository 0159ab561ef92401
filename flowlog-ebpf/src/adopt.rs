//! Adoption: the connections that were open before the programs were attached. No state change
//! of theirs started a flow, so the flow map does not know them and their end would only be
//! counted as an untracked close. At start the agent runs [`flowlog_adopt`], an `iter/task_file`
//! iterator, over every open file of every task: a file that is a TCP socket in a tracked state
//! and unknown to the flow map becomes a flow marked [`flow_flag::ADOPTED`], and from then on
//! its records, interim and end, are written as any flow's.
//!
//! Walking the tasks' files rather than the TCP hash tables (`iter/tcp`) reaches every network
//! namespace at once (a `iter/tcp` iterator sees only the namespace of the task that creates it,
//! and entering another one needs `CAP_SYS_ADMIN`, which the agent does not have) and gives each
//! socket its owning process. What it cannot reach: sockets no file holds (closed by their
//! process and finishing their FIN exchange, or the kernel's own, such as NFS mounts).
//!
//! The socket does not record which side opened it. Two passes ([`adopt_pass`]) settle it as
//! `ss` users do: the first records every listening socket's namespace and port, the second
//! calls a connection inbound when its local port has a listener in its namespace.
//!
//! What the flow gets: its start is the adoption time (its true start is not in the socket);
//! `prev` is zero, so its first record counts everything the socket carried since it was opened
//! (the kernel's counters are totals); `pid`, `comm` and `cgroup_id` of the first task found
//! holding it.

use core::{
    ffi::c_void,
    mem::MaybeUninit,
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, generated as helper},
    macros::map,
    maps::{Array, HashMap},
};
use flowlog_common::{
    AF_INET, AF_INET6, AdoptLayout, FlowState, ListenerKey, adopt_pass, counter, direction,
    flow_flag, tcp_state, tuple_block,
};

use crate::{
    CONFIG,
    lifecycle::{next_flow_id, read_tuple, tracked_state},
    maps::{FLOWS, count},
    mem::{zero_words, zero16},
    sock::{Direct, ProbeRead, SockRead},
};

/// What [`flowlog_adopt`] reads besides the socket; overridden by the agent at load time.
#[unsafe(no_mangle)]
static ADOPT: AdoptLayout = unsafe { core::mem::zeroed() };

/// Which pass the next run of the iterator makes (`ADOPT_PASS[0]`, an [`adopt_pass`] value), set
/// by the agent before it creates the iterator.
#[map]
static ADOPT_PASS: Array<u64> = Array::with_max_entries(1, 0);

/// What a map insert with `BPF_NOEXIST` returns for a key already there (`-EEXIST`).
const EEXIST: i32 = -17;

/// `SOCK_STREAM`: the type of a TCP socket.
const SOCK_STREAM: u16 = 1;

/// Listening sockets found by the first pass: (network namespace, port).
#[map]
static LISTENERS: HashMap<ListenerKey, u8> = HashMap::with_max_entries(16_384, 0);

/// `struct bpf_iter__task_file`, the iterator's context: each pointer is 8-byte aligned.
#[repr(C)]
struct TaskFileContext {
    _meta: u64,
    task: u64,
    _fd: u64,
    file: u64,
}

/// Run by the agent at start, once per [`adopt_pass`]; writes nothing to its output.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn flowlog_adopt(ctx: *mut c_void) -> i32 {
    let ctx = ctx as *const TaskFileContext;
    // Typed pointers (NULL at the end of the walk): the verifier knows `file` is a `struct file`.
    let (task, file) = unsafe {
        (
            read_volatile(&raw const (*ctx).task),
            read_volatile(&raw const (*ctx).file),
        )
    };
    if task == 0 || file == 0 {
        return 0;
    }
    let socket = unsafe { helper::bpf_sock_from_file(file as *mut _) };
    if socket.is_null() {
        return 0;
    }
    // `socket->sk` loaded through the helper's pointer is untrusted for the verifier, which
    // then refuses it to `bpf_skc_to_tcp_sock`: the socket is read with probe reads, after
    // checking what the typed `struct socket` says (a stream socket) and, through the probe
    // reads, that it is TCP over IPv4 or IPv6 (not MPTCP, SMC, UDP or raw).
    let socket = Direct(socket as *const u8);
    if socket.read::<u16>(global!(ADOPT.socket_type)) != SOCK_STREAM {
        return 0;
    }
    let sk: u64 = socket.read(global!(ADOPT.socket_sk));
    let Some(sock) = ProbeRead::tcp(sk, true) else {
        return 0;
    };
    let (_, _, family) = sock.tuple();
    if family != AF_INET && family != AF_INET6 {
        return 0;
    }
    let state: u8 = sock.read(global!(CONFIG.layout.sk_daddr) + tuple_block::STATE as u32);
    let net: u64 = sock.read(global!(ADOPT.sk_net));
    let pass = ADOPT_PASS.get(0).copied().unwrap_or(0);
    if pass == adopt_pass::LISTENERS {
        if state == tcp_state::LISTEN {
            let port = u16::from_be(sock.read::<u16>(global!(CONFIG.layout.inet_sport)));
            let key = ListenerKey {
                net,
                port: u64::from(port),
            };
            let _ = LISTENERS.insert(key, 1, 0);
        }
        return 0;
    }
    if pass != adopt_pass::ADOPT || !tracked_state(state) || FLOWS.get_ptr(sk).is_some() {
        return 0;
    }
    adopt(sk, sock, state, net, task);
    0
}

/// Starts tracking the connection of socket `sk` as an adopted flow.
#[inline(always)]
fn adopt(sk: u64, sock: ProbeRead, state: u8, net: u64, task: u64) {
    let now = unsafe { bpf_ktime_get_ns() };
    let mut slot = MaybeUninit::<FlowState>::uninit();
    let flow = unsafe {
        zero_words(slot.as_mut_ptr());
        slot.assume_init_mut()
    };
    read_tuple(sock, flow);
    let key = ListenerKey {
        net,
        port: u64::from(flow.local_port),
    };
    // A connect still in progress is outbound; otherwise a listener on the local port says
    // the connection was accepted.
    flow.direction = if state != tcp_state::SYN_SENT && unsafe { LISTENERS.get(key) }.is_some() {
        direction::INBOUND
    } else {
        direction::OUTBOUND
    };
    flow.flow_id = next_flow_id();
    flow.start_ns = now;
    flow.last_report_ns = now;
    take_task(flow, task as *const u8);
    flow.flags |= flow_flag::ADOPTED;
    let value = unsafe { slot.assume_init_ref() };
    // Not over an entry a state change made meanwhile (the socket's start or a new socket at
    // the same address after a close): that one is the truth.
    match FLOWS.insert(sk, value, BPF_NOEXIST.into()) {
        Ok(()) => count(counter::ADOPTED, 1),
        Err(EEXIST) => {}
        Err(_) => count(counter::MAP_FULL, 1),
    }
}

/// Records the task that holds the socket as the flow's process: its process id, name and
/// cgroup v2 id, read with probe reads (a one-off at start; every step may fail and leaves 0).
#[inline(always)]
fn take_task(flow: &mut FlowState, task: *const u8) {
    unsafe {
        flow.pid = read_at::<u32>(task, global!(ADOPT.task_tgid));
        let comm = &raw mut flow.comm;
        if helper::bpf_probe_read_kernel(
            comm as *mut c_void,
            16,
            task.add(global!(ADOPT.task_comm) as usize) as *const c_void,
        ) != 0
        {
            zero16(comm);
        }
        let css_set = read_at::<u64>(task, global!(ADOPT.task_cgroups)) as *const u8;
        let cgroup = read_at::<u64>(css_set, global!(ADOPT.css_set_dfl_cgrp)) as *const u8;
        let kn = read_at::<u64>(cgroup, global!(ADOPT.cgroup_kn)) as *const u8;
        let id = read_at::<u64>(kn, global!(ADOPT.kernfs_node_id));
        write_volatile(&raw mut flow.cgroup_id, id);
    }
    flow.flags |= flow_flag::PROCESS_KNOWN;
}

/// A `T` at `base + offset` in kernel memory; zero if `base` is NULL or the read fails.
#[inline(always)]
unsafe fn read_at<T: Copy + Default>(base: *const u8, offset: u32) -> T {
    if base.is_null() {
        return T::default();
    }
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T) }.unwrap_or_default()
}
