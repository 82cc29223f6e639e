//! Code generated from `proto/ascend/gateway/v1` by `build.rs`, and the
//! encoded descriptor set that server reflection serves.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ascend.gateway.v1");
}

/// Every file of the contract, with its imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ascend_descriptor.bin"));
