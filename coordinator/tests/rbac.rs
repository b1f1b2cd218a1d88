//! The user-facing roles of `rbac/aggregated.yaml` on a real API server, whose
//! controller-manager aggregates them into the built-in `view`, `edit` and `admin` ClusterRoles.
//! Users are impersonated by the admin client; each holds one built-in role in the test's
//! namespace through a RoleBinding, as a namespace's users usually do.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, Resource};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::repository::ResticRepository;
use restic_operator_api::restore::ResticRestore;
use restic_operator_api::retention::GlobalRetentionPolicy;
use restic_operator_e2e::{TestContext, eventually, install_crds};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

const AGGREGATED: &str = include_str!("../rbac/aggregated.yaml");

/// Server-side applies the aggregated ClusterRoles (idempotent: tests in parallel apply the same
/// objects).
async fn apply_aggregated(client: &Client) -> Result<()> {
    let api = Api::<ClusterRole>::all(client.clone());
    for doc in serde_yaml::Deserializer::from_str(AGGREGATED) {
        let role = ClusterRole::deserialize(doc)?;
        let name = role.metadata.name.clone().context("ClusterRole without a name")?;
        api.patch(
            &name,
            &PatchParams::apply("restic-operator-e2e").force(),
            &Patch::Apply(&role),
        )
        .await?;
    }
    Ok(())
}

/// Gives `user` the built-in ClusterRole `role` in the test namespace.
async fn bind(ctx: &TestContext, role: &str, user: &str) -> Result<()> {
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{user}-{role}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))?;
    Api::<RoleBinding>::namespaced(ctx.client.clone(), &ctx.namespace)
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// A client acting as `user` (the admin impersonating them).
async fn client_as(ctx: &TestContext, user: &str) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(&ctx.env.kubeconfig)?;
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.auth_info.impersonate = Some(user.into());
    Ok(Client::try_from(config)?)
}

/// One of the specification's example manifests, moved into `namespace`.
fn sample<K: DeserializeOwned + Resource>(yaml: &str, namespace: &str) -> Result<K> {
    let mut object: K = serde_yaml::from_str(yaml)?;
    object.meta_mut().namespace = Some(namespace.into());
    Ok(object)
}

fn api<K>(client: &Client, namespace: &str) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    Api::namespaced(client.clone(), namespace)
}

/// Whether the API server refused the call for lack of permission (and not for another reason).
fn forbidden<T: std::fmt::Debug>(result: kube::Result<T>) -> Result<bool> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(true),
        Err(e) => Err(e.into()),
        Ok(_) => Ok(false),
    }
}

/// Creates `object` as `client`, retrying while the role aggregation has not reached the
/// user's role yet.
async fn create_eventually<K>(client: &Client, object: &K) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let ns = object.meta().namespace.clone().unwrap_or_default();
    let what = format!(
        "create {} {}",
        K::kind(&()),
        object.meta().name.clone().unwrap_or_default()
    );
    eventually(&what, Duration::from_secs(60), || async {
        let created = api::<K>(client, &ns).create(&PostParams::default(), object).await;
        Ok((!forbidden(created)?).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_editors_back_up_and_restore_but_only_admins_choose_repositories() -> Result<()> {
    let ctx = TestContext::new("aggregated-roles").await?;
    install_crds(&ctx.client, &restic_operator_api::crds()).await?;
    apply_aggregated(&ctx.client).await?;
    let ns = ctx.namespace.clone();
    bind(&ctx, "edit", "editor").await?;
    bind(&ctx, "view", "viewer").await?;
    bind(&ctx, "admin", "owner").await?;
    let editor = client_as(&ctx, "editor").await?;
    let viewer = client_as(&ctx, "viewer").await?;
    let owner = client_as(&ctx, "owner").await?;

    let backup: ResticBackup = sample(include_str!("../../samples/spec/02-resticbackup.yaml"), &ns)?;
    let restore: ResticRestore = sample(include_str!("../../samples/spec/03-resticrestore.yaml"), &ns)?;
    let repository: ResticRepository =
        sample(include_str!("../../samples/spec/01-resticrepository.yaml"), &ns)?;
    let retention: GlobalRetentionPolicy = sample(
        include_str!("../../samples/spec/04-globalretentionpolicy.yaml"),
        &ns,
    )?;

    // `edit`: backups and restores of the namespace's own volumes.
    create_eventually(&editor, &backup).await?;
    create_eventually(&editor, &restore).await?;
    let backups = api::<ResticBackup>(&editor, &ns);
    let name = backup.metadata.name.clone().unwrap();
    backups
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"manualTrigger": "now"}})),
        )
        .await?;
    // ... but not the coordinator's status, and not the backup targets.
    ensure!(
        forbidden(
            backups
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"lastManualTrigger": "now"}})),
                )
                .await
        )?,
        "an editor wrote a backup's status"
    );
    ensure!(
        forbidden(
            api::<ResticRepository>(&editor, &ns)
                .create(&PostParams::default(), &repository)
                .await
        )?,
        "an editor created a ResticRepository"
    );
    ensure!(
        forbidden(
            api::<GlobalRetentionPolicy>(&editor, &ns)
                .create(&PostParams::default(), &retention)
                .await
        )?,
        "an editor created a GlobalRetentionPolicy"
    );

    // `admin`: also repositories and repository-wide retention.
    create_eventually(&owner, &repository).await?;
    create_eventually(&owner, &retention).await?;

    // `view`: reads everything, changes nothing.
    let seen = eventually("the viewer lists backups", Duration::from_secs(60), || async {
        match api::<ResticBackup>(&viewer, &ns)
            .list(&ListParams::default())
            .await
        {
            Ok(list) => Ok(Some(list.items.len())),
            Err(kube::Error::Api(e)) if e.code == 403 => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    ensure!(seen == 1, "the viewer sees {seen} backups");
    api::<ResticRepository>(&viewer, &ns)
        .get(&repository.metadata.name.clone().unwrap())
        .await?;
    let mut another = backup.clone();
    another.metadata.name = Some("another".into());
    ensure!(
        forbidden(
            api::<ResticBackup>(&viewer, &ns)
                .create(&PostParams::default(), &another)
                .await
        )?,
        "a viewer created a ResticBackup"
    );
    ensure!(
        forbidden(
            api::<ResticBackup>(&viewer, &ns)
                .delete(&name, &DeleteParams::default())
                .await
        )?,
        "a viewer deleted a ResticBackup"
    );

    // Nothing outside the namespace the roles were granted in.
    let elsewhere = TestContext::new("aggregated-roles-elsewhere").await?;
    let mut foreign = backup.clone();
    foreign.metadata.namespace = Some(elsewhere.namespace.clone());
    match api::<ResticBackup>(&editor, &elsewhere.namespace)
        .create(&PostParams::default(), &foreign)
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => bail!("an editor of {ns} created a backup in another namespace: {other:?}"),
    }
    Ok(())
}

const CUSTOM_SOURCE_POLICY: &str = include_str!("../rbac/custom-source-policy.yaml");

/// Server-side applies the customSource admission policy and its binding (cluster-wide;
/// tests that create customSource backups do so as the admin, who may create pods).
async fn apply_custom_source_policy(client: &Client) -> Result<()> {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let pp = PatchParams::apply("restic-operator-e2e").force();
    let mut docs = serde_yaml::Deserializer::from_str(CUSTOM_SOURCE_POLICY);
    let policy = ValidatingAdmissionPolicy::deserialize(docs.next().context("the policy")?)?;
    let binding = ValidatingAdmissionPolicyBinding::deserialize(docs.next().context("the binding")?)?;
    let name = policy.metadata.name.clone().unwrap_or_default();
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .patch(&name, &pp, &Patch::Apply(&policy))
        .await?;
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .patch(&name, &pp, &Patch::Apply(&binding))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_source_needs_the_right_to_create_pods() -> Result<()> {
    let ctx = TestContext::new("custom-source-policy").await?;
    install_crds(&ctx.client, &restic_operator_api::crds()).await?;
    apply_custom_source_policy(&ctx.client).await?;
    let ns = ctx.namespace.clone();
    // A user who may write ResticBackups but not create pods.
    let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(json!({
        "metadata": {"name": "backups-only"},
        "rules": [{"apiGroups": ["backup.resticbackup.io"], "resources": ["resticbackups"],
                   "verbs": ["get", "list", "create", "update", "patch"]}]
    }))?;
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(ctx.client.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "backups-only"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "backups-only"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "backups-only"}]
    }))?;
    Api::<RoleBinding>::namespaced(ctx.client.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await?;
    let limited = client_as(&ctx, "backups-only").await?;
    let dump: ResticBackup = sample(
        include_str!("../../samples/alternatives/02-backup-customsource-source.yaml"),
        &ns,
    )?;
    let plain: ResticBackup = sample(include_str!("../../samples/spec/02-resticbackup.yaml"), &ns)?;

    // A backup of a claim is theirs to make; a dump pod is not.
    create_eventually(&limited, &plain).await?;
    let refused = eventually("the policy in force", Duration::from_secs(60), || async {
        match api::<ResticBackup>(&limited, &ns)
            .create(&PostParams::default(), &dump)
            .await
        {
            Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("customSource") => {
                Ok(Some(e.message))
            }
            Err(kube::Error::Api(e)) if e.code == 403 => Ok(None),
            Ok(_) => {
                let name = dump.metadata.name.clone().unwrap_or_default();
                api::<ResticBackup>(&ctx.client, &ns)
                    .delete(&name, &DeleteParams::default())
                    .await?;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    assert!(
        refused.contains("only someone who may create pods here"),
        "{refused}"
    );

    // The admin (who may create pods) makes it; the limited user may still trigger it, but
    // not change what its pod runs.
    api::<ResticBackup>(&ctx.client, &ns)
        .create(&PostParams::default(), &dump)
        .await?;
    let name = dump.metadata.name.clone().unwrap_or_default();
    let backups = api::<ResticBackup>(&limited, &ns);
    backups
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"manualTrigger": "now"}})),
        )
        .await?;
    let changed = backups
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"source": {"customSource": {"backupPath": "/elsewhere"}}}})),
        )
        .await;
    ensure!(
        forbidden(changed)?,
        "a user who may not create pods changed a dump pod's template"
    );
    Ok(())
}
