//! etcd's Lease service. Grants and revokes are writes through Raft, served by any member.
//! Keep-alives and TTL questions need the leader's lease clock (`keel_node::lessor`), so a
//! follower forwards them to the leader's client URL, as etcd forwards them to its leader
//! (see `Shared::leader_channel` for how a forwarded request is kept from circling).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use keel_etcdpb::etcdserverpb as pb;
use keel_etcdpb::etcdserverpb::lease_client::LeaseClient;
use keel_node::driver::{DriverError, LeaseTtl};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::{forwarded_request, is_forwarded, status_of, Shared};

/// Answers a keep-alive stream holds for its client: keep-alives are answered one at a time, so
/// a few are enough; a client that does not read them stops being read from.
const KEEPALIVE_BUFFER: usize = 16;

/// Between tries to reach a leader that is being elected or is not answering.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

pub(super) struct LeaseService {
    shared: Arc<Shared>,
}

impl LeaseService {
    pub(super) fn new(shared: Arc<Shared>) -> LeaseService {
        LeaseService { shared }
    }
}

/// What a keep-alive or TTL question came to.
enum Asked<T> {
    /// Answered here (this member leads).
    Here(T),
    /// This member does not lead: the leader's client, to ask it there.
    There(LeaseClient<Channel>),
}

impl LeaseService {
    async fn revision(&self) -> Result<i64, Status> {
        self.shared.revision().await
    }

    async fn leader_client(&self) -> Result<Option<LeaseClient<Channel>>, Status> {
        Ok(self.shared.leader_channel().await?.map(LeaseClient::new))
    }

    /// Runs `here` on this node, or finds the leader to ask; retried until the request
    /// deadline while there is no leader or it cannot be reached.
    async fn ask<T, F, Fut>(&self, forwarded: bool, here: F) -> Result<Asked<T>, Status>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, DriverError>>,
    {
        let deadline = Instant::now() + self.shared.app.node.request_timeout();
        loop {
            match here().await {
                Ok(t) => return Ok(Asked::Here(t)),
                Err(DriverError::NotLeader(_)) if forwarded => {
                    return Err(Status::unavailable("etcdserver: leader changed"));
                }
                Err(DriverError::NotLeader(_)) => {
                    if let Some(c) = self.leader_client().await? {
                        return Ok(Asked::There(c));
                    }
                }
                Err(DriverError::NoLeader) => {}
                Err(e) => return Err(status_of(e)),
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(Status::unavailable("etcdserver: request timed out"));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// A keep-alive: the lease's new TTL, 0 when it is unknown or expired (as etcd answers).
    async fn renew(&self, id: i64, forwarded: bool) -> Result<i64, Status> {
        let deadline = Instant::now() + self.shared.app.node.request_timeout();
        loop {
            let node = &self.shared.app.node;
            let mut c = match self.ask(forwarded, || node.lease_renew(id)).await? {
                Asked::Here(ttl) => return Ok(ttl.unwrap_or(0)),
                Asked::There(c) => c,
            };
            let req = forwarded_request(tokio_stream::once(pb::LeaseKeepAliveRequest { id }));
            let answer = match c.lease_keep_alive(req).await {
                Ok(r) => r.into_inner().message().await,
                Err(s) => Err(s),
            };
            match answer {
                Ok(Some(r)) => return Ok(r.ttl),
                // Leadership moved on the way, or the leader went away: look again.
                Ok(None) | Err(_) if Instant::now() + RETRY_PAUSE < deadline => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(None) => return Err(Status::unavailable("etcdserver: request timed out")),
                Err(s) => return Err(s),
            }
        }
    }

    async fn time_to_live(
        &self,
        r: pb::LeaseTimeToLiveRequest,
        forwarded: bool,
    ) -> Result<pb::LeaseTimeToLiveResponse, Status> {
        let node = &self.shared.app.node;
        let (id, keys) = (r.id, r.keys);
        let mut c = match self
            .ask(forwarded, || node.lease_time_to_live(id, keys))
            .await?
        {
            Asked::Here(t) => {
                let rev = self.revision().await?;
                return Ok(ttl_out(id, t, self.shared.header(rev)));
            }
            Asked::There(c) => c,
        };
        let mut resp = c
            .lease_time_to_live(forwarded_request(r))
            .await?
            .into_inner();
        // This member answers the client: its own header.
        let rev = self.revision().await?;
        resp.header = self.shared.header(rev);
        Ok(resp)
    }
}

/// etcd answers an unknown lease's TTL question with TTL -1, not an error.
fn ttl_out(
    id: i64,
    t: Option<LeaseTtl>,
    header: Option<pb::ResponseHeader>,
) -> pb::LeaseTimeToLiveResponse {
    match t {
        Some(t) => pb::LeaseTimeToLiveResponse {
            header,
            id,
            ttl: t.ttl,
            granted_ttl: t.granted_ttl,
            keys: t.keys,
        },
        None => pb::LeaseTimeToLiveResponse {
            header,
            id,
            ttl: -1,
            granted_ttl: 0,
            keys: Vec::new(),
        },
    }
}

type KeepAliveStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

/// The service as tonic holds it: keep-alive streams hold the shared state past the call.
pub(super) struct LeaseApi(pub Arc<LeaseService>);

#[tonic::async_trait]
impl pb::lease_server::Lease for LeaseApi {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let r = req.into_inner();
        let g = self
            .0
            .shared
            .app
            .node
            .lease_grant(r.id, r.ttl)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::LeaseGrantResponse {
            header: self.0.shared.header(g.revision),
            id: g.id,
            ttl: g.ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let id = req.into_inner().id;
        let rev = self
            .0
            .shared
            .app
            .node
            .lease_revoke(id)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::LeaseRevokeResponse {
            header: self.0.shared.header(rev),
        }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let forwarded = is_forwarded(&req);
        let mut inbound = req.into_inner();
        let (out, out_rx) = mpsc::channel(KEEPALIVE_BUFFER);
        let service = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                let answer = match service.renew(r.id, forwarded).await {
                    Ok(ttl) => match service.revision().await {
                        Ok(rev) => Ok(pb::LeaseKeepAliveResponse {
                            header: service.shared.header(rev),
                            id: r.id,
                            ttl,
                        }),
                        Err(s) => Err(s),
                    },
                    Err(s) => Err(s),
                };
                let failed = answer.is_err();
                if out.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let resp = self.0.time_to_live(req.into_inner(), forwarded).await?;
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        _req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let leases = self.0.shared.app.node.leases().await.map_err(status_of)?;
        let rev = self.0.revision().await?;
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: self.0.shared.header(rev),
            leases: leases
                .into_iter()
                .map(|l| pb::LeaseStatus { id: l.id })
                .collect(),
        }))
    }
}
