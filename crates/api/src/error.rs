//! Every error the API answers is `{"error": "<message>", "code": "<kind>"}` with a status
//! that says whether retrying can help; handlers return it before they change anything.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keel_node::driver::DriverError;
use serde::Serialize;

/// The machine-readable kinds. Clients branch on `code`, not on the message, so these names
/// are part of the API: add new ones, never rename.
pub mod code {
    pub const BAD_REQUEST: &str = "bad_request";
    pub const EMPTY_KEY: &str = "empty_key";
    pub const INVALID_NODE_ID: &str = "invalid_node_id";
    pub const INVALID_PEER_URL: &str = "invalid_peer_url";
    pub const INVALID_JSON: &str = "invalid_json";
    pub const TOO_LARGE: &str = "request_too_large";
    pub const BODY_TIMEOUT: &str = "body_timeout";
    pub const KEY_NOT_FOUND: &str = "key_not_found";
    pub const MEMBER_NOT_FOUND: &str = "member_not_found";
    pub const NOT_FOUND: &str = "not_found";
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    pub const CONFLICT: &str = "conflict";
    pub const REFUSED: &str = "refused";
    pub const NOT_LEADER: &str = "not_leader";
    pub const NO_LEADER: &str = "no_leader";
    pub const OVERLOADED: &str = "overloaded";
    pub const TIMEOUT: &str = "timeout";
    pub const STOPPED: &str = "stopped";
    pub const INVALID: &str = "invalid";
    pub const INTERNAL: &str = "internal";
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    code: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn empty_key() -> ApiError {
        ApiError::bad_request(code::EMPTY_KEY, "key is empty")
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::TOO_LARGE,
            format!("request larger than max-request-bytes ({limit} bytes)"),
        )
    }

    pub fn unknown_member(id: u64) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            code::MEMBER_NOT_FOUND,
            format!("member {id} is not in the cluster"),
        )
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code::CONFLICT, message)
    }

    pub fn overloaded(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code::OVERLOADED, message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The JSON error body, for the few places that build a response by hand.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::to_vec(&Body {
        error: message,
        code,
    })
    // Two strings always serialise; the fallback only keeps this total.
    .unwrap_or_else(|_| b"{\"error\":\"internal\",\"code\":\"internal\"}".to_vec());
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_error(self.status, self.code, &self.message);
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Overload and elections pass within a few heartbeats.
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

impl From<DriverError> for ApiError {
    fn from(e: DriverError) -> ApiError {
        use StatusCode as S;
        let msg = e.to_string();
        let (status, code) = match &e {
            DriverError::NoLeader | DriverError::LeaderChanged => {
                (S::SERVICE_UNAVAILABLE, code::NO_LEADER)
            }
            DriverError::Refused(_) => (S::CONFLICT, code::REFUSED),
            DriverError::Conflict(_) => (S::CONFLICT, code::CONFLICT),
            DriverError::UnknownMember(_) => (S::NOT_FOUND, code::MEMBER_NOT_FOUND),
            DriverError::Invalid(_) => (S::BAD_REQUEST, code::INVALID),
            DriverError::NotLeader(_) => (S::CONFLICT, code::NOT_LEADER),
            DriverError::Overloaded | DriverError::Busy(_) => {
                (S::SERVICE_UNAVAILABLE, code::OVERLOADED)
            }
            DriverError::Timeout => (S::GATEWAY_TIMEOUT, code::TIMEOUT),
            DriverError::Kv(_) => (S::BAD_REQUEST, code::INVALID),
            DriverError::Stopped => (S::SERVICE_UNAVAILABLE, code::STOPPED),
            DriverError::Storage(_)
            | DriverError::Config(_)
            | DriverError::Transport(_)
            | DriverError::Start(_) => (S::INTERNAL_SERVER_ERROR, code::INTERNAL),
        };
        ApiError::new(status, code, msg)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
