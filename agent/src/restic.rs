//! restic's command line and its `--json` output: building argument lists from requests,
//! parsing the messages restic prints, and classifying how a run ended.
//!
//! Pure functions only; `exec` runs the process.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use restic_operator_proto::v1::{self as pb, FailureKind};
use serde::Deserialize;

/// Environment variables a request may pass to restic (see [`restic_operator_args::check_env_name`]).
pub use restic_operator_args::check_env_name;

/// Where a repository lives, once its URL has passed [`check_repository_url`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Reached over the network by restic itself (s3, rest, b2, azure, gs, swift).
    Remote,
    /// restic starts a program for it (`ssh` for sftp:, `rclone`), which needs the node's
    /// system directories in the sandbox.
    Program,
    /// A directory on the node, to bind into the sandbox.
    Local(PathBuf),
}

/// What the node's administrator allows beyond remote repositories.
#[derive(Clone, Debug, Default)]
pub struct RepositoryPolicy {
    /// Directories on the node that may hold `local:` repositories.
    pub local_dirs: Vec<PathBuf>,
    /// Allow sftp: and rclone: repositories, which run a program on the node.
    pub program_backends: bool,
}

/// Checks a repository URL against an allow-list of backends. A repository URL and its
/// Secret are written by whoever may create a ResticRepository, so they are hostile too: a
/// bare path or `local:` would give them any directory of the node, and an sftp host or
/// rclone remote starting with `-` or naming a connection string would run commands.
pub fn check_repository_url(url: &str, policy: &RepositoryPolicy) -> Result<Backend, String> {
    if url.chars().any(|c| c.is_control()) {
        return Err("the repository URL contains control characters".into());
    }
    const REMOTE: &[&str] = &["s3:", "rest:", "b2:", "azure:", "gs:", "swift:"];
    if REMOTE.iter().any(|p| url.starts_with(p)) {
        return Ok(Backend::Remote);
    }
    let program = |what: &str| {
        if policy.program_backends {
            Ok(Backend::Program)
        } else {
            Err(format!(
                "{what} repositories run a program on the node; this agent refuses them unless started \
                 with --allow-program-backends (see SECURITY.md)"
            ))
        }
    };
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if let Some(rest) = url.strip_prefix("sftp:") {
        let authority = match rest.strip_prefix("//") {
            Some(r) => r.split('/').next().unwrap_or(""),
            None => rest.split(':').next().unwrap_or(""),
        };
        let (user, host) = authority.rsplit_once('@').unwrap_or(("x", authority));
        let host = host.split(':').next().unwrap_or("");
        if !plain(user) || !plain(host) {
            return Err(format!(
                "sftp repository {url:?}: the user and host may only hold letters, digits, '.', '_' and '-', \
                 and may not start with '-'"
            ));
        }
        return program("sftp:");
    }
    if let Some(rest) = url.strip_prefix("rclone:") {
        let remote = rest.split(':').next().unwrap_or("");
        if !plain(remote) || !rest.contains(':') {
            return Err(format!(
                "rclone repository {url:?}: name a configured remote (rclone:remote:path); connection strings \
                 and remotes starting with '-' are refused"
            ));
        }
        return program("rclone:");
    }
    let path = url.strip_prefix("local:").unwrap_or(url);
    let dir = Path::new(path);
    let allowed = dir.is_absolute()
        && !dir
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        && policy.local_dirs.iter().any(|d| dir.starts_with(d) && dir != d);
    if allowed {
        return Ok(Backend::Local(dir.to_path_buf()));
    }
    if !url.contains(':') && !url.starts_with('/') {
        return Err(format!(
            "repository URL {url:?} names no backend; use s3:, rest:, b2:, azure:, gs: or swift:"
        ));
    }
    if policy.local_dirs.is_empty() {
        return Err(format!(
            "repository URL {url:?} is a directory on the node; local repositories are refused unless the \
             agent is started with --allow-local-repository-dir"
        ));
    }
    Err(format!(
        "repository URL {url:?} is not below a directory this agent allows for local repositories ({})",
        policy
            .local_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Validates exclude patterns as globs before restic sees them, so a typo is a clear error
/// instead of a silently wider backup.
pub fn check_excludes(patterns: &[String]) -> Result<(), String> {
    for p in patterns {
        if p.is_empty() {
            return Err("an exclude pattern is empty".into());
        }
        globset::Glob::new(p)
            .map_err(|e| format!("exclude pattern {p:?} is not a valid glob: {}", e.kind()))?;
    }
    Ok(())
}

/// Common options of every invocation.
pub fn common_args(opts: &pb::ResticOptions, cache_dir: Option<&str>) -> Vec<String> {
    let mut args = vec!["--json".to_string()];
    match cache_dir {
        Some(dir) if opts.use_cache => args.extend(["--cache-dir".into(), dir.into()]),
        _ => args.push("--no-cache".into()),
    }
    if !opts.compression.is_empty() {
        args.extend(["--compression".into(), opts.compression.clone()]);
    }
    args
}

/// `restic forget` arguments for a keep policy.
pub fn forget_args(req: &pb::ForgetRequest) -> Vec<String> {
    let mut args = vec!["forget".to_string()];
    if let Some(p) = &req.policy {
        for (flag, n) in [
            ("--keep-last", p.last),
            ("--keep-hourly", p.hourly),
            ("--keep-daily", p.daily),
            ("--keep-weekly", p.weekly),
            ("--keep-monthly", p.monthly),
            ("--keep-yearly", p.yearly),
        ] {
            if n > 0 {
                args.extend([flag.to_string(), n.to_string()]);
            }
        }
        if !p.within.is_empty() {
            args.extend(["--keep-within".into(), p.within.clone()]);
        }
        for t in &p.tags {
            args.extend(["--keep-tag".into(), t.clone()]);
        }
    }
    // Always given: empty is "no grouping", never restic's default (host,paths).
    args.extend(["--group-by".into(), req.group_by.join(",")]);
    if !req.host.is_empty() {
        args.extend(["--host".into(), req.host.clone()]);
    }
    if !req.tags.is_empty() {
        args.extend(["--tag".into(), req.tags.join(",")]);
    }
    if req.dry_run {
        args.push("--dry-run".into());
    }
    args
}

/// A keep policy that keeps nothing would make `forget` delete every snapshot of the group.
pub fn check_keep_policy(policy: Option<&pb::KeepPolicy>) -> Result<(), String> {
    let keeps = policy.is_some_and(|p| {
        [p.last, p.hourly, p.daily, p.weekly, p.monthly, p.yearly]
            .iter()
            .any(|n| *n > 0)
            || !p.within.is_empty()
            || !p.tags.is_empty()
    });
    if keeps {
        Ok(())
    } else {
        Err("the keep policy keeps nothing; refusing to forget every snapshot".into())
    }
}

/// One line of restic's `--json` output during backup or restore.
#[derive(Debug, Deserialize)]
#[serde(tag = "message_type", rename_all = "snake_case")]
pub enum Message {
    Status(Status),
    Summary(Box<Summary>),
    Error(ErrorMessage),
    /// verbose_status, initialized, exit_error, ...: not needed for events.
    #[serde(other)]
    Other,
}

/// Progress: backup and restore use different counters, so all are optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Status {
    pub seconds_elapsed: u64,
    pub seconds_remaining: u64,
    pub percent_done: f64,
    pub total_files: u64,
    pub files_done: u64,
    pub files_restored: u64,
    pub total_bytes: u64,
    pub bytes_done: u64,
    pub bytes_restored: u64,
    pub error_count: u64,
    pub current_files: Vec<String>,
}

impl Status {
    pub fn to_progress(&self) -> pb::Progress {
        pb::Progress {
            percent_done: self.percent_done * 100.0,
            files_done: self.files_done.max(self.files_restored),
            total_files: self.total_files,
            bytes_done: self.bytes_done.max(self.bytes_restored),
            total_bytes: self.total_bytes,
            current_files: self.current_files.clone(),
            seconds_elapsed: self.seconds_elapsed,
            seconds_remaining: self.seconds_remaining,
            error_count: self.error_count,
            stage: String::new(),
        }
    }
}

/// The stage of a backup or restore, from its status lines: restic's `--json` status has no
/// phase, and its percentage counts bytes read, not uploaded, so a backup that has read
/// everything shows 100 % while the last packs are still going out (for many seconds with
/// `--limit-upload`).
#[derive(Debug, Default)]
pub struct Stages {
    /// restic estimates the time left only once its scanner has counted every file.
    scan_finished: bool,
}

impl Stages {
    pub fn stage(&mut self, restore: bool, s: &Status) -> &'static str {
        if restore {
            return "restoring";
        }
        if s.seconds_remaining > 0 {
            self.scan_finished = true;
        }
        let all_read = s.total_bytes > 0 && s.bytes_done >= s.total_bytes;
        if all_read && (self.scan_finished || s.percent_done >= 1.0) {
            "uploading"
        } else if self.scan_finished {
            "reading"
        } else {
            "scanning"
        }
    }
}

/// The final line of a backup or restore.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Summary {
    // backup
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unmodified: u64,
    pub dirs_new: u64,
    pub dirs_changed: u64,
    pub dirs_unmodified: u64,
    pub data_added: u64,
    pub data_added_packed: u64,
    pub total_files_processed: u64,
    pub total_bytes_processed: u64,
    pub snapshot_id: Option<String>,
    pub dry_run: bool,
    // restore
    pub total_files: u64,
    pub files_restored: u64,
    pub files_skipped: u64,
    pub files_deleted: u64,
    pub total_bytes: u64,
    pub bytes_restored: u64,
}

impl Summary {
    /// The snapshot a backup's summary names, if it is a well-formed restic id (64 lowercase
    /// hex digits). A summary without one is no proof of a snapshot, however it parsed.
    pub fn snapshot(&self) -> Option<&str> {
        self.snapshot_id
            .as_deref()
            .filter(|id| id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ErrorMessage {
    pub error: ErrorBody,
    pub during: String,
    pub item: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ErrorBody {
    pub message: String,
}

/// Parses one stdout line; `None` for lines that are not restic JSON messages.
pub fn parse_line(line: &str) -> Option<Message> {
    let line = line.trim();
    if !line.starts_with('{') {
        return None;
    }
    serde_json::from_str(line).ok()
}

/// `restic snapshots --json` entries.
#[derive(Debug, Deserialize)]
pub struct SnapshotJson {
    pub id: String,
    #[serde(default)]
    pub short_id: String,
    pub time: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub summary: Option<SnapshotSummaryJson>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SnapshotSummaryJson {
    pub total_files_processed: u64,
    pub total_bytes_processed: u64,
}

impl SnapshotJson {
    pub fn to_proto(&self) -> pb::Snapshot {
        pb::Snapshot {
            id: self.id.clone(),
            short_id: self.short_id.clone(),
            time_unix_ms: parse_rfc3339_ms(&self.time).unwrap_or_default(),
            hostname: self.hostname.clone(),
            tags: self.tags.clone().unwrap_or_default(),
            paths: self.paths.clone(),
            parent: self.parent.clone().unwrap_or_default(),
            files: self
                .summary
                .as_ref()
                .map(|s| s.total_files_processed)
                .unwrap_or_default(),
            bytes: self
                .summary
                .as_ref()
                .map(|s| s.total_bytes_processed)
                .unwrap_or_default(),
        }
    }
}

/// `restic forget --json`: one group per host/paths/tags.
#[derive(Debug, Deserialize)]
pub struct ForgetGroupJson {
    #[serde(default)]
    pub keep: Option<Vec<SnapshotJson>>,
    #[serde(default)]
    pub remove: Option<Vec<SnapshotJson>>,
}

pub fn forget_summary(stdout: &str) -> Result<pb::ForgetSummary, String> {
    let json = stdout
        .lines()
        .find(|l| l.trim_start().starts_with('['))
        .unwrap_or("[]");
    let groups: Vec<ForgetGroupJson> =
        serde_json::from_str(json).map_err(|e| format!("unexpected restic forget output: {e}"))?;
    let mut out = pb::ForgetSummary::default();
    for g in groups {
        out.kept
            .extend(g.keep.unwrap_or_default().into_iter().map(|s| s.id));
        out.removed
            .extend(g.remove.unwrap_or_default().into_iter().map(|s| s.id));
    }
    Ok(out)
}

/// `restic stats --json` (either mode).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StatsJson {
    pub total_size: u64,
    pub total_uncompressed_size: u64,
    pub total_file_count: u64,
    pub snapshots_count: u64,
    pub total_blob_count: u64,
}

/// Milliseconds since the epoch of an RFC 3339 time as restic prints it.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// How a failed restic run should be reported, from its exit code and stderr.
pub fn classify_failure(exit_code: Option<i32>, stderr: &str) -> (FailureKind, String) {
    let reason = failure_reason(stderr);
    let lower = stderr.to_ascii_lowercase();
    let kind = match exit_code {
        Some(10) => FailureKind::RepositoryNotFound,
        Some(11) => FailureKind::Locked,
        Some(12) => FailureKind::WrongPassword,
        _ if lower.contains("wrong password") || lower.contains("no key found") => FailureKind::WrongPassword,
        _ if lower.contains("repository is already locked") || lower.contains("unable to create lock") => {
            FailureKind::Locked
        }
        _ if lower.contains("config file already exists") || lower.contains("already initialized") => {
            FailureKind::RepositoryExists
        }
        _ if [
            "connection refused",
            "no such host",
            "dial tcp",
            "i/o timeout",
            "network is unreachable",
            "tls handshake",
            "context deadline exceeded",
            "the access key id you provided does not exist",
            "signaturedoesnotmatch",
            "invalidaccesskeyid",
        ]
        .iter()
        .any(|s| lower.contains(s)) =>
        {
            FailureKind::RepositoryUnreachable
        }
        // After network errors: restic asks this question for unreachable backends too.
        _ if lower.contains("is there a repository at the following location") => {
            FailureKind::RepositoryNotFound
        }
        _ => FailureKind::Restic,
    };
    (kind, reason)
}

/// Whether a restic that ended this way removed its own lock: it exited by itself with one of
/// its documented exit codes (0, 1, 3, 10, 11, 12, 130 for an interrupt), or the sandbox
/// refused the request before restic started. A signal, a Go runtime crash (exit 2) or an
/// unknown code may have left the lock.
pub fn released_its_lock(exit_code: Option<i32>, signal: Option<i32>) -> bool {
    signal.is_none()
        && exit_code.is_some_and(|c| {
            matches!(c, 0 | 1 | 3 | 10 | 11 | 12 | 130)
                || c == crate::sandbox::EXIT_REFUSED
                || c == crate::sandbox::EXIT_SETUP
        })
}

/// Errors restic retries with backoff for up to 15 minutes although no retry can help: the
/// S3 bucket does not exist (restic's `init` creates it; nothing else does).
const HOPELESS: &[&str] = &["the specified bucket does not exist", "nosuchbucket"];

/// Whether a line restic printed to stderr reports an error it would retry in vain.
pub fn hopeless(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    HOPELESS.iter().any(|h| lower.contains(h))
}

/// The error restic could not get past when `line` says it retries a request to the
/// repository (`<request>(<file>) returned error, retrying after <delay>: <error>`), without
/// the delay, which changes from line to line.
pub fn retrying(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once(" returned error, retrying after ")?;
    let (_, error) = rest.split_once(": ")?;
    Some(error.trim()).filter(|e| !e.is_empty())
}

/// Whether restic's `stderr` says that snapshot `id`, given as `--parent`, is not in the
/// repository.
pub fn no_such_snapshot(stderr: &str, id: &str) -> bool {
    let short = id.get(..8).unwrap_or(id);
    stderr.lines().any(|line| {
        let lower = line.to_ascii_lowercase();
        line.contains(&format!("failed to load snapshot {short}"))
            && ["no such file", "does not exist", "not found", "nosuchkey"]
                .iter()
                .any(|gone| lower.contains(gone))
    })
}

/// Whether `line` says restic retries opening the repository (reading its `config`): the
/// backend does not answer at all, rather than failing one request in the middle of a run.
pub fn opening(line: &str) -> bool {
    retrying(line).is_some() && line.contains("(<config/>)")
}

/// The failure a [`hopeless`] line stands for, and a sentence a user can act on.
pub fn classify_hopeless(line: &str) -> (FailureKind, String) {
    let lower = line.to_ascii_lowercase();
    if HOPELESS.iter().any(|h| lower.contains(h)) {
        return (
            FailureKind::RepositoryNotFound,
            "the repository's bucket does not exist (initializing the repository creates it)".into(),
        );
    }
    if let Some(error) = retrying(line) {
        return (
            FailureKind::RepositoryUnreachable,
            format!("the repository does not answer: {error}"),
        );
    }
    (FailureKind::Restic, line.to_owned())
}

/// The most useful sentence of restic's stderr: its `Fatal:` line, else the last line.
pub fn failure_reason(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let fatal = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("Fatal:") || l.contains("\"message_type\":\"exit_error\""));
    let line = fatal
        .or(lines.last())
        .copied()
        .unwrap_or("restic failed without a message");
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
        && let Some(m) = v.get("message").and_then(|m| m.as_str())
    {
        return m.to_string();
    }
    line.strip_prefix("Fatal: ").unwrap_or(line).to_string()
}

/// Replaces every secret value in `text` with `***`, so neither logs nor results carry them.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 3) {
        out = out.replace(s.as_str(), "***");
    }
    out
}

/// The secret values of a repository (password and every env value that looks like a key).
pub fn secrets_of(repo: &pb::Repository) -> Vec<String> {
    let mut out = vec![repo.password.clone()];
    let env: BTreeMap<_, _> = repo.env.iter().collect();
    // Values of secret-looking names, and every other value but short, common ones (a region,
    // a connection count) that would blank ordinary words: names alone miss
    // `AZURE_ACCOUNT_SAS`, `RCLONE_*_PASS`, ...
    for (k, v) in env {
        let named = ["SECRET", "KEY", "TOKEN", "PASS", "SAS"]
            .iter()
            .any(|s| k.contains(s));
        if (named || v.len() >= 8) && !v.is_empty() {
            out.push(v.clone());
        }
    }
    out
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_parent_snapshot_counts_as_forgotten() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        // restic 0.18, a local repository and an S3 one.
        let local = "{\"message_type\":\"exit_error\",\"code\":1,\"message\":\"failed to load snapshot 01234567: open /r/snapshots/0123: no such file or directory\"}";
        let s3 = "Fatal: failed to load snapshot 01234567: The specified key does not exist.";
        assert!(no_such_snapshot(local, id) && no_such_snapshot(s3, id));
        // Another snapshot, or this one unreadable for another reason, is not a forgotten one.
        assert!(!no_such_snapshot(&s3.replace("01234567", "fedcba98"), id));
        assert!(!no_such_snapshot(
            "failed to load snapshot 01234567: ciphertext verification failed",
            id
        ));
        assert!(!no_such_snapshot(
            "failed to load snapshot 01234567: context deadline exceeded",
            id
        ));
    }

    #[test]
    fn a_retried_request_is_read_as_the_backend_error_without_its_delay() {
        let refused = "Save(<data/db8214e4e4>) returned error, retrying after 1.34262233s: client.PutObject: \
                       Put \"http://127.0.0.1:19000/b/r/data/db/db82\": dial tcp 127.0.0.1:19000: connect: connection refused";
        let error = retrying(refused).unwrap();
        assert!(error.starts_with("client.PutObject: Put "), "{error}");
        assert!(error.ends_with("connect: connection refused"), "{error}");
        assert_eq!(
            classify_hopeless(refused),
            (
                FailureKind::RepositoryUnreachable,
                format!("the repository does not answer: {error}")
            )
        );
        // A missing bucket is retried too, and is what init mends.
        let bucket = "Stat(<config/>) returned error, retrying after 1.29s: Stat: The specified bucket does not exist.";
        assert_eq!(
            retrying(bucket),
            Some("Stat: The specified bucket does not exist.")
        );
        assert_eq!(classify_hopeless(bucket).0, FailureKind::RepositoryNotFound);
        assert!(opening(bucket));
        assert!(!opening(refused), "a request in the middle of a run");
        for other in [
            "Save(<data/db8214e4e4>) operation successful after 2 retries",
            "returned error, retrying after 1s:",
            "Fatal: unable to open config file",
        ] {
            assert_eq!(retrying(other), None, "{other}");
        }
    }

    #[test]
    fn only_remote_repositories_are_allowed_by_default() {
        let none = RepositoryPolicy::default();
        for ok in [
            "s3:http://127.0.0.1:9000/bucket/x",
            "rest:https://u:p@h:8000/",
            "b2:bucket:path",
        ] {
            assert_eq!(check_repository_url(ok, &none), Ok(Backend::Remote), "{ok}");
        }
        for (bad, why) in [
            ("local:/var/lib/kubelet", "--allow-local-repository-dir"),
            ("/srv/repo", "--allow-local-repository-dir"),
            ("relative/repo", "names no backend"),
            ("sftp:user@host:/srv/repo", "--allow-program-backends"),
            ("rclone:remote:path", "--allow-program-backends"),
            ("s3:http://h/b\nx", "control characters"),
        ] {
            let err = check_repository_url(bad, &none).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn local_repositories_stay_below_the_allowed_directories() {
        let policy = RepositoryPolicy {
            local_dirs: vec!["/srv/backups".into()],
            program_backends: true,
        };
        assert_eq!(
            check_repository_url("local:/srv/backups/app", &policy),
            Ok(Backend::Local("/srv/backups/app".into()))
        );
        for bad in [
            "local:/srv/backups/../../etc",
            "local:/srv/backups",
            "local:/srv/backupsx",
            "/etc",
        ] {
            assert!(check_repository_url(bad, &policy).is_err(), "{bad}");
        }
    }

    #[test]
    fn program_backends_refuse_option_injection_even_when_allowed() {
        let policy = RepositoryPolicy {
            program_backends: true,
            ..Default::default()
        };
        assert_eq!(
            check_repository_url("sftp:backup@nas.lan:/srv/restic", &policy),
            Ok(Backend::Program)
        );
        assert_eq!(
            check_repository_url("sftp://backup@nas:2222/srv", &policy),
            Ok(Backend::Program)
        );
        assert_eq!(
            check_repository_url("rclone:gdrive:restic", &policy),
            Ok(Backend::Program)
        );
        for bad in [
            "sftp:-oProxyCommand=sh@x:/p",
            "sftp:u@-oProxyCommand=x:/p",
            "rclone::sftp,ssh='sh -c id':/p",
            "rclone:-x:/p",
            "rclone:remote",
        ] {
            assert!(check_repository_url(bad, &policy).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_exclude_globs_are_clear_errors() {
        assert!(check_excludes(&["*.log".into(), "cache/**".into()]).is_ok());
        let err = check_excludes(&["foo/[a".into()]).unwrap_err();
        assert!(err.contains("foo/[a"), "{err}");
    }

    #[test]
    fn forget_args_carry_the_whole_policy_and_scope() {
        let req = pb::ForgetRequest {
            policy: Some(pb::KeepPolicy {
                last: 4,
                hourly: 48,
                daily: 7,
                weekly: 0,
                ..Default::default()
            }),
            group_by: vec!["host".into(), "tags".into()],
            host: "emby".into(),
            tags: vec!["emby".into(), "media".into()],
            dry_run: true,
            ..Default::default()
        };
        assert_eq!(
            forget_args(&req).join(" "),
            "forget --keep-last 4 --keep-hourly 48 --keep-daily 7 --group-by host,tags --host emby --tag emby,media --dry-run"
        );
        assert!(check_keep_policy(req.policy.as_ref()).is_ok());
        assert!(check_keep_policy(Some(&pb::KeepPolicy::default())).is_err());
        // No grouping is said, not left to restic's default (host,paths).
        let ungrouped = pb::ForgetRequest {
            group_by: vec![],
            ..req
        };
        let args = forget_args(&ungrouped);
        let at = args
            .iter()
            .position(|a| a == "--group-by")
            .expect("--group-by given");
        assert_eq!(args[at + 1], "");
    }

    #[test]
    fn backup_status_and_summary_lines_parse() {
        let status = r#"{"message_type":"status","seconds_elapsed":2,"seconds_remaining":3,"percent_done":0.4,"total_files":10,"files_done":4,"total_bytes":1000,"bytes_done":400,"current_files":["/data/a"]}"#;
        let Some(Message::Status(s)) = parse_line(status) else {
            panic!()
        };
        let p = s.to_progress();
        assert_eq!((p.files_done, p.total_bytes, p.seconds_remaining), (4, 1000, 3));
        assert!((p.percent_done - 40.0).abs() < 1e-9);
        let summary = r#"{"message_type":"summary","files_new":1,"files_changed":0,"files_unmodified":2,"dirs_new":1,"dirs_changed":0,"dirs_unmodified":0,"data_blobs":1,"tree_blobs":1,"data_added":10,"data_added_packed":8,"total_files_processed":3,"total_bytes_processed":30,"total_duration":0.1,"snapshot_id":"abc"}"#;
        let Some(Message::Summary(s)) = parse_line(summary) else {
            panic!()
        };
        assert_eq!((s.files_new, s.snapshot_id.as_deref()), (1, Some("abc")));
        let err = r#"{"message_type":"error","error":{"message":"open /data/x: permission denied"},"during":"archival","item":"/data/x"}"#;
        let Some(Message::Error(e)) = parse_line(err) else {
            panic!()
        };
        assert_eq!(e.item, "/data/x");
        assert!(parse_line("not json").is_none());
    }

    #[test]
    fn failures_are_classified_by_exit_code_and_message() {
        assert_eq!(
            classify_failure(Some(12), "Fatal: wrong password or no key found").0,
            FailureKind::WrongPassword
        );
        assert_eq!(classify_failure(Some(10), "").0, FailureKind::RepositoryNotFound);
        assert_eq!(classify_failure(Some(11), "").0, FailureKind::Locked);
        let (kind, reason) = classify_failure(
            Some(1),
            "some noise\nFatal: unable to open config file: Stat: Get \"http://127.0.0.1:1/b/?location=\": dial tcp 127.0.0.1:1: connect: connection refused",
        );
        assert_eq!(kind, FailureKind::RepositoryUnreachable);
        assert!(reason.starts_with("unable to open config file"), "{reason}");
    }

    #[test]
    fn secrets_never_survive_redaction() {
        let repo = pb::Repository {
            url: "s3:x".into(),
            password: "hunter22".into(),
            env: [("AWS_SECRET_ACCESS_KEY".to_string(), "s3cr3t".to_string())].into(),
        };
        let text = "password hunter22 and key s3cr3t";
        assert_eq!(redact(text, &secrets_of(&repo)), "password *** and key ***");
        let azure = pb::Repository {
            url: "azure:c:/".into(),
            password: "pw".into(),
            env: [
                ("AZURE_ACCOUNT_SAS".to_string(), "sv=2024&sig=abc".to_string()),
                ("AZURE_ACCOUNT_NAME".to_string(), "acct".to_string()),
            ]
            .into(),
        };
        assert_eq!(
            redact("sas sv=2024&sig=abc for acct", &secrets_of(&azure)),
            "sas *** for acct"
        );
    }

    #[test]
    fn restic_times_convert_to_unix_milliseconds() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2024-01-15T02:00:00.5+01:00"),
            Some(1_705_280_400_500)
        );
        assert_eq!(
            parse_rfc3339_ms("2024-01-15T01:00:00.123456789Z"),
            Some(1_705_280_400_123)
        );
    }

    #[test]
    fn stages_follow_restics_status_lines_to_the_upload_at_the_end() {
        let status = |done: u64, total: u64, eta: u64| {
            let line = format!(
                r#"{{"message_type":"status","percent_done":{},"bytes_done":{done},"total_bytes":{total},"seconds_remaining":{eta}}}"#,
                done as f64 / total.max(1) as f64
            );
            match parse_line(&line) {
                Some(Message::Status(s)) => s,
                other => panic!("{other:?}"),
            }
        };
        let mut stages = Stages::default();
        // The scanner still counts: no estimate yet.
        assert_eq!(stages.stage(false, &status(10, 100, 0)), "scanning");
        // Counted: restic estimates the time left.
        assert_eq!(stages.stage(false, &status(50, 1000, 20)), "reading");
        // The estimate runs out before the end: still reading.
        assert_eq!(stages.stage(false, &status(990, 1000, 0)), "reading");
        // Everything read, the process still running: the last packs go out.
        assert_eq!(stages.stage(false, &status(1000, 1000, 0)), "uploading");
        // A backup too small for an estimate still reaches the upload.
        assert_eq!(Stages::default().stage(false, &status(5, 5, 0)), "uploading");
        assert_eq!(Stages::default().stage(true, &status(5, 10, 3)), "restoring");
    }
}
