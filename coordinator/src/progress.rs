//! Live progress of a run in flight, written to `status.progress` at most every
//! `--progress-interval`, beside the event stream so a slow API server never stalls it.

use std::sync::Arc;

use kube::{Api, ResourceExt};
use restic_operator_api::common::{ActiveRun, Progress};
use restic_operator_proto::v1::{self as pb, run_event::Event as RunEventKind};

use crate::context::Context;
use crate::repository::to_time;
use crate::run::Follower;
use crate::status::{RunStatus, WithStatus};

/// Writes live progress to status, at most every `progress_interval`.
pub struct ProgressWriter<'a, K: WithStatus> {
    ctx: &'a Context,
    api: &'a Api<K>,
    name: String,
    run_id: String,
    start: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    latest: Option<pb::Progress>,
    stage: Option<String>,
    last_write: Option<std::time::Instant>,
    pending: Option<tokio::task::JoinHandle<()>>,
    /// The progress last written (set by the write once it succeeded).
    written: Arc<std::sync::Mutex<Option<Progress>>>,
    /// Contact with the agent was lost and `Progressing` says so.
    lost: bool,
}

impl<'a, K> ProgressWriter<'a, K>
where
    K: WithStatus + Send + Sync + 'static,
    K::Status: RunStatus + Send,
{
    /// The progress writer of run `active` of `object`.
    pub fn new(ctx: &'a Context, api: &'a Api<K>, object: &K, active: &ActiveRun) -> Self {
        Self {
            ctx,
            api,
            name: object.name_any(),
            run_id: active.run_id.clone(),
            start: active.start_time.clone(),
            latest: None,
            stage: None,
            last_write: None,
            pending: None,
            written: Arc::default(),
            lost: false,
        }
    }

    pub fn on_event(&mut self, event: &pb::RunEvent) {
        if self.lost {
            // The agent answers again.
            self.lost = false;
            self.spawn_contact(None);
        }
        match &event.event {
            Some(RunEventKind::Progress(p)) => {
                if !p.stage.is_empty() {
                    self.stage = Some(p.stage.clone());
                }
                self.latest = Some(p.clone());
            }
            Some(RunEventKind::Queued(_)) => self.stage = Some("Queued".into()),
            Some(RunEventKind::Started(_)) => self.stage = Some("Running".into()),
            _ => return,
        }
        let due = self
            .last_write
            .is_none_or(|t| t.elapsed() >= self.ctx.config.progress_interval);
        if due && self.pending.as_ref().is_none_or(|h| h.is_finished()) {
            let progress = self.progress();
            // Nothing moved (restic waits for the repository, say): no write, and no
            // reconcile of the object that would follow it.
            let written = self.written.lock().expect("written").clone();
            if written.is_some_and(|w| same_progress(&w, &progress)) {
                return;
            }
            self.last_write = Some(std::time::Instant::now());
            self.pending = Some(self.spawn_write(progress));
        }
    }

    /// The progress to write now.
    fn progress(&self) -> Progress {
        let p = self.latest.clone().unwrap_or_default();
        Progress {
            run_id: Some(self.run_id.clone()),
            start_time: self.start.clone(),
            update_time: Some(to_time(self.ctx.now())),
            // The agent reports 0-100; one decimal is enough.
            percent_done: Some((p.percent_done * 10.0).round() / 10.0),
            bytes_done: i64::try_from(p.bytes_done).ok(),
            total_bytes: i64::try_from(p.total_bytes).ok(),
            files_done: i64::try_from(p.files_done).ok(),
            total_files: i64::try_from(p.total_files).ok(),
            // restic's estimate covers reading only; while the last packs upload it is unknown.
            seconds_remaining: i64::try_from(p.seconds_remaining)
                .ok()
                .filter(|_| matches!(p.stage.as_str(), "reading" | "restoring")),
            stage: self.stage.clone(),
        }
    }

    fn spawn_write(&self, progress: Progress) -> tokio::task::JoinHandle<()> {
        // The write runs beside the stream, so a slow API server never stalls reading it.
        let api = self.api.clone();
        let name = self.name.clone();
        let run_id = self.run_id.clone();
        let writer = Arc::clone(&self.ctx.status);
        let written = Arc::clone(&self.written);
        tokio::spawn(async move {
            let done = writer
                .update(&api, &name, |_, s| {
                    if s.active_run().is_some_and(|a| a.run_id == run_id) {
                        s.set_progress(Some(progress.clone()));
                    }
                })
                .await;
            if done.is_ok() {
                *written.lock().expect("written") = Some(progress);
            }
        })
    }

    /// Writes whether the agent is out of contact into `Progressing`, beside the stream.
    fn spawn_contact(&self, lost: Option<String>) {
        let api = self.api.clone();
        let name = self.name.clone();
        let run_id = self.run_id.clone();
        let writer = Arc::clone(&self.ctx.status);
        let now = to_time(self.ctx.now());
        tokio::spawn(async move {
            let _ = writer
                .update(&api, &name, |_, s| {
                    if s.active_run().is_some_and(|a| a.run_id == run_id) {
                        s.set_contact(lost.as_deref(), now.clone());
                    }
                })
                .await;
        });
    }

    pub async fn flush(&mut self) {
        if let Some(h) = self.pending.take() {
            let _ = h.await;
        }
    }
}

impl<K> Follower for ProgressWriter<'_, K>
where
    K: WithStatus + Send + Sync + 'static,
    K::Status: RunStatus + Send,
{
    fn on_event(&mut self, event: &pb::RunEvent) {
        ProgressWriter::on_event(self, event)
    }

    fn on_lost(&mut self, why: &str) {
        if !self.lost {
            self.lost = true;
            tracing::warn!(run_id = %self.run_id, %why, "no answer from the run's agent");
            self.spawn_contact(Some(why.to_owned()));
        }
    }
}

/// Whether `b` reports no more done than `a` (pure): the same stage and counts. The time of
/// the update and restic's estimate change while nothing moves.
fn same_progress(a: &Progress, b: &Progress) -> bool {
    let counts = |p: &Progress| {
        (
            p.stage.clone(),
            p.percent_done,
            p.bytes_done,
            p.total_bytes,
            p.files_done,
            p.total_files,
        )
    };
    counts(a) == counts(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_that_only_aged_is_the_same_and_any_count_that_moved_is_not() {
        let at = |s: i64| Some(to_time(chrono::DateTime::from_timestamp(s, 0).unwrap()));
        let stuck = Progress {
            update_time: at(10),
            percent_done: Some(40.0),
            bytes_done: Some(400),
            total_bytes: Some(1000),
            files_done: Some(4),
            total_files: Some(10),
            seconds_remaining: Some(6),
            stage: Some("reading".into()),
            ..Default::default()
        };
        let later = Progress {
            update_time: at(20),
            seconds_remaining: Some(60),
            ..stuck.clone()
        };
        assert!(same_progress(&stuck, &later));
        let moved = [
            Progress {
                bytes_done: Some(401),
                ..later.clone()
            },
            Progress {
                files_done: Some(5),
                ..later.clone()
            },
            Progress {
                percent_done: Some(40.1),
                ..later.clone()
            },
            Progress {
                stage: Some("uploading".into()),
                ..later.clone()
            },
            Progress {
                total_files: Some(11),
                ..later.clone()
            },
        ];
        for m in moved {
            assert!(!same_progress(&stuck, &m), "{m:?}");
        }
    }
}
