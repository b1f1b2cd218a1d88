//! The shared cluster with the chart installed, and one test's slice of it. Shared by the
//! cluster tier's two test binaries, each of which uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use restic_operator_api::backup::{BackupRun, ResticBackup};
use restic_operator_e2e::cluster::{Cluster, workspace_binaries};
use restic_operator_e2e::fixtures::make_tree;
use restic_operator_e2e::{ResticRepo, TEST_NAMESPACE_LABEL, eventually, unique_name};

/// The namespace and release name of the chart.
pub const OPERATOR_NAMESPACE: &str = "restic-operator";
pub const RELEASE: &str = "restic-operator";

pub struct Env {
    pub cluster: Cluster,
    /// The agent binary, also the on-call debug CLI.
    pub agent: PathBuf,
}

/// The cluster with the chart installed, started on first use.
pub fn env() -> &'static Env {
    static ENV: OnceLock<std::result::Result<Env, String>> = OnceLock::new();
    match ENV.get_or_init(|| start().map_err(|e| format!("{e:#}"))) {
        Ok(env) => env,
        Err(e) => panic!("the cluster tier could not start: {e}"),
    }
}

fn start() -> Result<Env> {
    let (coordinator, agent) = workspace_binaries()?;
    let cluster = Cluster::from_env(restic_operator_e2e::state_dir(), &coordinator, &agent)?;
    cluster.install_operator(RELEASE, OPERATOR_NAMESPACE, &test_values())?;
    Ok(Env { cluster, agent })
}

/// The node of a Ready agent of the chart, for the debug CLI's `--node`.
pub async fn agent_node(client: &Client) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    eventually("a ready agent", Duration::from_secs(60), || async {
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
            .await?;
        Ok(list.items.into_iter().find_map(|p| {
            let ready = p
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(p.spec?.node_name?)
        }))
    })
    .await
}

/// Values of the test installation: the node's kubelet root, quick timeouts.
pub fn test_values() -> Vec<String> {
    vec![
        "coordinator.extraArgs={--repository-timeout=20s,--progress-interval=1s,--holder-start-timeout=60s,--agent-lost-timeout=60s}".into(),
        format!("rbac.debugSubjects[0].kind=Group,rbac.debugSubjects[0].name={ONCALL_GROUP},rbac.debugSubjects[0].apiGroup=rbac.authorization.k8s.io"),
    ]
}

/// The group the chart lets use the debug CLI in the tests.
pub const ONCALL_GROUP: &str = "e2e-oncall";

/// A claim and a Deployment of one busybox pod that mounts it at /data. The claim asks k3s's
/// local-path provisioner for a `local` volume (its default, hostPath, is refused); other
/// provisioners ignore the annotation.
pub fn app(name: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {name}-data, annotations: {{volumeType: local}}}}
spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: 1
  strategy: {{type: Recreate}}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: app
          image: e2e.local/busybox:1.35
          imagePullPolicy: Never
          command: [sh, -c, "trap 'exit 0' TERM; while true; do sleep 1; done"]
          volumeMounts: [{{name: data, mountPath: /data}}]
      volumes: [{{name: data, persistentVolumeClaim: {{claimName: {name}-data}}}}]
"#
    )
}

/// The ids of a repository's snapshots, sorted.
pub fn snapshot_ids(repo: &ResticRepo) -> Result<Vec<String>> {
    let out = repo
        .restic()?
        .args(["snapshots", "--json", "--no-lock"])
        .output()?;
    if !out.status.success() {
        bail!("restic snapshots: {}", String::from_utf8_lossy(&out.stderr));
    }
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let mut ids: Vec<String> = list
        .iter()
        .filter_map(|s| s["id"].as_str().map(String::from))
        .collect();
    ids.sort();
    Ok(ids)
}

/// Restores `snapshot` of `repo` with restic into a fresh directory.
pub fn restore(repo: &ResticRepo, snapshot: &str) -> Result<tempfile::TempDir> {
    let target = tempfile::tempdir()?;
    let out = repo
        .restic()?
        .args(["restore", snapshot, "--target"])
        .arg(target.path())
        .output()?;
    if !out.status.success() {
        bail!("restic restore: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(target)
}

/// Waits until no pod in `namespace` matches `labels` (empty: no pod at all).
pub async fn no_pods(client: &Client, namespace: &str, labels: &str, what: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    eventually(what, Duration::from_secs(60), || async {
        Ok(pods
            .list(&ListParams::default().labels(labels))
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await
}

/// The volume of an app's claim, reached as a user would, through the app's running pod
/// (`kubectl exec`, the volume at /data): the same on this machine's cluster and a user's.
pub struct Volume {
    namespace: String,
    app: String,
}

impl Volume {
    /// `kubectl exec` of `sh -c SCRIPT` in the app's pod, with `$1` = `arg`.
    fn sh(&self, script: &str, arg: &str) -> Result<Command> {
        let mut cmd = env().cluster.kubectl()?;
        cmd.args(["-n", &self.namespace, "exec", "-i"])
            .arg(format!("deployment/{}", self.app))
            .args(["-c", "app", "--", "sh", "-c", script, "sh", arg]);
        Ok(cmd)
    }

    /// Copies the local tree `source` to `rel` in the volume, with its modes, mtimes and
    /// symlinks.
    pub fn put_tree(&self, rel: &str, source: &Path) -> Result<()> {
        let archive = tar_of(source)?;
        let script = r#"mkdir -p "/data/$1" && cat > /tmp/tree.tar && wc -c < /tmp/tree.tar &&
            tar -x -f /tmp/tree.tar -C "/data/$1"; status=$?; rm -f /tmp/tree.tar; exit $status"#;
        self.send(script, rel, &archive)
            .with_context(|| format!("copy a tree to {rel} in the volume"))
    }

    /// Writes [`make_tree`]'s tree to `rel`, and returns a local copy of what the volume then
    /// holds: what a snapshot must equal (busybox's tar gives a symlink the time it made it,
    /// so the source's symlink times differ).
    pub fn put_test_tree(&self, rel: &str) -> Result<tempfile::TempDir> {
        let source = tempfile::tempdir()?;
        make_tree(source.path())?;
        self.put_tree(rel, source.path())?;
        self.copy_out(rel)
    }

    /// Writes `bytes` to the file `rel` of the volume.
    pub fn write(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        self.send(r#"cat > "/data/$1" && wc -c < "/data/$1""#, rel, bytes)
            .with_context(|| format!("write {rel} in the volume"))
    }

    /// Writes `len` random bytes (incompressible, and new each time) to the file `rel`: made
    /// in the pod, not sent through the API server.
    pub fn write_random(&self, rel: &str, len: usize) -> Result<()> {
        let script = format!(r#"head -c {len} /dev/urandom > "/data/$1" && wc -c < "/data/$1""#);
        let out = run_with_input(self.sh(&script, rel)?, b"")
            .with_context(|| format!("write {rel} in the volume"))?;
        ensure!(
            String::from_utf8_lossy(&out).trim() == len.to_string(),
            "{rel}: wrote {} of {len} bytes",
            String::from_utf8_lossy(&out).trim()
        );
        Ok(())
    }

    /// Sends `input` to `script` (which prints how many bytes it received), again when not
    /// all of it arrived: `kubectl exec` sometimes ends the remote command's input early when
    /// the machine is busy.
    fn send(&self, script: &str, arg: &str, input: &[u8]) -> Result<()> {
        let mut last = String::new();
        for attempt in 1..=3 {
            let out = run_with_input(self.sh(script, arg)?, input);
            let received = match &out {
                Ok(out) => String::from_utf8_lossy(out).trim().to_string(),
                Err(e) => format!("{e:#}"),
            };
            if received == input.len().to_string() {
                return Ok(());
            }
            eprintln!(
                "[e2e] kubectl exec, attempt {attempt}: sent {} bytes, {received}",
                input.len()
            );
            last = received;
        }
        bail!("sent {} bytes three times; the last time: {last}", input.len())
    }

    /// The contents of the file `rel` of the volume.
    pub fn read(&self, rel: &str) -> Result<Vec<u8>> {
        run_with_input(self.sh(r#"cat "/data/$1""#, rel)?, b"")
            .with_context(|| format!("read {rel} in the volume"))
    }

    /// A local copy of the tree `rel` of the volume.
    pub fn copy_out(&self, rel: &str) -> Result<tempfile::TempDir> {
        let archive = run_with_input(self.sh(r#"tar -c -f - -C "/data/$1" ."#, rel)?, b"")
            .with_context(|| format!("copy {rel} out of the volume"))?;
        let copy = tempfile::tempdir()?;
        let mut untar = Command::new("tar");
        untar.args(["-x", "-f", "-", "-C"]).arg(copy.path());
        run_with_input(untar, &archive)?;
        Ok(copy)
    }
}

/// A tar archive of the directory `dir`'s contents.
fn tar_of(dir: &Path) -> Result<Vec<u8>> {
    let out = Command::new("tar")
        .args(["-c", "-f", "-", "--numeric-owner", "-C"])
        .arg(dir)
        .arg(".")
        .output()?;
    ensure!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Runs `cmd` with `input` on its standard input; its standard output.
fn run_with_input(mut cmd: Command, input: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the input writer panicked"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    written?;
    Ok(out.stdout)
}

/// One test's namespace, bucket and client.
pub struct Ctx {
    pub client: Client,
    pub namespace: String,
    pub id: String,
    _gate: Gate,
}

/// Tests share the node's one agent. A test that deletes it holds the gate alone, so no other
/// test has a run in flight then; the others share it.
enum Gate {
    Shared(OwnedRwLockReadGuard<()>),
    Exclusive(OwnedRwLockWriteGuard<()>),
}

fn gate() -> Arc<RwLock<()>> {
    static GATE: OnceLock<Arc<RwLock<()>>> = OnceLock::new();
    GATE.get_or_init(|| Arc::new(RwLock::new(()))).clone()
}

impl Ctx {
    /// A test that leaves the operator alone.
    pub async fn new(name: &str) -> Result<Self> {
        let gate = Gate::Shared(gate().read_owned().await);
        Self::with_gate(name, gate).await
    }

    /// A test that deletes or restarts the agent: it runs while no other test does.
    pub async fn disruptive(name: &str) -> Result<Self> {
        let gate = Gate::Exclusive(gate().write_owned().await);
        Self::with_gate(name, gate).await
    }

    async fn with_gate(name: &str, gate: Gate) -> Result<Self> {
        let env = tokio::task::spawn_blocking(env).await?;
        let client = restic_operator_e2e::client_from_kubeconfig(&env.cluster.kubeconfig).await?;
        let id = unique_name(name);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(id.clone()),
                labels: Some([(TEST_NAMESPACE_LABEL.to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(Self {
            client,
            namespace: id.clone(),
            id,
            _gate: gate,
        })
    }

    /// A repository of this test in its own bucket on the S3 server pods reach.
    pub fn repository(&self, name: &str) -> ResticRepo {
        let s3 = &env().cluster.s3.endpoint;
        ResticRepo {
            url: s3.repository(&self.id, name),
            password: format!("password-of-{}-{name}", self.id),
            s3: s3.clone(),
        }
    }

    /// `kubectl apply` of YAML in this namespace.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.apply_in(&self.namespace, yaml)
    }

    /// `kubectl apply` of YAML in `namespace`.
    pub fn apply_in(&self, namespace: &str, yaml: &str) -> Result<()> {
        let file = env().cluster.dir.join(format!("{}-{}.yaml", self.id, uniq()));
        std::fs::write(&file, yaml)?;
        let out = env()
            .cluster
            .kubectl()?
            .args(["-n", namespace, "apply", "--server-side", "-f"])
            .arg(&file)
            .output()?;
        if !out.status.success() {
            bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// `kubectl -n <ns> ARGS`, its standard output.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = env()
            .cluster
            .kubectl()?
            .args(["-n", &self.namespace])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A Secret with the repository's credentials and a ResticRepository `name` for it.
    pub fn create_repository(&self, name: &str, repo: &ResticRepo) -> Result<()> {
        let mut data = format!("  RESTIC_PASSWORD: {}\n", repo.password);
        for (k, v) in repo.s3.env() {
            data.push_str(&format!("  {k}: {v}\n"));
        }
        self.apply(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-creds}}\nstringData:\n{data}---\n\
             apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\nmetadata: {{name: {name}}}\n\
             spec: {{repositoryURL: '{}', credentialsSecretRef: {{name: {name}-creds}}}}\n",
            repo.url
        ))
    }

    /// Deploys [`app`] `name`, waits for its pod, and returns its claim's volume.
    pub async fn deploy_app(&self, name: &str) -> Result<Volume> {
        self.apply(&app(name))?;
        self.running_pod(name).await?;
        Ok(Volume {
            namespace: self.namespace.clone(),
            app: name.to_string(),
        })
    }

    /// Scales app `name` to zero and waits until its pods are gone: its claim stays bound
    /// and no running pod mounts it.
    pub async fn scale_to_zero(&self, name: &str) -> Result<()> {
        self.kubectl(&["scale", &format!("deployment/{name}"), "--replicas=0"])?;
        no_pods(
            &self.client,
            &self.namespace,
            &format!("app={name}"),
            &format!("the pods of {name} gone"),
        )
        .await
    }

    /// Waits until one pod with `app=<app>` runs and returns its UID.
    pub async fn running_pod(&self, app: &str) -> Result<String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        eventually(
            &format!("a running pod of {app}"),
            Duration::from_secs(90),
            || async {
                let list = pods
                    .list(&ListParams::default().labels(&format!("app={app}")))
                    .await?;
                Ok(list.items.into_iter().find_map(|p| {
                    let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                    let deleting = p.metadata.deletion_timestamp.is_some();
                    (running && !deleting).then(|| p.metadata.uid.clone().unwrap_or_default())
                }))
            },
        )
        .await
    }

    /// Waits until ResticRestore `name` has ended and checks it Completed; returns its status.
    pub async fn completed_restore(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<restic_operator_api::restore::ResticRestoreStatus> {
        let restores: Api<restic_operator_api::restore::ResticRestore> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let status = eventually(&format!("restore {name} ended"), timeout, || async {
            let r = restores.get(name).await?;
            Ok(r.is_finished().then(|| r.status.unwrap_or_default()))
        })
        .await
        .with_context(|| self.diagnostics())?;
        ensure!(
            status.phase == Some(restic_operator_api::restore::RestorePhase::Completed),
            "{status:?}\n{}",
            self.diagnostics()
        );
        Ok(status)
    }

    /// Waits for a finished backup run of `name` other than the run `previous` (None: any), and
    /// returns it.
    pub async fn finished_run(
        &self,
        name: &str,
        previous: Option<&str>,
        timeout: Duration,
    ) -> Result<BackupRun> {
        let backups: Api<ResticBackup> = Api::namespaced(self.client.clone(), &self.namespace);
        eventually(&format!("a finished run of {name}"), timeout, || async {
            let b = backups.get(name).await?;
            Ok(b.status
                .and_then(|s| s.last_backup)
                .filter(|r| r.result.is_some() && r.run_id.as_deref() != previous))
        })
        .await
        .with_context(|| self.diagnostics())
    }

    /// What a failing test should show: the backups, events and the operator's logs.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for args in [
            vec!["get", "rbackup,rrepo,pods", "-o", "wide"],
            vec!["get", "events", "--sort-by=.lastTimestamp"],
        ] {
            out.push_str(&self.kubectl(&args).unwrap_or_else(|e| e.to_string()));
        }
        for component in ["coordinator", "agent"] {
            let logs = env()
                .cluster
                .kubectl()
                .and_then(|mut c| {
                    Ok(c.args([
                        "-n",
                        OPERATOR_NAMESPACE,
                        "logs",
                        "--tail=40",
                        "-l",
                        &format!("app.kubernetes.io/component={component}"),
                    ])
                    .output()?)
                })
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            out.push_str(&format!("\n--- {component} log ---\n{logs}"));
        }
        out
    }
}

/// On a user's cluster a test removes its namespace (and with it its app, claim and
/// resources) when it ends; a local cluster goes away as a whole, and keeps what a failed test
/// left until then. `kubectl delete namespace -l e2e.resticbackup.io/test` removes what a
/// killed run left.
impl Drop for Ctx {
    fn drop(&mut self) {
        if env().cluster.local.is_some() {
            return;
        }
        if let Ok(mut kubectl) = env().cluster.kubectl() {
            let _ = kubectl
                .args(["delete", "namespace", &self.namespace, "--wait=false"])
                .output();
        }
    }
}

fn uniq() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
