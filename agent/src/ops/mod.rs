//! The operations the agent runs, one module each. Every operation is split the same way:
//! `prepare` validates the request and resolves what it needs on this node before a run exists
//! (so a bad request is a gRPC error, not a failed run), and `run` executes it as a run.

pub mod backup;
pub mod repository;
pub mod restore;

use restic_operator_args as args;
use restic_operator_proto::v1::{self as pb, FailureKind, Outcome};

use crate::exec::{ExecError, Executor, Invocation, Output};
use crate::restic;

/// A failed result with a reason.
pub fn failed(kind: FailureKind, reason: impl Into<String>) -> pb::Result {
    pb::Result {
        outcome: Outcome::Failed as i32,
        failure: kind as i32,
        reason: reason.into(),
        ..Default::default()
    }
}

pub fn succeeded() -> pb::Result {
    pb::Result {
        outcome: Outcome::Succeeded as i32,
        ..Default::default()
    }
}

/// The result of a restic process that did not succeed: cancelled, OOM-killed, or restic's
/// own failure, classified.
pub fn failure_of(out: &Output, what: &str) -> pb::Result {
    if out.cancelled {
        return crate::runs::cancelled_result(&format!("{what} was cancelled"));
    }
    if let Some(line) = &out.hopeless {
        let (kind, why) = crate::restic::classify_hopeless(line);
        return failed(
            kind,
            format!("{what}: {why} (restic was stopped rather than left retrying)"),
        );
    }
    if out.oom_killed {
        return failed(
            FailureKind::OutOfMemory,
            format!(
                "{what}: restic was killed for exceeding its memory limit (peak {} MiB)",
                out.peak_memory >> 20
            ),
        );
    }
    if let Some(sig) = out.signal {
        return failed(
            FailureKind::Restic,
            format!("{what}: restic was killed by signal {sig}"),
        );
    }
    // The sandbox's own exits: its last stderr line says why.
    let sandbox_says = || {
        let line = out.stderr.lines().last().unwrap_or_default();
        line.strip_prefix("restic-agent sandbox: ")
            .unwrap_or(line)
            .to_owned()
    };
    match out.exit_code {
        Some(crate::sandbox::EXIT_SETUP) => {
            let why = sandbox_says();
            let reason = format!("{what}: the agent could not set up restic's sandbox on this node: {why}");
            return failed(FailureKind::Unspecified, reason);
        }
        Some(crate::sandbox::EXIT_REFUSED) => {
            return failed(
                FailureKind::InvalidRequest,
                format!("{what} refused: {}", sandbox_says()),
            );
        }
        _ => {}
    }
    let (kind, reason) = restic::classify_failure(out.exit_code, &out.stderr);
    if out.timed_out {
        // A missing repository or a wrong password is answered at once; a run still opening the
        // repository at its deadline is waiting for a backend that does not answer.
        let kind = match kind {
            FailureKind::RepositoryNotFound | FailureKind::Restic if reason.contains("unable to open") => {
                FailureKind::RepositoryUnreachable
            }
            other => other,
        };
        let mut r = failed(
            kind,
            format!("{what} did not finish within its timeout and was stopped; last: {reason}"),
        );
        r.timed_out = true;
        return r;
    }
    let mut r = failed(kind, format!("{what} failed: {reason}"));
    r.exit_code = out.exit_code.unwrap_or(-1);
    r
}

/// The paths restic reported errors for: the first `MAX_FAILED_PATHS`, and how many in all.
pub fn set_failed_paths(result: &mut pb::Result, out: &Output) {
    result.failed_paths = out
        .errors
        .iter()
        .map(|e| e.item.clone())
        .filter(|p| !p.is_empty())
        .take(restic_operator_proto::MAX_FAILED_PATHS)
        .collect();
    result.failed_paths_total = out.error_total.max(result.failed_paths.len() as u64);
}

/// Checks the parts every request shares: run options and repository. Extra arguments must
/// each be allowed for one of `commands` (the restic commands the request runs).
pub fn check_common(
    commands: &[args::Op],
    options: Option<&pb::RunOptions>,
    repo: Option<&pb::Repository>,
) -> Result<(), String> {
    let options = options.ok_or("options (with run_id) are required")?;
    crate::runs::validate_run_id(&options.run_id)?;
    if let Some(r) = &options.restic {
        check_extra_args(commands, &r.extra_args)?;
        if !matches!(r.compression.as_str(), "" | "auto" | "off" | "max") {
            return Err(format!(
                "compression {:?} is not one of auto, off, max",
                r.compression
            ));
        }
    }
    let repo = repo.ok_or("repository is required")?;
    if repo.url.trim().is_empty() {
        return Err("repository.url is required".into());
    }
    check_text("repository.url", &repo.url, 4096)?;
    if repo.password.is_empty() {
        return Err("repository.password is required".into());
    }
    // Any character may be in a password, but none can pass NUL through the environment.
    if repo.password.len() > 64 << 10 || repo.password.contains('\0') {
        return Err("repository.password is longer than 64 KiB or holds a NUL".into());
    }
    if repo.env.len() > 256 {
        return Err(format!(
            "repository.env has {} entries; at most 256",
            repo.env.len()
        ));
    }
    for (name, value) in &repo.env {
        restic::check_env_name(name)?;
        if value.len() > 64 << 10 || value.contains('\0') {
            return Err(format!(
                "repository.env {name} is longer than 64 KiB or holds a NUL"
            ));
        }
    }
    Ok(())
}

/// A request's string that becomes one of restic's arguments: at most `max` bytes, with no
/// control character (a NUL could not even be passed; a newline would forge log lines). The
/// bounds are far above what a ResticBackup can hold (a default host is `<name>.<namespace>`,
/// at most 317 bytes) and far below what breaks `exec` (128 KiB an argument).
pub fn check_text(what: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{what} is {} bytes long; at most {max}", value.len()));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!("{what} holds the control character {c:?}"));
    }
    Ok(())
}

/// A list of request strings: at most `count` items of at most `max` bytes each.
pub fn check_texts(what: &str, values: &[String], count: usize, max: usize) -> Result<(), String> {
    if values.len() > count {
        return Err(format!("{what} has {} items; at most {count}", values.len()));
    }
    values.iter().try_for_each(|v| check_text(what, v, max))
}

/// Snapshot tags: bounded plain text without the comma restic splits `--tag` values on.
pub fn check_tags(tags: &[String]) -> Result<(), String> {
    check_texts("tags", tags, 256, 1024)?;
    match tags.iter().find(|t| t.is_empty() || t.contains(',')) {
        Some(t) => Err(format!("tag {t:?} is empty or holds a comma")),
        None => Ok(()),
    }
}

/// Each extra argument must be one allowed option of one of `commands` (see the args crate).
fn check_extra_args(commands: &[args::Op], extra: &[String]) -> Result<(), String> {
    if extra.len() > args::MAX_ITEMS {
        return Err(args::ArgError::TooMany(extra.len()).to_string());
    }
    for arg in extra {
        let results: Vec<_> = commands.iter().map(|op| args::check_one(*op, arg)).collect();
        if !results.iter().any(Result::is_ok)
            && let Some(Err(e)) = results.into_iter().next()
        {
            return Err(e.to_string());
        }
    }
    Ok(())
}

/// Runs restic; a refused repository or the agent's own failure to start it becomes the
/// run's failed result.
pub async fn execute(exec: &Executor, inv: Invocation<'_>) -> Result<Output, pb::Result> {
    exec.run(inv).await.map_err(|e| match e {
        ExecError::Refused(reason) => failed(FailureKind::InvalidRequest, reason),
        ExecError::Start(e) => failed(FailureKind::Unspecified, format!("cannot start restic: {e:#}")),
        ExecError::NoSpace(reason) => failed(FailureKind::Unspecified, reason),
    })
}
