//! The HTTP listener of every long-running binary, on its `--metrics-addr`: `/metrics`
//! (Prometheus text format: the recorder's metrics, then the registered
//! [`crate::histogram::FixedHistogram`]s), `/healthz` (alive) and `/readyz` (ready), the last two answered from
//! a [`Health`] that the binary's work loops keep up to date. Orchestrators probe the latter two
//! (Kubernetes liveness and readiness probes, a load balancer, a systemd watchdog script); each
//! answers `200 ok` or `503` with one line per failing check, so a person reading the probe's
//! event sees why.
use std::{net::SocketAddr, time::Duration};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

use crate::health::{Health, NotReady};

/// How often histograms and summaries are compacted (what the exporter's own listener did).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("installing the Prometheus metrics recorder")]
    Recorder { source: BuildError },
    #[error("listening for /metrics, /healthz and /readyz on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct Served {
    metrics: PrometheusHandle,
    health: Health,
}

/// Installs the process's metrics recorder from `builder` (names, buckets) and serves
/// `/metrics`, `/healthz` and `/readyz` on `addr` in a task of the current tokio runtime, for the
/// life of the process. Returns the address it listens on (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    builder: PrometheusBuilder,
    health: Health,
) -> Result<SocketAddr, TelemetryError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let metrics = builder
        .install_recorder()
        .map_err(|source| TelemetryError::Recorder { source })?;
    tokio::spawn(upkeep(metrics.clone()));
    tokio::spawn(serve_on(listener, metrics, health));
    Ok(bound)
}

/// Serves the three paths on `listener` with an existing recorder's `metrics` (tests, and
/// processes that install their recorder themselves).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Health,
) {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Served { metrics, health });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the /metrics, /healthz and /readyz listener stopped");
    }
}

async fn upkeep(metrics: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tick.tick().await;
        metrics.run_upkeep();
    }
}

async fn render_metrics(
    State(served): State<Served>,
) -> ([(&'static str, &'static str); 1], String) {
    let mut page = served.metrics.render();
    crate::histogram::FixedHistogram::render_registered(&mut page);
    ([("content-type", "text/plain; version=0.0.4")], page)
}

fn answer(result: Result<(), NotReady>) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(NotReady(reasons)) => {
            let mut body = reasons.join("\n");
            body.push('\n');
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
    }
}

async fn healthz(State(served): State<Served>) -> (StatusCode, String) {
    answer(served.health.alive())
}

async fn readyz(State(served): State<Served>) -> (StatusCode, String) {
    answer(served.health.ready())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One plain HTTP/1.1 GET on loopback: the status code and the body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }

    #[tokio::test]
    async fn probes_answer_the_health_state_and_metrics_render() {
        let health = Health::new(Duration::from_secs(60));
        health.expect("partitions", "none assigned yet");
        let recorder = PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("flowlog_test_things_total").increment(3);
        });
        let latency =
            crate::histogram::FixedHistogram::register("flowlog_test_served_seconds", &[0.5, 1.0]);
        let mut tally = latency.tally();
        tally.record(0.75);
        latency.add(&mut tally);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_on(listener, metrics, health.clone()));

        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_string()));
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "partitions: none assigned yet\n".to_string())
        );
        health.set_ready("partitions");
        assert_eq!(get(addr, "/readyz").await, (200, "ok\n".to_string()));
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.lines().any(|l| l == "flowlog_test_things_total 3"),
            "{body}"
        );
        // The registered histograms are on the page after the recorder's metrics.
        let served = body
            .find("flowlog_test_served_seconds_bucket{le=\"1\"} 1")
            .unwrap();
        assert!(
            body.find("flowlog_test_things_total 3").unwrap() < served,
            "{body}"
        );
        assert!(
            body.lines()
                .any(|l| l == "flowlog_test_served_seconds_count 1"),
            "{body}"
        );
        assert_eq!(get(addr, "/nothing").await.0, 404);
    }
}
