//! The `simulate` binary: exit codes and output people and CI rely on.

use std::process::Command;

fn simulate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_simulate"))
}

#[test]
fn list_shows_every_bundled_scenario() {
    let out = simulate().arg("list").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "ci/partition-heal.toml",
        "ci/lossy-network.toml",
        "ci/crash-restart.toml",
        "partition-heal.toml",
        "lossy-network.toml",
        "crash-restart.toml",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert!(!text.contains("INVALID"), "{text}");
}

#[test]
fn an_invalid_scenario_is_bad_usage_naming_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "duration = \"5s\"\n[cluster]\nnodes = 3\n[[step]]\nat = \"1s\"\ndo = \"crash\"\nnode = \"n9\"\n",
    )
    .unwrap();
    let out = simulate().arg("run").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("step 1 (crash at 1s)") && err.contains("n9"),
        "{err}"
    );
}

#[test]
fn a_failing_invariant_exits_non_zero_and_prints_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("strict.toml");
    // Nobody detects a crash in 10 ms: this bound must fail.
    std::fs::write(
        &file,
        r#"
duration = "3s"
[cluster]
nodes = 3
[[step]]
at = "1s"
do = "crash"
node = "n3"
[[invariant]]
kind = "dead-detected"
within = "10ms"
"#,
    )
    .unwrap();
    let out = simulate()
        .args(["run", "--seed", "7"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("seed 7") && text.contains("FAIL"), "{text}");
}

#[test]
fn model_refuses_beyond_the_ceiling_and_runs_below_it() {
    let out = simulate()
        .args(["model", "--nodes", "100000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ceiling"), "{err}");

    let out = simulate()
        .args(["model", "--nodes", "8", "--loss", "0.1", "--seed", "3"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("seed 3") && text.contains("endpoint 99%"),
        "{text}"
    );

    // Zones, churn and a partition through the flags; the row and the
    // partition line come out.
    let out = simulate()
        .args([
            "model",
            "--nodes",
            "12",
            "--zones",
            "2",
            "--churn",
            "1",
            "--partition-zone",
            "1",
            "--seed",
            "5",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("2 zone(s)"), "{text}");
    assert!(text.contains("partition of zone 1"), "{text}");

    let out = simulate()
        .args([
            "model",
            "--nodes",
            "12",
            "--zones",
            "2",
            "--partition-zone",
            "2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--partition-zone"));
}
