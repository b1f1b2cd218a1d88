//! Status writes: read-modify-write of the whole status under a per-object lock, applied
//! with server-side apply under one field manager. The reconciler and the run in flight
//! both write a backup's status; the lock orders them, so neither undoes the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use restic_operator_api::backup::{ResticBackup, ResticBackupStatus};
use restic_operator_api::common::{
    ActiveRun, Condition, ConditionStatus, Progress, condition_types as ct, find_condition, reasons,
    set_condition,
};
use restic_operator_api::repository::{ResticRepository, ResticRepositoryStatus};
use restic_operator_api::restore::{ResticRestore, ResticRestoreStatus};
use restic_operator_api::retention::{GlobalRetentionPolicy, GlobalRetentionPolicyStatus};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::FIELD_MANAGER;

/// A custom resource with a status the coordinator owns.
pub trait WithStatus: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug {
    type Status: Default + Clone + Serialize + PartialEq;
    fn status(&self) -> Option<&Self::Status>;
}

impl WithStatus for ResticBackup {
    type Status = ResticBackupStatus;
    fn status(&self) -> Option<&ResticBackupStatus> {
        self.status.as_ref()
    }
}

impl WithStatus for GlobalRetentionPolicy {
    type Status = GlobalRetentionPolicyStatus;
    fn status(&self) -> Option<&GlobalRetentionPolicyStatus> {
        self.status.as_ref()
    }
}

impl WithStatus for ResticRestore {
    type Status = ResticRestoreStatus;
    fn status(&self) -> Option<&ResticRestoreStatus> {
        self.status.as_ref()
    }
}

/// A status with a run in flight (`activeRun`) and its live progress.
pub trait RunStatus {
    fn active_run(&self) -> Option<&ActiveRun>;
    fn set_progress(&mut self, progress: Option<Progress>);
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    /// The `Progressing` reason of a run in flight.
    fn running(&self) -> &'static str;

    /// `Progressing` of the run in flight (pure): `Unknown` with reason `AgentUnavailable`
    /// while its agent is out of contact (`lost` says why), back to running when it answers.
    fn set_contact(&mut self, lost: Option<&str>, now: Time) {
        let Some(run_id) = self.active_run().map(|a| a.run_id.clone()) else {
            return;
        };
        let generation =
            find_condition(self.conditions_mut(), ct::PROGRESSING).and_then(|c| c.observed_generation);
        let c = match lost {
            Some(why) => Condition::new(
                ct::PROGRESSING,
                ConditionStatus::Unknown,
                reasons::AGENT_UNAVAILABLE,
                format!("Run {run_id}: no answer from its agent ({why}); asking it again"),
                generation,
                now,
            ),
            None => Condition::new(
                ct::PROGRESSING,
                true,
                self.running(),
                format!("Run {run_id}: its agent answers again"),
                generation,
                now,
            ),
        };
        set_condition(self.conditions_mut(), c);
    }
}

impl RunStatus for ResticBackupStatus {
    fn active_run(&self) -> Option<&ActiveRun> {
        self.active_run.as_ref()
    }
    fn set_progress(&mut self, progress: Option<Progress>) {
        self.progress = progress;
    }
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
    fn running(&self) -> &'static str {
        reasons::BACKUP_RUNNING
    }
}

impl RunStatus for ResticRestoreStatus {
    fn active_run(&self) -> Option<&ActiveRun> {
        self.active_run.as_ref()
    }
    fn set_progress(&mut self, progress: Option<Progress>) {
        self.progress = progress;
    }
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
    fn running(&self) -> &'static str {
        reasons::RESTORE_IN_PROGRESS
    }
}

impl WithStatus for ResticRepository {
    type Status = ResticRepositoryStatus;
    fn status(&self) -> Option<&ResticRepositoryStatus> {
        self.status.as_ref()
    }
}

#[derive(Default)]
pub struct StatusWriter {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl StatusWriter {
    /// Reads the object, lets `change` edit a copy of its status and applies the result
    /// (nothing is written when nothing changed). Returns the object as read, `None` when it
    /// is gone. The write is conditional on the object's resourceVersion: if anything wrote
    /// in between (even another coordinator that wrongly believes it leads), the object is
    /// read again and `change` decides again.
    pub async fn update<K, F>(
        &self,
        api: &Api<K>,
        name: &str,
        mut change: F,
    ) -> Result<Option<K>, kube::Error>
    where
        K: WithStatus,
        F: FnMut(&K, &mut K::Status),
    {
        let key = format!(
            "{}/{}/{}",
            K::kind(&()),
            api.namespace().unwrap_or_default(),
            name
        );
        let lock = self
            .locks
            .lock()
            .expect("status locks")
            .entry(key)
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let mut attempt = 0;
        loop {
            let Some(object) = api.get_opt(name).await? else {
                return Ok(None);
            };
            let before = object.status().cloned().unwrap_or_default();
            let mut after = before.clone();
            change(&object, &mut after);
            if after == before {
                return Ok(Some(object));
            }
            let patch = serde_json::json!({
                "apiVersion": K::api_version(&()),
                "kind": K::kind(&()),
                "metadata": {"resourceVersion": object.meta().resource_version},
                "status": after,
            });
            match api
                .patch_status(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => return Ok(Some(object)),
                Err(kube::Error::Api(e)) if e.code == 409 && attempt < 10 => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Marks a scheduled kind's spec invalid (`Ready=False`, `InvalidSpec`, no next run) until it
/// changes.
pub async fn write_invalid<K>(
    writer: &StatusWriter,
    api: &Api<K>,
    object: &K,
    message: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), kube::Error>
where
    K: WithStatus,
    K::Status: crate::plan::ScheduleStatus,
{
    let generation = object.meta().generation;
    let name = object.meta().name.clone().unwrap_or_default();
    writer
        .update(api, &name, |_, s| {
            crate::plan::invalid(s, message, generation, now)
        })
        .await?;
    Ok(())
}

/// `kind/namespace/name` of an object: the key of its consecutive failures (backoff), the same
/// in its reconcile and its error policy.
pub fn backoff_key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!("{}/{}", K::kind(&()), key_of(object))
}

/// `Namespace/name` of an object, for keys and logs.
pub fn key_of<K: Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_whose_agent_is_out_of_contact_says_so_in_progressing_until_it_answers() {
        let mut s: ResticBackupStatus = serde_yaml::from_str(
            "activeRun: {runID: r1}\nconditions: [{type: Progressing, status: 'True', reason: BackupRunning, observedGeneration: 3}]",
        )
        .unwrap();
        let now = crate::repository::to_time(chrono::Utc::now());
        s.set_contact(Some("the connection broke"), now.clone());
        let c = find_condition(&s.conditions, ct::PROGRESSING).unwrap();
        assert_eq!(c.status, ConditionStatus::Unknown);
        assert_eq!(c.reason.as_deref(), Some(reasons::AGENT_UNAVAILABLE));
        assert!(c.message.as_deref().unwrap().contains("the connection broke"));
        assert_eq!(c.observed_generation, Some(3));
        s.set_contact(None, now.clone());
        let c = find_condition(&s.conditions, ct::PROGRESSING).unwrap();
        assert!(c.is_true());
        assert_eq!(c.reason.as_deref(), Some(reasons::BACKUP_RUNNING));
        // No run in flight: nothing to say.
        let mut idle = ResticRestoreStatus::default();
        idle.set_contact(Some("x"), now);
        assert!(idle.conditions.is_empty());
    }
}
