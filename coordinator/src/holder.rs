//! Holder pods: for a claim no running pod mounts, a short-lived pod in the backup's namespace
//! that only mounts the claim and runs the pause image. It carries nothing of ours: no code, no
//! service-account token, no Secret, no ports. Once the kubelet has mounted the claim, the node
//! agent reads it from the holder's pod directory like any other pod volume, so there is one
//! data path, and no credential ever enters a user's namespace.
//!
//! The name is predictable per run (so a restarted coordinator finds its holder), which means
//! anyone who may create pods in the namespace can create a pod under that name first. Such a
//! pod is never used and never deleted: a pod is ours only when the backup controls it and it
//! is exactly the holder this module builds ([`check_ours`]).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};

use crate::owner::Owner;

/// `app.kubernetes.io/component` of holder pods.
pub const COMPONENT: &str = "holder";
/// The holder's only volume; runs name it as the pod volume to read.
pub const VOLUME: &str = "data";
/// Where the claim is mounted inside the holder (nothing reads it there; the agent reads the
/// kubelet's directory).
const MOUNT_PATH: &str = "/data";
/// The pause image runs as this user; the holder asks for it explicitly.
const NOBODY: i64 = 65535;

/// Condition and event reason: a pod under the holder's name exists and is not ours.
pub const HOLDER_POD_CONFLICT: &str = "HolderPodConflict";
/// Condition reason: the holder did not get running (unschedulable, claim not attachable,
/// image not pulled) in time, or ended.
pub const HOLDER_NOT_STARTED: &str = "HolderNotStarted";

const NAME_LABEL: &str = "app.kubernetes.io/name";
const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
const NAME: &str = "restic-operator";

#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error(
        "pod {namespace}/{pod} already exists and was not created by the operator for this backup \
         ({why}); it is left alone and not used; delete or rename it to let the backup run"
    )]
    Conflict {
        namespace: String,
        pod: String,
        why: NotOurs,
    },
    #[error(
        "holder pod {namespace}/{pod} for PersistentVolumeClaim {claim} was not running within {}s \
         (is the claim attachable and the image {image} available on a schedulable node?)",
        .timeout.as_secs()
    )]
    Timeout {
        namespace: String,
        pod: String,
        claim: String,
        image: String,
        timeout: Duration,
    },
    #[error("holder pod {namespace}/{pod} ended ({phase}) before the run")]
    Ended {
        namespace: String,
        pod: String,
        phase: String,
    },
    #[error("holder pod {namespace}/{pod}: {source}")]
    Api {
        namespace: String,
        pod: String,
        source: kube::Error,
    },
}

impl HolderError {
    /// The condition reason of a run that failed with this error.
    pub fn reason(&self) -> &'static str {
        match self {
            HolderError::Conflict { .. } => HOLDER_POD_CONFLICT,
            HolderError::Timeout { .. } | HolderError::Ended { .. } | HolderError::Api { .. } => {
                HOLDER_NOT_STARTED
            }
        }
    }
}

/// FNV-1a, 32 bits: short stable suffixes for generated names.
pub fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Name of the holder pod of a run: the same for the same run, different for every run.
pub fn holder_name(backup: &str, run_id: &str) -> String {
    let prefix: String = backup.chars().take(40).collect();
    format!("{}-holder-{:08x}", prefix.trim_end_matches('-'), fnv(run_id))
}

/// Whether `pod` is labelled as a holder (`app.kubernetes.io/component=holder`); such a pod
/// is never a backup source, whoever made it.
pub fn is_holder(pod: &Pod) -> bool {
    pod.labels().get(COMPONENT_LABEL).map(String::as_str) == Some(COMPONENT)
}

/// The holder pod of `owner` for `claim` (pure): the pause image, the claim as its only
/// volume, no token, no Secret, no ports, non-root with every capability dropped, placed by
/// the owner's placement (a backup's `jobConfig`) and controlled by the owner. `read_only`
/// mounts the claim read-only (backups); restores mount it read-write.
pub fn holder_pod(owner: &Owner, name: &str, claim: &str, image: &str, read_only: bool) -> Pod {
    let job = owner.placement.clone();
    let mut labels = owner.labels();
    labels.extend([
        (NAME_LABEL.to_owned(), NAME.to_owned()),
        (COMPONENT_LABEL.to_owned(), COMPONENT.to_owned()),
    ]);
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(owner.namespace.clone()),
            labels: Some(labels),
            owner_references: owner.owner_ref.clone().map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(holder_pod_security_context()),
            containers: vec![holder_container(image, read_only)],
            volumes: Some(vec![claim_volume(claim, read_only)]),
            node_selector: job.node_selector,
            tolerations: job.tolerations,
            affinity: job.affinity,
            ..Default::default()
        }),
        status: None,
    }
}

/// The holder pod's security context: the pause image's non-root user, default seccomp (pure).
fn holder_pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NOBODY),
        run_as_group: Some(NOBODY),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The holder's only container: `image`, tiny, unprivileged, mounting the claim (pure).
fn holder_container(image: &str, read_only: bool) -> Container {
    Container {
        volume_mounts: Some(vec![VolumeMount {
            name: VOLUME.into(),
            mount_path: MOUNT_PATH.into(),
            read_only: Some(read_only),
            ..Default::default()
        }]),
        ..pause_container(COMPONENT, image)
    }
}

/// A container `name` of the pause `image` that only keeps its pod up: tiny, non-root, every
/// capability dropped, read-only root (pure). Holders and dump pods end with one.
pub fn pause_container(name: &str, image: &str) -> Container {
    let tiny = |cpu: &str, memory: &str| {
        Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.into())),
            ("memory".to_owned(), Quantity(memory.into())),
        ]))
    };
    Container {
        name: name.into(),
        image: Some(image.into()),
        resources: Some(ResourceRequirements {
            requests: tiny("1m", "8Mi"),
            limits: tiny("10m", "16Mi"),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The holder's only volume: the claim (pure).
fn claim_volume(claim: &str, read_only: bool) -> Volume {
    Volume {
        name: VOLUME.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.into(),
            read_only: Some(read_only),
        }),
        ..Default::default()
    }
}

/// Why an existing pod is not the holder this backup would create.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotOurs {
    #[error("it is not controlled by this ResticBackup")]
    NotControlled,
    #[error("it lacks the label {0}")]
    Label(String),
    #[error("it uses a host namespace")]
    HostNamespace,
    #[error("it does not have exactly one container")]
    Containers,
    #[error("its container runs {found}, not {expected}")]
    Image { found: String, expected: String },
    #[error("its container has a command, arguments, environment or ports")]
    Runs,
    #[error("its container may gain privileges")]
    Privileged,
    #[error("its container mounts other volumes")]
    Mounts,
    #[error("its only volume is not the backup's claim")]
    Volumes,
}

/// Whether `pod` is a holder (by its component label) that the object with `owner_uid`
/// controls (pure).
pub fn controlled_holder(pod: &Pod, owner_uid: &str) -> bool {
    let controlled = pod
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == owner_uid);
    !owner_uid.is_empty() && is_holder(pod) && controlled
}

/// Whether `existing` is the holder `expected` (as [`holder_pod`] built it) and controlled by
/// the object with `owner_uid` (pure). The API server adds defaults, so this compares what
/// makes a pod a holder, not every field.
pub fn check_ours(existing: &Pod, expected: &Pod, owner_uid: &str) -> Result<(), NotOurs> {
    check_owner_and_labels(existing, expected, owner_uid)?;
    let (Some(spec), Some(want)) = (&existing.spec, &expected.spec) else {
        return Err(NotOurs::Containers);
    };
    let (Some(want_container), Some(want_volumes)) = (want.containers.first(), &want.volumes) else {
        return Err(NotOurs::Containers);
    };
    check_pod_shape(spec)?;
    check_container(&spec.containers[0], want_container)?;
    check_volumes(spec.volumes.as_deref().unwrap_or_default(), want_volumes)
}

/// Whether `existing` is controlled by `owner_uid` and has every label of `expected` (pure).
fn check_owner_and_labels(existing: &Pod, expected: &Pod, owner_uid: &str) -> Result<(), NotOurs> {
    let controlled = existing
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == owner_uid);
    if owner_uid.is_empty() || !controlled {
        return Err(NotOurs::NotControlled);
    }
    for (k, v) in expected.labels() {
        if existing.labels().get(k) != Some(v) {
            return Err(NotOurs::Label(format!("{k}={v}")));
        }
    }
    Ok(())
}

/// Whether the pod uses no host namespace and has exactly one container and no others (pure).
fn check_pod_shape(spec: &PodSpec) -> Result<(), NotOurs> {
    if spec.host_network == Some(true) || spec.host_pid == Some(true) || spec.host_ipc == Some(true) {
        return Err(NotOurs::HostNamespace);
    }
    if spec.containers.len() != 1
        || spec.init_containers.as_ref().is_some_and(|c| !c.is_empty())
        || spec.ephemeral_containers.as_ref().is_some_and(|c| !c.is_empty())
    {
        return Err(NotOurs::Containers);
    }
    Ok(())
}

/// Whether `c` runs `want_container`'s image, with nothing added, unprivileged, same mounts (pure).
fn check_container(c: &Container, want_container: &Container) -> Result<(), NotOurs> {
    if c.image != want_container.image {
        return Err(NotOurs::Image {
            found: c.image.clone().unwrap_or_else(|| "no image".into()),
            expected: want_container.image.clone().unwrap_or_default(),
        });
    }
    let empty = |v: Option<usize>| v.unwrap_or(0) == 0;
    if !empty(c.command.as_ref().map(Vec::len))
        || !empty(c.args.as_ref().map(Vec::len))
        || !empty(c.env.as_ref().map(Vec::len))
        || !empty(c.env_from.as_ref().map(Vec::len))
        || !empty(c.ports.as_ref().map(Vec::len))
    {
        return Err(NotOurs::Runs);
    }
    let sc = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true)
        || sc.allow_privilege_escalation != Some(false)
        || sc
            .capabilities
            .as_ref()
            .and_then(|c| c.add.as_ref())
            .is_some_and(|a| !a.is_empty())
    {
        return Err(NotOurs::Privileged);
    }
    let mounts = |c: &Container| -> Vec<(String, String, bool)> {
        c.volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.clone(), m.mount_path.clone(), m.read_only.unwrap_or(false)))
            .collect()
    };
    if mounts(c) != mounts(want_container) {
        return Err(NotOurs::Mounts);
    }
    Ok(())
}

/// Whether the pod's only volume is the claim of `want_volumes`, mounted the same way (pure).
fn check_volumes(volumes: &[Volume], want_volumes: &[Volume]) -> Result<(), NotOurs> {
    let claims = |vs: &[Volume]| -> Vec<(String, Option<(String, bool)>)> {
        vs.iter()
            .map(|v| {
                (
                    v.name.clone(),
                    v.persistent_volume_claim
                        .as_ref()
                        .map(|c| (c.claim_name.clone(), c.read_only.unwrap_or(false))),
                )
            })
            .collect()
    };
    let only_claim = volumes.len() == 1
        && volumes[0].persistent_volume_claim.is_some()
        && claims(volumes) == claims(want_volumes);
    if !only_claim {
        return Err(NotOurs::Volumes);
    }
    Ok(())
}

/// A holder that is running: the pod the agent reads the claim from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub pod: String,
    pub uid: String,
    pub node: String,
}

/// The holder of one run: what it should be, and the I/O to create, wait for and delete it.
pub struct Holder {
    pub name: String,
    pub namespace: String,
    pub claim: String,
    owner_uid: String,
    expected: Pod,
}

impl Holder {
    /// The holder of run `run_id` of `owner` for `claim` (pure).
    pub fn new(owner: &Owner, run_id: &str, claim: &str, image: &str, read_only: bool) -> Self {
        let name = holder_name(&owner.name, run_id);
        Self {
            expected: holder_pod(owner, &name, claim, image, read_only),
            namespace: owner.namespace.clone(),
            owner_uid: owner.uid.clone(),
            claim: claim.into(),
            name,
        }
    }

    fn api_error(&self, source: kube::Error) -> HolderError {
        HolderError::Api {
            namespace: self.namespace.clone(),
            pod: self.name.clone(),
            source,
        }
    }

    /// Creates the holder (or finds the one this run created before a restart) and waits
    /// until it runs on a node. A pod under the name that is not ours is a conflict; a holder
    /// that does not run within `timeout` is deleted.
    pub async fn start(&self, client: &Client, timeout: Duration) -> Result<Held, HolderError> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &self.namespace);
        let uid = self.create_or_find(&pods).await?;
        self.wait_running(client, &pods, uid, timeout).await
    }

    /// Creates the holder, or finds this run's earlier one (checked to be ours); returns its uid.
    async fn create_or_find(&self, pods: &Api<Pod>) -> Result<String, HolderError> {
        match pods.create(&PostParams::default(), &self.expected).await {
            Ok(created) => Ok(created.uid().unwrap_or_default()),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let existing = pods
                    .get_opt(&self.name)
                    .await
                    .map_err(|e| self.api_error(e))?
                    .ok_or_else(|| self.ended("deleted".into()))?;
                self.ours(&existing)?;
                Ok(existing.uid().unwrap_or_default())
            }
            Err(e) => Err(self.api_error(e)),
        }
    }

    /// Polls the holder with `uid` until it runs on a node, fails, is replaced or times out.
    async fn wait_running(
        &self,
        client: &Client,
        pods: &Api<Pod>,
        uid: String,
        timeout: Duration,
    ) -> Result<Held, HolderError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match pods.get_opt(&self.name).await {
                Ok(Some(p)) if p.uid().as_deref() != Some(uid.as_str()) => {
                    // Replaced under our feet: whatever is there now was not checked.
                    self.ours(&p)?;
                    return Err(self.ended("replaced".into()));
                }
                Ok(Some(p)) => {
                    if let Some(held) = self.running(client, &p, &uid).await? {
                        return Ok(held);
                    }
                }
                Ok(None) => return Err(self.ended("deleted".into())),
                Err(e) => tracing::warn!(pod = %self.name, error = %e, "reading the holder pod"),
            }
            if tokio::time::Instant::now() > deadline {
                self.delete(client, &uid).await;
                return Err(HolderError::Timeout {
                    namespace: self.namespace.clone(),
                    pod: self.name.clone(),
                    claim: self.claim.clone(),
                    image: self.image().to_owned(),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `Some` once holder `p` runs on a node, `None` while it starts; deletes it if it ended.
    async fn running(&self, client: &Client, p: &Pod, uid: &str) -> Result<Option<Held>, HolderError> {
        let phase = p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        let terminating = p.metadata.deletion_timestamp.is_some();
        if let (false, "Running", Some(node)) = (terminating, phase.as_str(), node) {
            return Ok(Some(Held {
                pod: self.name.clone(),
                uid: uid.to_owned(),
                node,
            }));
        }
        if terminating || phase == "Failed" || phase == "Succeeded" {
            self.delete(client, uid).await;
            return Err(self.ended(if terminating { "deleting".into() } else { phase }));
        }
        Ok(None)
    }

    /// The error of a holder that ended (its pod phase, or deleted, deleting, replaced).
    fn ended(&self, phase: String) -> HolderError {
        HolderError::Ended {
            namespace: self.namespace.clone(),
            pod: self.name.clone(),
            phase,
        }
    }

    fn image(&self) -> &str {
        self.expected
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.as_deref())
            .unwrap_or_default()
    }

    fn ours(&self, existing: &Pod) -> Result<(), HolderError> {
        check_ours(existing, &self.expected, &self.owner_uid).map_err(|why| HolderError::Conflict {
            namespace: self.namespace.clone(),
            pod: self.name.clone(),
            why,
        })
    }

    /// Deletes the holder if it exists and the backup controls it as a holder; anything else
    /// under its name stays. This is looser than [`check_ours`] on purpose: once created, a
    /// holder may have been changed by admission webhooks (an injected sidecar, a mirrored
    /// image) or the flags and claim it was built from may have changed, and it must still go,
    /// or its claim stays mounted.
    pub async fn remove(&self, client: &Client) {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &self.namespace);
        match pods.get_opt(&self.name).await {
            Ok(Some(p)) if controlled_holder(&p, &self.owner_uid) => {
                self.delete(client, &p.uid().unwrap_or_default()).await
            }
            Ok(Some(_)) => tracing::warn!(pod = %self.name, "not deleting a pod that is not ours"),
            Ok(None) => {}
            Err(e) => tracing::warn!(pod = %self.name, error = %e, "reading the holder pod to delete it"),
        }
    }

    /// Deletes the pod with exactly `uid` (never a pod that replaced it under the same name).
    async fn delete(&self, client: &Client, uid: &str) {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match Api::<Pod>::namespaced(client.clone(), &self.namespace)
            .delete(&self.name, &dp)
            .await
        {
            Ok(_) => tracing::info!(pod = %format!("{}/{}", self.namespace, self.name), "holder deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => tracing::warn!(pod = %self.name, error = %e, "deleting the holder pod"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BACKUP_LABEL;
    use restic_operator_api::backup::ResticBackup;

    fn backup(extra: &str) -> ResticBackup {
        serde_yaml::from_str(&format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {{name: b, namespace: n, uid: '1234'}}\n\
             spec: {{repositoryRef: {{name: r}}, schedule: '@daily', source: {{pvc: {{claimName: data}}}}{extra}}}"
        ))
        .unwrap()
    }

    fn holder() -> Pod {
        holder_pod(
            &Owner::backup(&backup("")),
            &holder_name("b", "run-1"),
            "data",
            "pause:test",
            true,
        )
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    /// The holder as the API server returns it: defaults added.
    fn as_stored(mut p: Pod) -> Pod {
        p.metadata.uid = Some("pod-uid".into());
        let spec = p.spec.as_mut().unwrap();
        spec.dns_policy = Some("ClusterFirst".into());
        spec.scheduler_name = Some("default-scheduler".into());
        spec.containers[0].image_pull_policy = Some("IfNotPresent".into());
        spec.containers[0].termination_message_path = Some("/dev/termination-log".into());
        p
    }

    #[test]
    fn the_holder_runs_only_the_pause_image_with_no_token_no_secret_and_no_ports() {
        let pod = holder();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.enable_service_links, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.containers.len(), 1);
        assert!(spec.init_containers.is_none());
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("pause:test"));
        assert!(c.command.is_none() && c.args.is_none() && c.env.is_none() && c.env_from.is_none());
        assert!(c.ports.is_none());
        let volumes = spec.volumes.unwrap();
        assert_eq!(volumes.len(), 1, "the claim is the only volume");
        assert!(volumes[0].secret.is_none() && volumes[0].projected.is_none());
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["memory"].0, "16Mi");
    }

    #[test]
    fn a_backup_holder_mounts_the_claim_read_only_and_a_restore_holder_read_write() {
        let spec = holder().spec.unwrap();
        let claim = spec.volumes.as_ref().unwrap()[0]
            .persistent_volume_claim
            .clone()
            .unwrap();
        assert_eq!((claim.claim_name.as_str(), claim.read_only), ("data", Some(true)));
        let mount = &spec.containers[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!((mount.name.as_str(), mount.read_only), (VOLUME, Some(true)));

        let rw = holder_pod(&Owner::backup(&backup("")), "h", "data", "pause:test", false)
            .spec
            .unwrap();
        assert_eq!(
            rw.volumes.unwrap()[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .read_only,
            Some(false)
        );
    }

    #[test]
    fn the_holder_is_non_root_with_every_capability_dropped() {
        let spec = holder().spec.unwrap();
        let psc = spec.security_context.unwrap();
        assert_eq!(
            (psc.run_as_non_root, psc.run_as_user, psc.run_as_group),
            (Some(true), Some(65535), Some(65535))
        );
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        assert!(
            psc.fs_group.is_none(),
            "the kubelet must not chown the user's volume"
        );
        let sc = spec.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
    }

    #[test]
    fn the_holder_is_labelled_placed_by_job_config_and_controlled_by_the_backup() {
        let b = backup(
            ", jobConfig: {nodeSelector: {zone: a}, tolerations: [{key: k, operator: Exists}], \
             securityContext: {runAsUser: 0}, serviceAccountName: powerful}",
        );
        let pod = holder_pod(&Owner::backup(&b), "h", "data", "pause:test", true);
        let labels = pod.labels();
        assert_eq!(labels[BACKUP_LABEL], "b");
        assert_eq!(labels[COMPONENT_LABEL], "holder");
        assert_eq!(labels[NAME_LABEL], "restic-operator");
        assert!(is_holder(&pod));
        let owner = &pod.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("ResticBackup", "1234", Some(true))
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_selector.unwrap()["zone"], "a");
        assert_eq!(spec.tolerations.unwrap()[0].key.as_deref(), Some("k"));
        assert_eq!(
            spec.security_context.unwrap().run_as_user,
            Some(65535),
            "jobConfig's securityContext is for restic, not the holder"
        );
        assert!(spec.service_account_name.is_none());
    }

    #[test]
    fn holder_names_are_stable_per_run_and_differ_between_runs() {
        assert_eq!(holder_name("b", "run-1"), holder_name("b", "run-1"));
        assert_ne!(holder_name("b", "run-1"), holder_name("b", "run-2"));
        assert!(holder_name("b", "run-1").starts_with("b-holder-"));
        let long = holder_name(&"x".repeat(63), "run-1");
        assert!(long.len() <= 63, "{long}");
    }

    #[test]
    fn the_holder_this_backup_created_is_ours_after_api_server_defaults() {
        assert_eq!(check_ours(&as_stored(holder()), &holder(), "1234"), Ok(()));
    }

    #[test]
    fn a_pod_the_backup_does_not_control_is_not_ours_however_holder_like() {
        let mut p = as_stored(holder());
        p.metadata.owner_references = None;
        assert_eq!(check_ours(&p, &holder(), "1234"), Err(NotOurs::NotControlled));
        let other: ResticBackup = serde_yaml::from_str(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\n\
             metadata: {name: b, namespace: n, uid: '9999'}\n\
             spec: {repositoryRef: {name: r}, schedule: '@daily', source: {pvc: {claimName: data}}}",
        )
        .unwrap();
        let other_backup = as_stored(holder_pod(
            &Owner::backup(&other),
            &holder_name("b", "run-1"),
            "data",
            "pause:test",
            true,
        ));
        assert_eq!(
            check_ours(&other_backup, &holder(), "1234"),
            Err(NotOurs::NotControlled)
        );
    }

    #[test]
    fn a_controlled_pod_that_is_not_exactly_a_holder_is_not_ours() {
        let user_pod = pod(
            "metadata: {name: b-holder-1, labels: {app: x}, ownerReferences: [{apiVersion: v1, kind: ResticBackup, name: b, uid: '1234', controller: true}]}\n\
             spec: {containers: [{name: c, image: busybox}], volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]}",
        );
        assert!(matches!(
            check_ours(&user_pod, &holder(), "1234"),
            Err(NotOurs::Label(_))
        ));

        let changed = |f: &dyn Fn(&mut PodSpec)| {
            let mut p = as_stored(holder());
            f(p.spec.as_mut().unwrap());
            check_ours(&p, &holder(), "1234").unwrap_err()
        };
        assert_eq!(
            changed(&|s| s.containers[0].image = Some("busybox".into())),
            NotOurs::Image {
                found: "busybox".into(),
                expected: "pause:test".into()
            }
        );
        assert_eq!(
            changed(&|s| s.containers[0].command = Some(vec!["sh".into()])),
            NotOurs::Runs
        );
        assert_eq!(
            changed(&|s| s.containers.push(s.containers[0].clone())),
            NotOurs::Containers
        );
        assert_eq!(changed(&|s| s.host_pid = Some(true)), NotOurs::HostNamespace);
        assert_eq!(
            changed(&|s| s.containers[0].security_context.as_mut().unwrap().privileged = Some(true)),
            NotOurs::Privileged
        );
        assert_eq!(
            changed(&|s| s.containers[0].volume_mounts.as_mut().unwrap()[0].read_only = Some(false)),
            NotOurs::Mounts
        );
        assert_eq!(
            changed(&|s| s.volumes.as_mut().unwrap()[0]
                .persistent_volume_claim
                .as_mut()
                .unwrap()
                .claim_name = "other".into()),
            NotOurs::Volumes
        );
        assert_eq!(
            changed(&|s| s.volumes.as_mut().unwrap().push(Volume {
                name: "secret".into(),
                ..Default::default()
            })),
            NotOurs::Volumes
        );
    }

    #[test]
    fn a_holder_changed_by_admission_webhooks_is_still_removed_but_a_lookalike_is_not() {
        let backup = backup("");
        let uid = backup.uid().unwrap();
        let mut pod = holder_pod(&Owner::backup(&backup), "b-holder-1", "data", "pause:1", true);
        // A service mesh injected a sidecar: no longer exactly a holder, still ours to delete.
        pod.spec.as_mut().unwrap().containers.push(Default::default());
        assert!(
            check_ours(
                &pod,
                &holder_pod(&Owner::backup(&backup), "b-holder-1", "data", "pause:1", true),
                &uid
            )
            .is_err()
        );
        assert!(controlled_holder(&pod, &uid));
        // A user's pod with the labels but not controlled by the backup is never deleted.
        pod.metadata.owner_references = None;
        assert!(!controlled_holder(&pod, &uid));
        assert!(!controlled_holder(
            &holder_pod(&Owner::backup(&backup), "x", "data", "pause:1", true),
            ""
        ));
    }
}
