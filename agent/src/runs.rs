//! The registry of runs: idempotent start (a known run id attaches instead of starting again),
//! a lossless event history that late or returning callers replay, a per-agent concurrency
//! limit with a queue, cancellation, and finished runs kept for a while so their results stay
//! queryable. Runs in flight are recorded on disk, so after an agent restart they are reported
//! as failed with a reason instead of silently vanishing, and so are finished runs with their
//! results: a coordinator that asks after a restart gets the result, not "unknown run" (which
//! would let it start the run again and make a second snapshot).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;
use restic_operator_proto::v1::{self as pb, FailureKind, Outcome, RunKind, RunState, run_event::Event};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Log lines kept per run (older ones are dropped from the replay history, not from the logs).
const MAX_LOG_EVENTS: usize = 500;
/// Warnings kept per run; the final result still lists every failed path.
const MAX_WARNING_EVENTS: usize = 1000;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Run ids come from the caller; keep them to what is safe in file and cgroup names.
pub fn validate_run_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err("run id must be 1 to 128 characters".into());
    }
    if id.starts_with('.')
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "run id {id:?} may only contain letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// One run and its history.
pub struct Run {
    pub id: String,
    pub kind: RunKind,
    pub repository_url: String,
    pub volume: Option<pb::VolumeRef>,
    pub cancel: CancellationToken,
    /// Set when the agent itself stops (SIGTERM), so a cancelled run says why.
    stopping: std::sync::atomic::AtomicBool,
    created_ms: i64,
    state: Mutex<RunData>,
    /// The number of events so far; subscribers wait on changes.
    len: watch::Sender<u64>,
}

#[derive(Default)]
struct RunData {
    events: Vec<pb::RunEvent>,
    next_seq: u64,
    state: i32,
    started_ms: i64,
    finished_ms: i64,
    finished_at: Option<Instant>,
    progress: Option<pb::Progress>,
    result: Option<pb::Result>,
    logs: usize,
    warnings: usize,
}

impl Run {
    fn new(id: String, kind: RunKind, repository_url: String, volume: Option<pb::VolumeRef>) -> Self {
        Self {
            id,
            kind,
            repository_url,
            volume,
            cancel: CancellationToken::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            created_ms: now_ms(),
            state: Mutex::new(RunData {
                state: RunState::Queued as i32,
                ..Default::default()
            }),
            len: watch::channel(0).0,
        }
    }

    /// A finished run as an earlier agent process recorded it (see [`Runs::record_finished`]).
    fn restored(info: pb::RunInfo) -> Option<Self> {
        let result = info.result?;
        let kind = RunKind::try_from(info.kind).unwrap_or(RunKind::Unspecified);
        let mut run = Self::new(info.run_id, kind, info.repository_url, info.volume);
        run.created_ms = info.created_unix_ms;
        run.emit(Event::Result(result));
        let age = Duration::from_millis(u64::try_from(now_ms() - info.finished_unix_ms).unwrap_or(0));
        let mut d = run.state.lock().unwrap();
        d.started_ms = info.started_unix_ms;
        d.finished_ms = info.finished_unix_ms;
        d.finished_at = Some(Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
        d.progress = info.progress;
        drop(d);
        Some(run)
    }

    /// Appends an event. Consecutive progress events are coalesced, and logs and warnings are
    /// capped, so the history of a ten-hour backup stays small.
    pub fn emit(&self, mut event: Event) {
        if let Event::Result(r) = &mut event
            && r.outcome == Outcome::Cancelled as i32
            && self.stopping.load(std::sync::atomic::Ordering::Relaxed)
        {
            r.reason = format!(
                "the agent stopped while the run was in flight (its pod was deleted, evicted or \
                 replaced, or its node is shutting down): {}",
                r.reason
            );
        }
        let mut d = self.state.lock().unwrap();
        if d.result.is_some() {
            return; // nothing follows the result
        }
        match &event {
            Event::Progress(p) => d.progress = Some(p.clone()),
            Event::Started(_) => {
                d.state = RunState::Running as i32;
                d.started_ms = now_ms();
            }
            Event::Log(_) => {
                d.logs += 1;
                if d.logs > MAX_LOG_EVENTS {
                    return;
                }
            }
            Event::Warning(_) => {
                d.warnings += 1;
                if d.warnings > MAX_WARNING_EVENTS {
                    return;
                }
            }
            Event::Result(r) => {
                d.result = Some(r.clone());
                d.state = RunState::Finished as i32;
                d.finished_ms = now_ms();
                d.finished_at = Some(Instant::now());
            }
            Event::Queued(_) | Event::Retrying(_) => {}
        }
        let seq = d.next_seq;
        d.next_seq += 1;
        let ev = pb::RunEvent {
            run_id: self.id.clone(),
            seq,
            unix_ms: now_ms(),
            event: Some(event),
        };
        let coalesce = matches!(ev.event, Some(Event::Progress(_)))
            && matches!(
                d.events.last().and_then(|e| e.event.as_ref()),
                Some(Event::Progress(_))
            );
        if coalesce {
            *d.events.last_mut().unwrap() = ev;
        } else {
            d.events.push(ev);
        }
        let n = d.next_seq;
        drop(d);
        self.len.send_replace(n);
    }

    #[cfg(test)]
    pub fn result(&self) -> Option<pb::Result> {
        self.state.lock().unwrap().result.clone()
    }

    pub fn is_finished(&self) -> bool {
        self.state.lock().unwrap().result.is_some()
    }

    pub fn info(&self) -> pb::RunInfo {
        let d = self.state.lock().unwrap();
        pb::RunInfo {
            run_id: self.id.clone(),
            kind: self.kind as i32,
            state: d.state,
            created_unix_ms: self.created_ms,
            started_unix_ms: d.started_ms,
            finished_unix_ms: d.finished_ms,
            progress: d.progress.clone(),
            result: d.result.clone(),
            repository_url: self.repository_url.clone(),
            volume: self.volume.clone(),
        }
    }

    /// Events with `seq >= from` (the history may have coalesced some progress events away).
    fn events_from(&self, from: u64) -> Vec<pb::RunEvent> {
        let d = self.state.lock().unwrap();
        d.events.iter().filter(|e| e.seq >= from).cloned().collect()
    }

    /// A stream of the whole run: history first, then live events, ending after the result.
    pub fn subscribe(self: &Arc<Self>) -> impl tokio_stream::Stream<Item = pb::RunEvent> + Send + 'static {
        let run = Arc::clone(self);
        let mut rx = self.len.subscribe();
        async_stream(move |tx| async move {
            let mut next = 0u64;
            loop {
                let events = run.events_from(next);
                for ev in events {
                    next = ev.seq + 1;
                    let done = matches!(ev.event, Some(Event::Result(_)));
                    if tx.send(ev).await.is_err() || done {
                        return;
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}

/// A minimal stream from a producer task (the run keeps going if the consumer goes away).
fn async_stream<F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<pb::RunEvent>
where
    F: FnOnce(tokio::sync::mpsc::Sender<pb::RunEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// On-disk marker of a run in flight.
#[derive(Serialize, Deserialize)]
struct InFlight {
    id: String,
    kind: i32,
    repository_url: String,
    started_ms: i64,
}

pub struct Runs {
    runs: Mutex<HashMap<String, Arc<Run>>>,
    slots: Arc<Semaphore>,
    queued: AtomicU64,
    keep_finished: Duration,
    state_dir: PathBuf,
    pub metrics: Arc<Metrics>,
}

impl Runs {
    /// A registry allowing `max_concurrent` runs at once; runs in flight when the agent last
    /// stopped are loaded from `state_dir` as failed.
    pub fn new(
        max_concurrent: usize,
        keep_finished: Duration,
        state_dir: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let runs = Arc::new(Self {
            runs: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            queued: AtomicU64::new(0),
            keep_finished,
            state_dir,
            metrics,
        });
        runs.recover();
        runs
    }

    fn in_flight_dir(&self) -> PathBuf {
        self.state_dir.join("runs")
    }

    fn finished_dir(&self) -> PathBuf {
        self.state_dir.join("finished")
    }

    fn finished_file(&self, id: &str) -> PathBuf {
        self.finished_dir().join(format!("{id}.pb"))
    }

    /// Writes a finished run (its info with the result) to the state directory, where the
    /// next agent process finds it. Written to a temporary file first, so a crash never
    /// leaves half a record.
    fn record_finished(&self, run: &Run) {
        let path = self.finished_file(&run.id);
        let partial = path.with_extension("partial");
        let written = std::fs::create_dir_all(self.finished_dir())
            .and_then(|()| std::fs::write(&partial, run.info().encode_to_vec()))
            .and_then(|()| std::fs::rename(&partial, &path));
        if let Err(e) = written {
            tracing::warn!(run_id = %run.id, error = %e, "cannot record the finished run; an agent restart would forget its result");
        }
    }

    /// Loads the finished runs earlier agent processes recorded, dropping those older than
    /// the retention time.
    fn recover_finished(&self) {
        let Ok(entries) = std::fs::read_dir(self.finished_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let run = std::fs::read(&path)
                .ok()
                .filter(|_| path.extension().is_some_and(|e| e == "pb"))
                .and_then(|bytes| pb::RunInfo::decode(bytes.as_slice()).ok())
                .and_then(Run::restored);
            match run {
                Some(run) if !self.expired(&run) => {
                    self.runs.lock().unwrap().insert(run.id.clone(), Arc::new(run));
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    fn expired(&self, run: &Run) -> bool {
        let d = run.state.lock().unwrap();
        d.finished_at.is_some_and(|t| t.elapsed() >= self.keep_finished)
    }

    fn recover(&self) {
        self.recover_finished();
        let Ok(entries) = std::fs::read_dir(self.in_flight_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let _ = std::fs::remove_file(entry.path());
            let Ok(rec) = serde_json::from_str::<InFlight>(&text) else {
                continue;
            };
            if self.runs.lock().unwrap().contains_key(&rec.id) {
                continue; // it finished, and its result was recorded, just before the stop
            }
            let kind = RunKind::try_from(rec.kind).unwrap_or(RunKind::Unspecified);
            let run = Arc::new(Run::new(rec.id.clone(), kind, rec.repository_url, None));
            run.emit(Event::Result(pb::Result {
                outcome: Outcome::Failed as i32,
                failure: FailureKind::AgentRestarted as i32,
                reason: "the agent restarted while this run was in flight; restic was stopped with it".into(),
                duration_ms: (now_ms() - rec.started_ms).max(0) as u64,
                ..Default::default()
            }));
            tracing::warn!(run_id = %rec.id, "run was in flight when the agent stopped; marked failed");
            self.record_finished(&run);
            self.runs.lock().unwrap().insert(rec.id, run);
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Run>> {
        self.gc();
        self.runs.lock().unwrap().get(id).cloned()
    }

    pub fn list(&self) -> Vec<pb::RunInfo> {
        self.gc();
        let mut out: Vec<_> = self.runs.lock().unwrap().values().map(|r| r.info()).collect();
        out.sort_by_key(|r| r.created_unix_ms);
        out
    }

    pub fn queue_len(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Forgets runs finished longer ago than the retention time, and their records.
    fn gc(&self) {
        let mut expired = Vec::new();
        self.runs.lock().unwrap().retain(|id, r| {
            let keep = !self.expired(r);
            if !keep {
                expired.push(id.clone());
            }
            keep
        });
        for id in expired {
            let _ = std::fs::remove_file(self.finished_file(&id));
        }
    }

    /// Starts `job` as run `id`, or returns the existing run of that id (`true` = attached).
    /// The job waits for a free slot first; it receives the run to emit events on.
    pub fn start_or_attach<F, Fut>(
        self: &Arc<Self>,
        id: &str,
        kind: RunKind,
        repository_url: &str,
        volume: Option<pb::VolumeRef>,
        job: F,
    ) -> (Arc<Run>, bool)
    where
        F: FnOnce(Arc<Run>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = pb::Result> + Send + 'static,
    {
        self.gc();
        let mut runs = self.runs.lock().unwrap();
        if let Some(run) = runs.get(id) {
            return (Arc::clone(run), true);
        }
        let run = Arc::new(Run::new(id.to_string(), kind, repository_url.to_string(), volume));
        runs.insert(id.to_string(), Arc::clone(&run));
        drop(runs);

        let this = Arc::clone(self);
        let r = Arc::clone(&run);
        tokio::spawn(async move {
            let position = this.queued.fetch_add(1, Ordering::Relaxed) + 1;
            this.metrics.queue_length.set(this.queue_len() as i64);
            r.emit(Event::Queued(pb::Queued {
                position: position as u32,
            }));
            // A probe reads one small file: it never waits behind long runs for a slot, or a
            // repository that stopped answering mid-backup would be reported only after it.
            let permit = if kind == RunKind::Probe {
                Some(None)
            } else {
                tokio::select! {
                    p = Arc::clone(&this.slots).acquire_owned() => p.ok().map(Some),
                    _ = r.cancel.cancelled() => None,
                }
            };
            this.queued.fetch_sub(1, Ordering::Relaxed);
            this.metrics.queue_length.set(this.queue_len() as i64);
            let started = Instant::now();
            let kind_label = kind
                .as_str_name()
                .trim_start_matches("RUN_KIND_")
                .to_ascii_lowercase();
            let result = match permit {
                None => cancelled_result("cancelled while queued"),
                Some(_permit) => {
                    this.mark_in_flight(&r, true);
                    this.metrics.in_flight.with_label_values(&[&kind_label]).inc();
                    // A panicking job must still end its run with a result.
                    let job = tokio::spawn(job(Arc::clone(&r)));
                    let result = job.await.unwrap_or_else(|e| pb::Result {
                        outcome: Outcome::Failed as i32,
                        failure: FailureKind::Unspecified as i32,
                        reason: format!("internal error in the agent: {e}"),
                        ..Default::default()
                    });
                    this.metrics.in_flight.with_label_values(&[&kind_label]).dec();
                    result
                }
            };
            let mut result = result;
            if result.duration_ms == 0 {
                result.duration_ms = started.elapsed().as_millis() as u64;
            }
            let outcome = Outcome::try_from(result.outcome).unwrap_or(Outcome::Unspecified);
            this.metrics
                .results
                .with_label_values(&[
                    &kind_label,
                    &outcome
                        .as_str_name()
                        .trim_start_matches("OUTCOME_")
                        .to_ascii_lowercase(),
                ])
                .inc();
            if let Some(b) = &result.backup {
                this.metrics.bytes_processed.inc_by(b.total_bytes_processed);
            }
            tracing::info!(run_id = %r.id, kind = %kind_label, outcome = ?outcome, reason = %result.reason, "run finished");
            r.emit(Event::Result(result));
            // The record of the result first, then the in-flight marker goes: a stop in
            // between leaves both, and the result wins.
            this.record_finished(&r);
            this.mark_in_flight(&r, false);
        });
        (run, false)
    }

    fn mark_in_flight(&self, run: &Run, on: bool) {
        let path = self.in_flight_dir().join(format!("{}.json", run.id));
        if on {
            let rec = InFlight {
                id: run.id.clone(),
                kind: run.kind as i32,
                repository_url: run.repository_url.clone(),
                started_ms: now_ms(),
            };
            let _ = std::fs::create_dir_all(self.in_flight_dir());
            if let Err(e) = std::fs::write(&path, serde_json::to_vec(&rec).unwrap_or_default()) {
                tracing::warn!(error = %e, "cannot record the run in flight; an agent restart would lose it");
            }
        } else {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Cancels every run (agent shutdown) and waits until they have all finished.
    pub async fn shutdown(&self, timeout: Duration) {
        let runs: Vec<_> = self.runs.lock().unwrap().values().cloned().collect();
        for r in &runs {
            r.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
            r.cancel.cancel();
        }
        let deadline = Instant::now() + timeout;
        while runs.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn cancelled_result(reason: &str) -> pb::Result {
    pb::Result {
        outcome: Outcome::Cancelled as i32,
        failure: FailureKind::Cancelled as i32,
        reason: reason.into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    fn registry(slots: usize) -> (tempfile::TempDir, Arc<Runs>) {
        let dir = tempfile::tempdir().unwrap();
        let runs = Runs::new(
            slots,
            Duration::from_secs(60),
            dir.path().into(),
            Arc::new(Metrics::new()),
        );
        (dir, runs)
    }

    fn ok() -> pb::Result {
        pb::Result {
            outcome: Outcome::Succeeded as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_second_start_with_the_same_id_attaches_instead_of_running_again() {
        let (_d, runs) = registry(2);
        let count = Arc::new(AtomicU64::new(0));
        let mut attached = Vec::new();
        for _ in 0..2 {
            let c = Arc::clone(&count);
            let (run, a) = runs.start_or_attach("r1", RunKind::Backup, "repo", None, move |_| async move {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                ok()
            });
            attached.push(a);
            let events: Vec<_> = run.subscribe().collect().await;
            assert!(matches!(events.last().unwrap().event, Some(Event::Result(_))));
        }
        assert_eq!(attached, [false, true]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn late_subscribers_replay_the_history_in_order_without_gaps() {
        let (_d, runs) = registry(1);
        let (run, _) = runs.start_or_attach("r2", RunKind::Backup, "repo", None, |run| async move {
            for i in 0..5 {
                run.emit(Event::Log(pb::LogLine {
                    line: format!("line {i}"),
                }));
            }
            ok()
        });
        let first: Vec<_> = run.subscribe().collect().await;
        let again: Vec<_> = run.subscribe().collect().await;
        assert_eq!(first, again);
        let seqs: Vec<u64> = first.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        let logs = first
            .iter()
            .filter(|e| matches!(e.event, Some(Event::Log(_))))
            .count();
        assert_eq!(logs, 5);
    }

    #[tokio::test]
    async fn a_probe_never_waits_for_a_slot_held_by_a_long_run() {
        let (_d, runs) = registry(1);
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let (long, _) = runs.start_or_attach("long", RunKind::Backup, "repo", None, |_| async move {
            let _ = held.await;
            ok()
        });
        let (probe, _) = runs.start_or_attach("probe", RunKind::Probe, "repo", None, |_| async { ok() });
        let events = tokio::time::timeout(Duration::from_secs(5), probe.subscribe().collect::<Vec<_>>())
            .await
            .expect("the probe waited for the backup's slot");
        assert!(matches!(events.last().unwrap().event, Some(Event::Result(_))));
        let _ = release.send(());
        let _: Vec<_> = long.subscribe().collect().await;
    }

    #[tokio::test]
    async fn runs_beyond_the_limit_wait_in_the_queue_instead_of_failing() {
        let (_d, runs) = registry(1);
        let gate = Arc::new(tokio::sync::Notify::new());
        let g = Arc::clone(&gate);
        let (first, _) = runs.start_or_attach("a", RunKind::Backup, "repo", None, move |_| async move {
            g.notified().await;
            ok()
        });
        let (second, _) = runs.start_or_attach("b", RunKind::Backup, "repo", None, |_| async { ok() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(second.info().state, RunState::Queued as i32);
        assert_eq!(runs.queue_len(), 1);
        gate.notify_one();
        let last = second.subscribe().collect::<Vec<_>>().await.pop().unwrap();
        assert!(matches!(last.event, Some(Event::Result(ref r)) if r.outcome == Outcome::Succeeded as i32));
        assert!(first.is_finished());
    }

    #[tokio::test]
    async fn runs_stopped_by_an_agent_shutdown_say_so() {
        let (_d, runs) = registry(1);
        let started = Arc::new(tokio::sync::Notify::new());
        let s = Arc::clone(&started);
        let (run, _) = runs.start_or_attach("s", RunKind::Backup, "repo", None, move |run| async move {
            s.notify_one();
            run.cancel.cancelled().await;
            cancelled_result("backup was cancelled")
        });
        // In flight, not queued (a queued run ends "cancelled while queued").
        started.notified().await;
        runs.shutdown(Duration::from_secs(5)).await;
        let last = run.subscribe().collect::<Vec<_>>().await.pop().unwrap();
        let Some(Event::Result(r)) = last.event else {
            panic!("no result: {last:?}");
        };
        assert_eq!(r.outcome, Outcome::Cancelled as i32);
        assert!(
            r.reason
                .starts_with("the agent stopped while the run was in flight"),
            "{}",
            r.reason
        );
        assert!(r.reason.ends_with("backup was cancelled"), "{}", r.reason);
    }

    #[tokio::test]
    async fn runs_in_flight_at_a_restart_are_reported_failed_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("runs")).unwrap();
        let rec = InFlight {
            id: "old".into(),
            kind: RunKind::Backup as i32,
            repository_url: "r".into(),
            started_ms: 0,
        };
        std::fs::write(
            dir.path().join("runs/old.json"),
            serde_json::to_vec(&rec).unwrap(),
        )
        .unwrap();
        let runs = Runs::new(
            1,
            Duration::from_secs(60),
            dir.path().into(),
            Arc::new(Metrics::new()),
        );
        let r = runs.get("old").unwrap().result().unwrap();
        assert_eq!(r.failure, FailureKind::AgentRestarted as i32);
        assert!(r.reason.contains("restarted"));
    }

    #[tokio::test]
    async fn finished_runs_and_their_results_survive_an_agent_restart_for_the_retention_time() {
        let dir = tempfile::tempdir().unwrap();
        let start = |keep| Runs::new(1, keep, dir.path().into(), Arc::new(Metrics::new()));
        let volume = pb::VolumeRef {
            pod_uid: "uid".into(),
            volume_name: "data".into(),
            pv_name: String::new(),
        };
        let runs = start(Duration::from_secs(60));
        let (run, _) =
            runs.start_or_attach("done", RunKind::Backup, "repo", Some(volume.clone()), |_| async {
                pb::Result {
                    snapshot_id: "abc".into(),
                    ..ok()
                }
            });
        let _: Vec<_> = run.subscribe().collect().await;
        let record = dir.path().join("finished/done.pb");
        let marker = dir.path().join("runs/done.json");
        for _ in 0..100 {
            if record.exists() && !marker.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            record.exists() && !marker.exists(),
            "the result recorded, the marker gone"
        );
        drop(runs);

        // A new agent process knows the run: its result, and attaching does not run it again.
        let again = start(Duration::from_secs(60));
        let info = again
            .get("done")
            .expect("the finished run is known after a restart")
            .info();
        assert_eq!(info.state, RunState::Finished as i32);
        assert_eq!(
            (info.repository_url.as_str(), info.volume),
            ("repo", Some(volume))
        );
        assert_eq!(info.result.unwrap().snapshot_id, "abc");
        let (run, attached) = again.start_or_attach("done", RunKind::Backup, "repo", None, |_| async {
            panic!("a finished run ran again")
        });
        assert!(attached);
        let events: Vec<_> = run.subscribe().collect().await;
        let Some(Event::Result(r)) = &events.last().unwrap().event else {
            panic!("no result: {events:?}")
        };
        assert_eq!(
            (r.outcome, r.snapshot_id.as_str()),
            (Outcome::Succeeded as i32, "abc")
        );
        drop(again);

        // Past the retention time it is forgotten, record and all.
        let later = start(Duration::ZERO);
        assert!(later.get("done").is_none());
        assert!(!record.exists());
    }

    #[tokio::test]
    async fn a_run_recorded_as_finished_is_not_reported_as_cut_off_by_the_restart() {
        // Stopped after the result was recorded, before the in-flight marker went.
        let dir = tempfile::tempdir().unwrap();
        let start = || {
            Runs::new(
                1,
                Duration::from_secs(60),
                dir.path().into(),
                Arc::new(Metrics::new()),
            )
        };
        let runs = start();
        let (run, _) = runs.start_or_attach("both", RunKind::Backup, "repo", None, |_| async { ok() });
        let _: Vec<_> = run.subscribe().collect().await;
        for _ in 0..100 {
            if dir.path().join("finished/both.pb").exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(runs);
        std::fs::create_dir_all(dir.path().join("runs")).unwrap();
        let rec = InFlight {
            id: "both".into(),
            kind: RunKind::Backup as i32,
            repository_url: "repo".into(),
            started_ms: 0,
        };
        std::fs::write(
            dir.path().join("runs/both.json"),
            serde_json::to_vec(&rec).unwrap(),
        )
        .unwrap();
        let r = start().get("both").unwrap().result().unwrap();
        assert_eq!(r.outcome, Outcome::Succeeded as i32, "{r:?}");
    }

    #[test]
    fn run_ids_are_safe_names() {
        assert!(validate_run_id("backup-media-emby-20240115t020000z").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(129)] {
            assert!(validate_run_id(bad).is_err(), "{bad}");
        }
    }
}
