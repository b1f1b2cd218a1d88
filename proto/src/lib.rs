//! The versioned gRPC API between the coordinator and the node agents, generated from
//! `proto/resticoperator/agent/v1/agent.proto` at build time.

/// `resticoperator.agent.v1`
/// The largest message either side sends or accepts: the agent encodes and the coordinator
/// decodes with this one limit (a long snapshot list fits; run results are bounded far below).
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;
/// At most this many failed paths travel in a result and reach status; the rest are counted.
pub const MAX_FAILED_PATHS: usize = 100;
/// The common name of the coordinator's client certificate, the one identity agents serve in
/// full; any other certificate of the operator CA gets what a debug certificate gets.
pub const OPERATOR_CLIENT_NAME: &str = "restic-operator-coordinator";
/// The organization (O) of the short-lived client certificates the coordinator issues to people
/// on call (`restic-agent debug --node`): agents serve such a client read-only calls, a dry-run
/// backup and cancel, nothing that writes a snapshot, restores or changes a repository.
pub const DEBUG_ORGANIZATION: &str = "restic-operator:debug";
/// The signer name of those certificates in the Kubernetes CertificateSigningRequest API.
pub const DEBUG_SIGNER: &str = "resticbackup.io/agent-debug";

pub mod v1 {
    #![allow(clippy::all, rust_2018_idioms, missing_docs)]
    tonic::include_proto!("resticoperator.agent.v1");

    /// The encoded descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("agent_descriptor");
}
