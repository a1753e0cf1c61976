//! A built-in demo HTTP service and a light client for `shoal up`, so a local
//! mesh shows live traffic in `shoal stat`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Starts the demo service on `127.0.0.1:0`: `GET /healthz` answers `ok`,
/// anything else `hello from <label>` after 0-3 ms.
pub async fn start_service(label: String) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        while let Ok((stream, _)) = listener.accept().await {
            let label = label.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let label = label.clone();
                    async move { Ok::<_, Infallible>(answer(&label, req).await) }
                });
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok((addr, task))
}

async fn answer(label: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/healthz" {
        return Response::new(Full::new(Bytes::from_static(b"ok\n")));
    }
    let pause = rand::thread_rng().gen_range(0..=3);
    tokio::time::sleep(Duration::from_millis(pause)).await;
    let mut r = Response::new(Full::new(Bytes::from(format!(
        "hello from {label} ({})\n",
        req.uri().path()
    ))));
    *r.status_mut() = StatusCode::OK;
    r
}

/// Calls `http://<service>/` through the outbound listener `outbound` about
/// `rps` times a second, forever.
pub async fn run_client(outbound: SocketAddr, service: String, rps: u32) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps.max(1));
    let mut n = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        let Ok(uri) = format!("http://{outbound}/demo/{n}").parse::<http::Uri>() else {
            return;
        };
        let req = Request::get(uri)
            .header(http::header::HOST, service.as_str())
            .body(Empty::new())
            .expect("static request parts");
        let client = client.clone();
        tokio::spawn(async move {
            if let Ok(resp) = client.request(req).await {
                let _ = resp.into_body().collect().await;
            }
        });
    }
}
