//! Network namespaces for tests that need several hosts on one machine: two namespaces joined
//! by a veth pair with IPv4 and IPv6 addresses ([`NetnsPair`]), threads that run socket code
//! inside one of them ([`spawn_in`]), and the `ip`/`nft` commands that build them ([`run`]).
//! Tests run in parallel: each has its own index, which gives it its own addresses
//! (198.51.100.4n/30, 2001:db8:n::/64) and namespace names (with the process id in them).
//! Needs root and `ip` (iproute2).

use std::{
    fs::File,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Mutex, Once},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use flowlog_record::record::FlowRecord;

use crate::PATIENCE;

/// Runs a command, panicking with its output if it fails.
pub fn run(program: &str, args: &[&str]) {
    run_with_stdin(program, args, None);
}

/// Runs a command with `stdin` as its standard input, panicking with its output if it fails.
pub fn run_with_stdin(program: &str, args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(text.as_bytes())
            .expect("writing the command's stdin");
    }
    let out = child.wait_with_output().expect("waiting for the command");
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip` commands that create namespaces race each other on the first mount of /run/netns, so
/// this process makes them one at a time.
static NETNS_SETUP: Mutex<()> = Mutex::new(());

const NETNS_DIR: &str = "/var/run/netns";
const NETNS_PREFIX: &str = "flt";

/// Deletes namespaces left behind by an earlier run of these tests that was killed (names carry
/// the process id; a namespace whose process is gone is stale).
fn remove_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest
            .split(['c', 's'])
            .next()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A client and a server namespace joined by a veth pair, with IPv4 and IPv6 addresses.
/// Dropping it deletes both namespaces (and with them the veth pair and any nftables rules).
pub struct NetnsPair {
    pub client_ns: String,
    pub server_ns: String,
    pub client_v4: IpAddr,
    pub server_v4: IpAddr,
    pub client_v6: IpAddr,
    pub server_v6: IpAddr,
}

impl NetnsPair {
    /// Namespaces for the test with index `n` (1..=63, unique per test in this file).
    pub fn new(n: u8) -> Self {
        assert!((1..64).contains(&n), "test index {n} out of range");
        static CLEAN: Once = Once::new();
        let _guard = NETNS_SETUP.lock().unwrap_or_else(|e| e.into_inner());
        CLEAN.call_once(remove_stale_namespaces);
        let pid = std::process::id();
        let pair = Self {
            client_ns: format!("{NETNS_PREFIX}{pid}c{n}"),
            server_ns: format!("{NETNS_PREFIX}{pid}s{n}"),
            client_v4: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 4 * n + 1)),
            server_v4: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 4 * n + 2)),
            client_v6: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, u16::from(n), 0, 0, 0, 0, 1)),
            server_v6: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, u16::from(n), 0, 0, 0, 0, 2)),
        };
        // From here on, Drop removes whatever was created, even if a later step fails.
        run("ip", &["netns", "add", &pair.client_ns]);
        run("ip", &["netns", "add", &pair.server_ns]);
        // No duplicate address detection, on the link-local addresses either: while the
        // link-local address is tentative, the first IPv6 neighbour solicitation goes nowhere and
        // the first SYN is lost (a one-second connect).
        for ns in [&pair.client_ns, &pair.server_ns] {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
            );
        }
        run(
            "ip",
            &[
                "link",
                "add",
                "name",
                "veth0",
                "netns",
                &pair.client_ns,
                "type",
                "veth",
                "peer",
                "name",
                "veth0",
                "netns",
                &pair.server_ns,
            ],
        );
        for (ns, v4, v6) in [
            (&pair.client_ns, pair.client_v4, pair.client_v6),
            (&pair.server_ns, pair.server_v4, pair.server_v6),
        ] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{v4}/30"), "dev", "veth0"],
            );
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "-6",
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    "veth0",
                    "nodad",
                ],
            );
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
            run("ip", &["-n", ns, "link", "set", "veth0", "up"]);
        }
        for ns in [&pair.client_ns, &pair.server_ns] {
            wait_link_ready(ns);
        }
        pair
    }

    /// The client's and the server's address of one family.
    pub fn addrs(&self, v6: bool) -> (IpAddr, IpAddr) {
        if v6 {
            (self.client_v6, self.server_v6)
        } else {
            (self.client_v4, self.server_v4)
        }
    }

    /// Runs `f` on a new thread named `name` inside the client namespace.
    pub fn client<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        spawn_in(&self.client_ns, name, f)
    }

    /// Runs `f` on a new thread named `name` inside the server namespace.
    pub fn server<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        spawn_in(&self.server_ns, name, f)
    }

    /// A listening socket in the server namespace (sockets keep their namespace, so it can be
    /// used from any thread).
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        join(self.server("listen", move || {
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"))
        }))
    }

    /// Drops `percent`% of the packets the server namespace receives, at random (nftables).
    pub fn add_random_loss_on_server(&self, percent: u8) {
        self.add_server_input_rule(&format!("numgen random mod 100 < {percent} drop"));
    }

    /// Adds an nftables rule to the input hook of the server namespace.
    pub fn add_server_input_rule(&self, rule: &str) {
        let rules = format!(
            "table inet t {{\n  chain c {{\n    type filter hook input priority 0; policy accept;\n    {rule}\n  }}\n}}\n"
        );
        run_with_stdin(
            "ip",
            &["netns", "exec", &self.server_ns, "nft", "-f", "-"],
            Some(&rules),
        );
    }
}

/// Waits until the kernel has activated `veth0` in `ns`: the carrier change is applied by the
/// kernel's link watcher, which batches events (up to a second apart when many links change, as
/// when tests run in parallel); until then the device's queue is `noop` and drops every packet,
/// which would cost the first connection a SYN (or ARP/ND) retransmit.
fn wait_link_ready(ns: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = Command::new("ip")
            .args(["-n", ns, "-o", "link", "show", "dev", "veth0"])
            .output()
            .expect("running ip");
        let line = String::from_utf8_lossy(&out.stdout);
        if line.contains("LOWER_UP") && line.contains("qdisc noqueue state UP") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "veth0 in {ns} not up within {PATIENCE:?}: {line}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        let _guard = NETNS_SETUP.lock().unwrap_or_else(|e| e.into_inner());
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Spawns a thread named `name` that enters network namespace `ns` and runs `f`. Thread names are
/// the kernel's `comm` of the thread (at most 15 bytes).
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    assert!(name.len() <= 15, "thread name `{name}` is longer than comm");
    let path = format!("{NETNS_DIR}/{ns}");
    thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns on a namespace descriptor we own; it moves only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
        .expect("spawning a thread")
}

/// Joins a thread, passing its panic on.
pub fn join<T>(handle: JoinHandle<T>) -> T {
    handle
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

impl NetnsPair {
    /// Selects the records of this pair's traffic: both addresses are the pair's, and one end is
    /// `server_port` (the server's listening port, or the closed port a client tried).
    pub fn flows(&self, server_port: u16) -> impl Fn(&FlowRecord) -> bool + Clone + use<> {
        let ours = [
            self.client_v4,
            self.server_v4,
            self.client_v6,
            self.server_v6,
        ];
        move |r: &FlowRecord| {
            ours.contains(&r.local_addr)
                && ours.contains(&r.remote_addr)
                && (r.local_port == server_port || r.remote_port == server_port)
        }
    }
}

/// Closes with `SO_LINGER {on, 0}`: the kernel discards the connection with a reset.
pub fn abort(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads one linger struct that we own.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(stream);
}
