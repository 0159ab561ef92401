//! `--format html`: one self-contained page of the three reports — a service map, the
//! availability, audit and capacity tables, and bytes by hour — that opens from a file with no
//! network access (styles, script and drawings are inline; nothing is fetched).
//!
//! The map and the chart are SVG drawn here, not by a script, so the page reads the same with
//! scripts off and its content can be checked in the DOM. The one script sorts a table when its
//! header is clicked. SVG elements are written `name {}` (an end tag), never `name;`: an HTML
//! parser reads an unclosed `<rect>` inside `<svg>` as the parent of everything after it.

use std::collections::BTreeMap;
use std::f64::consts::PI;

use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::Value;

use crate::{Format, Report, ReportError, Request, Rows, time};

/// Rows of one report as the engine returned them: column names and values in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl Table {
    /// A report's rows as JSON values (as `--format json` writes them), in the columns' order.
    pub fn from_rows(rows: &Rows) -> Result<Table, ReportError> {
        let error = |source: Box<dyn std::error::Error + Send + Sync>| ReportError::Write {
            format: Format::Html,
            source,
        };
        let mut json = Vec::new();
        crate::output::write(rows, Format::Json, &mut json)?;
        let objects: Vec<serde_json::Map<String, Value>> =
            serde_json::from_slice(&json).map_err(|e| error(Box::new(e)))?;
        let columns: Vec<String> = rows
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let rows = objects
            .into_iter()
            .map(|mut object| {
                columns
                    .iter()
                    .map(|c| object.remove(c).unwrap_or(Value::Null))
                    .collect()
            })
            .collect();
        Ok(Table { columns, rows })
    }

    /// The value of column `name` in row `row`, if the report has that column.
    pub fn get<'a>(&'a self, row: &'a [Value], name: &str) -> Option<&'a Value> {
        let at = self.columns.iter().position(|c| c == name)?;
        row.get(at)
    }

    fn text(&self, row: &[Value], name: &str) -> String {
        match self.get(row, name) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(v) => v.to_string(),
        }
    }

    fn number(&self, row: &[Value], name: &str) -> f64 {
        match self.get(row, name) {
            Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
            Some(Value::String(s)) => s.parse().unwrap_or(0.0),
            Some(Value::Bool(b)) => f64::from(u8::from(*b)),
            _ => 0.0,
        }
    }
}

/// What the page shows: the window it covers and the three reports over it.
#[derive(Debug, Clone)]
pub struct Page<'a> {
    /// The window, as the user gave it or as resolved (shown in the heading).
    pub window: &'a str,
    pub availability: &'a Table,
    pub audit: &'a Table,
    pub capacity: &'a Table,
    /// The connections report, when it was the one asked for (its table goes last).
    pub connections: Option<&'a Table>,
}

/// Runs the availability, audit and capacity reports over `request`'s window and filters (and
/// the connections report when that is the one asked for) and renders the page.
pub async fn page(request: &Request) -> Result<String, ReportError> {
    let table = |report: Report| {
        let request = Request {
            report,
            ..request.clone()
        };
        async move { Table::from_rows(&crate::run(&request).await?) }
    };
    let availability = table(Report::Availability).await?;
    let audit = table(Report::Audit).await?;
    let capacity = table(Report::Capacity).await?;
    let connections = match request.report {
        Report::Connections => Some(table(Report::Connections).await?),
        _ => None,
    };
    let window = format!(
        "{} .. {}",
        time::display_ns(request.from_ns),
        time::display_ns(request.to_ns)
    );
    Ok(render(&Page {
        window: &window,
        availability: &availability,
        audit: &audit,
        capacity: &capacity,
        connections: connections.as_ref(),
    }))
}

/// One edge of the service map: a client talking to a server, over all the server's ports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Edge {
    pub client: String,
    pub server: String,
    pub ports: Vec<String>,
    pub connections: u64,
    pub bytes: u64,
    /// Failed connects and resets on this edge (from the availability report).
    pub failed: u64,
    pub resets: u64,
}

impl Edge {
    /// Marked on the map: any failed connect or reset.
    pub fn failing(&self) -> bool {
        self.failed > 0 || self.resets > 0
    }
}

/// The map's edges: the audit report's rows (every distinct edge) summed over ports, with the
/// availability report's failed connects and resets. Sorted by (client, server).
pub fn edges(audit: &Table, availability: &Table) -> Vec<Edge> {
    let mut edges: BTreeMap<(String, String), Edge> = BTreeMap::new();
    for row in &audit.rows {
        let (client, server) = (audit.text(row, "client"), audit.text(row, "server"));
        let edge = edges
            .entry((client.clone(), server.clone()))
            .or_insert_with(|| Edge {
                client,
                server,
                ..Edge::default()
            });
        let port = audit.text(row, "server_port");
        if !edge.ports.contains(&port) {
            edge.ports.push(port);
        }
        edge.connections += audit.number(row, "connections") as u64;
        edge.bytes += (audit.number(row, "bytes_up") + audit.number(row, "bytes_down")) as u64;
    }
    for row in &availability.rows {
        let key = (
            availability.text(row, "client"),
            availability.text(row, "server"),
        );
        if let Some(edge) = edges.get_mut(&key) {
            edge.failed += availability.number(row, "failed") as u64;
            edge.resets += availability.number(row, "resets") as u64;
        }
    }
    edges.into_values().filter(|e| e.connections > 0).collect()
}

/// Bytes each way per hour (capacity report), in hour order: (hour, up, down).
pub fn bytes_by_hour(capacity: &Table) -> Vec<(String, u64, u64)> {
    let mut hours: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for row in &capacity.rows {
        let hour = hours.entry(capacity.text(row, "hour")).or_default();
        hour.0 += capacity.number(row, "bytes_up") as u64;
        hour.1 += capacity.number(row, "bytes_down") as u64;
    }
    hours
        .into_iter()
        .map(|(hour, (up, down))| (hour, up, down))
        .collect()
}

/// The whole page.
pub fn render(page: &Page) -> String {
    let edges = edges(page.audit, page.availability);
    let hours = bytes_by_hour(page.capacity);
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "flowlog report, " (page.window) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "flowlog report" }
                p.window { "Window: " (page.window) }
                section #map {
                    h2 { "Service map" }
                    p.legend {
                        "Workloads and the addresses no inventory owns; an arrow from client to \
                         server, as wide as the bytes it carried; "
                        span.failing-key { "red and dashed" }
                        " where connects failed or connections were reset."
                    }
                    (service_map(&edges))
                }
                section #hours {
                    h2 { "Bytes by hour" }
                    (hour_chart(&hours))
                }
                (report_section("availability", "Availability", page.availability))
                (report_section("audit", "Audit", page.audit))
                (report_section("capacity", "Capacity", page.capacity))
                @if let Some(connections) = page.connections {
                    (report_section("connections", "Connections", connections))
                }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    };
    markup.into_string()
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 560.0;

/// Nodes on a circle in name order (stable from run to run), edges as arcs between them, so the
/// two directions of a pair do not overlap.
fn service_map(edges: &[Edge]) -> Markup {
    let mut names: Vec<&str> = edges
        .iter()
        .flat_map(|e| [e.client.as_str(), e.server.as_str()])
        .collect();
    names.sort_unstable();
    names.dedup();
    let (cx, cy) = (WIDTH / 2.0, HEIGHT / 2.0);
    let radius = if names.len() <= 1 {
        0.0
    } else {
        HEIGHT / 2.0 - 70.0
    };
    let at = |name: &str| -> (f64, f64) {
        let i = names.iter().position(|n| *n == name).unwrap_or(0);
        let angle = 2.0 * PI * i as f64 / names.len().max(1) as f64 - PI / 2.0;
        (cx + radius * angle.cos(), cy + radius * angle.sin())
    };
    let max_bytes = edges.iter().map(|e| e.bytes).max().unwrap_or(0);
    let width = |bytes: u64| {
        1.5 + 8.0 * ((bytes as f64 + 1.0).ln() / (max_bytes as f64 + 1.0).ln().max(1.0))
    };
    html! {
        svg.map xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {WIDTH} {HEIGHT}"))
            role="img" aria-label="service map" {
            defs {
                // A fixed size: by default a marker scales with the stroke, and wide edges would get
                // arrowheads larger than the nodes.
                marker #arrow viewBox="0 0 10 10" refX="10" refY="5" markerUnits="userSpaceOnUse"
                    markerWidth="12" markerHeight="12" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" fill="context-stroke" {}
                }
            }
            @for edge in edges {
                @let (from, to) = (at(&edge.client), at(&edge.server));
                path class=(if edge.failing() { "edge failing" } else { "edge" })
                    d=(arc(from, to)) stroke-width=(format!("{:.1}", width(edge.bytes)))
                    marker-end="url(#arrow)"
                    data-client=(edge.client) data-server=(edge.server)
                    data-ports=(edge.ports.join(",")) data-bytes=(edge.bytes)
                    data-connections=(edge.connections) data-failed=(edge.failed)
                    data-resets=(edge.resets) {
                    title {
                        (edge.client) " → " (edge.server) ":" (edge.ports.join(",")) ": "
                        (edge.connections) " connections, " (human_bytes(edge.bytes))
                        @if edge.failed > 0 { ", " (edge.failed) " failed" }
                        @if edge.resets > 0 { ", " (edge.resets) " reset" }
                    }
                }
            }
            @for name in &names {
                @let (x, y) = at(name);
                // The label outside the circle of nodes, where the edges are not.
                @let (dx, dy) = if radius > 0.0 { ((x - cx) / radius, (y - cy) / radius) } else { (0.0, -1.0) };
                @let anchor = if dx > 0.3 { "start" } else if dx < -0.3 { "end" } else { "middle" };
                g.node data-name=(name) {
                    circle cx=(format!("{x:.1}")) cy=(format!("{y:.1}")) r="9" {}
                    text x=(format!("{:.1}", x + dx * 16.0)) y=(format!("{:.1}", y + dy * 16.0 + 4.0))
                        text-anchor=(anchor) { (name) }
                }
            }
        }
    }
}

/// A quadratic arc from `from` to `to`, bowed to its left and stopping short of the target node.
fn arc(from: (f64, f64), to: (f64, f64)) -> String {
    let (dx, dy) = (to.0 - from.0, to.1 - from.1);
    let len = (dx * dx + dy * dy).sqrt();
    if len < 1.0 {
        // An edge from a node to itself (a workload talking to itself): a loop above it.
        let (x, y) = from;
        return format!(
            "M {:.1} {:.1} C {:.1} {:.1} {:.1} {:.1} {:.1} {:.1}",
            x - 6.0,
            y - 8.0,
            x - 40.0,
            y - 70.0,
            x + 40.0,
            y - 70.0,
            x + 6.0,
            y - 9.0
        );
    }
    let (ux, uy) = (dx / len, dy / len);
    let end = (to.0 - ux * 12.0, to.1 - uy * 12.0);
    let bow = len * 0.15;
    let control = (
        (from.0 + to.0) / 2.0 + uy * bow,
        (from.1 + to.1) / 2.0 - ux * bow,
    );
    format!(
        "M {:.1} {:.1} Q {:.1} {:.1} {:.1} {:.1}",
        from.0, from.1, control.0, control.1, end.0, end.1
    )
}

/// Stacked bars per hour: bytes client → server and server → client.
fn hour_chart(hours: &[(String, u64, u64)]) -> Markup {
    let (height, bar_area) = (260.0, 200.0);
    let slot = (WIDTH - 80.0) / hours.len().max(1) as f64;
    let max = hours.iter().map(|h| h.1 + h.2).max().unwrap_or(0).max(1) as f64;
    html! {
        @if hours.is_empty() {
            p { "No connections in the window." }
        } @else {
            svg.hours xmlns="http://www.w3.org/2000/svg"
                viewBox=(format!("0 0 {WIDTH} {height}")) role="img"
                aria-label="bytes by hour" {
                @for (i, (hour, up, down)) in hours.iter().enumerate() {
                    @let x = 60.0 + i as f64 * slot + slot * 0.15;
                    @let w = slot * 0.7;
                    @let up_h = *up as f64 / max * bar_area;
                    @let down_h = *down as f64 / max * bar_area;
                    g.hour data-hour=(hour) data-bytes-up=(up) data-bytes-down=(down) {
                        title { (hour) ": " (human_bytes(*up)) " up, " (human_bytes(*down)) " down" }
                        rect.up x=(format!("{x:.1}")) y=(format!("{:.1}", 20.0 + bar_area - up_h))
                            width=(format!("{w:.1}")) height=(format!("{up_h:.1}")) {}
                        rect.down x=(format!("{x:.1}"))
                            y=(format!("{:.1}", 20.0 + bar_area - up_h - down_h))
                            width=(format!("{w:.1}")) height=(format!("{down_h:.1}")) {}
                        text x=(format!("{:.1}", x + w / 2.0)) y=(format!("{:.1}", height - 20.0))
                            text-anchor="middle" { (hour_label(hour)) }
                    }
                }
                text x="10" y="16" { (human_bytes(max as u64)) }
            }
            p.legend { span.up-key { "■" } " client → server " span.down-key { "■" } " server → client" }
        }
    }
}

fn report_section(id: &str, title: &str, table: &Table) -> Markup {
    html! {
        section id=(id) {
            h2 { (title) }
            @if table.rows.is_empty() {
                p { "No rows." }
            } @else {
                table.report data-report=(id) {
                    thead { tr { @for c in &table.columns { th title="click to sort" { (c) } } } }
                    tbody {
                        @for row in &table.rows {
                            tr {
                                @for v in row {
                                    @match v {
                                        Value::Number(n) => td.num { (n.to_string()) },
                                        Value::String(s) => td { (s) },
                                        Value::Null => td.null { "" },
                                        other => td { (other.to_string()) },
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// "2026-12-07T23:00:00" or "2026-12-07 23:00:00" → "12-07 23:00".
fn hour_label(hour: &str) -> String {
    let normal = hour.replace('T', " ");
    match (normal.get(5..10), normal.get(11..16)) {
        (Some(day), Some(time)) => format!("{day} {time}"),
        _ => hour.to_string(),
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1d2330; }
h1 { margin-bottom: 0.2rem; }
.window { color: #5a6372; margin-top: 0; }
svg.map, svg.hours { width: 100%; max-width: 900px; border: 1px solid #dde1e8; background: #fbfcfe; }
.edge { fill: none; stroke: #4a78c2; stroke-opacity: 0.75; }
.edge.failing { stroke: #d0342c; stroke-dasharray: 7 4; }
.node circle { fill: #1d2330; }
.node text { font-size: 12px; fill: #1d2330; }
rect.up { fill: #4a78c2; }
rect.down { fill: #9cb8e6; }
.up-key { color: #4a78c2; } .down-key { color: #9cb8e6; } .failing-key { color: #d0342c; }
table.report { border-collapse: collapse; font-size: 13px; margin-bottom: 1rem; }
table.report th, table.report td { border: 1px solid #dde1e8; padding: 3px 6px; }
table.report th { background: #eef1f6; cursor: pointer; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
"#;

/// Sorts a report table by the clicked column (numbers as numbers), toggling the direction.
const SCRIPT: &str = r#"
for (const table of document.querySelectorAll("table.report")) {
  table.querySelectorAll("th").forEach((th, col) => {
    th.addEventListener("click", () => {
      const body = table.tBodies[0];
      const up = th.dataset.order !== "asc";
      th.dataset.order = up ? "asc" : "desc";
      const key = (row) => {
        const cell = row.cells[col];
        const n = Number(cell.textContent);
        return cell.classList.contains("num") && !Number.isNaN(n) ? n : cell.textContent;
      };
      const rows = Array.from(body.rows);
      rows.sort((a, b) => {
        const [x, y] = [key(a), key(b)];
        const order = x < y ? -1 : x > y ? 1 : 0;
        return up ? order : -order;
      });
      rows.forEach((row) => body.appendChild(row));
    });
  });
}
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table(columns: &[&str], rows: Vec<Vec<Value>>) -> Table {
        Table {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows,
        }
    }

    fn sample() -> (Table, Table, Table) {
        let audit = table(
            &[
                "client",
                "server",
                "server_port",
                "connections",
                "bytes_up",
                "bytes_down",
            ],
            vec![
                vec![
                    json!("shop/web"),
                    json!("shop/db"),
                    json!(5432),
                    json!(3),
                    json!(100),
                    json!(2000),
                ],
                vec![
                    json!("shop/web"),
                    json!("shop/db"),
                    json!(5433),
                    json!(1),
                    json!(0),
                    json!(0),
                ],
                vec![
                    json!("shop/web"),
                    json!("10.0.0.9"),
                    json!(443),
                    json!(2),
                    json!(50),
                    json!(70),
                ],
            ],
        );
        let availability = table(
            &[
                "client",
                "server",
                "server_port",
                "connections",
                "failed",
                "resets",
            ],
            vec![
                vec![
                    json!("shop/web"),
                    json!("shop/db"),
                    json!(5432),
                    json!(3),
                    json!(0),
                    json!(1),
                ],
                vec![
                    json!("shop/web"),
                    json!("shop/db"),
                    json!(5433),
                    json!(1),
                    json!(1),
                    json!(0),
                ],
                vec![
                    json!("shop/web"),
                    json!("10.0.0.9"),
                    json!(443),
                    json!(2),
                    json!(0),
                    json!(0),
                ],
            ],
        );
        let capacity = table(
            &["hour", "client", "server", "bytes_up", "bytes_down"],
            vec![
                vec![
                    json!("2026-12-07T22:00:00"),
                    json!("shop/web"),
                    json!("shop/db"),
                    json!(100),
                    json!(2000),
                ],
                vec![
                    json!("2026-12-07T23:00:00"),
                    json!("shop/web"),
                    json!("10.0.0.9"),
                    json!(50),
                    json!(70),
                ],
                vec![
                    json!("2026-12-07T22:00:00"),
                    json!("shop/web"),
                    json!("10.0.0.9"),
                    json!(1),
                    json!(2),
                ],
            ],
        );
        (audit, availability, capacity)
    }

    #[test]
    fn edges_sum_ports_and_carry_failures() {
        let (audit, availability, _) = sample();
        let edges = edges(&audit, &availability);
        assert_eq!(edges.len(), 2);
        assert_eq!(
            edges[1],
            Edge {
                client: "shop/web".into(),
                server: "shop/db".into(),
                ports: vec!["5432".into(), "5433".into()],
                connections: 4,
                bytes: 2100,
                failed: 1,
                resets: 1,
            }
        );
        assert!(edges[1].failing() && !edges[0].failing());
        assert_eq!(edges[0].server, "10.0.0.9");
        assert_eq!(edges[0].bytes, 120);
    }

    #[test]
    fn hours_sum_both_ways_in_order() {
        let (_, _, capacity) = sample();
        assert_eq!(
            bytes_by_hour(&capacity),
            vec![
                ("2026-12-07T22:00:00".into(), 101, 2002),
                ("2026-12-07T23:00:00".into(), 50, 70),
            ]
        );
    }

    #[test]
    fn page_escapes_and_holds_every_part() {
        let (mut audit, availability, capacity) = sample();
        audit.rows[2][1] = json!("<script>alert(1)</script>");
        let page = render(&Page {
            window: "2026-12-07T22:00:00Z .. 2026-12-08T00:00:00Z",
            availability: &availability,
            audit: &audit,
            capacity: &capacity,
            connections: None,
        });
        assert!(!page.contains("<script>alert(1)"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert_eq!(page.matches("class=\"node\"").count(), 3);
        assert_eq!(page.matches("class=\"edge failing\"").count(), 1);
        assert_eq!(page.matches("class=\"hour\"").count(), 2);
        assert_eq!(page.matches("data-report=").count(), 3);
        // Self-contained: nothing to fetch (the SVG namespace is a name, not a fetch).
        assert!(
            !page.contains(" src=") && !page.contains("href=\"http") && !page.contains("url(http")
        );
    }
}
