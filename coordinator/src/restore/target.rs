//! A restore's target: the claim (made first for `newPVC`), and where the agent writes into
//! it: the volume of a running pod that mounts it (restored live, through its node's agent),
//! or a read-write holder pod's for a claim no running pod mounts.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::reasons;
use restic_operator_api::restore::{NewPvc, ResticRestore};

use crate::RESTORE_LABEL;
use crate::holder::{Holder, HolderError};
use crate::sources::{self, PodVolume, SourceError};

/// The annotation that marks a claim a restore created, with the restore's uid (also when the
/// restore does not own it).
pub const CREATED_BY: &str = "backup.resticbackup.io/created-by-restore";

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "PersistentVolumeClaim {namespace}/{claim} already exists and this restore did not create it; \
         newPVC makes a new claim: choose another name, or restore into the existing one with target.pvc"
    )]
    ClaimExists { namespace: String, claim: String },
    #[error("creating PersistentVolumeClaim {namespace}/{claim}: {source}")]
    Create {
        namespace: String,
        claim: String,
        source: kube::Error,
    },
    #[error("PersistentVolumeClaim {namespace}/{claim} was not bound to a volume within {}s", .timeout.as_secs())]
    NotBound {
        namespace: String,
        claim: String,
        timeout: Duration,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Holder(#[from] HolderError),
}

impl TargetError {
    /// The `Complete` condition's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            TargetError::ClaimExists { .. } => reasons::INVALID_SPEC,
            TargetError::Source(e) => e.reason(),
            TargetError::Holder(e) => e.reason(),
            TargetError::Create { .. } | TargetError::NotBound { .. } => reasons::RESTORE_FAILED,
        }
    }
}

/// The claim `newPVC` asks for (pure): labelled and annotated as the restore's, and owned by
/// it unless `ownedByRestore` is false.
pub fn new_claim(restore: &ResticRestore, new: &NewPvc) -> PersistentVolumeClaim {
    let owned = new
        .owned_by_restore
        .then(|| restore.controller_owner_ref(&()))
        .flatten();
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(new.name.clone()),
            namespace: restore.namespace(),
            labels: Some(BTreeMap::from([(RESTORE_LABEL.to_owned(), restore.name_any())])),
            annotations: Some(BTreeMap::from([(
                CREATED_BY.to_owned(),
                restore.uid().unwrap_or_default(),
            )])),
            owner_references: owned.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(
                new.access_modes
                    .iter()
                    .map(|m| {
                        serde_json::to_value(m)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default()
                    })
                    .collect(),
            ),
            storage_class_name: new.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), new.size.clone())])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// Creates the `newPVC` claim, or finds the one this restore created before a restart. A
/// claim of that name the restore did not create is never used.
pub async fn ensure_claim(client: &Client, restore: &ResticRestore, new: &NewPvc) -> Result<(), TargetError> {
    let ns = restore.namespace().unwrap_or_default();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let create_error = |source| TargetError::Create {
        namespace: ns.clone(),
        claim: new.name.clone(),
        source,
    };
    match api.create(&PostParams::default(), &new_claim(restore, new)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get_opt(&new.name).await.map_err(create_error)?;
            let ours =
                existing.as_ref().and_then(|c| c.annotations().get(CREATED_BY)) == restore.uid().as_ref();
            if ours {
                Ok(())
            } else {
                Err(TargetError::ClaimExists {
                    namespace: ns.clone(),
                    claim: new.name.clone(),
                })
            }
        }
        Err(e) => Err(create_error(e)),
    }
}

/// Where the agent writes: a running pod's volume of the claim, else `holder`'s (started,
/// then the claim waited for until bound, as a new claim binds once its first pod is
/// scheduled).
pub async fn place(
    client: &Client,
    ns: &str,
    claim: &str,
    holder: &Holder,
    timeout: Duration,
) -> Result<PodVolume, TargetError> {
    let pods = sources::pods_of(client, ns).await?;
    if let Some((pod, volume)) = sources::mounting(&pods, claim) {
        let pv_name = sources::pv_of(client, ns, claim).await?;
        return Ok(sources::pod_volume(pod, volume, pv_name));
    }
    let held = holder.start(client, timeout).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let pv_name = loop {
        match sources::pv_of(client, ns, claim).await {
            Ok(pv) => break pv,
            Err(SourceError::ClaimNotBound { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(SourceError::ClaimNotBound { .. }) => {
                return Err(TargetError::NotBound {
                    namespace: ns.to_owned(),
                    claim: claim.to_owned(),
                    timeout,
                });
            }
            Err(e) => return Err(e.into()),
        }
    };
    Ok(PodVolume {
        pod: held.pod,
        pod_uid: held.uid,
        node: held.node,
        volume: crate::holder::VOLUME.into(),
        pv_name,
    })
}

/// The ResticBackup of namespace `ns` whose run in flight reads claim `claim`, if any.
pub async fn backup_reading(client: &Client, ns: &str, claim: &str) -> Result<Option<String>, kube::Error> {
    let backups = Api::<ResticBackup>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await?
        .items;
    Ok(backups
        .into_iter()
        .find(|b| {
            let reads = b.spec.source.pvc.as_ref().is_some_and(|p| p.claim_name == claim);
            reads && b.status.as_ref().is_some_and(|s| s.active_run.is_some())
        })
        .map(|b| b.name_any()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_claim_is_the_restores_unless_it_says_otherwise() {
        let restore: ResticRestore = serde_yaml::from_str(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRestore\n\
             metadata: {name: r, namespace: app, uid: u1}\n\
             spec: {backupRef: {name: b}, target: {newPVC: {name: fresh, size: 2Gi, storageClassName: fast,\n\
                    accessModes: [ReadWriteOncePod]}}}\n",
        )
        .unwrap();
        let new = restore.spec.target.new_pvc.clone().unwrap();
        let claim = new_claim(&restore, &new);
        assert_eq!(claim.annotations()[CREATED_BY], "u1");
        assert_eq!(claim.labels()[RESTORE_LABEL], "r");
        assert_eq!(claim.owner_references()[0].kind, "ResticRestore");
        let spec = claim.spec.unwrap();
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOncePod".to_owned()]));
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(spec.resources.unwrap().requests.unwrap()["storage"].0, "2Gi");
        let kept = NewPvc {
            owned_by_restore: false,
            ..new
        };
        assert!(new_claim(&restore, &kept).owner_references().is_empty());
    }
}
