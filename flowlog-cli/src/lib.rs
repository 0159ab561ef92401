//! What every flowlog binary (`flowlog`, `flowlog-sidecar`, `flowlog-enricher`,
//! `flowlog-inventory`) does around its work, in one place: logs with `tracing` to stderr
//! (level from `FLOWLOG_LOG`, `EnvFilter` syntax, default `info`; colours only on a terminal),
//! a tokio runtime, and a failure's whole error chain logged once with exit status 1; and the
//! TOML configuration file of the long-running services ([`config_file_to_env`]); and the
//! listener for `/metrics`, `/healthz` and `/readyz` ([`telemetry`], [`health`]), with the
//! fixed-bucket histograms of hot paths ([`histogram`]).
use std::{
    collections::BTreeSet, future::Future, io::IsTerminal as _, path::PathBuf, process::ExitCode,
};

use tracing::error;

pub mod health;
pub mod histogram;
pub mod telemetry;

pub use health::Health;

/// Which tokio runtime the binary runs on.
#[derive(Debug, Clone, Copy)]
pub enum Runtime {
    /// One thread: the agent, whose loop is one task.
    CurrentThread,
    /// A pool of this many worker threads.
    Workers(usize),
}

/// Sets up logging, runs `work` to completion on `runtime`, and turns its result into the
/// process's exit status. Parse flags before calling it, so usage errors print as clap's.
pub fn main(runtime: Runtime, work: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOWLOG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let built = match runtime {
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Runtime::Workers(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "starting the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exits with a usage error of binary `A` (status 2), as clap reports a bad flag: `message`,
/// the usage line and a pointer to `--help`. For flags whose values are checked after parsing
/// (a file they name, options librdkafka must accept).
pub fn usage_error<A: clap::CommandFactory>(message: impl std::fmt::Display) -> ! {
    A::command()
        .error(clap::error::ErrorKind::InvalidValue, message)
        .exit()
}

/// The value a flag stands for once checked after parsing (`checked`), or a usage error of
/// binary `A` naming the flag (`'--kafka-config' (FLOWLOG_KAFKA_CONFIG)`) and the error's chain.
pub fn usage_checked<A: clap::CommandFactory, T, E: Into<anyhow::Error>>(
    flag: &str,
    checked: Result<T, E>,
) -> T {
    checked
        .unwrap_or_else(|e| usage_error::<A>(format!("invalid value for {flag}: {:#}", e.into())))
}

/// Parses a duration flag (`5s`, `100ms`, `1h 30m`), which must be greater than zero (an
/// interval of zero would spin).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration_or_zero(s)?;
    if d.is_zero() {
        return Err("must be greater than zero".to_string());
    }
    Ok(d)
}

/// Parses a duration flag that may be zero (`--hold 0s`: never wait).
pub fn parse_duration_or_zero(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))
}

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the configuration file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing the configuration file {path}")]
    Syntax {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error(
        "parsing the configuration file {path}: unknown setting `{key}` (no flag reads {name}); \
         the settings are: {settings}"
    )]
    UnknownSetting {
        path: PathBuf,
        key: String,
        name: String,
        /// Every setting the binary reads, comma-separated.
        settings: String,
    },
    #[error(
        "parsing the configuration file {path}: `{key}`: {what}; use `key = value` or \
         `key = [values]`"
    )]
    NotASetting {
        path: PathBuf,
        key: String,
        what: &'static str,
    },
}

/// The `--config FILE` flag of the services that read a configuration file (flatten it into
/// their flags and parse them with [`parse_with_config_file`]).
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigFile {
    /// A TOML file of settings: `key = value` per flag, named as its environment variable
    /// without `FLOWLOG_` (`kafka_brokers = "kafka:9092"`, `static = ["a.toml", "b.toml"]`).
    /// The command line and the environment win over the file.
    #[arg(long = "config", env = "FLOWLOG_CONFIG")]
    pub path: Option<PathBuf>,
}

/// Parses the flags of a binary with a [`ConfigFile`]: the file's settings first become the
/// flags' defaults ([`config_file_to_env`]); a file that cannot be used is a usage error (exit
/// status 2), like a bad flag.
pub fn parse_with_config_file<A: clap::Parser>() -> A {
    let known = env_names(&A::command());
    if let Err(e) = config_file_to_env(&known) {
        eprintln!("error: {}", flowlog_diag::error_chain(&e));
        std::process::exit(2);
    }
    A::parse()
}

/// Reads the TOML configuration file named by `--config PATH` (or `FLOWLOG_CONFIG`) and makes
/// each of its settings the default of the flag it names: every flag can be set from an
/// environment variable `FLOWLOG_<NAME>`, so a key `name` (or `NAME`) becomes `FLOWLOG_NAME`
/// unless the environment already sets it. Flags on the command line win over the environment,
/// which wins over the file. Lists become comma-separated values. Call it before parsing flags,
/// while the process is still single-threaded (it sets environment variables).
///
/// `known`: the environment variables the binary's flags read ([`env_names`]). A key that names
/// none of them is a mistake (a typo, or a setting of another binary) that would otherwise be
/// ignored without a word: it is an error naming the key.
pub fn config_file_to_env(known: &BTreeSet<String>) -> Result<Option<PathBuf>, ConfigError> {
    let mut args = std::env::args_os().skip(1);
    let mut path = std::env::var_os("FLOWLOG_CONFIG").map(PathBuf::from);
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy().into_owned();
        if arg == "--config" {
            path = args.next().map(PathBuf::from);
        } else if let Some(p) = arg.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        }
    }
    let Some(path) = path else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.clone(),
            source: Box::new(e),
        })?;
    for (key, value) in &table {
        let name = format!("FLOWLOG_{}", key.to_uppercase().replace('-', "_"));
        if !known.contains(&name) {
            return Err(ConfigError::UnknownSetting {
                path: path.clone(),
                key: key.clone(),
                name,
                settings: known
                    .iter()
                    .filter_map(|n| n.strip_prefix("FLOWLOG_"))
                    .filter(|n| *n != "CONFIG")
                    .map(|n| n.to_lowercase())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if std::env::var_os(&name).is_some() {
            continue;
        }
        let bad = |what: &'static str| ConfigError::NotASetting {
            path: path.clone(),
            key: key.clone(),
            what,
        };
        let value = match value {
            toml::Value::Array(items) => items
                .iter()
                .map(|v| scalar(v).ok_or_else(|| bad("a list of lists or tables")))
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            v => scalar(v).ok_or_else(|| bad("a table is not a setting"))?,
        };
        // SAFETY: called before any other thread exists (see the function's docs).
        unsafe { std::env::set_var(&name, value) };
    }
    Ok(Some(path))
}

/// The environment variables that the flags of `command` (and its subcommands) read.
pub fn env_names(command: &clap::Command) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    for sub in command.get_subcommands() {
        names.extend(env_names(sub));
    }
    names
}

/// A TOML scalar as a flag's text.
fn scalar(v: &toml::Value) -> Option<String> {
    Some(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(_) | toml::Value::Table(_) => return None,
    })
}
