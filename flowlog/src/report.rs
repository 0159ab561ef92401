//! `flowlog report REPORT`: answers from the Parquet files flowlog wrote (this host's, or a
//! fleet's enricher output, locally or on S3) with the reports of `flowlog-report`. Parsed on
//! its own (`main` hands over when the first argument is `report`), so that the capture's flags
//! stay as they are and a build without the `report` feature drops DataFusion entirely.
use std::{io::Write as _, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use flowlog_report::{Filters, Format, Report, Request, time};

/// Reports over the Parquet files flowlog wrote: one row per connection, service health,
/// who talks to whom, bytes and cross-zone cost.
#[derive(Debug, Parser)]
#[command(name = "flowlog report", version)]
struct ReportArgs {
    /// connections: one row per TCP connection, its two ends joined. availability: per service
    /// pair, failed connects, resets, retransmit rate, RTT p50/p99, worst first, and whether it
    /// got worse than in the window before. audit: every edge with first/last seen, new edges,
    /// unowned and inexact ends. capacity: bytes by workload pair and hour, cross-zone cost.
    #[arg(value_enum)]
    report: Kind,
    /// The files: flowlog's output directory, `file:///dir` or `s3://bucket/prefix`
    /// (credentials and endpoint from the `AWS_*` variables; `AWS_ENDPOINT_URL`,
    /// `AWS_ALLOW_HTTP=true` for an S3-compatible store).
    #[arg(long, env = "FLOWLOG_DATA", default_value = "flowlogs")]
    data: String,
    /// Start of the window: RFC 3339 (`2026-12-07T22:00:00Z`), relative to now (`-1h`), `now`,
    /// or ns since the epoch. Connections that overlap the window are reported.
    #[arg(long, default_value = "-1h", allow_hyphen_values = true)]
    from: String,
    /// End of the window (excluded), in the same forms.
    #[arg(long, default_value = "now", allow_hyphen_values = true)]
    to: String,
    /// Output: `table` (aligned, times as RFC 3339), `csv`, `json` (an array of objects, one
    /// per row; times as ns since the epoch), or `html`: one self-contained page with a
    /// service map, bytes by hour and the availability, audit and capacity tables (and the
    /// connections table when that is the report named), whichever report is named.
    #[arg(long, default_value = "table", value_parser = Format::NAMES)]
    format: String,
    /// How far two hosts' clocks may disagree: the two ends of a connection must overlap
    /// within it.
    #[arg(long, default_value = "1s", value_parser = flowlog_cli::parse_duration_or_zero)]
    skew: Duration,
    /// Price of a GB (2^30 bytes) crossing zones, in each direction (AWS's inter-AZ rate).
    #[arg(long, default_value_t = 0.01)]
    price_per_gb: f64,
    /// Partitions this far outside the window are read too, so that connections crossing its
    /// edges are counted whole.
    #[arg(long, default_value = "1h", value_parser = flowlog_cli::parse_duration_or_zero)]
    margin: Duration,
    /// Only connections with an end in this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only connections with an end of this workload (`name` or `namespace/name`).
    #[arg(long)]
    workload: Option<String>,
    /// Only connections with an end recorded by this host.
    #[arg(long)]
    host: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    Connections,
    Availability,
    Audit,
    Capacity,
}

impl From<Kind> for Report {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Connections => Report::Connections,
            Kind::Availability => Report::Availability,
            Kind::Audit => Report::Audit,
            Kind::Capacity => Report::Capacity,
        }
    }
}

async fn run(args: ReportArgs) -> anyhow::Result<()> {
    let now = time::now_ns();
    let request = Request {
        report: args.report.into(),
        data: args.data,
        from_ns: time::parse_time("--from", &args.from, now)?,
        to_ns: time::parse_time("--to", &args.to, now)?,
        skew: args.skew,
        price_per_gb: args.price_per_gb,
        margin: args.margin,
        filters: Filters {
            namespace: args.namespace,
            workload: args.workload,
            host: args.host,
        },
    };
    let format: Format = args.format.parse().map_err(anyhow::Error::msg)?;
    let mut out = std::io::stdout().lock();
    if format == Format::Html {
        let page = flowlog_report::html::page(&request).await?;
        out.write_all(page.as_bytes())
            .context("writing to stdout")?;
    } else {
        let rows = flowlog_report::run(&request).await?;
        flowlog_report::output::write(&rows, format, &mut out)?;
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}

/// `flowlog report …` with the process's arguments (the first is `report`).
pub fn main() -> ExitCode {
    let args = ReportArgs::parse_from(std::env::args_os().skip(1));
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    flowlog_cli::main(flowlog_cli::Runtime::Workers(workers), run(args))
}
