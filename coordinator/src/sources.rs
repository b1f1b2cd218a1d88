//! Where a backup's data is: the running pod (and so the node and its agent) that mounts
//! the volume, or, for a claim no running pod mounts, a mover pod that mounts it read-only
//! and serves it with the agent binary.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodSpec,
    SecretVolumeSource, Volume, VolumeMount,
};
use kube::api::{ListParams, ObjectMeta};
use kube::{Api, Client, Resource, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::label_selector_matches;

use crate::BACKUP_LABEL;

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
    /// No running pod mounts the claim: start a mover for it.
    Mover {
        claim: String,
    },
}

fn is_running(pod: &Pod) -> bool {
    let is_mover = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/component"))
        .is_some_and(|c| c == "mover");
    !is_mover
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

async fn pv_of(client: &Client, ns: &str, claim: &str) -> Result<String, String> {
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get_opt(claim)
        .await
        .map_err(|e| format!("reading PersistentVolumeClaim {ns}/{claim}: {e}"))?
        .ok_or_else(|| format!("PersistentVolumeClaim {ns}/{claim} does not exist"))?;
    pvc.spec
        .and_then(|s| s.volume_name)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("PersistentVolumeClaim {ns}/{claim} is not bound to a volume yet"))
}

fn pod_volume(pod: &Pod, volume: String, pv_name: String) -> PodVolume {
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
pub async fn resolve(client: &Client, backup: &ResticBackup) -> Result<Placement, String> {
    let ns = backup.namespace().unwrap_or_default();
    let pods: Vec<Pod> = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing pods in {ns}: {e}"))?
        .items;
    let source = &backup.spec.source;
    if let Some(pv) = &source.pod_volume_backup {
        let volume = pv.volume_name.clone();
        let Some((pod, volume)) = choose(&pods, |p| {
            let labels = p.metadata.labels.clone().unwrap_or_default();
            (label_selector_matches(&pv.selector, &labels) && claim_of(p, &volume).is_some())
                .then(|| volume.clone())
        }) else {
            return Err(format!(
                "no running pod in {ns} matches the selector and has a volume named {:?}",
                pv.volume_name
            ));
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
        let found = choose(&pods, |p| {
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
        });
        return Ok(match found {
            Some((pod, volume)) => Placement::Pod(pod_volume(pod, volume, pv_name)),
            None => Placement::Mover { claim },
        });
    }
    if source.custom_source.is_some() {
        return Err("customSource backups are not supported by this version of the coordinator".into());
    }
    Err("spec.source names no source (pvc or podVolumeBackup)".into())
}

/// Name of the mover pod of a run (and of its certificate Secret, with `-tls`).
pub fn mover_name(backup: &str, run_id: &str) -> String {
    let hash = fnv(run_id);
    let prefix: String = backup.chars().take(40).collect();
    format!("{}-mover-{hash:08x}", prefix.trim_end_matches('-'))
}

/// FNV-1a, 32 bits: short stable suffixes for generated names.
pub fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The mover pod for `claim` (pure): the agent binary in mover mode, serving the claim
/// mounted read-only at `/data`, with mutual TLS from the Secret `<name>-tls`.
pub fn mover_pod(backup: &ResticBackup, name: &str, claim: &str, image: &str, port: u16) -> Pod {
    let job = backup.spec.job_config.clone().unwrap_or_default();
    let labels = BTreeMap::from([
        (BACKUP_LABEL.to_owned(), backup.name_any()),
        ("app.kubernetes.io/name".to_owned(), "restic-operator".to_owned()),
        ("app.kubernetes.io/component".to_owned(), "mover".to_owned()),
    ]);
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: backup.namespace(),
            labels: Some(labels),
            owner_references: backup.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            containers: vec![Container {
                name: "mover".into(),
                image: Some(image.into()),
                args: Some(vec![
                    "serve".into(),
                    "--mover-volume=/data".into(),
                    format!("--listen=0.0.0.0:{port}"),
                    "--tls-cert=/tls/tls.crt".into(),
                    "--tls-key=/tls/tls.key".into(),
                    "--tls-client-ca=/tls/ca.crt".into(),
                    "--state-dir=/tmp/restic-agent".into(),
                ]),
                ports: Some(vec![ContainerPort {
                    name: Some("grpc".into()),
                    container_port: i32::from(port),
                    ..Default::default()
                }]),
                resources: job.resources.clone(),
                volume_mounts: Some(vec![
                    VolumeMount {
                        name: "data".into(),
                        mount_path: "/data".into(),
                        read_only: Some(true),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: "tls".into(),
                        mount_path: "/tls".into(),
                        read_only: Some(true),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }],
            volumes: Some(vec![
                Volume {
                    name: "data".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.into(),
                        read_only: Some(true),
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "tls".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(format!("{name}-tls")),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            node_selector: job.node_selector.clone(),
            tolerations: job.tolerations.clone(),
            affinity: job.affinity.clone(),
            security_context: job.security_context.clone(),
            service_account_name: job.service_account_name.clone().filter(|s| !s.is_empty()),
            automount_service_account_token: Some(false),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(yaml: &str) -> Vec<Pod> {
        serde_yaml::from_str(yaml).unwrap()
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
    fn mover_mounts_the_claim_read_only_and_is_owned_by_the_backup() {
        let backup: ResticBackup = serde_yaml::from_str(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {name: b, namespace: n, uid: '1234'}\n\
             spec: {repositoryRef: {name: r}, schedule: '@daily', source: {pvc: {claimName: data}}}",
        )
        .unwrap();
        let name = mover_name("b", "run-1");
        let pod = mover_pod(&backup, &name, "data", "agent:dev", 9443);
        let spec = pod.spec.unwrap();
        let claim = spec.volumes.as_ref().unwrap()[0]
            .persistent_volume_claim
            .as_ref()
            .unwrap();
        assert_eq!((claim.claim_name.as_str(), claim.read_only), ("data", Some(true)));
        assert_eq!(
            spec.containers[0].volume_mounts.as_ref().unwrap()[0].read_only,
            Some(true)
        );
        assert_eq!(pod.metadata.owner_references.unwrap()[0].kind, "ResticBackup");
        assert_eq!(name, mover_name("b", "run-1"), "stable per run");
    }
}
