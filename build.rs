//! Compiles the gRPC contract in `proto/` with a pure-Rust protobuf compiler
//! (protox), so building needs no system `protoc`. The encoded descriptor set
//! is kept for server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/ascend/gateway/v1/common.proto",
    "proto/ascend/gateway/v1/inference.proto",
    "proto/ascend/gateway/v1/admin.proto",
    "proto/ascend/gateway/v1/billing.proto",
    "proto/ascend/gateway/v1/webhooks.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("ascend_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // INVALID_ARGUMENT, naming the field, for a request that does not decode.
        .codec_path("crate::api::codec::StrictCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
