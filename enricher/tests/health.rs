//! The enricher's health probes over HTTP, with real processes and the real broker: `/readyz`
//! says why a replica is not ready (no partition yet, an inventory that has not reported, an
//! inventory that fell behind by more than the hold) and turns ready once both hold;
//! `/healthz` stays alive throughout (waiting is not a reason to be restarted).
use std::{net::SocketAddr, process::Command};

use flowlog_testkit::{
    Topic, cargo_bin, free_port, http_get, spawn_ready, temp_dir, unique_name, wait_for_http,
};

#[test]
fn readiness_follows_the_assignment_and_the_inventory() {
    // Another package's binary: built now rather than while the enricher waits.
    let inventory_bin = cargo_bin("flowlog-inventory");
    let (raw, enriched, dlq, ownership) = (
        Topic::create("health-raw", 2),
        Topic::create("health-enriched", 1),
        Topic::create("health-dlq", 1),
        Topic::create("health-ownership", 1),
    );
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let _enricher = spawn_ready(
        Command::new(env!("CARGO_BIN_EXE_flowlog-enricher")).args([
            "--brokers",
            &raw.brokers,
            "--input-topic",
            &raw.name,
            "--output-topic",
            &enriched.name,
            "--dlq-topic",
            &dlq.name,
            "--group",
            &unique_name("health"),
            "--ownership-topic",
            &ownership.name,
            "--hold",
            "2s",
            "--metrics-addr",
            &metrics.to_string(),
        ]),
        "flowlog-enricher",
        "enriching",
    );
    // The ownership topic is empty: the replica joins the group, but no inventory has reported.
    let waiting = "inventory_caught_up: the inventory source ownership has not reported yet\n";
    wait_for_http(metrics, "/readyz", |status, body| {
        assert_eq!(status, 503, "ready without an inventory: {body}");
        body == waiting
    });
    assert_eq!(
        http_get(metrics, "/healthz").unwrap(),
        (200, "ok\n".to_string())
    );

    // An inventory publishes its watermark every second: ready.
    let dir = temp_dir("health-static");
    let file = dir.join("static.toml");
    std::fs::write(
        &file,
        "[[entry]]\ncidr = \"198.51.100.0/24\"\nname = \"test-net\"\n",
    )
    .unwrap();
    let mut inventory = spawn_ready(
        Command::new(&inventory_bin).args([
            "--brokers",
            &ownership.brokers,
            "--ownership-topic",
            &ownership.name,
            "--static",
            file.to_str().unwrap(),
            "--metrics-addr",
            &format!("127.0.0.1:{}", free_port()),
        ]),
        "flowlog-inventory",
        "publishing ownership",
    );
    assert_eq!(
        wait_for_http(metrics, "/readyz", |status, _| status == 200),
        (200, "ok\n".to_string())
    );

    // The inventory dies: once its last watermark is older than the hold, flows would go out
    // `unknown`, and the replica says so.
    let _ = inventory.0.kill();
    let _ = inventory.0.wait();
    let (_, body) = wait_for_http(metrics, "/readyz", |status, _| status == 503);
    assert!(
        body.starts_with(
            "inventory_caught_up: the inventory source ownership/static is complete only up to "
        ) && body.ends_with(" s ago, more than flows wait for it (2.0 s)\n"),
        "{body}"
    );
    assert_eq!(
        http_get(metrics, "/healthz").unwrap(),
        (200, "ok\n".to_string())
    );
}
