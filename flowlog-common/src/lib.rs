//! Memory layouts shared by flowlog's kernel programs (`flowlog-ebpf`) and its agent
//! (`flowlog-sidecar`).
//!
//! Everything here is `#[repr(C)]` with explicit padding: the kernel writes these bytes and user
//! space reads them back, so both sides must agree on every offset. Keep the types small; the
//! ring buffer carries one [`FlowEvent`] per flow end and per interim report.
#![no_std]

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
}

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u16 = 6;

/// Which side opened the connection.
pub mod direction {
    /// This host sent the SYN (`connect()`).
    pub const OUTBOUND: u8 = 1;
    /// This host accepted the SYN (a listening socket's child).
    pub const INBOUND: u8 = 2;
}

/// What a [`FlowEvent`] reports.
pub mod event_kind {
    /// The socket reached `TCP_CLOSE`: counters are final.
    pub const END: u8 = 1;
    /// Periodic report of a flow that is still open; counters are cumulative.
    pub const INTERIM: u8 = 2;
    /// Report of a flow still open when the agent stops (flush on shutdown).
    pub const FLUSH: u8 = 3;
    /// A reset sent on a socket after it reached `TCP_CLOSE` (`SO_LINGER` 0, close with unread
    /// data): the kernel moves to `TCP_CLOSE` *before* it sends that RST, so the reset amends the
    /// `END` event of the same `flow_id`. Only `flow_id` and `resets_sent` are meaningful.
    pub const RESET_AFTER_END: u8 = 4;
}

/// Bits of [`FlowEvent::flags`] and [`FlowState::flags`].
pub mod flow_flag {
    /// The handshake completed (the snapshot's state is past `SYN_SENT`/`SYN_RECV`).
    pub const ESTABLISHED: u8 = 1 << 0;
    /// This side queued its FIN (the snapshot's state is one that follows it). Also kept in a
    /// flow's state from its `FIN_WAIT1`/`LAST_ACK` change on, so that an end written without
    /// the state it left (at the socket's destruction, by the sweep) still knows it.
    pub const FIN_SENT: u8 = 1 << 1;
    /// This side's FIN was acknowledged (`snd_una == write_seq` after a FIN was queued).
    pub const FIN_ACKED: u8 = 1 << 2;
    /// The peer's FIN was received in order (`SOCK_DONE` in `sk_flags`).
    pub const PEER_FIN: u8 = 1 << 3;
    /// `pid`, `comm` and `cgroup_id` were taken in the context of the socket's process.
    pub const PROCESS_KNOWN: u8 = 1 << 4;
    /// The 4-tuple was read from the socket once its ports were bound.
    pub const TUPLE_KNOWN: u8 = 1 << 5;
    /// The close may be followed by a reset of this socket (`tcp_disconnect` sends it after the
    /// move to `TCP_CLOSE`): the agent holds the end record briefly to fold that reset in.
    pub const MAY_RESET: u8 = 1 << 6;
    /// The connection was open before the programs were attached and was adopted at the agent's
    /// start (`flowlog_adopt`): its start time is the adoption time, and its first record counts
    /// everything the socket carried since it was opened.
    pub const ADOPTED: u8 = 1 << 7;
}

/// Indexes of the per-CPU `COUNTERS` array: places where the kernel side loses or skips data.
pub mod counter {
    /// A record could not be reserved in the ring buffer (user space too slow): lost.
    pub const RINGBUF_FULL: u32 = 0;
    /// A new socket could not be inserted in the flow map: its flow is not tracked.
    pub const MAP_FULL: u32 = 1;
    /// A socket closed that the flow map did not know (opened before the agent started, evicted
    /// from the LRU map, or its start missed and not taken late): no record.
    pub const UNTRACKED_CLOSE: u32 = 2;
    /// The sweep found a tracked flow whose socket was re-used for another socket, or was
    /// destroyed with its end unseen: removed from the map without an end record.
    pub const MISSED_END: u32 = 3;
    /// Flow ends written when the socket was destroyed (`tcp:tcp_destroy_sock`) because the
    /// kernel did not run the state-change program for its close (a softirq interrupting that
    /// program on its CPU): their `end_ns` is the destruction's time.
    pub const CAUGHT_END: u32 = 4;
    /// Flow ends the sweep wrote for a socket it found closed with its end unseen and not yet
    /// destroyed (its process still holds it): `end_ns` is the sweep's time.
    pub const RECOVERED_END: u32 = 5;
    /// Connections open before the programs were attached that the adoption at start began to
    /// track (`flowlog_adopt`).
    pub const ADOPTED: u32 = 6;
    /// Inbound flows whose start the kernel did not hand to the state-change program (a softirq
    /// interrupting it), started when their process accepted them instead: `start_ns` is the
    /// accept's time.
    pub const LATE_START: u32 = 7;
    /// Number of counters.
    pub const COUNT: u32 = 8;
}

/// Indexes of the `PIN_STATE` array: what an agent that takes over pinned kernel state (see
/// `flowlog-sidecar/src/pins.rs`) must know before it reuses the pinned maps. Written by the
/// agent that created them, never by the programs. Index 0 and 1 keep their meaning in every
/// layout, so that any later agent can at least read what it is looking at.
pub mod pin_state {
    /// [`super::PIN_LAYOUT_ID`] of the agent that created the maps.
    pub const LAYOUT_ID: u32 = 0;
    /// `Config::flow_id_base` of the flows in the maps: a later agent hands out ids from the
    /// same base, and the pinned per-CPU counters continue, so no id is ever handed out twice.
    pub const FLOW_ID_BASE: u32 = 1;
    /// Capacity of the pinned flow map (`--max-flows`).
    pub const MAX_FLOWS: u32 = 2;
    /// Size of the pinned ring buffer (`--ring-buffer-bytes`).
    pub const RING_BYTES: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Version of everything an agent shares with the kernel programs it leaves running behind it:
/// the maps that are pinned, their keys and values ([`FlowState`], [`FlowEvent`], [`Batch`], the
/// per-CPU flow-id counter, the counter and `PIN_STATE` indexes) and what their fields mean.
/// **Bump it on any change to them**: an agent finding pins of another version does not reuse
/// them (it removes them and starts afresh, and says so).
pub const PIN_LAYOUT_VERSION: u64 = 3;

/// [`PIN_LAYOUT_VERSION`] with the sizes of the shared types mixed in, so that a layout change
/// that forgot the bump still changes the id when a size changes.
pub const PIN_LAYOUT_ID: u64 = (PIN_LAYOUT_VERSION << 48)
    ^ ((core::mem::size_of::<FlowState>() as u64) << 32)
    ^ ((core::mem::size_of::<FlowEvent>() as u64) << 16)
    ^ ((core::mem::size_of::<Batch>() as u64) << 4)
    ^ (counter::COUNT as u64);

/// Indexes of the `STATS` array (single values written by the sweep program).
pub mod stat {
    /// Sockets in the flow map at the last sweep.
    pub const TRACKED: u32 = 0;
    /// `PIN_STATE[LAYOUT_ID]` as the sweep read it: the layout of the maps the programs use.
    pub const PIN_LAYOUT_ID: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Offsets of everything the programs read from the running kernel, found at start-up from its
/// BTF and handed to the programs as a read-only global. Offsets are in bytes from the socket
/// address the tracepoints pass (`struct tcp_sock` begins with `struct sock`, which begins with
/// `struct sock_common`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `skc_daddr`: start of the block read at once for the IPv4 addresses, remote port and
    /// family. The agent checks that `skc_rcv_saddr`, `skc_dport` and `skc_family` follow at the
    /// offsets in [`tuple_block`].
    pub sk_daddr: u32,
    /// `skc_v6_daddr`; `skc_v6_rcv_saddr` follows it (checked by the agent).
    pub sk_v6_daddr: u32,
    /// `inet_sock.inet_sport` (network order): the local port. `skc_num` is not enough: the
    /// kernel releases an ephemeral port (zeroing `skc_num`) before it reports `TCP_CLOSE`.
    pub inet_sport: u32,
    /// The 32-bit word that holds `sk_protocol`, and where in it (it was a bitfield before 5.6).
    pub sk_protocol_word: u32,
    pub sk_protocol_shift: u32,
    pub sk_protocol_mask: u32,
    /// `sk_flags` (`__sk_common.skc_flags` since 6.x).
    pub sk_flags: u32,
    /// Bit number of `SOCK_DONE` in `sk_flags` (set when the peer's FIN is processed).
    pub sock_done_bit: u32,
    // struct tcp_sock
    pub bytes_acked: u32,
    pub bytes_received: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    pub total_retrans: u32,
    /// `srtt_us` holds the smoothed RTT in µs shifted left by 3.
    pub srtt_us: u32,
    /// `rtt_min.s[0].v`: the windowed minimum RTT in µs.
    pub min_rtt_us: u32,
    pub snd_una: u32,
    pub write_seq: u32,
    pub _pad: u32,
}

/// Layout of the block of `struct sock_common` that starts at `skc_daddr`, the same on every
/// kernel since 2.6 (the agent checks it against BTF at start-up).
pub mod tuple_block {
    pub const DADDR: usize = 0;
    pub const RCV_SADDR: usize = 4;
    pub const DPORT: usize = 12;
    pub const FAMILY: usize = 16;
    /// `skc_state` (one byte).
    pub const STATE: usize = 18;
    /// Bytes read at once.
    pub const SIZE: usize = 20;
}

/// Where to find the socket behind a file descriptor returned by `accept()`: the
/// `syscalls:sys_exit_accept{,4}` record's return value, then `task_struct.files → fdt → fd[ret]
/// → file.private_data (struct socket) → sk`. It gives inbound flows their owning process at
/// accept time; without it (kernels without syscall tracepoints) they get it at close.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcceptLayout {
    pub ret: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub _pad: u32,
}

/// What the adoption program (`flowlog_adopt`, an `iter/task_file` iterator run once at start)
/// reads besides the socket: the socket behind a file, the network namespace a listener is in,
/// and the owning task's process id, name and cgroup (`task_struct.cgroups → css_set.dfl_cgrp →
/// cgroup.kn → kernfs_node.id`, the cgroup v2 id `bpf_get_current_cgroup_id` returns). All zero
/// when the kernel's BTF lacks one of them: the agent then does not adopt.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdoptLayout {
    /// `struct socket.sk`.
    pub socket_sk: u32,
    /// `struct socket.type` (`SOCK_STREAM` for TCP).
    pub socket_type: u32,
    /// `sock_common.skc_net` (its `struct net *`), from the socket address.
    pub sk_net: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    pub _pad: u32,
}

/// Passes of the adoption iterator over every task's open files (`ADOPT_PASS[0]`): listening
/// sockets first, so that the second pass can tell an accepted connection (its local port has a
/// listener in its network namespace: inbound) from one this host opened (outbound).
pub mod adopt_pass {
    /// Record every listening socket's network namespace and port.
    pub const LISTENERS: u64 = 1;
    /// Start tracking every connection the flow map does not know.
    pub const ADOPT: u64 = 2;
}

/// Key of the adoption's listener map: a network namespace (the kernel address of its `struct
/// net`) and a local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerKey {
    pub net: u64,
    pub port: u64,
}

/// Flow ends a CPU collects before it moves them into the ring buffer as one record of
/// `BATCH_LEN × size_of::<FlowEvent>()` bytes or fewer (a flush moves a partial batch); the agent
/// splits every record into `FlowEvent`s.
pub const BATCH_LEN: usize = 8;

/// Run-time settings for the kernel programs, passed as a read-only global with the layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub layout: KernelLayout,
    /// A flow open this long since its last report gets an interim report at the next sweep.
    pub interim_ns: u64,
    /// Wake user space as soon as this many bytes wait in the ring buffer; below it, records wait
    /// for the agent's periodic drain (batching keeps the agent's CPU cost low).
    pub wakeup_bytes: u64,
    /// Flow ids are `flow_id_base + n × flow_id_stride + cpu` (wrapping), `n` counting the flows
    /// started on that CPU since the counters were created. The agent draws the base at random
    /// when it creates the maps; one that takes pinned maps over keeps their base (kept in
    /// `PIN_STATE`) and their per-CPU counters, so ids stay distinct across restarts. The stride
    /// is the number of possible CPUs, so CPUs never hand out the same id.
    /// Ids of one run are distinct (a start that interrupts another on the same CPU, possible on
    /// kernels before ~6.1, takes a random id instead); two runs collide only if their id ranges
    /// (as wide as the flows they saw) overlap. Unlike fully random ids, consecutive records
    /// share the id's high bytes, which zstd compresses away on Kafka (random ids cost ~22
    /// bytes per record there, these ~4).
    pub flow_id_base: u64,
    pub flow_id_stride: u64,
    /// A CPU's batch of flow ends goes to the ring buffer once its first record is this old,
    /// when the next end is added to it; the agent moves older ones on CPUs with no further ends
    /// (see [`Batch`]).
    pub batch_age_ns: u64,
}

/// Flow ends written on one CPU, moved to the ring buffer [`BATCH_LEN`] at a time by one
/// `bpf_ringbuf_output`: a reservation takes the ring buffer's lock and writes its producer
/// position, which every CPU shares, and one per record was the largest kernel-side cost per
/// connection after the programs themselves. A batch also goes out when a record in it may be
/// followed by a reset, and, when an end is added, once its first record is
/// [`Config::batch_age_ns`] old. The agent reads every CPU's batch at each drain and runs the
/// flush program (`BPF_PROG_TEST_RUN` pinned to that CPU: an interrupt to it) only on CPUs whose
/// batch is that old, so a record waits at most the age plus one drain interval, and a CPU that
/// keeps ending flows is never interrupted.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Batch {
    /// Non-zero while a run on this CPU is adding to or flushing the batch: a run that interrupts
    /// it (the agent's flush, or a nested state change on older kernels) leaves the batch alone.
    pub busy: u64,
    /// Records in `events`.
    pub len: u64,
    /// `CLOCK_MONOTONIC` ns of the first record in `events` (meaningless while `len` is 0).
    pub first_ns: u64,
    pub events: [FlowEvent; BATCH_LEN],
}

/// What the flow's last record said, kept in the kernel so that its records can be continued by
/// whichever agent reads the next one: a restarted agent starts with no memory of the flows it
/// reported, and its first record of a flow must carry the delta since the last record the
/// previous agent wrote, with the next `seq`. The sweep updates it each time it writes a
/// snapshot (interim, flush) into the ring buffer; every snapshot carries the value it had
/// before ([`FlowEvent::prev`]), so a snapshot is a complete delta on its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    /// The raw counters of that snapshot (as in [`FlowEvent`]).
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub segs_out: u32,
    pub segs_in: u32,
    pub total_retrans: u32,
    pub resets_sent: u16,
    pub resets_received: u16,
    /// Snapshots of the flow written before: the `seq` of the next one.
    pub seq: u32,
    /// Its [`flow_flag`] bits (which SYN and FINs its byte counts include).
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// Per-socket state kept in the kernel's LRU flow map, keyed by the socket's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub flow_id: u64,
    /// `CLOCK_MONOTONIC` ns when the flow started (SYN sent, or child socket created).
    pub start_ns: u64,
    /// `CLOCK_MONOTONIC` ns of the last report (starts at `start_ns`).
    pub last_report_ns: u64,
    pub cgroup_id: u64,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub pid: u32,
    pub resets_sent: u16,
    pub resets_received: u16,
    pub local_port: u16,
    pub remote_port: u16,
    /// `AF_INET` or `AF_INET6` (as u8).
    pub family: u8,
    pub direction: u8,
    pub flags: u8,
    pub _pad: u8,
    pub comm: [u8; 16],
    /// The flow's last snapshot written by the sweep (zero before the first).
    pub prev: Reported,
}

/// One ring-buffer record: a snapshot of a flow's cumulative counters since its start.
/// User space turns consecutive snapshots of one flow into records carrying deltas.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub flow_id: u64,
    /// `CLOCK_MONOTONIC` ns.
    pub start_ns: u64,
    /// `CLOCK_MONOTONIC` ns when this snapshot was taken.
    pub report_ns: u64,
    pub cgroup_id: u64,
    /// `tcp_sock.bytes_acked`: payload acked by the peer, plus our SYN and FIN once acked.
    pub bytes_acked: u64,
    /// `tcp_sock.bytes_received`: payload received in order, plus the peer's FIN.
    pub bytes_received: u64,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub segs_out: u32,
    pub segs_in: u32,
    pub total_retrans: u32,
    pub srtt_us: u32,
    pub min_rtt_us: u32,
    pub pid: u32,
    pub comm: [u8; 16],
    pub resets_sent: u16,
    pub resets_received: u16,
    pub local_port: u16,
    pub remote_port: u16,
    /// One of [`event_kind`].
    pub kind: u8,
    /// `AF_INET` or `AF_INET6` (as u8).
    pub family: u8,
    pub direction: u8,
    /// [`flow_flag`] bits.
    pub flags: u8,
    /// The TCP state the socket left when it closed (`END` only): tells a failed connect.
    pub end_state: u8,
    pub _pad: [u8; 3],
    /// The flow's previous snapshot written by the sweep, and this one's `seq` (`prev.seq`):
    /// what an agent that did not see the earlier records computes this one's delta from.
    pub prev: Reported,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), Copy, and valid for every bit pattern (integers and arrays).
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::AcceptLayout {}
    unsafe impl aya::Pod for super::AdoptLayout {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::Batch {}
    unsafe impl aya::Pod for super::Reported {}
}

// The kernel and user space must agree on these sizes; a change here is a layout change.
const _: () = assert!(core::mem::size_of::<Reported>() == 40);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 176);
const _: () = assert!(core::mem::size_of::<FlowState>() == 136);
