//! The systemd units (deploy/systemd/): `systemd-analyze verify` accepts each one, installed
//! with the workspace's own binaries in a root directory the test makes (nothing is installed
//! on the host); the exposure score of `systemd-analyze security --offline=true` is at most the
//! one recorded here and in README; and the units grant exactly the documented capabilities.
use std::collections::BTreeSet;

use std::time::Duration;

use flowlog_deploy::{
    binaries_dir,
    kubernetes::agent_capabilities,
    repo_root,
    systemd::{
        AgentRun, UNITS, directive, exposure, run_agent_as, systemd_dir, verify, verify_root,
    },
};

/// The exposure scores measured with systemd 252 (`systemd-analyze security --offline=true`;
/// 0 is the best, 10 the worst). A change that raises one fails here: lower it, or record the
/// new value here and in README ("Deploy" > "Plain hosts") with the reason.
const EXPOSURE: [(&str, f64); 3] = [
    ("flowlog-agent.service", 1.8),
    ("flowlog-enricher.service", 1.1),
    ("flowlog-inventory.service", 1.1),
];

/// The capability the agent's unit adds to the DaemonSet's: the unit runs as the user
/// `flowlog`, not root, and tracefs is mode 0700 root (see the unit's header).
const AGENT_UNIT_EXTRA_CAPABILITY: &str = "CAP_DAC_READ_SEARCH";

fn unit(name: &str) -> String {
    std::fs::read_to_string(systemd_dir().join(name)).unwrap()
}

fn set(values: &[String]) -> BTreeSet<String> {
    values
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_unit_verifies_with_the_workspace_binaries_installed_in_a_root() {
    let root = verify_root(&binaries_dir(), &binaries_dir()).unwrap();
    for (unit, _) in UNITS {
        let verified = verify(&root, unit).unwrap();
        assert!(verified.success, "{unit}:\n{}", verified.output);
        assert_eq!(verified.output, "", "{unit} verified with warnings");
    }
    // The check is real: without its binary, a unit does not verify.
    let (unit, binary) = UNITS[0];
    std::fs::remove_file(root.join("usr/local/bin").join(binary)).unwrap();
    let verified = verify(&root, unit).unwrap();
    assert!(!verified.success);
    assert!(
        verified.output.contains(&format!(
            "Command /usr/local/bin/{binary} is not executable: No such file or directory"
        )),
        "{}",
        verified.output
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn exposure_scores_are_at_most_the_recorded_ones() {
    for (unit, recorded) in EXPOSURE {
        let score = exposure(&systemd_dir().join(unit)).unwrap();
        eprintln!("{unit}: exposure {score} (recorded {recorded})");
        assert!(
            score <= recorded,
            "{unit}: exposure {score} > recorded {recorded}"
        );
    }
}

#[test]
fn readme_states_the_recorded_exposure_scores() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    for (unit, recorded) in EXPOSURE {
        let row = format!("| `{unit}` | {recorded} |");
        assert!(readme.contains(&row), "README has no row {row:?}");
    }
}

#[test]
fn the_agent_unit_adds_the_daemonsets_capabilities_and_only_dac_read_search() {
    let agent = unit("flowlog-agent.service");
    let mut expected: BTreeSet<String> = agent_capabilities()
        .unwrap()
        .into_iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    expected.insert(AGENT_UNIT_EXTRA_CAPABILITY.to_string());
    assert_eq!(set(&directive(&agent, "AmbientCapabilities")), expected);
    assert_eq!(set(&directive(&agent, "CapabilityBoundingSet")), expected);
    assert_eq!(directive(&agent, "User"), ["flowlog"]);
    assert_eq!(directive(&agent, "StateDirectory"), ["flowlog"]);
    // The system calls the agent is about are allowed, and the spool is where the unit keeps it.
    let filter = set(&directive(&agent, "SystemCallFilter"));
    assert!(
        filter.contains("bpf") && filter.contains("perf_event_open"),
        "{filter:?}"
    );
    assert!(
        directive(&agent, "Environment")
            .iter()
            .any(|e| e.contains("FLOWLOG_SPOOL_DIR=/var/lib/flowlog/spool"))
    );
    // The system user exists through sysusers.d.
    let sysusers = std::fs::read_to_string(systemd_dir().join("sysusers.d/flowlog.conf")).unwrap();
    assert!(
        sysusers.lines().any(|l| l.starts_with("u flowlog ")),
        "{sysusers}"
    );
}

#[test]
fn the_enricher_and_the_inventory_have_no_capabilities_and_dynamic_users() {
    for name in ["flowlog-enricher.service", "flowlog-inventory.service"] {
        let unit = unit(name);
        assert_eq!(directive(&unit, "CapabilityBoundingSet"), [""], "{name}");
        assert_eq!(directive(&unit, "AmbientCapabilities"), [""], "{name}");
        assert_eq!(directive(&unit, "DynamicUser"), ["yes"], "{name}");
        assert_eq!(directive(&unit, "PrivateUsers"), ["yes"], "{name}");
    }
}

#[test]
fn every_unit_is_hardened_and_runs_its_binary_from_usr_local_bin() {
    for (name, binary) in UNITS {
        let unit = unit(name);
        assert_eq!(
            directive(&unit, "ExecStart"),
            [format!("/usr/local/bin/{binary}")],
            "{name}"
        );
        for (key, value) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectKernelLogs", "yes"),
            ("ProtectControlGroups", "yes"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("RestrictNamespaces", "yes"),
            ("MemoryDenyWriteExecute", "yes"),
            ("LockPersonality", "yes"),
            ("SystemCallArchitectures", "native"),
        ] {
            assert_eq!(directive(&unit, key), [value], "{name}: {key}");
        }
        // SIGTERM: the agent waits up to 10 s for Kafka, then fsyncs its spool.
        let stop = directive(&unit, "TimeoutStopSec");
        let seconds: u64 = stop[0].trim_end_matches('s').parse().unwrap();
        assert!(seconds >= 30, "{name}: TimeoutStopSec {stop:?}");
    }
}

/// The user the agent runs as in the proof below: `nobody`, a non-root user with no files.
const NOBODY: u32 = 65534;

/// What the unit's `User=flowlog` and `AmbientCapabilities=` amount to, run for real (as root,
/// through setpriv, without systemd's other sandboxing): the agent loads and attaches all its
/// programs as a non-root user with exactly the unit's capabilities, and without any one of
/// them it either fails at start or starts degraded, saying so. (Without CAP_DAC_READ_SEARCH
/// it cannot read tracefs, so the `syscalls:sys_exit_accept*` tracepoints are not attached and
/// inbound flows lose their process at accept time.)
#[test]
fn the_agent_captures_as_a_non_root_user_with_exactly_its_units_capabilities() {
    let capabilities: Vec<String> = set(&directive(
        &unit("flowlog-agent.service"),
        "AmbientCapabilities",
    ))
    .into_iter()
    .collect();
    // A copy that a non-root user can execute (the target directory may be under /root).
    let dir = std::env::temp_dir().join(format!("flowlog-deploy-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let agent = dir.join("flowlog-sidecar");
    std::fs::copy(binaries_dir().join("flowlog-sidecar"), &agent)
        .expect("the flowlog-sidecar binary (cargo test --all-targets builds it)");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = |caps: &[String]| {
        run_agent_as(&agent, NOBODY, caps, "127.0.0.1:0", Duration::from_secs(30)).unwrap()
    };
    assert_eq!(
        run(&capabilities),
        AgentRun::Captured {
            exit_code: Some(0),
            warnings: vec![]
        }
    );
    for missing in &capabilities {
        let fewer: Vec<String> = capabilities
            .iter()
            .filter(|c| *c != missing)
            .cloned()
            .collect();
        match run(&fewer) {
            AgentRun::Failed { exit_code, log } => {
                assert_ne!(exit_code, Some(0), "without {missing}: {log}");
                eprintln!(
                    "without {missing}: failed, exit {exit_code:?}: {}",
                    log.trim()
                );
            }
            AgentRun::Captured { warnings, .. } => {
                assert!(
                    !warnings.is_empty(),
                    "the agent captured fully without {missing}"
                );
                eprintln!("without {missing}: degraded: {}", warnings.join("\n"));
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
