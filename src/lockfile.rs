//! Reading Cargo.lock, shared by `build.rs` (which records the llama.cpp binding version,
//! part of every cache key) and the tests that check it.

/// The version of the `llama-cpp-sys-2` package in a Cargo.lock, if it has one.
pub fn llama_sys_version(lock: &str) -> Option<String> {
    let mut in_pkg = false;
    for line in lock.lines() {
        if line == "[[package]]" {
            in_pkg = false;
        } else if line == "name = \"llama-cpp-sys-2\"" {
            in_pkg = true;
        } else if in_pkg && let Some(v) = line.strip_prefix("version = ") {
            let v = v.trim_matches('"');
            return (!v.is_empty()).then(|| v.to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::llama_sys_version;

    #[test]
    fn the_committed_lock_names_the_version_the_build_recorded() {
        let lock = include_str!("../Cargo.lock");
        assert_eq!(
            llama_sys_version(lock).as_deref(),
            Some(env!("PIPELINE_LLAMA_SYS_VERSION"))
        );
    }

    #[test]
    fn a_lock_without_the_binding_gives_nothing() {
        let lock = "[[package]]\nname = \"llama-cpp-2\"\nversion = \"0.1.160\"\n\n[[package]]\nname = \"llama-cpp-sys-2\"\n";
        assert_eq!(llama_sys_version(lock), None);
        assert_eq!(llama_sys_version(""), None);
    }
}
