//! The load: a connect/close churn on loopback, the workload the sidecar must not slow down.
//!
//! Each connection is one short request/response: the client connects, writes [`REQUEST`], reads
//! the reply to end-of-stream and closes; the server accepts, reads the request, writes
//! [`REPLY`] and closes *first*. Closing first puts TIME_WAIT on the server's side, where it ties
//! up no ephemeral port: the client's port is free again as soon as it closes, so a long churn
//! does not exhaust the ephemeral range, with no SO_LINGER 0 (which would turn every close into a
//! reset and change what the kernel programs see) and no sysctl changes. When a client port comes
//! round again, its SYN meets the server's TIME_WAIT socket for the same 4-tuple, which the kernel
//! recycles (newer timestamps), as on any busy server.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// What a client sends: a few bytes, one segment.
pub const REQUEST: &[u8] = b"flowlog churn ping\n";
/// What the server answers before it closes.
pub const REPLY: &[u8] = b"flowlog churn pong, bye\n";

/// The accept side: one listener on 127.0.0.1 and one accept thread per client ("pair"), each
/// serving one connection at a time. The threads live as long as the process (the harness exits
/// when done).
///
/// With `pin`, pair i's client and server threads share CPU i (modulo the CPUs we may use). An
/// unpinned churn on a 2-CPU VM swings by 2× from second to second as the scheduler moves the
/// two ends of a pair onto one CPU or apart (likely because a cross-CPU wake-up is an IPI, a VM
/// exit here); pinned, each pair always wakes its peer on its own CPU and a trial's rate stays
/// mostly within ±5% from second to second (measured here; unpinned: 16k–59k conn/s).
pub struct Server {
    addrs: Vec<SocketAddr>,
    cpus: Option<Vec<usize>>,
    failures: Arc<AtomicU64>,
}

impl Server {
    /// Binds `pairs` listeners on free 127.0.0.1 ports and starts their accept loops.
    pub fn start(pairs: usize, pin: bool) -> anyhow::Result<Self> {
        if pairs == 0 {
            bail!("at least one client/server pair is needed");
        }
        let cpus = if pin { Some(allowed_cpus()?) } else { None };
        let failures = Arc::new(AtomicU64::new(0));
        let mut addrs = Vec::with_capacity(pairs);
        for i in 0..pairs {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .context("binding a churn server on 127.0.0.1")?;
            addrs.push(
                listener
                    .local_addr()
                    .context("reading a server's address")?,
            );
            let failures = Arc::clone(&failures);
            let cpu = cpus.as_ref().map(|c| c[i % c.len()]);
            thread::Builder::new()
                .name(format!("churn-srv-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_to(cpu);
                    }
                    loop {
                        let served = listener.accept().and_then(|(stream, _)| serve(stream));
                        if served.is_err() {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
                .context("starting a server thread")?;
        }
        Ok(Self {
            addrs,
            cpus,
            failures,
        })
    }

    /// The listening ports, one per pair.
    pub fn ports(&self) -> Vec<u16> {
        self.addrs.iter().map(|a| a.port()).collect()
    }

    pub fn pairs(&self) -> usize {
        self.addrs.len()
    }

    /// Accepts or exchanges that failed so far (should stay 0).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills the set we own.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: the index is within the set's size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    if cpus.is_empty() {
        bail!("sched_getaffinity returned no CPUs");
    }
    Ok(cpus)
}

/// Pins the calling thread to one CPU. Best effort: an unpinned thread still measures, only more
/// noisily.
fn pin_to(cpu: usize) {
    // SAFETY: as above; sched_setaffinity(0, ..) applies to the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    let mut request = [0u8; REQUEST.len()];
    stream.read_exact(&mut request)?;
    stream.write_all(REPLY)?;
    // Dropping the stream closes it: the server sends its FIN first.
    Ok(())
}

/// One client connection, start to finish.
fn connection(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    stream.write_all(REQUEST)?;
    // Read to end-of-stream so the server's FIN arrives before our close: TIME_WAIT stays on the
    // server's side.
    let mut reply = [0u8; REPLY.len() + 1];
    let mut got = 0;
    loop {
        match stream.read(&mut reply[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if got == reply.len() {
            return Err(std::io::Error::other("reply longer than expected"));
        }
    }
    if &reply[..got] != REPLY {
        return Err(std::io::Error::other("short or wrong reply"));
    }
    Ok(())
}

/// How fast the clients go.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Each client starts its next connection as soon as the previous one is closed.
    Flat,
    /// New connections per second across all clients, on a fixed schedule (no catch-up bursts
    /// beyond the schedule: a late client just starts its next connection at once).
    Rate(f64),
}

/// What one churn run did.
#[derive(Debug, Clone, Copy)]
pub struct ChurnResult {
    /// Connections that completed the whole exchange.
    pub connections: u64,
    /// Connections that failed somewhere (connect, write, read).
    pub errors: u64,
    pub elapsed: Duration,
}

impl ChurnResult {
    pub fn per_second(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs one client thread per pair of `server` for `duration`.
pub fn churn(server: &Server, duration: Duration, pace: Pace) -> anyhow::Result<ChurnResult> {
    let clients = server.pairs();
    let start = Instant::now();
    let deadline = start + duration;
    let results = thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let addr = server.addrs[i];
                let cpu = server.cpus.as_ref().map(|c| c[i % c.len()]);
                thread::Builder::new()
                    .name(format!("churn-cli-{i}"))
                    .spawn_scoped(scope, move || {
                        if let Some(cpu) = cpu {
                            pin_to(cpu);
                        }
                        client(addr, i, clients, start, deadline, pace)
                    })
                    .context("starting a client thread")
            })
            .collect::<anyhow::Result<_>>()?;
        let mut total = (0u64, 0u64);
        for handle in handles {
            let (ok, failed) = handle
                .join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
            total.0 += ok;
            total.1 += failed;
        }
        anyhow::Ok(total)
    })?;
    Ok(ChurnResult {
        connections: results.0,
        errors: results.1,
        elapsed: start.elapsed(),
    })
}

/// One client thread's loop; returns (completed, failed).
fn client(
    addr: SocketAddr,
    index: usize,
    clients: usize,
    start: Instant,
    deadline: Instant,
    pace: Pace,
) -> (u64, u64) {
    let (mut ok, mut failed) = (0u64, 0u64);
    // Client i of n takes every n-th slot of the shared schedule.
    let slot = match pace {
        Pace::Flat => None,
        Pace::Rate(rate) => Some(Duration::from_secs_f64(1.0 / rate)),
    };
    let mut k = 0u32;
    loop {
        let now = Instant::now();
        if let Some(slot) = slot {
            let due = start + slot * (k * clients as u32 + index as u32);
            if due >= deadline {
                break;
            }
            if due > now {
                thread::sleep(due - now);
            }
            k += 1;
        } else if now >= deadline {
            break;
        }
        match connection(addr) {
            Ok(()) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    (ok, failed)
}
