//! The cluster tier's default StorageClass: a node-local provisioner like k3s's local-path, but
//! writing `local` PersistentVolumes (not `hostPath` ones), so the kubelet mounts each claim under
//! `<kubelet root>/pods/<uid>/volumes/kubernetes.io~local-volume/<pv>`, where the agent reads it.
//!
//! It follows the external-provisioner protocol: the class binds on first consumer, the
//! scheduler names the node in the claim's `volume.kubernetes.io/selected-node` annotation, and
//! the provisioner creates a directory and a PersistentVolume bound to the claim. A released
//! volume (its claim deleted; reclaim policy Delete) loses its directory and object.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// The default StorageClass's name and provisioner.
pub const STORAGE_CLASS: &str = "e2e-local";
pub const PROVISIONER: &str = "e2e.resticbackup.io/local";
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// Runs the provisioner on its own thread for the life of the process; volumes are directories
/// under `root`. Creates the default StorageClass first.
pub fn start(kubeconfig: &Path, root: &Path) -> Result<()> {
    std::fs::create_dir_all(root)?;
    let kubeconfig = kubeconfig.to_path_buf();
    let root = root.to_path_buf();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("provisioner".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("provisioner runtime");
            rt.block_on(async move {
                let client = match crate::client_from_kubeconfig(&kubeconfig).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(create_class(&client).await);
                loop {
                    if let Err(e) = provision_once(&client, &root).await {
                        eprintln!("[e2e provisioner] {e:#}");
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            })
        })?;
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("the provisioner did not start")?
}

async fn create_class(client: &Client) -> Result<()> {
    let classes: Api<StorageClass> = Api::all(client.clone());
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}
        },
        "provisioner": PROVISIONER,
        "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Delete"
    }))?;
    match classes.create(&PostParams::default(), &class).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).context("create the default StorageClass"),
    }
}

/// One pass: a volume for every pending claim of the class that has a node, and the removal of
/// released volumes.
async fn provision_once(client: &Client, root: &Path) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    for claim in claims.list(&ListParams::default()).await? {
        let spec = claim.spec.as_ref();
        let pending = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
        let ours = spec.and_then(|s| s.storage_class_name.as_deref()) == Some(STORAGE_CLASS);
        let node = claim
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SELECTED_NODE))
            .cloned();
        let (true, true, Some(node)) = (pending, ours, node) else {
            continue;
        };
        let uid = claim.metadata.uid.clone().context("claim without uid")?;
        let name = format!("pvc-{uid}");
        if volumes.get_opt(&name).await?.is_some() {
            continue;
        }
        let ns = claim.metadata.namespace.clone().unwrap_or_default();
        let claim_name = claim.metadata.name.clone().unwrap_or_default();
        let dir = root.join(format!("{ns}_{claim_name}_{uid}"));
        std::fs::create_dir_all(&dir)?;
        // Any pod user may write its fresh volume, as with local-path's default.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        let size = spec
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.clone())
            .unwrap_or_else(|| "1Gi".into());
        let modes = spec
            .and_then(|s| s.access_modes.clone())
            .unwrap_or_else(|| vec!["ReadWriteOnce".into()]);
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}
            },
            "spec": {
                "capacity": {"storage": size},
                "accessModes": modes,
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": STORAGE_CLASS,
                "volumeMode": "Filesystem",
                "claimRef": {
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "namespace": ns, "name": claim_name, "uid": uid
                },
                "local": {"path": dir.display().to_string()},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}
                ]}]}}
            }
        }))?;
        match volumes.create(&PostParams::default(), &pv).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).context("create a PersistentVolume"),
        }
    }
    for pv in volumes.list(&ListParams::default()).await? {
        let ours = pv
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("pv.kubernetes.io/provisioned-by"))
            .map(String::as_str)
            == Some(PROVISIONER);
        let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
        if !(ours && released) {
            continue;
        }
        if let Some(path) = pv
            .spec
            .as_ref()
            .and_then(|s| s.local.as_ref())
            .map(|l| PathBuf::from(&l.path))
            .filter(|p| p.starts_with(root))
        {
            let _ = std::fs::remove_dir_all(path);
        }
        let name = pv.metadata.name.clone().unwrap_or_default();
        let _ = volumes.delete(&name, &DeleteParams::default()).await;
    }
    Ok(())
}
