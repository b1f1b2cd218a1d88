//! Command-line configuration of the coordinator.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

// A String error on purpose: clap value parsers conventionally return one (clap prints it as is).
fn duration(s: &str) -> Result<Duration, String> {
    restic_operator_api::common::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration such as 30s, 5m or 1h"))
}

#[derive(Parser, Clone, Debug)]
#[command(
    name = "restic-coordinator",
    version,
    about = "Reconciles restic-operator resources and drives the node agents"
)]
pub struct Config {
    /// Kubeconfig to use instead of the in-cluster configuration (or `$KUBECONFIG`).
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Namespace the coordinator runs in: its leader Lease, the CA and agent certificate
    /// Secrets, and the agent pods live here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "restic-operator")]
    pub namespace: String,
    /// Namespaces whose resources are reconciled (comma-separated). Default: all.
    #[arg(long, env = "WATCH_NAMESPACES", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    /// This replica's identity in the leader Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Disable leader election (only for a single replica).
    #[arg(long)]
    pub no_leader_election: bool,
    #[arg(long, default_value = "restic-operator-coordinator")]
    pub lease_name: String,
    #[arg(long, value_parser = duration, default_value = "15s")]
    pub lease_duration: Duration,
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub lease_renew_interval: Duration,
    /// Label selector of the agent pods (one per node) in `--namespace`.
    #[arg(
        long,
        default_value = "app.kubernetes.io/name=restic-operator,app.kubernetes.io/component=agent"
    )]
    pub agent_selector: String,
    /// Agent gRPC port, unless the agent pod names a container port `grpc`.
    #[arg(long, default_value_t = 9443)]
    pub agent_port: u16,
    /// Name the agent serving certificates are issued for and checked against.
    #[arg(long, default_value = "restic-agent")]
    pub agent_server_name: String,
    /// Secret holding the operator CA (certificate and key); created when missing.
    #[arg(long, default_value = "restic-operator-ca")]
    pub ca_secret: String,
    /// Secret the agents mount: their serving certificate, key and the CA; created when
    /// missing and renewed before it expires.
    #[arg(long, default_value = "restic-operator-agent-tls")]
    pub agent_tls_secret: String,
    /// Certificates are renewed when less than this remains of their validity.
    #[arg(long, value_parser = duration, default_value = "720h")]
    pub cert_renew_before: Duration,
    #[arg(long, value_parser = duration, default_value = "8760h")]
    pub cert_validity: Duration,
    /// How often certificates are checked for renewal.
    #[arg(long, value_parser = duration, default_value = "1h")]
    pub cert_check_interval: Duration,
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,
    /// How often each repository is probed for readiness and its statistics are refreshed
    /// (also after every spec change, at once when a backup finds restic cannot reach it, and
    /// statistics after every backup).
    #[arg(long, value_parser = duration, default_value = "1h")]
    pub stats_interval: Duration,
    /// How late a scheduled run may still start (after a coordinator outage); older missed
    /// runs are skipped with an event, never run in a burst.
    #[arg(long, value_parser = duration, default_value = "1h")]
    pub starting_deadline: Duration,
    /// Time limit of repository operations that should be quick (the readiness probe, init,
    /// snapshots); restic otherwise retries an unreachable backend for many minutes.
    #[arg(long, value_parser = duration, default_value = "60s")]
    pub repository_timeout: Duration,
    /// Time limit of a backup without `jobConfig.activeDeadlineSeconds`.
    #[arg(long, value_parser = duration, default_value = "24h")]
    pub run_timeout: Duration,
    /// Time limit of reading repository statistics (`restic stats` reads every snapshot, so
    /// it is slow on large repositories). A failure never changes the repository's readiness.
    #[arg(long, value_parser = duration, default_value = "30m")]
    pub stats_timeout: Duration,
    /// How many times the final status of a run is tried before the run is left to the next
    /// reconcile, which re-attaches to it and writes it (its hooks do not run again).
    #[arg(long, default_value = "8")]
    pub status_write_attempts: u32,
    /// Time limit of forget, prune and check.
    #[arg(long, value_parser = duration, default_value = "6h")]
    pub maintenance_timeout: Duration,
    /// How often live progress is written to a backup's status.
    #[arg(long, value_parser = duration, default_value = "3s")]
    pub progress_interval: Duration,
    /// How long to keep trying to reach the agent of a run in flight before failing it, and how
    /// long a new backup waits for its node's agent to be ready (an agent pod being replaced).
    #[arg(long, value_parser = duration, default_value = "2m")]
    pub agent_lost_timeout: Duration,
    /// Image of holder pods, which only keep a claim no running pod mounts mounted while its
    /// node's agent backs it up. Nothing runs in them but this image's entrypoint; the
    /// Kubernetes pause image is made for exactly that.
    #[arg(long, env = "HOLDER_IMAGE", default_value = "registry.k8s.io/pause:3.10.1")]
    pub holder_image: String,
    /// How long a holder pod may take to run on a node (scheduling, attaching the claim,
    /// pulling the image) before its run fails and it is deleted.
    #[arg(long, value_parser = duration, default_value = "5m")]
    pub holder_start_timeout: Duration,
    /// `text` or `json`.
    #[arg(long, default_value = "text")]
    pub log_format: String,
}

impl Config {
    /// This replica's identity: `--identity`, `$POD_NAME`, or the host name.
    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "restic-coordinator".into())
        })
    }
}
