//! The parsers of restic's output against generated input: real `--json` lines cut short,
//! mutated and spliced, and plain garbage. None may panic, and no line that is not a whole
//! summary naming a snapshot may pass for one: the agent reports a backup as made only on
//! such a summary.
//!
//! `RESTIC_FUZZ_CASES` sets the number of inputs (default 1,000,000); the seed is fixed, so a
//! failure names the case that reproduces it.

use super::*;

/// Real lines restic 0.18 prints with `--json`.
const CORPUS: &[&str] = &[
    r#"{"message_type":"status","seconds_elapsed":1,"seconds_remaining":3,"percent_done":0.25,"total_files":8320,"files_done":2000,"total_bytes":268435456,"bytes_done":67108864,"current_files":["/data/a/b"]}"#,
    r#"{"message_type":"summary","files_new":8320,"files_changed":0,"files_unmodified":0,"dirs_new":66,"dirs_changed":0,"dirs_unmodified":0,"data_blobs":8700,"tree_blobs":67,"data_added":268984532,"data_added_packed":268700123,"total_files_processed":8320,"total_bytes_processed":268435456,"total_duration":3.2,"backup_start":"2026-12-07T13:00:00Z","backup_end":"2026-12-07T13:00:03Z","snapshot_id":"3f0c5e1a9b8d7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e"}"#,
    r#"{"message_type":"summary","seconds_elapsed":2,"total_files":10,"files_restored":10,"files_skipped":0,"files_deleted":0,"total_bytes":1024,"bytes_restored":1024,"bytes_skipped":0}"#,
    r#"{"message_type":"error","error":{"message":"open /data/secret: permission denied"},"during":"archival","item":"/data/secret"}"#,
    r#"{"message_type":"exit_error","code":1,"message":"Fatal: unable to open config file: Stat: The specified bucket does not exist.\nIs there a repository at the following location?\ns3:http://127.0.0.1:9000/b/r"}"#,
    r#"{"message_type":"verbose_status","action":"new","item":"/data/x","duration":0.01,"data_size":10,"metadata_size":0,"total_files":1}"#,
    r#"[{"tags":["app"],"host":"db","paths":["/data"],"keep":[{"id":"aa","time":"2026-12-07T13:00:00Z"}],"remove":[{"id":"bb","time":"2026-12-06T13:00:00Z"}],"reasons":[]}]"#,
    "Fatal: repository is already locked by PID 2 on node-1-0123456789abcdef by root (UID 0, GID 0)",
    "Stat(<config/>) returned error, retrying after 1.29s: Stat: The specified bucket does not exist.",
];

/// The summary line of the corpus and the snapshot it names.
const SUMMARY: usize = 1;
const SNAPSHOT: &str = "3f0c5e1a9b8d7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e";

/// Characters mutations draw from: JSON's punctuation, digits, hex, escapes and a few that are
/// more than one byte in UTF-8.
const ALPHABET: &[char] = &[
    '{', '}', '[', ']', '"', ':', ',', '\\', '0', '1', '9', '-', '.', 'e', 'a', 'f', 'g', 'n', 'u', 'l', 't',
    ' ', '\n', '\t', '\u{0}', 'é', '☃', '𝄞', '\u{feff}',
];

/// xorshift64*: fast, deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn char(&mut self) -> char {
        ALPHABET[self.below(ALPHABET.len())]
    }
}

/// How an input was made, for the property it must satisfy.
#[derive(Debug)]
enum Made {
    /// A strict prefix of a corpus line.
    Truncated,
    /// A corpus line with a few characters replaced, inserted or removed.
    Mutated,
    /// The summary with one value replaced by an extreme or wrongly typed one.
    Extreme,
    /// Two corpus lines glued together at random points.
    Spliced,
    /// Characters from the alphabet, or a deep nesting.
    Garbage,
}

fn generate(rng: &mut Rng) -> (Made, String) {
    let pick = rng.below(CORPUS.len());
    let line = CORPUS[pick];
    let chars: Vec<char> = line.chars().collect();
    match rng.below(10) {
        0..=2 => {
            let cut = rng.below(chars.len());
            (Made::Truncated, chars[..cut].iter().collect())
        }
        3..=5 => {
            let mut c = chars;
            for _ in 0..=rng.below(4) {
                let at = rng.below(c.len());
                match rng.below(3) {
                    0 => c[at] = rng.char(),
                    1 => c.insert(at, rng.char()),
                    _ => {
                        c.remove(at);
                    }
                }
            }
            (Made::Mutated, c.into_iter().collect())
        }
        6 => {
            let values = [
                "-1",
                "18446744073709551616",
                "1e400",
                "null",
                "\"1\"",
                "[]",
                "{}",
                "0.5",
                "true",
            ];
            let fields = [
                "files_new",
                "data_added",
                "total_files_processed",
                "snapshot_id",
                "message_type",
            ];
            let field = fields[rng.below(fields.len())];
            let value = values[rng.below(values.len())];
            let line = CORPUS[SUMMARY];
            let key = format!("\"{field}\":");
            let start = line.find(&key).expect("corpus field") + key.len();
            let end = start + line[start..].find([',', '}']).expect("value end");
            (
                Made::Extreme,
                format!("{}{value}{}", &line[..start], &line[end..]),
            )
        }
        7 => {
            let other = CORPUS[rng.below(CORPUS.len())];
            let a: String = chars[..rng.below(chars.len())].iter().collect();
            let b: String = other.chars().skip(rng.below(other.len())).collect();
            (Made::Spliced, a + &b)
        }
        8 => {
            let depth = 1 + rng.below(400); // serde_json stops at 128
            let open = if rng.below(2) == 0 { "[" } else { "{\"a\":" };
            (Made::Garbage, format!("{{{}", open.repeat(depth)))
        }
        _ => {
            let len = rng.below(300);
            (Made::Garbage, (0..len).map(|_| rng.char()).collect())
        }
    }
}

/// Whether the agent would take `line` for a backup's summary naming a snapshot, and which.
fn taken_as_snapshot(line: &str) -> Option<String> {
    match parse_line(line) {
        Some(Message::Summary(s)) => s.snapshot().map(str::to_owned),
        _ => None,
    }
}

/// Runs `cases` generated inputs from `seed`; returns how many still parsed as a summary naming
/// a snapshot, and how many of those named another id than restic wrote.
fn run(seed: u64, cases: usize) -> (usize, usize) {
    let mut rng = Rng(seed);
    let (mut summaries, mut other_ids) = (0, 0);
    for case in 0..cases {
        let (made, input) = generate(&mut rng);
        // Every parser the agent feeds restic's output to.
        let taken = taken_as_snapshot(&input);
        let _ = failure_reason(&input);
        let _ = classify_failure(Some(1), &input);
        let _ = hopeless(&input);
        let _ = classify_hopeless(&input);
        let _ = retrying(&input);
        let _ = opening(&input);
        let _ = forget_summary(&input);
        let _ = serde_json::from_str::<Vec<SnapshotJson>>(&input);
        let _ = redact(&input, &["secret".to_string()]);
        let Some(id) = taken else { continue };
        summaries += 1;
        match made {
            // A strict prefix of a JSON object is never a whole one, and garbage never names
            // a snapshot.
            Made::Truncated | Made::Garbage => {
                panic!("seed {seed:#x} case {case}: {made:?} input taken for snapshot {id}: {input:?}")
            }
            // Still a well-formed summary: it names the snapshot restic wrote...
            _ if id == SNAPSHOT => {}
            // ...or the mutation hit the id itself and left another well-formed one, which no
            // parser can tell from restic's own output; it is still the id the line gives.
            _ => {
                assert!(
                    input.contains(&format!("\"snapshot_id\":\"{id}\"")) && !input.contains(SNAPSHOT),
                    "seed {seed:#x} case {case}: {made:?} input names another snapshot: {input:?}"
                );
                other_ids += 1;
            }
        }
    }
    (summaries, other_ids)
}

#[test]
fn generated_restic_output_never_panics_and_no_broken_summary_passes_for_a_snapshot() {
    let cases: usize = std::env::var("RESTIC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    assert_eq!(taken_as_snapshot(CORPUS[SUMMARY]).as_deref(), Some(SNAPSHOT));
    let started = std::time::Instant::now();
    // One share per core.
    let seeds = [0x5eed_0f7e_5712_3400_u64, 0x5eed_0f7e_5756_7800];
    let shares: Vec<(usize, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = seeds
            .iter()
            .map(|&seed| s.spawn(move || run(seed, cases / seeds.len())))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a share panicked"))
            .collect()
    });
    let (summaries, other_ids) = shares.iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    eprintln!(
        "{cases} generated inputs in {:?}; {summaries} still parsed as a summary naming a \
         snapshot, {other_ids} of them with only the id's digits changed",
        started.elapsed()
    );
}
