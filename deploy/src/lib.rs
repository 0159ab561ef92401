//! Helpers for the tests of what `deploy/` ships (the OCI images, the Kubernetes manifests, the
//! systemd units): where the repository and the workspace's binaries are, rendering and checking
//! the manifests ([`kubernetes`], [`posture`]), checking the units ([`systemd`]), and building and
//! running the images with the privileges the manifests give them ([`podman`]). The tests are
//! under `deploy/tests/`; this crate ships nothing itself.
use std::path::{Path, PathBuf};

pub mod kubernetes;
pub mod podman;
pub mod posture;
pub mod systemd;

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
