//! The versioned gRPC API between the coordinator and the node agents, generated from
//! `proto/resticoperator/agent/v1/agent.proto` at build time.

/// `resticoperator.agent.v1`
/// The largest message either side sends or accepts: the agent encodes and the coordinator
/// decodes with this one limit (a long snapshot list fits; run results are bounded far below).
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;
/// At most this many failed paths travel in a result and reach status; the rest are counted.
pub const MAX_FAILED_PATHS: usize = 100;

pub mod v1 {
    #![allow(clippy::all, rust_2018_idioms, missing_docs)]
    tonic::include_proto!("resticoperator.agent.v1");

    /// The encoded descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("agent_descriptor");
}
