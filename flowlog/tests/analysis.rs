//! The shipped DuckDB reports (`analysis/duckdb/`) answer from what a real capture wrote, checked
//! against traffic whose truth this test knows: two network namespaces that a static inventory
//! names as workloads in two zones (`shop/web` in zone-a, `shop/db` in zone-b), three
//! connections with known transfers, one that the server resets, and a refused connect; the
//! first transfer in a window of its own, so that the reports that compare a window with the
//! one before it have a known answer too; after it, the server's namespace drops every other
//! data segment it receives (nftables), so there are retransmits while the bytes stay exact. The
//! one-host `flowlog` sees both ends of each connection (both namespaces are on this host), so
//! every connection has two flows that the reports must count once. The ClickHouse reports
//! (`analysis/clickhouse/`, run in chDB) and `flowlog report` (DataFusion, reading only the
//! window's partitions) must give the same rows. Needs root (eBPF, namespaces), like the
//! agent's tests.
mod support;

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::mpsc,
    thread,
    time::Duration,
};

use flowlog_testkit::{
    chdb, duckdb,
    netns::{NetnsPair, abort, join},
    temp_dir,
};
use serde_json::Value;
use support::Flowlog;
const HOST: &str = "flowlog-analysis-test";

/// Transfers of the closed connections: (client → server, server → client) bytes.
const TRANSFERS: [(usize, usize); 3] = [(1_000, 20_000), (5_000, 300), (70_000, 70_000)];
/// Bytes the client sends on the connection the server then resets.
const BEFORE_RESET: usize = 10;

/// One connection from the client namespace: sends `up` bytes, half-closes, reads to the end.
/// The server (this thread) reads everything, answers `down` bytes and closes.
fn exchange(net: &NetnsPair, listener: &TcpListener, to: SocketAddr, up: usize, down: usize) {
    let client = net.client("fla-client", move || {
        let mut s = TcpStream::connect(to).unwrap();
        s.write_all(&vec![b'u'; up]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), down);
    });
    let (mut conn, _) = listener.accept().unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), up);
    conn.write_all(&vec![b'd'; down]).unwrap();
    drop(conn);
    join(client);
}

/// A connection the server discards with a reset once it has read the client's bytes.
fn reset(net: &NetnsPair, listener: &TcpListener, to: SocketAddr) {
    let (tx, rx) = mpsc::channel::<()>();
    let client = net.client("fla-reset", move || {
        let mut s = TcpStream::connect(to).unwrap();
        s.write_all(&[b'r'; BEFORE_RESET]).unwrap();
        rx.recv().unwrap();
        let mut buf = [0u8; 16];
        let err = s
            .read(&mut buf)
            .expect_err("the server resets the connection");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    });
    let (mut conn, _) = listener.accept().unwrap();
    let mut got = [0u8; BEFORE_RESET];
    conn.read_exact(&mut got).unwrap();
    abort(conn);
    tx.send(()).unwrap();
    join(client);
}

fn row<'a>(rows: &'a Value, what: &str, pred: impl Fn(&Value) -> bool) -> &'a Value {
    let found: Vec<&Value> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| pred(r))
        .collect();
    assert_eq!(found.len(), 1, "{what}: {found:#?}\nall: {rows:#}");
    found[0]
}

/// Rows as the two engines' JSON can be compared: booleans as 0/1 (ClickHouse's `Bool` of an
/// expression comes out as a number), numbers as f64 rounded to 12 significant digits.
fn normalized(rows: &Value) -> Vec<Vec<(String, String)>> {
    let text = |v: &Value| match v {
        Value::Bool(b) => format!("{:.12e}", f64::from(u8::from(*b))),
        Value::Number(n) => format!("{:.12e}", n.as_f64().unwrap()),
        other => other.to_string(),
    };
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), text(v)))
                .collect()
        })
        .collect()
}

fn epoch_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos() as u64
}

#[test]
fn the_shipped_reports_answer_from_a_real_capture() {
    let net = NetnsPair::new(60);
    let (client_addr, server_addr) = net.addrs(false);
    let port = 21_000 + (std::process::id() % 20_000) as u16;
    let closed_port = port + 1;
    let dir = temp_dir("analysis");
    let out = dir.join("flowlogs");
    let inventory = dir.join("static.toml");
    std::fs::write(
        &inventory,
        format!(
            "[[entry]]\ncidr = \"{client_addr}\"\nname = \"web-1\"\nnamespace = \"shop\"\n\
             zone = \"zone-a\"\nworkload = {{ kind = \"Deployment\", name = \"web\" }}\n\n\
             [[entry]]\ncidr = \"{server_addr}\"\nname = \"db-1\"\nnamespace = \"shop\"\n\
             zone = \"zone-b\"\nworkload = {{ kind = \"StatefulSet\", name = \"db\" }}\n"
        ),
    )
    .unwrap();
    let (out_arg, inventory_arg) = (out.display().to_string(), inventory.display().to_string());
    let mut flowlog = Flowlog::start(&[
        "--out",
        &out_arg,
        "--host",
        HOST,
        "--static",
        &inventory_arg,
        "--summary-interval",
        "60s",
        "--hold",
        "1s",
    ]);

    let to = SocketAddr::new(server_addr, port);
    let listener = net.listen(to);
    // Two windows: the first transfer alone, then the rest with the failures.
    exchange(&net, &listener, to, TRANSFERS[0].0, TRANSFERS[0].1);
    thread::sleep(Duration::from_millis(200));
    let second_window = epoch_ns();
    // From here on the server's side loses every other data segment it receives (the first
    // among them): the clients retransmit, and the bytes stay exact. Deterministic, not random:
    // veth carries large GSO segments, so a connection has few packets to lose.
    net.add_server_input_rule(&format!(
        "tcp dport {port} ip length > 200 numgen inc mod 2 == 0 drop"
    ));
    for (up, down) in &TRANSFERS[1..] {
        exchange(&net, &listener, to, *up, *down);
    }
    reset(&net, &listener, to);
    let refused = SocketAddr::new(server_addr, closed_port);
    let failed = net.client("fla-refused", move || TcpStream::connect(refused).is_err());
    assert!(join(failed), "the connect to a closed port is refused");
    // Past the hold, so that everything is attributed and written at the stop.
    thread::sleep(Duration::from_millis(1500));
    assert!(flowlog.stop(), "flowlog did not exit cleanly on SIGTERM");

    let data = format!("{}/**/*.parquet", out.display());
    let vars = [
        "skew_ns=1000000000",
        "from_ns=0",
        "to_ns=9223372036854775807",
        "price_per_gb=0.01",
    ];
    let ours = |r: &Value| r["server_addr"] == server_addr.to_string();
    let server = |r: &Value| r["server"] == "shop/db";

    // One row per connection, each named by the inventory, bytes each way exact.
    let connections = duckdb("connections", &data, &vars);
    let rows: Vec<&Value> = connections
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| ours(r))
        .collect();
    assert_eq!(rows.len(), TRANSFERS.len() + 2, "{rows:#?}");
    let up: u64 = TRANSFERS.iter().map(|t| t.0 as u64).sum::<u64>() + BEFORE_RESET as u64;
    let down: u64 = TRANSFERS.iter().map(|t| t.1 as u64).sum();
    for r in &rows {
        assert_eq!(
            (r["client"].as_str(), r["client_zone"].as_str()),
            (Some("shop/web"), Some("zone-a")),
            "{r}"
        );
        assert_eq!(
            (r["server"].as_str(), r["server_zone"].as_str()),
            (Some("shop/db"), Some("zone-b")),
            "{r}"
        );
        assert_eq!(r["client_addr"], client_addr.to_string());
        let expected_seen = if r["server_port"] == closed_port {
            "client"
        } else {
            "both"
        };
        assert_eq!(r["seen_from"], expected_seen, "{r}");
        if expected_seen == "both" {
            assert_eq!(r["bytes_agree"], true, "{r}");
        }
    }
    for (up, down) in TRANSFERS {
        let matching: Vec<&&Value> = rows
            .iter()
            .filter(|r| r["bytes_up"] == up as u64 && r["bytes_down"] == down as u64)
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "one closed connection {up}/{down}: {rows:#?}"
        );
        assert_eq!(matching[0]["outcome"], "closed");
    }

    // Availability: the pair's connections, the reset and the refused connect, worst first.
    let availability = duckdb("availability", &data, &vars);
    let refused_pair = row(&availability, "the refused port", |r| {
        server(r) && r["server_port"] == closed_port
    });
    assert_eq!(
        (
            &refused_pair["connections"],
            &refused_pair["failed"],
            &refused_pair["unhealthy"]
        ),
        (&Value::from(1), &Value::from(1), &Value::from(1.0))
    );
    let pair = row(&availability, "web → db", |r| {
        server(r) && r["server_port"] == port
    });
    assert_eq!(pair["client"], "shop/web");
    assert_eq!(
        (&pair["connections"], &pair["failed"], &pair["resets"]),
        (&Value::from(4), &Value::from(0), &Value::from(1)),
        "{pair}"
    );
    assert_eq!(pair["unhealthy"], 0.25);
    assert!(
        pair["retransmits"].as_u64().is_some_and(|n| n > 0)
            && pair["retransmit_rate"].as_f64().is_some_and(|r| r > 0.0),
        "the loss shows as retransmits: {pair}"
    );
    assert!(
        pair["rtt_p50_us"].as_u64().is_some_and(|rtt| rtt > 0),
        "{pair}"
    );
    let first = &availability.as_array().unwrap()[0];
    assert_eq!(first["unhealthy"], 1.0, "worst first: {availability:#}");

    // Audit: the edge, with its first and last sight, counted once per connection.
    let audit = duckdb("audit", &data, &vars);
    let edge = row(&audit, "the edge web → db", |r| {
        server(r) && r["server_port"] == port
    });
    assert_eq!(
        (&edge["connections"], &edge["bytes_up"], &edge["bytes_down"]),
        (&Value::from(4), &Value::from(up), &Value::from(down)),
        "{edge}"
    );
    assert_eq!(
        (
            &edge["egress_to_unowned"],
            &edge["inbound_from_unowned"],
            &edge["not_exact"]
        ),
        (
            &Value::from(false),
            &Value::from(false),
            &Value::from(false)
        )
    );
    assert!(edge["first_seen_ns"].as_u64() < edge["last_seen_ns"].as_u64());

    // Capacity: bytes by pair and hour, across zones, and what that costs.
    let capacity = duckdb("capacity", &data, &vars);
    let pair: Vec<&Value> = capacity
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| server(r) && r["server_port"] == port)
        .collect();
    let bytes: u64 = pair.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
    assert_eq!(bytes, up + down, "{pair:#?}");
    let cost: f64 = pair
        .iter()
        .map(|r| r["cross_zone_cost"].as_f64().unwrap())
        .sum();
    let expected = (up + down) as f64 * 2.0 * 0.01 / (1u64 << 30) as f64;
    assert!(
        (cost - expected).abs() < expected * 1e-9,
        "cross-zone cost {cost}, expected {expected}: {pair:#?}"
    );
    assert!(pair.iter().all(|r| r["cross_zone"] == true), "{pair:#?}");

    // The second window against the first (a window of the same length just before it): the
    // pair got worse (a reset where there was none), the refused port's edge is new.
    let from = format!("from_ns={second_window}");
    let to_ns = format!("to_ns={}", second_window + 60_000_000_000);
    let windowed = [vars[0], &from, &to_ns, vars[3]];
    let worse = duckdb("availability", &data, &windowed);
    let pair = row(&worse, "web → db, second window", |r| {
        server(r) && r["server_port"] == port
    });
    assert_eq!(
        (
            &pair["connections"],
            &pair["resets"],
            &pair["prev_connections"]
        ),
        (&Value::from(3), &Value::from(1), &Value::from(1)),
        "{pair}"
    );
    assert_eq!(
        (&pair["prev_unhealthy"], &pair["worse"]),
        (&Value::from(0.0), &Value::from(true)),
        "{pair}"
    );
    let new_edges = duckdb("audit", &data, &windowed);
    let seen_before = row(&new_edges, "web → db, second window", |r| {
        server(r) && r["server_port"] == port
    });
    assert_eq!(
        (&seen_before["connections"], &seen_before["new"]),
        (&Value::from(3), &Value::from(false))
    );
    let refused_edge = row(&new_edges, "the refused port, second window", |r| {
        server(r) && r["server_port"] == closed_port
    });
    assert_eq!(refused_edge["new"], true);

    // The ClickHouse SQL (analysis/clickhouse/, in chDB) gives the same answers.
    for (report, vars, duck) in [
        ("connections", &vars[..], &connections),
        ("availability", &vars[..], &availability),
        ("audit", &vars[..], &audit),
        ("capacity", &vars[..], &capacity),
        ("availability", &windowed[..], &worse),
        ("audit", &windowed[..], &new_edges),
    ] {
        let click = chdb(report, &data, vars);
        assert_eq!(
            normalized(&click),
            normalized(duck),
            "{report}: ClickHouse and DuckDB differ"
        );
        // And `flowlog report` (DataFusion, flowlog-report/sql/) gives them too.
        let ours = flowlog_report(report, &out_arg, vars, "json");
        assert_eq!(
            normalized(&serde_json::from_str(&ours).unwrap()),
            normalized(duck),
            "{report} {vars:?}: flowlog report and DuckDB differ"
        );
    }

    // The other formats carry the same rows: CSV's header is the JSON's keys, the table names
    // the workloads and shows times as RFC 3339.
    let csv = flowlog_report("audit", &out_arg, &vars, "csv");
    let keys: Vec<&String> = audit.as_array().unwrap()[0]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    assert_eq!(header.len(), keys.len(), "{csv}");
    assert!(keys.iter().all(|k| header.contains(&k.as_str())), "{csv}");
    assert_eq!(
        csv.lines().count(),
        audit.as_array().unwrap().len() + 1,
        "{csv}"
    );
    let table = flowlog_report("availability", &out_arg, &vars, "table");
    assert!(
        table.contains("| shop/web") && table.contains("| shop/db"),
        "{table}"
    );

    // The page (`--format html`), rendered by headless Chromium: no console message, and its
    // service map and chart hold what the reports say. The screenshot stays in the target
    // directory's tmp/ for a reader.
    let page = flowlog_report("availability", &out_arg, &vars, "html");
    let page_path = dir.join("report.html");
    std::fs::write(&page_path, &page).unwrap();
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flowlog-report-page.png");
    let rendered = flowlog_testkit::chromium::render(&page_path, &shot);
    assert_eq!(rendered.console, Vec::<String>::new(), "console messages");
    assert!(
        !page.contains(" src=") && !page.contains("href=\"http"),
        "fetches nothing"
    );
    let dom = &rendered.dom;
    for node in ["shop/web", "shop/db"] {
        assert!(
            dom.contains(&format!("data-name=\"{node}\"")),
            "node {node}: {dom}"
        );
    }
    // One edge web → db over both ports: every connection, its bytes, the refused connect
    // and the reset, so it is marked failing.
    let edge = dom
        .split("<path ")
        .find(|p| p.contains("data-client=\"shop/web\"") && p.contains("data-server=\"shop/db\""))
        .unwrap_or_else(|| panic!("no edge shop/web → shop/db: {dom}"));
    for (attribute, value) in [
        ("class", "edge failing".to_string()),
        ("data-ports", format!("{port},{closed_port}")),
        ("data-connections", rows.len().to_string()),
        ("data-bytes", (up + down).to_string()),
        ("data-failed", "1".to_string()),
        ("data-resets", "1".to_string()),
    ] {
        assert!(
            edge.contains(&format!("{attribute}=\"{value}\"")),
            "edge {attribute} should be {value}: {edge}"
        );
    }
    // Bytes by hour: the capacity report's bytes each way, all of them.
    let hour_bytes = |attribute: &str| -> u64 {
        dom.split("<g class=\"hour\"")
            .skip(1)
            .map(|g| {
                let at = g.find(&format!("{attribute}=\"")).unwrap() + attribute.len() + 2;
                g[at..].split('"').next().unwrap().parse::<u64>().unwrap()
            })
            .sum()
    };
    let capacity_bytes = |column: &str| -> u64 {
        capacity
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[column].as_u64().unwrap())
            .sum()
    };
    assert_eq!(hour_bytes("data-bytes-up"), capacity_bytes("bytes_up"));
    assert_eq!(hour_bytes("data-bytes-down"), capacity_bytes("bytes_down"));
    let png = std::fs::read(&rendered.screenshot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a screenshot of the page"
    );

    // Only the window's partitions are read: a file that is not Parquet, in an hour far from
    // the capture, leaves the windowed reports as they were, and breaks a report over all time.
    let stray = out.join("dt=2001-01-01/hour=00");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("garbage.parquet"), b"not parquet").unwrap();
    for (report, duck) in [("availability", &worse), ("audit", &new_edges)] {
        let ours = flowlog_report(report, &out_arg, &windowed, "json");
        assert_eq!(
            normalized(&serde_json::from_str(&ours).unwrap()),
            normalized(duck),
            "{report}, second window, with a stray file outside it"
        );
    }
    let everything = report_command("audit", &out_arg, &vars, "json")
        .output()
        .unwrap();
    assert!(
        !everything.status.success()
            && String::from_utf8_lossy(&everything.stderr).contains("garbage.parquet"),
        "a window over all time reads the stray file: {everything:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `flowlog report REPORT --data DATA` with the shipped SQL's variables (`NAME=VALUE`) as flags.
fn report_command(report: &str, data: &str, vars: &[&str], format: &str) -> Command {
    let var = |name: &str| {
        vars.iter()
            .find_map(|v| v.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {vars:?}"))
            .to_string()
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_flowlog"));
    command.args(["report", report, "--data", data, "--format", format]);
    command.args(["--from", &var("from_ns"), "--to", &var("to_ns")]);
    command.args(["--skew", &format!("{}ns", var("skew_ns"))]);
    command.args(["--price-per-gb", &var("price_per_gb")]);
    command
}

/// What `flowlog report` prints (it must succeed).
fn flowlog_report(report: &str, data: &str, vars: &[&str], format: &str) -> String {
    let out = report_command(report, data, vars, format).output().unwrap();
    assert!(
        out.status.success(),
        "flowlog report {report} {vars:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
