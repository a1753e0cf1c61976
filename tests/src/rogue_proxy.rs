//! Fixtures for the adversarial data-plane tests: a rogue node that holds a
//! valid mesh certificate naming other services and claims a service in
//! gossip anyway, raw TCP abusers of a node's listeners, a metrics reader,
//! and the real `shoal` binary under a lowered fd limit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use gossip::schema::keys;
use gossip::{Health, ServiceRecord};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use node::Node;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::traffic::full;

/// Publishes a healthy `svc.<service>` record from `node`'s own gossip key
/// space, whatever its certificate names: what a modified binary holding that
/// certificate would do (the real node refuses to publish such a service).
pub async fn claim_service(node: &Node, service: &str) {
    let record = ServiceRecord {
        health: Health::Healthy,
        weight: 100,
        zone: "default".into(),
        in_flight: 0,
        ewma_ms: 0.1,
        protocol: "auto".into(),
    };
    let json = serde_json::to_string(&record).expect("record");
    node.gossip().set_key(&keys::service(service), &json).await;
}

/// The value of the first sample in the Prometheus text `body` whose line
/// starts with `prefix` (name and labels as printed).
pub fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Opens `n` TCP connections to `addr` that never send a byte.
pub async fn silent_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(TcpStream::connect(addr).await.expect("connect"));
    }
    v
}

/// Waits until the server closes `s` (EOF or reset) and returns the bytes it
/// sent before that, or `None` if it is still open after `deadline`.
pub async fn closed_within(s: &mut TcpStream, deadline: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let end = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends one HTTP/1.1 GET on an open connection and reads the status line
/// and headers of the answer, draining its body so the connection can carry
/// another request. `None` if the connection fails or closes first.
pub async fn raw_request(s: &mut TcpStream, host: &str, path: &str) -> Option<String> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let len = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some(text)
}

/// One GET on a fresh connection, given up after 2 s: the answer's head.
pub async fn try_get(addr: SocketAddr, host: &str, path: &str) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(2), async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        raw_request(&mut s, host, path).await
    })
    .await
    .ok()
    .flatten()
}

/// A local HTTP/1.1 + h2c instance answering `text`, counting requests;
/// dropping it closes its port and every connection it accepted (once the
/// runtime gets to the aborted task: [`Instance::stop`] waits for that).
pub struct Instance {
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Instance {
    /// Listens on `addr` (port 0 picks one).
    pub async fn start(addr: SocketAddr, text: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => break,
                    },
                };
                let (hits, builder) = (h.clone(), builder.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                        if req.uri().path() != "/healthz" {
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                        async move { Ok::<_, Infallible>(hyper::Response::new(full(text))) }
                    });
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                });
            }
            drop(listener);
            // Every accepted connection ends (and its socket closes)
            // before `stop` returns.
            conns.shutdown().await;
        });
        Instance {
            addr,
            hits,
            stop: Some(stop),
            task,
        }
    }

    /// Closes the port and every accepted connection, and returns once
    /// they are closed: a request sent after this cannot reach it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Requests served (health checks aside).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `shoal` binary next to this test executable (`target/debug/shoal`),
/// built first if it is missing or older than the node sources.
pub fn shoal_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let bin = dir.join("shoal");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf();
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let newest = newest_mtime(&workspace.join("node/src"))
        .into_iter()
        .chain(newest_mtime(&workspace.join("transport/src")))
        .chain(newest_mtime(&workspace.join("gossip/src")))
        .max();
    if built.is_none() || newest.is_some_and(|n| Some(n) > built) {
        let target = dir.parent().expect("target dir");
        let mut cargo =
            std::process::Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
        // The variables cargo set for this test would change the nested
        // build's fingerprints (and make the next ordinary build redo it).
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("CARGO_") && k != "CARGO_HOME" {
                cargo.env_remove(k);
            }
        }
        let status = cargo
            .args(["build", "-p", "node", "--bin", "shoal"])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(&workspace)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p node --bin shoal failed");
    }
    bin
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            e.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

/// A `shoal node` child process, killed on drop.
pub struct Child {
    pub child: tokio::process::Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Child {
    /// Starts `shoal node` under `prlimit --nofile=<nofile>` with `args`,
    /// stderr (its log) going to `log`, and waits for its ready line.
    pub async fn start(nofile: u64, args: &[String], log: PathBuf) -> Self {
        let bin = shoal_binary();
        let err = std::fs::File::create(&log).expect("log file");
        let mut child = tokio::process::Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(&bin)
            .arg("node")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn prlimit shoal");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l.contains(" ready ") {
                    return Some(l);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            panic!(
                "shoal did not print its ready line; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let admin = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
            .and_then(|a| a.parse().ok())
            .expect("admin address in the ready line");
        // Keep reading stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Child { child, admin, log }
    }

    /// Lines the child has logged so far.
    pub fn log_lines(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// Open file descriptors of the child (the `shoal` process itself:
    /// prlimit execs it, so it keeps the pid).
    pub fn open_fds(&self) -> usize {
        let pid = self.child.id().expect("pid");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
