//! Adoption at start: the TCP connections that were open before the programs were attached
//! begin to be tracked, so that a connection older than the agent (a database pool, a gRPC
//! channel) is reported like any other instead of never. The kernel side is `flowlog_adopt`
//! (`flowlog-ebpf/src/adopt.rs`), an iterator over every task's open files; this module runs its
//! two passes (listeners, then connections) and reports what it found.
//!
//! It runs once the state-change programs are attached, so every connection is either adopted
//! or seen starting. One that closes between the attachment and its adoption is counted as an
//! untracked close, without a record.
use std::{io::Read, time::Instant};

use aya::{
    Btf, Ebpf,
    maps::{Array, MapError},
    programs::{Iter, ProgramError, links::LinkError},
};
use flowlog_common::adopt_pass;

/// The adoption program's name in the object.
pub const PROGRAM: &str = "flowlog_adopt";

/// Why the adoption failed. The agent then runs without it (it warns once).
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("eBPF program `{PROGRAM}` is missing from the object")]
    MissingProgram,
    #[error("eBPF map `ADOPT_PASS` is missing from the object")]
    MissingMap,
    #[error("loading eBPF program `{PROGRAM}` (an iter/task_file iterator, Linux 5.8+)")]
    Load(#[source] ProgramError),
    #[error("creating the iterator of eBPF program `{PROGRAM}`")]
    Attach(#[source] ProgramError),
    #[error("opening the iterator of eBPF program `{PROGRAM}`")]
    Open(#[source] LinkError),
    #[error("running the iterator of eBPF program `{PROGRAM}`")]
    Run(#[source] std::io::Error),
    #[error("setting eBPF map `ADOPT_PASS`")]
    Pass(#[source] MapError),
}

/// Loads the adoption program and runs its two passes over every task's open files. Returns how
/// long it took; the count of adopted connections is the kernel counter
/// `flowlog_common::counter::ADOPTED`.
pub fn adopt(ebpf: &mut Ebpf, vmlinux: &Btf) -> Result<std::time::Duration, AdoptError> {
    let started = Instant::now();
    let program: &mut Iter = ebpf
        .program_mut(PROGRAM)
        .ok_or(AdoptError::MissingProgram)?
        .try_into()
        .map_err(AdoptError::Load)?;
    program
        .load("task_file", vmlinux)
        .map_err(AdoptError::Load)?;
    for pass in [adopt_pass::LISTENERS, adopt_pass::ADOPT] {
        {
            let map = ebpf.map_mut("ADOPT_PASS").ok_or(AdoptError::MissingMap)?;
            let mut passes: Array<_, u64> = Array::try_from(map).map_err(AdoptError::Pass)?;
            passes.set(0, pass, 0).map_err(AdoptError::Pass)?;
        }
        let program: &mut Iter = ebpf
            .program_mut(PROGRAM)
            .ok_or(AdoptError::MissingProgram)?
            .try_into()
            .map_err(AdoptError::Load)?;
        let id = program.attach().map_err(AdoptError::Attach)?;
        let link = program.take_link(id).map_err(AdoptError::Attach)?;
        let file = link.into_file().map_err(AdoptError::Open)?;
        drain(file).map_err(AdoptError::Run)?;
    }
    Ok(started.elapsed())
}

/// Reads the iterator to its end. The program writes nothing, so a read returns 0 at the end of
/// the walk; the kernel stops a read that visited a million objects without output with EAGAIN,
/// and the next read continues from there.
fn drain(mut file: std::fs::File) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}
