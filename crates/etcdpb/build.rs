// protox parses the .proto files in pure Rust, so building needs no system protoc.
use prost::Message;

fn main() {
    let protos = [
        "proto/etcd/api/mvccpb/kv.proto",
        "proto/etcd/api/authpb/auth.proto",
        "proto/etcd/api/etcdserverpb/rpc.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("parse .proto files");

    // Kept for gRPC reflection and for the tests that check service and RPC names.
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out_dir.join("etcd_descriptor.bin"), fds.encode_to_vec())
        .expect("write file descriptor set");

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Keys, values and snapshot blobs are handed around without copying.
        .bytes(".")
        .compile_fds(fds)
        .expect("generate Rust from .proto files");
}
