//! Builds the kernel programs (`flowlog-ebpf`) for the BPF target with the nightly toolchain, so
//! a plain `cargo build` of the agent embeds an up-to-date object. `AYA_BUILD_SKIP=1` skips it.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading the workspace metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "flowlog-ebpf")
        .ok_or_else(|| anyhow!("package flowlog-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("flowlog-ebpf manifest has no parent directory"))?;
    // aya-build relays every line the inner cargo writes on stderr as a cargo warning, so each
    // of its progress lines ("Compiling core …", a few dozen on a first build) would show as a
    // warning of this package. Quiet hides only those: compiler diagnostics and errors still
    // come through (they arrive as JSON messages, which aya-build relays too).
    // SAFETY: nothing else runs in this build script yet (no other thread reads the
    // environment).
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
