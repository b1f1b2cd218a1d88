//! A node for the coordinator's tests: the real control plane and S3 server, the real
//! `restic-coordinator` and `restic-agent` binaries, and pod objects whose UIDs map to a
//! kubelet-shaped directory the agent reads. No kubelet runs, so the tests set pod status
//! (Running, IP, Ready) themselves, as a kubelet would.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::repository::ResticRepository;
pub use restic_operator_e2e::operator::{Agent, Coordinator};
use restic_operator_e2e::{ResticRepo, TestContext, eventually, install_crds, operator};
use restic_operator_proto::v1::agent_client::AgentClient;
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The agent binary, built once per test binary (it is another package of the workspace).
pub fn agent_binary() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let me = PathBuf::from(env!("CARGO_BIN_EXE_restic-coordinator"));
        let bin = me.with_file_name("restic-agent");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // The same profile as this binary (the benchmark runs in release).
        let release = me
            .parent()
            .and_then(|d| d.file_name())
            .is_some_and(|d| d == "release");
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "restic-operator-agent",
                "--bin",
                "restic-agent",
            ])
            .args(release.then_some("--release"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .map_err(|e| format!("cargo build of the agent: {e}"))?;
        if !status.success() || !bin.exists() {
            return Err(format!("building restic-agent failed ({status})"));
        }
        Ok(bin)
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The coordinator's RBAC manifests: its ClusterRole and the Role of its own namespace.
pub struct CoordinatorRbac<'a> {
    pub cluster_role: &'a str,
    pub role: &'a str,
}

/// The user the coordinator is when it runs with `CoordinatorRbac`: ServiceAccount
/// `coordinator` of the test namespace.
pub const COORDINATOR_SERVICE_ACCOUNT: &str = "coordinator";

/// One test's cluster: a namespace for the operator and the apps, a node with an agent.
pub struct Node {
    pub ctx: TestContext,
    pub client: Client,
    pub ns: String,
    pub name: String,
    pub dir: PathBuf,
    pub coordinators: Vec<Coordinator>,
    pub agent: Option<Agent>,
    /// Extra namespaces the coordinator watches.
    pub watch: Vec<String>,
    /// Extra coordinator flags.
    pub flags: Vec<String>,
    /// What the coordinator authenticates with.
    pub kubeconfig: PathBuf,
}

impl Node {
    /// A namespace, CRDs, one coordinator (leader) and an agent on node `<ns>-node`.
    pub async fn start(test: &str) -> Result<Self> {
        Self::start_with(test, &[], &[]).await
    }

    pub async fn start_with(test: &str, extra_namespaces: &[&str], flags: &[String]) -> Result<Self> {
        Self::start_as(test, extra_namespaces, flags, None).await
    }

    /// Like `start_with`; the coordinator runs as a ServiceAccount bound to exactly `rbac` (the
    /// ClusterRole cluster-wide, the Role in the test namespace, which is the operator's), or as
    /// admin when `None`.
    pub async fn start_as(
        test: &str,
        extra_namespaces: &[&str],
        flags: &[String],
        rbac: Option<CoordinatorRbac<'_>>,
    ) -> Result<Self> {
        let ctx = TestContext::new(test).await?;
        let client = ctx.client.clone();
        install_crds(&client, &restic_operator_api::crds()).await?;
        let kubeconfig = match rbac {
            None => ctx.env.kubeconfig.clone(),
            Some(rbac) => {
                use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
                let subjects = json!([{
                    "kind": "ServiceAccount",
                    "name": COORDINATOR_SERVICE_ACCOUNT,
                    "namespace": ctx.namespace
                }]);
                // Cluster-scoped: renamed per test, so tests in parallel do not share it.
                let mut cluster_role: ClusterRole = serde_yaml::from_str(rbac.cluster_role)?;
                let name = format!("{}-coordinator", ctx.namespace);
                cluster_role.metadata.name = Some(name.clone());
                Api::<ClusterRole>::all(client.clone())
                    .create(&PostParams::default(), &cluster_role)
                    .await?;
                let binding: ClusterRoleBinding = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                    "subjects": subjects
                }))?;
                Api::<ClusterRoleBinding>::all(client.clone())
                    .create(&PostParams::default(), &binding)
                    .await?;
                let role: Role = serde_yaml::from_str(rbac.role)?;
                let role = Api::<Role>::namespaced(client.clone(), &ctx.namespace)
                    .create(&PostParams::default(), &role)
                    .await?;
                let binding: RoleBinding = serde_json::from_value(json!({
                    "metadata": {"name": role.metadata.name},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role.metadata.name},
                    "subjects": subjects
                }))?;
                Api::<RoleBinding>::namespaced(client.clone(), &ctx.namespace)
                    .create(&PostParams::default(), &binding)
                    .await?;
                ctx.kubeconfig_as_service_account(COORDINATOR_SERVICE_ACCOUNT)
                    .await?
            }
        };
        let ns = ctx.namespace.clone();
        let dir = ctx.tmp.path().to_path_buf();
        let mut node = Self {
            name: format!("{ns}-node"),
            ctx,
            client,
            ns,
            dir,
            coordinators: Vec::new(),
            agent: None,
            watch: extra_namespaces.iter().map(|s| s.to_string()).collect(),
            flags: flags.to_vec(),
            kubeconfig,
        };
        node.start_coordinator("coordinator-a").await?;
        node.wait_leader(0).await?;
        let agent = Agent::start(&node.client, &agent_binary()?, &node.ns, &node.name, &node.dir).await?;
        node.agent = Some(agent);
        Ok(node)
    }

    /// Starts a coordinator replica with `identity`.
    pub async fn start_coordinator(&mut self, identity: &str) -> Result<usize> {
        let mut watch = vec![self.ns.clone()];
        watch.extend(self.watch.iter().cloned());
        let mut flags: Vec<String> = vec![
            format!("--watch-namespaces={}", watch.join(",")),
            "--lease-duration=6s".into(),
            "--lease-renew-interval=2s".into(),
            "--repository-timeout=15s".into(),
            "--progress-interval=1s".into(),
            "--agent-lost-timeout=30s".into(),
            "--starting-deadline=10m".into(),
        ];
        // A test's own flag replaces the default of the same name.
        let name = |f: &String| f.split('=').next().unwrap_or_default().to_owned();
        flags.retain(|f| !self.flags.iter().any(|t| name(t) == name(f)));
        flags.extend(self.flags.iter().cloned());
        let c = Coordinator::start(
            std::path::Path::new(env!("CARGO_BIN_EXE_restic-coordinator")),
            &self.kubeconfig,
            &self.ns,
            identity,
            &self.dir.join(identity),
            &flags,
        )
        .await?;
        self.coordinators.push(c);
        Ok(self.coordinators.len() - 1)
    }

    /// Waits until coordinator `i` reports leadership.
    pub async fn wait_leader(&self, i: usize) -> Result<()> {
        let c = &self.coordinators[i];
        eventually("leadership", Duration::from_secs(30), || async {
            Ok((c.metric("restic_operator_leader") == Some(1.0)).then_some(()))
        })
        .await
        .with_context(|| c.log())
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the node's agent")
    }

    /// Creates `pod` in the test namespace, Running and Ready with `ip`. Returns its UID.
    pub async fn create_running_pod(&self, pod: Pod, ip: &str) -> Result<String> {
        operator::create_running_pod(&self.client, &self.ns, pod, ip).await
    }

    /// An app pod on this node with an emptyDir volume `volume`. Returns the UID and the
    /// volume's directory.
    pub async fn app_pod(&self, name: &str, app: &str, volume: &str) -> Result<(String, PathBuf)> {
        let uid = operator::app_pod(&self.client, &self.ns, &self.name, name, app, volume).await?;
        let dir = self.agent().empty_dir(&uid, volume)?;
        Ok((uid, dir))
    }

    /// A repository Secret + ResticRepository for an S3 repository of this test.
    pub async fn repository(&self, name: &str, repo: &ResticRepo) -> Result<()> {
        let mut data = serde_json::Map::new();
        data.insert("RESTIC_PASSWORD".into(), json!(repo.password));
        for (k, v) in repo.s3.env() {
            data.insert(k, json!(v));
        }
        self.apply_secret(&format!("{name}-creds"), data).await?;
        self.apply_yaml(&format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\nmetadata: {{name: {name}}}\n\
             spec: {{repositoryURL: '{}', credentialsSecretRef: {{name: {name}-creds}}}}",
            repo.url
        ))
        .await
    }

    pub async fn apply_secret(
        &self,
        name: &str,
        data: serde_json::Map<String, serde_json::Value>,
    ) -> Result<()> {
        let secret: Secret = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))?;
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &secret)
            .await?;
        Ok(())
    }

    /// Server-side applies a ResticRepository or ResticBackup into the test namespace.
    pub async fn apply_yaml(&self, yaml: &str) -> Result<()> {
        let value: serde_json::Value = serde_yaml::from_str(yaml)?;
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let name = value["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let pp = PatchParams::apply("e2e-test").force();
        match kind.as_str() {
            "ResticRepository" => {
                self.repositories()
                    .patch(&name, &pp, &Patch::Apply(&value))
                    .await?;
            }
            "ResticBackup" => {
                self.backups().patch(&name, &pp, &Patch::Apply(&value)).await?;
            }
            "GlobalRetentionPolicy" => {
                self.policies().patch(&name, &pp, &Patch::Apply(&value)).await?;
            }
            "ResticRestore" => {
                self.restores().patch(&name, &pp, &Patch::Apply(&value)).await?;
            }
            other => bail!("apply_yaml: unsupported kind {other}"),
        }
        Ok(())
    }

    pub fn backups(&self) -> Api<ResticBackup> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn repositories(&self) -> Api<ResticRepository> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn policies(&self) -> Api<restic_operator_api::retention::GlobalRetentionPolicy> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn restores(&self) -> Api<restic_operator_api::restore::ResticRestore> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Waits until restore `name` has ended (Completed or Failed); returns its status.
    pub async fn wait_restored(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<restic_operator_api::restore::ResticRestoreStatus> {
        let api = self.restores();
        eventually(&format!("restore {name} ended"), timeout, || async {
            let r = api.get(name).await?;
            Ok(r.is_finished().then(|| r.status.unwrap_or_default()))
        })
        .await
        .with_context(|| self.coordinator_log())
    }

    /// Sets `spec.manualTrigger` (merge patch, as `kubectl patch` would).
    pub async fn trigger(&self, backup: &str, value: &str) -> Result<()> {
        self.backups()
            .patch(
                backup,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"manualTrigger": value}})),
            )
            .await?;
        Ok(())
    }

    /// Waits for a repository condition `Ready` with `reason`; returns its message.
    pub async fn wait_repository_reason(
        &self,
        name: &str,
        reason: &str,
        timeout: Duration,
    ) -> Result<String> {
        let api = self.repositories();
        eventually(
            &format!("repository {name} Ready reason {reason}"),
            timeout,
            || async {
                let r = api.get(name).await?;
                let c = r
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
                Ok(c.filter(|c| c.reason.as_deref() == Some(reason))
                    .map(|c| c.message.unwrap_or_default()))
            },
        )
        .await
        .with_context(|| self.coordinator_log())
    }

    /// Waits until the backup has finished more than `after_total` runs and none is in
    /// flight; returns the backup.
    pub async fn wait_finished(
        &self,
        name: &str,
        after_total: i64,
        timeout: Duration,
    ) -> Result<ResticBackup> {
        self.wait_finished_in(&self.ns, name, after_total, timeout).await
    }

    /// `wait_finished` for a backup in namespace `ns`.
    pub async fn wait_finished_in(
        &self,
        ns: &str,
        name: &str,
        after_total: i64,
        timeout: Duration,
    ) -> Result<ResticBackup> {
        let api: Api<ResticBackup> = Api::namespaced(self.client.clone(), ns);
        eventually(
            &format!("backup {name} run #{}", after_total + 1),
            timeout,
            || async {
                let b = api.get(name).await?;
                let total = b
                    .status
                    .as_ref()
                    .and_then(|s| s.statistics.as_ref())
                    .and_then(|s| s.total_backups)
                    .unwrap_or(0);
                let idle = b.status.as_ref().is_some_and(|s| s.active_run.is_none());
                Ok((total > after_total && idle).then_some(b))
            },
        )
        .await
        .with_context(|| self.coordinator_log())
    }

    /// Waits for the next finished run like `wait_finished` and checks it succeeded; returns
    /// its `lastBackup`.
    pub async fn wait_succeeded(
        &self,
        name: &str,
        after_total: i64,
        timeout: Duration,
    ) -> Result<restic_operator_api::backup::BackupRun> {
        self.wait_succeeded_in(&self.ns, name, after_total, timeout).await
    }

    /// `wait_succeeded` for a backup in namespace `ns`.
    pub async fn wait_succeeded_in(
        &self,
        ns: &str,
        name: &str,
        after_total: i64,
        timeout: Duration,
    ) -> Result<restic_operator_api::backup::BackupRun> {
        let done = self.wait_finished_in(ns, name, after_total, timeout).await?;
        let last = done.status.and_then(|s| s.last_backup).context("no lastBackup")?;
        anyhow::ensure!(
            last.result.map(|r| r.to_string()).as_deref() == Some("Succeeded"),
            "run of {name} did not succeed: {last:?}"
        );
        Ok(last)
    }

    /// The last lines of every coordinator's log, for failure messages.
    pub fn coordinator_log(&self) -> String {
        let mut out = String::new();
        for c in &self.coordinators {
            let log = c.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            out.push_str(&format!("--- {} ---\n", c.identity));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// A gRPC client for the agent, with a client certificate from the operator's CA.
    pub async fn agent_client(&self) -> Result<AgentClient<Channel>> {
        self.client_for(self.agent().port).await
    }

    /// The runs the node's agent knows, finished or not.
    pub async fn agent_runs(&self) -> Result<Vec<restic_operator_proto::v1::RunInfo>> {
        runs(&self.agent_client().await?).await
    }

    /// A gRPC client for an agent on a loopback port.
    pub async fn client_for(&self, port: u16) -> Result<AgentClient<Channel>> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let ca = secrets.get("restic-operator-ca").await?;
        let get = |k: &str| String::from_utf8(ca.data.as_ref().unwrap()[k].0.clone()).unwrap();
        let ca_pem = restic_operator_coordinator::pki::Pem {
            cert: get("ca.crt"),
            key: get("ca.key"),
        };
        let client = restic_operator_coordinator::pki::issue(
            &ca_pem,
            restic_operator_coordinator::pki::CLIENT_NAME,
            false,
            Duration::from_secs(86400),
        )?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca_pem.cert))
            .identity(Identity::from_pem(&client.cert, &client.key))
            .domain_name("restic-agent");
        let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))?
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(AgentClient::new(channel))
    }

    /// Pods of the test namespace with `label`.
    pub async fn pods(&self, label: &str) -> Result<Vec<Pod>> {
        Ok(Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default().labels(label))
            .await?
            .items)
    }
}

/// A ResticBackup manifest.
pub fn backup_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    )
}

/// A ResticRestore manifest.
pub fn restore_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRestore\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    )
}

/// A PersistentVolume `pv` and a claim `data` in `ns` bound to it, mounted by no pod.
pub async fn bound_claim(node: &Node, ns: &str, pv: &str) -> Result<()> {
    let volume: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "csi": {"driver": "e2e.resticbackup.io", "volumeHandle": pv},
                 "claimRef": {"namespace": ns, "name": "data"}, "persistentVolumeReclaimPolicy": "Retain"}
    }))?;
    Api::<PersistentVolume>::all(node.client.clone())
        .create(&PostParams::default(), &volume)
        .await?;
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}, "volumeName": pv}
    }))?;
    Api::<PersistentVolumeClaim>::namespaced(node.client.clone(), ns)
        .create(&PostParams::default(), &claim)
        .await?;
    Ok(())
}

/// The kubelet's directory of claim volume `pv` of pod `uid` on the test node.
pub fn csi_mount(node: &Node, uid: &str, pv: &str) -> PathBuf {
    node.agent()
        .kubelet
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~csi")
        .join(pv)
        .join("mount")
}

/// A running pod `app-0` on the node that mounts claim `data` (bound to a PV of the test);
/// returns the claim's directory under the pod.
pub async fn live_claim(node: &Node) -> Result<PathBuf> {
    let pv = format!("{}-pv", node.ns);
    bound_claim(node, &node.ns, &pv).await?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "app-0", "labels": {"app": "app"}},
        "spec": {"nodeName": node.name, "containers": [{"name": "app", "image": "busybox"}],
                 "volumes": [{"name": "state", "persistentVolumeClaim": {"claimName": "data"}}]}
    }))?;
    let uid = node.create_running_pod(pod, "10.1.0.20").await?;
    let dir = csi_mount(node, &uid, &pv);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A node with repository `main`, pod `db-0` whose volume `data` holds `fill`'s tree, and one
/// successful backup `db` of it; returns the node, the repository and the volume.
pub async fn backed_up(
    test: &str,
    fill: fn(&std::path::Path) -> Result<()>,
) -> Result<(Node, ResticRepo, PathBuf)> {
    let node = Node::start(test).await?;
    let repo = ready_repository(&node, "main").await?;
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    fill(&data)?;
    node.apply_yaml(&backup_yaml(
        "db",
        "  repositoryRef: {name: main}\n  schedule: '@yearly'\n  \
         source: {podVolumeBackup: {selector: {matchLabels: {app: db}}, volumeName: data}}\n",
    ))
    .await?;
    node.trigger("db", "once").await?;
    node.wait_succeeded("db", 0, Duration::from_secs(60)).await?;
    Ok((node, repo, data))
}

/// A ResticRepository on S3, initialized by the coordinator; returns its restic handle.
pub async fn ready_repository(node: &Node, name: &str) -> Result<restic_operator_e2e::ResticRepo> {
    let repo = node.ctx.repository(name);
    node.repository(name, &repo).await?;
    node.wait_repository_reason(name, "RepositoryInitialized", Duration::from_secs(60))
        .await?;
    Ok(repo)
}

/// The id of `name`'s run once it is in flight on the agent (its progress in status).
pub async fn wait_dispatched(node: &Node, name: &str) -> Result<String> {
    let api = node.backups();
    eventually(
        "the run in flight on the agent",
        Duration::from_secs(30),
        || async {
            let b = api.get(name).await?;
            let s = b.status.unwrap_or_default();
            Ok(match (s.active_run, s.progress) {
                (Some(a), Some(_)) if a.node_name.is_some() => Some(a.run_id),
                _ => None,
            })
        },
    )
    .await
    .with_context(|| node.coordinator_log())
}

/// Snapshots in `repo` as restic lists them.
pub fn restic_snapshots(repo: &ResticRepo) -> Result<Vec<serde_json::Value>> {
    let out = repo.restic()?.args(["snapshots", "--json"]).output()?;
    if !out.status.success() {
        bail!("restic snapshots: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The runs `agent` knows, finished or not.
pub async fn runs(agent: &AgentClient<Channel>) -> Result<Vec<restic_operator_proto::v1::RunInfo>> {
    let request = restic_operator_proto::v1::ListRunsRequest {};
    Ok(agent.clone().list_runs(request).await?.into_inner().runs)
}
