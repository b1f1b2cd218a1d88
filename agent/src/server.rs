//! The gRPC service. Each RPC attaches to a known run id, or validates the request, resolves
//! its volume on this node and starts the run; the response streams the run's events. Runs
//! outlive their streams: a caller that went away re-attaches with `Attach` or the same request.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use restic_operator_proto::v1::agent_server::Agent;
use restic_operator_proto::v1::{self as pb, RunKind};
use restic_operator_proto::{DEBUG_ORGANIZATION, OPERATOR_CLIENT_NAME};
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

/// Who calls: the operator (the coordinator's own certificate: common name
/// `restic-operator-coordinator`, not the debug organization), or anyone else with a
/// certificate of the operator CA, served as a person on call with a short-lived debug
/// certificate (`restic-agent debug --node`) is. Without TLS (loopback debugging only) there is
/// no caller to tell apart.
#[derive(Debug, PartialEq)]
enum Caller {
    Operator,
    Debug { name: String },
}

/// Prefix of every run id a debug caller may use: the coordinator never uses it, so a debug
/// caller cannot start a run under an id the coordinator will ask for and have it attach there.
pub const DEBUG_RUN_PREFIX: &str = "debug-";
/// The longest a debug caller's restic process may run.
const DEBUG_TIMEOUT_SECONDS: u32 = 600;

/// The caller of a request; a debug certificate past its expiry is refused on every call, not
/// only when its connection was made.
fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    let Some(certs) = request.peer_certs() else {
        return Ok(Caller::Operator);
    };
    let Some(leaf) = certs.first() else {
        return Ok(Caller::Debug {
            name: "(no certificate)".into(),
        });
    };
    classify(leaf.as_ref(), chrono::Utc::now().timestamp())
}

/// Only the coordinator's own certificate is the operator; a debug certificate must not have
/// expired; any other certificate (or one that cannot be read) gets the least: what a debug
/// certificate gets.
fn classify(der: &[u8], now: i64) -> Result<Caller, Status> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Ok(Caller::Debug {
            name: "(unreadable certificate)".into(),
        });
    };
    let subject = cert.subject();
    let debug = subject
        .iter_organization()
        .any(|o| o.as_str() == Ok(DEBUG_ORGANIZATION));
    let names: Vec<&str> = subject
        .iter_common_name()
        .filter_map(|c| c.as_str().ok())
        .collect();
    if !debug && subject.iter_organization().next().is_none() && names == [OPERATOR_CLIENT_NAME] {
        return Ok(Caller::Operator);
    }
    let name = names.first().copied().unwrap_or("(unnamed)").to_owned();
    if !debug {
        return Ok(Caller::Debug {
            name: format!("{name} (not the operator's certificate)"),
        });
    }
    if cert.validity().not_after.timestamp() <= now {
        return Err(Status::unauthenticated(format!(
            "the debug certificate of {name} has expired; run the debug command again for a new one"
        )));
    }
    Ok(Caller::Debug { name })
}

/// Refuses what a debug certificate may not do: anything that writes a snapshot, restores,
/// or changes or locks a repository.
fn coordinator_only<T>(request: &Request<T>, what: &str) -> Result<(), Status> {
    if let Caller::Debug { name } = caller(request)? {
        tracing::warn!(caller = %name, what, "refused a debug certificate");
        return Err(Status::permission_denied(format!(
            "a debug certificate may not {what}: it may list and follow runs, list volumes and \
             snapshots, cancel a run and make a dry-run backup"
        )));
    }
    Ok(())
}

/// What a debug caller's run may use: its own run ids, the agent's default memory limit, a
/// time limit, no cache and root's identity (so it neither holds the node's run slots for long
/// nor changes the cache the operator's runs use).
fn limit_debug_run(name: &str, options: &mut Option<pb::RunOptions>, what: &str) -> Result<(), Status> {
    let o = options.get_or_insert_with(Default::default);
    if !o.run_id.starts_with(DEBUG_RUN_PREFIX) {
        return Err(Status::permission_denied(format!(
            "a debug certificate's runs have ids starting with {DEBUG_RUN_PREFIX:?}, not {:?}",
            o.run_id
        )));
    }
    o.memory_limit_bytes = 0;
    o.run_as_user = None;
    o.run_as_group = None;
    o.timeout_seconds = match o.timeout_seconds {
        0 => DEBUG_TIMEOUT_SECONDS,
        t => t.min(DEBUG_TIMEOUT_SECONDS),
    };
    if let Some(r) = o.restic.as_mut() {
        r.use_cache = false;
    }
    tracing::info!(caller = %name, run_id = %o.run_id, what, "debug certificate run");
    Ok(())
}

/// Logs a debug caller's read-only call, so what on-call people did stays in the agent's log.
fn note_debug<T>(request: &Request<T>, what: &str) -> Result<(), Status> {
    if let Caller::Debug { name } = caller(request)? {
        tracing::info!(caller = %name, what, "debug certificate call");
    }
    Ok(())
}

fn run_id(options: Option<&pb::RunOptions>) -> Result<String, Status> {
    let options = options.ok_or_else(|| Status::invalid_argument("options (with run_id) are required"))?;
    let id = options.run_id.clone();
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

    /// Refuses a repository this node does not allow (a local directory it was not told
    /// about, a program backend), before a run starts.
    fn allowed(&self, url: &str) -> Result<(), Status> {
        crate::restic::check_repository_url(url, &self.exec.repositories)
            .map(drop)
            .map_err(Status::invalid_argument)
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
        let url = repo.map(|r| r.url).unwrap_or_default();
        let prepared = prepare(self.resolve(&volume).await?).map_err(Status::invalid_argument)?;
        self.allowed(&url)?;
        let exec = Arc::clone(&self.exec);
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
            self.allowed(&repo.url)?;
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
    type ProbeStream = EventStream;
    type AttachStream = EventStream;

    async fn backup(&self, request: Request<pb::BackupRequest>) -> Result<Response<EventStream>, Status> {
        if !request.get_ref().dry_run {
            coordinator_only(&request, "write a snapshot")?;
        }
        let debug = caller(&request)?;
        let mut req = request.into_inner();
        if let Caller::Debug { name } = &debug {
            limit_debug_run(name, &mut req.options, "dry-run backup")?;
        }
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
        let debug = caller(&request)?;
        let mut r = request.into_inner();
        if let Caller::Debug { name } = &debug {
            limit_debug_run(name, &mut r.options, "snapshots")?;
        }
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

    async fn probe(&self, request: Request<pb::RepositoryRequest>) -> Result<Response<EventStream>, Status> {
        coordinator_only(&request, "probe a repository")?;
        let r = request.into_inner();
        self.repository_op(r.options, r.repository, repository::Op::Probe)
    }

    async fn unlock(&self, request: Request<pb::RepositoryRequest>) -> Result<Response<EventStream>, Status> {
        coordinator_only(&request, "unlock a repository")?;
        let r = request.into_inner();
        self.repository_op(r.options, r.repository, repository::Op::Unlock)
    }

    async fn attach(&self, request: Request<pb::AttachRequest>) -> Result<Response<EventStream>, Status> {
        note_debug(&request, "attach")?;
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
        let who = match caller(&request)? {
            Caller::Operator => "the operator".to_owned(),
            Caller::Debug { name } => name,
        };
        let id = request.into_inner().run_id;
        let run = self
            .runs
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("no run {id} on this agent")))?;
        let cancelled = !run.is_finished();
        run.cancel.cancel();
        tracing::info!(run_id = %id, cancelled, by = %who, "cancel requested");
        Ok(Response::new(pb::CancelResponse { cancelled }))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        note_debug(&request, "list runs")?;
        Ok(Response::new(pb::ListRunsResponse {
            runs: self.runs.list(),
        }))
    }

    async fn resolve_volumes(
        &self,
        request: Request<pb::ResolveVolumesRequest>,
    ) -> Result<Response<pb::ResolveVolumesResponse>, Status> {
        note_debug(&request, "resolve volumes")?;
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

#[cfg(test)]
mod caller_tests {
    use super::*;

    fn cert(name: &str, organization: Option<&str>, expired: bool) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        if let Some(o) = organization {
            p.distinguished_name.push(rcgen::DnType::OrganizationName, o);
        }
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = if expired {
            rcgen::date_time_ymd(2021, 1, 1)
        } else {
            rcgen::date_time_ymd(2099, 1, 1)
        };
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn debug_certificates_are_told_apart_and_refused_once_expired() {
        let now = chrono::Utc::now().timestamp();
        let coordinator = OPERATOR_CLIENT_NAME;
        assert_eq!(
            classify(&cert(coordinator, None, false), now).unwrap(),
            Caller::Operator
        );
        // Only the coordinator's own name, and no organization, is the operator.
        for (name, o) in [
            ("someone", None),
            (coordinator, Some("something else")),
            (coordinator, Some(DEBUG_ORGANIZATION)),
        ] {
            assert!(
                matches!(classify(&cert(name, o, false), now), Ok(Caller::Debug { .. })),
                "{name} {o:?}"
            );
        }
        assert_eq!(
            classify(&cert("debug:alice", Some(DEBUG_ORGANIZATION), false), now).unwrap(),
            Caller::Debug {
                name: "debug:alice".into()
            }
        );
        let expired = classify(&cert("debug:alice", Some(DEBUG_ORGANIZATION), true), now).unwrap_err();
        assert_eq!(expired.code(), tonic::Code::Unauthenticated);
        assert!(matches!(classify(b"garbage", now), Ok(Caller::Debug { .. })));
    }

    #[test]
    fn a_debug_run_keeps_to_its_own_ids_and_limits() {
        let mut squat = Some(pb::RunOptions {
            run_id: "rb-0f5c-m1-g1".into(),
            ..Default::default()
        });
        let err = limit_debug_run("debug:alice", &mut squat, "snapshots").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let mut own = Some(pb::RunOptions {
            run_id: "debug-snapshots-1".into(),
            memory_limit_bytes: u64::MAX,
            run_as_user: Some(1000),
            timeout_seconds: 0,
            restic: Some(pb::ResticOptions {
                use_cache: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        limit_debug_run("debug:alice", &mut own, "snapshots").unwrap();
        let o = own.unwrap();
        assert_eq!(o.memory_limit_bytes, 0);
        assert_eq!(o.run_as_user, None);
        assert_eq!(o.timeout_seconds, DEBUG_TIMEOUT_SECONDS);
        assert!(!o.restic.unwrap().use_cache);
    }
}
