//! The agent's health probes over HTTP, as an orchestrator sees them: `/healthz` (the event loop
//! turns) and `/readyz` (programs attached, ring buffer drained recently) on the metrics
//! listener, next to `/metrics`. The answers' logic (stalls, stale drains, reasons) is unit-tested
//! in flowlog-cli's `health` module; this checks that the running agent wires it up.
//!
//! Needs root (eBPF).
mod support;

use std::{
    thread,
    time::{Duration, Instant},
};

use support::{Agent, PATIENCE};

#[test]
fn a_capturing_agent_is_alive_and_ready() {
    let agent = Agent::start("health", "1h");
    // It logged "capturing TCP flows": its programs are attached; it is ready once its loop has
    // drained the ring buffer (every --drain-interval, 100 ms).
    let deadline = Instant::now() + PATIENCE;
    let mut last = agent.get("/readyz").expect("GET /readyz");
    while last.0 != 200 && Instant::now() < deadline {
        assert_eq!(last.0, 503, "/readyz answered {last:?}");
        thread::sleep(Duration::from_millis(50));
        last = agent.get("/readyz").expect("GET /readyz");
    }
    assert_eq!(
        last,
        (200, "ok\n".to_string()),
        "not ready within {PATIENCE:?}; stderr:\n{}",
        agent.stderr()
    );
    assert_eq!(
        agent.get("/healthz").expect("GET /healthz"),
        (200, "ok\n".to_string())
    );
    // Still ready a few drains later (the freshness check is renewed by every drain).
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        agent.get("/readyz").expect("GET /readyz"),
        (200, "ok\n".to_string())
    );
    let page = agent.metrics();
    assert!(
        Agent::metric(&page, "flowlog_sidecar_sockets_tracked").is_some(),
        "the metrics page lost its metrics:\n{page}"
    );
    assert_eq!(agent.get("/nothing-here").expect("GET").0, 404);
    agent.stop();
}
