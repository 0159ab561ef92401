//! A private Kafka broker that clients reach over TLS, and optionally SASL/SCRAM, for the tests
//! of `--kafka-config`: tansu (plaintext, on a loopback port of its own, data in a directory of
//! the test's own) behind a TLS-terminating proxy that runs in the test process (rustls, with a
//! certificate for `localhost` from a CA made here with rcgen).
//!
//! Why a proxy: tansu 0.6 has no working TLS listener. Its `--cert` and `--key` are in one clap
//! group, so they cannot be given together ("the argument '--cert <CERT>' cannot be used with
//! '--key <KEY>'"), and its broker builds a `TlsAcceptor` into an unused `_acceptor` and serves
//! the raw TCP stream (tansu-broker 0.6.0, `broker.rs`). The proxy stands where a
//! TLS-terminating load balancer would.
//! tansu advertises the proxy's address (`localhost:PORT`), so every connection a client makes
//! after the bootstrap goes through TLS too.
//!
//! SASL is tansu's own (`--authentication`; the SASL exchange passes through the proxy).
//! SCRAM-SHA-256 and -512 credentials are stored with `tansu user create` while the broker runs
//! without authentication (AlterUserScramCredentials itself needs an authenticated connection),
//! then the broker restarts with authentication on the same database. tansu 0.6 accepts any
//! password with PLAIN (`tansu-auth` checks only that one was given), so tests use SCRAM.
use std::{
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::oneshot;

use crate::{ChildGuard, PATIENCE, Topic, free_port, temp_dir};

/// The SCRAM user a SASL broker knows (with SCRAM-SHA-256 and SCRAM-SHA-512 credentials).
#[derive(Debug, Clone)]
pub struct Scram {
    pub user: String,
    pub password: String,
}

/// A tansu broker behind a TLS proxy, stopped and removed on drop. See the module docs.
pub struct TlsBroker {
    dir: PathBuf,
    tansu: Option<ChildGuard>,
    _proxy: Proxy,
    /// The proxy's port (TLS), on 127.0.0.1 and, where the host has it, ::1.
    pub port: u16,
    /// The PEM file of the CA that signed the broker's certificate (for `localhost` only).
    pub ca: PathBuf,
    /// The PEM file of a CA that did not sign it.
    pub other_ca: PathBuf,
    /// The SCRAM user, when the broker requires SASL.
    pub scram: Option<Scram>,
}

impl TlsBroker {
    /// Starts a broker for `test` (its directory is named after it); `sasl`: require SASL
    /// authentication, with a SCRAM user made for it. Returns once a client gets the cluster's
    /// metadata through TLS (and SASL).
    pub fn start(test: &str, sasl: bool) -> Self {
        let dir = temp_dir(&format!("tls-{test}"));
        let ca = Ca::new("flowlog test CA");
        let other = Ca::new("flowlog test CA that signed nothing");
        let ca_path = dir.join("ca.pem");
        let other_ca = dir.join("other-ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        std::fs::write(&other_ca, other.pem()).unwrap();

        let internal = free_port();
        let proxy = Proxy::start(ca.server_config("localhost"), internal);
        let scram = sasl.then(|| Scram {
            user: "flowlog".to_string(),
            password: format!("pw-{}", crate::unique_name("scram")),
        });
        let mut broker = Self {
            dir,
            tansu: None,
            port: proxy.port,
            _proxy: proxy,
            ca: ca_path,
            other_ca,
            scram,
        };
        if let Some(scram) = broker.scram.clone() {
            // Credentials first, on a broker without authentication; SIGKILL keeps them (sqlite
            // has committed them).
            broker.tansu = Some(broker.spawn_tansu(internal, false));
            for mechanism in ["scram256", "scram512"] {
                let out = Command::new(tansu())
                    .args(["user", "create", "--broker"])
                    .arg(format!("tcp://127.0.0.1:{internal}"))
                    .args(["--mechanism", mechanism, &scram.user, &scram.password])
                    .output()
                    .expect("running tansu user create");
                assert!(
                    out.status.success(),
                    "tansu user create {mechanism}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            broker.tansu = None;
        }
        broker.tansu = Some(broker.spawn_tansu(internal, sasl));
        broker.wait_serving();
        broker
    }

    /// `bootstrap.servers` of the broker: `localhost:PORT`, the name its certificate is for.
    pub fn brokers(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// The librdkafka options a client of this broker needs (TLS with [`TlsBroker::ca`], and
    /// SCRAM-SHA-512 as the user if the broker requires SASL).
    pub fn client_options(&self) -> Vec<(String, String)> {
        let mut options = vec![("ssl.ca.location".to_string(), self.ca.display().to_string())];
        match &self.scram {
            None => options.push(("security.protocol".into(), "SSL".into())),
            Some(s) => options.extend([
                ("security.protocol".into(), "SASL_SSL".into()),
                ("sasl.mechanism".into(), "SCRAM-SHA-512".into()),
                ("sasl.username".into(), s.user.clone()),
                ("sasl.password".into(), s.password.clone()),
            ]),
        }
        options
    }

    /// Writes a `client.properties` file named `name` in the broker's directory: a comment,
    /// then `options` as `key=value` lines. Returns its path.
    pub fn properties(&self, name: &str, options: &[(String, String)]) -> PathBuf {
        let mut text = String::from("# librdkafka options of a flowlog test\n");
        for (k, v) in options {
            text.push_str(&format!("{k}={v}\n"));
        }
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A topic of the test's own on this broker (its clients use [`TlsBroker::client_options`]).
    pub fn topic(&self, test: &str, partitions: i32) -> Topic {
        Topic::create_with(&self.brokers(), &self.client_options(), test, partitions)
    }

    /// The broker's directory (certificates, database, `tansu.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn spawn_tansu(&self, port: u16, authentication: bool) -> ChildGuard {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .unwrap();
        let mut command = Command::new(tansu());
        command
            .current_dir(&self.dir)
            .arg("broker")
            .args(["--listener-url", &format!("tcp://127.0.0.1:{port}")])
            .args([
                "--advertised-listener-url",
                &format!("tcp://localhost:{}", self.port),
            ])
            .args(["--storage-engine", "sqlite://tansu.db"]);
        if authentication {
            command.arg("--authentication");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} broker: {e}", tansu().display()));
        let mut guard = ChildGuard(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = guard.0.try_wait() {
                panic!("tansu exited during start-up ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {port} within 30 s: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        guard
    }

    /// Waits until a client gets the cluster's metadata through the proxy.
    fn wait_serving(&self) {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", self.brokers());
        for (k, v) in self.client_options() {
            config.set(k, v);
        }
        use rdkafka::consumer::Consumer as _;
        let client: rdkafka::consumer::BaseConsumer =
            config.create().expect("creating a TLS client");
        let deadline = Instant::now() + PATIENCE;
        loop {
            match client.fetch_metadata(None, Duration::from_secs(2)) {
                Ok(m) if !m.brokers().is_empty() => return,
                Ok(_) => {}
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "TLS broker {} not serving: {e}; tansu log:\n{}",
                        self.brokers(),
                        self.log()
                    )
                }
                Err(_) => {}
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// tansu's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        drop(self.tansu.take());
        if thread::panicking() {
            eprintln!("TLS broker's directory kept: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `options` with `key` set to `value` (replacing its value, or added).
pub fn with_option(
    mut options: Vec<(String, String)>,
    key: &str,
    value: &str,
) -> Vec<(String, String)> {
    options.retain(|(k, _)| k != key);
    options.push((key.to_string(), value.to_string()));
    options
}

/// The tansu binary: on `PATH`, else where `cargo install` (`scripts/kafka start`) puts it.
fn tansu() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("tansu"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        let home = std::env::var_os("HOME").expect("HOME");
        PathBuf::from(home).join(".cargo/bin/tansu")
    })
}

/// A certificate authority made for one broker.
struct Ca {
    certificate: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        Self {
            certificate,
            issuer: Issuer::new(params, key),
        }
    }

    fn pem(&self) -> String {
        self.certificate.pem()
    }

    /// A rustls server configuration with a certificate for `host` signed by this CA.
    fn server_config(&self, host: &str) -> rustls::ServerConfig {
        let mut params = CertificateParams::new(vec![host.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, host);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        let chain = vec![CertificateDer::from(certificate.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        // The provider is named: with several compiled in, rustls cannot pick a default.
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap()
    }
}

/// The TLS-terminating proxy: accepts TLS on `port` and copies bytes both ways to the broker's
/// plaintext port, one task per connection, on a runtime thread of its own (ended on drop).
struct Proxy {
    port: u16,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(config: rustls::ServerConfig, backend: u16) -> Self {
        let v4 = TcpListener::bind("127.0.0.1:0").expect("binding the TLS proxy");
        let port = v4.local_addr().unwrap().port();
        // `localhost` may resolve to ::1 as well; without IPv6 loopback, IPv4 alone serves.
        let v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, port)).ok();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (stop, stopped) = oneshot::channel();
        let thread = thread::spawn(move || {
            let rt = crate::runtime();
            rt.block_on(async move {
                let mut listeners = Vec::new();
                for l in std::iter::once(v4).chain(v6) {
                    l.set_nonblocking(true).unwrap();
                    listeners.push(tokio::net::TcpListener::from_std(l).unwrap());
                }
                let backend = SocketAddr::from(([127, 0, 0, 1], backend));
                let serve = listeners.into_iter().map(|listener| {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        loop {
                            let Ok((tcp, peer)) = listener.accept().await else {
                                // Out of file descriptors, say: not a reason to spin.
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            };
                            tokio::spawn(relay(acceptor.clone(), tcp, peer, backend));
                        }
                    })
                });
                let _tasks: Vec<_> = serve.collect();
                let _ = stopped.await;
            });
            // Dropping the runtime here ends every connection.
        });
        Self {
            port,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

/// One client connection: the TLS handshake, then bytes both ways until either side closes.
async fn relay(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    backend: SocketAddr,
) {
    let mut tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("TLS proxy: handshake with {peer} failed: {e}");
            return;
        }
    };
    let Ok(mut upstream) = tokio::net::TcpStream::connect(backend).await else {
        eprintln!("TLS proxy: broker {backend} refused a connection");
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
