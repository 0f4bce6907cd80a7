//! etcd's v3 API wire types and gRPC service stubs, generated at build time from
//! `proto/etcd/api/**.proto` by protox, prost and tonic.
//!
//! Package, message, field and RPC names and field numbers are etcd's wire contract,
//! so unmodified etcd clients (etcdctl, the `etcd-client` crate) can talk to a server
//! built on these stubs. Never renumber or rename anything in the .proto files.
//!
//! The three modules sit side by side at the crate root, because the generated
//! `etcdserverpb` code names the others as `super::mvccpb` and `super::authpb`.
//! Each service `X` has a client in `etcdserverpb::x_client` and a server trait in
//! `etcdserverpb::x_server`.

/// Stored keys and watch events (etcd's `mvccpb` package).
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
}

/// Users, roles and permissions (etcd's `authpb` package).
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
}

/// The client API: KV, Watch, Lease, Cluster, Maintenance and Auth services
/// (etcd's `etcdserverpb` package).
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

/// The encoded `FileDescriptorSet` of all three packages (for gRPC reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/etcd_descriptor.bin"));

pub use prost::Message as ProstMessage;

#[cfg(test)]
mod tests;
