//! The shapes of the API's answers, shared by every handler: JSON bodies,
//! and errors as `{"error": "..."}` with their status.

use http_body_util::Full;
use hyper::{body::Bytes, header, Response, StatusCode};
use serde::Serialize;
use serde_json::json;

/// A whole HTTP answer.
pub type Reply = Response<Full<Bytes>>;

/// A handler's answer: a JSON body, or a status and an error message.
pub type Handled = Result<Bytes, (StatusCode, String)>;

/// A 400 with `message`.
pub fn bad_request(message: String) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, message)
}

/// `value` as JSON.
pub fn json_bytes(value: &impl Serialize) -> Bytes {
    // Serializing plain data (no maps with non-string keys) cannot fail.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// A reply with a JSON body and `status`.
pub fn json_reply(status: StatusCode, body: Bytes) -> Reply {
    let mut reply = Response::new(Full::new(body));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    reply
}

/// The JSON error answer: `{"error": message}` with `status`.
pub fn error(status: StatusCode, message: String) -> Reply {
    json_reply(status, json_bytes(&json!({ "error": message })))
}
