//! The web dashboard at `/ui`: a static page, its script and its style
//! sheet, compiled into the binary (no CDN, no external URL). The page reads
//! the admin JSON endpoints (`/v1/members`, `/v1/services`, `/v1/stats`,
//! `/v1/policies`) every 2 s and the tap (`/v1/tap`) through `EventSource`
//! when the node offers one. Reads need no token, so the page needs none.
//!
//! This module owns only the assets and their headers; it touches no node
//! state. Every answer carries `Content-Security-Policy: default-src 'self'`
//! (no inline script or style, no third-party origin), `nosniff`, and
//! `no-store` so an upgraded node never serves a stale script.

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;

/// The policy every asset is served under.
pub(crate) const CSP: &str =
    "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

const INDEX: &str = include_str!("ui/index.html");
const APP: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

/// Whether `path` is the dashboard's (`/ui`, `/ui/` or `/ui/<asset>`).
pub(crate) fn owns(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// Answers a request for one of the dashboard's paths.
pub(crate) fn serve(method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n",
        );
    }
    let (ctype, body) = match path {
        "/ui" | "/ui/" | "/ui/index.html" => ("text/html; charset=utf-8", INDEX),
        "/ui/app.js" => ("text/javascript; charset=utf-8", APP),
        "/ui/style.css" => ("text/css; charset=utf-8", STYLE),
        _ => {
            return answer(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "not found\n",
            );
        }
    };
    let mut resp = answer(StatusCode::OK, ctype, body);
    if method == Method::HEAD {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    resp
}

fn answer(status: StatusCode, ctype: &'static str, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ctype)
        .header(header::CONTENT_SECURITY_POLICY, CSP)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::REFERRER_POLICY, "no-referrer")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_have_their_types_and_the_policy() {
        for (path, ctype) in [
            ("/ui", "text/html; charset=utf-8"),
            ("/ui/", "text/html; charset=utf-8"),
            ("/ui/app.js", "text/javascript; charset=utf-8"),
            ("/ui/style.css", "text/css; charset=utf-8"),
        ] {
            let r = serve(&Method::GET, path);
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], ctype, "{path}");
            assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP, "{path}");
        }
        assert_eq!(serve(&Method::GET, "/ui/../etc/passwd").status(), 404);
        assert_eq!(serve(&Method::POST, "/ui").status(), 405);
        assert!(!owns("/uix") && owns("/ui") && owns("/ui/app.js"));
    }

    #[test]
    fn assets_name_no_other_origin() {
        for asset in [INDEX, APP, STYLE] {
            assert!(!asset.contains("http://") && !asset.contains("https://"));
            assert!(!asset.contains("//cdn"));
        }
        // No inline script or style: the policy would block them.
        assert!(!INDEX.contains("<script>") && !INDEX.contains("style="));
        assert!(!INDEX.contains("<style"));
    }
}
