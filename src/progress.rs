//! Progress of a run: bars on a terminal; elsewhere (CI logs, Slurm job logs, `nohup`) a
//! plain line every few seconds, as cargo and pip do, so a long run is never silent.

use std::cell::RefCell;
use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a run shows its progress on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProgressMode {
    Off,
    /// Live bars (stderr is a terminal).
    Bars,
    /// A plain line at most this often.
    Lines(Duration),
}

impl ProgressMode {
    /// Bars on a terminal, else lines every `every`; nothing when `quiet`.
    pub fn detect(quiet: bool, every: Duration) -> Self {
        use std::io::IsTerminal;
        if quiet {
            ProgressMode::Off
        } else if std::io::stderr().is_terminal() {
            ProgressMode::Bars
        } else {
            ProgressMode::Lines(every)
        }
    }
}

pub(crate) enum Progress {
    Off,
    Bars(Bars),
    Lines(RefCell<Lines>),
}

impl Progress {
    /// `cells`: the ids of the cells; `per_cell`: the rows each has to compute.
    pub(crate) fn new(cells: Vec<String>, per_cell: Vec<u64>, mode: &ProgressMode) -> Self {
        match mode {
            ProgressMode::Off => Progress::Off,
            ProgressMode::Bars => Progress::Bars(Bars::new(&cells, &per_cell)),
            ProgressMode::Lines(every) => {
                let total: u64 = per_cell.iter().sum();
                let busy = per_cell.iter().filter(|&&n| n > 0).count();
                eprintln!("run: {total} rows to compute in {busy} cells");
                Progress::Lines(RefCell::new(Lines {
                    every: *every,
                    start: Instant::now(),
                    last: Instant::now(),
                    total,
                    done: 0,
                    per_cell,
                    done_per_cell: vec![0; cells.len()],
                    cells,
                }))
            }
        }
    }

    /// Rows of these cells finished (computed or failed) while working on `what` (a
    /// model and a prompt, shown beside the bars).
    pub(crate) fn rows_done(&self, what: &dyn Fn() -> String, cells: &[usize]) {
        match self {
            Progress::Off => {}
            Progress::Bars(b) => b.rows_done(what, cells),
            Progress::Lines(l) => l.borrow_mut().rows_done(cells),
        }
    }

    pub(crate) fn finish(&self) {
        match self {
            Progress::Off => {}
            Progress::Bars(b) => b.finish(),
            Progress::Lines(l) => l.borrow().line(None),
        }
    }
}

pub(crate) struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    cells: Vec<Option<ProgressBar>>,
}

impl Bars {
    fn new(ids: &[String], per_cell: &[u64]) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style = |tmpl: &str| ProgressStyle::with_template(tmpl).expect("valid template");
        let total = multi.add(ProgressBar::new(per_cell.iter().sum()));
        total.set_style(style(
            "{spinner} {msg:40!} {bar:30} {pos}/{len} rows  {per_sec:>10}  eta {eta}",
        ));
        total.set_message("starting");
        total.enable_steady_tick(Duration::from_millis(200));
        let cells = per_cell
            .iter()
            .enumerate()
            .map(|(ci, &n)| {
                (n > 0).then(|| {
                    let b = multi.add(ProgressBar::new(n));
                    b.set_style(style(
                        "  {msg:40!} {bar:30} {pos}/{len}  {per_sec:>10}  eta {eta}",
                    ));
                    b.set_message(ids[ci].clone());
                    b
                })
            })
            .collect();
        Self {
            multi,
            total,
            cells,
        }
    }

    fn rows_done(&self, what: &dyn Fn() -> String, cells: &[usize]) {
        for &cell in cells {
            self.total.inc(1);
            if let Some(b) = &self.cells[cell] {
                b.inc(1);
                if b.position() == b.length().unwrap_or(0) {
                    b.finish_and_clear();
                    self.multi.remove(b);
                }
            }
        }
        self.total.set_message(what());
    }

    fn finish(&self) {
        for b in self.cells.iter().flatten() {
            b.finish_and_clear();
        }
        self.total.finish_and_clear();
    }
}

pub(crate) struct Lines {
    every: Duration,
    start: Instant,
    last: Instant,
    total: u64,
    done: u64,
    per_cell: Vec<u64>,
    done_per_cell: Vec<u64>,
    cells: Vec<String>,
}

impl Lines {
    fn rows_done(&mut self, cells: &[usize]) {
        let mut cell = None;
        for &c in cells {
            self.done += 1;
            self.done_per_cell[c] += 1;
            cell = Some(c);
        }
        if self.last.elapsed() >= self.every {
            self.last = Instant::now();
            self.line(cell);
        }
    }

    /// `progress: 40/72 rows (56%), 3.2 rows/s, eta 10s; cell m/p/gen@t=0.2 12/24`
    fn line(&self, cell: Option<usize>) {
        let secs = self.start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        };
        let eta = if rate > 0.0 {
            format_duration((self.total - self.done) as f64 / rate)
        } else {
            "?".into()
        };
        let mut line = format!(
            "progress: {}/{} rows ({:.0}%), {rate:.2} rows/s, eta {eta}",
            self.done,
            self.total,
            100.0 * self.done as f64 / self.total.max(1) as f64
        );
        if let Some(c) = cell {
            line.push_str(&format!(
                "; cell {} {}/{}",
                self.cells[c], self.done_per_cell[c], self.per_cell[c]
            ));
        }
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    }
}

/// `95s` → `1m35s`.
fn format_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(super::format_duration(5.2), "5s");
        assert_eq!(super::format_duration(95.0), "1m35s");
        assert_eq!(super::format_duration(7300.0), "2h01m");
    }
}
