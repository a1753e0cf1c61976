//! A running `shoal node` keeps mapped only the code it still runs: two
//! real processes of the same binary side by side, one with the periodic
//! code release turned off (`SHOAL_NO_CODE_RELEASE=1`), compared from
//! outside through `/proc/PID/status`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tests::rogue_proxy::shoal_binary;
use tests::{Pki, admin_get, eventually};

/// A `shoal node` process, killed on drop.
struct Proc {
    child: Child,
    admin: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(pki: &Pki, name: &str, keep_code: bool) -> Proc {
        let mut cmd = Command::new(shoal_binary());
        cmd.args(["node", "--name", name, "--listen", "127.0.0.1:0"])
            .args(["--admin", "127.0.0.1:0"])
            .arg("--certs")
            .arg(pki.issue(name, &["web"]))
            .env_remove("SHOAL_NO_CODE_RELEASE")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if keep_code {
            cmd.env("SHOAL_NO_CODE_RELEASE", "1");
        }
        let mut child = cmd.spawn().expect("start shoal node");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let admin = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
            .unwrap_or_else(|| panic!("no admin= in {line:?}"))
            .parse()
            .unwrap();
        Proc { child, admin }
    }

    /// A `/proc/PID/status` figure in kB.
    fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_node_lets_go_of_code_pages_it_no_longer_runs() {
    let pki = Pki::new("test.shoal");
    let kept = Proc::start(&pki, "kept", true);
    let released = Proc::start(&pki, "released", false);
    // Both answer their admin API: the code that was let go runs again
    // when needed.
    for p in [&kept, &released] {
        let (status, _) = admin_get(p.admin, "/healthz").await;
        assert_eq!(status, 200);
    }
    let (kept_kb, released_kb) = eventually(
        "the released node maps a fifth less of its files",
        Duration::from_secs(30),
        || async {
            let k = kept.status_kb("RssFile:");
            let r = released.status_kb("RssFile:");
            (r * 5 < k * 4).then_some((k, r))
        },
    )
    .await;
    // Anonymous memory is not touched by the release.
    let (ka, ra) = (kept.status_kb("RssAnon:"), released.status_kb("RssAnon:"));
    eprintln!(
        "file-backed resident: kept {kept_kb} kB, released {released_kb} kB; anon {ka} / {ra} kB"
    );
    // And it still serves after a release: the metrics endpoint runs code
    // that ran only once before (at start-up, building the registry).
    let (status, body) = admin_get(released.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("shoal_"), "{body}");
}
