//! Records the exact llama.cpp binding version, which is part of every cache key.

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let mut version = "unknown".to_string();
    let mut in_pkg = false;
    for line in lock.lines() {
        if line == "name = \"llama-cpp-sys-2\"" {
            in_pkg = true;
        } else if in_pkg && line.starts_with("version = ") {
            version = line
                .trim_start_matches("version = ")
                .trim_matches('"')
                .to_string();
            break;
        }
    }
    println!("cargo:rustc-env=PIPELINE_LLAMA_SYS_VERSION={version}");
}
