//! The reports' DataFusion SQL (`sql/*.sql`, compiled in) with the request's parameters put
//! in as literals: DataFusion has no session variables, and its `$1` parameters are for
//! prepared statements, not for the views the reports are built on.
use crate::{Report, Request};

/// The table the window's Parquet files are registered as (read by `sql/views.sql`).
pub const FILES_TABLE: &str = "flow_files";

const VIEWS: &str = include_str!("../sql/views.sql");
const CONNECTIONS: &str = include_str!("../sql/connections.sql");
const AVAILABILITY: &str = include_str!("../sql/availability.sql");
const AUDIT: &str = include_str!("../sql/audit.sql");
const CAPACITY: &str = include_str!("../sql/capacity.sql");

/// Which connections a report keeps: those with an end that matches every filter given.
/// Ends are matched by the names the reports show (`namespace/workload`, or the name, or the
/// address) and by the host that recorded them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    /// Either end's owner is in this namespace.
    pub namespace: Option<String>,
    /// Either end's owner is this workload: `name` (in any namespace) or `namespace/name`.
    pub workload: Option<String>,
    /// Either end was recorded by this host.
    pub host: Option<String>,
}

impl Filters {
    /// The condition on `all_connections`' columns, `TRUE` when there is no filter.
    fn condition(&self) -> String {
        let mut parts = Vec::new();
        if let Some(ns) = &self.namespace {
            let prefix = quote(&format!("{ns}/"));
            parts.push(format!(
                "(starts_with(client, {prefix}) OR starts_with(server, {prefix}))"
            ));
        }
        if let Some(workload) = &self.workload {
            let exact = quote(workload);
            let any_namespace = quote(&format!("/{workload}"));
            parts.push(format!(
                "(client = {exact} OR server = {exact} OR ends_with(client, {any_namespace}) \
                 OR ends_with(server, {any_namespace}))"
            ));
        }
        if let Some(host) = &self.host {
            let host = quote(host);
            parts.push(format!("(client_host = {host} OR server_host = {host})"));
        }
        if parts.is_empty() {
            "TRUE".into()
        } else {
            parts.join(" AND ")
        }
    }
}

/// A SQL string literal.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The start of the window of the same length just before `[from, to)`, clamped at 0 (every
/// `end_ns` is at or after it then, as in DuckDB's wider arithmetic).
pub fn previous_from_ns(from_ns: u64, to_ns: u64) -> u64 {
    from_ns.saturating_sub(to_ns.saturating_sub(from_ns))
}

fn substitute(sql: &str, request: &Request) -> String {
    let price = format!("{:?}", request.price_per_gb);
    let values = [
        (
            "${skew_ns}",
            request.skew.as_nanos().min(u64::MAX as u128).to_string(),
        ),
        ("${from_ns}", request.from_ns.to_string()),
        ("${to_ns}", request.to_ns.to_string()),
        (
            "${prev_from_ns}",
            previous_from_ns(request.from_ns, request.to_ns).to_string(),
        ),
        ("${filter}", request.filters.condition()),
        ("${price_per_gb}", format!("CAST({price} AS DOUBLE)")),
    ];
    let mut out = sql.to_string();
    for (name, value) in values {
        out = out.replace(name, &value);
    }
    out
}

/// The statements of a SQL text: separated by `;` at the end of a line, comments dropped.
fn statements(text: &str) -> Vec<String> {
    text.split(";\n")
        .map(|part| {
            part.lines()
                .filter(|line| !line.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .map(|s| s.trim().trim_end_matches(';').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The `CREATE VIEW` statements every report is built on, in order.
pub fn views(request: &Request) -> Vec<String> {
    statements(VIEWS)
        .iter()
        .map(|s| substitute(s, request))
        .collect()
}

/// The report's query.
pub fn report(request: &Request) -> String {
    let text = match request.report {
        Report::Connections => CONNECTIONS,
        Report::Availability => AVAILABILITY,
        Report::Audit => AUDIT,
        Report::Capacity => CAPACITY,
    };
    let mut statements = statements(text);
    assert_eq!(statements.len(), 1, "one query per report file");
    substitute(&statements.remove(0), request)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn request(report: Report) -> Request {
        Request {
            report,
            data: "x".into(),
            from_ns: 10,
            to_ns: 25,
            skew: Duration::from_secs(1),
            price_per_gb: 0.01,
            margin: Duration::ZERO,
            filters: Filters::default(),
        }
    }

    #[test]
    fn every_parameter_is_replaced() {
        for report in Report::ALL {
            let r = request(report);
            for text in views(&r).into_iter().chain([super::report(&r)]) {
                assert!(!text.contains("${"), "{report}: {text}");
            }
        }
        assert_eq!(views(&request(Report::Audit)).len(), 5);
    }

    #[test]
    fn the_previous_window_is_as_long_and_clamped_at_zero() {
        assert_eq!(previous_from_ns(10, 25), 0);
        assert_eq!(previous_from_ns(100, 130), 70);
        assert_eq!(previous_from_ns(0, u64::MAX), 0);
    }

    #[test]
    fn filters_quote_their_values() {
        let f = Filters {
            namespace: Some("o'neil".into()),
            workload: None,
            host: Some("h".into()),
        };
        assert_eq!(
            f.condition(),
            "(starts_with(client, 'o''neil/') OR starts_with(server, 'o''neil/')) AND \
             (client_host = 'h' OR server_host = 'h')"
        );
        assert_eq!(Filters::default().condition(), "TRUE");
    }
}
