//! The object a run belongs to (a ResticBackup or a ResticRestore): what the objects the
//! coordinator makes for the run (hook Jobs, holder pods) are named after, labelled with,
//! placed by and owned by.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::JobConfig;
use restic_operator_api::restore::ResticRestore;

use crate::{BACKUP_LABEL, RESTORE_LABEL};

#[derive(Clone, Debug, PartialEq)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The label naming the owner on what is made for it (`backup.resticbackup.io/backup`
    /// or `.../restore`).
    pub label: &'static str,
    pub owner_ref: Option<OwnerReference>,
    /// Where pods made for the owner go (nodeSelector, tolerations, affinity).
    pub placement: JobConfig,
}

impl Owner {
    fn of<K: Resource<DynamicType = ()>>(object: &K, label: &'static str, placement: JobConfig) -> Self {
        Self {
            namespace: object.namespace().unwrap_or_default(),
            name: object.name_any(),
            uid: object.uid().unwrap_or_default(),
            label,
            owner_ref: object.controller_owner_ref(&()),
            placement,
        }
    }

    /// A backup: its pods are placed by its `jobConfig`.
    pub fn backup(backup: &ResticBackup) -> Self {
        let placement = backup.spec.job_config.clone().unwrap_or_default();
        Self::of(backup, BACKUP_LABEL, placement)
    }

    /// A restore: its pods are placed like those of the backup it restores from, if any.
    pub fn restore(restore: &ResticRestore, from: Option<&ResticBackup>) -> Self {
        let placement = from
            .and_then(|b| b.spec.job_config.clone())
            .map(|j| JobConfig {
                node_selector: j.node_selector,
                tolerations: j.tolerations,
                affinity: j.affinity,
                ..Default::default()
            })
            .unwrap_or_default();
        Self::of(restore, RESTORE_LABEL, placement)
    }

    /// The label that names the owner.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(self.label.to_owned(), self.name.clone())])
    }
}
