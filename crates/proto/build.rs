// protox parses the .proto files in pure Rust, so building Keel needs no system protoc.
fn main() {
    let protos = ["proto/raftpb.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("parse .proto files");
    prost_build::Config::new()
        // Entry payloads and snapshot data are handed around without copying.
        .bytes(["."])
        .compile_fds(fds)
        .expect("generate Rust from .proto files");
}
