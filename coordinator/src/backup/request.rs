//! The agent's backup request for a run, built without I/O from the backup, the run in
//! flight, its resolved repository and its placement.

use std::time::Duration;

use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::ActiveRun;
use restic_operator_proto::v1 as pb;

use crate::resolve::Resolved;
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
    let job = backup.spec.job_config.clone().unwrap_or_default();
    let mut options = run::options(
        &active.run_id,
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
        use_cache: resolved
            .access()
            .repository()
            .spec
            .cache
            .as_ref()
            .is_none_or(|c| c.enabled),
        ..Default::default()
    });
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
}
