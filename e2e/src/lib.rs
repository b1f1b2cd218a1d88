//! Test support for restic-operator: a real Kubernetes control plane, a real S3 server and real
//! restic, started once per test binary and shared by its tests, torn down when it exits.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let ctx = restic_operator_e2e::TestContext::new("my-test").await?;
//! // ctx.client: kube::Client, ctx.namespace: a fresh namespace, ctx.repository(..): an S3 repo
//! # Ok(()) }
//! ```
//!
//! With `RESTIC_OPERATOR_E2E_KUBECONFIG` set, the suites run against that cluster instead of a
//! local control plane or node (the S3 server and restic still run on this machine; the cluster
//! tier also needs `RESTIC_OPERATOR_E2E_S3_ADDRESS`, see [`cluster::Cluster::from_env`]).
//! If the environment cannot start, every test fails with the reason; nothing is skipped.

pub mod certs;
pub mod cluster;
pub mod controlplane;
pub mod fixtures;
pub mod node;
pub mod operator;
pub mod process;
pub mod provisioner;
pub mod s3;
pub mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::controlplane::ControlPlane;
use crate::s3::{S3Endpoint, S3Server};

/// A restic repository in its own bucket on the shared S3 server, for tests without a cluster.
pub fn s3_repository(bucket: &str, name: &str) -> ResticRepo {
    let s3 = shared_s3().endpoint.clone();
    ResticRepo {
        url: s3.repository(bucket, name),
        password: format!("password-of-{bucket}-{name}"),
        s3,
    }
}

/// A unique, DNS-safe id (`e-<name>-<pid>-<n>`), valid as a namespace and a bucket name.
pub fn unique_name(name: &str) -> String {
    unique_id(name)
}

/// Environment variable naming a kubeconfig of an existing cluster to test against.
pub const EXTERNAL_KUBECONFIG_ENV: &str = "RESTIC_OPERATOR_E2E_KUBECONFIG";
/// Environment variable: with `EXTERNAL_KUBECONFIG_ENV`, an IPv4 address of this machine that
/// the cluster's pods reach, where the cluster tier's S3 server listens.
pub const EXTERNAL_S3_ADDRESS_ENV: &str = "RESTIC_OPERATOR_E2E_S3_ADDRESS";
/// Label on every namespace a test creates.
pub const TEST_NAMESPACE_LABEL: &str = "e2e.resticbackup.io/test";

/// The shared environment of one test binary.
pub struct TestEnv {
    /// Admin kubeconfig of the cluster under test.
    pub kubeconfig: PathBuf,
    /// The local control plane, unless an external cluster is used.
    pub control_plane: Option<ControlPlane>,
    pub s3: &'static S3Server,
    /// Scratch space of this test binary (logs of the control plane and S3 server live here).
    pub state_dir: PathBuf,
}

/// Scratch space of this test binary: `/tmp/restic-operator-e2e/<pid>`, with the state of
/// earlier runs whose process is gone removed.
pub fn state_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::temp_dir().join("restic-operator-e2e");
        remove_stale_state(&base);
        let dir = base.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).expect("create the test state dir");
        dir
    })
}

/// The S3 server shared by the tests of this binary (without a control plane: the agent's
/// tests need only this). Panics with the reason if it cannot start.
pub fn shared_s3() -> &'static S3Server {
    static S3: OnceLock<std::result::Result<S3Server, String>> = OnceLock::new();
    match S3.get_or_init(|| S3Server::start(state_dir()).map_err(|e| format!("{e:#}"))) {
        Ok(s3) => s3,
        Err(e) => panic!("the S3 server could not start: {e}"),
    }
}

impl TestEnv {
    /// The shared environment, started on first use. Panics with the reason if it cannot start.
    pub fn get() -> &'static TestEnv {
        static ENV: OnceLock<std::result::Result<TestEnv, String>> = OnceLock::new();
        match ENV.get_or_init(|| Self::start().map_err(|e| format!("{e:#}"))) {
            Ok(env) => env,
            Err(e) => panic!("the test environment could not start: {e}"),
        }
    }

    fn start() -> Result<Self> {
        let state_dir = state_dir().to_path_buf();
        let s3 = shared_s3();
        let (kubeconfig, control_plane) = match std::env::var_os(EXTERNAL_KUBECONFIG_ENV) {
            Some(path) => (PathBuf::from(path), None),
            None => {
                let plane = ControlPlane::start(&state_dir.join("control-plane")).context(
                    "start the local control plane (etcd, kube-apiserver, kube-controller-manager)",
                )?;
                (plane.admin_kubeconfig.clone(), Some(plane))
            }
        };
        Ok(Self {
            kubeconfig,
            control_plane,
            s3,
            state_dir,
        })
    }

    /// An admin client. Create one per test: a client is bound to the runtime it was made on.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// `kubectl` (the pinned one) as admin.
    pub fn kubectl(&self) -> Result<Command> {
        let mut cmd = Command::new(tools::tool("kubectl")?);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        Ok(cmd)
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path).with_context(|| format!("read {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Removes the state of earlier test runs whose process is gone.
fn remove_stale_state(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let alive = name
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// One test's slice of the environment: its own namespace, S3 bucket and temp dir.
pub struct TestContext {
    pub env: &'static TestEnv,
    pub client: Client,
    pub namespace: String,
    /// A unique, DNS-safe id for this test (used for the namespace and bucket names).
    pub id: String,
    pub tmp: tempfile::TempDir,
}

impl TestContext {
    /// Starts (or joins) the environment and creates a fresh namespace for `name`.
    pub async fn new(name: &str) -> Result<Self> {
        let env = tokio::task::spawn_blocking(TestEnv::get).await?;
        let client = env.client().await?;
        let id = unique_id(name);
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
            .await
            .with_context(|| format!("create namespace {id}"))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir_in(&env.state_dir)?;
        Ok(Self {
            env,
            client,
            namespace: id.clone(),
            id,
            tmp,
        })
    }

    /// `kubectl -n <namespace>` as admin.
    pub fn kubectl(&self) -> Result<Command> {
        let mut cmd = self.env.kubectl()?;
        cmd.arg("-n").arg(&self.namespace);
        Ok(cmd)
    }

    /// The S3 server's endpoint and credentials.
    pub fn s3(&self) -> &S3Endpoint {
        &self.env.s3.endpoint
    }

    /// A restic repository of this test, in its own bucket, not yet initialized.
    pub fn repository(&self, name: &str) -> ResticRepo {
        ResticRepo {
            url: self.s3().repository(&self.id, name),
            password: format!("password-of-{}-{name}", self.id),
            s3: self.s3().clone(),
        }
    }

    /// A kubeconfig file acting as ServiceAccount `name` of this namespace (created if
    /// missing), for a process such as the coordinator.
    pub async fn kubeconfig_as_service_account(&self, name: &str) -> Result<PathBuf> {
        let kubeconfig = self.service_account_kubeconfig(name).await?;
        let path = self.tmp.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&path, serde_yaml::to_string(&kubeconfig)?)?;
        Ok(path)
    }

    /// A client acting as ServiceAccount `name` of this namespace (created if missing), with a
    /// short-lived token from the TokenRequest API: what a pod running as it would get.
    pub async fn client_as_service_account(&self, name: &str) -> Result<Client> {
        let kubeconfig = self.service_account_kubeconfig(name).await?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    async fn service_account_kubeconfig(&self, name: &str) -> Result<Kubeconfig> {
        let api = Api::<ServiceAccount>::namespaced(self.client.clone(), &self.namespace);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let token = api
            .create_token_request(name, &PostParams::default(), &request)
            .await?
            .status
            .context("TokenRequest without status")?
            .token;
        let mut kubeconfig = Kubeconfig::read_from(&self.env.kubeconfig)?;
        for named in &mut kubeconfig.auth_infos {
            named.auth_info = Some(kube::config::AuthInfo {
                token: Some(token.clone().into()),
                ..Default::default()
            });
        }
        Ok(kubeconfig)
    }

    /// Deletes the namespace (the local control plane dies with the test binary anyway; this
    /// matters on an external cluster).
    pub async fn cleanup(self) -> Result<()> {
        Api::<Namespace>::all(self.client.clone())
            .delete(&self.namespace, &DeleteParams::background())
            .await?;
        Ok(())
    }
}

/// A restic repository on the test S3 server.
#[derive(Clone, Debug)]
pub struct ResticRepo {
    pub url: String,
    pub password: String,
    pub s3: S3Endpoint,
}

impl ResticRepo {
    /// The environment restic needs for this repository.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = self.s3.env();
        env.push(("RESTIC_REPOSITORY".into(), self.url.clone()));
        env.push(("RESTIC_PASSWORD".into(), self.password.clone()));
        env
    }

    /// `restic` (the pinned one) with this repository's environment and no cache.
    pub fn restic(&self) -> Result<Command> {
        let mut cmd = Command::new(tools::tool("restic")?);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.env())
            .arg("--no-cache");
        Ok(cmd)
    }

    /// The ids of the repository's locks, read without taking one.
    pub fn lock_ids(&self) -> Result<Vec<String>> {
        let out = self.restic()?.args(["list", "locks", "--no-lock"]).output()?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

/// `<name>-<pid>-<n>`, sanitized to a DNS label (namespace) that is also a valid bucket name.
fn unique_id(name: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!("-{}-{n}", std::process::id());
    let mut base: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    base.truncate(63 - 2 - suffix.len());
    let base = base.trim_matches('-');
    format!(
        "e{}{suffix}",
        if base.is_empty() {
            String::new()
        } else {
            format!("-{base}")
        }
    )
}

/// A finished command's standard output and error, together, for assertion messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Installs (server-side applies) CRDs and waits until the API server serves them.
pub async fn install_crds(
    client: &Client,
    crds: &[k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition],
) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let pp = PatchParams::apply("restic-operator-e2e").force();
    for crd in crds {
        let name = crd.metadata.name.clone().context("CRD without name")?;
        api.patch(&name, &pp, &Patch::Apply(crd))
            .await
            .with_context(|| format!("apply CRD {name}"))?;
        let established = kube::runtime::wait::conditions::is_crd_established();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            kube::runtime::wait::await_condition(api.clone(), &name, established),
        )
        .await
        .with_context(|| format!("CRD {name} not established within 30s"))??;
    }
    Ok(())
}

/// Polls `check` every 100 ms until it returns `Some`, failing after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::unique_id;

    #[test]
    fn unique_ids_are_dns_labels_and_distinct() {
        let a = unique_id("Restic_Backup/Restore test with a very long name that goes on and on");
        let b = unique_id("Restic_Backup/Restore test with a very long name that goes on and on");
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert!(id.len() <= 63, "{id}");
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{id}"
            );
            assert!(id.starts_with('e') && !id.ends_with('-'), "{id}");
        }
    }
}
