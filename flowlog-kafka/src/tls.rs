//! Why a broker's certificate failed verification. librdkafka reports every verification failure
//! alike — OpenSSL's "certificate verify failed" —, whether no CA the client trusts signed the
//! certificate or the certificate is for another name. When a start-up check sees that, this
//! module makes one handshake of its own with the broker, verifying its certificate the way
//! librdkafka does (the CA of `ssl.ca.location` or `ssl.ca.pem`, else the system's; the broker's
//! host name or address unless `ssl.endpoint.identification.algorithm=none`), and reads
//! OpenSSL's verification result, which names the cause.
use std::{
    net::{IpAddr, TcpStream, ToSocketAddrs},
    path::Path,
    time::Duration,
};

use openssl::{
    ssl::{HandshakeError, SslConnector, SslMethod, SslVerifyMode},
    x509::{X509, X509VerifyResult},
};
use rdkafka::ClientConfig;

/// How long the diagnostic handshake may take, connection included.
const PATIENCE: Duration = Duration::from_secs(3);

/// The cause of a failed verification of `broker`'s certificate (`host:port`) under the TLS
/// settings of `config`, in words; `None` if the handshake cannot be made or verifies.
pub fn verify_failure(broker: &str, config: &ClientConfig) -> Option<String> {
    let (host, _port) = broker.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut builder = SslConnector::builder(SslMethod::tls_client()).ok()?;
    let store_has_ca = match (config.get("ssl.ca.location"), config.get("ssl.ca.pem")) {
        (_, Some(pem)) => {
            let store = builder.cert_store_mut();
            for ca in X509::stack_from_pem(pem.as_bytes()).ok()? {
                store.add_cert(ca).ok()?;
            }
            "ssl.ca.pem"
        }
        (Some(location), None) if location != "probe" => {
            let path = Path::new(location);
            if path.is_dir() {
                builder.load_verify_locations(None, Some(path)).ok()?;
            } else {
                builder.load_verify_locations(Some(path), None).ok()?;
            }
            "ssl.ca.location"
        }
        // SslConnector starts from the system's CA certificates.
        _ => "the system's CA certificates",
    };
    builder.set_verify(SslVerifyMode::PEER);
    let connector = builder.build();
    let mut ssl = connector.configure().ok()?;
    let check_name = config
        .get("ssl.endpoint.identification.algorithm")
        .is_none_or(|v| !v.eq_ignore_ascii_case("none"));
    ssl.set_verify_hostname(false);
    ssl.set_use_server_name_indication(false);
    match host.parse::<IpAddr>() {
        Ok(ip) if check_name => ssl.param_mut().set_ip(ip).ok()?,
        Ok(_) => {}
        Err(_) => {
            ssl.set_use_server_name_indication(true);
            if check_name {
                ssl.param_mut().set_host(host).ok()?;
            }
        }
    }
    let addr = broker.to_socket_addrs().ok()?.next()?;
    let tcp = TcpStream::connect_timeout(&addr, PATIENCE).ok()?;
    tcp.set_read_timeout(Some(PATIENCE)).ok()?;
    tcp.set_write_timeout(Some(PATIENCE)).ok()?;
    let result = match ssl.connect(host, tcp) {
        Ok(_) => return None,
        Err(HandshakeError::Failure(mid)) => mid.ssl().verify_result(),
        Err(_) => return None,
    };
    (result != X509VerifyResult::OK).then(|| describe(result, host, store_has_ca))
}

/// OpenSSL's verification result, with what it means for a Kafka client.
fn describe(result: X509VerifyResult, host: &str, trusted: &str) -> String {
    use openssl_sys as ffi;
    let meaning = match result.as_raw() {
        ffi::X509_V_ERR_HOSTNAME_MISMATCH | ffi::X509_V_ERR_IP_ADDRESS_MISMATCH => {
            format!("the broker's certificate is not for `{host}`")
        }
        ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
        | ffi::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        | ffi::X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
        | ffi::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
        | ffi::X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT => {
            format!("no CA of {trusted} signed the broker's certificate")
        }
        _ => return format!("certificate verify failed: {}", result.error_string()),
    };
    format!(
        "certificate verify failed: {} ({meaning})",
        result.error_string()
    )
}
