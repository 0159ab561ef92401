//! A binary of another package of the workspace, for the integration tests that run two
//! programs together (`flowlog-enricher`'s tests start `flowlog-inventory` too). Cargo gives a
//! test only its own package's binaries (`CARGO_BIN_EXE_<name>`), so the other one is built
//! here, once per test process, by the cargo that runs the tests, with the running test's
//! profile, into the same target directory (`CARGO_TARGET_DIR` and cargo's configuration reach
//! the nested cargo as they reached the outer one). Cargo decides what is stale, so the binary is
//! never an old one left in the target directory.
//!
//! The nested build is `cargo build --bin <name> --examples` at the workspace's root: the
//! default members, as `cargo test --all-targets` there (`scripts/test`, CI) selects them, and
//! `--examples` (the workspace has none) because it makes cargo resolve features as for a test
//! run, dev-dependencies included. Resolved any other way, the features of shared dependencies
//! differ (e.g. rustls's TLS providers), and cargo would build the binary's dependencies a
//! second time beside the ones the test run just built; resolved this way, under
//! `cargo test --all-targets` at the root the binary is already up to date, and under
//! `cargo test -p <one package>` it is built (or found up to date from a whole-suite run).
//!
//! The nested build runs after the outer cargo has finished compiling (tests run without its
//! build lock). Its output is shown only when it fails.
use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

/// The binaries built by this process: name → path.
static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());

/// The path of binary `bin` of the workspace's default members (e.g. `flowlog-inventory`),
/// built (or found up to date) by cargo with the running test's profile. Panics with cargo's
/// output when the build fails. Tests of one process that ask for the same binary wait for the
/// first build and share it.
pub fn cargo_bin(bin: &str) -> PathBuf {
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(bin) {
        return path.clone();
    }
    let path = build(bin).unwrap_or_else(|e| panic!("{e}"));
    built.insert(bin.to_string(), path.clone());
    path
}

/// The running test's cargo profile, from where cargo put its executable
/// (`<target>/<profile directory>/deps/<test>`): the directory `debug` is the `dev` profile,
/// any other is the profile of its name (`release`, or a custom one).
fn profile() -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the test executable's path: {e}"))?;
    let dir = exe
        .parent()
        .filter(|deps| deps.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|p| p.to_str())
        .ok_or_else(|| {
            format!(
                "{} is not in <target>/<profile>/deps: cannot tell the test's cargo profile",
                exe.display()
            )
        })?;
    Ok(match dir {
        "debug" => "dev".to_string(),
        other => other.to_string(),
    })
}

/// Runs `cargo build` for the binary `bin` and returns the executable cargo reports.
fn build(bin: &str) -> Result<PathBuf, String> {
    let profile = profile()?;
    // The workspace's manifest: this crate is one of its members.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("flowlog-testkit is inside the workspace")
        .join("Cargo.toml");
    // The cargo that runs the tests (cargo sets CARGO for them), so the same toolchain.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(&cargo);
    // From the root, as `cargo test` there: cargo reads its configuration from where it runs.
    command
        .current_dir(manifest.parent().expect("the manifest is in the root"))
        .arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--bin", bin, "--examples", "--profile", &profile])
        // Artifacts as JSON on stdout (the executable's path); diagnostics rendered on stderr.
        .args(["--message-format", "json-render-diagnostics"]);
    let shown = format!(
        "{} build --bin {bin} --examples --profile {profile}",
        Path::new(&cargo).display()
    );
    let out = command
        .output()
        .map_err(|e| format!("running `{shown}` for the test: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "`{shown}` failed ({}): this test runs {bin}, another package's binary, which did \
             not build:\n{stderr}",
            out.status
        ));
    }
    executable(&stdout, bin).ok_or_else(|| {
        format!("`{shown}` succeeded but reported no executable named {bin}:\n{stderr}")
    })
}

/// The `executable` of the `compiler-artifact` message for the binary target `bin`.
fn executable(messages: &str, bin: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"))
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_binarys_executable_among_cargos_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"flowlog_enricher"},"executable":null}
not json: a line cargo would never print, skipped
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"flowlog-enricher"},"executable":"/t/debug/flowlog-enricher"}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"flowlog-inventory"},"executable":"/t/debug/flowlog-inventory"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable(messages, "flowlog-inventory"),
            Some(PathBuf::from("/t/debug/flowlog-inventory"))
        );
        assert_eq!(executable(messages, "flowlog"), None);
    }
}
