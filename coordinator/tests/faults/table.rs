//! The fault suite's table: each row measures one fault over its repeats and is written to
//! `<target>/tmp/faults/<row>.md`; `e2e/scripts/faults.sh` (and the test command) print them
//! under one header once the suite has run.

use std::path::PathBuf;
use std::time::Duration;

/// The directory the rows are written to.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults")
}

/// One row: the fault, how often it was repeated, what must hold, what was measured.
pub struct Row<'a> {
    pub slug: &'a str,
    pub fault: &'a str,
    pub repeats: usize,
    pub must_hold: &'a str,
    pub measured: String,
    pub held: bool,
}

impl<'a> Row<'a> {
    /// A row still to be measured.
    pub fn new(slug: &'a str, fault: &'a str, repeats: usize, must_hold: &'a str) -> Self {
        Self {
            slug,
            fault,
            repeats,
            must_hold,
            measured: String::new(),
            held: true,
        }
    }

    /// Writes the row (and prints it, for a run with `--nocapture`).
    pub fn record(&self) {
        let line = format!(
            "| {} | {} | {} | {} | {} |\n",
            self.fault,
            self.repeats,
            self.must_hold,
            self.measured,
            if self.held { "holds" } else { "**FAILS**" }
        );
        eprint!("{line}");
        let _ = std::fs::create_dir_all(dir());
        if let Err(e) = std::fs::write(dir().join(format!("{}.md", self.slug)), line) {
            eprintln!("cannot write the fault table row: {e}");
        }
    }
}

/// Largest, median and count of a set of durations, as `max 3.1 s, median 2.0 s`.
pub fn spread(mut d: Vec<Duration>) -> String {
    if d.is_empty() {
        return "none".into();
    }
    d.sort();
    let median = d[d.len() / 2];
    let max = d[d.len() - 1];
    format!(
        "max {:.1} s, median {:.1} s",
        max.as_secs_f64(),
        median.as_secs_f64()
    )
}
