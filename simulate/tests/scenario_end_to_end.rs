//! One short scenario end to end: real nodes, a real partition under QUIC,
//! a heal, verdicts, and the report files.

use simulate::{RunOptions, Scenario, run_scenario};

const SHORT: &str = r#"
name = "short-partition"
description = "Cut n1 from n2, n3 for 2 s, heal"
duration = "5s"

[cluster]
nodes = 3
gossip_interval = "100ms"

[[step]]
at = "1s"
do = "partition"
from = ["n1"]
to = ["n2", "n3"]

[[step]]
at = "3s"
do = "heal"

[[step]]
at = "3s"
do = "assert"
check = "alive"
node = "n1"
within = "8s"

[[invariant]]
kind = "converges"
within = "8s"

[[invariant]]
kind = "no-false-dead"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_heals_and_the_report_says_so() {
    let scenario = Scenario::parse(SHORT, "short").expect("valid scenario");
    let options = RunOptions {
        seed: 42,
        ..Default::default()
    };
    let report = run_scenario(&scenario, &options).await.expect("run");

    assert!(report.passed, "{}", report.table());
    assert_eq!(report.verdicts.len(), 3);
    let converged = &report.verdicts[0];
    assert!(converged.seconds.is_some_and(|s| s <= 8.0), "{converged:?}");
    assert!(report.trace.faults.cut > 0, "the partition dropped packets");
    assert_eq!(report.trace.steps.len(), 3);

    let table = report.table();
    assert!(table.contains("seed 42"), "{table}");
    assert!(table.contains("membership converges"), "{table}");

    let dir = tempfile::tempdir().unwrap();
    report.write(dir.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(json["seed"], 42);
    assert_eq!(json["passed"], true);
    let svg = std::fs::read_to_string(dir.path().join("timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("seed 42") && svg.contains("partition"));
}
