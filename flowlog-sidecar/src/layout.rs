//! Discovers the running kernel's layout: where each tracepoint argument sits in its record
//! (tracefs `format` files) and where each `struct tcp_sock` counter sits (BTF).
//!
//! Layouts differ between kernels (`protocol` was one byte before 5.6; `tcp_send_reset` gained
//! fields in 6.x; `tcp_sock` is reordered often), so nothing is compiled in: one agent binary runs
//! on every kernel that has BTF, and a kernel that lacks something is a start-up error naming it.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use flowlog_common::{AcceptLayout, KernelLayout};

use crate::btf::{Btf, BtfError};

/// Why the kernel's layout could not be discovered.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "tracefs is not mounted (looked in /sys/kernel/tracing and /sys/kernel/debug/tracing); \
         mount it with `mount -t tracefs tracefs /sys/kernel/tracing`"
    )]
    NoTracefs,
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

/// Where tracefs is mounted.
pub fn tracefs_root() -> Result<PathBuf, LayoutError> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
        .ok_or(LayoutError::NoTracefs)
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

/// The tracepoints the agent attaches to, as `category/name`.
pub const TRACEPOINTS: [&str; 3] = [
    "sock/inet_sock_set_state",
    "tcp/tcp_send_reset",
    "tcp/tcp_receive_reset",
];

/// Discovers the full layout from tracefs and the BTF file at `btf_path`.
pub fn discover(tracefs: &Path, btf_path: &Path) -> Result<KernelLayout, LayoutError> {
    let kernel = kernel_release();
    let state = tracepoint_fields(tracefs, TRACEPOINTS[0], &kernel)?;
    let send_reset = tracepoint_fields(tracefs, TRACEPOINTS[1], &kernel)?;
    let receive_reset = tracepoint_fields(tracefs, TRACEPOINTS[2], &kernel)?;
    // Tracepoint fields first: they need no BTF, and a missing one is the likelier error.
    let protocol = state.get("protocol")?;
    let mut layout = KernelLayout {
        state_skaddr: state.offset("skaddr")?,
        state_oldstate: state.offset("oldstate")?,
        state_newstate: state.offset("newstate")?,
        state_sport: state.offset("sport")?,
        state_dport: state.offset("dport")?,
        state_family: state.offset("family")?,
        state_protocol: protocol.offset,
        state_protocol_size: protocol.size,
        state_saddr: state.offset("saddr")?,
        state_daddr: state.offset("daddr")?,
        state_saddr_v6: state.offset("saddr_v6")?,
        state_daddr_v6: state.offset("daddr_v6")?,
        send_reset_skaddr: send_reset.offset("skaddr")?,
        receive_reset_skaddr: receive_reset.offset("skaddr")?,
        ..KernelLayout::default()
    };
    let btf = Btf::from_file(btf_path).map_err(|source| LayoutError::NoBtf {
        kernel: kernel.clone(),
        path: btf_path.to_path_buf(),
        source,
    })?;
    let btf_err = |source| LayoutError::Btf {
        kernel: kernel.clone(),
        source,
    };
    let tcp = |member: &str| btf.member_offset("tcp_sock", member).map_err(btf_err);
    // struct tcp_sock starts with struct sock (inet_conn.icsk_inet.sk), so an offset inside
    // struct sock plus that start is an offset from the socket address the tracepoints report.
    let sock_start = tcp("inet_conn.icsk_inet.sk")?;
    let sock_flags = btf
        .member_offset_any("sock", &["sk_flags", "__sk_common.skc_flags"])
        .map_err(btf_err)?;
    layout.bytes_acked = tcp("bytes_acked")?;
    layout.bytes_received = tcp("bytes_received")?;
    layout.segs_in = tcp("segs_in")?;
    layout.segs_out = tcp("segs_out")?;
    layout.total_retrans = tcp("total_retrans")?;
    layout.srtt_us = tcp("srtt_us")?;
    layout.min_rtt_us = tcp("rtt_min.s.v")?;
    layout.snd_una = tcp("snd_una")?;
    layout.write_seq = tcp("write_seq")?;
    layout.sk_flags = sock_start + sock_flags;
    let sock = |member: &str| {
        btf.member_offset("sock", member)
            .map(|o| sock_start + o)
            .map_err(btf_err)
    };
    layout.sk_num = sock("__sk_common.skc_num")?;
    layout.sk_rcv_saddr = sock("__sk_common.skc_rcv_saddr")?;
    layout.sk_v6_rcv_saddr = sock("__sk_common.skc_v6_rcv_saddr")?;
    layout.sock_done_bit = btf.enum_value("SOCK_DONE").map_err(btf_err)? as u32;
    Ok(layout)
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
    let btf = Btf::from_file(btf_path).map_err(|source| LayoutError::NoBtf {
        kernel: kernel.clone(),
        path: btf_path.to_path_buf(),
        source,
    })?;
    let off = |structure: &str, member: &str| {
        btf.member_offset(structure, member)
            .map_err(|source| LayoutError::Btf {
                kernel: kernel.clone(),
                source,
            })
    };
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
    fn missing_tracepoint_names_it_and_the_kernel() {
        let dir = std::env::temp_dir().join(format!("flowlog-layout-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("events")).unwrap();
        let err = discover(&dir, Path::new("/nonexistent")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("has no tracepoint sock:inet_sock_set_state"),
            "{msg}"
        );
        assert!(msg.contains(&kernel_release()), "{msg}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_field_is_named() {
        let dir = std::env::temp_dir().join(format!("flowlog-layout-f-{}", std::process::id()));
        for tp in TRACEPOINTS {
            std::fs::create_dir_all(dir.join("events").join(tp)).unwrap();
            std::fs::write(dir.join("events").join(tp).join("format"), FORMAT_5_4).unwrap();
        }
        let err = discover(&dir, Path::new("/nonexistent")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "tracepoint sock:inet_sock_set_state on kernel {} has no field `newstate`",
                kernel_release()
            )
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
