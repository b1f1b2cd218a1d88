//! The one conversion from a retention policy to the agent's `restic forget` request, for a
//! ResticBackup's `retention` and, later, a GlobalRetentionPolicy's rules. The agent turns the
//! request into restic's arguments (`agent/src/restic.rs`); nothing else does.
//!
//! `groupBy`: left out, the API's default `[host, tags]` applies. A GlobalRetentionPolicy's
//! list is used as written, and an empty one means no grouping (`restic forget --group-by
//! ''`): the policy counts all the selected snapshots at once. A ResticBackup's retention
//! always groups by host and tags too (`paths` may be added): restic selects by host and a
//! tag *superset*, so without them a backup's forget could count, and remove, the snapshots
//! of another backup with the same custom hostname and more tags. The request always says how
//! to group, so restic's own default (`host,paths`) never applies.

use restic_operator_api::common::{GroupBy, KeepPolicy};
use restic_operator_api::retention::SnapshotFilter;
use restic_operator_proto::v1 as pb;

/// Which snapshots a forget considers and how it groups them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selection {
    /// Only snapshots of this host (empty: any).
    pub host: String,
    /// Only snapshots with all of these tags (empty: any).
    pub tags: Vec<String>,
    pub group_by: Vec<GroupBy>,
}

impl Selection {
    /// The snapshots of one ResticBackup (its host and tags), grouped by host, tags and
    /// whatever else `group_by` lists.
    pub fn of_backup(host: String, tags: Vec<String>, group_by: &[GroupBy]) -> Self {
        let mut group_by: Vec<GroupBy> = group_by.to_vec();
        group_by.extend([GroupBy::Host, GroupBy::Tags]);
        group_by.sort();
        group_by.dedup();
        Self { host, tags, group_by }
    }

    /// The snapshots one rule of a GlobalRetentionPolicy selects, grouped by the policy's
    /// `groupBy`.
    pub fn of_rule(filter: &SnapshotFilter, group_by: &[GroupBy]) -> Self {
        Self {
            host: filter.hostname.clone().unwrap_or_default(),
            tags: filter.tags.clone(),
            group_by: group_by.to_vec(),
        }
    }
}

/// The keep counts of `policy`; unset and zero counts keep nothing by that rule (restic
/// treats 0 as unset too).
pub fn keep_policy(policy: &KeepPolicy) -> pb::KeepPolicy {
    let n = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    pb::KeepPolicy {
        last: n(policy.keep_last),
        hourly: n(policy.keep_hourly),
        daily: n(policy.keep_daily),
        weekly: n(policy.keep_weekly),
        monthly: n(policy.keep_monthly),
        yearly: n(policy.keep_yearly),
        ..Default::default()
    }
}

/// A forget of `selection` keeping what `policy` keeps, pruning afterwards when `prune`.
pub fn forget_request(
    options: pb::RunOptions,
    repository: pb::Repository,
    policy: &KeepPolicy,
    selection: Selection,
    prune: bool,
) -> pb::ForgetRequest {
    pb::ForgetRequest {
        options: Some(options),
        repository: Some(repository),
        policy: Some(keep_policy(policy)),
        group_by: selection.group_by.iter().map(|g| g.as_str().to_owned()).collect(),
        host: selection.host,
        tags: selection.tags,
        dry_run: false,
        prune,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use restic_operator_api::backup::RetentionSpec;

    fn spec(yaml: &str) -> RetentionSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn request(spec: &RetentionSpec) -> pb::ForgetRequest {
        let selection = Selection::of_backup("app".into(), vec!["namespace=apps".into()], &spec.group_by);
        forget_request(
            pb::RunOptions::default(),
            pb::Repository::default(),
            &spec.effective_policy(),
            selection,
            spec.prune,
        )
    }

    #[test]
    fn an_omitted_policy_is_the_old_scripts_grouped_by_host_and_tags() {
        let r = request(&spec("{}"));
        let p = r.policy.unwrap();
        assert_eq!(
            (p.last, p.hourly, p.daily, p.weekly, p.monthly, p.yearly),
            (1, 24, 7, 4, 12, 0)
        );
        assert_eq!(r.group_by, ["host", "tags"]);
        assert_eq!(
            (r.host.as_str(), r.tags.as_slice()),
            ("app", &["namespace=apps".to_string()][..])
        );
        assert!(!r.prune && !r.dry_run);
    }

    #[test]
    fn a_backups_retention_always_groups_by_host_and_tags() {
        // Never pooled with another backup's snapshots, whatever the list says.
        let r = request(&spec("{groupBy: []}"));
        assert_eq!(r.group_by, ["host", "tags"]);
        let r = request(&spec("{groupBy: [paths]}"));
        assert_eq!(r.group_by, ["host", "paths", "tags"]);
    }

    #[test]
    fn a_global_policys_empty_group_by_is_sent_as_no_grouping_not_left_to_restic() {
        let filter = SnapshotFilter {
            tags: vec!["emby".into()],
            hostname: None,
        };
        let r = forget_request(
            pb::RunOptions::default(),
            pb::Repository::default(),
            &KeepPolicy::legacy_default(),
            Selection::of_rule(&filter, &[]),
            false,
        );
        assert!(r.group_by.is_empty());
    }

    #[test]
    fn each_rule_of_a_global_policy_selects_by_its_filter_and_groups_by_the_policys() {
        let spec: restic_operator_api::retention::GlobalRetentionPolicySpec = serde_yaml::from_str(
            "repositoryRef: {name: repo}\nschedule: '20 1 * * 0'\npolicies:\n\
             - selector: {tags: [emby]}\n  retention: {keepDaily: 7, keepLast: 4}\n\
             - selector: {tags: [a, b], hostname: mariadb}\n  retention: {keepWeekly: 2}\n",
        )
        .unwrap();
        let selections: Vec<Selection> = spec
            .policies
            .iter()
            .map(|rule| Selection::of_rule(&rule.selector, &spec.group_by))
            .collect();
        let default_grouping = vec![GroupBy::Host, GroupBy::Tags];
        assert_eq!(
            selections,
            [
                Selection {
                    host: String::new(),
                    tags: vec!["emby".into()],
                    group_by: default_grouping.clone()
                },
                Selection {
                    host: "mariadb".into(),
                    tags: vec!["a".into(), "b".into()],
                    group_by: default_grouping
                },
            ]
        );
    }

    #[test]
    fn unset_and_zero_counts_keep_nothing_by_that_rule() {
        let r = request(&spec("{policy: {keepDaily: 7, keepMonthly: 0}, prune: true}"));
        let p = r.policy.unwrap();
        assert_eq!((p.daily, p.monthly, p.last), (7, 0, 0));
        assert!(r.prune);
    }
}
