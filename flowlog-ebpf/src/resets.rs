//! Resets (`tcp:tcp_send_reset`, `tcp:tcp_receive_reset`), counted on their flow, or written
//! as a record of their own when the flow has just ended.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::{
    emit::emit_reset_after_end,
    maps::{CLOSED, FLOWS},
};

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
