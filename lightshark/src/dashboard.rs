//! The live dashboard at `/`: one hand-written HTML page compiled into the
//! binary, so a sidecar needs no files beside it and the browser fetches
//! nothing from outside. The page holds no data (everything it shows comes
//! from `/api/stream` and `/api/live`), so it is served without the token.

use http_body_util::Full;
use hyper::{
    body::Bytes,
    header::{self, HeaderValue},
    Response,
};

/// Where the page is served.
pub const PATH: &str = "/";

const PAGE: &str = include_str!("../assets/dashboard.html");

/// The browser may load nothing but this page, its inline script and style,
/// and the API on the same origin (WebSocket included).
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// The page, with headers that keep it self-contained and always fresh
/// (a new binary may change it).
pub fn page() -> Response<Full<Bytes>> {
    let mut reply = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = reply.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    reply
}

#[cfg(test)]
mod tests {
    use super::PAGE;

    /// The page names no other resource: a browser fetches nothing for it
    /// but the API (the browser test checks every request it makes).
    #[test]
    fn the_page_refers_to_nothing_elsewhere() {
        for reference in ["http://", "https://", "src=", "@import", "url("] {
            assert!(!PAGE.contains(reference), "the page contains {reference}");
        }
    }
}
