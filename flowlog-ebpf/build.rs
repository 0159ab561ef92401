//! Rebuild the programs when bpf-linker changes: the linker is part of the toolchain that shapes
//! the object file, and cargo does not track it by itself.
use which::which;

fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not on PATH: run scripts/bootstrap");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
