//! customSource on the real node: a SQLite database (Debian's sqlite3) dumped by a pod the
//! operator makes from the user's template, backed up from the dump pod's volume, restored
//! with a ResticRestore onto the app's claim and loaded back into the app's database, which then
//! holds what it held; a failing dump fails the backup with the end of its log.

use std::time::Duration;

use anyhow::{Result, ensure};
use restic_operator_api::common::RunResult;

use crate::support::{Ctx, no_pods, restore};

/// A claim and a Deployment whose pod runs Debian's sqlite3 with the claim at /data.
fn shop() -> String {
    r#"apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: shop-data, annotations: {volumeType: local}}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: shop}}
  template:
    metadata: {labels: {app: shop}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: app
          image: e2e.local/sqlite:3
          imagePullPolicy: Never
          command: [sh, -c, "trap 'exit 0' TERM; while true; do sleep 1; done"]
          volumeMounts: [{name: data, mountPath: /data}]
      volumes: [{name: data, persistentVolumeClaim: {claimName: shop-data}}]
"#
    .to_owned()
}

/// A ResticBackup `name` whose dump container runs `script` with the shop's claim at /db.
fn dump_backup(name: &str, script: &str) -> String {
    format!(
        r#"apiVersion: backup.resticbackup.io/v1alpha1
kind: ResticBackup
metadata: {{name: {name}}}
spec:
  repositoryRef: {{name: main}}
  schedule: "0 3 * * *"
  manualTrigger: now
  source:
    customSource:
      backupPath: /backup
      podTemplate:
        spec:
          containers:
            - name: dump
              image: e2e.local/sqlite:3
              imagePullPolicy: Never
              command: [sh, -c, {script:?}]
              volumeMounts: [{{name: db, mountPath: /db, readOnly: true}}]
          volumes: [{{name: db, persistentVolumeClaim: {{claimName: shop-data}}}}]
"#
    )
}

/// Runs `command` in the shop's app container; its standard output.
fn in_shop(ctx: &Ctx, command: &[&str]) -> Result<String> {
    let mut args = vec!["exec", "deployment/shop", "-c", "app", "--"];
    args.extend_from_slice(command);
    ctx.kubectl(&args)
}

#[tokio::test]
async fn a_sqlite_dump_from_a_custom_source_loads_back_into_an_identical_database() -> Result<()> {
    let ctx = Ctx::new("dump").await?;
    let repo = ctx.repository("main");
    ctx.create_repository("main", &repo)?;
    ctx.apply(&shop())?;
    ctx.running_pod("shop").await?;
    let sql = "create table orders(id integer primary key, item text not null, cents integer); \
               insert into orders(item, cents) values ('tea', 350), ('cake', 420), ('o''clock', 0); \
               create index orders_item on orders(item);";
    in_shop(&ctx, &["sqlite3", "/data/shop.db", sql])?;
    let original = in_shop(&ctx, &["sqlite3", "/data/shop.db", ".dump"])?;

    ctx.apply(&dump_backup(
        "shop-dump",
        "sqlite3 /db/shop.db .dump > /backup/shop.sql",
    ))?;
    let run = ctx
        .finished_run("shop-dump", None, Duration::from_secs(180))
        .await?;
    ensure!(
        run.result == Some(RunResult::Succeeded),
        "{run:?}\n{}",
        ctx.diagnostics()
    );
    no_pods(
        &ctx.client,
        &ctx.namespace,
        "app.kubernetes.io/component=dump",
        "the dump pod removed",
    )
    .await?;

    // The dump is at the stable path, and loads into a database identical to the original.
    let restored = restore(&repo, run.snapshot_id.as_deref().unwrap_or_default())?;
    let dump = restored.path().join("data/shop.sql");
    let db = restored.path().join("loaded.db");
    let load = std::process::Command::new("sqlite3")
        .arg(&db)
        .stdin(std::fs::File::open(&dump)?)
        .output()?;
    ensure!(load.status.success(), "{}", String::from_utf8_lossy(&load.stderr));
    let loaded = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(".dump")
        .output()?;
    ensure!(
        String::from_utf8_lossy(&loaded.stdout) == original,
        "the loaded database differs:\n{}\nvs\n{original}",
        String::from_utf8_lossy(&loaded.stdout)
    );

    // The app loses its database; a ResticRestore puts the dump next to it on its claim
    // (restored live, through the running app pod's node), and the app loads it back.
    in_shop(&ctx, &["rm", "/data/shop.db"])?;
    ctx.apply(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRestore\nmetadata: {name: shop-back}\n\
         spec: {backupRef: {name: shop-dump}, target: {pvc: {claimName: shop-data, path: /restored}}}\n",
    )?;
    ctx.completed_restore("shop-back", Duration::from_secs(120))
        .await?;
    in_shop(
        &ctx,
        &["sh", "-c", "sqlite3 /data/shop.db < /data/restored/shop.sql"],
    )?;
    let reloaded = in_shop(&ctx, &["sqlite3", "/data/shop.db", ".dump"])?;
    ensure!(
        reloaded == original,
        "the app's reloaded database differs:\n{reloaded}\nvs\n{original}"
    );

    // A dump that fails fails the backup, with what it printed last.
    ctx.apply(&dump_backup(
        "broken",
        "echo 'dumping shop'; echo 'Error: unable to open database /db/missing.db' >&2; exit 3",
    ))?;
    let failed = ctx.finished_run("broken", None, Duration::from_secs(180)).await?;
    let message = failed.message.clone().unwrap_or_default();
    ensure!(failed.result == Some(RunResult::Failed), "{failed:?}");
    ensure!(
        message.contains("exit code 3") && message.contains("unable to open database"),
        "{message}"
    );
    no_pods(
        &ctx.client,
        &ctx.namespace,
        "app.kubernetes.io/component=dump",
        "the failed dump pod removed",
    )
    .await?;
    Ok(())
}
