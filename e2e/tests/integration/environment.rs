//! The test environment itself behaves like a real cluster: CRDs, garbage collection, RBAC,
//! and restic against the S3 server.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, DynamicObject, ObjectMeta, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Resource, ResourceExt};
use restic_operator_e2e::fixtures::{assert_trees_equal, make_tree};
use restic_operator_e2e::{TestContext, eventually, install_crds};

#[tokio::test]
async fn a_crd_installs_and_its_custom_resources_are_served() -> Result<()> {
    let ctx = TestContext::new("crd-install").await?;
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.e2e.resticbackup.io"},
        "spec": {
            "group": "e2e.resticbackup.io",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "required": ["size"], "properties": {
                        "size": {"type": "integer", "minimum": 1}}}}}}
            }]
        }
    }))?;
    install_crds(&ctx.client, &[crd]).await?;

    let gvk = GroupVersionKind::gvk("e2e.resticbackup.io", "v1", "Widget");
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &ctx.namespace, &ApiResource::from_gvk(&gvk));
    let mut widget = DynamicObject::new("w1", &ApiResource::from_gvk(&gvk));
    widget.data = serde_json::json!({"spec": {"size": 3}});
    api.create(&PostParams::default(), &widget).await?;
    assert_eq!(api.get("w1").await?.data["spec"]["size"], 3);

    // The schema is enforced: a real API server, not a key-value store.
    let mut bad = DynamicObject::new("w2", &ApiResource::from_gvk(&gvk));
    bad.data = serde_json::json!({"spec": {"size": 0}});
    let err = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("size 0 must be rejected");
    assert!(err.to_string().contains("spec.size"), "{err}");
    ctx.cleanup().await
}

#[tokio::test]
async fn a_job_owned_by_a_configmap_is_garbage_collected_with_its_owner() -> Result<()> {
    let ctx = TestContext::new("garbage-collection").await?;
    let cms = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ctx.namespace);
    let owner = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("owner".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), &ctx.namespace);
    let job: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "owned"},
        "spec": {"template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}}}
    }))?;
    let mut job = job;
    job.metadata.owner_references = Some(vec![OwnerReference {
        api_version: ConfigMap::api_version(&()).into(),
        kind: ConfigMap::kind(&()).into(),
        name: owner.name_any(),
        uid: owner.uid().context("owner without uid")?,
        ..Default::default()
    }]);
    jobs.create(&PostParams::default(), &job).await?;

    // The Job controller runs: it creates the Job's pod (which stays Pending: no nodes here).
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(ctx.client.clone(), &ctx.namespace);
    eventually(
        "the Job controller to create a pod",
        Duration::from_secs(30),
        || async {
            let list = pods
                .list(&kube::api::ListParams::default().labels("job-name=owned"))
                .await?;
            Ok((!list.items.is_empty()).then_some(()))
        },
    )
    .await?;

    cms.delete("owner", &DeleteParams::background()).await?;
    eventually(
        "the garbage collector to delete the owned Job",
        Duration::from_secs(60),
        || async { Ok(jobs.get_opt("owned").await?.is_none().then_some(())) },
    )
    .await?;
    ctx.cleanup().await
}

#[tokio::test]
async fn a_restricted_service_account_is_denied_what_its_role_does_not_grant() -> Result<()> {
    let ctx = TestContext::new("rbac").await?;
    let ns = ctx.namespace.clone();
    let roles = Api::<Role>::namespaced(ctx.client.clone(), &ns);
    roles
        .create(
            &PostParams::default(),
            &Role {
                metadata: ObjectMeta {
                    name: Some("configmap-reader".into()),
                    ..Default::default()
                },
                rules: Some(vec![PolicyRule {
                    api_groups: Some(vec![String::new()]),
                    resources: Some(vec!["configmaps".into()]),
                    verbs: vec!["get".into(), "list".into()],
                    ..Default::default()
                }]),
            },
        )
        .await?;
    Api::<RoleBinding>::namespaced(ctx.client.clone(), &ns)
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: ObjectMeta {
                    name: Some("reader".into()),
                    ..Default::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: "configmap-reader".into(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: "reader".into(),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                }]),
            },
        )
        .await?;
    let restricted = ctx.client_as_service_account("reader").await?;
    let cms = Api::<ConfigMap>::namespaced(restricted.clone(), &ns);

    // Granted: list config maps in its own namespace.
    cms.list(&Default::default())
        .await
        .context("the Role grants list")?;
    // Not granted: create, reading Secrets, and anything in another namespace.
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("x".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    assert_forbidden(
        cms.create(&PostParams::default(), &cm).await.map(|_| ()),
        "create configmaps",
    )?;
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(restricted.clone(), &ns);
    assert_forbidden(
        secrets.list(&Default::default()).await.map(|_| ()),
        "list secrets",
    )?;
    let other = Api::<ConfigMap>::namespaced(restricted, "default");
    assert_forbidden(
        other.list(&Default::default()).await.map(|_| ()),
        "list configmaps in default",
    )?;
    ctx.cleanup().await
}

fn assert_forbidden(result: kube::Result<()>, what: &str) -> Result<()> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 403 => {
            ensure!(
                e.message.contains("forbidden"),
                "403 for {what} without 'forbidden': {}",
                e.message
            );
            Ok(())
        }
        other => anyhow::bail!("expected 403 Forbidden for {what}, got {other:?}"),
    }
}

#[tokio::test]
async fn restic_backs_up_to_s3_and_restores_a_directory_byte_for_byte() -> Result<()> {
    let ctx = TestContext::new("restic-s3").await?;
    let repo = ctx.repository("repo");
    let src = ctx.tmp.path().join("src");
    make_tree(&src)?;

    run(repo.restic()?.arg("init"))?;
    let out = run(repo
        .restic()?
        .current_dir(&src)
        .args(["backup", "--json", "--host", "e2e", "."]))?;
    let summary = out
        .lines()
        .rev()
        .find(|l| l.contains("\"message_type\":\"summary\""))
        .context("no summary")?;
    let summary: serde_json::Value = serde_json::from_str(summary)?;
    ensure!(summary["files_new"] == 4, "unexpected summary {summary}");

    let dst = ctx.tmp.path().join("dst");
    run(repo.restic()?.args(["restore", "latest", "--target"]).arg(&dst))?;
    // A backup of "." restores at the top of the target.
    assert_trees_equal(&src, &dst)?;

    // The data really is in the S3 server's storage, not somewhere local.
    ensure!(
        ctx.env.s3.root.join(&ctx.id).join("repo").join("config").exists(),
        "no repo config in the bucket"
    );
    ctx.cleanup().await
}

fn run(cmd: &mut std::process::Command) -> Result<String> {
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}
