//! The agent's requests for a repository, built without I/O: the readiness probe, `init`,
//! statistics and the integrity check. Each run id names the repository (its UID), the work
//! and the time it was asked for, so the same request asked twice is one run on the agent.

use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use restic_operator_api::repository::ResticRepository;
use restic_operator_proto::v1 as pb;

use crate::run;

/// Work on a whole repository that takes only the repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `restic cat config --no-lock`: readiness.
    Probe,
    /// `restic init`, when no repository exists at the URL.
    Init,
    /// `restic stats`.
    Stats,
    /// `restic prune`.
    Prune,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Probe => "probe",
            Kind::Init => "init",
            Kind::Stats => "stats",
            Kind::Prune => "prune",
        }
    }
}

/// The request of `kind` for `repo` at `at`; `attempt` tells apart the probes of one
/// reconcile (before and after an init).
pub fn repository(
    kind: Kind,
    repo: &ResticRepository,
    credentials: &pb::Repository,
    at: DateTime<Utc>,
    attempt: u32,
    timeout: Duration,
) -> pb::RepositoryRequest {
    let uid = repo.uid().unwrap_or_default();
    let stamp = at.timestamp();
    let run_id = match kind {
        Kind::Probe => format!("repo-{uid}-probe-{stamp}-{attempt}"),
        Kind::Init => format!("repo-{uid}-init-{stamp}"),
        Kind::Stats => format!("repo-{uid}-stats-{stamp}"),
        Kind::Prune => format!("repo-{uid}-prune-{stamp}"),
    };
    pb::RepositoryRequest {
        options: Some(run::options(&run_id, timeout)),
        repository: Some(credentials.clone()),
    }
}

/// The integrity check of `repo` scheduled (or triggered) at `scheduled`, reading the data
/// subset `spec.integrityCheck.readDataSubset` asks for.
pub fn check(
    repo: &ResticRepository,
    credentials: pb::Repository,
    scheduled: DateTime<Utc>,
    timeout: Duration,
) -> pb::CheckRequest {
    let run_id = format!(
        "repo-{}-check-{}",
        repo.uid().unwrap_or_default(),
        scheduled.timestamp()
    );
    pb::CheckRequest {
        options: Some(run::options(&run_id, timeout)),
        repository: Some(credentials),
        read_data_subset: repo
            .spec
            .integrity_check
            .as_ref()
            .and_then(|c| c.read_data_subset.clone())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> ResticRepository {
        serde_yaml::from_str(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\n\
             metadata: {name: r, namespace: n, uid: u1}\n\
             spec: {repositoryURL: 's3:x/y', credentialsSecretRef: {name: c}, \
             integrityCheck: {enabled: true, schedule: '0 3 * * 0', readDataSubset: 5%}}\n",
        )
        .unwrap()
    }

    fn credentials() -> pb::Repository {
        pb::Repository {
            url: "s3:x/y".into(),
            password: "pw".into(),
            ..Default::default()
        }
    }

    #[test]
    fn repository_requests_are_named_for_the_repository_the_work_and_the_time() {
        let at: DateTime<Utc> = "2026-11-26T10:00:00Z".parse().unwrap();
        let minute = Duration::from_secs(60);
        let id = |kind, attempt| {
            let r = repository(kind, &repo(), &credentials(), at, attempt, minute);
            assert_eq!(r.repository.as_ref().unwrap().password, "pw");
            let options = r.options.unwrap();
            assert_eq!(options.timeout_seconds, 60);
            options.run_id
        };
        let stamp = at.timestamp();
        assert_eq!(id(Kind::Probe, 0), format!("repo-u1-probe-{stamp}-0"));
        assert_eq!(id(Kind::Probe, 1), format!("repo-u1-probe-{stamp}-1"));
        assert_eq!(id(Kind::Init, 0), format!("repo-u1-init-{stamp}"));
        assert_eq!(id(Kind::Stats, 0), format!("repo-u1-stats-{stamp}"));
    }

    #[test]
    fn a_check_reads_the_subset_the_spec_asks_for() {
        let at: DateTime<Utc> = "2026-11-22T03:00:00Z".parse().unwrap();
        let r = check(&repo(), credentials(), at, Duration::from_secs(7200));
        assert_eq!(r.read_data_subset, "5%");
        let options = r.options.unwrap();
        assert_eq!(options.run_id, format!("repo-u1-check-{}", at.timestamp()));
        assert_eq!(options.timeout_seconds, 7200);
    }
}
