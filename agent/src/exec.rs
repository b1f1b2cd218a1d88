//! Running one restic process: in its sandbox and cgroup, with the repository's credentials in
//! its environment only, its `--json` output turned into throttled typed events, and cancel or
//! shutdown stopping it with SIGTERM and then SIGKILL after a grace period.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use restic_operator_proto::v1::{self as pb, RunKind, run_event::Event};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::cgroup::Cgroups;
use crate::locks::{self, Holder, Holders};
use crate::restic::{self, Backend, ErrorMessage, Message, RepositoryPolicy, Summary};
use crate::runs::Run;
use crate::sandbox::{Access, Bind, CACHE_IN_SANDBOX, CacheLayer, Spec, VolumeBind};

/// Largest stdout kept for commands whose output is one JSON document (snapshots, forget).
const MAX_STDOUT: usize = 64 << 20;
use restic_operator_proto::MAX_FAILED_PATHS;

/// stderr lines kept to explain a failure.
const STDERR_TAIL: usize = 40;
/// The step name of the `restic unlock` that removes a dead run's locks.
const DEAD_LOCKS_STEP: &str = "unlock-dead";
/// How often a restic process that keeps retrying says so again (`Retrying` events).
const RETRYING_EVERY: Duration = Duration::from_secs(30);
/// How often the caches no run used for a month are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// What the agent needs to run restic; fixed at start-up.
pub struct Executor {
    pub restic: PathBuf,
    /// This binary, started again as `sandbox` for each restic process.
    pub agent_exe: PathBuf,
    pub cgroups: Cgroups,
    pub default_memory_limit: u64,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub grace: Duration,
    pub progress_interval: Duration,
    /// Which repositories besides remote ones this node allows.
    pub repositories: RepositoryPolicy,
    /// restic processes that may hold locks: running, or killed (see [`crate::locks`]).
    pub holders: Holders,
    /// The host names of the restic processes running now, whose locks are live.
    pub live: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Held while the locks of dead processes are removed, so each is removed once.
    pub clearing: tokio::sync::Mutex<()>,
    /// The snapshot each backup identity made last on this node: its next parent.
    pub parents: crate::parents::Parents,
    /// When the caches no run used for a month were last looked for.
    pub swept: std::sync::Mutex<Option<Instant>>,
    /// The caches runs are using now: never trimmed or removed under them.
    pub caches_in_use: crate::cache::InUse,
}

/// Why restic did not run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request is not allowed here (its repository URL); the message says why.
    #[error("{0}")]
    Refused(String),
    /// The agent could not start the sandbox.
    #[error("{0:#}")]
    Start(#[from] anyhow::Error),
    /// The agent's state directory, where restic keeps its temporary packs and its cache, is
    /// (nearly) full.
    #[error("{0}")]
    NoSpace(String),
}

/// Free space a run needs in the agent's state directory: restic writes a few packs (16 MiB
/// each by default) there before uploading them.
pub const MIN_FREE_BYTES: u64 = 64 << 20;

/// One restic invocation.
pub struct Invocation<'a> {
    pub run: &'a Run,
    pub repo: &'a pb::Repository,
    pub options: &'a pb::RunOptions,
    /// Subcommand and its arguments (`backup --host x /data`).
    pub args: Vec<String>,
    /// Volumes (or paths inside them) to show restic.
    pub volumes: Vec<VolumeBind>,
    /// What restic may do beyond talking to the repository.
    pub access: Access,
    /// Parse stdout line by line into events (backup, restore) rather than collecting it.
    pub stream: bool,
    /// A label for the cgroup and scratch names (`<run-id>-<step>`).
    pub step: &'a str,
}

/// How the process ended and what it said.
#[derive(Debug, Default)]
pub struct Output {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub summary: Option<Summary>,
    /// The first `MAX_FAILED_PATHS` errors restic reported per file; `error_total` counts all.
    pub errors: Vec<ErrorMessage>,
    pub error_total: u64,
    pub stderr: String,
    pub oom_killed: bool,
    pub cancelled: bool,
    /// Stopped because it ran longer than the request's timeout.
    pub timed_out: bool,
    /// Stopped because it reported an error it would only retry in vain (see
    /// [`restic::hopeless`]); the line that said so.
    pub hopeless: Option<String>,
    pub peak_memory: u64,
}

impl Output {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

impl Executor {
    /// Runs restic and waits for it. Errors are a refused repository or the agent's own (cannot
    /// start the sandbox); restic's failures are in the `Output`.
    pub async fn run(&self, inv: Invocation<'_>) -> Result<Output, ExecError> {
        let backend =
            restic::check_repository_url(&inv.repo.url, &self.repositories).map_err(ExecError::Refused)?;
        self.check_space()?;
        if inv.args.iter().any(|a| a == "--no-lock") {
            // It takes no lock (the probe): nothing to record, nothing in its way.
            return self
                .run_checked(&inv, &backend, &locks::fresh_host(), 0, &inv.run.cancel)
                .await
                .map_err(ExecError::Start);
        }
        self.clear_dead_locks(&inv, &backend).await;
        // Recorded before it starts, under a host name never used before: if it dies holding a
        // lock, even with the agent, the next call finds exactly its locks.
        let holder = Holder {
            run_id: inv.run.id.clone(),
            repository_url: inv.repo.url.clone(),
            hostname: locks::fresh_host(),
        };
        self.holders.record(&holder).map_err(|e| {
            ExecError::Start(anyhow::anyhow!(
                "record the restic process on the state disk: {e}"
            ))
        })?;
        self.live.lock().expect("live").insert(holder.hostname.clone());
        let out = self
            .run_checked(&inv, &backend, &holder.hostname, 0, &inv.run.cancel)
            .await;
        // kill_on_drop and the sandbox's lifeline: the process is gone now, whatever happened.
        self.live.lock().expect("live").remove(&holder.hostname);
        match &out {
            Ok(o) if !restic::released_its_lock(o.exit_code, o.signal) => {
                let _ = self.holders.record(&holder);
                self.clear_dead_locks(&inv, &backend).await;
            }
            _ => self.holders.cleared(&holder.hostname),
        }
        let out = out?;
        if out
            .stderr
            .to_ascii_lowercase()
            .contains("no space left on device")
        {
            // The disk filled up while restic ran (the volume itself is only read).
            self.check_space()?;
        }
        Ok(out)
    }

    /// Refuses to start restic when the state directory has less than [`MIN_FREE_BYTES`]
    /// free, with a reason that names it.
    fn check_space(&self) -> Result<(), ExecError> {
        let Ok(fs) = nix::sys::statvfs::statvfs(&self.state_dir) else {
            return Ok(());
        };
        let free = fs.blocks_available().saturating_mul(fs.fragment_size());
        if free >= MIN_FREE_BYTES {
            return Ok(());
        }
        Err(ExecError::NoSpace(format!(
            "the agent's state directory {} is full: {} MiB free, and restic needs at least {} MiB \
             there for its temporary packs and cache; free space on that disk (or give the agent \
             a larger one)",
            self.state_dir.display(),
            free >> 20,
            MIN_FREE_BYTES >> 20
        )))
    }

    /// Removes the locks that killed runs left in `inv`'s repository (see [`crate::locks`]),
    /// with `inv`'s credentials: `restic unlock` under each dead run's host name. A failure
    /// keeps the record for the next call; the operation itself goes ahead either way, and
    /// restic reports a lock that is still in its way.
    async fn clear_dead_locks(&self, inv: &Invocation<'_>, backend: &Backend) {
        let dead = || {
            let live = self.live.lock().expect("live").clone();
            let mut all = self.holders.of_repository(&inv.repo.url);
            all.retain(|h| !live.contains(&h.hostname));
            all
        };
        if dead().is_empty() {
            return;
        }
        let _one_at_a_time = self.clearing.lock().await;
        for dead in dead() {
            let mut args = vec!["unlock".to_string()];
            if let Some(o) = &inv.options.restic {
                args.extend(
                    o.extra_args
                        .iter()
                        .filter(|a| restic_operator_args::applies_to(restic_operator_args::Op::Unlock, a))
                        .cloned(),
                );
            }
            // Not the run's own limits (a run killed for its memory limit must not fail here
            // for the same reason), and as root, whoever the dead process ran as.
            let options = pb::RunOptions {
                memory_limit_bytes: 0,
                timeout_seconds: 60,
                run_as_user: None,
                run_as_group: None,
                ..inv.options.clone()
            };
            let unlock = Invocation {
                run: inv.run,
                repo: inv.repo,
                options: &options,
                args,
                volumes: Vec::new(),
                access: Access::Repository,
                stream: false,
                step: DEAD_LOCKS_STEP,
            };
            // Not the run's cancel: a run cancelled and then killed still gets its locks removed.
            let never = tokio_util::sync::CancellationToken::new();
            match self
                .run_checked(&unlock, backend, &dead.hostname, 1, &never)
                .await
            {
                Ok(out) if out.success() => {
                    self.holders.cleared(&dead.hostname);
                    tracing::info!(run_id = %inv.run.id, dead_run = %dead.run_id, "removed the locks of a killed restic");
                    inv.run.emit(Event::Log(pb::LogLine {
                        line: format!(
                            "removed the repository locks left by run {}, whose restic was killed",
                            dead.run_id
                        ),
                    }));
                }
                Ok(out) => {
                    tracing::warn!(dead_run = %dead.run_id, code = ?out.exit_code, stderr = %out.stderr, "cannot remove the locks of a killed restic yet")
                }
                Err(e) => {
                    tracing::warn!(dead_run = %dead.run_id, error = %format!("{e:#}"), "cannot remove the locks of a killed restic yet")
                }
            }
        }
    }

    /// Runs `inv` as the restic process whose host name is `hostname`, with PID
    /// `2 + spare_pids` in its namespace, stopped when `cancel` fires.
    async fn run_checked(
        &self,
        inv: &Invocation<'_>,
        backend: &Backend,
        hostname: &str,
        spare_pids: u32,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Output> {
        let secrets = restic::secrets_of(inv.repo);
        let scratch = self
            .state_dir
            .join("scratch")
            .join(format!("{}-{}", inv.run.id, inv.step));
        let root = scratch.join("root");
        let tmp = scratch.join("tmp");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&tmp)?;
        let layer = scratch.join("cache-layer");
        let _cleanup = Scratch {
            dir: scratch.clone(),
            root: root.clone(),
            tmp: tmp.clone(),
            layer: layer.clone(),
        };

        let user = inv
            .options
            .run_as_user
            .map(|uid| (uid, inv.options.run_as_group.unwrap_or(uid)));
        let cache = self.cache_dir.join(crate::cache::key(&inv.repo.url, user));
        let use_cache = inv.options.restic.as_ref().is_some_and(|o| o.use_cache);
        // A restore writes into a volume its pod may change under it; a symlink swapped in
        // there could send restic's writes anywhere writable in the sandbox, and the cache is
        // shared with the repository's other runs. So a restore reads the cache through a
        // layer of its own that takes every write and goes with the run.
        let layered = (use_cache && inv.access == Access::WriteVolume).then(|| CacheLayer {
            lower: cache.clone(),
            upper: layer.join("upper"),
            work: layer.join("work"),
        });
        if use_cache {
            std::fs::create_dir_all(&cache)?;
        }
        if let Some(l) = &layered {
            std::fs::create_dir_all(&l.upper)?;
            std::fs::create_dir_all(&l.work)?;
        }
        // In use from before restic starts until it is gone, whatever happens in between.
        let cache_use = use_cache.then(|| CacheUse::enter(&self.caches_in_use, &cache));
        let mut spec = Spec::minimal(root, &self.restic, &tmp, inv.access, hostname.to_string())
            .with_volumes(inv.volumes.clone());
        spec.spare_pids = spare_pids;
        match &layered {
            Some(l) => spec = spec.with_cache_layer(l.clone()),
            None if use_cache => spec = spec.with_cache(&cache),
            None => {}
        }
        match backend {
            Backend::Remote => {}
            Backend::Program => spec = spec.with_system_dirs(),
            Backend::Local(dir) => {
                // The repository's directory (or, before init, its parent, which is still below
                // an allowed directory), at the same path inside.
                let dir = if dir.exists() {
                    dir.clone()
                } else {
                    dir.parent().unwrap_or(Path::new("/")).to_path_buf()
                };
                spec = spec.with_bind(Bind {
                    source: dir.clone(),
                    target: dir,
                    read_only: false,
                });
            }
        }
        let memory = match inv.options.memory_limit_bytes {
            0 => self.default_memory_limit,
            n => n,
        };
        // The pid keeps names apart when several agents share a parent cgroup.
        let cgroup_name = format!("{}-{}-{}", inv.run.id, inv.step, std::process::id());
        let cgroup = self.cgroups.create(&cgroup_name, memory)?;
        spec.cgroup_procs = cgroup.as_ref().map(|c| c.procs_file());
        if let Some(uid) = inv.options.run_as_user {
            let gid = inv.options.run_as_group.unwrap_or(uid);
            spec.run_as = Some((uid, gid));
            // restic writes its temporary packs and cache as that user.
            let owner = (
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            );
            nix::unistd::chown(&tmp, owner.0, owner.1)?;
            if use_cache {
                nix::unistd::chown(&cache, owner.0, owner.1)?;
            }
            if let Some(l) = &layered {
                nix::unistd::chown(&l.upper, owner.0, owner.1)?;
            }
        }
        let default_opts = pb::ResticOptions::default();
        let opts = inv.options.restic.as_ref().unwrap_or(&default_opts);
        spec.args = restic::common_args(opts, use_cache.then_some(CACHE_IN_SANDBOX));
        spec.args.extend(inv.args.iter().cloned());

        let mut cmd = Command::new(&self.agent_exe);
        cmd.arg("sandbox")
            .arg(serde_json::to_string(&spec)?)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/tmp")
            .env("TMPDIR", "/tmp")
            .env("RESTIC_REPOSITORY", &inv.repo.url)
            .env("RESTIC_PASSWORD", &inv.repo.password)
            .env("RESTIC_PROGRESS_FPS", "2")
            .envs(&inv.repo.env)
            // Never written: while it is open the sandbox knows the agent is alive.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = cmd.spawn()?;
        let pid = child.id().map(|p| Pid::from_raw(p as i32));
        let _lifeline = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");

        let run = inv.run;
        let stream = inv.stream;
        let interval = self.progress_interval;
        let read_stdout = async {
            let mut out = Output::default();
            let mut lines = BufReader::new(stdout).lines();
            let mut last_progress: Option<Instant> = None;
            let mut pending: Option<pb::Progress> = None;
            let mut stages = restic::Stages::default();
            let restore = run.kind == RunKind::Restore;
            while let Ok(Some(line)) = lines.next_line().await {
                if !stream {
                    if out.stdout.len() + line.len() < MAX_STDOUT {
                        out.stdout.push_str(&line);
                        out.stdout.push('\n');
                    }
                    continue;
                }
                match restic::parse_line(&line) {
                    Some(Message::Status(s)) => {
                        let mut p = s.to_progress();
                        p.stage = stages.stage(restore, &s).into();
                        if p.stage == "uploading" {
                            p.seconds_remaining = 0;
                        }
                        if last_progress.is_none_or(|t| t.elapsed() >= interval) {
                            run.emit(Event::Progress(p));
                            last_progress = Some(Instant::now());
                            pending = None;
                        } else {
                            pending = Some(p);
                        }
                    }
                    Some(Message::Summary(s)) => out.summary = Some(*s),
                    Some(Message::Error(e)) => {
                        out.error_total += 1;
                        keep_error(run, &mut out.errors, e, &secrets);
                    }
                    Some(_) => {}
                    None => run.emit(Event::Log(pb::LogLine {
                        line: restic::redact(&line, &secrets),
                    })),
                }
            }
            if let Some(p) = pending {
                run.emit(Event::Progress(p));
            }
            out
        };
        // Set when restic reports an error it would retry until its deadline for nothing. Not
        // for init, which is what mends a missing bucket.
        let watch_hopeless = inv.args.first().map(String::as_str) != Some("init");
        // A probe (`cat config`) asks whether the repository answers now, and removing a dead
        // run's locks can wait for the next call: restic retrying means the repository does not
        // answer, and the caller should hear so at once rather than in 15 minutes. Statistics,
        // read again later anyway, give up only when the repository does not open at all (a
        // blip in the middle of a long read is retried). Other commands, and the unlock before
        // a forget, prune or check, keep restic's own retries.
        let command = inv.args.first().map(String::as_str);
        let fail_on_retry = command == Some("cat") || inv.step == DEAD_LOCKS_STEP;
        let fail_on_opening = command == Some("stats");
        let give_up = tokio_util::sync::CancellationToken::new();
        let mut hopeless = None;
        let read_stderr = async {
            let mut tail: Vec<String> = Vec::new();
            let mut errors = Vec::new();
            let mut total = 0u64;
            let mut retried: Option<Instant> = None;
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let line = restic::redact(&line, &secrets);
                if let Some(Message::Error(e)) = restic::parse_line(&line) {
                    total += 1;
                    keep_error(run, &mut errors, e, &secrets);
                    continue;
                }
                if watch_hopeless && hopeless.is_none() && restic::hopeless(&line) {
                    hopeless = Some(line.clone());
                    give_up.cancel();
                }
                if let Some(error) = restic::retrying(&line) {
                    if retried.is_none_or(|t| t.elapsed() >= RETRYING_EVERY) {
                        retried = Some(Instant::now());
                        tracing::warn!(run_id = %run.id, %error, "restic cannot reach the repository; it retries");
                        let message = error.to_owned();
                        run.emit(Event::Retrying(pb::Retrying { message }));
                    }
                    if (fail_on_retry || (fail_on_opening && restic::opening(&line))) && hopeless.is_none() {
                        hopeless = Some(line.clone());
                        give_up.cancel();
                    }
                }
                run.emit(Event::Log(pb::LogLine { line: line.clone() }));
                tail.push(line);
                if tail.len() > STDERR_TAIL {
                    tail.remove(0);
                }
            }
            (tail.join("\n"), (errors, total))
        };
        let grace = self.grace;
        let timeout = match inv.options.timeout_seconds {
            0 => Duration::from_secs(u64::MAX / 4),
            n => Duration::from_secs(u64::from(n)),
        };
        let mut timed_out = false;
        let wait = async {
            tokio::select! {
                status = child.wait() => (status, false),
                _ = async {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = give_up.cancelled() => {}
                        _ = tokio::time::sleep(timeout) => timed_out = true,
                    }
                } => {
                    if let Some(pid) = pid {
                        let _ = kill(pid, Signal::SIGTERM);
                    }
                    match tokio::time::timeout(grace, child.wait()).await {
                        Ok(status) => (status, true),
                        Err(_) => {
                            tracing::warn!(run_id = %run.id, "restic ignored SIGTERM for {grace:?}; killing it");
                            let _ = child.start_kill();
                            (child.wait().await, true)
                        }
                    }
                }
            }
        };
        let (mut out, (stderr_tail, (stderr_errors, stderr_total)), (status, cancelled)) =
            tokio::join!(read_stdout, read_stderr, wait);
        let status = status?;
        let room = MAX_FAILED_PATHS.saturating_sub(out.errors.len());
        out.errors.extend(stderr_errors.into_iter().take(room));
        out.error_total += stderr_total;
        out.stderr = stderr_tail;
        out.exit_code = status.code();
        out.signal = std::os::unix::process::ExitStatusExt::signal(&status);
        out.hopeless = hopeless;
        out.cancelled = cancelled && !timed_out && out.hopeless.is_none();
        out.timed_out = timed_out;
        if let Some(cg) = &cgroup {
            // Nothing restic started may outlive it.
            cg.kill_all();
            out.oom_killed = cg.oom_killed();
            out.peak_memory = cg.peak_memory();
        }
        tracing::debug!(run_id = %run.id, step = inv.step, code = ?out.exit_code, elapsed = ?started.elapsed(), "restic exited");
        if let Some(l) = &layered {
            let fetched = crate::cache::count_files(&l.upper);
            tracing::info!(run_id = %run.id, fetched, "a restore read the repository's cache; what restic fetched besides went to the run's own layer, removed with it");
        }
        if let Some(cache_use) = cache_use {
            let last = cache_use.leave();
            self.tend_cache(cache, last, opts.cache_size_bytes).await;
        }
        Ok(out)
    }

    /// After a run that used the cache `dir`: if it was the `last` run using it, keeps it
    /// within `limit` bytes (0: no limit); and now and then removes the caches no run has used
    /// for a month.
    async fn tend_cache(&self, dir: PathBuf, last: bool, limit: u64) {
        let root = self.cache_dir.clone();
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let sweep = {
            let mut last = self.swept.lock().expect("swept");
            let due = last.is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        // Moved aside here, under the in-use lock; removed below, off the runtime.
        let moved = match sweep {
            true => crate::cache::sweep(&root, crate::cache::UNUSED_FOR, &self.caches_in_use),
            false => Vec::new(),
        };
        let work = tokio::task::spawn_blocking(move || {
            crate::cache::remove_moved(&moved);
            for (name, _) in &moved {
                tracing::info!(cache = %name, "removed a repository cache no run used for 30 days");
            }
            (last && limit > 0).then(|| crate::cache::trim(&dir, limit))
        });
        match work.await {
            Ok(Some(Ok(t))) if t.files_removed > 0 => {
                tracing::info!(cache = %name, before = t.bytes_before, after = t.bytes_after, removed = t.files_removed, "trimmed a repository cache to its size limit")
            }
            Ok(Some(Err(e))) => tracing::warn!(error = %e, "cannot trim a repository cache"),
            _ => {}
        }
    }
}

/// A run's use of a cache, left when it is dropped if not before.
struct CacheUse<'a> {
    in_use: &'a crate::cache::InUse,
    dir: PathBuf,
    left: bool,
}

impl<'a> CacheUse<'a> {
    fn enter(in_use: &'a crate::cache::InUse, dir: &Path) -> Self {
        in_use.enter(dir);
        Self {
            in_use,
            dir: dir.to_path_buf(),
            left: false,
        }
    }

    /// Whether this was the last run using the cache.
    fn leave(mut self) -> bool {
        self.left = true;
        self.in_use.leave(&self.dir)
    }
}

impl Drop for CacheUse<'_> {
    fn drop(&mut self) {
        if !self.left {
            self.in_use.leave(&self.dir);
        }
    }
}

/// Keeps the first `MAX_FAILED_PATHS` errors, each also sent as a warning event: a volume
/// with millions of unreadable files must not grow the run's memory, its event history or
/// its result without bound.
fn keep_error(run: &Run, kept: &mut Vec<ErrorMessage>, e: ErrorMessage, secrets: &[String]) {
    if kept.len() < MAX_FAILED_PATHS {
        emit_warning(run, &e, secrets);
        kept.push(e);
    } else if kept.len() == MAX_FAILED_PATHS {
        // Said once: the extra error kept marks that it was.
        run.emit(Event::Log(pb::LogLine {
            line: format!("more than {MAX_FAILED_PATHS} files failed; further ones are counted, not listed"),
        }));
        kept.push(e);
    }
}

fn emit_warning(run: &Run, e: &ErrorMessage, secrets: &[String]) {
    run.emit(Event::Warning(pb::Warning {
        path: e.item.clone(),
        message: restic::redact(&e.error.message, secrets),
    }));
}

/// The per-process scratch space on the host. The sandbox root is only ever a mount point
/// inside restic's own namespace, so on the host it is an empty directory: it is removed with
/// `remove_dir`, never recursively, so that a mount that somehow leaked could not take a
/// volume's data with it.
struct Scratch {
    dir: PathBuf,
    root: PathBuf,
    tmp: PathBuf,
    layer: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
        let _ = std::fs::remove_dir_all(&self.layer);
        if let Err(e) = std::fs::remove_dir(&self.root) {
            tracing::error!(root = %self.root.display(), error = %e, "sandbox root is not empty on the host; leaving it");
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
