//! flowlog's kernel programs: track every TCP socket of the host from its first state change to
//! `TCP_CLOSE` and emit one [`FlowEvent`](flowlog_common::FlowEvent) per flow end (and per
//! interim report) through a ring buffer. Flow ends are collected per CPU and enter the ring
//! buffer several at a time ([`Batch`](flowlog_common::Batch)); `flowlog_flush`, run by the agent
//! on every CPU at each drain, moves the rest.
//!
//! One module per concern, each with its programs:
//! - [`lifecycle`]: `sock:inet_sock_set_state` starts a flow (`CLOSE→SYN_SENT` outbound,
//!   `LISTEN→SYN_RECV` inbound), completes it (`ESTABLISHED`, `FIN_WAIT1`/`LAST_ACK`), and ends
//!   it (`→CLOSE`), reading the socket's counters from `struct tcp_sock` at that moment. Two
//!   programs implement it, and the agent attaches one: `inet_sock_set_state_btf`, a BTF-typed
//!   raw tracepoint (`tp_btf`) whose socket is a typed pointer, so every field is one load
//!   instruction checked by the verifier ([`Direct`](sock::Direct)); and `inet_sock_set_state`, a
//!   plain raw tracepoint that reads fields with `bpf_probe_read_kernel`
//!   ([`ProbeRead`](sock::ProbeRead)), for kernels that refuse the first. Both run the same code
//!   ([`on_set_state`](lifecycle::on_set_state)), generic over how fields are read ([`sock`]).
//! - [`destroy`]: `tcp:tcp_destroy_sock` writes the ends the state-change program was skipped
//!   for (a softirq interrupting it on its CPU), in the same two variants.
//! - [`resets`]: `tcp:tcp_send_reset` / `tcp:tcp_receive_reset` (raw) count resets per flow.
//! - [`accept`]: `syscalls:sys_exit_accept{,4}` give an inbound flow its owning process (the
//!   accepting one), and start it if its start was skipped; `accept_exit_btf` walks from the task to the socket with direct loads where
//!   it can, `accept_exit` with probe reads.
//! - [`sweep`]: `flowlog_sweep` is never attached: user space runs it with `BPF_PROG_TEST_RUN` to
//!   emit interim snapshots of long-lived flows (and of all open flows at shutdown).
//! - [`adopt`]: `flowlog_adopt`, an iterator the agent runs at start to adopt the connections
//!   that are older than it.
//! - [`emit`] writes the records, [`maps`] declares the maps they share, [`mem`] zeroes and
//!   copies without `memset`/`memmove`.
//!
//! No offsets are compiled in: the agent finds them in the running kernel's BTF and overrides the
//! `CONFIG` and `ACCEPT` globals at load time (a frozen, read-only map: the verifier sees their
//! values as constants, which is what lets it check the direct loads). The hot path is kept
//! short: state changes that do not concern a tracked flow return after one map lookup, the
//! socket's 4-tuple is read once, and no struct is zeroed or copied by Rust's `memset`/`memmove`
//! (on BPF those are byte-by-byte loops in a subprogram: hundreds of instructions per flow).
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use flowlog_common::{AcceptLayout, Config};

/// Reads one field of a load-time global. Volatile, so the compiler cannot fold the zero it was
/// compiled with; one load instruction, where copying the whole struct would cost dozens.
/// Defined before the modules, which use it.
macro_rules! global {
    ($($field:tt)+) => {
        $crate::load_global(&raw const $($field)+)
    };
}

mod accept;
mod adopt;
mod destroy;
mod emit;
mod lifecycle;
mod maps;
mod mem;
mod resets;
mod sock;
mod sweep;

/// Layout and settings, overridden by the agent at load time (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
pub(crate) static CONFIG: Config = unsafe { core::mem::zeroed() };

/// How to reach the socket behind an accepted file descriptor; zero when the agent found no
/// syscall tracepoints (the accept program is then not attached).
#[unsafe(no_mangle)]
pub(crate) static ACCEPT: AcceptLayout = unsafe { core::mem::zeroed() };

#[inline(always)]
pub(crate) fn load_global<T: Copy>(field: *const T) -> T {
    // SAFETY: `field` points into one of the immutable globals above.
    unsafe { read_volatile(field) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
