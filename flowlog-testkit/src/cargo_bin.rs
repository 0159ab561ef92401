//! A binary of another package of the workspace, for the integration tests that run two
//! programs together (`flowlog-enricher`'s tests start `flowlog-inventory` too). Cargo gives a
//! test only its own package's binaries (`CARGO_BIN_EXE_<name>`), so the other one is built
//! here: `cargo build -p <package> --bin <name>` once per test process, with the running test's
//! profile, into the same target directory (`CARGO_TARGET_DIR` and cargo's configuration are
//! the nested cargo's as well as the outer one's). Cargo decides what is stale, so the binary
//! is never an old one left in the target directory: under `cargo test --all-targets` at the
//! root it is already up to date, and under `cargo test -p <one package>` it is built then.
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

/// The binaries built by this process: (package, binary) → path.
static BUILT: Mutex<BTreeMap<(String, String), PathBuf>> = Mutex::new(BTreeMap::new());

/// The path of binary `bin` of workspace package `package`, built (or found up to date) by
/// cargo with the running test's profile and the package's default features. Panics with
/// cargo's output when the build fails. Tests of one process that ask for the same binary
/// wait for the first build and share it.
pub fn cargo_bin(package: &str, bin: &str) -> PathBuf {
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let key = (package.to_string(), bin.to_string());
    if let Some(path) = built.get(&key) {
        return path.clone();
    }
    let path = build(package, bin).unwrap_or_else(|e| panic!("{e}"));
    built.insert(key, path.clone());
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

/// Runs `cargo build` for `package`'s binary `bin` and returns the executable cargo reports.
fn build(package: &str, bin: &str) -> Result<PathBuf, String> {
    let profile = profile()?;
    // The workspace's manifest: this crate is one of its members.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("flowlog-testkit is inside the workspace")
        .join("Cargo.toml");
    // The cargo that runs the tests (cargo sets CARGO for them), so the same toolchain.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(&cargo);
    command
        .arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--package", package, "--bin", bin, "--profile", &profile])
        // Artifacts as JSON on stdout (the executable's path); diagnostics rendered on stderr.
        .args(["--message-format", "json-render-diagnostics"]);
    let shown = format!(
        "{} build --package {package} --bin {bin} --profile {profile}",
        Path::new(&cargo).display()
    );
    let out = command
        .output()
        .map_err(|e| format!("running `{shown}` for the test: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "`{shown}` failed ({}): this test runs {bin} of package {package}, which did not \
             build:\n{stderr}",
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
