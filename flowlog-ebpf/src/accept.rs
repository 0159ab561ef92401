//! The owner of an inbound flow: the process that accepts it (`syscalls:sys_exit_accept{,4}`);
//! and the start of an inbound flow whose handshake the state-change program did not see.

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated as helper},
    macros::tracepoint,
    programs::TracePointContext,
};
use flowlog_common::{counter, direction, flow_flag, tuple_block};

use crate::{
    ACCEPT, CONFIG,
    lifecycle::{start_flow, take_process, tracked_state},
    maps::{FLOWS, count},
    sock::{Direct, ProbeRead, SockRead, read_field},
};

/// On return from `accept()`/`accept4()` (in the accepting process): finds the socket of the new
/// descriptor and records this process as the inbound flow's owner, or starts the flow if the
/// state-change program was skipped for its start ([`start_late`]).
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
pub(crate) fn on_accept_exit<const DIRECT: bool>(ctx: &TracePointContext) -> Result<(), i32> {
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
        } else {
            start_late(sk);
        }
    }
    Ok(())
}

/// Starts the inbound flow of an accepted socket the flow map does not know: its handshake
/// completed in a softirq that interrupted the state-change program on its CPU, which the
/// kernel then skipped (see [`on_set_state`](crate::lifecycle::on_set_state)). Its `start_ns`
/// is the accept's time; its counters, which the kernel keeps from the socket's creation, make
/// its records exact all the same. Not for a socket already closed: its end was written (or
/// will be, at its destruction), and a second flow would count its bytes twice. Nor for
/// another protocol's socket (`accept()` on a Unix socket).
#[inline(always)]
fn start_late(sk: u64) {
    // Read before the protocol is known: any socket has its state there, and `start_flow`
    // checks the protocol.
    let sock = ProbeRead(sk as *const u8);
    let state: u8 = sock.read(global!(CONFIG.layout.sk_daddr) + tuple_block::STATE as u32);
    if tracked_state(state) && start_flow::<ProbeRead>(sk, direction::INBOUND, true) {
        count(counter::LATE_START, 1);
    }
}
