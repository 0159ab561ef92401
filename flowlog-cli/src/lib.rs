//! What every flowlog binary (`flowlog`, `flowlog-sidecar`, `flowlog-enricher`,
//! `flowlog-inventory`) does around its work, in one place: logs with `tracing` to stderr
//! (level from `FLOWLOG_LOG`, `EnvFilter` syntax, default `info`; colours only on a terminal),
//! a tokio runtime, and a failure's whole error chain logged once with exit status 1.
use std::{future::Future, io::IsTerminal as _, process::ExitCode};

use tracing::error;

/// Which tokio runtime the binary runs on.
#[derive(Debug, Clone, Copy)]
pub enum Runtime {
    /// One thread: the agent, whose loop is one task.
    CurrentThread,
    /// A pool of this many worker threads.
    Workers(usize),
}

/// Sets up logging, runs `work` to completion on `runtime`, and turns its result into the
/// process's exit status. Parse flags before calling it, so usage errors print as clap's.
pub fn main(runtime: Runtime, work: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOWLOG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let built = match runtime {
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Runtime::Workers(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "starting the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
