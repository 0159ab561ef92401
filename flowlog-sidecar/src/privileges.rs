//! What the kernel checks when the agent loads, attaches and runs its programs, and what to tell
//! the user when it refuses one of them. The agent does not refuse to start on a guess: it tries
//! the real operation, and only when the kernel answers EPERM or EACCES does it read its own
//! effective capabilities (`CapEff` in `/proc/self/status`) and say which of the capabilities
//! that operation needs it lacks, or, if it has them all, what else refuses (a seccomp filter,
//! a security module). deploy/CAPABILITIES.md lists the operations and the evidence.
use std::fmt;

/// A Linux capability (its bit in the kernel's capability sets, include/uapi/linux/capability.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability(pub u8);

impl Capability {
    pub const DAC_OVERRIDE: Capability = Capability(1);
    pub const DAC_READ_SEARCH: Capability = Capability(2);
    pub const SYS_ADMIN: Capability = Capability(21);
    pub const PERFMON: Capability = Capability(38);
    pub const BPF: Capability = Capability(39);

    /// The kernel's name of every capability up to CAP_CHECKPOINT_RESTORE (Linux 5.9), by bit.
    const NAMES: [&'static str; 41] = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ];
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Self::NAMES.get(usize::from(self.0)) {
            Some(name) => f.write_str(name),
            None => write!(f, "capability {}", self.0),
        }
    }
}

/// A set of capabilities: the 64-bit mask the kernel prints in `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// The set in field `field` (`CapEff`, `CapBnd`, ...) of a `/proc/<pid>/status` text.
    pub fn from_status(status: &str, field: &str) -> Option<Self> {
        let value = status.lines().find_map(|line| {
            line.strip_prefix(field)
                .and_then(|rest| rest.strip_prefix(':'))
        })?;
        u64::from_str_radix(value.trim(), 16).ok().map(Self)
    }

    pub fn contains(self, cap: Capability) -> bool {
        cap.0 < 64 && self.0 & (1u64 << cap.0) != 0
    }

    /// Whether the kernel's check for `cap` passes with this set: it also accepts CAP_SYS_ADMIN
    /// where CAP_BPF or CAP_PERFMON is checked (`bpf_capable()`, `perfmon_capable()`), and
    /// CAP_DAC_OVERRIDE where reading a file needs CAP_DAC_READ_SEARCH.
    pub fn satisfies(self, cap: Capability) -> bool {
        let also = match cap {
            Capability::BPF | Capability::PERFMON => Some(Capability::SYS_ADMIN),
            Capability::DAC_READ_SEARCH => Some(Capability::DAC_OVERRIDE),
            _ => None,
        };
        self.contains(cap) || also.is_some_and(|c| self.contains(c))
    }

    fn iter(self) -> impl Iterator<Item = Capability> {
        (0..64u8)
            .map(Capability)
            .filter(move |&cap| self.contains(cap))
    }
}

impl fmt::Display for Capabilities {
    /// `CAP_BPF, CAP_PERFMON`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        for (i, cap) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{cap}")?;
        }
        Ok(())
    }
}

/// What the agent asks the kernel to do at start-up, each with the capabilities the kernel
/// checks for it (and why the agent does it), as found by running the agent without each one
/// (deploy/CAPABILITIES.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Creating the maps and loading the object's BTF (`bpf(BPF_MAP_CREATE)`,
    /// `bpf(BPF_BTF_LOAD)`).
    CreateMaps,
    /// Loading a tracing program (`bpf(BPF_PROG_LOAD)` of a tracepoint or raw tracepoint
    /// program).
    LoadProgram,
    /// Attaching a program to a raw or BTF-typed tracepoint (`bpf(BPF_RAW_TRACEPOINT_OPEN)`).
    AttachRawTracepoint,
    /// Attaching a program to a tracepoint through a perf event (`perf_event_open`).
    AttachTracepoint,
    /// Running a loaded program on demand (`bpf(BPF_PROG_TEST_RUN)`: the sweep and the flush).
    RunProgram,
    /// Reading tracefs (tracepoint formats and ids), a directory only root may enter.
    ReadTracefs,
}

impl Operation {
    /// The operations every start of the agent makes (as root: reading tracefs needs nothing).
    const AGENT: [Operation; 5] = [
        Operation::CreateMaps,
        Operation::LoadProgram,
        Operation::AttachRawTracepoint,
        Operation::AttachTracepoint,
        Operation::RunProgram,
    ];

    /// The capabilities the kernel checks for this operation, each with what the agent uses it
    /// for.
    pub fn needs(self) -> &'static [(Capability, &'static str)] {
        const BPF: (Capability, &str) = (
            Capability::BPF,
            "to create its eBPF maps and load its eBPF programs",
        );
        const PERFMON: (Capability, &str) = (
            Capability::PERFMON,
            "to load tracing programs that read kernel memory and attach them to tracepoints",
        );
        match self {
            Operation::CreateMaps => &[BPF],
            Operation::LoadProgram => &[BPF, PERFMON],
            Operation::AttachRawTracepoint | Operation::RunProgram => &[],
            Operation::AttachTracepoint => &[PERFMON],
            Operation::ReadTracefs => &[(
                Capability::DAC_READ_SEARCH,
                "to read tracefs (mode 0700, owned by root) when it does not run as root",
            )],
        }
    }

    /// The system call the kernel refused.
    fn call(self) -> &'static str {
        match self {
            Operation::AttachTracepoint => "perf_event_open(2)",
            Operation::ReadTracefs => "reading tracefs",
            _ => "bpf(2)",
        }
    }
}

/// Why the kernel refused an operation with EPERM or EACCES, as far as the process can tell
/// from its own status: the capabilities it lacks, or else the seccomp filter on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    operation: Operation,
    /// The process's effective capabilities (`None`: /proc/self/status was unreadable).
    effective: Option<Capabilities>,
    /// The process's seccomp mode (`Seccomp:` in /proc/self/status: 0 none, 1 strict, 2 filter).
    seccomp: Option<u32>,
}

impl Refusal {
    /// The refusal of `operation` as seen from a `/proc/self/status` text.
    pub fn from_status(operation: Operation, status: &str) -> Self {
        let seccomp = status
            .lines()
            .find_map(|line| line.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok());
        Self {
            operation,
            effective: Capabilities::from_status(status, "CapEff"),
            seccomp,
        }
    }

    /// The refusal of `operation` as seen from this process now.
    pub fn of_this_process(operation: Operation) -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Self::from_status(operation, &status)
    }

    /// The capabilities the operation needs that the process lacks, with why each is needed.
    pub fn missing(&self) -> Vec<(Capability, &'static str)> {
        let have = self.effective.unwrap_or_default();
        self.operation
            .needs()
            .iter()
            .copied()
            .filter(|&(cap, _)| !have.satisfies(cap))
            .collect()
    }

    /// The capabilities the agent needs for its other operations that the process lacks too
    /// (so that one error names everything to grant, not one capability per attempt).
    pub fn also_missing(&self) -> Vec<(Capability, &'static str)> {
        let have = self.effective.unwrap_or_default();
        let here = self.operation.needs();
        let mut also: Vec<(Capability, &'static str)> = Vec::new();
        for op in Operation::AGENT {
            for &(cap, why) in op.needs() {
                if !have.satisfies(cap)
                    && !here.iter().any(|&(c, _)| c == cap)
                    && !also.iter().any(|&(c, _)| c == cap)
                {
                    also.push((cap, why));
                }
            }
        }
        also
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(effective) = self.effective else {
            return write!(
                f,
                "this process could not read its capabilities from /proc/self/status; the \
                 agent needs CAP_BPF and CAP_PERFMON (see deploy/CAPABILITIES.md)"
            );
        };
        let missing = self.missing();
        if !missing.is_empty() {
            f.write_str("this process lacks ")?;
            list(f, &missing)?;
            let also = self.also_missing();
            if !also.is_empty() {
                f.write_str(", and also ")?;
                list(f, &also)?;
            }
            return write!(
                f,
                " (its effective capabilities: {effective}); grant {} (Kubernetes: \
                 securityContext.capabilities.add; systemd: AmbientCapabilities=)",
                if missing.len() + also.len() == 1 {
                    "it"
                } else {
                    "them"
                }
            );
        }
        let call = self.operation.call();
        write!(
            f,
            "this process has the capabilities the kernel checks for this ({effective}), so \
             something else refused {call}: "
        )?;
        if self.seccomp == Some(2) {
            write!(
                f,
                "a seccomp filter is on the process (Seccomp: 2 in /proc/self/status): the \
                 default profiles of Podman, CRI-O and containerd before late 2022 allow \
                 bpf(2) and perf_event_open(2) only with CAP_SYS_ADMIN; run it where the \
                 default profile allows them with CAP_BPF and CAP_PERFMON (containerd 1.7, \
                 Docker 23) or with a profile that does (deploy/CAPABILITIES.md)"
            )
        } else {
            write!(
                f,
                "a Linux security module (SELinux, AppArmor) or the kernel's lockdown"
            )
        }
    }
}

/// `CAP_X, which the agent needs to ..., and CAP_Y, which ...`.
fn list(f: &mut fmt::Formatter<'_>, caps: &[(Capability, &str)]) -> fmt::Result {
    for (i, (cap, why)) in caps.iter().enumerate() {
        if i > 0 {
            f.write_str(", and ")?;
        }
        write!(f, "{cap}, which the agent needs {why}")?;
    }
    Ok(())
}

/// Whether `error` or one of its causes is an I/O error EPERM or EACCES: the kernel refused.
pub fn is_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/self/status` of a process as Linux 6.18 prints it (the fields around the
    /// capability sets), with `CapEff` and `Seccomp` as given.
    fn status(cap_eff: &str, seccomp: u32) -> String {
        format!(
            "Name:\tflowlog-sidecar\nUmask:\t0022\nState:\tR (running)\nUid:\t0\t0\t0\t0\n\
             CapInh:\t0000000000000000\nCapPrm:\t{cap_eff}\nCapEff:\t{cap_eff}\n\
             CapBnd:\t{cap_eff}\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n\
             Seccomp:\t{seccomp}\nSeccomp_filters:\t{}\n",
            u32::from(seccomp == 2)
        )
    }

    #[test]
    fn capability_sets_are_read_from_proc_status() {
        // CAP_BPF (39) and CAP_PERFMON (38): 2^39 + 2^38.
        let text = status("000000c000000000", 2);
        let eff = Capabilities::from_status(&text, "CapEff").unwrap();
        assert_eq!(eff, Capabilities(0xc0_0000_0000));
        assert!(eff.contains(Capability::BPF) && eff.contains(Capability::PERFMON));
        assert!(!eff.contains(Capability::SYS_ADMIN));
        assert_eq!(eff.to_string(), "CAP_PERFMON, CAP_BPF");
        assert_eq!(
            Capabilities::from_status(&text, "CapAmb"),
            Some(Capabilities(0))
        );
        // A root shell on this VM: everything but CAP_SYS_RESOURCE (24).
        let root = Capabilities::from_status(&status("000001fffeffffff", 0), "CapEff").unwrap();
        assert!(!root.contains(Capability(24)));
        assert_eq!(root.iter().count(), 40);
        assert_eq!(Capabilities(0).to_string(), "none");
        assert_eq!(Capabilities::from_status("Name:\tx\n", "CapEff"), None);
        // "CapEff" is not "CapEffective" (no such field, but prefixes must not match).
        assert_eq!(Capabilities::from_status("CapEffx:\t1\n", "CapEff"), None);
    }

    #[test]
    fn cap_sys_admin_stands_in_for_bpf_and_perfmon() {
        let admin = Capabilities(1 << 21);
        assert!(admin.satisfies(Capability::BPF));
        assert!(admin.satisfies(Capability::PERFMON));
        assert!(!admin.satisfies(Capability::DAC_READ_SEARCH));
        assert!(Capabilities(1 << 1).satisfies(Capability::DAC_READ_SEARCH));
        let refusal = Refusal::from_status(Operation::LoadProgram, &status("0000000000200000", 0));
        assert!(refusal.missing().is_empty());
    }

    #[test]
    fn a_refusal_names_the_missing_capability_and_why() {
        // CAP_BPF only: loading a tracing program needs CAP_PERFMON as well.
        let refusal = Refusal::from_status(Operation::LoadProgram, &status("0000008000000000", 2));
        assert_eq!(
            refusal.to_string(),
            "this process lacks CAP_PERFMON, which the agent needs to load tracing programs \
             that read kernel memory and attach them to tracepoints (its effective \
             capabilities: CAP_BPF); grant it (Kubernetes: securityContext.capabilities.add; \
             systemd: AmbientCapabilities=)"
        );
        // Nothing: the first refusal (the maps) names CAP_BPF, and CAP_PERFMON too.
        let refusal = Refusal::from_status(Operation::CreateMaps, &status("0000000000000000", 0));
        assert_eq!(
            refusal.to_string(),
            "this process lacks CAP_BPF, which the agent needs to create its eBPF maps and load \
             its eBPF programs, and also CAP_PERFMON, which the agent needs to load tracing \
             programs that read kernel memory and attach them to tracepoints (its effective \
             capabilities: none); grant them (Kubernetes: securityContext.capabilities.add; \
             systemd: AmbientCapabilities=)"
        );
        // Attaching through a perf event needs CAP_PERFMON only.
        let refusal =
            Refusal::from_status(Operation::AttachTracepoint, &status("0000008000000000", 0));
        assert_eq!(
            refusal
                .missing()
                .iter()
                .map(|(c, _)| *c)
                .collect::<Vec<_>>(),
            [Capability::PERFMON]
        );
    }

    #[test]
    fn a_refusal_with_every_capability_blames_seccomp_or_else_a_security_module() {
        let refusal = Refusal::from_status(Operation::CreateMaps, &status("000000c000000000", 2));
        let text = refusal.to_string();
        assert!(
            text.starts_with(
                "this process has the capabilities the kernel checks for this (CAP_PERFMON, \
                 CAP_BPF), so something else refused bpf(2): a seccomp filter is on the process"
            ),
            "{text}"
        );
        let refusal =
            Refusal::from_status(Operation::AttachTracepoint, &status("000000c000000000", 0));
        assert_eq!(
            refusal.to_string(),
            "this process has the capabilities the kernel checks for this (CAP_PERFMON, \
             CAP_BPF), so something else refused perf_event_open(2): a Linux security module \
             (SELinux, AppArmor) or the kernel's lockdown"
        );
    }

    #[test]
    fn only_eperm_and_eacces_are_refusals() {
        use std::io::{Error, ErrorKind};
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Error);
        assert!(is_refusal(&Outer(Error::from_raw_os_error(libc::EPERM))));
        assert!(is_refusal(&Outer(Error::from_raw_os_error(libc::EACCES))));
        assert!(!is_refusal(&Outer(Error::from_raw_os_error(libc::EINVAL))));
        assert!(!is_refusal(&Outer(Error::new(
            ErrorKind::PermissionDenied,
            "not from the kernel"
        ))));
    }
}
