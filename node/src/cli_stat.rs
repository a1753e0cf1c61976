//! `shoal stat`: the golden signals of one node's edges, from its admin API's
//! `/v1/stats`, as a table.

/// `shoal stat`: fetches `/v1/stats` from `admin` and prints a table.
pub async fn stat_command(admin: &str) -> i32 {
    match crate::cli::get_json::<Vec<serde_json::Value>>(admin, "/v1/stats").await {
        Ok(edges) => {
            print!("{}", stat_table(&edges));
            0
        }
        Err(code) => code,
    }
}

/// Renders `/v1/stats` JSON as a table.
pub fn stat_table(edges: &[serde_json::Value]) -> String {
    let mut rows: Vec<[String; 11]> = vec![
        [
            "DIRECTION",
            "SOURCE",
            "DESTINATION",
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
    for e in edges {
        let s = |k: &str| e[k].as_str().unwrap_or("-").to_string();
        let f = |k: &str| e[k].as_f64().unwrap_or(0.0);
        let n = |k: &str| e[k].as_u64().unwrap_or(0).to_string();
        rows.push([
            s("direction"),
            s("source"),
            s("destination"),
            format!("{:.1}", f("rps")),
            format!("{:.2}%", f("success_rate") * 100.0),
            n("failed"),
            n("denied"),
            n("rate_limited"),
            format!("{:.1}ms", f("p50_ms")),
            format!("{:.1}ms", f("p95_ms")),
            format!("{:.1}ms", f("p99_ms")),
        ]);
    }
    let mut out = crate::cli::render_table(&rows);
    if edges.is_empty() {
        out.push_str("(no traffic in the last minute)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_rates_and_failure_classes() {
        let edge = serde_json::json!({
            "direction": "outbound", "source": "a", "destination": "b",
            "rps": 1.5, "success_rate": 0.8182, "failed": 15, "denied": 5,
            "rate_limited": 0, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0
        });
        let table = stat_table(&[edge]);
        let row = table.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[4..8], ["81.82%", "15", "5", "0"], "{table}");
        assert!(stat_table(&[]).contains("no traffic"));
    }
}
