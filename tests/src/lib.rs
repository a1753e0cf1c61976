//! Fixtures for Shoal's cross-crate tests: a mesh CA in a temporary folder,
//! clusters of real in-process nodes on 127.0.0.1 port 0, and `eventually`.
#![forbid(unsafe_code)]

pub mod danger;
pub mod echo;
pub mod gamma_cases;
pub mod operator;
pub mod rogue;
pub mod rogue_proxy;
pub mod traffic;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use node::{Node, NodeConfig};
use transport::certs::{Ca, Validity, write_node_dir};

/// Gossip interval used by test clusters.
pub const TEST_GOSSIP: Duration = Duration::from_millis(100);

/// Polls `check` until it returns `Some`, or panics with `what` after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A mesh CA and its certificate folders, in a temporary folder.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    /// A fresh CA for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        Pki {
            dir: tempfile::tempdir().expect("tempdir"),
            ca: Ca::generate(trust_domain, 1).expect("CA"),
        }
    }

    /// The temporary folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Issues `name` (with `services`) into `<tmp>/<folder>` and returns it.
    pub fn issue_into(
        &self,
        folder: &str,
        name: &str,
        services: &[&str],
        validity: Validity,
    ) -> PathBuf {
        let dir = self.dir.path().join(folder);
        let svcs: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        let cert = self.ca.issue(name, &svcs, validity).expect("issue");
        write_node_dir(&dir, &self.ca.cert_pem(), &cert, true).expect("write certs");
        dir
    }

    /// Issues a one-day certificate for `name` into `<tmp>/<name>`.
    pub fn issue(&self, name: &str, services: &[&str]) -> PathBuf {
        self.issue_into(name, name, services, Validity::days(1))
    }

    /// A loopback node config for `name` with test gossip timings.
    pub fn node_config(&self, name: &str, seeds: &[String]) -> NodeConfig {
        let mut c = NodeConfig::local(name, self.issue(name, &["web"]));
        c.gossip_interval = TEST_GOSSIP;
        c.seeds = seeds.to_vec();
        c
    }
}

/// A set of in-process nodes sharing one CA.
pub struct Cluster {
    /// The PKI the nodes' certificates come from.
    pub pki: Pki,
    /// The running nodes (n1 is everyone's seed).
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` nodes named n1..nN, all seeded with n1.
    pub async fn start(n: usize) -> Self {
        let pki = Pki::new("test.shoal");
        let mut nodes: Vec<Node> = Vec::new();
        for i in 1..=n {
            let seeds: Vec<String> = nodes
                .first()
                .map(|s| s.quic_addr().to_string())
                .into_iter()
                .collect();
            let node = Node::start(pki.node_config(&format!("n{i}"), &seeds))
                .await
                .expect("start node");
            nodes.push(node);
        }
        Cluster { pki, nodes }
    }

    /// The seed's QUIC address.
    pub fn seed(&self) -> String {
        self.nodes[0].quic_addr().to_string()
    }

    /// Waits until every node sees exactly `names` alive.
    pub async fn converged(&self, names: &[&str], deadline: Duration) {
        let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        want.sort();
        for node in &self.nodes {
            let want = want.clone();
            eventually(
                &format!("{} sees {:?} alive", node.name(), want),
                deadline,
                || {
                    let want = want.clone();
                    async move { (alive(node).await == want).then_some(()) }
                },
            )
            .await;
        }
    }

    /// Stops every node gracefully.
    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

/// Names of the members `node` sees alive, sorted.
pub async fn alive(node: &Node) -> Vec<String> {
    node.members()
        .await
        .into_iter()
        .filter(|m| m.state == node::MemberState::Alive)
        .map(|m| m.name)
        .collect()
}

/// The state `node` sees `name` in, if listed.
pub async fn state_of(node: &Node, name: &str) -> Option<node::MemberState> {
    node.members()
        .await
        .into_iter()
        .find(|m| m.name == name)
        .map(|m| m.state)
}

/// GET `path` from an admin address, returning status and body.
pub async fn admin_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    admin_request(addr, "GET", path, &[], "").await
}

/// Any request to an admin address, returning status and body.
pub async fn admin_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    // A node that stops answering fails the test with its name instead of
    // holding the run until CI's own limit.
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        admin_request_now(addr, method, path, headers, body),
    )
    .await
    .unwrap_or_else(|_| panic!("{method} {path} at {addr}: no answer within 60 s"))
}

async fn admin_request_now(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect admin");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let resp = sender.send_request(req).await.expect("request");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
