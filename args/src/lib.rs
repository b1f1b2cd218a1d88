//! The restic options a user may add to a run (`spec.restic.extraArgs`), as one allow-list that
//! both the CRD schema (a CEL rule, see [`cel_rule`]) and the node agent (see [`check`]) apply.
//!
//! The agent is privileged, so every extra argument is hostile until proven otherwise. restic
//! has options that run a program (`--stdin-from-command`, `--password-command`,
//! `-o sftp.command`), read a file named by the user (`--files-from`, `--exclude-file`,
//! `--cacert`), point it at another repository, or weaken how credentials travel
//! (`--insecure-tls`). A deny-list cannot keep up with them, and positional arguments or
//! combined short flags (`-vr...`) slip past one. So each item must be exactly one known option,
//! written as `--flag` or `--flag=value` in a single item, with its value checked; anything else
//! is refused with a message naming the item.
//!
//! The value checks are written twice, as Rust here and as RE2 regexes for CEL, and a test in the
//! API crate runs both over the same corpus.
//!
//! The same goes for the environment restic gets from a repository's Secret
//! ([`check_env_name`]): the coordinator leaves out what the agent would refuse, and the
//! agent refuses it again. And for the operator's own snapshot tags ([`NAMESPACE_TAG_PREFIX`]).

#![forbid(unsafe_code)]

use std::fmt;

/// Tags starting with this are the operator's; users' tags may not.
pub const RESERVED_TAG_PREFIX: &str = "restic-operator/";
/// Every snapshot of a ResticBackup carries `restic-operator/namespace=<its namespace>`. Parent
/// selection and retention require it, so a backup of one namespace can never take another
/// namespace's snapshot as its parent or remove it, whatever hostname and tags it sets.
pub const NAMESPACE_TAG_PREFIX: &str = "restic-operator/namespace=";

/// The restic command an argument is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Backup,
    Restore,
    Forget,
    Prune,
    Check,
    Init,
    Stats,
    Snapshots,
    Unlock,
}

impl Op {
    /// restic's name of the command.
    pub fn command(self) -> &'static str {
        match self {
            Op::Backup => "backup",
            Op::Restore => "restore",
            Op::Forget => "forget",
            Op::Prune => "prune",
            Op::Check => "check",
            Op::Init => "init",
            Op::Stats => "stats",
            Op::Snapshots => "snapshots",
            Op::Unlock => "unlock",
        }
    }

    /// The command of a restic argument list's first word.
    pub fn from_command(cmd: &str) -> Option<Op> {
        [
            Op::Backup,
            Op::Restore,
            Op::Forget,
            Op::Prune,
            Op::Check,
            Op::Init,
            Op::Stats,
            Op::Snapshots,
            Op::Unlock,
        ]
        .into_iter()
        .find(|op| op.command() == cmd)
    }
}

/// What an option's value must look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value {
    /// A boolean flag: `--flag` alone.
    Flag,
    /// A whole number of up to 9 digits.
    Count,
    /// A size: digits with an optional unit, `512`, `10M`, `2G`.
    Size,
    /// A Go duration of whole units: `30s`, `5m`, `1h30m`.
    Duration,
    /// A file name (no `/`): what `--exclude-if-present` looks for in each directory.
    FileName,
    /// A restic pattern: any text without control characters. Patterns only filter; they do
    /// not read files.
    Pattern,
    /// Unused space for prune: `5%`, a size, or `unlimited`.
    Unused,
    /// What `check --read-data-subset` reads: `1/5`, `2.5%` or a size.
    Subset,
    /// A region, storage class or tier name: letters, digits, `-` and `_`.
    Name,
    /// One of a few words.
    OneOf(&'static [&'static str]),
}

impl Value {
    fn valid(self, v: &str) -> bool {
        let digits =
            |s: &str, max: usize| !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit());
        let size = |s: &str| {
            let n = s
                .strip_suffix(['k', 'K', 'm', 'M', 'g', 'G', 't', 'T'])
                .unwrap_or(s);
            digits(n, 12)
        };
        match self {
            Value::Flag => false,
            Value::Count => digits(v, 9),
            Value::Size => size(v),
            Value::Duration => duration(v),
            Value::FileName => {
                (1..=255).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            }
            Value::Pattern => (1..=1024).contains(&v.len()) && !v.chars().any(|c| c.is_ascii_control()),
            Value::Unused => v == "unlimited" || v.strip_suffix('%').is_some_and(|n| digits(n, 3)) || size(v),
            Value::Subset => {
                if let Some((n, t)) = v.split_once('/') {
                    return digits(n, 6) && digits(t, 6);
                }
                if let Some(p) = v.strip_suffix('%') {
                    let (whole, frac) = p.split_once('.').unwrap_or((p, "1"));
                    return digits(whole, 3) && digits(frac, 3);
                }
                size(v) && v.ends_with(|c: char| c.is_ascii_alphabetic())
            }
            Value::Name => {
                (1..=64).contains(&v.len())
                    && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            }
            Value::OneOf(words) => words.contains(&v),
        }
    }

    /// The same check as an RE2 regex for CEL's `matches()`. No backslashes: they would need
    /// escaping once for CEL and once more for YAML.
    fn regex(self) -> String {
        const SIZE: &str = "[0-9]{1,12}[kKmMgGtT]?";
        match self {
            Value::Flag => String::new(),
            Value::Count => "[0-9]{1,9}".into(),
            Value::Size => SIZE.into(),
            Value::Duration => "([0-9]{1,6}(ms|s|m|h))+".into(),
            Value::FileName => "[A-Za-z0-9._-]{1,255}".into(),
            // Go's RE2 allows repeat counts up to 1000 only; the item's length is bounded by the
            // schema's maxLength (and MAX_LEN here) instead.
            Value::Pattern => "[^[:cntrl:]]+".into(),
            Value::Unused => format!("(unlimited|[0-9]{{1,3}}%|{SIZE})"),
            Value::Subset => {
                "([0-9]{1,6}/[0-9]{1,6}|[0-9]{1,3}([.][0-9]{1,3})?%|[0-9]{1,12}[kKmMgGtT])".into()
            }
            Value::Name => "[A-Za-z0-9_-]{1,64}".into(),
            Value::OneOf(words) => format!("({})", words.join("|")),
        }
    }

    fn describe(self) -> String {
        match self {
            Value::Flag => "no value".into(),
            Value::Count => "a whole number".into(),
            Value::Size => "a size such as 512, 10M or 2G".into(),
            Value::Duration => "a duration such as 30s, 5m or 1h30m".into(),
            Value::FileName => "a file name (letters, digits, '.', '_' and '-')".into(),
            Value::Pattern => "a pattern without control characters".into(),
            Value::Unused => "a percentage such as 5%, a size, or unlimited".into(),
            Value::Subset => "n/t, a percentage such as 2.5%, or a size such as 1G".into(),
            Value::Name => "a name (letters, digits, '-' and '_')".into(),
            Value::OneOf(words) => format!("one of {}", words.join(", ")),
        }
    }
}

/// `30s`, `5m`, `1h30m`: whole numbers with ms, s, m or h.
fn duration(v: &str) -> bool {
    let mut rest = v;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let n = rest.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 6 {
            return false;
        }
        rest = &rest[n..];
        let unit = ["ms", "s", "m", "h"].into_iter().find(|u| rest.starts_with(u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

/// One allowed option. `name` is what follows `--`; backend options are `option=<key>`.
struct Allowed {
    name: &'static str,
    value: Value,
    /// The commands it is for; empty: every command (restic's global options).
    ops: &'static [Op],
}

const fn opt(name: &'static str, value: Value, ops: &'static [Op]) -> Allowed {
    Allowed { name, value, ops }
}

const ALL: &[Op] = &[];
const BACKUP: &[Op] = &[Op::Backup];
const RESTORE: &[Op] = &[Op::Restore];
const PRUNE: &[Op] = &[Op::Prune];
const CHECK: &[Op] = &[Op::Check];
const FILTER: &[Op] = &[Op::Backup, Op::Restore];

/// Everything a user may set. Each is either harmless to others or limits restic further.
const ALLOWED: &[Allowed] = &[
    // Global options: bandwidth, pack size, lock waiting, compression, cache clean-up.
    opt("limit-upload", Value::Count, ALL),
    opt("limit-download", Value::Count, ALL),
    opt("pack-size", Value::Count, ALL),
    opt("retry-lock", Value::Duration, ALL),
    opt("stuck-request-timeout", Value::Duration, ALL),
    opt("compression", Value::OneOf(&["auto", "off", "max"]), ALL),
    opt("cleanup-cache", Value::Flag, ALL),
    opt("verbose", Value::Flag, ALL),
    // Backend options that tune a connection; never ones that name a program or its arguments.
    opt("option=s3.connections", Value::Count, ALL),
    opt("option=s3.region", Value::Name, ALL),
    opt("option=s3.storage-class", Value::Name, ALL),
    opt(
        "option=s3.bucket-lookup",
        Value::OneOf(&["auto", "dns", "path"]),
        ALL,
    ),
    opt("option=s3.list-objects-v1", Value::OneOf(&["true", "false"]), ALL),
    opt("option=b2.connections", Value::Count, ALL),
    opt("option=azure.connections", Value::Count, ALL),
    opt("option=azure.access-tier", Value::Name, ALL),
    opt("option=gs.connections", Value::Count, ALL),
    opt("option=gs.region", Value::Name, ALL),
    opt("option=swift.connections", Value::Count, ALL),
    opt("option=rest.connections", Value::Count, ALL),
    opt("option=sftp.connections", Value::Count, ALL),
    opt("option=rclone.connections", Value::Count, ALL),
    opt("option=rclone.timeout", Value::Duration, ALL),
    // What a backup reads.
    opt("exclude-caches", Value::Flag, BACKUP),
    opt("exclude-if-present", Value::FileName, BACKUP),
    opt("exclude-larger-than", Value::Size, BACKUP),
    opt("one-file-system", Value::Flag, BACKUP),
    opt("skip-if-unchanged", Value::Flag, BACKUP),
    opt("read-concurrency", Value::Count, BACKUP),
    opt("no-scan", Value::Flag, BACKUP),
    opt("ignore-ctime", Value::Flag, BACKUP),
    opt("ignore-inode", Value::Flag, BACKUP),
    opt("with-atime", Value::Flag, BACKUP),
    opt("exclude", Value::Pattern, FILTER),
    opt("iexclude", Value::Pattern, FILTER),
    // What a restore writes.
    opt("include", Value::Pattern, RESTORE),
    opt("iinclude", Value::Pattern, RESTORE),
    opt("sparse", Value::Flag, RESTORE),
    opt("verify", Value::Flag, RESTORE),
    // How much prune repacks.
    opt("max-unused", Value::Unused, PRUNE),
    opt("max-repack-size", Value::Size, PRUNE),
    opt("repack-cacheable-only", Value::Flag, PRUNE),
    opt("repack-small", Value::Flag, PRUNE),
    opt("repack-uncompressed", Value::Flag, PRUNE),
    // How much check reads.
    opt("read-data", Value::Flag, CHECK),
    opt("read-data-subset", Value::Subset, CHECK),
];

/// Options people reach for that are refused on purpose, with the reason, so the message says
/// why rather than only "not allowed".
const REFUSED: &[(&str, &str)] = &[
    ("stdin-from-command", "it runs a command"),
    ("stdin", "it reads the agent's standard input"),
    ("stdin-filename", "it belongs to --stdin"),
    ("password-command", "it runs a command"),
    ("from-password-command", "it runs a command"),
    ("files-from", "it reads a file list from the node"),
    ("files-from-raw", "it reads a file list from the node"),
    ("files-from-verbatim", "it reads a file list from the node"),
    ("exclude-file", "it reads a file from the node"),
    ("iexclude-file", "it reads a file from the node"),
    ("include-file", "it reads a file from the node"),
    ("iinclude-file", "it reads a file from the node"),
    ("cacert", "it reads a file from the node"),
    ("tls-client-cert", "it reads a file from the node"),
    (
        "password-file",
        "it reads a file from the node; the password comes from the repository's Secret",
    ),
    ("repository-file", "it reads a file from the node"),
    (
        "insecure-tls",
        "it would send the repository's credentials over an unverified connection",
    ),
    (
        "insecure-no-password",
        "the password comes from the repository's Secret",
    ),
    ("repo", "the repository is set by spec.repositoryRef"),
    ("repository", "the repository is set by spec.repositoryRef"),
    ("from-repo", "the repository is set by spec.repositoryRef"),
    ("no-lock", "other runs rely on restic's locks"),
    ("cache-dir", "the agent manages restic's cache"),
    ("no-cache", "the agent manages restic's cache"),
    ("json", "the agent sets the output format"),
    ("host", "set spec.restic.hostname instead"),
    ("tag", "set spec.restic.tags instead"),
    ("parent", "the agent chooses the parent snapshot"),
    ("force", "the agent chooses the parent snapshot"),
    ("time", "snapshots carry the time they were taken"),
    ("option=sftp.command", "it replaces the command restic runs"),
    ("option=sftp.args", "it changes the command restic runs"),
    ("option=rclone.program", "it replaces the command restic runs"),
    ("option=rclone.args", "it changes the command restic runs"),
];

/// At most this many extra arguments, each at most `MAX_LEN` bytes.
pub const MAX_ITEMS: usize = 32;
pub const MAX_LEN: usize = 1024;

/// Why an extra argument is refused; each message names the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgError {
    TooMany(usize),
    TooLong(String),
    /// Not an option at all: a positional argument (or `--` itself).
    Positional(String),
    /// `-x` or a combined `-vr...`.
    ShortFlag(String),
    /// Known to be dangerous, with the reason.
    Refused {
        arg: String,
        why: &'static str,
    },
    /// Not on the list for this command.
    Unknown {
        arg: String,
        op: Op,
    },
    /// A value-taking option given alone (perhaps with its value as the next item).
    NeedsValue {
        arg: String,
        expected: String,
    },
    /// A flag given a value.
    NoValue(String),
    BadValue {
        arg: String,
        expected: String,
    },
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::TooMany(n) => write!(f, "{n} extra arguments; at most {MAX_ITEMS} are allowed"),
            ArgError::TooLong(arg) => {
                let start: String = arg.chars().take(40).collect();
                write!(f, "extra argument {start:?}... is longer than {MAX_LEN} bytes")
            }
            ArgError::Positional(arg) => write!(
                f,
                "extra argument {arg:?} is not an option; each item must be one restic option written as \
                 --flag or --flag=value (positional arguments are never accepted)"
            ),
            ArgError::ShortFlag(arg) => write!(
                f,
                "extra argument {arg:?} is a short option; write the long form as one item, e.g. \
                 --one-file-system or --option=s3.connections=8"
            ),
            ArgError::Refused { arg, why } => write!(f, "extra argument {arg:?} is not allowed: {why}"),
            ArgError::Unknown { arg, op } => write!(
                f,
                "extra argument {arg:?} is not an allowed restic {} option (allowed: {})",
                op.command(),
                allowed_names(*op).join(", ")
            ),
            ArgError::NeedsValue { arg, expected } => write!(
                f,
                "extra argument {arg:?} needs a value, written in the same item: {arg}=<{expected}>"
            ),
            ArgError::NoValue(arg) => write!(f, "extra argument {arg:?}: this option takes no value"),
            ArgError::BadValue { arg, expected } => {
                write!(f, "extra argument {arg:?}: the value must be {expected}")
            }
        }
    }
}

impl std::error::Error for ArgError {}

fn applies(a: &Allowed, op: Op) -> bool {
    a.ops.is_empty() || a.ops.contains(&op)
}

/// The options allowed for `op`, as a person writes them.
pub fn allowed_names(op: Op) -> Vec<String> {
    ALLOWED
        .iter()
        .filter(|a| applies(a, op))
        .map(|a| match a.value {
            Value::Flag => format!("--{}", a.name),
            _ => format!("--{}=", a.name),
        })
        .collect()
}

/// The allowed option `arg` (without `--`) names, and its value if it has one.
fn lookup(body: &str) -> Option<(&'static Allowed, Option<&str>)> {
    ALLOWED.iter().find_map(|a| {
        if body == a.name {
            Some((a, None))
        } else {
            body.strip_prefix(a.name)
                .and_then(|rest| rest.strip_prefix('='))
                .map(|v| (a, Some(v)))
        }
    })
}

/// Checks one argument for `op`.
pub fn check_one(op: Op, arg: &str) -> Result<(), ArgError> {
    if arg.len() > MAX_LEN {
        return Err(ArgError::TooLong(arg.into()));
    }
    let Some(body) = arg.strip_prefix("--") else {
        return Err(if arg.starts_with('-') && arg.len() > 1 {
            ArgError::ShortFlag(arg.into())
        } else {
            ArgError::Positional(arg.into())
        });
    };
    if body.is_empty() {
        return Err(ArgError::Positional(arg.into()));
    }
    let name = body.split_once('=').map_or(body, |(n, _)| n);
    let key = match name {
        // Backend options are refused or allowed by key: `option=sftp.command`.
        "option" | "o" => {
            let value = body.split_once('=').map_or("", |(_, v)| v);
            format!("option={}", value.split_once('=').map_or(value, |(k, _)| k))
        }
        _ => name.to_owned(),
    };
    if let Some((_, why)) = REFUSED.iter().find(|(n, _)| *n == key) {
        return Err(ArgError::Refused { arg: arg.into(), why });
    }
    let Some((allowed, value)) = lookup(body).filter(|(a, _)| applies(a, op)) else {
        return Err(ArgError::Unknown { arg: arg.into(), op });
    };
    match (allowed.value, value) {
        (Value::Flag, None) => Ok(()),
        (Value::Flag, Some(_)) => Err(ArgError::NoValue(arg.into())),
        (v, None) => Err(ArgError::NeedsValue {
            arg: arg.into(),
            expected: v.describe(),
        }),
        (v, Some(value)) if v.valid(value) => Ok(()),
        (v, Some(_)) => Err(ArgError::BadValue {
            arg: arg.into(),
            expected: v.describe(),
        }),
    }
}

/// Checks a whole list of extra arguments for `op`.
pub fn check(op: Op, args: &[String]) -> Result<(), ArgError> {
    if args.len() > MAX_ITEMS {
        return Err(ArgError::TooMany(args.len()));
    }
    args.iter().try_for_each(|a| check_one(op, a))
}

/// Whether a checked argument applies to `op` (a repository run passes one list to several
/// commands: `forget` then `prune`).
pub fn applies_to(op: Op, arg: &str) -> bool {
    arg.strip_prefix("--")
        .and_then(lookup)
        .is_some_and(|(a, _)| applies(a, op))
}

/// An RE2 regex matching exactly the items [`check`] accepts for any of `ops`.
pub fn regex(ops: &[Op]) -> String {
    let mut alternatives: Vec<String> = Vec::new();
    for a in ALLOWED.iter().filter(|a| ops.iter().any(|op| applies(a, *op))) {
        let name = a.name.replace('.', "[.]");
        alternatives.push(match a.value {
            Value::Flag => format!("--{name}"),
            v => format!("--{name}={}", v.regex()),
        });
    }
    format!("^({})$", alternatives.join("|"))
}

/// The CEL rule for a list of extra arguments for `ops`.
pub fn cel_rule(ops: &[Op]) -> String {
    format!("self.all(a, a.matches('{}'))", regex(ops))
}

/// The CEL message expression naming the first refused item.
pub fn cel_message(ops: &[Op]) -> String {
    let names: Vec<String> = ops.iter().flat_map(|op| allowed_names(*op)).collect();
    let mut unique: Vec<String> = Vec::new();
    for n in names {
        if !unique.contains(&n) {
            unique.push(n);
        }
    }
    format!(
        "'extraArgs item ' + self.filter(a, !a.matches('{}'))[0] + ' is not allowed: each item must be one \
         restic option written as --flag or --flag=value (no positional arguments, short options, or options \
         that run commands or read files). Allowed: {}'",
        regex(ops),
        unique.join(", ")
    )
}

/// Environment variables a request may pass to restic: backend credentials and options, never
/// anything that changes what runs (PATH, LD_*, GODEBUG), where the repository is, or that names
/// a file or a program for restic or a library it uses to read or run. The values come from a
/// Secret that namespace users may be able to write, so `credential_process`-style indirections
/// (`AWS_SHARED_CREDENTIALS_FILE`, `GOOGLE_APPLICATION_CREDENTIALS`, `RCLONE_*_SSH`,
/// `RCLONE_PASSWORD_COMMAND`, ...) are refused by name.
pub fn check_env_name(name: &str) -> Result<(), String> {
    const PREFIXES: &[&str] = &[
        "AWS_",
        "B2_",
        "AZURE_",
        "GOOGLE_",
        "OS_",
        "ST_",
        "RCLONE_",
        "RESTIC_REST_",
    ];
    /// restic's own settings and the proxy variables Go's HTTP client reads.
    const EXACT: &[&str] = &[
        "RESTIC_COMPRESSION",
        "RESTIC_PACK_SIZE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    ];
    const FORBIDDEN: &[&str] = &[
        "RESTIC_REPOSITORY",
        "RESTIC_REPOSITORY_FILE",
        "RESTIC_PASSWORD",
        "RESTIC_PASSWORD_FILE",
        "RESTIC_PASSWORD_COMMAND",
    ];
    /// Parts of names that point at a file, a program or a command.
    const INDIRECT: &[&str] = &[
        "_FILE",
        "_PATH",
        "COMMAND",
        "PROCESS",
        "PROGRAM",
        "EXECUTABLE",
        "_SSH",
    ];
    const INDIRECT_EXACT: &[&str] = &["GOOGLE_APPLICATION_CREDENTIALS", "RCLONE_CONFIG", "AWS_CA_BUNDLE"];
    if FORBIDDEN.contains(&name) {
        return Err(format!(
            "{name} must be given as the repository URL or password, not as env"
        ));
    }
    if INDIRECT.iter().any(|p| name.contains(p)) || INDIRECT_EXACT.contains(&name) {
        return Err(format!(
            "environment variable {name} names a file or a program for restic to read or run on the node; \
             give the credentials themselves (e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        ));
    }
    if PREFIXES.iter().any(|p| name.starts_with(p)) || EXACT.contains(&name) {
        return Ok(());
    }
    Err(format!(
        "environment variable {name} is not a restic backend setting"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(op: Op, arg: &str) {
        assert_eq!(check_one(op, arg), Ok(()), "{arg} should be allowed for {op:?}");
    }

    fn refused(op: Op, arg: &str) -> String {
        match check_one(op, arg) {
            Ok(()) => panic!("{arg} should be refused for {op:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_options_users_set_for_backups_are_allowed() {
        for arg in [
            "--exclude-caches",
            "--one-file-system",
            "--limit-upload=512",
            "--limit-download=2048",
            "--compression=max",
            "--pack-size=64",
            "--read-concurrency=4",
            "--exclude-if-present=.nobackup",
            "--exclude-larger-than=2G",
            "--skip-if-unchanged",
            "--exclude=*.tmp",
            "--exclude=/data/cache/**",
            "--option=s3.storage-class=STANDARD_IA",
            "--option=s3.connections=8",
            "--retry-lock=5m",
            "--retry-lock=1h30m",
        ] {
            ok(Op::Backup, arg);
        }
    }

    #[test]
    fn every_form_of_the_reported_attacks_is_refused_with_the_item_named() {
        let cases = [
            ("--stdin-from-command", "runs a command"),
            ("--stdin-from-command=true", "runs a command"),
            ("/bin/sh", "not an option"),
            ("/data/x.sh", "not an option"),
            ("--files-from=/proc/1/root/etc/shadow", "file list"),
            ("--files-from", "file list"),
            ("-vr/tmp/other", "short option"),
            ("-r", "short option"),
            ("-o", "short option"),
            ("--", "not an option"),
            ("--repo=local:/", "repositoryRef"),
            ("--password-command=sh", "runs a command"),
            ("--option=sftp.command=sh -c id", "replaces the command"),
            ("--o=sftp.command=sh", "replaces the command"),
            ("--option=rclone.program=/data/x.sh", "replaces the command"),
            ("--insecure-tls", "unverified"),
            ("--cacert=/etc/shadow", "reads a file"),
            ("--exclude-file=/etc/shadow", "reads a file"),
            ("--host=other", "hostname"),
            ("--tag=other", "tags"),
            ("--no-lock", "locks"),
        ];
        for (arg, why) in cases {
            let msg = refused(Op::Backup, arg);
            assert!(msg.contains(&format!("{arg:?}")), "{msg} names {arg}");
            assert!(msg.contains(why), "{msg} says {why}");
        }
    }

    #[test]
    fn values_are_checked_and_must_share_the_item() {
        assert!(refused(Op::Backup, "--limit-upload").contains("--limit-upload=<a whole number>"));
        assert!(refused(Op::Backup, "--limit-upload=fast").contains("whole number"));
        assert!(refused(Op::Backup, "--exclude-if-present=../x").contains("file name"));
        assert!(refused(Op::Backup, "--exclude=a\nb").contains("control"));
        assert!(refused(Op::Backup, "--one-file-system=yes").contains("no value"));
        assert!(refused(Op::Backup, "--compression=zstd").contains("one of auto, off, max"));
        assert!(refused(Op::Backup, "--retry-lock=5").contains("duration"));
        assert!(refused(Op::Backup, "--option=s3.region=eu west").contains("name"));
    }

    #[test]
    fn each_command_has_its_own_options() {
        assert!(refused(Op::Backup, "--max-unused=5%").contains("not an allowed restic backup option"));
        ok(Op::Prune, "--max-unused=5%");
        ok(Op::Prune, "--max-unused=unlimited");
        ok(Op::Check, "--read-data-subset=1/5");
        ok(Op::Check, "--read-data-subset=2.5%");
        ok(Op::Check, "--read-data-subset=1G");
        ok(Op::Restore, "--sparse");
        assert!(refused(Op::Restore, "--one-file-system").contains("restore"));
        ok(Op::Forget, "--limit-upload=100");
        assert!(applies_to(Op::Prune, "--max-unused=5%"));
        assert!(!applies_to(Op::Forget, "--max-unused=5%"));
        assert!(applies_to(Op::Forget, "--limit-upload=100"));
    }

    #[test]
    fn lists_are_bounded() {
        let many = vec!["--exclude-caches".to_string(); MAX_ITEMS + 1];
        assert_eq!(check(Op::Backup, &many), Err(ArgError::TooMany(MAX_ITEMS + 1)));
        let long = format!("--exclude={}", "a".repeat(MAX_LEN));
        assert!(matches!(check_one(Op::Backup, &long), Err(ArgError::TooLong(_))));
    }

    #[test]
    fn the_regex_has_no_backslashes_and_names_every_option() {
        let re = regex(&[Op::Backup]);
        assert!(!re.contains('\\'));
        // Go's RE2 refuses repeat counts above 1000.
        for count in re.split('{').skip(1) {
            let max = count.split('}').next().unwrap().split(',').next_back().unwrap();
            assert!(max.parse::<u32>().unwrap() <= 1000, "{count}");
        }
        assert!(re.contains("--exclude-caches|"));
        assert!(!re.contains("max-unused"));
    }
    #[test]
    fn env_accepts_backend_credentials_only() {
        assert!(check_env_name("AWS_ACCESS_KEY_ID").is_ok());
        assert!(check_env_name("B2_ACCOUNT_KEY").is_ok());
        assert!(check_env_name("RESTIC_PASSWORD").is_err());
        assert!(check_env_name("LD_PRELOAD").is_err());
        assert!(check_env_name("PATH").is_err());
        assert!(check_env_name("HTTPS_PROXY").is_ok() && check_env_name("no_proxy").is_ok());
        assert!(check_env_name("GODEBUG").is_err());
        assert!(check_env_name("OS_APPLICATION_CREDENTIAL_SECRET").is_ok());
        // Indirections to a file or a program, which a Secret's writer could point anywhere.
        for name in [
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_CONFIG_FILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES",
            "AZURE_CLIENT_CERTIFICATE_PATH",
            "RCLONE_CONFIG",
            "RCLONE_PASSWORD_COMMAND",
            "RCLONE_CONFIG_R_SSH",
            "RCLONE_SFTP_KEY_FILE",
        ] {
            let err = check_env_name(name).unwrap_err();
            assert!(err.contains("names a file or a program"), "{name}: {err}");
        }
    }
}
