//! `/api/openapi.json`: the OpenAPI 3.1 document of the API, written by
//! hand in `assets/openapi.json` and compiled into the binary, so clients
//! and tools can read the contract from the agent they talk to. It holds no
//! data, so it is served without the token. `tests/openapi.rs` runs
//! schemathesis against a live agent to keep it true.

use http_body_util::Full;
use hyper::{
    body::Bytes,
    header::{self, HeaderValue},
    Response,
};

/// Where the document is served.
pub const PATH: &str = "/api/openapi.json";

const DOCUMENT: &str = include_str!("../assets/openapi.json");

/// The document, as JSON.
pub fn document() -> Response<Full<Bytes>> {
    let mut reply = Response::new(Full::new(Bytes::from_static(DOCUMENT.as_bytes())));
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    reply
}

#[cfg(test)]
mod tests {
    use super::DOCUMENT;
    use serde_json::Value;

    #[test]
    fn the_document_is_json_of_this_version_and_lists_every_route() {
        let doc: Value = serde_json::from_str(DOCUMENT).expect("assets/openapi.json is JSON");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        let mut documented: Vec<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(String::as_str)
            .collect();
        let mut routes = crate::api::ROUTES.to_vec();
        documented.sort_unstable();
        routes.sort_unstable();
        assert_eq!(
            documented, routes,
            "the document's paths and the route table"
        );
    }
}
