//! Discovers the running kernel's layout: which tracepoints exist and where each `struct sock` /
//! `struct tcp_sock` field sits (BTF), and where the accept tracepoints keep their return value
//! (tracefs `format` files).
//!
//! Layouts differ between kernels (`sk_protocol` was a bitfield before 5.6, `sk_flags` moved into
//! `sock_common` in 6.x, `tcp_sock` is reordered often), so nothing is compiled in: one agent
//! binary runs on every kernel that has BTF, and a kernel that lacks something is a start-up
//! error naming it.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use flowlog_common::{AcceptLayout, AdoptLayout, KernelLayout, tuple_block};

use crate::btf::{Btf, BtfError};

/// Why the kernel's layout could not be discovered.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "tracefs is not mounted (looked in /sys/kernel/tracing and /sys/kernel/debug/tracing); \
         mount it with `mount -t tracefs tracefs /sys/kernel/tracing`"
    )]
    NoTracefs,
    #[error("reading {path}")]
    TracefsUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {kernel} has no tracepoint {tracepoint} (its BTF has no `btf_trace_{name}`)")]
    MissingRawTracepoint {
        kernel: String,
        tracepoint: String,
        name: String,
    },
    #[error("kernel {kernel}: struct sock_common is not laid out as expected ({detail})")]
    UnexpectedSockLayout { kernel: String, detail: String },
    #[error("kernel {kernel} has no tracepoint {tracepoint} ({path})")]
    MissingTracepoint {
        kernel: String,
        tracepoint: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint} on kernel {kernel} has no field `{field}`")]
    MissingField {
        kernel: String,
        tracepoint: String,
        field: String,
    },
    #[error(
        "kernel {kernel} exposes no usable BTF at {path} (flowlog needs CONFIG_DEBUG_INFO_BTF)"
    )]
    NoBtf {
        kernel: String,
        path: PathBuf,
        source: BtfError,
    },
    #[error("reading kernel {kernel}'s BTF")]
    Btf { kernel: String, source: BtfError },
}

/// One field of a tracepoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Parses a tracefs `format` file into field name → offset and size. Array fields are keyed by
/// their name without the `[N]` suffix.
pub fn parse_format(text: &str) -> HashMap<String, Field> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse().ok();
            } else if decl.is_none() && !part.is_empty() && !part.starts_with("signed:") {
                decl = Some(part);
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        let Some(name) = decl.split_whitespace().last() else {
            continue;
        };
        let name = name.trim_start_matches('*');
        let name = name.split('[').next().unwrap_or(name);
        fields.insert(name.to_string(), Field { offset, size });
    }
    fields
}

/// Where tracefs is mounted. A mount this process may not enter (tracefs is mode 0700, owned
/// by root) is an error of its own, not "not mounted".
pub fn tracefs_root() -> Result<PathBuf, LayoutError> {
    for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"].map(PathBuf::from) {
        let events = root.join("events");
        match std::fs::metadata(&events) {
            Ok(m) if m.is_dir() => return Ok(root),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(LayoutError::TracefsUnreadable {
                    path: events,
                    source: e,
                });
            }
            _ => {}
        }
    }
    Err(LayoutError::NoTracefs)
}

/// The running kernel's release string, for error messages.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "(unknown release)".to_string())
}

/// Reads one tracepoint's format; `tracepoint` is `category/name`.
fn tracepoint_fields(
    tracefs: &Path,
    tracepoint: &str,
    kernel: &str,
) -> Result<TracepointFields, LayoutError> {
    let path = tracefs.join("events").join(tracepoint).join("format");
    let text = std::fs::read_to_string(&path).map_err(|source| LayoutError::MissingTracepoint {
        kernel: kernel.to_string(),
        tracepoint: tracepoint.replace('/', ":"),
        path: path.clone(),
        source,
    })?;
    Ok(TracepointFields {
        name: tracepoint.replace('/', ":"),
        kernel: kernel.to_string(),
        fields: parse_format(&text),
    })
}

struct TracepointFields {
    name: String,
    kernel: String,
    fields: HashMap<String, Field>,
}

impl TracepointFields {
    fn get(&self, field: &str) -> Result<Field, LayoutError> {
        self.fields
            .get(field)
            .copied()
            .ok_or_else(|| LayoutError::MissingField {
                kernel: self.kernel.clone(),
                tracepoint: self.name.clone(),
                field: field.to_string(),
            })
    }

    fn offset(&self, field: &str) -> Result<u32, LayoutError> {
        Ok(self.get(field)?.offset)
    }
}

/// The tracepoints the agent attaches to as raw tracepoints, as `category:name`.
pub const RAW_TRACEPOINTS: [&str; 3] = [
    "sock:inet_sock_set_state",
    "tcp:tcp_send_reset",
    "tcp:tcp_receive_reset",
];

/// Discovers the layout of sockets from the BTF file at `btf_path`, and checks that the raw
/// tracepoints exist.
pub fn discover(btf_path: &Path) -> Result<KernelLayout, LayoutError> {
    let KernelBtf { kernel, btf } = KernelBtf::open(btf_path)?;
    for tracepoint in RAW_TRACEPOINTS {
        let name = tracepoint.split_once(':').map_or(tracepoint, |(_, n)| n);
        if !btf.has_typedef(&format!("btf_trace_{name}")) {
            return Err(LayoutError::MissingRawTracepoint {
                kernel,
                tracepoint: tracepoint.to_string(),
                name: name.to_string(),
            });
        }
    }
    let btf_err = |source| LayoutError::Btf {
        kernel: kernel.clone(),
        source,
    };
    let tcp = |member: &str| btf.member_offset("tcp_sock", member).map_err(btf_err);
    // struct tcp_sock starts with struct sock (inet_conn.icsk_inet.sk), so an offset inside
    // struct sock plus that start is an offset from the socket address the tracepoints report.
    let sock_start = tcp("inet_conn.icsk_inet.sk")?;
    let sock_any = |paths: &[&str]| {
        btf.member_offset_any("sock", paths)
            .map(|o| sock_start + o)
            .map_err(btf_err)
    };
    let sock = |member: &str| sock_any(&[member]);

    // The 4-tuple block is read at once; check that this kernel lays it out as the programs
    // expect (it has not changed since 2.6).
    let daddr = sock("__sk_common.skc_daddr")?;
    for (member, expected) in [
        ("__sk_common.skc_rcv_saddr", tuple_block::RCV_SADDR),
        ("__sk_common.skc_dport", tuple_block::DPORT),
        ("__sk_common.skc_family", tuple_block::FAMILY),
        ("__sk_common.skc_state", tuple_block::STATE),
    ] {
        let at = (sock(member)? - daddr) as usize;
        if at != expected {
            return Err(LayoutError::UnexpectedSockLayout {
                kernel,
                detail: format!("{member} is {at} bytes after skc_daddr, not {expected}"),
            });
        }
    }
    let v6_daddr = sock("__sk_common.skc_v6_daddr")?;
    if sock("__sk_common.skc_v6_rcv_saddr")? != v6_daddr + 16 {
        return Err(LayoutError::UnexpectedSockLayout {
            kernel,
            detail: "skc_v6_rcv_saddr does not follow skc_v6_daddr".to_string(),
        });
    }

    // sk_protocol: u16 since 5.6, an 8-bit field of a 32-bit bitfield word before.
    let (bits, bitfield) = btf.member_bits("sock", "sk_protocol").map_err(btf_err)?;
    let bits = bits + sock_start * 8;
    let width = if bitfield == 0 { 16 } else { bitfield };
    let word = bits / 32 * 4;

    Ok(KernelLayout {
        sk_daddr: daddr,
        sk_v6_daddr: v6_daddr,
        inet_sport: tcp("inet_conn.icsk_inet.inet_sport")?,
        sk_protocol_word: word,
        sk_protocol_shift: bits - word * 8,
        sk_protocol_mask: (1u32 << width) - 1,
        sk_flags: sock_any(&["sk_flags", "__sk_common.skc_flags"])?,
        sock_done_bit: btf.enum_value("SOCK_DONE").map_err(btf_err)? as u32,
        bytes_acked: tcp("bytes_acked")?,
        bytes_received: tcp("bytes_received")?,
        segs_in: tcp("segs_in")?,
        segs_out: tcp("segs_out")?,
        total_retrans: tcp("total_retrans")?,
        srtt_us: tcp("srtt_us")?,
        min_rtt_us: tcp("rtt_min.s.v")?,
        snd_una: tcp("snd_una")?,
        write_seq: tcp("write_seq")?,
        _pad: 0,
    })
}

/// The running kernel's BTF, with errors that name the kernel.
struct KernelBtf {
    kernel: String,
    btf: Btf,
}

impl KernelBtf {
    fn open(btf_path: &Path) -> Result<Self, LayoutError> {
        let kernel = kernel_release();
        let btf = Btf::from_file(btf_path).map_err(|source| LayoutError::NoBtf {
            kernel: kernel.clone(),
            path: btf_path.to_path_buf(),
            source,
        })?;
        Ok(Self { kernel, btf })
    }

    /// The offset of `member` (a dotted path) in `structure`.
    fn offset(&self, structure: &str, member: &str) -> Result<u32, LayoutError> {
        self.btf
            .member_offset(structure, member)
            .map_err(|source| LayoutError::Btf {
                kernel: self.kernel.clone(),
                source,
            })
    }
}

/// The syscall tracepoints that report accepted sockets, as `category/name`.
pub const ACCEPT_TRACEPOINTS: [&str; 2] = ["syscalls/sys_exit_accept4", "syscalls/sys_exit_accept"];

/// Discovers how to reach an accepted socket (see [`AcceptLayout`]). Optional: a kernel without
/// syscall tracepoints still works, with inbound flows getting their process at close.
pub fn discover_accept(tracefs: &Path, btf_path: &Path) -> Result<AcceptLayout, LayoutError> {
    let kernel = kernel_release();
    let mut ret = None;
    for tp in ACCEPT_TRACEPOINTS {
        let offset = tracepoint_fields(tracefs, tp, &kernel)?.offset("ret")?;
        if ret.is_some_and(|r| r != offset) {
            return Err(LayoutError::MissingField {
                kernel,
                tracepoint: tp.replace('/', ":"),
                field: "ret (at the same offset in both accept tracepoints)".to_string(),
            });
        }
        ret = Some(offset);
    }
    let btf = KernelBtf::open(btf_path)?;
    let off = |structure: &str, member: &str| btf.offset(structure, member);
    Ok(AcceptLayout {
        ret: ret.unwrap_or_default(),
        task_files: off("task_struct", "files")?,
        files_fdt: off("files_struct", "fdt")?,
        fdtable_max_fds: off("fdtable", "max_fds")?,
        fdtable_fd: off("fdtable", "fd")?,
        file_private_data: off("file", "private_data")?,
        socket_sk: off("socket", "sk")?,
        _pad: 0,
    })
}

/// Discovers what the adoption program reads besides the socket (see [`AdoptLayout`]).
pub fn discover_adopt(btf_path: &Path) -> Result<AdoptLayout, LayoutError> {
    let btf = KernelBtf::open(btf_path)?;
    let off = |structure: &str, member: &str| btf.offset(structure, member);
    Ok(AdoptLayout {
        socket_sk: off("socket", "sk")?,
        socket_type: off("socket", "type")?,
        sk_net: off("sock", "__sk_common.skc_net")?,
        task_tgid: off("task_struct", "tgid")?,
        task_comm: off("task_struct", "comm")?,
        task_cgroups: off("task_struct", "cgroups")?,
        css_set_dfl_cgrp: off("css_set", "dfl_cgrp")?,
        cgroup_kn: off("cgroup", "kn")?,
        kernfs_node_id: off("kernfs_node", "id")?,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT_5_4: &str = "name: inet_sock_set_state
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u8 protocol;\toffset:28;\tsize:1;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;

print fmt: \"family=%s\", REC->family
";

    #[test]
    fn parses_pointer_array_and_one_byte_fields() {
        let f = parse_format(FORMAT_5_4);
        assert_eq!(f["skaddr"], Field { offset: 8, size: 8 });
        assert_eq!(
            f["oldstate"],
            Field {
                offset: 16,
                size: 4
            }
        );
        assert_eq!(
            f["protocol"],
            Field {
                offset: 28,
                size: 1
            }
        );
        assert_eq!(
            f["saddr_v6"],
            Field {
                offset: 40,
                size: 16
            }
        );
        assert_eq!(f.len(), 5);
    }

    #[test]
    fn missing_accept_tracepoint_names_it_and_the_kernel() {
        let dir = std::env::temp_dir().join(format!("flowlog-layout-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("events")).unwrap();
        let err = discover_accept(&dir, Path::new("/nonexistent")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("has no tracepoint syscalls:sys_exit_accept4"),
            "{msg}"
        );
        assert!(msg.contains(&kernel_release()), "{msg}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_field_is_named() {
        let dir = std::env::temp_dir().join(format!("flowlog-layout-f-{}", std::process::id()));
        for tp in ACCEPT_TRACEPOINTS {
            std::fs::create_dir_all(dir.join("events").join(tp)).unwrap();
            std::fs::write(dir.join("events").join(tp).join("format"), FORMAT_5_4).unwrap();
        }
        let err = discover_accept(&dir, Path::new("/nonexistent")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "tracepoint syscalls:sys_exit_accept4 on kernel {} has no field `ret`",
                kernel_release()
            )
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn running_kernel_layout() {
        let btf = Path::new("/sys/kernel/btf/vmlinux");
        if !btf.exists() {
            return; // nothing to read: the agent's start-up tests cover a kernel without BTF
        }
        let layout = discover(btf).unwrap();
        // sock_common begins the socket: the IPv4 destination address is its first field.
        assert_eq!(layout.sk_daddr, 0);
        assert!(layout.sk_v6_daddr > layout.sk_daddr);
        if kernel_release().as_str() >= "5.6" {
            assert_eq!(layout.sk_protocol_mask, 0xffff);
        }
        assert!(layout.bytes_acked > layout.sk_flags);
    }
}
