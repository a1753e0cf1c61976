//! Body helpers the request path shares: an empty and a whole body, a
//! buffered body replayed for retries, and a body that keeps guards (in-flight
//! counts, a cancel handle) alive until it is dropped.

use std::any::Any;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, SizeHint};

use crate::frame::{BoxError, ProxyBody};

/// An empty body.
pub(crate) fn empty() -> ProxyBody {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync()
}

/// A body of `data`, whole.
pub(crate) fn full(data: Bytes) -> ProxyBody {
    Full::new(data).map_err(|e| match e {}).boxed_unsync()
}

/// A buffered request body (and its trailers), sent again on a retry.
pub(crate) fn replay(data: Bytes, trailers: Option<HeaderMap>) -> ProxyBody {
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = Vec::new();
    if !data.is_empty() {
        frames.push(Ok(Frame::data(data)));
    }
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    if frames.is_empty() {
        return empty();
    }
    http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
}

/// `inner`, keeping `guards` alive until the body is dropped.
pub(crate) fn guarded(inner: ProxyBody, guards: Vec<Box<dyn Any + Send>>) -> ProxyBody {
    Guarded {
        inner,
        _guards: guards,
    }
    .boxed_unsync()
}

/// A body that keeps guards alive until it is dropped.
struct Guarded {
    inner: ProxyBody,
    _guards: Vec<Box<dyn Any + Send>>,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body as the outbound listener hands it on: streamed by hyper,
/// or read whole by the node's own HTTP/1.1 server (`h1_server.rs`).
pub(crate) enum ReqBody {
    /// hyper's body (h2c, upgrades, chunked or larger bodies).
    Hyper(hyper::body::Incoming),
    /// The whole body, already read (`None` once it has been polled).
    Whole(Option<Bytes>),
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Hyper(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Whole(data) => Poll::Ready(
                data.take()
                    .filter(|d| !d.is_empty())
                    .map(|d| Ok(Frame::data(d))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Hyper(b) => b.is_end_stream(),
            ReqBody::Whole(data) => data.as_ref().is_none_or(|d| d.is_empty()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Hyper(b) => b.size_hint(),
            ReqBody::Whole(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
