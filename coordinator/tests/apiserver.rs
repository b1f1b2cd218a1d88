//! The fault suite's row for the Kubernetes API server going away with a backup in flight. A
//! binary of its own: it stops the control plane that every test of its binary shares. The row
//! joins the others' table (`e2e/scripts/faults.sh` runs both binaries).

#[path = "faults/common.rs"]
mod common;
mod support;
#[path = "faults/table.rs"]
mod table;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::{SLOW_BACKUP, backup_ended, fresh_data, now_ms, record, repeats};
use restic_operator_proto::v1 as pb;
use support::{Node, ready_repository, restic_snapshots, wait_dispatched};
use table::{Row, spread};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_down_with_a_backup_in_flight() -> Result<()> {
    let n = repeats(5);
    let down = Duration::from_secs(30);
    let mut row = Row::new(
        "5-apiserver-down",
        "kube-apiserver down 30 s, a backup in flight",
        n,
        "runs in flight finish; status is written once it returns; no duplicate run",
    );
    let outcome = async {
        let mut node = Node::start("fault-apiserver").await?;
        let plane = restic_operator_e2e::TestEnv::get()
            .control_plane
            .as_ref()
            .context("this row stops the local control plane's API server")?;
        let repo = ready_repository(&node, "main").await?;
        let (_, data) = node.app_pod("db-0", "db", "data").await?;
        node.apply_yaml(SLOW_BACKUP).await?;
        let agent = node.agent_client().await?;
        let (mut late, mut exited, mut wrong, mut ids) = (Vec::new(), 0, Vec::new(), HashSet::new());
        let mut finished_while_down = 0;
        for i in 0..n {
            fresh_data(&data, i)?;
            node.trigger("db", &format!("down-{i}")).await?;
            let run_id = wait_dispatched(&node, "db").await?;
            plane.stop_apiserver();
            let stopped = Instant::now();
            tokio::time::sleep(down).await;
            // Its client was made before: making one reads the CA from the API server.
            let finished = support::runs(&agent)
                .await?
                .into_iter()
                .find(|r| r.run_id == run_id)
                .is_some_and(|r| r.state == pb::RunState::Finished as i32);
            finished_while_down += usize::from(finished);
            // A leader that cannot renew its lease exits rather than risk a second leader; its
            // Deployment starts it again, which this does once the API server answers.
            let gone = node.coordinators[0].process.child.try_wait()?.is_some();
            tokio::task::block_in_place(|| plane.start_apiserver())?;
            let back = now_ms();
            let was_down = stopped.elapsed();
            if gone {
                exited += 1;
                node.coordinators.clear();
                node.start_coordinator("coordinator-a").await?;
            }
            let end = backup_ended(&node, &run_id, i, back, Duration::from_secs(120)).await?;
            if let Some(last) = end.wrong {
                wrong.push(format!("{run_id} (down {was_down:?}): {last:?}"));
            }
            ids.extend(end.snapshot_id);
            late.push(end.late);
        }
        let backups = support::runs(&agent)
            .await?
            .into_iter()
            .filter(|r| r.kind == pb::RunKind::Backup as i32)
            .count();
        let snapshots = restic_snapshots(&repo)?.len();
        row.measured = format!(
            "{finished_while_down} of {n} runs finished on the agent while the API server was down; \
             the coordinator exited (lease lost) {exited} of {n} times and was started again; \
             status written {} after the API server was ready; {snapshots} snapshots and {backups} \
             agent runs for {n} runs, {} distinct ids in status; wrong results: {}",
            spread(late.clone()),
            ids.len(),
            wrong.len()
        );
        if !wrong.is_empty() {
            eprintln!("{wrong:#?}");
        }
        let max = late.iter().max().copied().unwrap_or_default();
        Ok(wrong.is_empty()
            && snapshots == n
            && backups == n
            && ids.len() == n
            && max <= Duration::from_secs(30))
    }
    .await;
    record(row, outcome)
}
