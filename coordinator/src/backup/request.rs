//! The agent's requests for a run, built without I/O: the backup (from the backup, the run in
//! flight, its resolved repository and its placement) and the forget of its retention.

use std::time::Duration;

use restic_operator_api::backup::{ResticBackup, RetentionSpec};
use restic_operator_api::common::ActiveRun;
use restic_operator_proto::v1 as pb;

use crate::resolve::Resolved;
use crate::retention::{self, Selection};
use crate::run;
use crate::sources::PodVolume;

/// The agent request of a run: the volume, the resolved repository, and the backup's
/// options (its timeout `run_timeout` unless `jobConfig.activeDeadlineSeconds` is set).
pub fn backup(
    run_timeout: Duration,
    backup: &ResticBackup,
    active: &ActiveRun,
    resolved: &Resolved,
    source: &PodVolume,
) -> pb::BackupRequest {
    let options = options(run_timeout, backup, active, resolved);
    let (paths, excludes) = match (&backup.spec.source.pvc, &backup.spec.source.pod_volume_backup) {
        (Some(p), _) => (p.paths.clone(), p.excludes.clone()),
        (_, Some(p)) => (p.paths.clone(), p.excludes.clone()),
        _ => (vec![], vec![]),
    };
    pb::BackupRequest {
        options: Some(options),
        repository: Some(resolved.agent_repository()),
        volume: Some(pb::VolumeRef {
            pod_uid: source.pod_uid.clone(),
            volume_name: source.volume.clone(),
            pv_name: source.pv_name.clone(),
        }),
        snapshot_path: backup.snapshot_path().to_owned(),
        host: backup.effective_hostname(),
        tags: backup.snapshot_tags(),
        paths,
        excludes,
        dry_run: false,
    }
}

/// The forget that applies the retention `spec` of `backup` after run `run_id`: the
/// backup's own snapshots (its host and tags), in the repository the run went to.
pub fn forget(
    timeout: Duration,
    backup: &ResticBackup,
    spec: &RetentionSpec,
    run_id: &str,
    resolved: &Resolved,
) -> pb::ForgetRequest {
    let selection = Selection::of_backup(
        backup.effective_hostname(),
        backup.snapshot_tags(),
        &spec.group_by,
    );
    retention::forget_request(
        run::options(&format!("{run_id}-forget"), timeout),
        resolved.agent_repository(),
        &spec.effective_policy(),
        selection,
        spec.prune,
    )
}

/// The id the agent knows an attempt of a run by: the run id for the first attempt, and the
/// run id with the attempt number for each retry (the agent keeps every attempt's result).
pub fn agent_run_id(active: &ActiveRun) -> String {
    match active.attempt.unwrap_or(1) {
        ..=1 => active.run_id.clone(),
        n => format!("{}-a{n}", active.run_id),
    }
}

/// The run options of a backup: its id, timeout, memory limit, user and group, and restic
/// settings (the backup's extra arguments, the repository's cache setting).
fn options(
    run_timeout: Duration,
    backup: &ResticBackup,
    active: &ActiveRun,
    resolved: &Resolved,
) -> pb::RunOptions {
    let job = backup.spec.job_config.clone().unwrap_or_default();
    let mut options = run::options(
        &agent_run_id(active),
        job.active_deadline_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(run_timeout, Duration::from_secs),
    );
    if let Some(limit) = job
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .and_then(|q| parse_quantity(&q.0))
    {
        options.memory_limit_bytes = limit;
    }
    if let Some(sc) = &job.security_context {
        options.run_as_user = sc.run_as_user.and_then(|u| u32::try_from(u).ok());
        options.run_as_group = sc.run_as_group.and_then(|g| u32::try_from(g).ok());
    }
    options.restic = Some(pb::ResticOptions {
        extra_args: backup
            .spec
            .restic
            .as_ref()
            .map(|r| r.extra_args.clone())
            .unwrap_or_default(),
        use_cache: resolved.access().use_cache(),
        cache_size_bytes: resolved.access().cache_size_bytes(),
        ..Default::default()
    });
    options
}

/// `128Mi`, `1G`, `512000` as bytes.
pub fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, unit) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        "P" => 1e15,
        "Pi" => 1024.0f64.powi(5),
        _ => return None,
    };
    Some((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_quantities_become_bytes() {
        assert_eq!(parse_quantity("512Mi"), Some(512 * 1024 * 1024));
        assert_eq!(parse_quantity("1G"), Some(1_000_000_000));
        assert_eq!(parse_quantity("1.5Gi"), Some(1_610_612_736));
        assert_eq!(parse_quantity("1000"), Some(1000));
        assert_eq!(parse_quantity("lots"), None);
    }

    const BACKUP: &str = "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\n\
        metadata: {name: app, namespace: team, uid: u1}\n\
        spec: {repositoryRef: {name: repo, namespace: shared}, schedule: '0 2 * * *', \
        source: {pvc: {claimName: data, paths: [db], excludes: ['*.tmp']}}, \
        jobConfig: {activeDeadlineSeconds: 600, resources: {limits: {memory: 256Mi}}, \
        securityContext: {runAsUser: 1000, runAsGroup: 2000}}, \
        restic: {extraArgs: ['--compression=max']}, \
        retention: {policy: {keepDaily: 7, keepLast: 2}, prune: true, groupBy: [paths]}}\n";

    const REPOSITORY: &str = "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\n\
        metadata: {name: repo, namespace: shared}\n\
        spec: {repositoryURL: 's3:http://s3/bucket', credentialsSecretRef: {name: creds}, allowedNamespaces: {names: [team]}, cache: {enabled: false, size: 5Gi}}\n";

    const SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata: {name: creds, namespace: shared}\n\
        stringData: {RESTIC_PASSWORD: pw, AWS_ACCESS_KEY_ID: key, RESTIC_REPOSITORY: 's3:http://s3/bucket'}\n";

    fn fixtures() -> (ResticBackup, Resolved) {
        let backup: ResticBackup = serde_yaml::from_str(BACKUP).unwrap();
        let repo = serde_yaml::from_str(REPOSITORY).unwrap();
        let access = crate::resolve::check_namespace(&repo, "team", &Default::default()).unwrap();
        let resolved = Resolved::from_secret(access, &serde_yaml::from_str(SECRET).unwrap()).unwrap();
        (backup, resolved)
    }

    #[test]
    fn a_backup_request_carries_the_checked_repository_and_the_runs_limits() {
        let (b, resolved) = fixtures();
        let active = ActiveRun {
            run_id: "rb-u1-1".into(),
            ..Default::default()
        };
        let source = PodVolume {
            pod: "holder".into(),
            pod_uid: "p1".into(),
            node: "n1".into(),
            volume: "data".into(),
            pv_name: "pv-1".into(),
        };
        let r = backup(Duration::from_secs(3600), &b, &active, &resolved, &source);
        let options = r.options.unwrap();
        assert_eq!(
            (
                options.run_id.as_str(),
                options.timeout_seconds,
                options.memory_limit_bytes
            ),
            ("rb-u1-1", 600, 256 << 20)
        );
        assert_eq!(
            (options.run_as_user, options.run_as_group),
            (Some(1000), Some(2000))
        );
        let restic = options.restic.unwrap();
        assert_eq!(restic.extra_args, ["--compression=max"]);
        assert!(!restic.use_cache, "the repository turns the cache off");
        assert_eq!(restic.cache_size_bytes, 5 << 30);
        let repository = r.repository.unwrap();
        assert_eq!(
            (repository.url.as_str(), repository.password.as_str()),
            ("s3:http://s3/bucket", "pw")
        );
        assert_eq!(repository.env.keys().collect::<Vec<_>>(), ["AWS_ACCESS_KEY_ID"]);
        let volume = r.volume.unwrap();
        assert_eq!((volume.pod_uid.as_str(), volume.pv_name.as_str()), ("p1", "pv-1"));
        assert_eq!(
            (r.paths, r.excludes),
            (vec!["db".to_owned()], vec!["*.tmp".to_owned()])
        );
        assert_eq!(r.host, b.effective_hostname());
        assert_eq!(r.tags, b.snapshot_tags());
    }

    #[test]
    fn the_forget_of_a_backups_retention_selects_its_own_snapshots() {
        let (backup, resolved) = fixtures();
        let spec = backup.spec.retention.clone().unwrap();
        let r = forget(Duration::from_secs(7200), &backup, &spec, "rb-u1-1", &resolved);
        let options = r.options.unwrap();
        assert_eq!(
            (options.run_id.as_str(), options.timeout_seconds),
            ("rb-u1-1-forget", 7200)
        );
        let policy = r.policy.unwrap();
        assert_eq!((policy.daily, policy.last, policy.weekly), (7, 2, 0));
        assert_eq!(r.group_by, ["host", "paths", "tags"]);
        assert_eq!(
            (r.host, r.tags),
            (backup.effective_hostname(), backup.snapshot_tags())
        );
        assert!(r.prune && !r.dry_run);
        assert_eq!(r.repository.unwrap().password, "pw");
    }
}
