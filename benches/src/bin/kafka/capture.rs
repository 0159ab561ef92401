//! Real flow records for the Kafka benchmarks: the release `flowlog-sidecar` (`--output file:`)
//! captures loopback traffic made here — the churn harness's paced connect/close load, transfers
//! of assorted sizes, refused connects and abortive closes — and whatever else the host does
//! meanwhile; its JSON lines are read back as [`FlowRecord`]s. Made-up records would make the
//! wire figure whatever the generator's entropy is; these carry the kernel's own timestamps,
//! ports, RTTs, counters and flow ids.
use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use flowlog_record::record::FlowRecord;

use crate::{
    attach::Attached,
    load::{self, Pace, Server},
};

/// What the capture did, for the report.
#[derive(Debug, Clone, Copy, Default)]
pub struct CaptureSummary {
    pub churn_connections: u64,
    pub transfers: u64,
    pub transfer_bytes: u64,
    pub refused: u64,
    pub aborted: u64,
}

/// Runs the sidecar at `sidecar` for `duration` of mixed loopback traffic, churn paced at `rate`
/// connections/s; returns every record it wrote, in the order it wrote them.
pub fn capture(
    sidecar: &Path,
    work_dir: &Path,
    duration: Duration,
    rate: f64,
) -> anyhow::Result<(Vec<FlowRecord>, CaptureSummary)> {
    let server = Server::start(2, false)?;
    let attached = Attached::sidecar(sidecar, work_dir, "capture")?;
    let deadline = Instant::now() + duration;
    let (churn, extras) = thread::scope(|scope| {
        let churn = scope.spawn(|| load::churn(&server, duration, Pace::Rate(rate)));
        let extras = scope.spawn(move || extra_traffic(deadline));
        (churn.join(), extras.join())
    });
    let churn = churn.map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
    let mut summary = extras.map_err(|_| anyhow::anyhow!("the traffic thread panicked"))??;
    summary.churn_connections = churn.connections;
    // Let the last end records out (the agent holds them 300 ms for a late reset).
    thread::sleep(Duration::from_secs(1));
    let output = attached.stop()?;
    let text = fs::read_to_string(&output)
        .with_context(|| format!("reading the sidecar's records from {}", output.display()))?;
    let records = text
        .lines()
        .map(|line| {
            serde_json::from_str::<FlowRecord>(line)
                .with_context(|| format!("parsing a record of {}: {line}", output.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((records, summary))
}

/// A small xorshift generator: sizes and choices need to vary, not to be unpredictable.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Until `deadline`, every ~20 ms one of: a transfer (1 byte to 4 MiB up, a sixteenth of that
/// down, sizes log-uniform), a connect to a closed port (refused), or a connection closed with
/// `SO_LINGER` 0 (a reset).
fn extra_traffic(deadline: Instant) -> anyhow::Result<CaptureSummary> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the transfer server")?;
    let addr = listener.local_addr()?;
    let closed = {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a closed port")?;
        l.local_addr()?
    };
    let server = thread::spawn(move || -> std::io::Result<()> {
        for stream in listener.incoming() {
            // An aborted connection may fail its accept: nothing to serve.
            let Ok(mut s) = stream else { continue };
            let mut len = [0u8; 8];
            if s.read_exact(&mut len).is_err() {
                // An aborted connection: nothing to serve.
                continue;
            }
            let up = u64::from_be_bytes(len);
            if up == u64::MAX {
                return Ok(());
            }
            std::io::copy(&mut (&mut s).take(up), &mut std::io::sink())?;
            s.write_all(&vec![0x5a; (up / 16) as usize])?;
            s.shutdown(Shutdown::Write)?;
            let _ = s.read(&mut [0u8; 1]);
        }
        Ok(())
    });
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let mut summary = CaptureSummary::default();
    while Instant::now() < deadline {
        match rng.next() % 4 {
            0 | 1 => {
                let up = 1u64 << (rng.next() % 23);
                let up = up + rng.next() % up;
                transfer(addr, up)?;
                summary.transfers += 1;
                summary.transfer_bytes += up + up / 16;
            }
            2 => {
                // Refused: the port's listener is gone.
                let _ = TcpStream::connect(closed);
                summary.refused += 1;
            }
            _ => {
                let c = TcpStream::connect(addr).context("connecting for an abortive close")?;
                set_linger_zero(&c)?;
                drop(c);
                summary.aborted += 1;
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut stop = TcpStream::connect(addr)?;
    stop.write_all(&u64::MAX.to_be_bytes())?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the transfer server panicked"))?
        .context("transfer server")?;
    Ok(summary)
}

fn transfer(addr: SocketAddr, up: u64) -> anyhow::Result<()> {
    let mut c = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    c.write_all(&up.to_be_bytes())?;
    c.write_all(&vec![0xa5; up as usize])?;
    let mut reply = Vec::new();
    c.read_to_end(&mut reply)?;
    anyhow::ensure!(reply.len() as u64 == up / 16, "short reply");
    Ok(())
}

fn set_linger_zero(s: &TcpStream) -> anyhow::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting SO_LINGER 0");
    }
    Ok(())
}
