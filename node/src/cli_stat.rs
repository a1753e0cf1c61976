//! `shoal stat`: the golden signals of one node's edges and routes, from its
//! admin API's `/v1/stats` (and its opaque TCP edges from `/v1/stats/tcp`),
//! as tables (`--json`: the HTTP rows as JSON;
//! `--watch`: again every 2 s). `shoal tap`: the live request stream
//! (`/v1/tap`, see `tap.rs`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

/// How often `--watch` redraws.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// `shoal stat` flags.
#[derive(Debug, clap::Args)]
pub struct StatArgs {
    /// The node's admin address.
    #[arg(long, default_value = "127.0.0.1:9000", env = "SHOAL_ADMIN")]
    pub admin: String,
    /// Print the rows as JSON (what `/v1/stats` answers) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Redraw every 2 s until Ctrl-C (a new table per interval when stdout
    /// is not a terminal; with `--json`, one JSON document per line).
    #[arg(long)]
    pub watch: bool,
}

/// `shoal tap` flags.
#[derive(Debug, clap::Args)]
pub struct TapArgs {
    /// The node's admin address.
    #[arg(long, default_value = "127.0.0.1:9000", env = "SHOAL_ADMIN")]
    pub admin: String,
    /// Only requests from or to this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Only these statuses: a class (`5xx`) or a code (`503`).
    #[arg(long)]
    pub status: Option<String>,
    /// File holding the node's admin bearer token (needed when the node has one).
    #[arg(long, env = "SHOAL_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print each event as its JSON line.
    #[arg(long)]
    pub json: bool,
}

/// `shoal tap`.
pub async fn tap_command(a: TapArgs) -> i32 {
    crate::tap::tap_command(
        &a.admin,
        a.service.as_deref(),
        a.status.as_deref(),
        a.token_file.as_deref(),
        a.json,
    )
    .await
}

/// `shoal stat`: fetches `/v1/stats` from `admin` and prints it; with
/// `watch`, again every 2 s.
pub async fn stat_command(a: StatArgs) -> i32 {
    let tty = std::io::stdout().is_terminal();
    loop {
        let edges =
            match crate::cli::get_json::<Vec<serde_json::Value>>(&a.admin, "/v1/stats").await {
                Ok(e) => e,
                Err(code) => return code,
            };
        let text = if a.json {
            let json = if a.watch {
                serde_json::to_string(&edges)
            } else {
                serde_json::to_string_pretty(&edges)
            };
            json.unwrap_or_default() + "\n"
        } else {
            let mut t = stat_table(&edges);
            // Opaque TCP edges, when the node has any.
            if let Ok(tcp) =
                crate::cli::get_json::<Vec<serde_json::Value>>(&a.admin, "/v1/stats/tcp").await
                && !tcp.is_empty()
            {
                t.push('\n');
                t.push_str(&tcp_table(&tcp));
            }
            t
        };
        let mut out = std::io::stdout().lock();
        let written = if a.watch && tty && !a.json {
            // Home the cursor and clear the screen, then redraw.
            write!(
                out,
                "\x1b[H\x1b[2J{} every 2s (Ctrl-C ends)\n\n{text}",
                a.admin
            )
        } else if a.watch && !a.json {
            writeln!(out, "{text}")
        } else {
            write!(out, "{text}")
        };
        // A closed stdout (`shoal stat --watch | head`) ends quietly.
        if written.and_then(|_| out.flush()).is_err() || !a.watch {
            return 0;
        }
        drop(out);
        tokio::time::sleep(WATCH_EVERY).await;
    }
}

/// Renders `/v1/stats` JSON as a table: a row per edge, then a row per
/// HTTPRoute on it (`(no route)` for its requests no HTTPRoute routed).
pub fn stat_table(edges: &[serde_json::Value]) -> String {
    let mut rows: Vec<[String; 12]> = vec![
        [
            "DIRECTION",
            "SOURCE",
            "DESTINATION",
            "ROUTE",
            "RPS",
            "SUCCESS",
            "FAILED",
            "DENIED",
            "LIMITED",
            "P50",
            "P95",
            "P99",
        ]
        .map(String::from),
    ];
    let row = |e: &serde_json::Value, v: &serde_json::Value, route: String| {
        let s = |k: &str| e[k].as_str().unwrap_or("-").to_string();
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        let n = |k: &str| v[k].as_u64().unwrap_or(0).to_string();
        [
            s("direction"),
            s("source"),
            s("destination"),
            route,
            format!("{:.1}", f("rps")),
            format!("{:.2}%", f("success_rate") * 100.0),
            n("failed"),
            n("denied"),
            n("rate_limited"),
            format!("{:.1}ms", f("p50_ms")),
            format!("{:.1}ms", f("p95_ms")),
            format!("{:.1}ms", f("p99_ms")),
        ]
    };
    for e in edges {
        rows.push(row(e, e, "-".into()));
        for r in e["routes"].as_array().into_iter().flatten() {
            let name = match r["route"].as_str().unwrap_or("") {
                "" => "(no route)".to_string(),
                n => n.to_string(),
            };
            rows.push(row(e, r, name));
        }
    }
    let mut out = crate::cli::render_table(&rows);
    if edges.is_empty() {
        out.push_str("(no traffic in the last minute)\n");
    }
    out
}

/// Renders `/v1/stats/tcp` JSON as a table: a row per opaque TCP edge
/// (totals since the node started).
pub fn tcp_table(edges: &[serde_json::Value]) -> String {
    let mut rows: Vec<[String; 9]> = vec![
        [
            "TCP",
            "SOURCE",
            "DESTINATION",
            "OPENED",
            "OPEN",
            "CLEAN",
            "FAILED",
            "TO-SERVICE",
            "FROM-SERVICE",
        ]
        .map(String::from),
    ];
    for e in edges {
        let s = |k: &str| e[k].as_str().unwrap_or("-").to_string();
        let n = |k: &str| e[k].as_u64().unwrap_or(0);
        let closed = e["closed"].as_object();
        let clean = closed
            .and_then(|c| c.get("clean"))
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let all: u64 = closed
            .map(|c| c.values().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0);
        rows.push([
            s("direction"),
            s("source"),
            s("destination"),
            n("opened").to_string(),
            n("open").to_string(),
            clean.to_string(),
            (all - clean).to_string(),
            bytes(n("bytes_to_service")),
            bytes(n("bytes_from_service")),
        ]);
    }
    crate::cli::render_table(&rows)
}

/// `1234567` → `1.2MB`.
fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1}GB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1}MB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1}KB", n as f64 / 1024.0),
        n => format!("{n}B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_table_counts_clean_and_failed_closes() {
        let edge = serde_json::json!({
            "direction": "outbound", "source": "app", "destination": "db",
            "opened": 4, "open": 1,
            "closed": {"clean": 2, "reset": 1, "refused": 3},
            "bytes_to_service": 2048, "bytes_from_service": 3_145_728u64
        });
        let table = tcp_table(&[edge]);
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            row,
            [
                "outbound", "app", "db", "4", "1", "2", "4", "2.0KB", "3.0MB"
            ],
            "{table}"
        );
    }

    #[test]
    fn table_shows_rates_failure_classes_and_routes() {
        let edge = serde_json::json!({
            "direction": "outbound", "source": "a", "destination": "b",
            "rps": 1.5, "success_rate": 0.8182, "failed": 15, "denied": 5,
            "rate_limited": 0, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0,
            "routes": [
                {"route": "", "rps": 0.5, "success_rate": 1.0, "failed": 0, "denied": 0,
                 "rate_limited": 0, "p50_ms": 1.0, "p95_ms": 1.0, "p99_ms": 1.0},
                {"route": "canary", "rps": 1.0, "success_rate": 0.25, "failed": 15, "denied": 5,
                 "rate_limited": 0, "p50_ms": 2.0, "p95_ms": 3.0, "p99_ms": 3.0}
            ]
        });
        let table = stat_table(&[edge]);
        let cells = |n: usize| -> Vec<String> {
            table
                .lines()
                .nth(n)
                .unwrap()
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        assert_eq!(
            cells(1)[3..9],
            ["-", "1.5", "81.82%", "15", "5", "0"],
            "{table}"
        );
        assert_eq!(cells(2)[3..6], ["(no", "route)", "0.5"], "{table}");
        assert_eq!(cells(3)[3..6], ["canary", "1.0", "25.00%"], "{table}");
        assert!(stat_table(&[]).contains("no traffic"));
    }
}
