//! Helpers for the tests of what `deploy/` ships (the OCI images, the Kubernetes manifests, the
//! systemd units): where the repository and the workspace's binaries are, and ([`podman`]) the
//! images and the privileges they run with. The tests are under `deploy/tests/`; this crate
//! ships nothing itself.
pub mod podman;

use std::path::{Path, PathBuf};

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("deploy/ is inside the repository")
        .to_path_buf()
}

/// `deploy/` itself.
pub fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// The directory of the workspace's binaries built with the test's profile (`cargo test
/// --all-targets` builds every binary of the workspace before it runs any test): the parent of
/// the test executable's `deps/` directory.
pub fn binaries_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executables live in <target>/<profile>/deps")
        .to_path_buf()
}
