//! Backup hooks: a command in a running pod (pods/exec through the API server) or a Job
//! from a pod template, waited for with the hook's timeout. The result carries the end of the
//! output, so a failed hook's reason shows what it printed last. The pod is the user's: what
//! it prints is read with a bounded buffer, however much it prints.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{AttachParams, ListParams, LogParams, ObjectMeta, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::{Hook, label_selector_matches, parse_duration};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::BACKUP_LABEL;
use crate::holder::fnv;
use crate::run::truncate;

/// Which hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    PreBackup,
    PostBackup,
    OnFailure,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::PreBackup => "preBackup",
            Phase::PostBackup => "postBackup",
            Phase::OnFailure => "onFailure",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Phase::PreBackup => "pre",
            Phase::PostBackup => "post",
            Phase::OnFailure => "onfailure",
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
    backup: &ResticBackup,
    phase: Phase,
    hook: &Hook,
    run_id: &str,
) -> Result<String, String> {
    let result = if let Some(exec) = &hook.exec {
        let timeout = parse_duration(&exec.timeout).unwrap_or(DEFAULT_TIMEOUT);
        match tokio::time::timeout(timeout, run_exec(client, backup, exec)).await {
            Ok(r) => r,
            Err(_) => Err(format!("exec did not finish within {}", exec.timeout)),
        }
    } else if let Some(job) = &hook.job {
        let timeout = parse_duration(&job.timeout).unwrap_or(DEFAULT_TIMEOUT);
        run_job(client, backup, phase, &job.pod_template, timeout, run_id).await
    } else {
        Ok(String::new())
    };
    result.map_err(|e| format!("{} hook failed: {e}", phase.as_str()))
}

async fn run_exec(
    client: &Client,
    backup: &ResticBackup,
    exec: &restic_operator_api::common::ExecHook,
) -> Result<String, String> {
    let ns = backup.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods = api
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing pods: {e}"))?
        .items;
    let (pod, _) = crate::sources::choose(&pods, |p| {
        label_selector_matches(&exec.pod_selector, &p.metadata.labels.clone().unwrap_or_default())
            .then(String::new)
    })
    .ok_or_else(|| format!("no running pod in {ns} matches the hook's podSelector"))?;
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
    let params = AttachParams::default()
        .container(container.clone())
        .stdin(false)
        .stdout(true)
        .stderr(true);
    let mut process = api
        .exec(&pod_name, exec.command.clone(), &params)
        .await
        .map_err(|e| format!("exec in pod {pod_name} container {container}: {e}"))?;
    let stdout = process.stdout();
    let stderr = process.stderr();
    let status = process.take_status();
    let (out, err) = tokio::join!(read_tail_of(stdout), read_tail_of(stderr));
    let status = match status {
        Some(s) => s.await,
        None => None,
    };
    let output = ending(format!("{out}{err}").trim(), OUTPUT_LIMIT);
    match status {
        Some(s) if s.status.as_deref() == Some("Success") => Ok(output),
        Some(s) => Err(format!(
            "command in pod {pod_name} container {container} failed ({}): {output}",
            s.message.unwrap_or_default()
        )),
        None => Err(format!(
            "command in pod {pod_name} container {container} ended without a status: {output}"
        )),
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
pub fn job_name(backup: &str, phase: Phase, run_id: &str) -> String {
    let prefix: String = backup.chars().take(40).collect();
    format!(
        "{}-{}-{:08x}",
        prefix.trim_end_matches('-'),
        phase.short(),
        fnv(run_id)
    )
}

/// The Job of a hook (pure).
pub fn job(
    backup: &ResticBackup,
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
    let labels = BTreeMap::from([
        (BACKUP_LABEL.to_owned(), backup.name_any()),
        (
            "backup.resticbackup.io/hook".to_owned(),
            phase.as_str().to_owned(),
        ),
    ]);
    let meta = template.metadata.get_or_insert_with(Default::default);
    meta.labels
        .get_or_insert_with(Default::default)
        .extend(labels.clone());
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(&backup.name_any(), phase, run_id)),
            namespace: backup.namespace(),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                "backup.resticbackup.io/run-id".to_owned(),
                run_id.to_owned(),
            )])),
            owner_references: backup.controller_owner_ref(&()).map(|o| vec![o]),
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

async fn run_job(
    client: &Client,
    backup: &ResticBackup,
    phase: Phase,
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
    timeout: Duration,
    run_id: &str,
) -> Result<String, String> {
    let ns = backup.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let desired = job(backup, phase, template, timeout, run_id);
    let name = desired.metadata.name.clone().unwrap_or_default();
    match jobs.create(&PostParams::default(), &desired).await {
        Ok(_) => {}
        // A restarted coordinator finds the Job of this run and waits for it.
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(format!("creating Job {name}: {e}")),
    }
    // The Job's own activeDeadlineSeconds stops it; wait a little longer for its verdict.
    let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(30);
    loop {
        let job = jobs
            .get_opt(&name)
            .await
            .map_err(|e| format!("reading Job {name}: {e}"))?;
        let Some(job) = job else {
            return Err(format!("Job {name} was deleted"));
        };
        let conditions = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let is = |t: &str| conditions.iter().any(|c| c.type_ == t && c.status == "True");
        if is("Complete") {
            return Ok(job_output(client, &ns, &name).await);
        }
        if is("Failed") {
            let why = conditions
                .iter()
                .find(|c| c.type_ == "Failed")
                .and_then(|c| c.message.clone().or(c.reason.clone()))
                .unwrap_or_default();
            let output = job_output(client, &ns, &name).await;
            return Err(format!("Job {name} failed ({why}): {output}"));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("Job {name} did not finish within {}s", timeout.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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
    fn hook_job_never_retries_and_is_owned_by_the_backup() {
        let backup: ResticBackup = serde_yaml::from_str(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {name: db, namespace: n, uid: '1'}\n\
             spec: {repositoryRef: {name: r}, schedule: '@daily', source: {pvc: {claimName: data}}}",
        )
        .unwrap();
        let template = serde_yaml::from_str("spec: {containers: [{name: dump, image: busybox}]}").unwrap();
        let job = job(
            &backup,
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
