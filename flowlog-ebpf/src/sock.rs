//! Reading a socket's fields: [`SockRead`], with probe reads ([`ProbeRead`], every kernel) or
//! the verifier-checked direct loads of a BTF-typed program ([`Direct`]).

use core::{
    ffi::c_void,
    mem::MaybeUninit,
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated as helper};
use flowlog_common::{IPPROTO_TCP, tuple_block};

use crate::CONFIG;

/// How a program reads the fields of a socket. The flow logic
/// ([`on_set_state`](crate::lifecycle::on_set_state) and what it calls) is generic over it, so
/// the BTF-typed and the plain raw tracepoint run the same code.
pub(crate) trait SockRead: Copy {
    /// A reader for the socket at `sk` if it is a TCP socket (`check_protocol`), or for a socket
    /// already known to be one (`!check_protocol`: found in the flow map).
    fn tcp(sk: u64, check_protocol: bool) -> Option<Self>;
    /// Reads a `T` (an integer) at `offset` bytes from the socket; zero if it cannot be read.
    fn read<T: Copy + Default>(self, offset: u32) -> T;
    /// Reads the 4-tuple block of `struct sock_common`
    /// ([`tuple_block`](flowlog_common::tuple_block)): the IPv4 addresses (remote, local) as one
    /// word, the remote port (network order) and the family.
    fn tuple(self) -> (u64, u16, u16);
    /// Reads the IPv6 remote and local addresses (`skc_v6_daddr`, `skc_v6_rcv_saddr`).
    fn v6_addrs(self) -> [u64; 4];
}

/// Reads with `bpf_probe_read_kernel`: allowed in every program type, one helper call (a
/// fault-safe copy with its checks) per read, so contiguous fields are read together.
#[derive(Clone, Copy)]
pub(crate) struct ProbeRead(pub(crate) *const u8);

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
pub(crate) struct Direct(pub(crate) *const u8);

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

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
pub(crate) unsafe fn read_field<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    if base.is_null() {
        return Err(-1);
    }
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T) }
}
