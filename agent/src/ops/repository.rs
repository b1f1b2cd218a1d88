//! Repository operations: init, snapshots, forget, prune, check, stats, unlock, probe. Exclusive ones
//! (forget, prune, check) first remove stale locks with `restic unlock`, which by restic's own
//! rules removes only locks whose holder is known dead (a process of this host that is gone,
//! or a lock not refreshed for 30 minutes); a live lock that still blocks is reported as
//! `Locked` with restic's description of its holder, never removed.

use std::sync::Arc;

use restic_operator_proto::v1::{self as pb, FailureKind, RunKind, run_event::Event};

use super::backup::display_command;
use super::{check_common, check_tags, check_text, execute, failed, failure_of, succeeded};
use crate::exec::{Executor, Invocation, Output};
use crate::restic;
use crate::runs::Run;
use crate::sandbox::Access;

/// A repository operation, validated.
pub enum Op {
    Init,
    Snapshots {
        host: String,
        tags: Vec<String>,
        paths: Vec<String>,
    },
    Forget(Box<pb::ForgetRequest>),
    Prune,
    Check {
        read_data_subset: String,
    },
    Stats,
    Unlock,
    /// `restic cat config --no-lock`: opens the repository, whatever its size or locks.
    Probe,
}

impl Op {
    /// The restic commands this operation runs (its extra arguments must suit one of them).
    fn commands(&self) -> &'static [restic_operator_args::Op] {
        use restic_operator_args::Op as C;
        match self {
            Op::Init => &[C::Init],
            Op::Snapshots { .. } => &[C::Snapshots],
            Op::Forget(_) => &[C::Forget, C::Prune],
            Op::Prune => &[C::Prune],
            Op::Check { .. } => &[C::Check],
            Op::Stats => &[C::Stats],
            Op::Unlock => &[C::Unlock],
            // No extra arguments: a probe is the same everywhere.
            Op::Probe => &[],
        }
    }

    pub fn kind(&self) -> RunKind {
        match self {
            Op::Init => RunKind::Init,
            Op::Snapshots { .. } => RunKind::Snapshots,
            Op::Forget(_) => RunKind::Forget,
            Op::Prune => RunKind::Prune,
            Op::Check { .. } => RunKind::Check,
            Op::Stats => RunKind::Stats,
            Op::Unlock => RunKind::Unlock,
            Op::Probe => RunKind::Probe,
        }
    }
}

/// A forget's selection as restic reads it: `--host` (empty: any host) and `--tag`, whose
/// values restic splits at commas and which an empty value would widen to any snapshot. Each
/// tag must be one non-empty tag, and no value may hold a control character.
fn check_selection(host: &str, tags: &[String]) -> Result<(), String> {
    let printable = |s: &str| !s.chars().any(char::is_control);
    if !printable(host) || host.contains(',') {
        return Err(format!("host {host:?} is not one host name"));
    }
    match tags
        .iter()
        .find(|t| t.trim().is_empty() || t.contains(',') || !printable(t))
    {
        Some(t) => Err(format!(
            "tag {t:?} is not one non-empty tag (restic splits tags at commas)"
        )),
        None => Ok(()),
    }
}

/// Validates the common parts and the operation's own.
pub fn prepare(
    options: Option<&pb::RunOptions>,
    repo: Option<&pb::Repository>,
    op: &Op,
) -> Result<(), String> {
    check_common(op.commands(), options, repo)?;
    match op {
        Op::Forget(req) => {
            restic::check_keep_policy(req.policy.as_ref())?;
            check_text("host", &req.host, 1024)?;
            check_tags(&req.tags)?;
            if let Some(policy) = &req.policy {
                check_text("policy.within", &policy.within, 64)?;
                check_tags(&policy.tags)?;
            }
            for g in &req.group_by {
                if !matches!(g.as_str(), "host" | "paths" | "tags") {
                    return Err(format!("group_by {g:?} is not one of host, paths, tags"));
                }
            }
            check_selection(&req.host, &req.tags)
        }
        Op::Check { read_data_subset } if !read_data_subset.is_empty() => {
            let ok = read_data_subset
                .strip_suffix('%')
                .map(|p| p.parse::<f64>().is_ok_and(|p| p > 0.0 && p <= 100.0))
                .unwrap_or_else(|| {
                    read_data_subset
                        .split_once('/')
                        .is_some_and(|(n, m)| n.parse::<u32>().is_ok() && m.parse::<u32>().is_ok())
                        || read_data_subset
                            .chars()
                            .last()
                            .is_some_and(|c| "KMGT".contains(c))
                });
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "read_data_subset {read_data_subset:?} must look like 5%, 1/10 or 500M"
                ))
            }
        }
        _ => Ok(()),
    }
}

pub async fn run(
    exec: Arc<Executor>,
    run: Arc<Run>,
    options: pb::RunOptions,
    repo: pb::Repository,
    op: Op,
) -> pb::Result {
    let r = Step {
        exec: &exec,
        run: &run,
        options: &options,
        repo: &repo,
    };
    match op {
        Op::Init => {
            let out = match r.restic(vec!["init".into()], "init").await {
                Ok(o) => o,
                Err(e) => return e,
            };
            if out.success() {
                succeeded()
            } else {
                failure_of(&out, "init")
            }
        }
        Op::Snapshots { host, tags, paths } => {
            let mut args = vec!["snapshots".to_string()];
            if !host.is_empty() {
                args.extend(["--host".into(), host]);
            }
            if !tags.is_empty() {
                args.extend(["--tag".into(), tags.join(",")]);
            }
            for p in paths {
                args.extend(["--path".into(), p]);
            }
            let out = match r.restic(args, "snapshots").await {
                Ok(o) => o,
                Err(e) => return e,
            };
            if !out.success() {
                return failure_of(&out, "listing snapshots");
            }
            match serde_json::from_str::<Vec<restic::SnapshotJson>>(out.stdout.trim()) {
                Ok(list) => pb::Result {
                    snapshots: list.iter().map(restic::SnapshotJson::to_proto).collect(),
                    ..succeeded()
                },
                Err(e) => failed(
                    FailureKind::Restic,
                    format!("unexpected output of restic snapshots: {e}"),
                ),
            }
        }
        Op::Forget(req) => {
            if let Err(e) = r.unlock_stale().await {
                return e;
            }
            let out = match r.restic(restic::forget_args(&req), "forget").await {
                Ok(o) => o,
                Err(e) => return e,
            };
            if !out.success() {
                return failure_of(&out, "forget");
            }
            let forget = match restic::forget_summary(&out.stdout) {
                Ok(f) => f,
                Err(e) => return failed(FailureKind::Restic, e),
            };
            if req.prune && !req.dry_run {
                let out = match r.restic(vec!["prune".into()], "prune").await {
                    Ok(o) => o,
                    Err(e) => return e,
                };
                if !out.success() {
                    let mut res = failure_of(&out, "prune after forget");
                    res.forget = Some(forget);
                    return res;
                }
            }
            pb::Result {
                forget: Some(forget),
                ..succeeded()
            }
        }
        Op::Prune => {
            if let Err(e) = r.unlock_stale().await {
                return e;
            }
            match r.restic(vec!["prune".into()], "prune").await {
                Ok(out) if out.success() => succeeded(),
                Ok(out) => failure_of(&out, "prune"),
                Err(e) => e,
            }
        }
        Op::Check { read_data_subset } => {
            if let Err(e) = r.unlock_stale().await {
                return e;
            }
            let mut args = vec!["check".to_string()];
            if !read_data_subset.is_empty() {
                args.push(format!("--read-data-subset={read_data_subset}"));
            }
            match r.restic(args, "check").await {
                Ok(out) if out.success() => succeeded(),
                Ok(out) => failure_of(&out, "check"),
                Err(e) => e,
            }
        }
        Op::Stats => {
            let mut stats = pb::RepositoryStats::default();
            for mode in ["raw-data", "restore-size"] {
                let out = match r
                    .restic(vec!["stats".into(), "--mode".into(), mode.into()], mode)
                    .await
                {
                    Ok(o) => o,
                    Err(e) => return e,
                };
                if !out.success() {
                    return failure_of(&out, "stats");
                }
                let s: restic::StatsJson = match serde_json::from_str(out.stdout.trim()) {
                    Ok(s) => s,
                    Err(e) => {
                        return failed(
                            FailureKind::Restic,
                            format!("unexpected output of restic stats: {e}"),
                        );
                    }
                };
                if mode == "raw-data" {
                    stats.total_size = s.total_size;
                    stats.total_uncompressed_size = s.total_uncompressed_size;
                    stats.total_blob_count = s.total_blob_count;
                    stats.snapshots_count = s.snapshots_count;
                } else {
                    stats.total_file_count = s.total_file_count;
                }
            }
            pb::Result {
                stats: Some(stats),
                ..succeeded()
            }
        }
        Op::Probe => {
            let args = ["cat", "config", "--no-lock"].map(String::from).to_vec();
            match r.restic(args, "probe").await {
                Ok(out) if out.success() => succeeded(),
                Ok(out) => failure_of(&out, "opening the repository"),
                Err(e) => e,
            }
        }
        Op::Unlock => match r.unlock_stale().await {
            Ok(()) => succeeded(),
            Err(e) => e,
        },
    }
}

/// One step of a repository run.
struct Step<'a> {
    exec: &'a Executor,
    run: &'a Run,
    options: &'a pb::RunOptions,
    repo: &'a pb::Repository,
}

impl Step<'_> {
    async fn restic(&self, args: Vec<String>, step: &str) -> Result<Output, pb::Result> {
        let kind = match args.first().map(String::as_str) {
            Some("init") => RunKind::Init,
            Some("snapshots") => RunKind::Snapshots,
            Some("forget") => RunKind::Forget,
            Some("prune") => RunKind::Prune,
            Some("check") => RunKind::Check,
            Some("stats") => RunKind::Stats,
            Some("cat") => RunKind::Probe,
            _ => RunKind::Unlock,
        };
        let mut args = args;
        // One request's extra arguments are checked against all its commands; each command
        // gets the ones that are its own.
        let command = args
            .first()
            .and_then(|c| restic_operator_args::Op::from_command(c));
        if let (Some(o), Some(command)) = (&self.options.restic, command) {
            let own = o
                .extra_args
                .iter()
                .filter(|a| restic_operator_args::applies_to(command, a));
            args.extend(own.cloned());
        }
        self.run.emit(Event::Started(pb::Started {
            kind: kind as i32,
            command: display_command(&args),
        }));
        let inv = Invocation {
            run: self.run,
            repo: self.repo,
            options: self.options,
            args,
            volumes: vec![],
            access: Access::Repository,
            stream: false,
            step,
        };
        execute(self.exec, inv).await
    }

    /// `restic unlock`: removes stale locks only. A missing or unreadable repository fails here
    /// already, with a clearer message than the operation itself would give.
    async fn unlock_stale(&self) -> Result<(), pb::Result> {
        let out = self.restic(vec!["unlock".into()], "unlock").await?;
        if out.success() {
            Ok(())
        } else {
            Err(failure_of(&out, "removing stale locks"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forget_selects_one_host_and_whole_tags_only() {
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(check_selection("", &[]), Ok(()), "any host, any tags");
        assert_eq!(
            check_selection("db", &tags(&["app=a", "restic-operator/namespace=n"])),
            Ok(())
        );
        for (host, t) in [
            ("db,web", tags(&[])),
            ("db\n", tags(&[])),
            ("", tags(&[""])),
            ("", tags(&[" "])),
            ("", tags(&["a,b"])),
            ("", tags(&["a\u{7}"])),
        ] {
            assert!(check_selection(host, &t).is_err(), "{host:?} {t:?}");
        }
    }
}
