//! The JSON API under `/v1/`, and `/health` and `/metrics`.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use keel_kv::{DeleteRangeRequest, KeyValue, Op, PutRequest, RangeRequest, RangeResponse};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{code, ApiError, ApiResult};
use crate::input::{
    flag, key_from_path, node_id, number_param, parse_json, parse_json_or_default, query_pairs,
    read_body,
};
use crate::members::{self, find, members_json, role_name};
use crate::raftexample::value_limit;
use crate::{App, Inner, LeaderHint};

fn with_leader(resp: impl IntoResponse, leader: u64) -> Response {
    let mut r = resp.into_response();
    r.extensions_mut().insert(LeaderHint(leader));
    r
}

/// The end of the range holding every key that starts with `prefix` (etcd's
/// `GetPrefixRangeEnd`): the prefix with its last byte below 0xff incremented, or `\0` (to
/// the end of the key space) when every byte is 0xff.
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(b"\0")
}

#[derive(Serialize)]
struct KvJson {
    /// Keys and values are bytes; JSON carries them as UTF-8 text (lossily for other bytes).
    /// The raftexample API (`GET /<key>`) returns values byte for byte.
    key: String,
    value: String,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
}

impl From<&KeyValue> for KvJson {
    fn from(kv: &KeyValue) -> KvJson {
        KvJson {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            value: String::from_utf8_lossy(&kv.value).into_owned(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
        }
    }
}

#[derive(Serialize)]
struct RangeJson {
    kvs: Vec<KvJson>,
    revision: i64,
    /// Keys in the range, including those this answer left out.
    count: i64,
    /// More keys follow the last one returned (a limit cut the answer).
    more: bool,
}

/// `GET|PUT|DELETE /v1/kv/<key>`.
pub async fn kv(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let raw = uri
        .path()
        .strip_prefix("/v1/kv")
        .map(|r| r.strip_prefix('/').unwrap_or(r))
        .unwrap_or_default();
    let key = key_from_path(raw);
    let q = query_pairs(&uri);
    match method {
        Method::GET | Method::HEAD => {
            if key.is_empty() {
                return Err(ApiError::empty_key());
            }
            let prefix = flag(&q, "prefix")?;
            let serializable = flag(&q, "serializable")?;
            let limit = match number_param(&q, "limit")? {
                Some(n) if n > 0 => (n as u64).min(app.cfg.max_range_keys as u64) as usize,
                Some(_) | None => app.cfg.max_range_keys,
            };
            let req = RangeRequest {
                range_end: if prefix {
                    prefix_end(&key)
                } else {
                    Bytes::new()
                },
                key,
                limit: limit as i64,
                ..Default::default()
            };
            let r = read(&app, req, serializable).await?;
            if !prefix && r.kvs.is_empty() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    code::KEY_NOT_FOUND,
                    "key not found",
                ));
            }
            Ok(Json(range_json(&app, r)).into_response())
        }
        Method::PUT => {
            if key.is_empty() {
                return Err(ApiError::empty_key());
            }
            let limit = value_limit(&app, key.len())?;
            let value = read_body(&headers, body, limit)
                .await
                .map_err(|e| match e.code {
                    code::TOO_LARGE => ApiError::too_large(app.cfg.max_request_bytes),
                    _ => e,
                })?;
            let op = Op::Put(PutRequest {
                key,
                value,
                ..Default::default()
            });
            match app.node.propose(op).await? {
                keel_kv::Response::Put(p) => {
                    Ok(Json(json!({ "revision": p.revision })).into_response())
                }
                other => Err(unexpected(&other)),
            }
        }
        Method::DELETE => {
            if key.is_empty() {
                return Err(ApiError::empty_key());
            }
            let range_end = if flag(&q, "prefix")? {
                prefix_end(&key)
            } else {
                Bytes::new()
            };
            let op = Op::DeleteRange(DeleteRangeRequest {
                key,
                range_end,
                ..Default::default()
            });
            match app.node.propose(op).await? {
                keel_kv::Response::DeleteRange(d) => Ok(Json(json!({
                    "deleted": d.deleted,
                    "revision": d.revision,
                }))
                .into_response()),
                other => Err(unexpected(&other)),
            }
        }
        other => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            code::METHOD_NOT_ALLOWED,
            format!("{other} is not served on /v1/kv/<key>: use GET, PUT or DELETE"),
        )),
    }
}

fn unexpected(r: &keel_kv::Response) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        code::INTERNAL,
        format!("internal: the state machine answered {r:?}"),
    )
}

async fn read(app: &Inner, req: RangeRequest, serializable: bool) -> ApiResult<RangeResponse> {
    Ok(if serializable {
        app.node.read_local(req).await?
    } else {
        app.node.read(req).await?
    })
}

/// Builds the answer within `max_range_bytes` of keys and values; a cut answer says `more`.
fn range_json(app: &Inner, r: RangeResponse) -> RangeJson {
    let mut budget = app.cfg.max_range_bytes;
    let mut kvs = Vec::with_capacity(r.kvs.len());
    let mut cut = false;
    for kv in &r.kvs {
        let size = kv.key.len() + kv.value.len();
        // The first key always goes in (a single value can be up to max-request-bytes), so a
        // client paging by the last key returned always makes progress.
        if !kvs.is_empty() && size > budget {
            cut = true;
            break;
        }
        budget = budget.saturating_sub(size);
        kvs.push(KvJson::from(kv));
    }
    RangeJson {
        kvs,
        revision: r.revision,
        count: r.count,
        more: r.more || cut,
    }
}

/// `GET /v1/members`.
pub async fn list_members(State(app): State<App>) -> ApiResult<Response> {
    let st = app.node.status().await?;
    Ok(with_leader(
        Json(json!({ "leader": st.leader, "members": members_json(&st) })),
        st.leader,
    ))
}

#[derive(Deserialize)]
struct AddMember {
    peer_url: String,
    #[serde(default)]
    learner: bool,
    /// Absent: the name's trailing digits if it has any, else one above every member id.
    id: Option<u64>,
    name: Option<String>,
}

/// `POST /v1/members` with `{"peer_url", "learner", "id"}`: 201 once the change is applied
/// here, 200 if that member already exists as asked (a retried join).
pub async fn add_member(
    State(app): State<App>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let body = read_body(&headers, body, app.cfg.max_request_bytes).await?;
    let req: AddMember = parse_json(&body)?;
    let id = req
        .id
        .or_else(|| req.name.as_deref().and_then(crate::input::id_from_name));
    let (id, created) = members::add(&app, id, &req.peer_url, req.learner).await?;
    let st = app.node.status().await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(with_leader(
        (
            status,
            Json(json!({
                "id": id,
                "cluster_id": app.cfg.cluster_id,
                "members": members_json(&st),
            })),
        ),
        st.leader,
    ))
}

fn path_id(p: Result<Path<String>, PathRejection>) -> ApiResult<u64> {
    match p {
        Ok(Path(s)) => node_id(&s),
        Err(e) => Err(ApiError::bad_request(code::INVALID_NODE_ID, e.body_text())),
    }
}

/// `DELETE /v1/members/<id>`.
pub async fn remove_member(
    State(app): State<App>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = path_id(id)?;
    members::remove(&app, id).await?;
    let st = app.node.status().await?;
    Ok(with_leader(
        Json(json!({ "members": members_json(&st) })),
        st.leader,
    ))
}

/// `POST /v1/members/<id>/promote`: a learner becomes a voter.
pub async fn promote(
    State(app): State<App>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = path_id(id)?;
    let st = app.node.status().await?;
    match find(&st, id) {
        None => return Err(ApiError::unknown_member(id)),
        Some(m) if !m.learner => {
            return Err(ApiError::conflict(format!(
                "member {id} is already a voter"
            )))
        }
        Some(_) => {}
    }
    crate::members::check_learner_ready(&st, id)?;
    app.node.promote(id).await?;
    let st = app.node.status().await?;
    Ok(with_leader(
        Json(json!({ "members": members_json(&st) })),
        st.leader,
    ))
}

#[derive(Deserialize, Default)]
struct Transfer {
    /// Absent or 0: the most caught-up voter.
    #[serde(default)]
    to: u64,
}

/// `POST /v1/leader/transfer` with an optional `{"to": id}`.
pub async fn transfer_leader(
    State(app): State<App>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let body = read_body(&headers, body, app.cfg.max_request_bytes).await?;
    let req: Transfer = parse_json_or_default(&body)?;
    if req.to != 0 {
        let st = app.node.status().await?;
        match find(&st, req.to) {
            None => return Err(ApiError::unknown_member(req.to)),
            Some(m) if m.learner => {
                return Err(ApiError::conflict(format!(
                    "member {} is a learner and cannot lead",
                    req.to
                )))
            }
            Some(_) => {}
        }
    }
    let leader = app.node.transfer_leader(req.to).await?;
    Ok(with_leader(Json(json!({ "leader": leader })), leader))
}

/// `GET /v1/status`.
pub async fn status(State(app): State<App>) -> ApiResult<Response> {
    let st = app.node.status().await?;
    Ok(with_leader(
        Json(json!({
            "id": st.id,
            "name": app.cfg.name,
            "cluster_id": app.cfg.cluster_id,
            "role": role_name(st.role),
            "term": st.term,
            "leader": st.leader,
            "leader_peer_url": st.leader_addr,
            "leader_client_urls": st.leader_client_urls(),
            "commit": st.commit,
            "applied": st.applied,
            "last_index": st.last_index,
            "snapshot_index": st.last_snapshot,
            "wal_bytes": st.wal_bytes,
            "pending_requests": st.pending_requests,
            "members": members_json(&st),
        })),
        st.leader,
    ))
}

/// `GET /v1/hash[?revision=R]`: the state machine's hash at a revision (0 or absent: the
/// current one), for comparing members.
pub async fn hash(State(app): State<App>, uri: Uri) -> ApiResult<Response> {
    let q = query_pairs(&uri);
    let revision = number_param(&q, "revision")?.unwrap_or(0);
    if revision < 0 {
        return Err(ApiError::bad_request(
            code::BAD_REQUEST,
            "revision must not be negative",
        ));
    }
    let h = app.node.hash(revision).await?;
    Ok(Json(json!({
        "id": app.node.id(),
        "revision": h.revision,
        "compact_revision": h.compact_revision,
        "hash": h.hash,
        "applied": h.applied,
    }))
    .into_response())
}

/// `GET /health`: 200 when this node knows a leader and has applied everything it knows to be
/// committed; 503 with the reason otherwise.
pub async fn health(State(app): State<App>) -> Response {
    let (ok, reason, leader) = match app.node.status().await {
        Err(e) => (false, format!("node not answering: {e}"), None),
        Ok(st) if st.leader == 0 => (false, "no leader known".to_owned(), Some(0)),
        Ok(st) if st.applied < st.commit => (
            false,
            format!("applied {} of {} committed entries", st.applied, st.commit),
            Some(st.leader),
        ),
        Ok(st) => (true, String::new(), Some(st.leader)),
    };
    let mut resp = if ok {
        Json(json!({ "health": true })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            // Health answers are not errors of the request, but still JSON with a reason.
            Json(json!({ "health": false, "reason": reason })),
        )
            .into_response()
    };
    if let Some(l) = leader {
        resp.extensions_mut().insert(LeaderHint(l));
    }
    resp
}

/// `GET /metrics`: the node's metrics and this layer's, in the OpenMetrics text format.
pub async fn metrics(State(app): State<App>) -> Response {
    let text = app.metrics.render(&app.node.metrics_text());
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(&prefix_end(b"abc")[..], b"abd");
        assert_eq!(&prefix_end(b"a\xff")[..], b"b");
        assert_eq!(&prefix_end(b"\xff\xff")[..], b"\0");
        assert_eq!(&prefix_end(b"")[..], b"\0");
    }
}
