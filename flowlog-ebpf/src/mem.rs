//! Zeroing and copying in 8-byte words. On BPF, Rust's `memset`/`memmove` are byte-by-byte
//! loops in a subprogram (hundreds of instructions per flow), so the programs never call them.

use core::{
    mem::offset_of,
    ptr::{read_volatile, write_volatile},
};

use flowlog_common::{FlowEvent, FlowState, Reported};

/// Zeroes a `T` in 8-byte stores. Volatile, so that LLVM does not merge them back into a
/// `memset` call (a byte loop on BPF).
#[inline(always)]
pub(crate) unsafe fn zero_words<T>(p: *mut T) {
    let words = p as *mut u64;
    for i in 0..size_of::<T>() / 8 {
        unsafe { write_volatile(words.add(i), 0) };
    }
}

/// Copies a 16-byte array (address, command name) as two 8-byte words; a plain assignment
/// compiles to a byte-by-byte `memmove` subprogram. Both sides must be 8-byte aligned (checked
/// for the fields it is used on, below).
#[inline(always)]
pub(crate) unsafe fn copy16(dst: *mut [u8; 16], src: *const [u8; 16]) {
    let (dst, src) = (dst as *mut u64, src as *const u64);
    unsafe {
        write_volatile(dst, read_volatile(src));
        write_volatile(dst.add(1), read_volatile(src.add(1)));
    }
}

/// Copies a `T` in 8-byte words (see [`copy16`]); both sides 8-byte aligned.
#[inline(always)]
pub(crate) unsafe fn copy_words<T>(dst: *mut T, src: *const T) {
    let (dst, src) = (dst as *mut u64, src as *const u64);
    for i in 0..size_of::<T>() / 8 {
        unsafe { write_volatile(dst.add(i), read_volatile(src.add(i))) };
    }
}

/// Zeroes a 16-byte array (see [`copy16`]).
#[inline(always)]
pub(crate) unsafe fn zero16(dst: *mut [u8; 16]) {
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
