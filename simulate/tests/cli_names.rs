//! `simulate run NAME` takes the names `simulate list` prints, from any
//! folder, and `simulate list` survives a reader that goes away.

use std::process::{Command, Stdio};

fn simulate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_simulate"))
}

#[test]
fn list_into_a_closed_pipe_exits_quietly() {
    let mut child = simulate()
        .arg("list")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader leaves before the first line, as `| head -0` would.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}

#[test]
fn run_accepts_bundled_names_from_any_folder() {
    let elsewhere = tempfile::tempdir().unwrap();
    for name in [
        "crash-restart",
        "crash-restart.toml",
        "ci/crash-restart.toml",
        "simulate/scenarios/crash-restart.toml",
    ] {
        // --processes with a binary that is not there stops right after the
        // scenario was found and parsed, before any node starts.
        let out = simulate()
            .args(["run", name, "--processes", "--shoal", "/nonexistent/shoal"])
            .current_dir(elsewhere.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("/nonexistent/shoal") && !err.contains("no bundled scenario"),
            "{name}: {err}"
        );
    }
    let out = simulate()
        .args(["run", "no-such-scenario"])
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("no bundled scenario by that name (see `simulate list`)"),
        "{err}"
    );
}
