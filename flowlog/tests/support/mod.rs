//! The one-host `flowlog` as a child process of a test: started with the test's flags, ready
//! once it logs that it captures, its summary (stdout) collected, stopped with SIGTERM.
#![allow(dead_code)] // each test binary uses a different part of it

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
};

use flowlog_testkit::{ChildGuard, PATIENCE, free_port};

const FLOWLOG: &str = env!("CARGO_BIN_EXE_flowlog");

/// A running `flowlog`; killed on drop if not stopped.
pub struct Flowlog {
    pub child: ChildGuard,
    /// What it printed to stdout so far (the live summary).
    pub stdout: Arc<Mutex<String>>,
}

impl Flowlog {
    /// Starts `flowlog` with `args` (and a metrics port of its own), echoes its log to the
    /// test's stderr, and waits until it logs `capturing TCP flows`.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(FLOWLOG)
            .args(args)
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .env("FLOWLOG_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting flowlog");
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("flowlog: {line}");
                if line.contains("capturing TCP flows") {
                    let _ = ready_tx.send(());
                }
            }
        });
        let stdout = Arc::new(Mutex::new(String::new()));
        let summary = Arc::clone(&stdout);
        let lines = BufReader::new(child.stdout.take().unwrap());
        thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                summary.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let flowlog = Self {
            child: ChildGuard(child),
            stdout,
        };
        ready_rx
            .recv_timeout(PATIENCE)
            .expect("flowlog did not start capturing");
        flowlog
    }

    /// SIGTERM, and whether it exited cleanly within [`PATIENCE`].
    pub fn stop(&mut self) -> bool {
        self.child.terminate(PATIENCE)
    }
}
