//! etcd's v3 gRPC API (KV, Cluster, Maintenance) over a running node, so that etcdctl and etcd
//! client libraries work against Keel. Served on the same port as the HTTP API: gRPC requests
//! are HTTP/2 with `application/grpc` on `/etcdserverpb.<Service>/<Rpc>` paths, which the HTTP
//! API never uses.
//!
//! Errors carry etcd's status codes and messages, because clients match on the message text
//! (clientv3's `rpctypes`). Auth answers as an etcd with authentication disabled.

pub mod convert;
mod lease;
pub mod snapshot;
mod watch;

use std::pin::Pin;
use std::sync::Arc;

use keel_etcdpb::etcdserverpb as pb;
use keel_etcdpb::etcdserverpb::auth_server::{Auth, AuthServer};
use keel_etcdpb::etcdserverpb::cluster_server::{Cluster, ClusterServer};
use keel_etcdpb::etcdserverpb::kv_server::{Kv, KvServer};
use keel_etcdpb::etcdserverpb::maintenance_server::{Maintenance, MaintenanceServer};
use keel_kv::{Op, Response as KvResponse};
use keel_node::driver::{DriverError, Status as NodeStatus};
use keel_raft::StateRole;
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, Response, Status};

use crate::error::{code, ApiError};
use crate::{members, App};

/// Bytes a gRPC message may carry beyond `max_request_bytes`: etcd's `grpcOverheadBytes`, room
/// for the message's framing and fields around the key and value, which the size check below
/// then bounds exactly as etcd does.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// The etcd API version reported by Maintenance.Status. Clients gate features on it (e.g.
/// clientv3 refuses some RPCs against servers below 3.4), so Keel reports the version whose API
/// it serves, not its own.
const ETCD_API_VERSION: &str = "3.5.0";

/// What every service shares: the HTTP API's state (node, limits, identity).
struct Shared {
    app: App,
    member_id: u64,
    /// This node's client URL, shown in its own `Member.clientURLs`.
    client_url: String,
    max_txn_ops: usize,
    /// How often a watcher that asked for progress notifications gets one when idle.
    watch_progress_interval: std::time::Duration,
    /// The leader's client URL and a channel to it, reused while the leader stays.
    leader_link: tokio::sync::Mutex<Option<(String, tonic::transport::Channel)>>,
}

/// Metadata key marking a request one member forwarded to the leader. A member that gets one
/// while not leading answers "leader changed" rather than forwarding again, so a request never
/// circles between members that disagree about the leader.
pub const FORWARDED: &str = "keel-forwarded";

/// How long connecting to the leader may take before a forwarding try counts as failed.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

fn is_forwarded<T>(r: &Request<T>) -> bool {
    r.metadata().contains_key(FORWARDED)
}

fn forwarded_request<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    req
}

impl Shared {
    /// A channel to the leader's client API, once a leader is known and has published its
    /// client URL (through Raft, like its name).
    async fn leader_channel(&self) -> Result<Option<tonic::transport::Channel>, Status> {
        let st = self.app.node.status().await.map_err(status_of)?;
        let Some(url) = st.leader_client_urls().first().cloned() else {
            return Ok(None);
        };
        let mut link = self.leader_link.lock().await;
        if let Some((u, ch)) = link.as_ref() {
            if *u == url {
                return Ok(Some(ch.clone()));
            }
        }
        let ch = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| Status::internal(format!("keel: leader client URL {url}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_lazy();
        *link = Some((url, ch.clone()));
        Ok(Some(ch))
    }

    fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.app.cfg.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.app.node.term(),
        })
    }

    fn check_size(&self, n: usize) -> Result<(), Status> {
        if n > self.app.cfg.max_request_bytes {
            return Err(Status::invalid_argument("etcdserver: request is too large"));
        }
        Ok(())
    }

    async fn revision(&self) -> Result<i64, Status> {
        self.app.node.revision().await.map_err(status_of)
    }

    async fn propose(&self, op: Op) -> Result<KvResponse, Status> {
        self.app.node.propose(op).await.map_err(status_of)
    }

    /// Every member as etcd lists it: name and client URLs as the member published them
    /// through Raft; a member that never published has neither (etcdctl shows "unstarted").
    fn members(&self, st: &NodeStatus) -> Vec<pb::Member> {
        st.members
            .iter()
            .map(|m| {
                let unpublished = m.name.is_empty() && m.client_urls.is_empty();
                let (name, client_urls) = if m.id == st.id && unpublished {
                    // This node runs, so it is started, and knows its own attributes before
                    // its publish is applied.
                    let urls = Some(self.client_url.clone()).filter(|u| !u.is_empty());
                    (self.app.cfg.name.clone(), urls.into_iter().collect())
                } else {
                    (m.name.clone(), m.client_urls.clone())
                };
                pb::Member {
                    id: m.id,
                    name,
                    peer_ur_ls: m.peer_url.iter().map(|u| format!("http://{u}")).collect(),
                    client_ur_ls: client_urls,
                    is_learner: m.learner,
                }
            })
            .collect()
    }
}

/// etcd's status for a node error.
pub fn status_of(e: DriverError) -> Status {
    match e {
        DriverError::Kv(e) => Status::new(Code::from(e.grpc_code() as i32), e.to_string()),
        DriverError::NoLeader => Status::unavailable("etcdserver: no leader"),
        DriverError::LeaderChanged => Status::unavailable("etcdserver: leader changed"),
        DriverError::Timeout => Status::unavailable("etcdserver: request timed out"),
        DriverError::Overloaded => Status::resource_exhausted("etcdserver: too many requests"),
        DriverError::Busy(m) => Status::resource_exhausted(format!("keel: {m}; retry later")),
        DriverError::Stopped => Status::unavailable("etcdserver: server stopped"),
        DriverError::NotLeader(_) => Status::failed_precondition("etcdserver: not leader"),
        DriverError::UnknownMember(_) => Status::not_found("etcdserver: member not found"),
        DriverError::Conflict(m) | DriverError::Refused(m) => {
            Status::failed_precondition(format!("etcdserver: {m}"))
        }
        DriverError::Invalid(m) => Status::invalid_argument(format!("etcdserver: {m}")),
        e @ (DriverError::Storage(_)
        | DriverError::Config(_)
        | DriverError::Transport(_)
        | DriverError::Start(_)) => Status::internal(e.to_string()),
    }
}

/// etcd's status for an error of the checks shared with the HTTP API.
fn status_of_api(e: ApiError) -> Status {
    let m = e.message;
    match e.code {
        code::MEMBER_NOT_FOUND => Status::not_found("etcdserver: member not found"),
        code::INVALID_PEER_URL | code::INVALID_NODE_ID | code::BAD_REQUEST | code::INVALID => {
            Status::invalid_argument(format!("etcdserver: {m}"))
        }
        // Messages that are already etcd's (they start with its prefix) pass unchanged.
        code::CONFLICT | code::REFUSED | code::NOT_LEADER if m.starts_with("etcdserver: ") => {
            Status::failed_precondition(m)
        }
        code::CONFLICT | code::REFUSED | code::NOT_LEADER => {
            Status::failed_precondition(format!("etcdserver: {m}"))
        }
        code::NO_LEADER | code::TIMEOUT | code::STOPPED => Status::unavailable(m),
        code::OVERLOADED => Status::resource_exhausted(m),
        _ => Status::internal(m),
    }
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!("keel: unexpected answer to {what}"))
}

struct KvService(Arc<Shared>);

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let r = req.into_inner();
        let serializable = r.serializable;
        let range = convert::range_in(r)?;
        let node = &self.0.app.node;
        let out = if serializable {
            node.read_local(range).await
        } else {
            node.read(range).await
        }
        .map_err(status_of)?;
        let header = self.0.header(out.revision);
        Ok(Response::new(convert::range_out(out, header)))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let r = req.into_inner();
        self.0.check_size(r.key.len() + r.value.len())?;
        match self.0.propose(Op::Put(convert::put_in(r))).await? {
            KvResponse::Put(p) => {
                let header = self.0.header(p.revision);
                Ok(Response::new(convert::put_out(p, header)))
            }
            _ => Err(unexpected("put")),
        }
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let r = req.into_inner();
        self.0.check_size(r.key.len() + r.range_end.len())?;
        match self
            .0
            .propose(Op::DeleteRange(convert::delete_in(r)))
            .await?
        {
            KvResponse::DeleteRange(d) => {
                let header = self.0.header(d.revision);
                Ok(Response::new(convert::delete_out(d, header)))
            }
            _ => Err(unexpected("delete range")),
        }
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let r = req.into_inner();
        self.0.check_size(r.encoded_len())?;
        let t = convert::txn_in(r)?;
        t.check_op_limit(self.0.max_txn_ops)
            .map_err(|e| Status::new(Code::from(e.grpc_code() as i32), e.to_string()))?;
        match self.0.propose(Op::Txn(t)).await? {
            KvResponse::Txn(t) => {
                let header = self.0.header(t.revision);
                Ok(Response::new(convert::txn_out(t, header)))
            }
            _ => Err(unexpected("txn")),
        }
    }

    async fn compact(
        &self,
        req: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let r = req.into_inner();
        let op = Op::Compact(keel_kv::CompactRequest {
            revision: r.revision,
        });
        match self.0.propose(op).await? {
            KvResponse::Compact(c) => Ok(Response::new(pb::CompactionResponse {
                header: self.0.header(c.revision),
            })),
            _ => Err(unexpected("compact")),
        }
    }
}

struct ClusterService(Arc<Shared>);

impl ClusterService {
    /// etcd's cluster answers carry no revision: membership is not part of the key space.
    async fn listing(&self) -> Result<(Option<pb::ResponseHeader>, Vec<pb::Member>), Status> {
        let st = self.0.app.node.status().await.map_err(status_of)?;
        Ok((self.0.header(0), self.0.members(&st)))
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        req: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        let r = req.into_inner();
        let [url] = r.peer_ur_ls.as_slice() else {
            return Err(Status::invalid_argument(
                "etcdserver: keel members have exactly one peer URL",
            ));
        };
        let st = self.0.app.node.status().await.map_err(status_of)?;
        if let Ok(addr) = crate::input::peer_addr(url) {
            if members::find_by_addr(&st, &addr).is_some() {
                return Err(Status::failed_precondition(
                    "etcdserver: Peer URLs already exists",
                ));
            }
        }
        let (id, _) = members::add(&self.0.app, None, url, r.is_learner)
            .await
            .map_err(status_of_api)?;
        let (header, members) = self.listing().await?;
        let member = members.iter().find(|m| m.id == id).cloned();
        Ok(Response::new(pb::MemberAddResponse {
            header,
            member,
            members,
        }))
    }

    async fn member_remove(
        &self,
        req: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        members::remove(&self.0.app, req.into_inner().id)
            .await
            .map_err(status_of_api)?;
        let (header, members) = self.listing().await?;
        Ok(Response::new(pb::MemberRemoveResponse { header, members }))
    }

    /// etcd's MemberUpdate: a member's new peer URL, recorded by every member through the log
    /// (a node entry, see `keel_node::entry`), after which every member dials it. Checked in
    /// etcd's order: the URLs, the member, then whether another member has the URL.
    async fn member_update(
        &self,
        req: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        let r = req.into_inner();
        let [url] = r.peer_ur_ls.as_slice() else {
            return Err(Status::invalid_argument(
                "etcdserver: keel members have exactly one peer URL",
            ));
        };
        let addr = crate::input::peer_addr(url)
            .map_err(|_| Status::invalid_argument("etcdserver: given member URLs are invalid"))?;
        let st = self.0.app.node.status().await.map_err(status_of)?;
        if members::find(&st, r.id).is_none() {
            return Err(Status::not_found("etcdserver: member not found"));
        }
        if members::find_by_addr(&st, &addr).is_some_and(|m| m.id != r.id) {
            return Err(Status::failed_precondition(
                "etcdserver: Peer URLs already exists",
            ));
        }
        self.0
            .app
            .node
            .update_peer_addr(r.id, &addr)
            .await
            .map_err(status_of)?;
        let (header, members) = self.listing().await?;
        Ok(Response::new(pb::MemberUpdateResponse { header, members }))
    }

    async fn member_list(
        &self,
        _req: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        let (header, members) = self.listing().await?;
        Ok(Response::new(pb::MemberListResponse { header, members }))
    }

    async fn member_promote(
        &self,
        req: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let id = req.into_inner().id;
        let st = self.0.app.node.status().await.map_err(status_of)?;
        if st.voters.contains(&id) {
            return Err(Status::failed_precondition(
                "etcdserver: can only promote a learner member",
            ));
        }
        // Only the leader knows how far the learner has caught up, so, as etcd does, a
        // follower hands the promotion to the leader rather than promote a learner that may
        // never have started.
        if st.role != StateRole::Leader {
            if forwarded {
                return Err(Status::unavailable("etcdserver: leader changed"));
            }
            let Some(ch) = self.0.leader_channel().await? else {
                return Err(Status::unavailable("etcdserver: no leader"));
            };
            let mut c = keel_etcdpb::etcdserverpb::cluster_client::ClusterClient::new(ch);
            let mut resp = c
                .member_promote(forwarded_request(pb::MemberPromoteRequest { id }))
                .await?
                .into_inner();
            let (header, _) = self.listing().await?;
            resp.header = header;
            return Ok(Response::new(resp));
        }
        members::check_learner_ready(&st, id).map_err(status_of_api)?;
        self.0.app.node.promote(id).await.map_err(status_of)?;
        let (header, members) = self.listing().await?;
        Ok(Response::new(pb::MemberPromoteResponse { header, members }))
    }
}

struct MaintenanceService(Arc<Shared>);

type SnapshotStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        _req: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        // Keel raises no alarms: it has no space quota, and corruption stops the node instead.
        // etcd answers an empty alarm list without a header; so does Keel, byte for byte.
        Ok(Response::new(pb::AlarmResponse {
            header: None,
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let st = self.0.app.node.status().await.map_err(status_of)?;
        let rev = self.0.revision().await?;
        Ok(Response::new(pb::StatusResponse {
            header: self.0.header(rev),
            version: ETCD_API_VERSION.to_string(),
            db_size: st.wal_bytes as i64,
            leader: st.leader,
            raft_index: st.commit,
            raft_term: st.term,
            raft_applied_index: st.applied,
            errors: Vec::new(),
            db_size_in_use: st.wal_bytes as i64,
            is_learner: st.learners.contains(&st.id),
        }))
    }

    async fn defragment(
        &self,
        _req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        // The state machine lives in memory and the WAL is compacted by snapshots: there is
        // no file to defragment, and etcd answers success for an already compact backend.
        let rev = self.0.revision().await?;
        Ok(Response::new(pb::DefragmentResponse {
            header: self.0.header(rev),
        }))
    }

    async fn hash(
        &self,
        _req: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        let h = self.0.app.node.hash(0).await.map_err(status_of)?;
        Ok(Response::new(pb::HashResponse {
            header: self.0.header(h.revision),
            hash: h.hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        let rev = req.into_inner().revision;
        let h = self.0.app.node.hash(rev).await.map_err(status_of)?;
        Ok(Response::new(pb::HashKvResponse {
            header: self.0.header(h.revision),
            hash: h.hash,
            compact_revision: h.compact_revision,
        }))
    }

    type SnapshotStream = SnapshotStream;

    /// The node's state as a Raft snapshot carries it, in etcd's stream layout (see
    /// [`snapshot`]). The copy stays in memory until the stream ends or the client goes away;
    /// the driver allows one at a time (`ResourceExhausted` past it).
    async fn snapshot(
        &self,
        _req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let snap = self.0.app.node.snapshot_data().await.map_err(status_of)?;
        let header = self.0.header(snap.revision);
        let data = snap.data.clone();
        // A large state takes a while to hash: off the async workers.
        let responses = tokio::task::spawn_blocking(move || snapshot::responses(&data, header))
            .await
            .map_err(|e| Status::internal(format!("keel: hashing the snapshot: {e}")))?;
        tracing::info!(
            "sending a snapshot at index {} ({} bytes)",
            snap.applied,
            snap.data.len()
        );
        let stream = tokio_stream::iter(responses).map(move |r| {
            // The stream owns the snapshot's slot: it is free again once the stream is dropped.
            let _slot: &keel_node::driver::SnapshotData = &snap;
            Ok(r)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        let to = req.into_inner().target_id;
        // etcd serves MoveLeader on the leader only, and clients (etcdctl move-leader) find the
        // leader first; a follower answers at once rather than after a forwarded attempt.
        let st = self.0.app.node.status().await.map_err(status_of)?;
        if st.role != StateRole::Leader {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        }
        if !st.voters.contains(&to) {
            return Err(Status::failed_precondition(
                "etcdserver: bad leader transferee",
            ));
        }
        self.0
            .app
            .node
            .transfer_leader(to)
            .await
            .map_err(status_of)?;
        let rev = self.0.revision().await?;
        Ok(Response::new(pb::MoveLeaderResponse {
            header: self.0.header(rev),
        }))
    }

    async fn downgrade(
        &self,
        _req: Request<pb::DowngradeRequest>,
    ) -> Result<Response<pb::DowngradeResponse>, Status> {
        Err(Status::unimplemented("keel: downgrade does not apply"))
    }
}

struct AuthService(Arc<Shared>);

/// What the user and role RPCs answer: Keel has no user store yet.
const NO_USERS: &str = "keel: users and roles are not supported yet; authentication is disabled";

/// The Auth service of an etcd whose authentication is disabled, which is what Keel is: the
/// status says so, `Authenticate` answers etcd's "not enabled" (clients that were given a user
/// name report it as etcd's), and enabling fails as it does on an etcd without a root user.
/// The user and role RPCs all answer `Unimplemented`; the macro writes them out.
macro_rules! auth_service {
    ($($rpc:ident($req:ident) -> $resp:ident;)*) => {
        #[tonic::async_trait]
        impl Auth for AuthService {
            async fn auth_status(
                &self,
                _req: Request<pb::AuthStatusRequest>,
            ) -> Result<Response<pb::AuthStatusResponse>, Status> {
                Ok(Response::new(pb::AuthStatusResponse {
                    header: self.0.header(0),
                    enabled: false,
                    // A fresh etcd's auth store is at revision 1.
                    auth_revision: 1,
                }))
            }

            async fn authenticate(
                &self,
                _req: Request<pb::AuthenticateRequest>,
            ) -> Result<Response<pb::AuthenticateResponse>, Status> {
                Err(Status::failed_precondition(
                    "etcdserver: authentication is not enabled",
                ))
            }

            async fn auth_enable(
                &self,
                _req: Request<pb::AuthEnableRequest>,
            ) -> Result<Response<pb::AuthEnableResponse>, Status> {
                Err(Status::failed_precondition(
                    "etcdserver: root user does not exist",
                ))
            }

            async fn auth_disable(
                &self,
                _req: Request<pb::AuthDisableRequest>,
            ) -> Result<Response<pb::AuthDisableResponse>, Status> {
                Ok(Response::new(pb::AuthDisableResponse {
                    header: self.0.header(0),
                }))
            }

            $(
                async fn $rpc(
                    &self,
                    _req: Request<pb::$req>,
                ) -> Result<Response<pb::$resp>, Status> {
                    Err(Status::unimplemented(NO_USERS))
                }
            )*
        }
    };
}

auth_service! {
    user_add(AuthUserAddRequest) -> AuthUserAddResponse;
    user_get(AuthUserGetRequest) -> AuthUserGetResponse;
    user_list(AuthUserListRequest) -> AuthUserListResponse;
    user_delete(AuthUserDeleteRequest) -> AuthUserDeleteResponse;
    user_change_password(AuthUserChangePasswordRequest) -> AuthUserChangePasswordResponse;
    user_grant_role(AuthUserGrantRoleRequest) -> AuthUserGrantRoleResponse;
    user_revoke_role(AuthUserRevokeRoleRequest) -> AuthUserRevokeRoleResponse;
    role_add(AuthRoleAddRequest) -> AuthRoleAddResponse;
    role_get(AuthRoleGetRequest) -> AuthRoleGetResponse;
    role_list(AuthRoleListRequest) -> AuthRoleListResponse;
    role_delete(AuthRoleDeleteRequest) -> AuthRoleDeleteResponse;
    role_grant_permission(AuthRoleGrantPermissionRequest) -> AuthRoleGrantPermissionResponse;
    role_revoke_permission(AuthRoleRevokePermissionRequest) -> AuthRoleRevokePermissionResponse;
}

/// The gRPC services as an axum router, sharing the HTTP API's state.
pub(crate) fn routes(app: App, client_url: String) -> axum::Router {
    let shared = Arc::new(Shared {
        member_id: app.node.id(),
        client_url,
        max_txn_ops: app.cfg.max_txn_ops,
        watch_progress_interval: app.cfg.watch_progress_interval,
        leader_link: tokio::sync::Mutex::new(None),
        app,
    });
    let limit = shared.app.cfg.max_request_bytes + GRPC_OVERHEAD_BYTES;
    tonic::service::Routes::new(
        KvServer::new(KvService(shared.clone())).max_decoding_message_size(limit),
    )
    .add_service(
        ClusterServer::new(ClusterService(shared.clone())).max_decoding_message_size(limit),
    )
    .add_service(
        MaintenanceServer::new(MaintenanceService(shared.clone())).max_decoding_message_size(limit),
    )
    .add_service(
        keel_etcdpb::etcdserverpb::watch_server::WatchServer::new(watch::WatchService(
            shared.clone(),
        ))
        .max_decoding_message_size(limit),
    )
    .add_service(
        keel_etcdpb::etcdserverpb::lease_server::LeaseServer::new(lease::LeaseApi(Arc::new(
            lease::LeaseService::new(shared.clone()),
        )))
        .max_decoding_message_size(limit),
    )
    .add_service(AuthServer::new(AuthService(shared)).max_decoding_message_size(limit))
    .into_axum_router()
}

/// True for gRPC requests (which the HTTP fallback must not answer as a key lookup).
pub(crate) fn is_grpc(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}
