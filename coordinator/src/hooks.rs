//! Backup hooks: a command in a running pod (pods/exec through the API server) or a Job
//! from a pod template, waited for with the hook's timeout. The result carries the end of the
//! output, so a failed hook's reason shows what it printed last. The pod is the user's: what
//! it prints is read with a bounded buffer, however much it prints.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::api::{AttachParams, AttachedProcess, ListParams, LogParams, ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};
use restic_operator_api::common::{Hook, label_selector_matches, parse_duration};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::holder::fnv;
use crate::owner::Owner;
use crate::run::truncate;

/// Which hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    PreBackup,
    PostBackup,
    OnFailure,
    PreRestore,
    PostRestore,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::PreBackup => "preBackup",
            Phase::PostBackup => "postBackup",
            Phase::OnFailure => "onFailure",
            Phase::PreRestore => "preRestore",
            Phase::PostRestore => "postRestore",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Phase::PreBackup => "pre",
            Phase::PostBackup => "post",
            Phase::OnFailure => "onfailure",
            Phase::PreRestore => "prerestore",
            Phase::PostRestore => "postrestore",
        }
    }
}

impl std::fmt::Display for Phase {
    /// The spec's name of the hook (`preBackup`, ...).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a hook failed. Every message starts with `<phase> hook failed: `; `output` is the end
/// of what the hook printed (its last 1000 bytes: the exec streams' end, or the Job pod's
/// log tail).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The exec hook's command did not finish within its `timeout` (as the spec spells it).
    #[error("{phase} hook failed: exec did not finish within {timeout}")]
    ExecTimeout { phase: Phase, timeout: String },
    #[error("{phase} hook failed: listing pods: {source}")]
    ListPods { phase: Phase, source: kube::Error },
    #[error("{phase} hook failed: no running pod in {namespace} matches the hook's podSelector")]
    NoPod { phase: Phase, namespace: String },
    #[error("{phase} hook failed: exec in pod {pod} container {container}: {source}")]
    Exec {
        phase: Phase,
        pod: String,
        container: String,
        source: kube::Error,
    },
    /// The command ended with a status other than `Success`; `message` is the status message.
    #[error("{phase} hook failed: command in pod {pod} container {container} failed ({message}): {output}")]
    CommandFailed {
        phase: Phase,
        pod: String,
        container: String,
        message: String,
        output: String,
    },
    #[error(
        "{phase} hook failed: command in pod {pod} container {container} ended without a status: \
         {output}"
    )]
    NoStatus {
        phase: Phase,
        pod: String,
        container: String,
        output: String,
    },
    #[error("{phase} hook failed: creating Job {job}: {source}")]
    CreateJob {
        phase: Phase,
        job: String,
        source: kube::Error,
    },
    #[error("{phase} hook failed: reading Job {job}: {source}")]
    ReadJob {
        phase: Phase,
        job: String,
        source: kube::Error,
    },
    #[error("{phase} hook failed: Job {job} was deleted")]
    JobDeleted { phase: Phase, job: String },
    /// `why` is the Job's `Failed` condition message (or reason).
    #[error("{phase} hook failed: Job {job} failed ({why}): {output}")]
    JobFailed {
        phase: Phase,
        job: String,
        why: String,
        output: String,
    },
    #[error("{phase} hook failed: Job {job} did not finish within {secs}s")]
    JobTimeout { phase: Phase, job: String, secs: u64 },
}

impl HookError {
    /// Which hook failed.
    pub fn phase(&self) -> Phase {
        match self {
            HookError::ExecTimeout { phase, .. }
            | HookError::ListPods { phase, .. }
            | HookError::NoPod { phase, .. }
            | HookError::Exec { phase, .. }
            | HookError::CommandFailed { phase, .. }
            | HookError::NoStatus { phase, .. }
            | HookError::CreateJob { phase, .. }
            | HookError::ReadJob { phase, .. }
            | HookError::JobDeleted { phase, .. }
            | HookError::JobFailed { phase, .. }
            | HookError::JobTimeout { phase, .. } => *phase,
        }
    }

    /// The end of what the hook printed, when it ran to an end.
    pub fn output(&self) -> Option<&str> {
        match self {
            HookError::CommandFailed { output, .. }
            | HookError::NoStatus { output, .. }
            | HookError::JobFailed { output, .. } => Some(output.as_str()),
            _ => None,
        }
    }
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes of output in a hook's result (it ends up in status messages and events).
const OUTPUT_LIMIT: usize = 1000;
/// Bytes kept of each output stream of an exec hook: its end.
const STREAM_TAIL: usize = 64 << 10;

/// Runs `hook`; `Ok(output)` or `Err(reason with output)`.
pub async fn run(
    client: &Client,
    owner: &Owner,
    phase: Phase,
    hook: &Hook,
    run_id: &str,
) -> Result<String, HookError> {
    if let Some(exec) = &hook.exec {
        let timeout = parse_duration(&exec.timeout).unwrap_or(DEFAULT_TIMEOUT);
        match tokio::time::timeout(timeout, run_exec(client, &owner.namespace, phase, exec)).await {
            Ok(r) => r,
            Err(_) => Err(HookError::ExecTimeout {
                phase,
                timeout: exec.timeout.clone(),
            }),
        }
    } else if let Some(job) = &hook.job {
        let timeout = parse_duration(&job.timeout).unwrap_or(DEFAULT_TIMEOUT);
        run_job(client, owner, phase, &job.pod_template, timeout, run_id).await
    } else {
        Ok(String::new())
    }
}

/// Runs an exec hook's command in the chosen pod and container; its output on `Success`.
async fn run_exec(
    client: &Client,
    ns: &str,
    phase: Phase,
    exec: &restic_operator_api::common::ExecHook,
) -> Result<String, HookError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let (pod_name, container) = exec_target(&api, ns, phase, exec).await?;
    let params = AttachParams::default()
        .container(container.clone())
        .stdin(false)
        .stdout(true)
        .stderr(true);
    let mut process = api
        .exec(&pod_name, exec.command.clone(), &params)
        .await
        .map_err(|source| HookError::Exec {
            phase,
            pod: pod_name.clone(),
            container: container.clone(),
            source,
        })?;
    let (output, status) = exec_output(&mut process).await;
    exec_result(phase, pod_name, container, output, status)
}

/// The pod (chosen by the podSelector) and container (else the pod's first) to exec in.
async fn exec_target(
    api: &Api<Pod>,
    ns: &str,
    phase: Phase,
    exec: &restic_operator_api::common::ExecHook,
) -> Result<(String, String), HookError> {
    let pods = api
        .list(&ListParams::default())
        .await
        .map_err(|source| HookError::ListPods { phase, source })?
        .items;
    let (pod, _) = crate::sources::choose(&pods, |p| {
        label_selector_matches(&exec.pod_selector, &p.metadata.labels.clone().unwrap_or_default())
            .then(String::new)
    })
    .ok_or_else(|| HookError::NoPod {
        phase,
        namespace: ns.to_owned(),
    })?;
    let pod_name = pod.name_any();
    let container = exec
        .container
        .clone()
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .map(|c| c.name.clone())
        })
        .unwrap_or_default();
    Ok((pod_name, container))
}

/// Reads the end of the command's stdout and stderr, then waits for its final status.
async fn exec_output(process: &mut AttachedProcess) -> (String, Option<Status>) {
    let stdout = process.stdout();
    let stderr = process.stderr();
    let status = process.take_status();
    let (out, err) = tokio::join!(read_tail_of(stdout), read_tail_of(stderr));
    let status = match status {
        Some(s) => s.await,
        None => None,
    };
    let output = ending(format!("{out}{err}").trim(), OUTPUT_LIMIT);
    (output, status)
}

/// The exec hook's result from the command's final status (pure).
fn exec_result(
    phase: Phase,
    pod_name: String,
    container: String,
    output: String,
    status: Option<Status>,
) -> Result<String, HookError> {
    match status {
        Some(s) if s.status.as_deref() == Some("Success") => Ok(output),
        Some(s) => Err(HookError::CommandFailed {
            phase,
            pod: pod_name,
            container,
            message: s.message.unwrap_or_default(),
            output,
        }),
        None => Err(HookError::NoStatus {
            phase,
            pod: pod_name,
            container,
            output,
        }),
    }
}

async fn read_tail_of(stream: Option<impl AsyncRead + Unpin>) -> String {
    match stream {
        Some(mut s) => read_tail(&mut s, STREAM_TAIL).await.into_string(),
        None => String::new(),
    }
}

/// The end of a stream: its last bytes and how many came before them.
#[derive(Debug)]
struct Tail {
    kept: VecDeque<u8>,
    cut: u64,
}

impl Tail {
    /// The kept bytes as text, after a note saying how much was cut from the start.
    fn into_string(self) -> String {
        let (a, b) = self.kept.as_slices();
        let bytes = [a, b].concat();
        if self.cut == 0 {
            return String::from_utf8_lossy(&bytes).into_owned();
        }
        // Do not start in the middle of a UTF-8 character.
        let start = bytes.iter().take(3).take_while(|b| (**b & 0xC0) == 0x80).count();
        format!(
            "[first {} bytes cut] {}",
            self.cut + start as u64,
            String::from_utf8_lossy(&bytes[start..])
        )
    }
}

/// Reads `reader` to its end (or its first error), keeping only the last `limit` bytes: memory
/// stays at `limit` plus one read buffer however long the stream is.
async fn read_tail<R: AsyncRead + Unpin>(reader: &mut R, limit: usize) -> Tail {
    let mut tail = Tail {
        kept: VecDeque::with_capacity(limit),
        cut: 0,
    };
    let mut buf = vec![0u8; 8 << 10];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return tail,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        // Only the end of a chunk longer than the limit can be kept.
        let skip = n.saturating_sub(limit);
        tail.cut += skip as u64;
        let chunk = &chunk[skip..];
        let overflow = (tail.kept.len() + chunk.len()).saturating_sub(limit);
        tail.kept.drain(..overflow);
        tail.cut += overflow as u64;
        tail.kept.extend(chunk);
    }
}

/// The end of `s` in at most `max` bytes, with `…` where the start was cut.
fn ending(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

/// Name of the Job of a hook run: stable per run, so a restarted coordinator finds it.
pub fn job_name(owner: &str, phase: Phase, run_id: &str) -> String {
    let prefix: String = owner.chars().take(40).collect();
    format!(
        "{}-{}-{:08x}",
        prefix.trim_end_matches('-'),
        phase.short(),
        fnv(run_id)
    )
}

/// The Job of a hook (pure).
pub fn job(
    owner: &Owner,
    phase: Phase,
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
    timeout: Duration,
    run_id: &str,
) -> Job {
    let mut template = template.clone();
    if let Some(spec) = template.spec.as_mut()
        && spec.restart_policy.is_none()
    {
        spec.restart_policy = Some("Never".into());
    }
    let mut labels = owner.labels();
    labels.insert(
        "backup.resticbackup.io/hook".to_owned(),
        phase.as_str().to_owned(),
    );
    let meta = template.metadata.get_or_insert_with(Default::default);
    meta.labels
        .get_or_insert_with(Default::default)
        .extend(labels.clone());
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(&owner.name, phase, run_id)),
            namespace: Some(owner.namespace.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                "backup.resticbackup.io/run-id".to_owned(),
                run_id.to_owned(),
            )])),
            owner_references: owner.owner_ref.clone().map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            template,
            backoff_limit: Some(0),
            active_deadline_seconds: Some(timeout.as_secs().max(1) as i64),
            ttl_seconds_after_finished: Some(86400),
            ..Default::default()
        }),
        status: None,
    }
}

/// Runs a Job hook: creates the Job (or finds this run's) and waits for its verdict.
async fn run_job(
    client: &Client,
    owner: &Owner,
    phase: Phase,
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
    timeout: Duration,
    run_id: &str,
) -> Result<String, HookError> {
    let ns = owner.namespace.clone();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let desired = job(owner, phase, template, timeout, run_id);
    let name = desired.metadata.name.clone().unwrap_or_default();
    create_job(&jobs, &desired, &name, phase).await?;
    wait_for_job(client, &jobs, &ns, name, phase, timeout).await
}

/// Creates the hook's Job; one already there under its name is this run's.
async fn create_job(jobs: &Api<Job>, desired: &Job, name: &str, phase: Phase) -> Result<(), HookError> {
    match jobs.create(&PostParams::default(), desired).await {
        Ok(_) => Ok(()),
        // A restarted coordinator finds the Job of this run and waits for it.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(source) => Err(HookError::CreateJob {
            phase,
            job: name.to_owned(),
            source,
        }),
    }
}

/// Polls the Job `name` until it completes, fails, is deleted or outlives its deadline.
async fn wait_for_job(
    client: &Client,
    jobs: &Api<Job>,
    ns: &str,
    name: String,
    phase: Phase,
    timeout: Duration,
) -> Result<String, HookError> {
    // The Job's own activeDeadlineSeconds stops it; wait a little longer for its verdict.
    let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(30);
    loop {
        let job = jobs.get_opt(&name).await.map_err(|source| HookError::ReadJob {
            phase,
            job: name.clone(),
            source,
        })?;
        let Some(job) = job else {
            return Err(HookError::JobDeleted { phase, job: name });
        };
        if let Some(verdict) = job_verdict(client, ns, &name, phase, &job).await {
            return verdict;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(HookError::JobTimeout {
                phase,
                job: name,
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The hook's result once `job` has finished (its output, or why it failed); `None` before.
async fn job_verdict(
    client: &Client,
    ns: &str,
    name: &str,
    phase: Phase,
    job: &Job,
) -> Option<Result<String, HookError>> {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let is = |t: &str| conditions.iter().any(|c| c.type_ == t && c.status == "True");
    if is("Complete") {
        return Some(Ok(job_output(client, ns, name).await));
    }
    if is("Failed") {
        let why = conditions
            .iter()
            .find(|c| c.type_ == "Failed")
            .and_then(|c| c.message.clone().or(c.reason.clone()))
            .unwrap_or_default();
        let output = job_output(client, ns, name).await;
        return Some(Err(HookError::JobFailed {
            phase,
            job: name.to_owned(),
            why,
            output,
        }));
    }
    None
}

/// What the Job's pod printed: its log tail, or (when logs cannot be read) how its
/// containers terminated.
async fn job_output(client: &Client, ns: &str, job: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let Ok(list) = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
    else {
        return String::new();
    };
    let mut parts = Vec::new();
    for pod in list.items {
        let name = pod.name_any();
        let logs = pods
            .logs(
                &name,
                &LogParams {
                    tail_lines: Some(20),
                    limit_bytes: Some(OUTPUT_LIMIT as i64),
                    ..Default::default()
                },
            )
            .await;
        match logs {
            Ok(l) if !l.trim().is_empty() => parts.push(l.trim().to_owned()),
            _ => {
                for cs in pod
                    .status
                    .iter()
                    .flat_map(|s| s.container_statuses.iter().flatten())
                {
                    if let Some(t) = cs.state.as_ref().and_then(|s| s.terminated.as_ref()) {
                        parts.push(format!(
                            "container {} exited {}{}",
                            cs.name,
                            t.exit_code,
                            t.message
                                .as_deref()
                                .map(|m| format!(": {}", m.trim()))
                                .unwrap_or_default()
                        ));
                    }
                }
            }
        }
    }
    truncate(&parts.join("; "), OUTPUT_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_exec_hook_printing_megabytes_keeps_only_the_end_of_its_output() {
        // A pod printing 48 MiB through a small pipe, read as it is written.
        let (mut pod, mut coordinator) = tokio::io::duplex(16 << 10);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let block = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n".repeat(1024);
            for _ in 0..(48 << 20) / block.len() {
                pod.write_all(&block).await.unwrap();
            }
            pod.write_all("the end: café".as_bytes()).await.unwrap();
        });
        let tail = read_tail(&mut coordinator, STREAM_TAIL).await;
        writer.await.unwrap();
        let total = (48 << 20) + "the end: café".len() as u64;
        assert_eq!(tail.kept.len(), STREAM_TAIL);
        assert!(
            tail.kept.capacity() < 2 * STREAM_TAIL,
            "the buffer grew to {} bytes",
            tail.kept.capacity()
        );
        assert_eq!(tail.cut + tail.kept.len() as u64, total);
        let text = tail.into_string();
        assert!(
            text.starts_with(&format!("[first {} bytes cut] ", total - STREAM_TAIL as u64)),
            "{}",
            &text[..80]
        );
        assert!(text.ends_with("abcde\nthe end: café"));
        // What reaches the status message is the very end.
        let message = ending(&text, OUTPUT_LIMIT);
        assert!(
            message.starts_with('…') && message.ends_with("the end: café"),
            "{message}"
        );
        assert!(message.len() <= OUTPUT_LIMIT + '…'.len_utf8());
    }

    #[tokio::test]
    async fn short_output_is_kept_whole_and_a_cut_never_splits_a_character() {
        let mut short: &[u8] = b"pg_dump: done\n";
        assert_eq!(read_tail(&mut short, 64).await.into_string(), "pg_dump: done\n");
        // "é" is two bytes; the last 3 of "aéé" start inside the first "é".
        let mut accents: &[u8] = "aéé".as_bytes();
        assert_eq!(
            read_tail(&mut accents, 3).await.into_string(),
            "[first 3 bytes cut] é"
        );
        assert_eq!(ending("aéé", 3), "…é");
    }

    #[test]
    fn a_hook_error_names_its_phase_first_and_keeps_the_output() {
        let e = HookError::JobFailed {
            phase: Phase::PreBackup,
            job: "db-pre-1".into(),
            why: "BackoffLimitExceeded".into(),
            output: "pg_dump: error".into(),
        };
        assert_eq!(
            e.to_string(),
            "preBackup hook failed: Job db-pre-1 failed (BackoffLimitExceeded): pg_dump: error"
        );
        assert_eq!(e.phase(), Phase::PreBackup);
        assert_eq!(e.output(), Some("pg_dump: error"));
        let e = HookError::ExecTimeout {
            phase: Phase::OnFailure,
            timeout: "20s".into(),
        };
        assert_eq!(
            e.to_string(),
            "onFailure hook failed: exec did not finish within 20s"
        );
        assert_eq!(e.output(), None);
        let e = HookError::NoStatus {
            phase: Phase::PostBackup,
            pod: "db-0".into(),
            container: "app".into(),
            output: "done".into(),
        };
        assert_eq!(
            e.to_string(),
            "postBackup hook failed: command in pod db-0 container app ended without a status: done"
        );
    }

    #[test]
    fn hook_job_never_retries_and_is_owned_by_the_backup() {
        let backup: restic_operator_api::backup::ResticBackup = serde_yaml::from_str(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {name: db, namespace: n, uid: '1'}\n\
             spec: {repositoryRef: {name: r}, schedule: '@daily', source: {pvc: {claimName: data}}}",
        )
        .unwrap();
        let template = serde_yaml::from_str("spec: {containers: [{name: dump, image: busybox}]}").unwrap();
        let job = job(
            &Owner::backup(&backup),
            Phase::PreBackup,
            &template,
            Duration::from_secs(60),
            "run-7",
        );
        let spec = job.spec.unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        assert_eq!(spec.active_deadline_seconds, Some(60));
        assert_eq!(
            spec.template.spec.unwrap().restart_policy.as_deref(),
            Some("Never")
        );
        assert_eq!(
            job.metadata.name.unwrap(),
            job_name("db", Phase::PreBackup, "run-7")
        );
        assert_eq!(job.metadata.owner_references.unwrap()[0].name, "db");
    }
}
