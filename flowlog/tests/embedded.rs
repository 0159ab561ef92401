//! README's run command for real: `flowlog` captures this host's TCP flows from the kernel,
//! attributes both ends with the host's own inventory, and writes Parquet that pyarrow (a reader
//! nobody here wrote) reads back with the exact flows of traffic made here: byte counts, ports,
//! outcomes and identities; and the shipped DuckDB SQL (`analysis/duckdb/connections.sql`) makes
//! one row of each connection's two ends. Needs root (eBPF), like the agent's tests.
mod support;

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use flowlog_testkit::{duckdb, free_port, pyarrow, temp_dir};
use serde_json::Value;
use support::Flowlog;
const HOST: &str = "flowlog-embedded-test";

/// One connection: the client sends `up` bytes, the server `down`, then both close.
fn transfer(server: &TcpListener, up: usize, down: usize) -> (u16, u16) {
    let addr = server.local_addr().unwrap();
    let client = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&vec![b'u'; up]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), down);
        s.local_addr().unwrap().port()
    });
    let (mut conn, peer) = server.accept().unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), up);
    conn.write_all(&vec![b'd'; down]).unwrap();
    drop(conn);
    let port = client.join().unwrap();
    assert_eq!(port, peer.port());
    (port, addr.port())
}

/// This test process's cgroup (cgroup v2 path), to know what its local end must be named.
fn own_cgroup() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .to_owned()
}

fn rows(dir: &std::path::Path) -> Vec<Value> {
    let read: Value = serde_json::from_str(&pyarrow(&["read", &dir.display().to_string()]))
        .expect("the reader's JSON");
    read["files"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["rows"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn the_run_command_writes_parquet_with_the_exact_flows() {
    let dir = temp_dir("embedded");
    let out = dir.join("flowlogs");
    let out_arg = out.display().to_string();
    let mut flowlog = Flowlog::start(&[
        "--out",
        &out_arg,
        "--host",
        HOST,
        "--summary-interval",
        "1s",
        "--hold",
        "2s",
    ]);

    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let sizes = [
        (1, 1),
        (1_000, 70_000),
        (123_457, 9),
        (0, 5_000),
        (65_536, 65_536),
    ];
    let flows: Vec<((u16, u16), (usize, usize))> = sizes
        .iter()
        .map(|&(up, down)| (transfer(&server, up, down), (up, down)))
        .collect();
    let closed = free_port();
    let refused: SocketAddr = ([127, 0, 0, 1], closed).into();
    assert!(TcpStream::connect(refused).is_err());
    // A summary interval passes with the flows in it.
    thread::sleep(Duration::from_millis(2500));
    assert!(flowlog.stop(), "flowlog did not exit cleanly on SIGTERM");

    let rows = rows(&out);
    let cgroup = own_cgroup();
    let local_identity = |end: &Value| {
        if cgroup == "/" {
            // The root cgroup is the host itself: named by its address.
            assert_eq!(end["kind"], "host", "{end}");
            assert_eq!(end["name"], HOST);
        } else {
            assert_eq!(end["kind"], "container", "{end}");
            let labels = end["labels"].as_array().unwrap();
            assert!(
                labels.contains(&serde_json::json!(["cgroup", cgroup])),
                "{end}"
            );
        }
        assert_eq!(end["status"], "exact");
    };
    let server_port = server.local_addr().unwrap().port();
    for &((client_port, _), (up, down)) in &flows {
        let find = |local: u16, remote: u16| {
            let found: Vec<&Value> = rows
                .iter()
                .filter(|r| r["local_port"] == local && r["remote_port"] == remote)
                .collect();
            assert_eq!(found.len(), 1, "{local} → {remote}: {found:?}");
            found[0]
        };
        let out = find(client_port, server_port);
        assert_eq!(out["direction"], "outbound");
        assert_eq!(out["outcome"], "closed");
        assert_eq!(out["host"], HOST);
        assert_eq!(
            (out["bytes_sent"].as_u64(), out["bytes_received"].as_u64()),
            (Some(up as u64), Some(down as u64))
        );
        assert_eq!(out["remote"]["status"], "exact");
        assert_eq!(out["remote"]["kind"], "host");
        assert_eq!(out["remote"]["name"], HOST);
        assert_eq!(out["remote"]["source"], "host");
        local_identity(&out["local"]);
        let inbound = find(server_port, client_port);
        assert_eq!(inbound["direction"], "inbound");
        assert_eq!(
            (
                inbound["bytes_sent"].as_u64(),
                inbound["bytes_received"].as_u64()
            ),
            (Some(down as u64), Some(up as u64))
        );
        assert_eq!(inbound["remote"]["name"], HOST);
    }
    let failed: Vec<&Value> = rows.iter().filter(|r| r["remote_port"] == closed).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["outcome"], "failed");
    assert_eq!(failed[0]["bytes_sent"], 0);

    // The shipped SQL (analysis/duckdb/connections.sql) on the same files, in DuckDB: one row
    // per connection, its two ends (both on this host) joined, bytes each way exact.
    let connections = duckdb(
        "connections",
        &format!("{}/**/*.parquet", out.display()),
        &[
            "skew_ns=1000000000",
            "from_ns=0",
            "to_ns=9223372036854775807",
        ],
    );
    let connections = connections.as_array().unwrap();
    for &((client_port, _), (up, down)) in &flows {
        let found: Vec<&Value> = connections
            .iter()
            .filter(|c| c["client_port"] == client_port && c["server_port"] == server_port)
            .collect();
        assert_eq!(found.len(), 1, "one row for port {client_port}: {found:?}");
        let c = found[0];
        assert_eq!(c["seen_from"], "both", "{c}");
        assert_eq!(
            (c["bytes_up"].as_u64(), c["bytes_down"].as_u64()),
            (Some(up as u64), Some(down as u64)),
            "{c}"
        );
        assert_eq!(c["bytes_agree"], true, "{c}");
        assert_eq!(c["outcome"], "closed", "{c}");
        assert_eq!(
            (c["client_host"].as_str(), c["server_host"].as_str()),
            (Some(HOST), Some(HOST))
        );
        // Each end named by the other end's record of its address: this host.
        assert_eq!(
            (c["client"].as_str(), c["server"].as_str()),
            (Some(HOST), Some(HOST)),
            "{c}"
        );
        assert_eq!(c["adopted"], false, "{c}");
    }
    let refused: Vec<&Value> = connections
        .iter()
        .filter(|c| c["server_port"] == closed)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        (
            &refused[0]["seen_from"],
            &refused[0]["outcome"],
            &refused[0]["bytes_up"]
        ),
        (
            &Value::from("client"),
            &Value::from("failed"),
            &Value::from(0)
        ),
        "a refused connect has its client end only"
    );

    let summary = flowlog.stdout.lock().unwrap().clone();
    assert!(summary.contains("flows/s"), "no live summary:\n{summary}");
    assert!(
        summary.contains("top talkers"),
        "no top talkers:\n{summary}"
    );
    assert!(
        summary.contains(&format!("127.0.0.1:{closed} (host {HOST})")),
        "the failed connect is not in the summary:\n{summary}"
    );
    // It speaks in connections: client → server:port, the clients' ephemeral ports aggregated
    // (an inbound record drawn as server → client:port would name one).
    assert!(
        summary.contains(&format!(" 127.0.0.1:{server_port} (host {HOST})\n")),
        "no talker line for the server:\n{summary}"
    );
    for &((client_port, _), _) in &flows {
        assert!(
            !summary.contains(&format!(":{client_port}")),
            "a client's ephemeral port {client_port} is in the summary:\n{summary}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
