//! Decoding what a client sent: keys, query flags, bodies, node ids and peer URLs. Every
//! function here is total: any bytes give a value or an `ApiError`, never a panic.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use percent_encoding::percent_decode;
use serde::de::DeserializeOwned;

use crate::error::{code, ApiError, ApiResult};

/// How long a client may take to send its body. Without it a client that announces a body
/// and then trickles it (or stops) would hold a request slot forever; 30 s is far beyond any
/// honest upload of `max_request_bytes` on a working network.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Node ids are below 2^32: the driver builds proposer ids as `id << 32 | boot`.
pub const MAX_NODE_ID: u64 = u32::MAX as u64;

/// A key from a path suffix: percent-decoded to raw bytes, so any byte string (including
/// invalid UTF-8 and `/`) can be a key.
pub fn key_from_path(raw: &str) -> Bytes {
    Bytes::from(percent_decode(raw.as_bytes()).collect::<Vec<u8>>())
}

/// The query string's pairs, percent-decoded (lossily: parameter values are flags and numbers,
/// never keys).
pub fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    let Some(q) = uri.query() else {
        return Vec::new();
    };
    let dec = |s: &str| {
        let s = s.replace('+', " ");
        percent_decode(s.as_bytes())
            .decode_utf8_lossy()
            .into_owned()
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (dec(k), dec(v)),
            None => (dec(p), String::new()),
        })
        .collect()
}

pub fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `?name`, `?name=true|1` are true; absent, `false` or `0` false; anything else is refused,
/// so a typo cannot silently turn a prefix delete into a single-key delete or the reverse.
pub fn flag(pairs: &[(String, String)], name: &str) -> ApiResult<bool> {
    match param(pairs, name) {
        None => Ok(false),
        Some("" | "true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(other) => Err(ApiError::bad_request(
            code::BAD_REQUEST,
            format!("query parameter {name}: expected true or false, got {other:?}"),
        )),
    }
}

pub fn number_param(pairs: &[(String, String)], name: &str) -> ApiResult<Option<i64>> {
    match param(pairs, name) {
        None | Some("") => Ok(None),
        Some(v) => v.parse::<i64>().map(Some).map_err(|_| {
            ApiError::bad_request(
                code::BAD_REQUEST,
                format!("query parameter {name}: not a number: {v:?}"),
            )
        }),
    }
}

/// Reads the whole body, refusing more than `limit` bytes: up front from Content-Length when
/// the client sent one, else as soon as the stream passes the limit (so at most `limit` bytes
/// are ever buffered).
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> ApiResult<Bytes> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(ApiError::too_large(limit));
        }
    }
    let collect = Limited::new(body, limit).collect();
    match tokio::time::timeout(BODY_READ_TIMEOUT, collect).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            code::BODY_TIMEOUT,
            format!("body not received within {BODY_READ_TIMEOUT:?}"),
        )),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::too_large(limit))
        }
        Ok(Err(e)) => Err(ApiError::bad_request(
            code::BAD_REQUEST,
            format!("reading the body: {e}"),
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// A JSON body; an empty body is `T::default()` for endpoints whose fields are all optional.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(code::INVALID_JSON, format!("invalid JSON body: {e}")))
}

pub fn parse_json_or_default<T: DeserializeOwned + Default>(body: &[u8]) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_json(body)
}

/// A node id from a path segment: a decimal in `1..2^32`.
pub fn node_id(s: &str) -> ApiResult<u64> {
    let bad = || {
        ApiError::bad_request(
            code::INVALID_NODE_ID,
            format!("node id must be a number in 1..{MAX_NODE_ID}, got {s:?}"),
        )
    };
    let id: u64 = s.parse().map_err(|_| bad())?;
    check_node_id(id).map_err(|_| bad())
}

pub fn check_node_id(id: u64) -> ApiResult<u64> {
    if id == 0 || id > MAX_NODE_ID {
        return Err(ApiError::bad_request(
            code::INVALID_NODE_ID,
            format!("node id must be in 1..{MAX_NODE_ID}, got {id}"),
        ));
    }
    Ok(id)
}

/// The id a seed-style name carries in its trailing digits (`server3` -> 3, `node-01` -> 1).
pub fn id_from_name(name: &str) -> Option<u64> {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return None;
    }
    name[name.len() - digits..]
        .parse::<u64>()
        .ok()
        .filter(|&id| id != 0 && id <= MAX_NODE_ID)
}

/// Longest peer URL accepted; a URL is a host and a port, and DNS names stop at 253 bytes.
const MAX_PEER_URL: usize = 512;

/// `http://host:port[/]` or `host:port` -> `host:port`, the form the transport dials. Refuses
/// anything else (a path, another scheme, a missing or zero port) rather than adding a member
/// nobody can reach.
pub fn peer_addr(url: &str) -> ApiResult<String> {
    let bad = |why: &str| {
        ApiError::bad_request(
            code::INVALID_PEER_URL,
            format!("peer URL {url:?}: {why} (expected http://host:port or host:port)"),
        )
    };
    let s = url.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.len() > MAX_PEER_URL {
        return Err(bad("too long"));
    }
    let s = match s.split_once("://") {
        Some(("http", rest)) => rest,
        Some(_) => return Err(bad("only http:// is supported")),
        None => s,
    };
    let s = s.strip_suffix('/').unwrap_or(s);
    if s.contains('/') || s.contains('?') || s.contains('#') || s.contains('@') {
        return Err(bad("has a path, query or user part"));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(bad("no port"));
    };
    let host_ok = !host.is_empty()
        && (host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            || (host.starts_with('[') && host.ends_with(']')));
    if !host_ok {
        return Err(bad("bad host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(s.to_string()),
        _ => Err(bad("bad port")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode_to_raw_bytes() {
        assert_eq!(&key_from_path("a%2Fb")[..], b"a/b");
        assert_eq!(&key_from_path("%FF%00x")[..], b"\xff\x00x");
        assert_eq!(&key_from_path("plain/key")[..], b"plain/key");
        // A stray percent sign stays as it is rather than failing.
        assert_eq!(&key_from_path("100%")[..], b"100%");
    }

    #[test]
    fn flags() {
        let u: Uri = "/k?prefix&serializable=true&x=false&bad=maybe"
            .parse()
            .unwrap();
        let p = query_pairs(&u);
        assert!(flag(&p, "prefix").unwrap());
        assert!(flag(&p, "serializable").unwrap());
        assert!(!flag(&p, "x").unwrap());
        assert!(!flag(&p, "absent").unwrap());
        assert_eq!(flag(&p, "bad").unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn node_ids() {
        assert_eq!(node_id("4").unwrap(), 4);
        for bad in ["", "x", "-1", "0", "4294967296", "1.5", " 3"] {
            let e = node_id(bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_NODE_ID, "{bad:?}");
        }
    }

    #[test]
    fn ids_from_names() {
        assert_eq!(id_from_name("server3"), Some(3));
        assert_eq!(id_from_name("node-01"), Some(1));
        assert_eq!(id_from_name("node-00"), None);
        assert_eq!(id_from_name("alpha"), None);
        assert_eq!(id_from_name("n99999999999999999999"), None);
    }

    #[test]
    fn peer_urls() {
        assert_eq!(
            peer_addr("http://127.0.0.1:42379").unwrap(),
            "127.0.0.1:42379"
        );
        assert_eq!(peer_addr("127.0.0.1:42379/").unwrap(), "127.0.0.1:42379");
        assert_eq!(peer_addr(" localhost:1 ").unwrap(), "localhost:1");
        assert_eq!(peer_addr("[::1]:7").unwrap(), "[::1]:7");
        for bad in [
            "",
            "http://127.0.0.1",
            "https://h:1",
            "h:0",
            "h:99999",
            "http://h:1/path",
            "a b:1",
            ":1",
        ] {
            assert_eq!(
                peer_addr(bad).unwrap_err().code,
                code::INVALID_PEER_URL,
                "{bad:?}"
            );
        }
    }
}
