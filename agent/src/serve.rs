//! Start-up of the agent: flags, mutual TLS (reloaded when its files change), the gRPC services
//! (agent, health, reflection), metrics, and a graceful shutdown that stops restic and records
//! nothing as lost.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use restic_operator_proto::v1::FILE_DESCRIPTOR_SET;
use restic_operator_proto::v1::agent_server::AgentServer;
use tonic::transport::Server;

use crate::cgroup::Cgroups;
use crate::exec::Executor;
use crate::metrics::Metrics;
use crate::restic::RepositoryPolicy;
use crate::runs::Runs;
use crate::server::AgentService;
use crate::tls::{ReloadingTls, TlsFiles};
use crate::volumes::KubeletRoot;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address of the gRPC API.
    #[arg(long, env = "AGENT_LISTEN", default_value = "0.0.0.0:9443")]
    pub listen: SocketAddr,
    /// Serving certificate (PEM).
    #[arg(long, env = "AGENT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Serving key (PEM).
    #[arg(long, env = "AGENT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA whose client certificates are accepted (PEM). Clients without one are refused.
    #[arg(long, env = "AGENT_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// How often the certificate, key and client CA files are read again; changed, valid files
    /// take over without a restart (invalid ones are logged and the previous ones kept).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
    /// Serve without TLS, for local debugging only: refused unless --listen is a loopback address.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// The kubelet's root directory (pod volumes are under <root>/pods).
    #[arg(long, env = "KUBELET_ROOT", default_value = "/var/lib/kubelet")]
    pub kubelet_root: PathBuf,
    /// Where the agent keeps runs in flight, scratch space and restic's cache.
    #[arg(long, env = "AGENT_STATE_DIR", default_value = "/var/lib/restic-agent")]
    pub state_dir: PathBuf,
    /// The restic binary.
    #[arg(long, env = "RESTIC_BINARY", default_value = "restic")]
    pub restic: PathBuf,
    /// Runs executing at once; more wait in a queue.
    #[arg(long, default_value_t = 2)]
    pub max_concurrent_runs: usize,
    /// Memory limit of each restic process unless the request sets one, e.g. 1Gi, 512Mi, 0 = none.
    #[arg(long, default_value = "1Gi", value_parser = parse_bytes)]
    pub default_memory_limit: u64,
    /// Parent cgroup of the runs' cgroups (default: the agent's own).
    #[arg(long)]
    pub cgroup_parent: Option<PathBuf>,
    /// How long finished runs stay queryable (attach, list), e.g. 1h; kept in --state-dir, so
    /// also across agent restarts.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub keep_finished: Duration,
    /// How long restic gets to stop after SIGTERM before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub grace_period: Duration,
    /// Minimum interval between progress events of one run.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub progress_interval: Duration,
    /// A directory of this node that may hold `local:` repositories (repeat for several).
    /// Without it, local repositories are refused: a repository URL is written by whoever may
    /// create a ResticRepository, and would otherwise name any directory of the node.
    #[arg(long = "allow-local-repository-dir", value_name = "DIR")]
    pub local_repository_dirs: Vec<PathBuf>,
    /// Allow sftp: and rclone: repositories. restic then starts ssh or rclone, which read
    /// options from the repository's URL and Secret, inside a sandbox that holds the node's
    /// /usr, /lib and /etc (read-only). Only for clusters whose repository owners are trusted.
    #[arg(long)]
    pub allow_program_backends: bool,
    /// Address of the Prometheus metrics endpoint (/metrics).
    #[arg(long, env = "AGENT_METRICS_LISTEN", default_value = "0.0.0.0:9464")]
    pub metrics_listen: SocketAddr,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: String,
}

pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("K", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ]
    .iter()
    .find_map(|(suffix, m)| s.strip_suffix(suffix).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    num.trim()
        .parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("{s:?} is not a size such as 512Mi or 2Gi"))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 30s or 1h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn resolve_program(p: &std::path::Path) -> Result<PathBuf> {
    if p.components().count() > 1 {
        return p
            .canonicalize()
            .with_context(|| format!("restic binary {}", p.display()));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
        .with_context(|| format!("{} not found in PATH; set --restic", p.display()))
}

pub async fn run(args: Args) -> Result<()> {
    init_logging(&args.log_format);
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_client_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
            };
            Some(Arc::new(ReloadingTls::load(files).context("mutual TLS")?))
        }
        (None, None, None) if args.insecure_plaintext => {
            if !args.listen.ip().is_loopback() {
                bail!(
                    "--insecure-plaintext only binds loopback addresses; {} is not one",
                    args.listen
                );
            }
            tracing::warn!(listen = %args.listen, "serving WITHOUT TLS (local debugging only)");
            None
        }
        _ => bail!(
            "mutual TLS needs --tls-cert, --tls-key and --tls-client-ca (or --insecure-plaintext on loopback)"
        ),
    };

    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("state dir {}", args.state_dir.display()))?;
    crate::volumes::check_openat2(&args.state_dir)?;
    let _one_agent = lock_state_dir(&args.state_dir)?;
    // The restic processes of the agent before this one died with it.
    crate::locks::Holders::new(&args.state_dir).refresh();
    let cgroups = Cgroups::detect(args.cgroup_parent.as_deref());
    if let Cgroups::Unavailable(why) = &cgroups {
        tracing::warn!(reason = %why, "restic runs will have no memory limit");
    }
    let metrics = Arc::new(Metrics::new());
    let runs = Runs::new(
        args.max_concurrent_runs,
        args.keep_finished,
        args.state_dir.clone(),
        Arc::clone(&metrics),
    );
    let exec = Arc::new(Executor {
        restic: resolve_program(&args.restic)?,
        agent_exe: std::env::current_exe()?,
        cgroups,
        default_memory_limit: args.default_memory_limit,
        state_dir: args.state_dir.clone(),
        cache_dir: args.state_dir.join("cache"),
        grace: args.grace_period,
        progress_interval: args.progress_interval,
        repositories: RepositoryPolicy {
            local_dirs: args.local_repository_dirs.clone(),
            program_backends: args.allow_program_backends,
        },
        holders: crate::locks::Holders::new(&args.state_dir),
        live: Default::default(),
        clearing: tokio::sync::Mutex::new(()),
        parents: crate::parents::Parents::new(&args.state_dir),
        swept: Default::default(),
        caches_in_use: Default::default(),
    });
    let service = AgentService {
        runs: Arc::clone(&runs),
        exec,
        kubelet: KubeletRoot(args.kubelet_root.clone()),
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<AgentService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("metrics listen {}", args.metrics_listen))?;
    let m = Arc::clone(&metrics);
    let app = axum::Router::new().route("/metrics", axum::routing::get(move || async move { m.render() }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });

    let agent = AgentServer::new(service)
        .max_decoding_message_size(4 << 20)
        .max_encoding_message_size(restic_operator_proto::MAX_MESSAGE_SIZE);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen {}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        metrics = %args.metrics_listen,
        kubelet_root = %args.kubelet_root.display(),
        tls = tls.is_some(),
        version = env!("CARGO_PKG_VERSION"),
        "agent serving"
    );
    let grace = args.grace_period;
    // On SIGTERM: stop restic first (runs end with a Cancelled result that their callers still
    // receive), then let the server close; a caller that stopped reading cannot hold it open
    // for longer than a few seconds more.
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let stopping = {
        let runs = Arc::clone(&runs);
        let health = health.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down: stopping runs in flight");
            health.set_not_serving::<AgentServer<AgentService>>().await;
            runs.shutdown(grace + Duration::from_secs(5)).await;
            let _ = stopped_tx.send(());
        }
    };
    let router = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(agent);
    // Without TLS only for loopback debugging (checked above).
    let mut server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>>>> = match tls {
        Some(tls) => {
            tokio::spawn(Arc::clone(&tls).watch(args.tls_reload_interval));
            Box::pin(router.serve_with_incoming_shutdown(tls.incoming(listener), stopping))
        }
        None => Box::pin(router.serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stopping,
        )),
    };
    tokio::select! {
        result = &mut server => result?,
        _ = async {
            let _ = stopped_rx.await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        } => tracing::warn!("connections still open 3s after the runs stopped; exiting anyway"),
    }
    tracing::info!("agent stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// One agent per state directory: two would take each other's runs, and one's live restic
/// for the other's dead one. The lock lasts as long as the returned file is open.
fn lock_state_dir(dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let path = dir.join("agent.lock");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another agent uses the state directory {} ({e}); each agent needs one of its own",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_like_kubernetes_quantities() {
        assert_eq!(parse_bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2Gi").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert!(parse_bytes("lots").is_err());
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5 fortnights").is_err());
    }
}
