//! Egress: a host that is not a mesh service, called by a real client
//! (curl, in origin form with a Host header and in absolute form as an
//! HTTP proxy) through a node's outbound listener. Off by default (503
//! `unknown-service`, nothing leaves the node); `allow` forwards from the
//! node to the destination; a suffix list admits only hosts on its dot
//! boundaries. Metrics and the tap label the edge `egress:<host or rule>`.
//!
//! The destination is a plain HTTP server on 127.0.0.1 addressed as
//! `localhost` (the one name every test machine resolves to loopback; the
//! refused names never reach a resolver).

use std::net::SocketAddr;
use std::time::Duration;

use node::proxy::Egress;
use tests::traffic::{Mesh, Upstream, echo, routable};
use tokio::process::Command;

/// One curl call: `args` then the URL; the status, the headers (lower
/// case names) and the body.
async fn curl(args: &[&str], url: &str) -> (u16, Vec<(String, String)>, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("curl")
            .args(["-s", "-i"])
            .args(args)
            .arg(url)
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("curl within 30 s")
    .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "curl {args:?} {url}: {text}");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// `curl -p -x` (CONNECT through the outbound listener, then HTTP inside
/// the tunnel): the CONNECT answer's status and, when the tunnel opened,
/// the inner response's status and body.
async fn curl_connect(outbound: SocketAddr, url: &str) -> (u16, Option<(u16, String)>) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("curl")
            .args(["-s", "-p", "-x", &format!("http://{outbound}")])
            .args(["-w", "\n%{http_connect} %{http_code}"])
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("curl within 30 s")
    .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, codes) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut codes = codes
        .split_whitespace()
        .map(|c| c.parse::<u16>().unwrap_or(0));
    let connect = codes.next().unwrap_or(0);
    let inner = codes.next().unwrap_or(0);
    let tunnel = out.status.success().then(|| (inner, body.to_string()));
    (connect, tunnel)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A mesh node serving `web` and a caller node with `egress`.
async fn rig(egress: Egress) -> (Mesh, node::Node, node::Node, Upstream) {
    let web = Upstream::start(echo()).await;
    let mut mesh = Mesh::new();
    let c = mesh.config("n-web", &["web"], &[("web", web.addr)]);
    let serving = mesh.start(c).await;
    let caller = mesh
        .client("caller", |c| c.proxy.egress = egress.clone())
        .await;
    routable(&caller, "web", 1).await;
    (mesh, serving, caller, web)
}

async fn metrics(node: &node::Node) -> String {
    tests::admin_get(node.admin_addr(), "/metrics").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_is_off_by_default() {
    let outside = Upstream::start(echo()).await;
    let (_mesh, serving, caller, _web) = rig(Egress::default()).await;
    let out = caller.outbound_addr().unwrap();
    let host = format!("localhost:{}", outside.addr.port());
    let (status, headers, _) = curl(
        &["-H", &format!("Host: {host}")],
        &format!("http://{out}/x"),
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(header(&headers, "shoal-error"), Some("unknown-service"));
    let (status, headers, _) = curl(
        &["-x", &format!("http://{out}")],
        &format!("http://{host}/y"),
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(header(&headers, "shoal-error"), Some("unknown-service"));
    let (connect, tunnel) = curl_connect(out, &format!("http://{host}/z")).await;
    assert_eq!((connect, tunnel), (503, None), "CONNECT refused");
    assert_eq!(outside.hits(), 0, "nothing left the node");
    assert!(!metrics(&caller).await.contains("egress:"));
    caller.shutdown().await;
    serving.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_allow_forwards_from_the_node() {
    let outside = Upstream::start(echo()).await;
    let (_mesh, serving, caller, web) = rig(Egress::Allow).await;
    let out = caller.outbound_addr().unwrap();
    let port = outside.addr.port();
    let mut tap = caller.proxy().tap();

    // Absolute form, as an HTTP proxy client sends it.
    let (status, headers, body) = curl(
        &["-x", &format!("http://{out}"), "--data", "to the outside"],
        &format!("http://localhost:{port}/abs?q=1"),
    )
    .await;
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(body, "to the outside");
    assert_eq!(header(&headers, "x-method"), Some("POST"));
    assert_eq!(header(&headers, "x-path"), Some("/abs"));
    assert_eq!(
        header(&headers, "x-seen-host"),
        Some(format!("localhost:{port}").as_str())
    );
    assert_eq!(
        header(&headers, "x-seen-shoal-forwarded"),
        None,
        "egress adds no mesh provenance"
    );
    // Origin form with a Host header.
    let (status, headers, _) = curl(
        &["-H", &format!("Host: localhost:{port}")],
        &format!("http://{out}/origin"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-path"), Some("/origin"));
    assert_eq!(outside.hits(), 2);

    // A mesh service still goes through the mesh.
    let (status, headers, _) = curl(&["-H", "Host: web"], &format!("http://{out}/m")).await;
    assert_eq!(status, 200);
    assert!(header(&headers, "x-seen-shoal-forwarded").is_some());
    assert_eq!(web.hits(), 1);

    // A destination that refuses the connection: 502 upstream-connect.
    let closed: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (status, headers, _) = curl(
        &["-H", &format!("Host: localhost:{}", closed.port())],
        &format!("http://{out}/closed"),
    )
    .await;
    assert_eq!(status, 502);
    assert_eq!(header(&headers, "shoal-error"), Some("upstream-connect"));

    // CONNECT to the same host: a tunnel from the node, HTTP inside it.
    let (connect, tunnel) = curl_connect(out, &format!("http://localhost:{port}/tunnel")).await;
    assert_eq!(connect, 200);
    assert_eq!(
        tunnel,
        Some((200, String::new())),
        "the echo of a bodiless GET"
    );
    assert_eq!(outside.hits(), 3);
    let (connect, tunnel) =
        curl_connect(out, &format!("http://localhost:{}/x", closed.port())).await;
    assert_eq!((connect, tunnel), (502, None), "CONNECT to a closed port");

    let m = metrics(&caller).await;
    let tcp_closed = "shoal_tcp_connections_closed_total{direction=\"outbound\",source=\"client\",destination=\"egress:localhost\",outcome=\"clean\"} 1";
    let ok = tests::eventually(
        "the CONNECT tunnel is counted closed",
        Duration::from_secs(10),
        || async {
            let m = metrics(&caller).await;
            m.contains(tcp_closed).then_some(m)
        },
    )
    .await;
    assert!(ok.contains("shoal_tcp_connections_closed_total{direction=\"outbound\",source=\"client\",destination=\"egress:localhost\",outcome=\"refused\"} 1"), "{ok}");
    let want = "shoal_proxy_requests_total{direction=\"outbound\",source=\"client\",destination=\"egress:localhost\",class=\"2xx\"} 3";
    assert!(m.contains(want), "{want} in\n{m}");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(10), tap.recv())
            .await
            .expect("tap event")
            .expect("tap open");
        if e.service == "egress:localhost" && e.status == 200 {
            seen.push(e.endpoint.clone());
        }
    }
    assert_eq!(seen, vec![format!("localhost:{port}"); 3]);
    caller.shutdown().await;
    serving.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_suffix_list_admits_only_matching_hosts() {
    let outside = Upstream::start(echo()).await;
    let rules = Egress::parse("corp.example,localhost").unwrap();
    let (_mesh, serving, caller, _web) = rig(rules).await;
    let out = caller.outbound_addr().unwrap();
    let port = outside.addr.port();
    let ask = |host: String| {
        let url = format!("http://{out}/s");
        async move { curl(&["-H", &format!("Host: {host}")], &url).await }
    };
    let (status, _, _) = ask(format!("localhost:{port}")).await;
    assert_eq!(status, 200);
    // Not on a dot boundary, or not listed at all: refused before any
    // name is resolved.
    for host in [
        format!("notlocalhost:{port}"),
        format!("localhost.evil.example:{port}"),
        format!("example.org:{port}"),
        format!("corp.example.org:{port}"),
    ] {
        let (status, headers, _) = ask(host.clone()).await;
        assert_eq!(status, 503, "{host}");
        assert_eq!(
            header(&headers, "shoal-error"),
            Some("unknown-service"),
            "{host}"
        );
    }
    let (connect, _) = curl_connect(out, &format!("http://notlocalhost:{port}/c")).await;
    assert_eq!(connect, 503, "CONNECT to a host off the list");
    assert_eq!(outside.hits(), 1);
    let m = metrics(&caller).await;
    assert!(
        m.contains("destination=\"egress:localhost\",class=\"2xx\"} 1"),
        "{m}"
    );
    assert!(!m.contains("egress:corp.example\""), "{m}");
    caller.shutdown().await;
    serving.shutdown().await;
}

/// Under `allow`, `localhost:<the outbound listener's port>` names the node
/// itself: forwarded, the request (or the CONNECT tunnel) would come back
/// in and be sent out again, turn after turn. It is refused with 508
/// `forwarding-loop`, once, and egress elsewhere still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_to_the_nodes_own_listener_is_a_loop_and_refused() {
    let outside = Upstream::start(echo()).await;
    let (_mesh, serving, caller, _web) = rig(Egress::Allow).await;
    let out = caller.outbound_addr().unwrap();
    let itself = format!("localhost:{}", out.port());
    let (status, headers, body) = curl(
        &["-H", &format!("Host: {itself}")],
        &format!("http://{out}/loop"),
    )
    .await;
    assert_eq!(status, 508, "{body}");
    assert_eq!(header(&headers, "shoal-error"), Some("forwarding-loop"));
    let (connect, tunnel) = curl_connect(out, &format!("http://{itself}/loop")).await;
    assert_eq!((connect, tunnel), (508, None), "CONNECT to itself refused");
    let m = metrics(&caller).await;
    let loops: Vec<&str> = m
        .lines()
        .filter(|l| {
            l.starts_with("shoal_proxy_responses_total{") && l.contains("status_code=\"508\"")
        })
        .collect();
    assert_eq!(loops.len(), 1, "{m}");
    assert!(
        loops[0].ends_with(" 2"),
        "one HTTP request and one CONNECT: {loops:?}"
    );
    assert!(
        m.lines()
            .any(|l| l.starts_with("shoal_tcp_connections_closed_total{")
                && l.contains("outcome=\"loop\"")
                && l.ends_with(" 1")),
        "{m}"
    );
    let (status, _, _) = curl(
        &["-H", &format!("Host: localhost:{}", outside.addr.port())],
        &format!("http://{out}/fine"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(outside.hits(), 1);
    caller.shutdown().await;
    serving.shutdown().await;
}
