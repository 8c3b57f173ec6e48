//! What every command prints through: stdout that a closed pipe ends quietly, warnings on
//! stderr, JSON, and the metrics summary table.

use std::sync::atomic::{AtomicBool, Ordering};

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use crate::metrics::CellMetrics;

/// A closed stdout (`pipeline cache status | head`, `pipeline run | true`) ends the output,
/// not the program: once a write finds the pipe closed, later writes are skipped quietly,
/// and the command finishes its work and exits with its own status.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Write to stdout; a closed pipe stops the output, any other failure is said on stderr.
pub(crate) fn write_stdout(args: std::fmt::Arguments, newline: bool) {
    use std::io::Write as _;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| {
        if newline {
            out.write_all(b"\n")?;
        }
        out.flush()
    });
    if let Err(e) = written {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write to stdout: {e}");
        }
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

/// `println!` over [`write_stdout`].
#[macro_export]
macro_rules! out {
    () => {
        $crate::cli::output::write_stdout(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(format_args!($($arg)*), true)
    };
}

/// `print!` over [`write_stdout`].
#[macro_export]
macro_rules! out_inline {
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(format_args!($($arg)*), false)
    };
}

pub(crate) fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("plain data serializes")
}

pub(crate) fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

pub(crate) fn print_summary(m: &[CellMetrics]) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec![
        "cell",
        "rows",
        "accuracy (95% CI)",
        "macro-F1",
        "invalid",
        "failed",
        "rows/s",
        "cached",
        "computed",
    ]);
    for c in m {
        t.add_row(vec![
            c.cell.clone(),
            format!("{}/{}", c.n, c.planned),
            if c.n == 0 {
                "— (no rows)".into()
            } else {
                format!(
                    "{:.3} ({:.3}–{:.3})",
                    c.accuracy, c.accuracy_lo, c.accuracy_hi
                )
            },
            if c.n == 0 {
                "—".into()
            } else {
                format!("{:.3}", c.macro_f1)
            },
            c.invalid.to_string(),
            c.failed.to_string(),
            c.rows_per_s_text(2),
            c.cached.to_string(),
            c.computed.to_string(),
        ]);
    }
    out!("{t}");
}
