//! Stopping a run on request. Slurm and Kubernetes stop a job with SIGTERM (then SIGKILL
//! after a grace period); a person presses Ctrl-C (SIGINT). The first of either stops taking
//! work: the worker finishes the part of a prompt it is on (a few seconds at most), every
//! finished row is committed, the report of what finished is written, and the process
//! exits with 128 + the signal (130 for SIGINT, 143 for SIGTERM). A second signal exits at
//! once; rows committed by then are kept, as after a kill.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// The stop request of one process: the flag the run polls, and which signal set it.
#[derive(Debug, Clone)]
pub struct StopRequest {
    /// Set by the first signal; the executor stops taking work when it is.
    pub cancel: Arc<AtomicBool>,
    signal: Arc<AtomicI32>,
}

impl StopRequest {
    /// Listen for SIGINT and SIGTERM on a thread of its own. `on_first` is told the
    /// signal's name the first time (to say what happens next).
    pub fn install(on_first: fn(&str)) -> std::io::Result<Self> {
        let req = Self {
            cancel: Arc::new(AtomicBool::new(false)),
            signal: Arc::new(AtomicI32::new(0)),
        };
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let (cancel, signal) = (req.cancel.clone(), req.signal.clone());
        std::thread::Builder::new()
            .name("pipeline-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if cancel.swap(true, Ordering::SeqCst) {
                        // A second request: no more waiting.
                        std::process::exit(exit_code(sig).into());
                    }
                    signal.store(sig, Ordering::SeqCst);
                    on_first(name(sig));
                }
            })?;
        Ok(req)
    }

    /// The exit code a stopped run ends with: 128 + the signal that stopped it.
    pub fn exit_code(&self) -> Option<u8> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            sig => Some(exit_code(sig)),
        }
    }
}

fn exit_code(sig: i32) -> u8 {
    u8::try_from(128 + sig).unwrap_or(1)
}

fn name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(super::exit_code(signal_hook::consts::SIGINT), 130);
        assert_eq!(super::exit_code(signal_hook::consts::SIGTERM), 143);
    }
}
