//! The gRPC service. Each RPC attaches to a known run id, or validates the request, resolves
//! its volume on this node and starts the run; the response streams the run's events. Runs
//! outlive their streams: a caller that went away re-attaches with `Attach` or the same request.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use restic_operator_proto::DEBUG_ORGANIZATION;
use restic_operator_proto::v1::agent_server::Agent;
use restic_operator_proto::v1::{self as pb, RunKind};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::exec::Executor;
use crate::ops::{backup, repository, restore};
use crate::runs::{Run, Runs, validate_run_id};
use crate::volumes::{self, KubeletRoot, VolumeError};

pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RunEvent, Status>> + Send>>;

fn volume_status(e: VolumeError) -> Status {
    let msg = e.to_string();
    match e {
        VolumeError::InvalidName { .. } | VolumeError::InvalidSubpath(..) => Status::invalid_argument(msg),
        VolumeError::PodNotFound(_) | VolumeError::VolumeNotFound { .. } => Status::not_found(msg),
        VolumeError::BlockVolume(_) => Status::failed_precondition(msg),
        VolumeError::Escapes { .. } => Status::permission_denied(msg),
        VolumeError::Io { .. } => Status::internal(msg),
    }
}

pub struct AgentService {
    pub runs: Arc<Runs>,
    pub exec: Arc<Executor>,
    /// Where pod volumes are: every volume, including a holder pod's claim, is read from the
    /// kubelet's pod directories.
    pub kubelet: KubeletRoot,
}

/// Whether the caller holds a debug certificate (a person on call, `restic-agent debug --node`)
/// rather than the coordinator's. Without TLS (loopback debugging only) there is no caller to
/// tell apart.
fn is_debug_client<T>(request: &Request<T>) -> bool {
    let Some(certs) = request.peer_certs() else {
        return false;
    };
    certs.first().is_none_or(|der| is_debug_certificate(der.as_ref()))
}

/// A certificate with the organization the coordinator puts in debug certificates. One that
/// cannot be read counts as a debug certificate: the least it may do is the safe answer.
pub fn is_debug_certificate(der: &[u8]) -> bool {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => cert
            .subject()
            .iter_organization()
            .any(|o| o.as_str() == Ok(DEBUG_ORGANIZATION)),
        Err(_) => true,
    }
}

/// Refuses what a debug certificate may not do: anything that writes a snapshot, restores,
/// or changes or locks a repository.
fn coordinator_only<T>(request: &Request<T>, what: &str) -> Result<(), Status> {
    if is_debug_client(request) {
        return Err(Status::permission_denied(format!(
            "a debug certificate may not {what}: it may list and follow runs, list volumes and \
             snapshots, cancel a run and make a dry-run backup"
        )));
    }
    Ok(())
}

fn run_id(options: Option<&pb::RunOptions>) -> Result<String, Status> {
    let id = options.map(|o| o.run_id.clone()).unwrap_or_default();
    validate_run_id(&id).map_err(Status::invalid_argument)?;
    Ok(id)
}

/// The response for a run: its events, and whether the call attached to an existing run.
fn respond(run: Arc<Run>, attached: bool) -> Response<EventStream> {
    let stream: EventStream = Box::pin(run.subscribe().map(Ok));
    let mut resp = Response::new(stream);
    resp.metadata_mut().insert(
        "x-run-attached",
        if attached { "true" } else { "false" }.parse().unwrap(),
    );
    resp
}

impl AgentService {
    /// Finds the volume's directory, off the async runtime: a volume on a hung network file
    /// system must stall this request, not the agent's health checks or Cancel.
    async fn resolve(&self, v: &pb::VolumeRef) -> Result<PathBuf, Status> {
        let (kubelet, v) = (self.kubelet.clone(), v.clone());
        volumes::blocking("the pod's volume directory", move || {
            let pv = (!v.pv_name.is_empty()).then_some(v.pv_name.as_str());
            kubelet
                .resolve(&v.pod_uid, &v.volume_name, pv)
                .map(|r| r.host_path)
        })
        .await
        .map_err(volume_status)
    }

    /// Attaches if the run exists; otherwise `start` validates and starts it.
    fn attach_or<F>(&self, id: &str, start: F) -> Result<Response<EventStream>, Status>
    where
        F: FnOnce() -> Result<(Arc<Run>, bool), Status>,
    {
        if let Some(run) = self.runs.get(id) {
            return Ok(respond(run, true));
        }
        let (run, attached) = start()?;
        Ok(respond(run, attached))
    }

    /// A run on one volume: attach, or resolve the volume on this node, validate, and start.
    async fn volume_op<P, Fut>(
        &self,
        options: Option<pb::RunOptions>,
        volume: Option<pb::VolumeRef>,
        repo: Option<pb::Repository>,
        kind: RunKind,
        prepare: impl FnOnce(PathBuf) -> Result<P, String>,
        run: fn(Arc<Executor>, Arc<Run>, P) -> Fut,
    ) -> Result<Response<EventStream>, Status>
    where
        P: Send + 'static,
        Fut: std::future::Future<Output = pb::Result> + Send + 'static,
    {
        let id = run_id(options.as_ref())?;
        if let Some(run) = self.runs.get(&id) {
            return Ok(respond(run, true));
        }
        let volume = volume.ok_or_else(|| Status::invalid_argument("volume is required"))?;
        let prepared = prepare(self.resolve(&volume).await?).map_err(Status::invalid_argument)?;
        let exec = Arc::clone(&self.exec);
        let url = repo.map(|r| r.url).unwrap_or_default();
        let (run, attached) = self
            .runs
            .start_or_attach(&id, kind, &url, Some(volume), move |r| run(exec, r, prepared));
        Ok(respond(run, attached))
    }

    fn repository_op(
        &self,
        options: Option<pb::RunOptions>,
        repo: Option<pb::Repository>,
        op: repository::Op,
    ) -> Result<Response<EventStream>, Status> {
        let id = run_id(options.as_ref())?;
        self.attach_or(&id, || {
            repository::prepare(options.as_ref(), repo.as_ref(), &op).map_err(Status::invalid_argument)?;
            let (options, repo) = (options.unwrap_or_default(), repo.unwrap_or_default());
            let exec = Arc::clone(&self.exec);
            let url = repo.url.clone();
            Ok(self.runs.start_or_attach(&id, op.kind(), &url, None, move |run| {
                repository::run(exec, run, options, repo, op)
            }))
        })
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    type BackupStream = EventStream;
    type RestoreStream = EventStream;
    type InitStream = EventStream;
    type SnapshotsStream = EventStream;
    type ForgetStream = EventStream;
    type PruneStream = EventStream;
    type CheckStream = EventStream;
    type StatsStream = EventStream;
    type UnlockStream = EventStream;
    type AttachStream = EventStream;

    async fn backup(&self, request: Request<pb::BackupRequest>) -> Result<Response<EventStream>, Status> {
        if !request.get_ref().dry_run {
            coordinator_only(&request, "write a snapshot")?;
        }
        let req = request.into_inner();
        let (options, volume, repo) = (req.options.clone(), req.volume.clone(), req.repository.clone());
        self.volume_op(
            options,
            volume,
            repo,
            RunKind::Backup,
            |path| backup::prepare(req, path),
            backup::run,
        )
        .await
    }

    async fn restore(&self, request: Request<pb::RestoreRequest>) -> Result<Response<EventStream>, Status> {
        coordinator_only(&request, "restore")?;
        let req = request.into_inner();
        let (options, volume, repo) = (req.options.clone(), req.volume.clone(), req.repository.clone());
        self.volume_op(
            options,
            volume,
            repo,
            RunKind::Restore,
            |path| restore::prepare(req, path),
            restore::run,
        )
        .await
    }

    async fn init(&self, request: Request<pb::RepositoryRequest>) -> Result<Response<EventStream>, Status> {
        coordinator_only(&request, "initialize a repository")?;
        let r = request.into_inner();
        self.repository_op(r.options, r.repository, repository::Op::Init)
    }

    async fn snapshots(
        &self,
        request: Request<pb::SnapshotsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let r = request.into_inner();
        let op = repository::Op::Snapshots {
            host: r.host,
            tags: r.tags,
            paths: r.paths,
        };
        self.repository_op(r.options, r.repository, op)
    }

    async fn forget(&self, request: Request<pb::ForgetRequest>) -> Result<Response<EventStream>, Status> {
        coordinator_only(&request, "forget snapshots")?;
        let r = request.into_inner();
        let (options, repo) = (r.options.clone(), r.repository.clone());
        self.repository_op(options, repo, repository::Op::Forget(Box::new(r)))
    }

    async fn prune(&self, request: Request<pb::RepositoryRequest>) -> Result<Response<EventStream>, Status> {
        coordinator_only(&request, "prune a repository")?;
        let r = request.into_inner();
        self.repository_op(r.options, r.repository, repository::Op::Prune)
    }

    async fn check(&self, request: Request<pb::CheckRequest>) -> Result<Response<EventStream>, Status> {
        coordinator_only(&request, "check a repository (it locks it)")?;
        let r = request.into_inner();
        let op = repository::Op::Check {
            read_data_subset: r.read_data_subset,
        };
        self.repository_op(r.options, r.repository, op)
    }

    async fn stats(&self, request: Request<pb::RepositoryRequest>) -> Result<Response<EventStream>, Status> {
        coordinator_only(&request, "read repository statistics")?;
        let r = request.into_inner();
        self.repository_op(r.options, r.repository, repository::Op::Stats)
    }

    async fn unlock(&self, request: Request<pb::RepositoryRequest>) -> Result<Response<EventStream>, Status> {
        coordinator_only(&request, "unlock a repository")?;
        let r = request.into_inner();
        self.repository_op(r.options, r.repository, repository::Op::Unlock)
    }

    async fn attach(&self, request: Request<pb::AttachRequest>) -> Result<Response<EventStream>, Status> {
        let id = request.into_inner().run_id;
        validate_run_id(&id).map_err(Status::invalid_argument)?;
        match self.runs.get(&id) {
            Some(run) => Ok(respond(run, true)),
            None => Err(Status::not_found(format!(
                "no run {id} on this agent (never started here, or finished longer ago than the retention time)"
            ))),
        }
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let id = request.into_inner().run_id;
        let run = self
            .runs
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("no run {id} on this agent")))?;
        let cancelled = !run.is_finished();
        run.cancel.cancel();
        tracing::info!(run_id = %id, cancelled, "cancel requested");
        Ok(Response::new(pb::CancelResponse { cancelled }))
    }

    async fn list_runs(
        &self,
        _: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        Ok(Response::new(pb::ListRunsResponse {
            runs: self.runs.list(),
        }))
    }

    async fn resolve_volumes(
        &self,
        request: Request<pb::ResolveVolumesRequest>,
    ) -> Result<Response<pb::ResolveVolumesResponse>, Status> {
        let uid = request.into_inner().pod_uid;
        let root = self.kubelet.clone();
        let volumes = volumes::blocking("the pod's volume directories", move || {
            let listed = root.list(&uid)?.into_iter().map(|v| {
                // Report what a backup of it would hit, without failing the listing.
                let problem = match root.resolve(&uid, &v.name, None) {
                    Ok(_) => String::new(),
                    Err(e) => e.to_string(),
                };
                pb::ResolvedVolume {
                    name: v.name,
                    plugin: v.plugin,
                    host_path: v.host_path.display().to_string(),
                    problem,
                }
            });
            Ok(listed.collect())
        })
        .await
        .map_err(volume_status)?;
        Ok(Response::new(pb::ResolveVolumesResponse { volumes }))
    }
}
