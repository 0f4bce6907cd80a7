//! raftexample's API (`PUT /<key>`, `GET /<key>`, `POST /<id>`, `DELETE /<id>`) and the seed
//! design's `/intern/join` and `/intern/leave`.
//!
//! Unlike raftexample, a PUT answers only once the write is committed and applied on this
//! node, and a GET is linearizable (ReadIndex) unless `?serializable=true`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keel_kv::{Op, PutRequest, RangeRequest};
use serde_json::json;

use crate::error::{code, ApiError, ApiResult};
use crate::input::{flag, id_from_name, key_from_path, node_id, param, query_pairs, read_body};
use crate::members::{self, find_by_addr, members_json};
use crate::{App, Inner, LeaderHint};

/// Everything no other route claims: raftexample's keys (GET, PUT) and node ids (POST,
/// DELETE) share the path space, told apart by the method, as in raftexample.
pub async fn keys_and_members(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    if crate::grpc::is_grpc(&headers) {
        // A gRPC service or method Keel does not serve (yet): answer as gRPC, not as a key.
        let st = tonic::Status::unimplemented(format!("unknown gRPC method {}", uri.path()));
        return Ok(st.into_http());
    }
    let rest = uri.path().strip_prefix('/').unwrap_or(uri.path());
    match method {
        Method::GET | Method::HEAD => get_key(&app, rest, &uri).await,
        Method::PUT => put_key(&app, rest, &headers, body).await,
        Method::POST => {
            let id = node_id(rest)?;
            let url = read_body(&headers, body, app.cfg.max_request_bytes).await?;
            let url = std::str::from_utf8(&url).map_err(|_| {
                ApiError::bad_request(code::INVALID_PEER_URL, "peer URL is not UTF-8")
            })?;
            members::add(&app, Some(id), url, false).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Method::DELETE => {
            let id = node_id(rest)?;
            members::remove(&app, id).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        other => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            code::METHOD_NOT_ALLOWED,
            format!("{other} is not served on /<key>: use GET, PUT, POST or DELETE"),
        )),
    }
}

async fn get_key(app: &Inner, raw: &str, uri: &Uri) -> ApiResult<Response> {
    let key = key_from_path(raw);
    if key.is_empty() {
        return Err(ApiError::empty_key());
    }
    let q = query_pairs(uri);
    let req = RangeRequest {
        key,
        ..Default::default()
    };
    let r = if flag(&q, "serializable")? {
        app.node.read_local(req).await?
    } else {
        app.node.read(req).await?
    };
    match r.kvs.into_iter().next() {
        Some(kv) => {
            let mut resp = kv.value.into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            Ok(resp)
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            code::KEY_NOT_FOUND,
            "key not found",
        )),
    }
}

/// The value may use what the key leaves of `max_request_bytes`: the Raft entry carries both.
pub fn value_limit(app: &Inner, key_len: usize) -> ApiResult<usize> {
    app.cfg
        .max_request_bytes
        .checked_sub(key_len)
        .ok_or_else(|| ApiError::too_large(app.cfg.max_request_bytes))
}

async fn put_key(app: &Inner, raw: &str, headers: &HeaderMap, body: Body) -> ApiResult<Response> {
    let key = key_from_path(raw);
    if key.is_empty() {
        return Err(ApiError::empty_key());
    }
    let limit = value_limit(app, key.len())?;
    let value = read_body(headers, body, limit)
        .await
        .map_err(|e| match e.code {
            // Name the configured limit, not what was left of it after the key.
            code::TOO_LARGE => ApiError::too_large(app.cfg.max_request_bytes),
            _ => e,
        })?;
    app.node
        .propose(Op::Put(PutRequest {
            key,
            value,
            ..Default::default()
        }))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `/intern/join?name=server3&host=127.0.0.1:3003`: adds a voter. The id is the name's
/// trailing digits, or the next free id when it has none.
pub async fn intern_join(State(app): State<App>, uri: Uri) -> ApiResult<Response> {
    let q = query_pairs(&uri);
    let host = param(&q, "host").unwrap_or_default();
    if host.is_empty() {
        return Err(ApiError::bad_request(
            code::INVALID_PEER_URL,
            "query parameter host (the new node's peer address) is required",
        ));
    }
    let id = param(&q, "name").and_then(id_from_name);
    let (id, _) = members::add(&app, id, host, false).await?;
    let st = app.node.status().await?;
    let mut resp = Json(json!({
        "id": id,
        "cluster_id": app.cfg.cluster_id,
        "members": members_json(&st),
    }))
    .into_response();
    resp.extensions_mut().insert(LeaderHint(st.leader));
    Ok(resp)
}

/// `/intern/leave?name=server3&host=127.0.0.1:3003`: removes the member whose id is the name's
/// trailing digits, or else the one at `host`.
pub async fn intern_leave(State(app): State<App>, uri: Uri) -> ApiResult<Response> {
    let q = query_pairs(&uri);
    let id = match param(&q, "name").and_then(id_from_name) {
        Some(id) => id,
        None => {
            let host = param(&q, "host").unwrap_or_default();
            if host.is_empty() {
                return Err(ApiError::bad_request(
                    code::BAD_REQUEST,
                    "give name (ending in the node id) or host (its peer address)",
                ));
            }
            let addr = crate::input::peer_addr(host)?;
            let st = app.node.status().await?;
            match find_by_addr(&st, &addr) {
                Some(m) => m.id,
                None => {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        code::MEMBER_NOT_FOUND,
                        format!("no member at {addr}"),
                    ))
                }
            }
        }
    };
    members::remove(&app, id).await?;
    let st = app.node.status().await?;
    let mut resp = Json(json!({ "id": id, "members": members_json(&st) })).into_response();
    resp.extensions_mut().insert(LeaderHint(st.leader));
    Ok(resp)
}
