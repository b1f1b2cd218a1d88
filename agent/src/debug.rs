//! The debug CLI for the person on call: the same gRPC API and mutual-TLS material as the
//! coordinator, against one agent.
//!
//! ```text
//! restic-agent debug --node worker-1 runs            # from a kubeconfig alone (see oncall.rs)
//! restic-agent debug --addr https://10.0.0.5:9443 --ca ca.crt --cert client.crt --key client.key runs
//! restic-agent debug ... attach backup-media-emby-20240115t020000z     # live progress bar
//! restic-agent debug ... volumes 0f5c1d1e-...                          # a pod's volumes here
//! restic-agent debug ... snapshots --repo s3:... --password-file pw --env-file creds.env
//! restic-agent debug ... backup --pod-uid ... --volume data --host emby --repo ... --password-file pw
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use restic_operator_proto::v1::agent_client::AgentClient;
use restic_operator_proto::v1::{self as pb, Outcome, RunKind, RunState, run_event::Event};
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[derive(clap::Args)]
pub struct Args {
    /// Reach the agent of this node through the API server with your kubeconfig: it finds the
    /// agent pod, asks the coordinator for a short-lived debug certificate (allowed if you may
    /// port-forward to the agent pods; recorded in an event) and port-forwards to it. A debug
    /// certificate may list and follow runs, volumes and snapshots, cancel a run and make a
    /// dry-run backup, nothing else.
    #[arg(long, conflicts_with_all = ["addr", "ca", "cert", "key"])]
    node: Option<String>,
    /// The kubeconfig for --node (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The operator's namespace, where the agent pods run (for --node).
    #[arg(long, env = "RESTIC_OPERATOR_NAMESPACE", default_value = "restic-operator")]
    namespace: String,
    /// Label selector of the agent pods (for --node).
    #[arg(
        long,
        default_value = "app.kubernetes.io/name=restic-operator,app.kubernetes.io/component=agent"
    )]
    agent_selector: String,
    /// Validity of the debug certificate (for --node): 10m to 1h.
    #[arg(long, default_value = "15m", value_parser = crate::serve::parse_duration)]
    certificate_ttl: Duration,
    /// The agent's address (https://host:port; http:// only for an --insecure-plaintext agent).
    #[arg(long, env = "AGENT_ADDR", default_value = "https://127.0.0.1:9443")]
    addr: String,
    /// CA that signed the agent's serving certificate.
    #[arg(long, env = "AGENT_CA")]
    ca: Option<PathBuf>,
    /// Client certificate signed by the CA the agent trusts.
    #[arg(long, env = "AGENT_CLIENT_CERT")]
    cert: Option<PathBuf>,
    /// Key of the client certificate.
    #[arg(long, env = "AGENT_CLIENT_KEY")]
    key: Option<PathBuf>,
    /// The name in the agent's serving certificate.
    #[arg(long, default_value = "restic-agent")]
    server_name: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Is the agent serving? (grpc.health.v1)
    Health,
    /// Runs in flight, queued and recently finished.
    Runs,
    /// Follow a run with a progress bar until it finishes.
    Attach { run_id: String },
    /// Stop a run.
    Cancel { run_id: String },
    /// The volumes of a pod on this agent's node.
    Volumes { pod_uid: String },
    /// Snapshots of a repository.
    Snapshots {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        host: Option<String>,
    },
    /// Back up a pod volume (a dry run unless --for-real).
    Backup {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        pod_uid: String,
        #[arg(long)]
        volume: String,
        /// PersistentVolume name, for a volume from a claim.
        #[arg(long)]
        pv: Option<String>,
        #[arg(long)]
        host: String,
        #[arg(long)]
        tag: Vec<String>,
        #[arg(long, default_value = "/data")]
        snapshot_path: String,
        /// Really write a snapshot.
        #[arg(long)]
        for_real: bool,
    },
}

#[derive(clap::Args)]
struct RepoArgs {
    /// Repository URL.
    #[arg(long)]
    repo: String,
    /// File holding the repository password.
    #[arg(long)]
    password_file: PathBuf,
    /// File of KEY=VALUE lines with backend credentials (AWS_ACCESS_KEY_ID=...).
    #[arg(long)]
    env_file: Option<PathBuf>,
}

impl RepoArgs {
    fn repository(&self) -> Result<pb::Repository> {
        let password = std::fs::read_to_string(&self.password_file)
            .with_context(|| format!("read password file {}", self.password_file.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_string();
        let mut env = std::collections::HashMap::new();
        if let Some(f) = &self.env_file {
            for line in std::fs::read_to_string(f)
                .with_context(|| format!("read {}", f.display()))?
                .lines()
            {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (k, v) = line
                    .split_once('=')
                    .with_context(|| format!("{}: {line:?} is not KEY=VALUE", f.display()))?;
                env.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        Ok(pb::Repository {
            url: self.repo.clone(),
            password,
            env,
        })
    }
}

async fn connect(args: &Args) -> Result<Channel> {
    if let Some(node) = &args.node {
        let reached = crate::oncall::reach(&crate::oncall::Target {
            node,
            namespace: &args.namespace,
            selector: &args.agent_selector,
            kubeconfig: args.kubeconfig.as_ref(),
            ttl: args.certificate_ttl,
        })
        .await?;
        eprintln!("agent {} on node {node}, through the API server", reached.pod);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&reached.ca))
            .identity(Identity::from_pem(&reached.cert, &reached.key))
            .domain_name(args.server_name.clone());
        return Channel::from_shared(reached.addr.clone())?
            .connect_timeout(Duration::from_secs(10))
            .tls_config(tls)?
            .connect()
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot reach the agent on node {node} through the API server: {e:?}")
            });
    }
    let mut endpoint = Channel::from_shared(args.addr.clone())
        .with_context(|| format!("bad address {}", args.addr))?
        .connect_timeout(Duration::from_secs(5));
    if args.addr.starts_with("https://") {
        let read = |what: &str, p: &Option<PathBuf>| -> Result<Vec<u8>> {
            let p = p.as_ref().with_context(|| {
                format!("--{what} is required: the agent only serves clients with a certificate from the operator's CA")
            })?;
            std::fs::read(p).with_context(|| format!("cannot read --{what} {}", p.display()))
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca", &args.ca)?))
            .identity(Identity::from_pem(
                read("cert", &args.cert)?,
                read("key", &args.key)?,
            ))
            .domain_name(args.server_name.clone());
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint.connect().await.map_err(|e| {
        let mut msg = format!("cannot connect to {}: {e}", args.addr);
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        anyhow::anyhow!(
            "{msg}\n(is the agent running, and were the certificates issued by the CA it trusts?)"
        )
    })
}

pub async fn run(args: Args) -> Result<()> {
    let channel = connect(&args).await?;
    let mut client =
        AgentClient::new(channel.clone()).max_decoding_message_size(restic_operator_proto::MAX_MESSAGE_SIZE);
    match &args.command {
        Cmd::Health => {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let resp = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(status_err)?;
            let status =
                tonic_health::pb::health_check_response::ServingStatus::try_from(resp.into_inner().status)
                    .map(|s| s.as_str_name())
                    .unwrap_or("UNKNOWN");
            println!("{status}");
            if status != "SERVING" {
                bail!("agent is not serving");
            }
        }
        Cmd::Runs => {
            let runs = client
                .list_runs(pb::ListRunsRequest {})
                .await
                .map_err(status_err)?
                .into_inner()
                .runs;
            // Run ids are as long as their resource's name: the column is as wide as the longest.
            let width = runs.iter().map(|r| r.run_id.len()).max().unwrap_or(0).max(3);
            println!(
                "{:<width$} {:<10} {:<9} {:>7} {:<16} REASON",
                "RUN", "KIND", "STATE", "DONE", "OUTCOME"
            );
            for r in runs {
                let kind = name(RunKind::try_from(r.kind).map(|k| k.as_str_name()), "RUN_KIND_");
                let state = name(RunState::try_from(r.state).map(|s| s.as_str_name()), "RUN_STATE_");
                let done = r
                    .progress
                    .as_ref()
                    .map(|p| format!("{:.0}%", p.percent_done))
                    .unwrap_or_default();
                let (outcome, reason) = r
                    .result
                    .as_ref()
                    .map(|x| {
                        (
                            name(Outcome::try_from(x.outcome).map(|o| o.as_str_name()), "OUTCOME_"),
                            x.reason.clone(),
                        )
                    })
                    .unwrap_or_default();
                println!(
                    "{:<width$} {:<10} {:<9} {:>7} {:<16} {}",
                    r.run_id, kind, state, done, outcome, reason
                );
            }
        }
        Cmd::Attach { run_id } => {
            let stream = client
                .attach(pb::AttachRequest {
                    run_id: run_id.clone(),
                })
                .await
                .map_err(status_err)?;
            follow(stream.into_inner()).await?;
        }
        Cmd::Cancel { run_id } => {
            let resp = client
                .cancel(pb::CancelRequest {
                    run_id: run_id.clone(),
                })
                .await
                .map_err(status_err)?;
            println!(
                "{}",
                if resp.into_inner().cancelled {
                    "cancelled"
                } else {
                    "already finished"
                }
            );
        }
        Cmd::Volumes { pod_uid } => {
            let req = pb::ResolveVolumesRequest {
                pod_uid: pod_uid.clone(),
            };
            let vols = client
                .resolve_volumes(req)
                .await
                .map_err(status_err)?
                .into_inner()
                .volumes;
            println!("{:<24} {:<28} {:<60} PROBLEM", "VOLUME", "PLUGIN", "HOST PATH");
            for v in vols {
                println!(
                    "{:<24} {:<28} {:<60} {}",
                    v.name, v.plugin, v.host_path, v.problem
                );
            }
        }
        Cmd::Snapshots { repo, host } => {
            let req = pb::SnapshotsRequest {
                options: Some(debug_options("snapshots")),
                repository: Some(repo.repository()?),
                host: host.clone().unwrap_or_default(),
                ..Default::default()
            };
            let result = follow(client.snapshots(req).await.map_err(status_err)?.into_inner()).await?;
            println!(
                "{:<10} {:<26} {:<16} {:<24} PATHS",
                "ID", "TIME (UTC)", "HOST", "TAGS"
            );
            for s in result.snapshots {
                let time = chrono::DateTime::from_timestamp_millis(s.time_unix_ms)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default();
                println!(
                    "{:<10} {:<26} {:<16} {:<24} {}",
                    s.short_id,
                    time,
                    s.hostname,
                    s.tags.join(","),
                    s.paths.join(",")
                );
            }
        }
        Cmd::Backup {
            repo,
            pod_uid,
            volume,
            pv,
            host,
            tag,
            snapshot_path,
            for_real,
        } => {
            let req = pb::BackupRequest {
                options: Some(debug_options("backup")),
                repository: Some(repo.repository()?),
                volume: Some(pb::VolumeRef {
                    pod_uid: pod_uid.clone(),
                    volume_name: volume.clone(),
                    pv_name: pv.clone().unwrap_or_default(),
                }),
                snapshot_path: snapshot_path.clone(),
                host: host.clone(),
                tags: tag.clone(),
                dry_run: !for_real,
                ..Default::default()
            };
            follow(client.backup(req).await.map_err(status_err)?.into_inner()).await?;
        }
    }
    Ok(())
}

fn debug_options(what: &str) -> pb::RunOptions {
    pb::RunOptions {
        run_id: format!("debug-{what}-{}", crate::runs::now_ms()),
        ..Default::default()
    }
}

fn name(n: Result<&str, prost::UnknownEnumValue>, prefix: &str) -> String {
    n.map(|n| n.trim_start_matches(prefix).to_ascii_lowercase())
        .unwrap_or_else(|_| "?".into())
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("agent said {:?}: {}", s.code(), s.message())
}

/// The words beside the bar: the stage, the files, and the time left only where restic can
/// estimate it (at 100 % the upload of the last packs may still take a while).
fn progress_message(p: &pb::Progress) -> String {
    let files = format!("{}/{} files", p.files_done, p.total_files);
    let current = p.current_files.first().cloned().unwrap_or_default();
    match p.stage.as_str() {
        "uploading" => format!("{files}, all read: uploading the last packs, saving the snapshot"),
        "scanning" => format!("scanning, {files} so far {current}"),
        "reading" | "restoring" if p.seconds_remaining > 0 => {
            format!("{}, {files}, {}s left {current}", p.stage, p.seconds_remaining)
        }
        "" => format!("{files} {current}"),
        stage => format!("{stage}, {files} {current}"),
    }
}

/// Shows a run's events with a progress bar; returns its result, failing unless it succeeded.
async fn follow(mut stream: tonic::Streaming<pb::RunEvent>) -> Result<pb::Result> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(status_err)?;
        match ev.event {
            Some(Event::Queued(q)) => bar.set_message(format!("queued (position {})", q.position)),
            Some(Event::Started(s)) => bar.println(format!("started: {}", s.command.join(" "))),
            Some(Event::Progress(p)) => {
                bar.set_length(p.total_bytes);
                bar.set_position(p.bytes_done);
                bar.set_message(progress_message(&p));
            }
            Some(Event::Warning(w)) => bar.println(format!("warning: {} {}", w.path, w.message)),
            Some(Event::Log(l)) => bar.println(l.line),
            Some(Event::Retrying(r)) => bar.println(format!(
                "the repository does not answer; restic retries: {}",
                r.message
            )),
            Some(Event::Result(r)) => {
                bar.finish_and_clear();
                let outcome = name(Outcome::try_from(r.outcome).map(|o| o.as_str_name()), "OUTCOME_");
                println!("{outcome} in {:.1}s {}", r.duration_ms as f64 / 1000.0, r.reason);
                if !r.snapshot_id.is_empty() {
                    println!("snapshot {}", r.snapshot_id);
                }
                if let Some(b) = &r.backup {
                    println!(
                        "files: {} new, {} changed, {} unmodified; {} bytes added, {} processed",
                        b.files_new,
                        b.files_changed,
                        b.files_unmodified,
                        b.data_added,
                        b.total_bytes_processed
                    );
                }
                for p in &r.failed_paths {
                    println!("could not read: {p}");
                }
                if r.outcome != Outcome::Succeeded as i32 {
                    bail!("run {}: {outcome}", ev.run_id);
                }
                return Ok(r);
            }
            None => {}
        }
    }
    bail!("the stream ended without a result (agent gone?); re-attach with `attach <run-id>`")
}
