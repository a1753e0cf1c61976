//! The crash-under-load scenario is meaningful: with the node's retry path
//! broken (`retry_max_attempts = 1`, so a request that meets the crashed
//! instance is never tried on the other one), its idempotent-success
//! invariant fails; with retries intact, the same scenario passes. The
//! scenario's upstreams take 200 ms to answer, so several requests are in
//! flight on the crashed node when it goes.

use simulate::{RunOptions, Scenario, run_scenario};

fn bundled(broken: bool) -> Scenario {
    let path = simulate::bundled_dir().join("ci/crash-under-load.toml");
    let mut text = std::fs::read_to_string(&path).expect("bundled scenario");
    if broken {
        text.push_str("\n[node]\nretry_max_attempts = 1\n");
    }
    Scenario::parse_in(&text, "crash-under-load", path.parent().unwrap()).expect("valid")
}

fn idempotent_verdict(report: &simulate::Report) -> &simulate::invariants::Verdict {
    report
        .verdicts
        .iter()
        .find(|v| v.name.starts_with("idempotent requests succeed"))
        .expect("the scenario judges idempotent success")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_under_load_fails_when_retries_are_off() {
    let report = run_scenario(
        &bundled(true),
        &RunOptions {
            seed: 42,
            ..RunOptions::default()
        },
    )
    .await
    .expect("run");
    let v = idempotent_verdict(&report);
    eprintln!("{}", report.table());
    assert!(!v.passed, "{v:?}");
    assert!(v.detail.contains("first failure"), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_under_load_passes_with_retries() {
    let report = run_scenario(
        &bundled(false),
        &RunOptions {
            seed: 42,
            ..RunOptions::default()
        },
    )
    .await
    .expect("run");
    eprintln!("{}", report.table());
    assert!(idempotent_verdict(&report).passed, "{}", report.table());
}
