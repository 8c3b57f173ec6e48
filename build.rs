//! Records the exact llama.cpp binding version, which is part of every cache key. A build
//! that cannot read it fails: an "unknown" engine would share keys across engines.

#[path = "src/lockfile.rs"]
mod lockfile;

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-changed=src/lockfile.rs");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_else(|e| {
        panic!(
            "cannot read Cargo.lock ({e}): the llama.cpp binding version is part of every cache key"
        )
    });
    let version = lockfile::llama_sys_version(&lock).unwrap_or_else(|| {
        panic!(
            "Cargo.lock has no llama-cpp-sys-2 version: the llama.cpp binding version is part of every cache key"
        )
    });
    println!("cargo:rustc-env=PIPELINE_LLAMA_SYS_VERSION={version}");
}
