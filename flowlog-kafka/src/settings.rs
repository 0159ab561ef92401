//! What every Kafka client of a process shares: the bootstrap servers and the librdkafka options
//! of `--kafka-config FILE`, a Java-properties file (the `client.properties` Kafka users know:
//! `key=value` lines, `#` or `!` comments, blank lines) that says how to reach the cluster —
//! TLS, SASL, timeouts. [`ClientSettings::client_config`] builds each client's configuration:
//! that client's defaults, then `bootstrap.servers`, then the file, then the client's own flags
//! (`--kafka-option`, `--consumer-option`, `--producer-option`), so a flag wins over the file.
//!
//! The file is read and checked once at start-up ([`ClientSettings::load`]): a line that is not
//! `key=value`, an option librdkafka does not know or a value it refuses (a CA file that cannot
//! be read, ...) is an error naming the file and line. Secrets never appear in errors or `Debug`
//! output ([`is_secret`]).
use std::{
    fmt,
    path::{Path, PathBuf},
};

use rdkafka::{
    ClientConfig, ClientContext,
    config::RDKafkaLogLevel,
    error::KafkaError,
    producer::{BaseProducer, ProducerContext},
};

/// `bootstrap.servers` when neither a flag nor the file names the brokers.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";

/// One `key=value` of the file.
#[derive(Clone, PartialEq, Eq)]
struct FileOption {
    key: String,
    value: String,
    /// 1-based line where the entry starts.
    line: usize,
}

impl fmt::Debug for FileOption {
    /// A secret value is `[redacted]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={} (line {})",
            self.key,
            shown(&self.key, &self.value),
            self.line
        )
    }
}

/// The settings every Kafka client of one process shares.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The `--kafka-config` file these options came from, for error messages.
    file: Option<PathBuf>,
    options: Vec<FileOption>,
}

/// Why the `--kafka-config` file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading the Kafka client configuration {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line that is not `key=value` (its text is not shown: it may hold a secret).
    #[error("{path} line {line}: {problem}")]
    Syntax {
        path: PathBuf,
        line: usize,
        problem: &'static str,
    },
    /// librdkafka refused an option (unknown name, or a value it cannot take).
    #[error("{path} line {line}: librdkafka option `{key}`: {reason}{}", hint(key))]
    Rejected {
        path: PathBuf,
        line: usize,
        key: String,
        reason: String,
    },
    /// The options are each valid, but librdkafka cannot make a client of them together (a CA
    /// or key file it cannot read, a SASL mechanism it was not built with, ...).
    #[error("{path}: librdkafka refused these settings: {reason}")]
    Refused { path: PathBuf, reason: String },
}

/// A librdkafka option given on the command line that librdkafka refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "librdkafka option `{key}={}`: {reason}{}",
    shown(key, value),
    hint(key)
)]
pub struct OptionError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl OptionError {
    /// The option of a [`KafkaError::ClientConfig`] (what `create_native_config` and client
    /// creation return for a refused option), its secret values hidden; `None` for other errors.
    pub fn from_kafka(e: &KafkaError) -> Option<Self> {
        match e {
            KafkaError::ClientConfig(_, reason, key, value) => Some(Self {
                key: key.clone(),
                value: value.clone(),
                reason: redact(key, value, reason),
            }),
            _ => None,
        }
    }
}

/// Whether the value of librdkafka option `key` is a secret (a password, a private key, ...):
/// such values are never shown. `sasl.jaas.config` (a Java client setting) holds a password too.
pub fn is_secret(key: &str) -> bool {
    const MARKS: &[&str] = &[
        "password",
        "secret",
        "passphrase",
        "key.pem",
        "private.key",
        "jaas.config",
        "oauthbearer.config",
        "ssl_key",
    ];
    let key = key.to_ascii_lowercase();
    MARKS.iter().any(|m| key.contains(m))
}

/// `value` as errors and logs may show it.
pub fn shown<'a>(key: &str, value: &'a str) -> &'a str {
    if is_secret(key) { "[redacted]" } else { value }
}

/// librdkafka's `reason` for refusing `key=value`, without the value if it is a secret.
fn redact(key: &str, value: &str, reason: &str) -> String {
    if is_secret(key) && !value.is_empty() {
        reason.replace(value, "[redacted]")
    } else {
        reason.to_string()
    }
}

/// What to do instead of a Java client setting librdkafka does not have.
fn hint(key: &str) -> &'static str {
    match key {
        "sasl.jaas.config" => {
            " (a Java client setting: librdkafka takes `sasl.username` and `sasl.password`)"
        }
        k if k.starts_with("ssl.truststore.") => {
            " (a Java client setting: librdkafka reads CA certificates from a PEM file, \
             `ssl.ca.location`)"
        }
        _ => "",
    }
}

impl ClientSettings {
    /// Settings with no options: `brokers` only.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            file: None,
            options: Vec::new(),
        }
    }

    /// The settings of a process: `brokers` (a flag) or else the file's `bootstrap.servers` or
    /// else [`DEFAULT_BROKERS`], and the options of `file` (`--kafka-config`), read and checked.
    pub fn load(brokers: Option<&str>, file: Option<&Path>) -> Result<Self, SettingsError> {
        let Some(path) = file else {
            return Ok(Self::new(brokers.unwrap_or(DEFAULT_BROKERS)));
        };
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let settings = Self::parse(brokers, path, &text)?;
        settings.check()?;
        Ok(settings)
    }

    /// Parses the text of `path` (see [`ClientSettings::load`]), without asking librdkafka.
    pub fn parse(brokers: Option<&str>, path: &Path, text: &str) -> Result<Self, SettingsError> {
        let mut options = properties(text).map_err(|(line, problem)| SettingsError::Syntax {
            path: path.to_path_buf(),
            line,
            problem,
        })?;
        // The file's `bootstrap.servers` is the default of the brokers flag, not an option: a
        // flag wins over it, and the process names the brokers it really uses.
        let from_file = options
            .iter()
            .rev()
            .find(|o| o.key == "bootstrap.servers")
            .map(|o| o.value.clone());
        options.retain(|o| o.key != "bootstrap.servers");
        let brokers = brokers
            .map(str::to_string)
            .or(from_file)
            .unwrap_or_else(|| DEFAULT_BROKERS.to_string());
        Ok(Self {
            brokers,
            file: Some(path.to_path_buf()),
            options,
        })
    }

    /// The file's options (`bootstrap.servers` aside), in file order.
    pub fn options(&self) -> impl Iterator<Item = (&str, &str)> {
        self.options
            .iter()
            .map(|o| (o.key.as_str(), o.value.as_str()))
    }

    /// The `--kafka-config` file, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// A client's librdkafka configuration: its `defaults`, `bootstrap.servers`, the file's
    /// options, then `overrides` (the client's own flags); a later setting of a key wins.
    pub fn client_config(
        &self,
        defaults: &[(&str, &str)],
        overrides: &[(String, String)],
    ) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in self.options() {
            config.set(k, v);
        }
        for (k, v) in overrides {
            config.set(k, v);
        }
        config
    }

    /// Has librdkafka check every option of the file (names and values), then make a client
    /// of them (which loads CA, certificate and key files and checks the SASL settings). No
    /// `bootstrap.servers` is set, so the client connects nowhere.
    fn check(&self) -> Result<(), SettingsError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let mut config = ClientConfig::new();
        for (k, v) in self.options() {
            config.set(k, v);
        }
        let refused = |e: KafkaError| match OptionError::from_kafka(&e) {
            Some(OptionError { key, reason, .. }) => SettingsError::Rejected {
                path: path.clone(),
                line: self.line_of(&key),
                key,
                reason,
            },
            None => SettingsError::Refused {
                path: path.clone(),
                reason: match e {
                    KafkaError::ClientCreation(reason) => reason,
                    e => e.to_string(),
                },
            },
        };
        config.create_native_config().map_err(refused)?;
        config.set_log_level(RDKafkaLogLevel::Emerg);
        let _client: BaseProducer<Silent> = config.create_with_context(Silent).map_err(refused)?;
        Ok(())
    }

    /// The line of the last entry of `key` in the file (0 if it is not there).
    fn line_of(&self, key: &str) -> usize {
        self.options
            .iter()
            .rev()
            .find(|o| o.key == key)
            .map_or(0, |o| o.line)
    }
}

/// Checks command-line librdkafka options (names and values) before any client is made.
pub fn check_options(options: &[(String, String)]) -> Result<(), OptionError> {
    let mut config = ClientConfig::new();
    for (k, v) in options {
        config.set(k, v);
    }
    match config.create_native_config() {
        Ok(_) => Ok(()),
        Err(e) => Err(OptionError::from_kafka(&e).unwrap_or_else(|| OptionError {
            key: String::new(),
            value: String::new(),
            reason: e.to_string(),
        })),
    }
}

impl From<&str> for ClientSettings {
    fn from(brokers: &str) -> Self {
        Self::new(brokers)
    }
}

impl From<String> for ClientSettings {
    fn from(brokers: String) -> Self {
        Self::new(brokers)
    }
}

impl From<&String> for ClientSettings {
    fn from(brokers: &String) -> Self {
        Self::new(brokers.as_str())
    }
}

impl fmt::Debug for ClientSettings {
    /// Secret values are `[redacted]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options: Vec<(&str, &str)> = self.options().map(|(k, v)| (k, shown(k, v))).collect();
        f.debug_struct("ClientSettings")
            .field("brokers", &self.brokers)
            .field("file", &self.file)
            .field("options", &options)
            .finish()
    }
}

/// The context of the throwaway client [`ClientSettings::check`] makes: nothing to log (it
/// connects nowhere; librdkafka would warn that no brokers are set).
struct Silent;

impl ClientContext for Silent {
    fn log(&self, _: RDKafkaLogLevel, _: &str, _: &str) {}
    fn error(&self, _: KafkaError, _: &str) {}
}

impl ProducerContext for Silent {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// The entries of a Java properties file (`java.util.Properties.load`): a key ends at the first
/// unescaped `=`, `:` or whitespace; blanks and one `=` or `:` after it are skipped; the rest of
/// the line is the value (trailing blanks kept). A line ending in an odd number of `\`
/// continues on the next (whose leading blanks are skipped); `\t`, `\n`, `\r`, `\f`, `\uXXXX`
/// are escapes and `\` before any other character stands for that character. Unlike Java, a
/// line with a key and no separator is an error (it is more likely a broken line than an
/// option with an empty value), and so is a malformed `\u` escape. Errors: (line, problem).
fn properties(text: &str) -> Result<Vec<FileOption>, (usize, &'static str)> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, first)) = lines.next() {
        let start = i + 1;
        let trimmed = first.trim_start_matches(BLANKS);
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('!') {
            continue;
        }
        // The logical line: continuation lines joined, their leading blanks dropped.
        let mut logical = String::from(trimmed);
        while ends_in_continuation(&logical) {
            logical.pop();
            match lines.next() {
                Some((_, next)) => logical.push_str(next.trim_start_matches(BLANKS)),
                None => break,
            }
        }
        let (key, value) = split_entry(&logical).ok_or((start, "expected `key=value`"))?;
        let key = unescape(key).ok_or((start, "malformed `\\u` escape"))?;
        let value = unescape(value).ok_or((start, "malformed `\\u` escape"))?;
        if key.is_empty() {
            return Err((start, "expected `key=value`"));
        }
        out.push(FileOption {
            key,
            value,
            line: start,
        });
    }
    Ok(out)
}

/// What Java properties files count as blanks.
const BLANKS: [char; 3] = [' ', '\t', '\x0c'];

fn skip_blanks(s: &str) -> &str {
    s.trim_start_matches(BLANKS)
}

/// Whether a line ends in an odd number of backslashes (the last one escapes the line end).
fn ends_in_continuation(line: &str) -> bool {
    line.bytes().rev().take_while(|&b| b == b'\\').count() % 2 == 1
}

/// Splits a logical line into its raw (still escaped) key and value; `None` without separator.
fn split_entry(line: &str) -> Option<(&str, &str)> {
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'=' | b':' | b' ' | b'\t' | b'\x0c' => break,
            _ => i += 1,
        }
    }
    if i >= bytes.len() {
        return None;
    }
    let key = &line[..i];
    let rest = if matches!(bytes[i], b'=' | b':') {
        &line[i + 1..]
    } else {
        let rest = skip_blanks(&line[i..]);
        rest.strip_prefix(['=', ':']).unwrap_or(rest)
    };
    let rest = skip_blanks(rest);
    Some((key, rest))
}

/// Resolves Java properties escapes; `None` for a malformed `\u`.
fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\x0c'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                let code = u32::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|_| hex.len() == 4)?;
                out.push(char::from_u32(code)?);
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<(String, String, usize)> {
        properties(text)
            .unwrap()
            .into_iter()
            .map(|o| (o.key, o.value, o.line))
            .collect()
    }

    fn entry(k: &str, v: &str, line: usize) -> (String, String, usize) {
        (k.to_string(), v.to_string(), line)
    }

    #[test]
    fn properties_lines_comments_and_separators() {
        let text = "# TLS\n\
                    security.protocol=SASL_SSL\n\
                    \n\
                    ! another comment\n\
                    \x20 sasl.mechanism = SCRAM-SHA-512\n\
                    sasl.username: alice\n\
                    ssl.ca.location /etc/flowlog/kafka/ca.pem\n\
                    sasl.password=p=ss:w#rd \n\
                    empty=\n";
        assert_eq!(
            parsed(text),
            vec![
                entry("security.protocol", "SASL_SSL", 2),
                entry("sasl.mechanism", "SCRAM-SHA-512", 5),
                entry("sasl.username", "alice", 6),
                entry("ssl.ca.location", "/etc/flowlog/kafka/ca.pem", 7),
                // Everything after the first separator, trailing blank kept (as Java does).
                entry("sasl.password", "p=ss:w#rd ", 8),
                entry("empty", "", 9),
            ]
        );
    }

    #[test]
    fn properties_escapes_and_continuations() {
        let text = "a=one \\\n    two\\\\\nb\\=c=x\\ty\\u00e9\\z\nlast=end\\";
        assert_eq!(
            parsed(text),
            vec![
                entry("a", "one two\\", 1),
                entry("b=c", "x\ty\u{e9}z", 3),
                entry("last", "end", 4),
            ]
        );
    }

    #[test]
    fn properties_errors_name_the_line_not_the_text() {
        assert_eq!(
            properties("a=1\nhunter2\n").unwrap_err(),
            (2, "expected `key=value`")
        );
        assert_eq!(properties("=1").unwrap_err(), (1, "expected `key=value`"));
        assert_eq!(
            properties("a=\\u12").unwrap_err(),
            (1, "malformed `\\u` escape")
        );
        let e = ClientSettings::parse(None, Path::new("/x/client.properties"), "\n\nhunter2")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/x/client.properties line 3: expected `key=value`"
        );
    }

    #[test]
    fn brokers_come_from_the_flag_else_the_file_else_the_default() {
        let path = Path::new("c.properties");
        let text = "bootstrap.servers=kafka:9093\nlinger.ms=5\n";
        let from_file = ClientSettings::parse(None, path, text).unwrap();
        assert_eq!(from_file.brokers, "kafka:9093");
        assert_eq!(
            from_file.options().collect::<Vec<_>>(),
            [("linger.ms", "5")]
        );
        let flag = ClientSettings::parse(Some("b:1"), path, text).unwrap();
        assert_eq!(flag.brokers, "b:1");
        let none = ClientSettings::parse(None, path, "linger.ms=5").unwrap();
        assert_eq!(none.brokers, DEFAULT_BROKERS);
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let settings =
            ClientSettings::parse(Some("b:9092"), Path::new("f"), "linger.ms=7\nacks=1\n").unwrap();
        let config = settings.client_config(
            &[("linger.ms", "200"), ("acks", "all"), ("client.id", "x")],
            &[("acks".to_string(), "0".to_string())],
        );
        assert_eq!(config.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(config.get("client.id"), Some("x"));
        assert_eq!(config.get("linger.ms"), Some("7"));
        assert_eq!(config.get("acks"), Some("0"));
    }

    #[test]
    fn librdkafka_refusals_name_file_line_and_option() {
        let dir =
            std::env::temp_dir().join(format!("flowlog-kafka-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("client.properties");
        let load = |text: &str| {
            std::fs::write(&file, text).unwrap();
            ClientSettings::load(None, Some(&file))
                .unwrap_err()
                .to_string()
        };
        let e = load("linger.ms=5\nno.such.option=1\n");
        assert!(
            e.starts_with(&format!(
                "{} line 2: librdkafka option `no.such.option`",
                file.display()
            )),
            "{e}"
        );
        let e =
            load("sasl.jaas.config=org.apache...ScramLoginModule required password=\"hunter2\";\n");
        assert!(e.contains("line 1"), "{e}");
        assert!(
            e.contains("librdkafka takes `sasl.username` and `sasl.password`"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        let e = load("security.protocol=tls\n");
        assert!(
            e.contains("line 1: librdkafka option `security.protocol`"),
            "{e}"
        );
        let missing = dir.join("no-such-ca.pem");
        let e = load(&format!(
            "security.protocol=SSL\nssl.ca.location={}\n",
            missing.display()
        ));
        assert!(
            e.starts_with(&format!("{}: librdkafka refused", file.display())),
            "{e}"
        );
        assert!(e.contains("ssl.ca.location"), "{e}");
        std::fs::write(&file, "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\nsasl.username=u\nsasl.password=hunter2\n").unwrap();
        let ok = ClientSettings::load(None, Some(&file)).unwrap();
        assert!(!format!("{ok:?}").contains("hunter2"), "{ok:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn secrets_are_never_shown() {
        let e = OptionError {
            key: "sasl.password".into(),
            value: "hunter2".into(),
            reason: "r".into(),
        };
        assert_eq!(
            e.to_string(),
            "librdkafka option `sasl.password=[redacted]`: r"
        );
        assert!(is_secret("ssl.key.password"));
        assert!(is_secret("ssl.key.pem"));
        assert!(is_secret("sasl.oauthbearer.client.secret"));
        assert!(!is_secret("sasl.username"));
        assert!(!is_secret("ssl.ca.location"));
        assert_eq!(
            redact("sasl.password", "hunter2", "bad \"hunter2\""),
            "bad \"[redacted]\""
        );
    }
}
