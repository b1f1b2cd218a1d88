//! Start-up: metrics endpoint, leader election, PKI, agent discovery, the controllers, and
//! certificate renewal. Only the leader reconciles; a replica that loses the lease exits so
//! that it can never dispatch next to a new leader.

use std::sync::Arc;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Controller;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::repository::ResticRepository;
use restic_operator_api::restore::ResticRestore;
use restic_operator_api::retention::GlobalRetentionPolicy;

use crate::agents::Agents;
use crate::config::Config;
use crate::context::Context;
use crate::context::error_policy;
use crate::leader::Elector;
use crate::metrics::Metrics;
use crate::{backup, pki, policy, repository, resolve, restore};

async fn serve_metrics(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = Arc::clone(&metrics);
                async move { m.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("metrics listen address {}", config.metrics_listen))?;
    tracing::info!(listen = %config.metrics_listen, "serving /metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// Runs the coordinator until its controllers stop or it loses the lease.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = connect(&config).await?;
    let metrics = Arc::new(Metrics::new());
    serve_metrics(&config, Arc::clone(&metrics)).await?;

    let identity = config.identity();
    let elector = Elector::new(
        client.clone(),
        &config.namespace,
        &config.lease_name,
        &identity,
        config.lease_duration,
    );
    if !await_leadership(&elector, &config).await {
        return Ok(());
    }
    metrics.leader.set(1);
    // Renew from now on, before the slower start-up below.
    let holder = hold_lease(elector, &config);

    let ctx = build_context(&client, &config, &metrics).await?;
    spawn_background_tasks(&ctx);
    let controllers = spawn_controllers(&client, &config, &ctx);
    tracing::info!(identity = %identity, "coordinator running");
    // Metric series of deleted objects go with them (deletions do not wake a reconcile).
    spawn_metric_sweep(
        Arc::clone(&metrics),
        controllers.backups,
        controllers.repositories,
    );

    tokio::select! {
        _ = holder => {
            metrics.leader.set(0);
            anyhow::bail!("lost leadership; exiting so that only the new leader dispatches");
        }
        _ = futures::future::join_all(controllers.tasks) => {
            tracing::info!("controllers stopped");
        }
    }
    Ok(())
}

/// Connects to the Kubernetes API: through `--kubeconfig` if given, else in-cluster or KUBECONFIG.
async fn connect(config: &Config) -> anyhow::Result<Client> {
    let client = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            let c = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
            Client::try_from(c)?
        }
        None => Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?,
    };
    Ok(client)
}

/// Waits for the lease (unless election is off); `false` when a signal stopped the wait.
async fn await_leadership(elector: &Elector, config: &Config) -> bool {
    if !config.no_leader_election {
        tokio::select! {
            _ = elector.acquire(config.lease_renew_interval) => {}
            _ = tokio::signal::ctrl_c() => return false,
            _ = terminate() => return false,
        }
    }
    true
}

/// Keeps renewing the lease in a task that ends when it is lost (never, with election off).
fn hold_lease(elector: Elector, config: &Config) -> tokio::task::JoinHandle<()> {
    let no_election = config.no_leader_election;
    let interval = config.lease_renew_interval;
    tokio::spawn(async move {
        if no_election {
            std::future::pending::<()>().await
        } else {
            elector.hold(interval).await
        }
    })
}

/// Sets up the PKI and the agent discovery, and builds the context the controllers share.
async fn build_context(
    client: &Client,
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Arc<Context>> {
    let pki = pki::ensure(client, config)
        .await
        .context("setting up the agent certificates")?;
    let agents = watch_agents(client, config, &pki).await;
    Ok(Arc::new(Context::new(
        client.clone(),
        config.clone(),
        agents,
        Arc::clone(metrics),
        pki,
    )))
}

/// Watches the agent pods and returns the agents, after waiting up to 10s for the first list.
async fn watch_agents(client: &Client, config: &Config, pki: &pki::Pki) -> Agents {
    // Agent pods in our namespace.
    let (reader, writer) = reflector::store::<Pod>();
    let agent_pods = Api::<Pod>::namespaced(client.clone(), &config.namespace);
    let agent_watch = watcher(
        agent_pods,
        watcher::Config::default().labels(&config.agent_selector),
    )
    .default_backoff()
    .modify(lean)
    .reflect(writer)
    .touched_objects()
    .for_each(|_| async {});
    tokio::spawn(agent_watch);
    let agents = Agents::new(reader.clone(), pki, config.agent_port, &config.agent_server_name);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), reader.wait_until_ready()).await;
    agents
}

/// Starts the side tasks: the agent count metric, certificate renewal, the debug signer.
fn spawn_background_tasks(ctx: &Arc<Context>) {
    {
        let ctx = Arc::clone(ctx);
        tokio::spawn(async move {
            loop {
                ctx.metrics.agents.set(ctx.agents.count() as i64);
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
    }
    tokio::spawn(renew_certificates(Arc::clone(ctx)));
    tokio::spawn(crate::debugcerts::run(Arc::clone(ctx)));
}

/// The running controllers, and the caches of the objects they watch.
struct Controllers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    backups: Vec<reflector::Store<ResticBackup>>,
    repositories: Vec<reflector::Store<ResticRepository>>,
}

/// Starts the repository and backup controllers for each watched namespace (or for all).
fn spawn_controllers(client: &Client, config: &Config, ctx: &Arc<Context>) -> Controllers {
    let namespaces: Vec<Option<String>> = if config.watch_namespaces.is_empty() {
        vec![None]
    } else {
        config.watch_namespaces.iter().cloned().map(Some).collect()
    };
    let mut controllers = Controllers {
        tasks: Vec::new(),
        backups: Vec::new(),
        repositories: Vec::new(),
    };
    for ns in namespaces {
        spawn_namespace_controllers(client, ns, ctx, &mut controllers);
    }
    controllers
}

/// Starts the repository and backup controllers of one namespace (`None`: all namespaces).
fn spawn_namespace_controllers(
    client: &Client,
    ns: Option<String>,
    ctx: &Arc<Context>,
    controllers: &mut Controllers,
) {
    let api = |c: &Client| -> (Api<ResticBackup>, Api<ResticRepository>) {
        match &ns {
            Some(ns) => (Api::namespaced(c.clone(), ns), Api::namespaced(c.clone(), ns)),
            None => (Api::all(c.clone()), Api::all(c.clone())),
        }
    };
    let (backups, repos) = api(client);
    let repo_controller = lean_controller(repos);
    controllers.repositories.push(repo_controller.store());
    let repo_controller = repo_controller
        .shutdown_on_signal()
        .run(repository::reconcile, error_policy, Arc::clone(ctx))
        .for_each(|_| async {});
    // Backups follow their repository's readiness; repositories in other namespaces are
    // watched cluster-wide only when all namespaces are.
    let backup_controller = lean_controller(backups);
    let store = backup_controller.store();
    controllers.backups.push(store.clone());
    let (_, repo_watch) = api(client);
    let backup_controller = backup_controller
        .watches(repo_watch, watcher::Config::default(), move |repo| {
            resolve::referencing(&store.state(), &repo, |b| &b.spec.repository_ref)
        })
        .shutdown_on_signal()
        .run(backup::reconcile, error_policy, Arc::clone(ctx))
        .for_each(|_| async {});
    controllers.tasks.push(tokio::spawn(repo_controller));
    controllers.tasks.push(tokio::spawn(backup_controller));
    controllers
        .tasks
        .push(tokio::spawn(policy_controller(client, ns.as_deref(), ctx)));
    controllers
        .tasks
        .push(tokio::spawn(restore_controller(client, ns.as_deref(), ctx)));
}

/// kubectl's copy of the last applied object, in an annotation.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What the controllers keep of a watched object: all but the API server's record of who wrote
/// which field (`managedFields`) and kubectl's copy of the last applied object. Nothing here
/// reads them, each can be larger than the rest of a ResticBackup, and the controllers keep
/// every object they watch in memory.
fn lean<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// A controller of every `K` that `api` lists, keeping them [`lean`].
fn lean_controller<K>(api: Api<K>) -> Controller<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let objects = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(lean)
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(objects, reader)
}

/// The ResticRestore controller of one watched namespace (or of all).
fn restore_controller(
    client: &Client,
    ns: Option<&str>,
    ctx: &Arc<Context>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let restores: Api<ResticRestore> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    lean_controller(restores)
        .shutdown_on_signal()
        .run(restore::reconcile, error_policy, Arc::clone(ctx))
        .for_each(|_| async {})
}

/// The GlobalRetentionPolicy controller of one watched namespace (or of all), which follows
/// its repositories' readiness like the backup controller.
fn policy_controller(
    client: &Client,
    ns: Option<&str>,
    ctx: &Arc<Context>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let (policies, repos): (Api<GlobalRetentionPolicy>, Api<ResticRepository>) = match ns {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let controller = lean_controller(policies);
    let store = controller.store();
    controller
        .watches(repos, watcher::Config::default(), move |repo| {
            resolve::referencing(&store.state(), &repo, |p| &p.spec.repository_ref)
        })
        .shutdown_on_signal()
        .run(policy::reconcile, error_policy, Arc::clone(ctx))
        .for_each(|_| async {})
}

/// Every 10 seconds, drops the metric series of backups and repositories that no longer exist.
fn spawn_metric_sweep(
    metrics: Arc<Metrics>,
    backup_stores: Vec<reflector::Store<ResticBackup>>,
    repo_stores: Vec<reflector::Store<ResticRepository>>,
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            let backups = object_keys(
                backup_stores
                    .iter()
                    .flat_map(|s: &kube::runtime::reflector::Store<ResticBackup>| s.state())
                    .map(|b| (b.metadata.namespace.clone(), b.metadata.name.clone()))
                    .collect(),
            );
            let repos = object_keys(
                repo_stores
                    .iter()
                    .flat_map(|s: &kube::runtime::reflector::Store<ResticRepository>| s.state())
                    .map(|r| (r.metadata.namespace.clone(), r.metadata.name.clone()))
                    .collect(),
            );
            metrics.retain(&backups, &repos);
        }
    });
}

/// `(namespace, name)` pairs, a missing part empty (pure).
fn object_keys(
    objects: Vec<(Option<String>, Option<String>)>,
) -> std::collections::HashSet<(String, String)> {
    objects
        .into_iter()
        .map(|(ns, n)| (ns.unwrap_or_default(), n.unwrap_or_default()))
        .collect()
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// Renews the agent certificate (and this process's client certificate) before they expire.
async fn renew_certificates(ctx: Arc<Context>) {
    loop {
        tokio::time::sleep(ctx.config.cert_check_interval).await;
        let renew_at = chrono::Utc::now().timestamp() + ctx.config.cert_renew_before.as_secs() as i64;
        match pki::ensure(&ctx.client, &ctx.config).await {
            Ok(fresh) => {
                if ctx.pki().client_not_after <= renew_at || ctx.pki().ca.cert != fresh.ca.cert {
                    ctx.agents.set_pki(&fresh);
                    *ctx.pki.write().expect("pki lock") = fresh;
                    tracing::info!("renewed the coordinator's client certificate");
                }
            }
            Err(e) => tracing::warn!(error = %e, "certificate renewal failed; retrying"),
        }
    }
}
