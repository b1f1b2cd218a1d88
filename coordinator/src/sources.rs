//! Where a backup's data is: the running pod (and so the node and its agent) that mounts
//! the volume, or, for a claim no running pod mounts, a holder pod to start for it (see
//! `holder`). Either way the run reads a pod volume from the kubelet's directory.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::{label_selector_matches, reasons};

use crate::error::Class;

// Hook Job names use it from here (`hooks`); it lives with the holder names now.

/// Why a backup's source cannot be placed. The message is for a person (condition message).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("listing pods in {namespace}: {source}")]
    ListPods { namespace: String, source: kube::Error },
    /// `volume` is the pod volume's name (`podVolumeBackup.volumeName`).
    #[error("no running pod in {namespace} matches the selector and has a volume named {volume:?}")]
    NoMatchingPod { namespace: String, volume: String },
    #[error("reading PersistentVolumeClaim {namespace}/{claim}: {source}")]
    ReadClaim {
        namespace: String,
        claim: String,
        source: kube::Error,
    },
    #[error("PersistentVolumeClaim {namespace}/{claim} does not exist")]
    ClaimNotFound { namespace: String, claim: String },
    #[error("PersistentVolumeClaim {namespace}/{claim} is not bound to a volume yet")]
    ClaimNotBound { namespace: String, claim: String },
    #[error("reading PersistentVolume {pv_name}: {source}")]
    ReadVolume { pv_name: String, source: kube::Error },
    #[error("PersistentVolume {pv_name} of claim {namespace}/{claim} does not exist")]
    VolumeNotFound {
        pv_name: String,
        namespace: String,
        claim: String,
    },
    /// `claim` is `namespace/name`.
    #[error(
        "PersistentVolume {pv_name} of claim {claim} is a hostPath volume (what k3s's local-path \
         provisioner makes by default): the kubelet does not mount hostPath volumes under the \
         pod's directory, where the agent reads volumes, so it cannot be backed up. Use a \
         StorageClass that makes local volumes (local-path does with the annotation \
         volumeType: local on the claim, or defaultVolumeType: local on its StorageClass)"
    )]
    HostPath { pv_name: String, claim: String },
    #[error("spec.source names no source (pvc or podVolumeBackup)")]
    NoSource,
}

impl SourceError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SourceError::NoSource => reasons::INVALID_SPEC,
            _ => reasons::SOURCE_NOT_FOUND,
        }
    }

    /// Whether another attempt of the run can find the source: a pod may start, a claim may
    /// be bound; a hostPath volume or an unsupported spec stays what it is.
    pub fn retryable(&self) -> bool {
        !matches!(self, SourceError::HostPath { .. } | SourceError::NoSource)
    }

    /// Whether trying again without a change can help (the API server may recover).
    pub fn class(&self) -> Class {
        match self {
            SourceError::ListPods { .. } | SourceError::ReadClaim { .. } | SourceError::ReadVolume { .. } => {
                Class::Temporary
            }
            _ => Class::Permanent,
        }
    }
}

/// The volume of a running pod to back up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodVolume {
    pub pod: String,
    pub pod_uid: String,
    pub node: String,
    pub volume: String,
    /// The claim's PersistentVolume, for PVC volumes (the kubelet names the directory after it).
    pub pv_name: String,
}

/// Where a run goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    Pod(PodVolume),
    /// A customSource: its dump pod writes the data, then the run reads the dump's volume.
    Dump,
    /// No running pod mounts the claim: start a holder pod for it.
    Holder {
        claim: String,
        /// The claim's PersistentVolume.
        pv_name: String,
    },
}

/// A pod that can be a backup's source: running on a node, and not a holder or a dump pod
/// (another run's pod goes away when that run ends, and is never one a user's backup should
/// depend on).
fn is_running(pod: &Pod) -> bool {
    !crate::holder::is_holder(pod)
        && !crate::dump::is_dump(pod)
        && pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_some()
}

/// The pod to back up from among `pods`: running, with the volume, the oldest first and then
/// by name, so the same pod is chosen every time.
pub fn choose(pods: &[Pod], matches: impl Fn(&Pod) -> Option<String>) -> Option<(&Pod, String)> {
    let mut candidates: Vec<(&Pod, String)> = pods
        .iter()
        .filter(|p| is_running(p))
        .filter_map(|p| matches(p).map(|v| (p, v)))
        .collect();
    candidates.sort_by(|(a, _), (b, _)| {
        (a.metadata.creation_timestamp.as_ref().map(|t| t.0), a.name_any())
            .cmp(&(b.metadata.creation_timestamp.as_ref().map(|t| t.0), b.name_any()))
    });
    candidates.into_iter().next()
}

/// The claim name of the pod volume `volume`, if it is a PVC volume.
fn claim_of(pod: &Pod, volume: &str) -> Option<Option<String>> {
    let v = pod
        .spec
        .as_ref()?
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == volume)?;
    Some(v.persistent_volume_claim.as_ref().map(|c| c.claim_name.clone()))
}

/// The running pod (not a holder) that mounts claim `claim`, and its volume's name (pure).
pub fn mounting<'a>(pods: &'a [Pod], claim: &str) -> Option<(&'a Pod, String)> {
    choose(pods, |p| {
        p.spec
            .as_ref()?
            .volumes
            .iter()
            .flatten()
            .find(|v| {
                v.persistent_volume_claim
                    .as_ref()
                    .is_some_and(|c| c.claim_name == claim)
            })
            .map(|v| v.name.clone())
    })
}

/// Lists the pods of namespace `ns`.
pub async fn pods_of(client: &Client, ns: &str) -> Result<Vec<Pod>, SourceError> {
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(|source| SourceError::ListPods {
            namespace: ns.to_owned(),
            source,
        })?
        .items)
}

/// The PersistentVolume claim `ns/claim` is bound to, checked to be one the agent can reach.
pub async fn pv_of(client: &Client, ns: &str, claim: &str) -> Result<String, SourceError> {
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get_opt(claim)
        .await
        .map_err(|source| SourceError::ReadClaim {
            namespace: ns.into(),
            claim: claim.into(),
            source,
        })?
        .ok_or_else(|| SourceError::ClaimNotFound {
            namespace: ns.into(),
            claim: claim.into(),
        })?;
    let pv_name = pvc
        .spec
        .and_then(|s| s.volume_name)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| SourceError::ClaimNotBound {
            namespace: ns.into(),
            claim: claim.into(),
        })?;
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get_opt(&pv_name)
        .await
        .map_err(|source| SourceError::ReadVolume {
            pv_name: pv_name.clone(),
            source,
        })?
        .ok_or_else(|| SourceError::VolumeNotFound {
            pv_name: pv_name.clone(),
            namespace: ns.into(),
            claim: claim.into(),
        })?;
    mountable(&pv, &format!("{ns}/{claim}"))?;
    Ok(pv_name)
}

/// The agent reads a claim's volume where the kubelet mounts it, under the pod's directory.
/// The kubelet mounts a hostPath volume nowhere: containers get the node's directory itself.
/// `claim` is `namespace/name`.
fn mountable(pv: &PersistentVolume, claim: &str) -> Result<(), SourceError> {
    if pv.spec.as_ref().is_some_and(|s| s.host_path.is_some()) {
        return Err(SourceError::HostPath {
            pv_name: pv.name_any(),
            claim: claim.into(),
        });
    }
    Ok(())
}

pub fn pod_volume(pod: &Pod, volume: String, pv_name: String) -> PodVolume {
    PodVolume {
        pod: pod.name_any(),
        pod_uid: pod.uid().unwrap_or_default(),
        node: pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        volume,
        pv_name,
    }
}

/// Finds where the backup's source is now. The error is for a person (condition message).
pub async fn resolve(client: &Client, backup: &ResticBackup) -> Result<Placement, SourceError> {
    let ns = backup.namespace().unwrap_or_default();
    let pods = pods_of(client, &ns).await?;
    let source = &backup.spec.source;
    if let Some(pv) = &source.pod_volume_backup {
        let volume = pv.volume_name.clone();
        let Some((pod, volume)) = choose(&pods, |p| {
            let labels = p.metadata.labels.clone().unwrap_or_default();
            (label_selector_matches(&pv.selector, &labels) && claim_of(p, &volume).is_some())
                .then(|| volume.clone())
        }) else {
            return Err(SourceError::NoMatchingPod {
                namespace: ns,
                volume: pv.volume_name.clone(),
            });
        };
        let pv_name = match claim_of(pod, &volume).flatten() {
            Some(claim) => pv_of(client, &ns, &claim).await?,
            None => String::new(),
        };
        return Ok(Placement::Pod(pod_volume(pod, volume, pv_name)));
    }
    if let Some(pvc) = &source.pvc {
        let claim = pvc.claim_name.clone();
        let pv_name = pv_of(client, &ns, &claim).await?;
        return Ok(match mounting(&pods, &claim) {
            Some((pod, volume)) => Placement::Pod(pod_volume(pod, volume, pv_name)),
            None => Placement::Holder { claim, pv_name },
        });
    }
    if source.custom_source.is_some() {
        return Ok(Placement::Dump);
    }
    Err(SourceError::NoSource)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(yaml: &str) -> Vec<Pod> {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn host_path_volumes_are_refused_with_what_to_do_instead() {
        let pv: PersistentVolume = serde_yaml::from_str(
            "metadata: {name: pvc-1}\nspec: {hostPath: {path: /var/lib/rancher/k3s/storage/pvc-1}}",
        )
        .unwrap();
        let err = mountable(&pv, "media/emby").unwrap_err();
        assert!(
            matches!(
                &err,
                SourceError::HostPath { pv_name, claim } if pv_name == "pvc-1" && claim == "media/emby"
            ),
            "{err:?}"
        );
        assert_eq!(err.reason(), reasons::SOURCE_NOT_FOUND);
        assert_eq!(err.class(), Class::Permanent);
        assert_eq!(
            err.to_string(),
            "PersistentVolume pvc-1 of claim media/emby is a hostPath volume (what k3s's local-path \
             provisioner makes by default): the kubelet does not mount hostPath volumes under the pod's \
             directory, where the agent reads volumes, so it cannot be backed up. Use a StorageClass that \
             makes local volumes (local-path does with the annotation volumeType: local on the claim, or \
             defaultVolumeType: local on its StorageClass)"
        );
        let local: PersistentVolume =
            serde_yaml::from_str("metadata: {name: pvc-2}\nspec: {local: {path: /mnt/disk}}").unwrap();
        assert!(mountable(&local, "media/emby").is_ok());
    }

    #[test]
    fn the_oldest_running_pod_with_the_volume_is_chosen() {
        let all = pods(
            "- metadata: {name: b, creationTimestamp: '2024-01-02T00:00:00Z', labels: {app: x}}\n  spec: {nodeName: n2, containers: [], volumes: [{name: data, emptyDir: {}}]}\n  status: {phase: Running}\n\
             - metadata: {name: a, creationTimestamp: '2024-01-03T00:00:00Z', labels: {app: x}}\n  spec: {nodeName: n1, containers: [], volumes: [{name: data, emptyDir: {}}]}\n  status: {phase: Running}\n\
             - metadata: {name: c, creationTimestamp: '2024-01-01T00:00:00Z', labels: {app: x}}\n  spec: {nodeName: n3, containers: [], volumes: [{name: data, emptyDir: {}}]}\n  status: {phase: Pending}\n",
        );
        let (pod, volume) = choose(&all, |p| claim_of(p, "data").map(|_| "data".to_owned())).unwrap();
        assert_eq!((pod.name_any().as_str(), volume.as_str()), ("b", "data"));
        assert!(choose(&all, |p| claim_of(p, "other").map(|_| "other".to_owned())).is_none());
    }

    #[test]
    fn a_holder_pod_is_never_chosen_as_a_source() {
        let all = pods(
            "- metadata: {name: b-holder-1, creationTimestamp: '2024-01-01T00:00:00Z', labels: {app.kubernetes.io/name: restic-operator, app.kubernetes.io/component: holder}}\n  spec: {nodeName: n1, containers: [], volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]}\n  status: {phase: Running}\n\
             - metadata: {name: app, creationTimestamp: '2024-01-02T00:00:00Z'}\n  spec: {nodeName: n2, containers: [], volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]}\n  status: {phase: Running}\n",
        );
        let (pod, _) = choose(&all, |p| claim_of(p, "data").map(|_| "data".to_owned())).unwrap();
        assert_eq!(pod.name_any(), "app", "the younger app pod, not the older holder");
        assert!(choose(&all[..1], |p| claim_of(p, "data").map(|_| "data".to_owned())).is_none());
    }
}
