//! Dump pods: a backup's `customSource`. The user's pod template runs as the init containers
//! of a pod the operator makes, each with an empty volume mounted at `backupPath`; when every
//! one has exited 0 the pod's last container, the pause image, keeps it running, and the node
//! agent backs the volume up from the pod's directory like any pod volume. The pod carries no
//! repository credential, and goes when the run's result is in status. A dump that fails
//! fails the backup with the end of its log.
//!
//! The coordinator creates the pod, so its template may not ask for what the namespace's own
//! pods should not have: host namespaces, host paths, privileges, added capabilities or a
//! service account's token ([`refused`]).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, EmptyDirVolumeSource, Pod, PodSpec, Volume, VolumeMount};
use kube::api::{DeleteParams, LogParams, ObjectMeta, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use restic_operator_api::backup::CustomSource;

use crate::holder::fnv;
use crate::owner::Owner;

/// `app.kubernetes.io/component` of dump pods.
pub const COMPONENT: &str = "dump";
/// The empty volume the dump is written to; the run backs it up.
pub const VOLUME: &str = "restic-dump";
/// Bytes of a failed dump container's log kept in the reason.
const LOG_TAIL: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("customSource.podTemplate is refused: {0}")]
    Refused(String),
    #[error(
        "pod {namespace}/{pod} already exists and was not created by the operator for this backup; \
         it is left alone; delete or rename it to let the backup run"
    )]
    Conflict { namespace: String, pod: String },
    #[error("dump container {container} of pod {namespace}/{pod} failed ({how}): {log}")]
    Failed {
        namespace: String,
        pod: String,
        container: String,
        how: String,
        log: String,
    },
    #[error("dump pod {namespace}/{pod} did not finish its dump within {}s", .timeout.as_secs())]
    Timeout {
        namespace: String,
        pod: String,
        timeout: Duration,
    },
    #[error("dump pod {namespace}/{pod}: {source}")]
    Api {
        namespace: String,
        pod: String,
        source: kube::Error,
    },
}

/// Name of the dump pod of a run: the same for the same run, different for every run.
pub fn dump_name(backup: &str, run_id: &str) -> String {
    let prefix: String = backup.chars().take(40).collect();
    format!("{}-dump-{:08x}", prefix.trim_end_matches('-'), fnv(run_id))
}

/// Whether `pod` is labelled as a dump pod; such a pod is never a backup source of another
/// backup.
pub fn is_dump(pod: &Pod) -> bool {
    pod.labels()
        .get("app.kubernetes.io/component")
        .map(String::as_str)
        == Some(COMPONENT)
}

/// What the template may not ask for (pure): the coordinator's own rights must not become the
/// user's. About Pod Security's "baseline" profile, by allow-list where the API has many
/// kinds: no host namespaces, ports, paths or node name; volumes only of the kinds a
/// namespace's pods use for their own data (emptyDir, configMap, secret, downwardAPI,
/// persistentVolumeClaim, and projected ones of those); no privileges, added capabilities,
/// sysctls, unmasked /proc, SELinux options or unconfined seccomp or AppArmor; and no
/// service account or token.
pub fn refused(source: &CustomSource) -> Option<String> {
    if !source.backup_path.starts_with('/') || source.backup_path.split('/').any(|c| c == "..") {
        return Some(format!(
            "backupPath {:?} must be an absolute path without ..",
            source.backup_path
        ));
    }
    let Some(spec) = source.pod_template.spec.as_ref() else {
        return Some("it has no spec".into());
    };
    if spec.containers.is_empty() {
        return Some("it has no container".into());
    }
    if spec.host_network == Some(true) || spec.host_pid == Some(true) || spec.host_ipc == Some(true) {
        return Some("it uses a host namespace".into());
    }
    if spec.node_name.is_some() {
        return Some("it sets nodeName; the scheduler places a dump pod".into());
    }
    if spec.ephemeral_containers.is_some() {
        return Some("it has ephemeral containers".into());
    }
    let named = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty() && s != "default");
    if named(&spec.service_account_name)
        || named(&spec.service_account)
        || spec.automount_service_account_token == Some(true)
    {
        return Some("it asks for a service account or its token; a dump pod runs without one".into());
    }
    if let Some(sc) = &spec.security_context {
        let unconfined = unconfined(sc.seccomp_profile.as_ref(), sc.app_armor_profile.as_ref());
        if sc.sysctls.as_ref().is_some_and(|s| !s.is_empty()) || sc.se_linux_options.is_some() || unconfined {
            return Some("its securityContext sets sysctls, SELinux options or an unconfined profile".into());
        }
    }
    spec.volumes
        .iter()
        .flatten()
        .find_map(volume_refused)
        .or_else(|| {
            let containers = spec.init_containers.iter().flatten().chain(&spec.containers);
            containers.filter_map(container_refused).next()
        })
}

/// Whether a seccomp or AppArmor profile is `Unconfined` (pure).
fn unconfined(
    seccomp: Option<&k8s_openapi::api::core::v1::SeccompProfile>,
    app_armor: Option<&k8s_openapi::api::core::v1::AppArmorProfile>,
) -> bool {
    seccomp.is_some_and(|p| p.type_ == "Unconfined") || app_armor.is_some_and(|p| p.type_ == "Unconfined")
}

/// Why a volume of the template is refused (pure).
fn volume_refused(v: &Volume) -> Option<String> {
    if v.name == VOLUME {
        return Some(format!("volume name {VOLUME} is the operator's"));
    }
    let projected_ok = v.projected.as_ref().is_none_or(|p| {
        p.sources.iter().flatten().all(|s| {
            s.service_account_token.is_none()
                && s.cluster_trust_bundle.is_none()
                && s.pod_certificate.is_none()
        })
    });
    let kinds = [
        v.empty_dir.is_some(),
        v.config_map.is_some(),
        v.secret.is_some(),
        v.downward_api.is_some(),
        v.persistent_volume_claim.is_some(),
        v.projected.is_some(),
    ];
    (!(kinds.contains(&true) && projected_ok)).then(|| {
        format!(
            "volume {} is of a kind a dump pod may not use (emptyDir, configMap, secret, downwardAPI, \
             persistentVolumeClaim, or projected ones of those)",
            v.name
        )
    })
}

/// Why a container of the template is refused (pure).
fn container_refused(c: &Container) -> Option<String> {
    let host_port = c
        .ports
        .iter()
        .flatten()
        .any(|p| p.host_port.is_some_and(|h| h != 0));
    if host_port {
        return Some(format!("container {} asks for a host port", c.name));
    }
    let sc = c.security_context.as_ref()?;
    let added = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.add.as_ref())
        .is_some_and(|a| !a.is_empty());
    let unconfined = unconfined(sc.seccomp_profile.as_ref(), sc.app_armor_profile.as_ref());
    let unmasked = sc.proc_mount.as_deref().is_some_and(|m| m != "Default");
    (sc.privileged == Some(true)
        || sc.allow_privilege_escalation == Some(true)
        || added
        || unconfined
        || unmasked
        || sc.se_linux_options.is_some())
    .then(|| {
        format!(
            "container {} asks for privileges, capabilities or a weaker confinement",
            c.name
        )
    })
}

/// The dump pod of run `run_id` (pure): the template's containers as init containers with the
/// dump volume at `backupPath`, then the pause image; never restarted, no service-account
/// token, labelled and controlled by the backup.
pub fn dump_pod(owner: &Owner, run_id: &str, source: &CustomSource, pause_image: &str) -> Pod {
    let template = source.pod_template.clone();
    let mut spec = template.spec.unwrap_or_default();
    let mount = VolumeMount {
        name: VOLUME.into(),
        mount_path: source.backup_path.clone(),
        ..Default::default()
    };
    let mut init = spec.init_containers.take().unwrap_or_default();
    for mut c in std::mem::take(&mut spec.containers) {
        c.volume_mounts.get_or_insert_with(Vec::new).push(mount.clone());
        init.push(c);
    }
    for c in &mut init {
        let sc = c.security_context.get_or_insert_with(Default::default);
        sc.allow_privilege_escalation.get_or_insert(false);
    }
    spec.init_containers = Some(init);
    spec.containers = vec![wait_container(pause_image)];
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    spec.restart_policy = Some("Never".into());
    spec.automount_service_account_token = Some(false);
    spec.service_account = None;
    spec.service_account_name = None;
    let mut labels = template.metadata.and_then(|m| m.labels).unwrap_or_default();
    labels.extend(owner.labels());
    labels.extend([
        ("app.kubernetes.io/name".to_owned(), "restic-operator".to_owned()),
        ("app.kubernetes.io/component".to_owned(), COMPONENT.to_owned()),
    ]);
    Pod {
        metadata: ObjectMeta {
            name: Some(dump_name(&owner.name, run_id)),
            namespace: Some(owner.namespace.clone()),
            labels: Some(labels),
            owner_references: owner.owner_ref.clone().map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_selector: spec
                .node_selector
                .take()
                .or(owner.placement.node_selector.clone()),
            tolerations: spec.tolerations.take().or(owner.placement.tolerations.clone()),
            affinity: spec.affinity.take().or(owner.placement.affinity.clone()),
            ..spec
        }),
        status: None,
    }
}

/// The container that keeps the pod running once the dump is written: the pause image, as
/// holders run it, as its non-root user (the pod's own user may be root).
fn wait_container(image: &str) -> Container {
    let mut c = crate::holder::pause_container("wait", image);
    if let Some(sc) = c.security_context.as_mut() {
        sc.run_as_non_root = Some(true);
        sc.run_as_user = Some(65535);
    }
    c
}

/// A dump container that ended other than with 0 (pure): its name and how it ended.
fn failed_container(pod: &Pod) -> Option<(String, String)> {
    let statuses = pod.status.as_ref()?.init_container_statuses.as_ref()?;
    statuses.iter().find_map(|s| {
        let t = s.state.as_ref()?.terminated.as_ref()?;
        (t.exit_code != 0).then(|| {
            let reason = t.reason.clone().unwrap_or_default();
            (
                s.name.clone(),
                format!(
                    "exit code {}{}",
                    t.exit_code,
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(", {reason}")
                    }
                ),
            )
        })
    })
}

/// The dump pod of one run, where it runs once the dump is written.
pub struct Dumped {
    pub pod: String,
    pub uid: String,
    pub node: String,
}

/// Creates the dump pod (or finds this run's), and waits until the dump is written and the
/// pod runs, or until a dump container fails (its log tail in the error) or `timeout`.
pub async fn run(
    client: &Client,
    desired: &Pod,
    owner_uid: &str,
    timeout: Duration,
) -> Result<Dumped, DumpError> {
    let ns = desired.namespace().unwrap_or_default();
    let name = desired.name_any();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let api_error = |source| DumpError::Api {
        namespace: ns.clone(),
        pod: name.clone(),
        source,
    };
    let uid = match pods.create(&PostParams::default(), desired).await {
        Ok(p) => p.uid().unwrap_or_default(),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = pods.get(&name).await.map_err(api_error)?;
            if !controlled(&existing, owner_uid) {
                return Err(DumpError::Conflict {
                    namespace: ns,
                    pod: name,
                });
            }
            existing.uid().unwrap_or_default()
        }
        Err(e) => return Err(api_error(e)),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pod = pods.get(&name).await.map_err(api_error)?;
        if let Some((container, how)) = failed_container(&pod) {
            let log = log_tail(&pods, &name, &container).await;
            remove(client, &ns, &name, owner_uid).await;
            return Err(DumpError::Failed {
                namespace: ns,
                pod: name,
                container,
                how,
                log,
            });
        }
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        if let ("Running", Some(node)) = (phase.as_str(), node) {
            return Ok(Dumped { pod: name, uid, node });
        }
        if tokio::time::Instant::now() > deadline {
            remove(client, &ns, &name, owner_uid).await;
            return Err(DumpError::Timeout {
                namespace: ns,
                pod: name,
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The end of a container's log, for a person.
async fn log_tail(pods: &Api<Pod>, pod: &str, container: &str) -> String {
    let params = LogParams {
        container: Some(container.to_owned()),
        tail_lines: Some(20),
        limit_bytes: Some(64 << 10),
        ..Default::default()
    };
    match pods.logs(pod, &params).await {
        Ok(log) => {
            let log = log.trim();
            let start = log.len().saturating_sub(LOG_TAIL);
            let start = (start..log.len())
                .find(|i| log.is_char_boundary(*i))
                .unwrap_or(log.len());
            if log.is_empty() {
                "no output".into()
            } else {
                log[start..].to_owned()
            }
        }
        Err(e) => format!("its log could not be read: {e}"),
    }
}

/// Whether `pod` is a dump pod controlled by the object with `owner_uid` (pure).
pub fn controlled(pod: &Pod, owner_uid: &str) -> bool {
    !owner_uid.is_empty()
        && is_dump(pod)
        && pod
            .owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && o.uid == owner_uid)
}

/// Deletes every dump pod of backup `backup` (controlled by `owner_uid`): for a backup with no
/// run in flight, whatever is left over (a coordinator that stopped between recording a
/// result and deleting the pod).
pub async fn sweep(client: &Client, ns: &str, backup: &str, owner_uid: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!(
        "{}={backup},app.kubernetes.io/component={COMPONENT}",
        crate::BACKUP_LABEL
    );
    let Ok(list) = pods
        .list(&kube::api::ListParams::default().labels(&selector))
        .await
    else {
        return;
    };
    for pod in list.items.iter().filter(|p| controlled(p, owner_uid)) {
        if pod.metadata.deletion_timestamp.is_none() {
            remove(client, ns, &pod.name_any(), owner_uid).await;
        }
    }
}

/// Deletes the dump pod `name` if the object with `owner_uid` controls it.
pub async fn remove(client: &Client, ns: &str, name: &str, owner_uid: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let Ok(Some(pod)) = pods.get_opt(name).await else {
        return;
    };
    if !controlled(&pod, owner_uid) {
        tracing::warn!(pod = %name, "not deleting a pod that is not ours");
        return;
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match pods.delete(name, &dp).await {
        Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), "dump pod deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(pod = %name, error = %e, "deleting the dump pod"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use restic_operator_api::backup::ResticBackup;

    fn backup(template: &str) -> ResticBackup {
        serde_yaml::from_str(&format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {{name: db, namespace: n, uid: u1}}\n\
             spec: {{repositoryRef: {{name: r}}, schedule: '@daily', source: {{customSource: {{backupPath: /backup,\n\
             podTemplate: {template}}}}}}}"
        ))
        .unwrap()
    }

    fn source(b: &ResticBackup) -> CustomSource {
        b.spec.source.custom_source.clone().unwrap()
    }

    #[test]
    fn the_template_runs_as_init_containers_writing_to_the_dump_volume_then_the_pod_waits() {
        let b = backup(
            "{metadata: {labels: {app: dump}}, spec: {containers: [{name: dump, image: db, command: [sh]}], \
             volumes: [{name: db, persistentVolumeClaim: {claimName: data}}]}}",
        );
        let pod = dump_pod(&Owner::backup(&b), "run-1", &source(&b), "pause:1");
        assert_eq!(pod.name_any(), dump_name("db", "run-1"));
        assert!(is_dump(&pod) && pod.labels()["app"] == "dump");
        assert_eq!(pod.owner_references()[0].uid, "u1");
        let spec = pod.spec.unwrap();
        let init = spec.init_containers.unwrap();
        assert_eq!(init.len(), 1);
        let mounts = init[0].volume_mounts.clone().unwrap();
        assert_eq!(
            (mounts[0].name.as_str(), mounts[0].mount_path.as_str()),
            (VOLUME, "/backup")
        );
        assert_eq!(spec.containers.len(), 1);
        assert_eq!(spec.containers[0].image.as_deref(), Some("pause:1"));
        let volumes = spec.volumes.unwrap();
        assert_eq!(volumes.len(), 2);
        assert!(volumes[1].empty_dir.is_some());
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let escalation = init[0]
            .security_context
            .as_ref()
            .and_then(|c| c.allow_privilege_escalation);
        assert_eq!(
            escalation,
            Some(false),
            "no privilege escalation unless asked (and that is refused)"
        );
    }

    #[test]
    fn a_template_asking_for_more_than_a_pod_of_the_namespace_should_have_is_refused() {
        let ok = backup(
            "{spec: {containers: [{name: dump, image: db, envFrom: [{secretRef: {name: db-creds}}]}], \
             volumes: [{name: db, persistentVolumeClaim: {claimName: data}}, {name: c, configMap: {name: cfg}}]}}",
        );
        assert_eq!(refused(&source(&ok)), None);
        for (template, says) in [
            (
                "{spec: {hostNetwork: true, containers: [{name: d, image: db}]}}",
                "host namespace",
            ),
            (
                "{spec: {containers: [{name: d, image: db}], volumes: [{name: h, hostPath: {path: /}}]}}",
                "may not use",
            ),
            (
                "{spec: {containers: [{name: d, image: db, securityContext: {privileged: true}}]}}",
                "privileges",
            ),
            (
                "{spec: {containers: [{name: d, image: db, securityContext: {capabilities: {add: [SYS_ADMIN]}}}]}}",
                "capabilities",
            ),
            (
                "{spec: {serviceAccountName: admin, containers: [{name: d, image: db}]}}",
                "service account",
            ),
        ] {
            let why = refused(&source(&backup(template))).unwrap_or_default();
            assert!(why.contains(says), "{template}: {why}");
        }
    }
}
