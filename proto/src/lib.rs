//! The versioned gRPC API between the coordinator and the node agents, generated from
//! `proto/resticoperator/agent/v1/agent.proto` at build time.

/// `resticoperator.agent.v1`
pub mod v1 {
    #![allow(clippy::all, rust_2018_idioms, missing_docs)]
    tonic::include_proto!("resticoperator.agent.v1");

    /// The encoded descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("agent_descriptor");
}
