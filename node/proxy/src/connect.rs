//! `CONNECT host:port` on the outbound listener: when the host names a mesh
//! TCP service (`db`, `db.ns`, `db.ns.svc`, `db.ns.svc.cluster.local`,
//! `db.shoal`), the tunnel is opened through the mesh first (`tcp.rs`), then
//! the app gets `200` and its connection is spliced as opaque bytes — so
//! `https_proxy` clients and TLS-speaking apps cross the mesh end to end.
//!
//! | status | `shoal-error`         | meaning                                        |
//! |--------|-----------------------|------------------------------------------------|
//! | 400    | `bad-request`         | the CONNECT target is not `host:port`          |
//! | 503    | `unknown-service`     | the host is not a mesh service ([`not_a_service`]) and `--egress` does not admit it |
//! | 502    | `upstream-connect`    | the service is not a TCP service, or no endpoint took the connection |
//! | 403    | `forbidden`           | the serving node's policy does not admit this node |

use std::sync::Arc;

use crate::body::ReqBody;
use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use policy::set::ServiceAddr;

use crate::body::empty;
use crate::egress;
use crate::error::MeshError;
use crate::frame::ProxyBody;
use crate::state::Shared;
use crate::stats::Direction;
use crate::tcp::{self, OpenError};

/// Port assumed when a CONNECT target writes none.
const DEFAULT_CONNECT_PORT: u16 = 443;

/// Answers one CONNECT request.
pub(crate) async fn handle(shared: Arc<Shared>, req: Request<ReqBody>) -> Response<ProxyBody> {
    let Some(authority) = req.uri().authority().map(|a| a.to_string()) else {
        return MeshError::BadRequest.response_with("CONNECT needs a host:port target");
    };
    let service = ServiceAddr::parse(&authority, &shared.config.namespace, DEFAULT_CONNECT_PORT)
        .map(|a| a.name)
        .filter(|name| shared.targets(name).is_some());
    let Some(service) = service else {
        return not_a_service(&shared, req, &authority).await;
    };
    if tcp::is_tcp(&shared, &service) == Some(false) {
        return MeshError::UpstreamConnect.response_with(
            "the service speaks HTTP, not tcp; send it HTTP requests instead of CONNECT",
        );
    }
    let source = match shared.source_service() {
        s if s.is_empty() => "unknown".to_string(),
        s => s,
    };
    let opened = match tcp::open(&shared, &service, &authority, None).await {
        Ok(o) => o,
        Err(e) => {
            shared
                .tcp
                .refused(Direction::Outbound, &source, &service, e.label());
            return match e {
                OpenError::UnknownService => not_a_service(&shared, req, &authority).await,
                OpenError::Unavailable(msg) => MeshError::UpstreamConnect.response_with(&msg),
                OpenError::Denied(why) => MeshError::Forbidden.response_with(why),
            };
        }
    };
    let mut req = req;
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let (_count, _) = shared.outbound_request();
        match upgrade.await {
            Ok(upgraded) => {
                let done = opened.splice(&shared, TokioIo::new(upgraded)).await;
                tracing::debug!(%service, outcome = done.outcome.label(), sent = done.local_to_mesh, received = done.mesh_to_local, "CONNECT tunnel ended");
            }
            Err(e) => {
                tracing::debug!(%service, error = %e, "CONNECT: the client went away before the tunnel")
            }
        }
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}

/// A CONNECT to a host that is not a mesh service: 503 `unknown-service`,
/// unless `--egress` admits the host (then `egress::connect` dials it).
pub(crate) async fn not_a_service(
    shared: &Arc<Shared>,
    req: Request<ReqBody>,
    authority: &str,
) -> Response<ProxyBody> {
    if let Some((to, label)) = egress::connect_target(&shared.config.egress, authority) {
        return egress::connect(shared, req, to, label).await;
    }
    let _ = req;
    tracing::debug!(%authority, "CONNECT to a host that is not a mesh service");
    MeshError::UnknownService.response_with("no node in the mesh serves this host")
}
