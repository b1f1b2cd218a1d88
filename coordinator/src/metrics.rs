//! The coordinator's Prometheus metrics, named and labelled as the specification writes them
//! (§5.1), plus a few about the coordinator itself; served on `/metrics`.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub reconcile_total: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub dispatch_total: IntCounterVec,
    pub leader: IntGauge,
    pub agents: IntGauge,
    pub backup_duration: GaugeVec,
    pub backup_start: GaugeVec,
    pub backup_status: GaugeVec,
    pub backup_size: GaugeVec,
    pub backup_files: GaugeVec,
    pub repository_size: GaugeVec,
    pub repository_snapshots: GaugeVec,
    pub integrity_check_timestamp: GaugeVec,
    pub integrity_check_status: GaugeVec,
}

/// Values of the `status` label of `backup_status`.
pub const BACKUP_STATUSES: [&str; 3] = ["success", "failure", "partial"];

impl Metrics {
    // Kept whole: a flat list of metric definitions and registrations reads best in one place.
    pub fn new() -> Self {
        let registry = Registry::new();
        let backup = ["backup", "namespace"];
        let repo = ["repository", "namespace"];
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let m = Self {
            reconcile_total: IntCounterVec::new(
                Opts::new(
                    "restic_operator_reconcile_total",
                    "Reconciliations by controller and result",
                ),
                &["controller", "result"],
            )
            .expect("valid metric"),
            reconcile_duration: HistogramVec::new(
                HistogramOpts::new(
                    "restic_operator_reconcile_duration_seconds",
                    "Time spent in one reconciliation",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["controller"],
            )
            .expect("valid metric"),
            dispatch_total: IntCounterVec::new(
                Opts::new("restic_operator_dispatch_total", "Runs sent to agents, by kind"),
                &["kind"],
            )
            .expect("valid metric"),
            leader: IntGauge::new(
                "restic_operator_leader",
                "1 while this replica holds the leader lease",
            )
            .expect("valid metric"),
            agents: IntGauge::new("restic_operator_agents", "Node agents currently available")
                .expect("valid metric"),
            backup_duration: gauge("backup_duration_seconds", "Duration of the last backup", &backup),
            backup_start: gauge(
                "backup_start_timestamp",
                "Start of the last backup (Unix time)",
                &backup,
            ),
            backup_status: gauge(
                "backup_status",
                "1 for the result of the last backup (success, failure or partial), 0 for the others",
                &["backup", "namespace", "status"],
            ),
            backup_size: gauge(
                "backup_snapshot_size_bytes",
                "Bytes processed by the last backup",
                &backup,
            ),
            backup_files: gauge(
                "backup_snapshot_files_total",
                "Files processed by the last backup",
                &backup,
            ),
            repository_size: gauge(
                "restic_repository_size_bytes",
                "Repository size (restic stats)",
                &repo,
            ),
            repository_snapshots: gauge(
                "restic_repository_snapshots_total",
                "Snapshots in the repository",
                &repo,
            ),
            integrity_check_timestamp: gauge(
                "restic_repository_integrity_check_timestamp",
                "Time of the last integrity check (Unix time)",
                &repo,
            ),
            integrity_check_status: gauge(
                "restic_repository_integrity_check_status",
                "1 if the last integrity check passed, 0 if it failed",
                &repo,
            ),
            registry,
        };
        for c in [
            Box::new(m.reconcile_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.reconcile_duration.clone()),
            Box::new(m.dispatch_total.clone()),
            Box::new(m.leader.clone()),
            Box::new(m.agents.clone()),
        ] {
            m.registry.register(c).expect("unique metric");
        }
        m
    }

    /// Records one finished reconciliation.
    pub fn reconciled(&self, controller: &str, result: &str, seconds: f64) {
        self.reconcile_total
            .with_label_values(&[controller, result])
            .inc();
        self.reconcile_duration
            .with_label_values(&[controller])
            .observe(seconds);
    }

    /// Sets `backup_status` to 1 for `status` and 0 for the other values.
    pub fn set_backup_status(&self, backup: &str, namespace: &str, status: &str) {
        for s in BACKUP_STATUSES {
            self.backup_status
                .with_label_values(&[backup, namespace, s])
                .set(if s == status { 1.0 } else { 0.0 });
        }
    }

    /// Drops the series of backups and repositories that no longer exist: `backups` and
    /// `repositories` are the `(namespace, name)` pairs that do.
    pub fn retain(
        &self,
        backups: &std::collections::HashSet<(String, String)>,
        repositories: &std::collections::HashSet<(String, String)>,
    ) {
        let backup_gauges = [
            &self.backup_duration,
            &self.backup_start,
            &self.backup_status,
            &self.backup_size,
            &self.backup_files,
        ];
        let repo_gauges = [
            &self.repository_size,
            &self.repository_snapshots,
            &self.integrity_check_timestamp,
            &self.integrity_check_status,
        ];
        let sweep =
            |gauges: &[&GaugeVec], name_label: &str, keep: &std::collections::HashSet<(String, String)>| {
                for g in gauges {
                    for family in prometheus::core::Collector::collect(*g) {
                        for m in family.get_metric() {
                            let labels: std::collections::HashMap<&str, &str> =
                                m.get_label().iter().map(|l| (l.name(), l.value())).collect();
                            let key = (
                                labels.get("namespace").copied().unwrap_or_default().to_owned(),
                                labels.get(name_label).copied().unwrap_or_default().to_owned(),
                            );
                            if !keep.contains(&key) {
                                let _ = g.remove(&labels);
                            }
                        }
                    }
                }
            };
        sweep(&backup_gauges, "backup", backups);
        sweep(&repo_gauges, "repository", repositories);
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("metrics are UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn series_of_deleted_objects_are_dropped() {
        let m = Metrics::new();
        m.set_backup_status("kept", "ns", "success");
        m.set_backup_status("gone", "ns", "failure");
        m.repository_size.with_label_values(&["repo", "ns"]).set(1.0);
        let keep: HashSet<(String, String)> = [("ns".to_owned(), "kept".to_owned())].into();
        m.retain(&keep, &HashSet::new());
        let text = m.render();
        assert!(text.contains("backup=\"kept\""), "{text}");
        assert!(!text.contains("backup=\"gone\""), "{text}");
        assert!(!text.contains("repository=\"repo\""), "{text}");
    }
}
