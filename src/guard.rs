//! Third-party decoders (Parquet) are not hardened against every damaged file and can panic
//! on one. Reading a file the user or a crash may have damaged goes through [`catch`]: a
//! panic there is an unreadable file, reported as such, and its message is not printed as
//! if the program had crashed.

use std::cell::Cell;
use std::panic::UnwindSafe;
use std::sync::Once;

thread_local! {
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Run `f`; a panic inside it becomes `None`, silently. Panics elsewhere are reported as
/// before.
pub fn catch<T>(f: impl FnOnce() -> T + UnwindSafe) -> Option<T> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = GUARDED.with(|g| g.replace(true));
    let result = std::panic::catch_unwind(f);
    GUARDED.with(|g| g.set(outer));
    result.ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_inside_is_none_and_the_value_otherwise() {
        assert_eq!(super::catch(|| 7), Some(7));
        assert_eq!(super::catch(|| -> u8 { panic!("damaged") }), None);
    }
}
