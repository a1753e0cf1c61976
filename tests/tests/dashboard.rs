//! The web dashboard at `/ui`, rendered by a real browser: headless
//! Chromium (Debian package `chromium`) loads it from a running mesh, and
//! the test reads the rendered DOM — member names, a service's success
//! rate, a policy's applied-on count — before and after traffic with
//! failures. The expected texts come from what the test itself sent.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Response, StatusCode};
use tests::admin_get;
use tests::traffic::*;

/// How long one browser run may take before it is killed.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the page's content may take to show what the test expects.
const RENDER_DEADLINE: Duration = Duration::from_secs(60);

const MEMBERS: [&str; 3] = ["ui-client", "ui-web-1", "ui-web-2"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_members_policies_and_a_success_rate_that_follows_traffic() {
    let chromium = chromium();
    let a = Upstream::start(fail_on("/fail")).await;
    let b = Upstream::start(fail_on("/fail")).await;
    let mut mesh = Mesh::new();
    let client = mesh.client(MEMBERS[0], |_| {}).await;
    let w1 = mesh
        .start(mesh.config(MEMBERS[1], &["web"], &[("web", a.addr)]))
        .await;
    let w2 = mesh
        .start(mesh.config(MEMBERS[2], &["web"], &[("web", b.addr)]))
        .await;
    routable(&client, "web", 2).await;
    let admin = client.admin_addr();

    // The assets are served with their types and a strict policy.
    let (status, html) = admin_get(admin, "/ui").await;
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("/ui/app.js"), "{html}");

    // A signed policy, so the policies table has a row to count.
    let (status, body) = mesh
        .pki
        .operator("alice")
        .put(
            admin,
            "RateLimit",
            "web-rl",
            "apiVersion: shoal.dev/v1\nkind: RateLimit\nmetadata:\n  name: web-rl\nspec:\n  target: web\n  requestsPerSecond: 10000\n",
            "",
            &[],
        )
        .await;
    assert!(status == 200 || status == 201, "{status} {body}");

    // Ten good requests: the page shows every member, the policy applied
    // on all three nodes, and web at 100.0%.
    let out = client.outbound_addr().unwrap();
    let http = http1();
    let (mut ok, mut failed) = (0u32, 0u32);
    for i in 0..10 {
        let resp = http
            .request(get(out, "web", &format!("/ok/{i}")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        ok += 1;
    }
    let want = rate(ok, failed);
    let dom = rendered(
        &chromium,
        admin,
        "members, the policy on 3/3 and web at 100.0%",
        |dom| {
            MEMBERS
                .iter()
                .all(|m| dom.contains(&format!("data-member=\"{m}\"")))
                && policy_cell(dom, "RateLimit/web-rl").as_deref() == Some("3/3")
                && service_success(dom, "web").as_deref() == Some(want.as_str())
        },
    )
    .await;
    for m in MEMBERS {
        assert!(
            dom.contains(&format!(">{m}")),
            "member {m} not shown by name"
        );
    }
    assert_eq!(want, "100.0%");

    // Ten failing requests: the same page now shows 50.0% for web.
    for i in 0..10 {
        let resp = http
            .request(get(out, "web", &format!("/fail/{i}")))
            .await
            .unwrap();
        assert!(resp.status().is_server_error(), "{}", resp.status());
        failed += 1;
    }
    let want = rate(ok, failed);
    assert_eq!(want, "50.0%");
    let dom = rendered(&chromium, admin, "web at 50.0% after failures", |dom| {
        service_success(dom, "web").as_deref() == Some(want.as_str())
    })
    .await;
    // The edge row shows the same figure and the requests the test sent.
    let edge = cell_after(&dom, "data-edge=\"outbound client→web\"", "class=\"success")
        .expect("an outbound client→web edge row");
    assert_eq!(edge, want, "edge row");

    // One screenshot of the page as a user sees it (a real PNG).
    let shot = tempfile::tempdir().unwrap();
    let png = shot.path().join("ui.png");
    run_chromium(
        &chromium,
        &[
            "--virtual-time-budget=5000".into(),
            format!("--screenshot={}", png.display()),
            "--window-size=1280,900".into(),
        ],
        admin,
    )
    .await;
    let bytes = std::fs::read(&png).expect("chromium wrote no screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        "not a PNG"
    );
    if let Ok(keep) = std::env::var("SHOAL_UI_SCREENSHOT") {
        std::fs::write(&keep, &bytes).unwrap();
    }

    client.shutdown().await;
    w1.shutdown().await;
    w2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_token_the_page_reads_without_one_and_says_tap_unavailable() {
    let chromium = chromium();
    let up = Upstream::start(ok("fine")).await;
    let mut mesh = Mesh::new();
    let token = mesh.pki.path().join("admin-token");
    std::fs::write(&token, "dashboard-token-0123456789\n").unwrap();
    let client = mesh
        .client("tok-client", |c| c.admin_token_file = Some(token))
        .await;
    let web = mesh
        .start(mesh.config("tok-web", &["web"], &[("web", up.addr)]))
        .await;
    routable(&client, "web", 1).await;
    let url = format!("http://{}/ui", client.admin_addr());
    // The tap needs the token (or answers 404 on a node without one); the
    // browser sends none, so the page says so and renders the rest.
    let end = Instant::now() + RENDER_DEADLINE;
    loop {
        let dom = run_chromium_on(
            &chromium,
            &["--virtual-time-budget=5000".into(), "--dump-dom".into()],
            &url,
        )
        .await;
        let shown = ["tok-client", "tok-web"]
            .iter()
            .all(|m| dom.contains(&format!("data-member=\"{m}\"")))
            && dom.contains("data-service=\"web\"");
        if shown {
            assert!(dom.contains(">tap unavailable<"), "tap state:\n{dom}");
            break;
        }
        assert!(
            Instant::now() < end,
            "the page never showed both members:\n{dom}"
        );
    }
    client.shutdown().await;
    web.shutdown().await;
}

// === helpers ===

/// The Chromium binary; the test fails (not skips) without it.
fn chromium() -> String {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::process::Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if found {
            return name.to_string();
        }
    }
    panic!(
        "headless Chromium is needed for the dashboard test: install it with \
         `apt-get install -y chromium` (CI installs it)"
    );
}

/// Answers 500 to paths starting with `prefix`, 200 otherwise.
fn fail_on(prefix: &'static str) -> Handler {
    Arc::new(move |req| {
        let fail = req.uri().path().starts_with(prefix);
        Box::pin(async move {
            let mut r = Response::new(full(if fail { "broken" } else { "fine" }));
            if fail {
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        })
    })
}

/// The success rate as the page prints it, from the test's own counts.
fn rate(ok: u32, failed: u32) -> String {
    format!("{:.1}%", 100.0 * f64::from(ok) / f64::from(ok + failed))
}

/// Renders `/ui` until `check` accepts the DOM, or panics with the last one.
async fn rendered(
    chromium: &str,
    admin: SocketAddr,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    let end = Instant::now() + RENDER_DEADLINE;
    loop {
        let dom = run_chromium(
            chromium,
            &["--virtual-time-budget=5000".into(), "--dump-dom".into()],
            admin,
        )
        .await;
        if check(&dom) {
            return dom;
        }
        assert!(
            Instant::now() < end,
            "timed out after {RENDER_DEADLINE:?} waiting for the page to show {what}; last DOM:\n{dom}"
        );
    }
}

/// Runs headless Chromium on `/ui?tap=off` (an open tap stream would hold
/// the browser's virtual clock) with `extra` flags, killed on drop and after
/// [`BROWSER_TIMEOUT`]; returns its standard output.
async fn run_chromium(chromium: &str, extra: &[String], admin: SocketAddr) -> String {
    run_chromium_on(chromium, extra, &format!("http://{admin}/ui?tap=off")).await
}

async fn run_chromium_on(chromium: &str, extra: &[String], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let child = cmd.spawn().expect("start chromium");
    let out = tokio::time::timeout(BROWSER_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("chromium did not finish within {BROWSER_TIMEOUT:?}"))
        .expect("wait for chromium");
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    drop(profile);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the first `<td …cell…>` after `marker` in `dom`.
fn cell_after(dom: &str, marker: &str, cell: &str) -> Option<String> {
    let rest = &dom[dom.find(marker)?..];
    let row = &rest[..rest.find("</tr>")?];
    let td = &row[row.find(cell)?..];
    let text = &td[td.find('>')? + 1..];
    Some(text[..text.find("</td>")?].to_string())
}

/// The success cell of `service`'s row in the services table.
fn service_success(dom: &str, service: &str) -> Option<String> {
    cell_after(
        dom,
        &format!("data-service=\"{service}\""),
        "class=\"success",
    )
}

/// The applied-on cell (`n/m`) of a policy row.
fn policy_cell(dom: &str, policy: &str) -> Option<String> {
    let marker = format!("data-policy=\"{policy}\"");
    let rest = &dom[dom.find(&marker)?..];
    let row = &rest[..rest.find("</tr>")?];
    row.split("<td")
        .filter_map(|td| {
            let text = &td[td.find('>')? + 1..];
            Some(text[..text.find("</td>")?].to_string())
        })
        .find(|t| t.contains('/') && t.chars().all(|c| c.is_ascii_digit() || c == '/'))
}
