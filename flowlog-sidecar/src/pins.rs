//! Pinning in bpffs: the kernel side keeps tracking while no agent runs, and the next agent takes
//! it over, so a restart or an upgrade loses nothing.
//!
//! The agent pins, under one directory (`--pin-dir`, `/sys/fs/bpf/flowlog` by default):
//! - the maps that hold what the programs and the agent share about open flows ([`PINNED_MAPS`]):
//!   the flow map (each flow's id, its counters' last reported values and next `seq`), the ring
//!   buffer (records written while no agent runs wait there: its size bounds the gap, and an
//!   overflow is counted in the pinned kernel counters), the per-CPU batches, the per-CPU
//!   flow-id counter, and `PIN_STATE` (layout id, flow-id base, map sizes);
//! - the links of the attached programs (`link-<generation>-<program>`), so that the programs
//!   stay attached when the agent exits.
//!
//! A starting agent locks the directory (one agent at a time: a second waits for the first to
//! exit), and reads `PIN_STATE`. Same layout and sizes: it loads its programs on the pinned
//! maps, attaches them, pins their links and only then removes the previous agent's links, so
//! that no state change goes unseen (for the microseconds both are attached, a change is
//! handled twice: a second start replaces the first's fresh entry, a second end finds no entry
//! and counts an untracked close). Anything else (another layout, other sizes, pins left
//! incomplete by a crash during a start): it removes every pin and starts afresh, and says so.
//!
//! Nothing in bpffs survives a reboot, and nothing needs to: the sockets do not survive it either.
use std::{
    ffi::CString,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{Array, Map, MapData},
    programs::links::FdLink,
};
use flowlog_common::{PIN_LAYOUT_ID, pin_state};
use tracing::{info, warn};

/// Maps pinned by name in the pin directory (see the module docs); the others (the read-only
/// globals, the sweep's statistics) belong to one agent's programs.
pub const PINNED_MAPS: [&str; 7] = [
    "FLOWS",
    "CLOSED",
    "EVENTS",
    "COUNTERS",
    "FLOW_SEQ",
    "BATCH",
    "PIN_STATE",
];

/// `PIN_STATE`: written last at a start, so pins without it are an interrupted start.
const STATE_MAP: &str = "PIN_STATE";

/// Link pins are named `link-<generation>-<program>`.
const LINK_PREFIX: &str = "link-";

/// `BPF_FS_MAGIC` (`include/uapi/linux/magic.h`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why pinning failed.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{} is not on a bpf filesystem (mount one: `mount -t bpf bpf /sys/fs/bpf`)", .0.display())]
    NotBpffs(PathBuf),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("pinning {what} at {}", path.display())]
    Pin {
        what: String,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("pinned map {}", path.display())]
    Map {
        path: PathBuf,
        source: aya::maps::MapError,
    },
}

/// What the starting agent found in the pin directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Nothing: the maps are created and pinned now.
    Nothing,
    /// A previous agent's pins, of this layout and these sizes: taken over.
    Compatible { flow_id_base: u64 },
    /// Pins that cannot be reused (the reason): removed, and the maps created afresh.
    Incompatible(String),
}

/// The values of `PIN_STATE` (`flowlog_common::pin_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinState {
    pub layout_id: u64,
    pub flow_id_base: u64,
    pub max_flows: u64,
    pub ring_bytes: u64,
}

/// The locked pin directory of this agent.
#[derive(Debug)]
pub struct PinDir {
    dir: PathBuf,
    /// Held open with an exclusive `flock` for the agent's lifetime.
    _lock: File,
    /// Names this start's link pins, so that the previous agent's can be told apart.
    generation: String,
}

impl PinDir {
    /// Creates (if needed) and locks `dir`, which must be on bpffs. Waits while another agent
    /// holds the lock (an agent being replaced that has not exited yet).
    pub fn open(dir: &Path) -> Result<Self, PinError> {
        let parent = dir.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(parent) {
            return Err(PinError::NotBpffs(parent.to_path_buf()));
        }
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(PinError::Io {
                    what: "creating the pin directory",
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
        let lock = File::open(dir).map_err(|source| PinError::Io {
            what: "opening the pin directory",
            path: dir.to_path_buf(),
            source,
        })?;
        lock_exclusive(&lock, dir)?;
        let generation = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            generation,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where the map `name` is pinned.
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Checks the pins against what this agent would create (`want`); removes them unless they
    /// can be taken over.
    pub fn check(&self, want: &PinState) -> Result<Found, PinError> {
        let entries = self.entries()?;
        if entries.is_empty() {
            return Ok(Found::Nothing);
        }
        let verdict = match read_state(&self.map_path(STATE_MAP)) {
            Err(e) => Err(format!(
                "its state cannot be read ({}): an interrupted start or another program's pins",
                flowlog_diag::error_chain(&e)
            )),
            Ok(have) if have.layout_id != want.layout_id => Err(format!(
                "they have kernel layout {:#x}, this agent {:#x} (another version)",
                have.layout_id, want.layout_id
            )),
            Ok(have) if have.max_flows != want.max_flows || have.ring_bytes != want.ring_bytes => {
                Err(format!(
                    "their maps are sized for --max-flows {} and --ring-buffer-bytes {}, this \
                     agent's for {} and {}",
                    have.max_flows, have.ring_bytes, want.max_flows, want.ring_bytes
                ))
            }
            Ok(have) => match PINNED_MAPS
                .iter()
                .find(|name| !self.map_path(name).exists())
            {
                Some(missing) => Err(format!("map {missing} is missing")),
                None => Ok(have),
            },
        };
        match verdict {
            Ok(have) => Ok(Found::Compatible {
                flow_id_base: have.flow_id_base,
            }),
            Err(reason) => {
                self.remove_entries()?;
                Ok(Found::Incompatible(reason))
            }
        }
    }

    /// Pins an attached program's link, so that it stays attached after the agent exits.
    pub fn pin_link(&self, link: FdLink, name: &str) -> Result<(), PinError> {
        let path = self
            .dir
            .join(format!("{LINK_PREFIX}{}-{name}", self.generation));
        // The pin keeps the link (and so the program's attachment); the descriptor can go.
        drop(link.pin(&path).map_err(|source| PinError::Pin {
            what: format!("the link of {name}"),
            path,
            source,
        })?);
        Ok(())
    }

    /// Removes the links of earlier agents: their programs detach (call once this agent's are
    /// attached). Returns how many there were.
    pub fn remove_old_links(&self) -> Result<usize, PinError> {
        let mine = format!("{LINK_PREFIX}{}-", self.generation);
        let mut removed = 0;
        for path in self.entries()? {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            if name.starts_with(LINK_PREFIX) && !name.starts_with(&mine) {
                remove(&path)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes this agent's links: its programs detach (a final stop).
    pub fn remove_links(&self) -> Result<(), PinError> {
        for path in self.entries()? {
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(LINK_PREFIX))
            {
                remove(&path)?;
            }
        }
        Ok(())
    }

    /// Removes every pin and the directory: the kernel frees the maps once no program or
    /// descriptor holds them.
    pub fn remove_all(self) -> Result<(), PinError> {
        self.remove_entries()?;
        std::fs::remove_dir(&self.dir).map_err(|source| PinError::Io {
            what: "removing the pin directory",
            path: self.dir.clone(),
            source,
        })
    }

    fn remove_entries(&self) -> Result<(), PinError> {
        for path in self.entries()? {
            remove(&path)?;
        }
        Ok(())
    }

    fn entries(&self) -> Result<Vec<PathBuf>, PinError> {
        let read = std::fs::read_dir(&self.dir).map_err(|source| PinError::Io {
            what: "listing the pin directory",
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in read {
            let entry = entry.map_err(|source| PinError::Io {
                what: "listing the pin directory",
                path: self.dir.clone(),
                source,
            })?;
            out.push(entry.path());
        }
        Ok(out)
    }
}

/// Writes `PIN_STATE` in the loaded (pinned) map: the last step of a start, which marks the pins
/// complete.
pub fn write_state(map: &mut Map, state: &PinState) -> Result<(), aya::maps::MapError> {
    let mut array: Array<&mut MapData, u64> = Array::try_from(map)?;
    array.set(pin_state::FLOW_ID_BASE, state.flow_id_base, 0)?;
    array.set(pin_state::MAX_FLOWS, state.max_flows, 0)?;
    array.set(pin_state::RING_BYTES, state.ring_bytes, 0)?;
    array.set(pin_state::LAYOUT_ID, state.layout_id, 0)
}

/// What this agent's build and settings would pin.
pub fn wanted(flow_id_base: u64, max_flows: u32, ring_bytes: u32) -> PinState {
    PinState {
        layout_id: PIN_LAYOUT_ID,
        flow_id_base,
        max_flows: u64::from(max_flows),
        ring_bytes: u64::from(ring_bytes),
    }
}

fn read_state(path: &Path) -> Result<PinState, PinError> {
    let err = |source| PinError::Map {
        path: path.to_path_buf(),
        source,
    };
    let map = Map::from_map_data(MapData::from_pin(path).map_err(err)?).map_err(err)?;
    let array: Array<MapData, u64> = Array::try_from(map).map_err(err)?;
    let get = |i| array.get(&i, 0).map_err(err);
    Ok(PinState {
        layout_id: get(pin_state::LAYOUT_ID)?,
        flow_id_base: get(pin_state::FLOW_ID_BASE)?,
        max_flows: get(pin_state::MAX_FLOWS)?,
        ring_bytes: get(pin_state::RING_BYTES)?,
    })
}

fn remove(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PinError::Io {
            what: "removing the pin",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Takes the directory's lock, waiting (and saying so once) while another agent holds it.
fn lock_exclusive(lock: &File, dir: &Path) -> Result<(), PinError> {
    let fd = lock.as_raw_fd();
    let mut said = false;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            if said {
                info!(dir = %dir.display(), "the other agent has stopped; taking over");
            }
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(PinError::Io {
                what: "locking the pin directory",
                path: dir.to_path_buf(),
                source: e,
            });
        }
        if !said {
            warn!(
                dir = %dir.display(),
                "another flowlog agent holds the pinned kernel state; waiting for it to stop"
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
