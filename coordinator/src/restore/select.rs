//! Which snapshot a restore restores (pure): by id, or the newest (or only) one that matches
//! a host, tags and a time, as `restic snapshots --host H --tag T1,T2` would list them. A
//! restore from a namespace other than its repository's sees only that namespace's
//! snapshots, whatever it asks for.

use chrono::{DateTime, Utc};
use restic_operator_proto::v1 as pb;

/// How many snapshots a "nothing matches" message lists.
const CLOSEST: usize = 5;

/// What the snapshot must be.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Criteria {
    /// A full or short id (unique prefix); the other fields are then ignored.
    pub id: Option<String>,
    pub host: Option<String>,
    /// Every one of these tags.
    pub tags: Vec<String>,
    /// Taken strictly before this time.
    pub before: Option<DateTime<Utc>>,
    /// Take the newest match; when false exactly one snapshot must match.
    pub latest: bool,
    /// Only snapshots with this tag are visible at all (the namespace tag of a restore made
    /// outside the repository's namespace).
    pub confined_to: Option<String>,
}

/// No single snapshot matched; the message lists the closest ones.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoMatch(pub String);

pub fn time_of(s: &pb::Snapshot) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(s.time_unix_ms).unwrap_or_default()
}

/// The snapshot `criteria` pick among `snapshots`.
pub fn select<'a>(snapshots: &'a [pb::Snapshot], criteria: &Criteria) -> Result<&'a pb::Snapshot, NoMatch> {
    let visible: Vec<&pb::Snapshot> = snapshots
        .iter()
        .filter(|s| criteria.confined_to.as_ref().is_none_or(|t| s.tags.contains(t)))
        .collect();
    if let Some(id) = &criteria.id {
        return by_id(&visible, id);
    }
    let selected: Vec<&pb::Snapshot> = visible
        .iter()
        .copied()
        .filter(|s| matches_selector(s, criteria))
        .filter(|s| criteria.before.is_none_or(|b| time_of(s) < b))
        .collect();
    match selected.as_slice() {
        [] => Err(NoMatch(format!(
            "no snapshot matches {}; closest: {}",
            describe(criteria),
            closest(&visible, criteria)
        ))),
        [only] => Ok(only),
        many if criteria.latest => Ok(newest(many)),
        many => Err(NoMatch(format!(
            "{} snapshots match {} and snapshotSelector.latest is false, so exactly one must: {}",
            many.len(),
            describe(criteria),
            list(many.iter().copied())
        ))),
    }
}

fn by_id<'a>(visible: &[&'a pb::Snapshot], id: &str) -> Result<&'a pb::Snapshot, NoMatch> {
    let found: Vec<&pb::Snapshot> = visible.iter().copied().filter(|s| s.id.starts_with(id)).collect();
    match found.as_slice() {
        [only] => Ok(only),
        [] => {
            let mut newest_first = visible.to_vec();
            newest_first.sort_by_key(|s| std::cmp::Reverse(s.time_unix_ms));
            Err(NoMatch(format!(
                "no snapshot {id} in the repository; the newest are: {}",
                list(newest_first.into_iter().take(CLOSEST))
            )))
        }
        many => Err(NoMatch(format!(
            "snapshot id {id} is ambiguous: {}; give more of it",
            list(many.iter().copied())
        ))),
    }
}

fn matches_selector(s: &pb::Snapshot, criteria: &Criteria) -> bool {
    criteria.host.as_ref().is_none_or(|h| &s.hostname == h)
        && criteria.tags.iter().all(|t| s.tags.contains(t))
}

fn newest<'a>(snapshots: &[&'a pb::Snapshot]) -> &'a pb::Snapshot {
    snapshots
        .iter()
        .copied()
        .max_by(|a, b| (a.time_unix_ms, &a.id).cmp(&(b.time_unix_ms, &b.id)))
        .expect("not empty")
}

/// The snapshots nearest the selector: those of its host and tags nearest its time (or the
/// newest), else the newest of all.
fn closest(visible: &[&pb::Snapshot], criteria: &Criteria) -> String {
    let mut near: Vec<&pb::Snapshot> = visible
        .iter()
        .copied()
        .filter(|s| matches_selector(s, criteria))
        .collect();
    if near.is_empty() {
        near = visible.to_vec();
    }
    if near.is_empty() {
        return "the repository holds no snapshot this restore may see".into();
    }
    let at = criteria.before.map(|b| b.timestamp_millis());
    near.sort_by_key(|s| match at {
        Some(t) => (s.time_unix_ms - t).abs(),
        None => -s.time_unix_ms,
    });
    list(near.into_iter().take(CLOSEST))
}

fn describe(criteria: &Criteria) -> String {
    let mut parts = Vec::new();
    if let Some(h) = &criteria.host {
        parts.push(format!("host {h}"));
    }
    if !criteria.tags.is_empty() {
        parts.push(format!("tags {}", criteria.tags.join(",")));
    }
    if let Some(b) = criteria.before {
        parts.push(format!("taken before {}", b.to_rfc3339()));
    }
    if parts.is_empty() {
        "any snapshot".into()
    } else {
        parts.join(", ")
    }
}

fn list<'a>(snapshots: impl Iterator<Item = &'a pb::Snapshot>) -> String {
    snapshots
        .map(|s| {
            format!(
                "{} ({}, host {}, tags {})",
                s.short_id,
                time_of(s).format("%Y-%m-%dT%H:%M:%SZ"),
                s.hostname,
                s.tags.join(",")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, time: &str, host: &str, tags: &[&str]) -> pb::Snapshot {
        pb::Snapshot {
            id: id.into(),
            short_id: id[..4.min(id.len())].into(),
            time_unix_ms: time.parse::<DateTime<Utc>>().unwrap().timestamp_millis(),
            hostname: host.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }
    }

    fn repo() -> Vec<pb::Snapshot> {
        vec![
            snap("aa11", "2026-01-01T00:00:00Z", "db", &["ns=a", "daily"]),
            snap("bb22", "2026-01-02T00:00:00Z", "db", &["ns=a"]),
            snap("cc33", "2026-01-03T00:00:00Z", "web", &["ns=a", "daily"]),
            snap("dd44", "2026-01-04T00:00:00Z", "db", &["ns=b", "daily"]),
        ]
    }

    fn pick(c: Criteria) -> Result<String, NoMatch> {
        let all = repo();
        select(&all, &c).map(|s| s.id.clone())
    }

    #[test]
    fn the_newest_snapshot_of_the_host_with_every_tag_is_taken() {
        let c = Criteria {
            host: Some("db".into()),
            tags: vec!["daily".into()],
            latest: true,
            ..Default::default()
        };
        assert_eq!(pick(c.clone()).unwrap(), "dd44");
        let before = Criteria {
            before: Some("2026-01-04T00:00:00Z".parse().unwrap()),
            ..c
        };
        assert_eq!(pick(before).unwrap(), "aa11", "strictly before");
    }

    #[test]
    fn a_restore_outside_the_repository_namespace_sees_only_its_namespace() {
        let confined = |c: Criteria| Criteria {
            confined_to: Some("ns=a".into()),
            ..c
        };
        let latest = confined(Criteria {
            latest: true,
            ..Default::default()
        });
        assert_eq!(pick(latest).unwrap(), "cc33");
        let other = pick(confined(Criteria {
            id: Some("dd".into()),
            ..Default::default()
        }))
        .unwrap_err();
        assert!(other.0.starts_with("no snapshot dd in the repository"), "{other}");
        assert!(!other.0.contains("dd44"), "{other}");
    }

    #[test]
    fn an_id_is_matched_by_prefix_and_must_be_unique() {
        let id = |i: &str| Criteria {
            id: Some(i.into()),
            ..Default::default()
        };
        assert_eq!(pick(id("bb")).unwrap(), "bb22");
        assert_eq!(pick(id("cc33")).unwrap(), "cc33");
        let mut twins = repo();
        twins.push(snap("bb29", "2026-01-05T00:00:00Z", "db", &[]));
        let e = select(&twins, &id("bb")).unwrap_err();
        assert!(e.0.contains("ambiguous"), "{e}");
    }

    #[test]
    fn nothing_matching_lists_the_closest_snapshots() {
        let e = pick(Criteria {
            host: Some("db".into()),
            before: Some("2025-06-01T00:00:00Z".parse().unwrap()),
            latest: true,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            e.0,
            "no snapshot matches host db, taken before 2025-06-01T00:00:00+00:00; closest: \
             aa11 (2026-01-01T00:00:00Z, host db, tags ns=a,daily); \
             bb22 (2026-01-02T00:00:00Z, host db, tags ns=a); \
             dd44 (2026-01-04T00:00:00Z, host db, tags ns=b,daily)"
        );
        let e = pick(Criteria {
            host: Some("nobody".into()),
            latest: true,
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("closest: dd44"), "the newest of all: {e}");
    }

    #[test]
    fn with_latest_false_exactly_one_must_match() {
        let c = Criteria {
            host: Some("db".into()),
            ..Default::default()
        };
        let e = pick(c.clone()).unwrap_err();
        assert!(e.0.starts_with("3 snapshots match host db"), "{e}");
        let one = Criteria {
            tags: vec!["ns=b".into()],
            ..c
        };
        assert_eq!(pick(one).unwrap(), "dd44");
    }
}
