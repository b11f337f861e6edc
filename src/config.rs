//! TOML configuration: strict reading, env overrides, one validation.
//!
//! Loading happens in steps, so that every mistake is reported where the
//! user can fix it:
//!
//! 1. The file is parsed as TOML, keeping where each value was written.
//!    Syntax errors, unknown sections and unknown keys fail with
//!    `file:line:column`.
//! 2. Environment overrides `KUBE_PREFETCH__SECTION__KEY=value` replace the
//!    file's values. A value is read as a TOML value would be (`2`, `1.5`,
//!    `true`), and as text when it is not one (`90s`); text settings
//!    (names, addresses) always take it verbatim.
//! 3. [`validate`] turns what was written into a [`Config`]: every setting
//!    has its type and bounds there, in one place, and the same rules apply
//!    to the file and to the environment. Its messages name where the value
//!    came from (`file:line:column`, or the variable), the setting, what is
//!    expected and what was found, in words rather than Rust types.
//! 4. Each kubeconfig is read, each listed context must exist, cluster
//!    names must be unique.
//!
//! Adding a setting: a field in its section's struct and its default, its
//! key in [`SETTINGS`] (in [`TEXT_SETTINGS`] too if it is free text), and
//! one line in [`validate`] with its bounds. A test checks that validate
//! reads every key of [`SETTINGS`].
//!
//! [`parse_str`] runs steps 1 and 3 without touching the file system or the
//! environment; the tests of the shipped example use it, since its
//! kubeconfig paths only exist in a real deployment.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Serialize, Serializer};
use toml::de::{DeTable, DeValue};

use crate::names;

use crate::pull::podspec::PullMethod;

/// Prefix of the environment overrides, e.g. `KUBE_PREFETCH__SERVER__LISTEN`.
pub const ENV_PREFIX: &str = "KUBE_PREFETCH";
/// Separates the prefix, the section and the key in an override's name.
pub const ENV_SEPARATOR: &str = "__";

/// The helper image whose static no-op binary lets pull pods run in any
/// image. Tagged with our own version so the helper matches the release.
pub const DEFAULT_HELPER_IMAGE: &str = concat!(
    "ghcr.io/kube-prefetch/kube-prefetch-noop:",
    env!("CARGO_PKG_VERSION")
);

/// Bounds of every setting. Durations stay far from what `Instant`
/// arithmetic can overflow; counts stay where memory and API budgets hold.
pub mod bounds {
    use std::ops::RangeInclusive;
    use std::time::Duration;

    const fn seconds(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;

    pub const RETRY_AFTER: RangeInclusive<Duration> = seconds(1)..=seconds(30 * DAY);
    /// A pull pod's `activeDeadlineSeconds` (a whole number >= 1); a day is
    /// the Prefetch field's own maximum.
    pub const PULL_TIMEOUT: RangeInclusive<Duration> = seconds(1)..=seconds(DAY);
    pub const MAX_PARALLEL_PER_NODE: RangeInclusive<u64> = 1..=100;
    pub const MAX_PARALLEL_PER_PREFETCH: RangeInclusive<u64> = 1..=10_000;
    pub const MAX_PARALLEL_PER_CLUSTER: RangeInclusive<u64> = 1..=10_000;
    /// A pair costs about a kilobyte while planned and tracked: a million
    /// is a gigabyte, over the Deployment's memory limit.
    pub const MAX_PAIRS_PER_PREFETCH: RangeInclusive<u64> = 1..=1_000_000;
    pub const MAX_PAIRS_PER_CLUSTER: RangeInclusive<u64> = 1..=5_000_000;
    /// Below 0.1 a request waits more than 10 s for its turn.
    pub const API_QPS: RangeInclusive<f64> = 0.1..=10_000.0;
    pub const STATUS_DEBOUNCE: RangeInclusive<Duration> = seconds(0)..=seconds(MINUTE);
    pub const BACKOFF_INITIAL: RangeInclusive<Duration> = Duration::from_millis(10)..=seconds(HOUR);
    pub const BACKOFF_MAX: RangeInclusive<Duration> = seconds(1)..=seconds(DAY);
    pub const BACKOFF_MULTIPLIER: RangeInclusive<f64> = 1.0..=10.0;
    pub const BACKOFF_MAX_ATTEMPTS: RangeInclusive<u64> = 1..=100;
    pub const KUBECONFIG_ENTRIES: usize = 100;
    pub const CONTEXTS_PER_ENTRY: usize = 1_000;
    pub const PATH_LENGTH: usize = 4_096;
    /// Context names are object names in a kubeconfig: a subdomain's length.
    pub const CONTEXT_NAME_LENGTH: usize = 253;
    pub const NAME_PREFIX_LENGTH: usize = 63;
    pub const IMAGE_LENGTH: usize = 4_096;
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Config {
    pub server: ServerConfig,
    pub defaults: Defaults,
    pub backoff: BackoffConfig,
    pub policy: Policy,
    /// Where the target clusters come from; at least one entry is required.
    pub kubeconfig: Vec<KubeconfigSource>,
    pub leader_election: LeaderElection,
}

/// `[server]`: the HTTP endpoint (status API, metrics, probes, dashboard).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerConfig {
    #[serde(serialize_with = "display")]
    pub listen: SocketAddr,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
        }
    }
}

/// `[defaults]`: values used when a `Prefetch` does not say otherwise, and
/// per-cluster limits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Defaults {
    /// Re-verification period of a satisfied (node, image) pair.
    #[serde(serialize_with = "duration")]
    pub retry_after: Duration,
    /// Deadline of one pull pod.
    #[serde(serialize_with = "duration")]
    pub pull_timeout: Duration,
    /// In-flight pull pods per node; the kubelet pulls serially by default.
    pub max_parallel_per_node: usize,
    /// In-flight pull pods per `Prefetch`, unless its `max_parallel` says less.
    pub max_parallel_per_prefetch: usize,
    /// In-flight pull pods per cluster.
    pub max_parallel_per_cluster: usize,
    /// (node, image) pairs one `Prefetch` may plan; over it, it is FAILED
    /// and plans nothing.
    pub max_pairs_per_prefetch: usize,
    /// (node, image) pairs all `Prefetch`es of one cluster may plan
    /// together; the newest that would pass it is FAILED.
    pub max_pairs_per_cluster: usize,
    /// Client-side request rate to each API server, in requests per second.
    pub api_qps: f64,
    /// Status writes of one `Prefetch` are coalesced over this window.
    #[serde(serialize_with = "duration")]
    pub status_debounce: Duration,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            retry_after: Duration::from_secs(300),
            pull_timeout: Duration::from_secs(600),
            max_parallel_per_node: 1,
            max_parallel_per_prefetch: 10,
            max_parallel_per_cluster: 50,
            max_pairs_per_prefetch: 50_000,
            max_pairs_per_cluster: 200_000,
            api_qps: 20.0,
            status_debounce: Duration::from_secs(1),
        }
    }
}

/// `[backoff]`: retries of a failed (node, image) pair.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackoffConfig {
    #[serde(serialize_with = "duration")]
    pub initial: Duration,
    #[serde(serialize_with = "duration")]
    pub max: Duration,
    pub multiplier: f32,
    /// Attempts in total, the first one included, before the pair is failed.
    pub max_attempts: u32,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(300),
            multiplier: 2.0,
            max_attempts: 5,
        }
    }
}

/// `[policy]`: what application teams may ask for, and how pull pods look.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// Whether a `Prefetch` may name workloads in other namespaces.
    pub cross_namespace: bool,
    /// Pull pods tolerate every taint instead of copying the workload's tolerations.
    pub tolerate_all_taints: bool,
    /// How pull pods avoid running the image's code: `helper` (an init
    /// container with a static no-op) or `direct` (a command that cannot
    /// exist; no helper image needed).
    pub pull_method: PullMethod,
    /// Image of the init container that provides the static no-op binary
    /// (`pull_method = "helper"` only).
    pub helper_image: String,
    /// PriorityClass of pull pods (a low one keeps them from preempting work).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority_class: Option<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            cross_namespace: false,
            tolerate_all_taints: false,
            pull_method: PullMethod::default(),
            helper_image: DEFAULT_HELPER_IMAGE.to_string(),
            priority_class: None,
        }
    }
}

/// One `[[kubeconfig]]` entry: a kubeconfig file and which of its contexts
/// are target clusters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KubeconfigSource {
    /// After loading, relative paths are resolved against the directory of
    /// the config file (not the working directory).
    pub path: PathBuf,
    /// Contexts to use; `None` means all contexts of the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contexts: Option<Vec<String>>,
    /// Prepended to each context name to form the cluster name, to keep names
    /// unique across files.
    pub name_prefix: String,
}

/// `[leader_election]`: for running more than one replica (the Lease lives
/// in the cluster the process runs in).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeaderElection {
    pub enabled: bool,
    pub namespace: String,
    pub lease_name: String,
}

impl Default for LeaderElection {
    fn default() -> Self {
        LeaderElection {
            enabled: false,
            namespace: "kube-prefetch".to_string(),
            lease_name: "kube-prefetch".to_string(),
        }
    }
}

/// One target cluster: a context of a kubeconfig file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTarget {
    /// `name_prefix` + context name; unique across the configuration.
    pub name: String,
    pub kubeconfig: PathBuf,
    pub context: String,
}

/// Where a value came from, as messages show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Written in the config file; 1-based line and column (in characters).
    File {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    /// Set by an environment override.
    Env { variable: String, value: String },
    /// Not set anywhere: the default, blamed on the config file.
    Default { path: PathBuf },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line, column } => {
                write!(f, "{}:{line}:{column}", path.display())
            }
            Origin::Env { variable, value } => {
                write!(f, "environment variable {variable}={value:?}")
            }
            Origin::Default { path } => write!(f, "{}", path.display()),
        }
    }
}

/// Everything that can be wrong with a configuration. Each message says
/// where the problem is and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },

    /// The file is not valid TOML, or has a section or key we do not know.
    #[error("{}: {message}", location(path, *line, *column))]
    Parse {
        path: PathBuf,
        /// 1-based; `None` when the parser could not point at a place.
        line: Option<usize>,
        /// 1-based, in characters.
        column: Option<usize>,
        message: String,
    },

    /// An environment override that names no setting.
    #[error("environment variable {variable}={value:?}: {message}")]
    Env {
        variable: String,
        value: String,
        message: String,
    },

    /// A value of the wrong kind, out of range or inconsistent.
    #[error("{origin}: {field} {message}")]
    Invalid {
        origin: Origin,
        /// `section.key`, e.g. `defaults.pull_timeout`.
        field: String,
        message: String,
    },

    #[error(
        "{}: no [[kubeconfig]] entry; add at least one, e.g. [[kubeconfig]] with path = \"kubeconfig\", so there is a cluster to manage",
        path.display()
    )]
    NoKubeconfig { path: PathBuf },

    #[error(
        "kubeconfig {}{} does not exist; fix its path (relative paths are relative to the config file's directory) or mount the file",
        path.display(),
        named_at(origin.as_ref())
    )]
    KubeconfigMissing {
        path: PathBuf,
        /// Where the config file names it, when known.
        origin: Option<Origin>,
    },

    #[error("cannot load kubeconfig {}{}: {message}", path.display(), named_at(origin.as_ref()))]
    KubeconfigInvalid {
        path: PathBuf,
        origin: Option<Origin>,
        message: String,
    },

    #[error(
        "kubeconfig {}{} has no contexts, so it names no cluster; add a context or remove its [[kubeconfig]] entry",
        path.display(),
        named_at(origin.as_ref())
    )]
    NoContexts {
        path: PathBuf,
        origin: Option<Origin>,
    },

    #[error(
        "{}unknown context {context:?} in kubeconfig {} (it has: {})",
        entry_at(origin.as_deref(), *entry),
        kubeconfig.display(),
        available.join(", ")
    )]
    UnknownContext {
        context: String,
        kubeconfig: PathBuf,
        available: Vec<String>,
        /// Where the config file lists the contexts, when known (boxed to
        /// keep the error small).
        origin: Option<Box<Origin>>,
        /// 1-based index of the `[[kubeconfig]]` entry.
        entry: usize,
    },

    #[error(
        "{}cluster name {name:?} (name_prefix + context) must be at most {} characters without control characters",
        entry_at(origin.as_deref(), *entry),
        bounds::CONTEXT_NAME_LENGTH
    )]
    InvalidClusterName {
        name: String,
        origin: Option<Box<Origin>>,
        entry: usize,
    },

    /// Boxed: the error stays small for the common cases.
    #[error("{0}")]
    DuplicateCluster(Box<DuplicateCluster>),
}

/// Two `[[kubeconfig]]` contexts that make the same cluster name.
#[derive(Debug)]
pub struct DuplicateCluster {
    pub name: String,
    pub first_kubeconfig: PathBuf,
    pub first_context: String,
    pub second_kubeconfig: PathBuf,
    pub second_context: String,
    /// Where the second entry is written, when known.
    pub origin: Option<Origin>,
    /// 1-based index of the second entry.
    pub entry: usize,
}

impl fmt::Display for DuplicateCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}cluster name {:?} is used twice: by context {:?} of kubeconfig {} and by context {:?} of kubeconfig {}; give one [[kubeconfig]] entry a distinct name_prefix or list each context once",
            entry_at(self.origin.as_ref(), self.entry),
            self.name,
            self.first_context,
            self.first_kubeconfig.display(),
            self.second_context,
            self.second_kubeconfig.display()
        )
    }
}

fn named_at(origin: Option<&Origin>) -> String {
    origin.map_or_else(String::new, |origin| format!(" (named at {origin})"))
}

fn entry_at(origin: Option<&Origin>, entry: usize) -> String {
    origin.map_or_else(String::new, |origin| {
        format!("{origin}: kubeconfig entry {entry}: ")
    })
}

fn location(path: &Path, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!("{}:{line}:{column}", path.display()),
        (Some(line), None) => format!("{}:{line}", path.display()),
        _ => path.display().to_string(),
    }
}

/// Reads, parses, applies environment overrides and validates the config
/// file at `path`, including the kubeconfig files it names.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_env(path, process_env())
}

/// [`load`] with the environment given as (name, value) pairs, so tests do
/// not depend on the process environment.
fn load_with_env(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let mut written = read_file(&text, path)?;
    for (key, value) in env_overrides(env)? {
        written.settings.insert(key, value);
    }
    let config = validate(&written, path)?;
    // Checks the kubeconfig files, their contexts and the cluster names, so
    // a broken setup fails at start-up rather than when a cluster connects.
    resolve(&config, &written.kubeconfig)?;
    Ok(config)
}

/// Parses `text` as if it were the file `origin` (used in messages and to
/// resolve relative kubeconfig paths) and validates it, without reading the
/// environment or the kubeconfig files.
pub fn parse_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    let written = read_file(text, origin)?;
    validate(&written, origin)
}

/// The target clusters: every selected context of every kubeconfig, sorted
/// by cluster name.
pub fn resolve_clusters(config: &Config) -> Result<Vec<ClusterTarget>, ConfigError> {
    resolve(config, &[])
}

/// `entries` (where each `[[kubeconfig]]` was written) may be empty when
/// unknown; messages then name only the kubeconfig.
fn resolve(config: &Config, entries: &[WrittenEntry]) -> Result<Vec<ClusterTarget>, ConfigError> {
    // name -> index in `clusters`, to name both sources of a duplicate.
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut clusters: Vec<ClusterTarget> = Vec::new();
    for (index, source) in config.kubeconfig.iter().enumerate() {
        let written = entries.get(index);
        for context in selected_contexts(source, index + 1, written)? {
            let name = format!("{}{}", source.name_prefix, context);
            if name.len() > bounds::CONTEXT_NAME_LENGTH || name.chars().any(char::is_control) {
                return Err(ConfigError::InvalidClusterName {
                    name,
                    origin: written.map(|entry| Box::new(entry.origin.clone())),
                    entry: index + 1,
                });
            }
            let target = ClusterTarget {
                name,
                kubeconfig: source.path.clone(),
                context,
            };
            if let Some(&first) = by_name.get(&target.name) {
                let first = &clusters[first];
                return Err(ConfigError::DuplicateCluster(Box::new(DuplicateCluster {
                    name: target.name,
                    first_kubeconfig: first.kubeconfig.clone(),
                    first_context: first.context.clone(),
                    second_kubeconfig: target.kubeconfig,
                    second_context: target.context,
                    origin: written.map(|entry| entry.origin.clone()),
                    entry: index + 1,
                })));
            }
            by_name.insert(target.name.clone(), clusters.len());
            clusters.push(target);
        }
    }
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(clusters)
}

fn selected_contexts(
    source: &KubeconfigSource,
    entry: usize,
    written: Option<&WrittenEntry>,
) -> Result<Vec<String>, ConfigError> {
    let path = &source.path;
    let path_origin = written.map(|entry| {
        entry
            .fields
            .get("path")
            .map_or_else(|| entry.origin.clone(), |value| value.origin.clone())
    });
    if !path.exists() {
        return Err(ConfigError::KubeconfigMissing {
            path: path.clone(),
            origin: path_origin,
        });
    }
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|error| {
        ConfigError::KubeconfigInvalid {
            path: path.clone(),
            origin: path_origin.clone(),
            message: error.to_string(),
        }
    })?;
    let available: Vec<String> = kubeconfig.contexts.into_iter().map(|c| c.name).collect();
    if available.is_empty() {
        return Err(ConfigError::NoContexts {
            path: path.clone(),
            origin: path_origin,
        });
    }
    match &source.contexts {
        None => Ok(available),
        Some(wanted) => {
            for context in wanted {
                if !available.contains(context) {
                    return Err(ConfigError::UnknownContext {
                        context: context.clone(),
                        kubeconfig: path.clone(),
                        available,
                        origin: written.map(|entry| {
                            Box::new(
                                entry.fields.get("contexts").map_or_else(
                                    || entry.origin.clone(),
                                    |value| value.origin.clone(),
                                ),
                            )
                        }),
                        entry,
                    });
                }
            }
            Ok(wanted.clone())
        }
    }
}

/// A value as written, before validation.
#[derive(Debug, Clone, PartialEq)]
enum Raw {
    /// `None`: a whole number too large for any check to accept.
    Int(Option<i128>),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Raw>),
    /// A table or a date-time: never a valid setting.
    Other,
}

/// One setting as written: its value, where it came from, and the text the
/// user wrote (shown after "found" in messages).
#[derive(Debug, Clone, PartialEq)]
struct Written {
    value: Raw,
    origin: Origin,
    text: String,
}

/// One `[[kubeconfig]]` entry as written.
#[derive(Debug, Clone, PartialEq)]
struct WrittenEntry {
    /// Where the entry starts.
    origin: Origin,
    fields: BTreeMap<String, Written>,
}

/// The file and the environment, as written.
#[derive(Debug, Default)]
struct WrittenConfig {
    /// `section.key` -> value.
    settings: BTreeMap<String, Written>,
    /// Where `[[kubeconfig]]` first appears, if it does.
    kubeconfig_origin: Option<Origin>,
    kubeconfig: Vec<WrittenEntry>,
}

/// Settings per section, for the file and the environment alike; the
/// `[[kubeconfig]]` list has its own keys ([`KUBECONFIG_KEYS`]).
pub const SETTINGS: &[(&str, &[&str])] = &[
    ("server", &["listen"]),
    (
        "defaults",
        &[
            "retry_after",
            "pull_timeout",
            "max_parallel_per_node",
            "max_parallel_per_prefetch",
            "max_parallel_per_cluster",
            "max_pairs_per_prefetch",
            "max_pairs_per_cluster",
            "api_qps",
            "status_debounce",
        ],
    ),
    ("backoff", &["initial", "max", "multiplier", "max_attempts"]),
    (
        "policy",
        &[
            "cross_namespace",
            "tolerate_all_taints",
            "pull_method",
            "helper_image",
            "priority_class",
        ],
    ),
    ("leader_election", &["enabled", "namespace", "lease_name"]),
];

/// Settings whose environment value is taken verbatim, never as a number
/// or boolean (`LEASE_NAME=42` is the name "42").
pub const TEXT_SETTINGS: &[&str] = &[
    "server.listen",
    "policy.pull_method",
    "policy.helper_image",
    "policy.priority_class",
    "leader_election.namespace",
    "leader_election.lease_name",
];

const KUBECONFIG_KEYS: &[&str] = &["path", "contexts", "name_prefix"];

/// Step 1: the file as written, with positions; unknown sections and keys
/// are errors here.
fn read_file(text: &str, path: &Path) -> Result<WrittenConfig, ConfigError> {
    let document = DeTable::parse(text).map_err(|error| {
        let (line, column) = match error.span() {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: error.message().trim_end().to_string(),
        }
    })?;
    let at = |span: Range<usize>| {
        let (line, column) = line_column(text, span.start);
        Origin::File {
            path: path.to_path_buf(),
            line,
            column,
        }
    };
    let parse_error = |span: Range<usize>, message: String| {
        let (line, column) = line_column(text, span.start);
        ConfigError::Parse {
            path: path.to_path_buf(),
            line: Some(line),
            column: Some(column),
            message,
        }
    };
    let written = |value: &toml::Spanned<DeValue>| Written {
        value: raw(value.get_ref()),
        origin: at(value.span()),
        text: as_found(text.get(value.span()).unwrap_or_default().trim()),
    };
    let sections = || {
        SETTINGS
            .iter()
            .map(|(section, _)| format!("[{section}]"))
            .chain(["[[kubeconfig]]".to_string()])
            .collect::<Vec<_>>()
            .join(", ")
    };

    let mut config = WrittenConfig::default();
    for (section_key, section) in document.get_ref() {
        let section_name: &str = section_key.get_ref();
        if section_name == "kubeconfig" {
            config.kubeconfig_origin = Some(at(section_key.span()));
            let DeValue::Array(entries) = section.get_ref() else {
                return Err(parse_error(
                    section_key.span(),
                    "use [[kubeconfig]] (an array of tables), not [kubeconfig]: each [[kubeconfig]] entry names one kubeconfig file".to_string(),
                ));
            };
            for entry in entries.iter() {
                let DeValue::Table(fields) = entry.get_ref() else {
                    return Err(parse_error(
                        entry.span(),
                        "use [[kubeconfig]] (an array of tables) with path = \"...\" below it"
                            .to_string(),
                    ));
                };
                let mut written_entry = WrittenEntry {
                    origin: at(entry.span()),
                    fields: BTreeMap::new(),
                };
                for (key, value) in fields {
                    let key_name: &str = key.get_ref();
                    if !KUBECONFIG_KEYS.contains(&key_name) {
                        return Err(parse_error(
                            key.span(),
                            format!(
                                "unknown key {key_name:?} in [[kubeconfig]]; its keys are {}",
                                KUBECONFIG_KEYS.join(", ")
                            ),
                        ));
                    }
                    written_entry
                        .fields
                        .insert(key_name.to_string(), written(value));
                }
                config.kubeconfig.push(written_entry);
            }
            continue;
        }
        let Some((_, keys)) = SETTINGS.iter().find(|(name, _)| *name == section_name) else {
            return Err(parse_error(
                section_key.span(),
                format!(
                    "unknown section [{section_name}]; sections are {}",
                    sections()
                ),
            ));
        };
        let DeValue::Table(table) = section.get_ref() else {
            return Err(parse_error(
                section_key.span(),
                format!(
                    "{section_name} must be a table: write [{section_name}] with its keys on the lines below"
                ),
            ));
        };
        for (key, value) in table {
            let key_name: &str = key.get_ref();
            if !keys.contains(&key_name) {
                return Err(parse_error(
                    key.span(),
                    format!(
                        "unknown key {key_name:?} in [{section_name}]; its keys are {}",
                        keys.join(", ")
                    ),
                ));
            }
            config
                .settings
                .insert(format!("{section_name}.{key_name}"), written(value));
        }
    }
    Ok(config)
}

/// What a message shows after "found": the value as written, cut short
/// (a list of a thousand contexts need not be repeated in full).
fn as_found(written: &str) -> String {
    const SHOWN_MAX: usize = 120;
    if written.chars().count() <= SHOWN_MAX {
        written.to_string()
    } else {
        let head: String = written.chars().take(SHOWN_MAX).collect();
        format!("{head}...")
    }
}

fn raw(value: &DeValue) -> Raw {
    match value {
        DeValue::String(text) => Raw::Str(text.to_string()),
        DeValue::Integer(integer) => {
            Raw::Int(i128::from_str_radix(integer.as_str(), integer.radix()).ok())
        }
        DeValue::Float(float) => Raw::Float(float.as_str().parse().unwrap_or(f64::NAN)),
        DeValue::Boolean(boolean) => Raw::Bool(*boolean),
        DeValue::Array(items) => Raw::Array(items.iter().map(|item| raw(item.get_ref())).collect()),
        DeValue::Datetime(_) | DeValue::Table(_) => Raw::Other,
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Removes `.` and `name/..` lexically, so `config/../clusters/x` reads as
/// `clusters/x` in messages. Leading `..` are kept (nothing to cancel).
fn clean_path(path: &Path) -> PathBuf {
    let mut parts: Vec<Component> = Vec::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => match parts.last() {
                Some(Component::Normal(_)) => {
                    parts.pop();
                }
                // `/..` is `/`.
                Some(Component::RootDir) | Some(Component::Prefix(_)) => {}
                _ => parts.push(component),
            },
            other => parts.push(other),
        }
    }
    if parts.is_empty() {
        return PathBuf::from(".");
    }
    parts.iter().collect()
}

/// The process environment's variables that carry our prefix (any case).
fn process_env() -> Vec<(String, String)> {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase();
    std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            if !name.to_lowercase().starts_with(&prefix) {
                return None;
            }
            // A non-UTF-8 value cannot be a valid setting; keep it, lossily,
            // so the error names the variable instead of ignoring it.
            Some((name, value.to_string_lossy().into_owned()))
        })
        .collect()
}

/// Step 2: the environment overrides as written values keyed
/// `section.key`, read like TOML values (see the module docs).
fn env_overrides(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, Written>, ConfigError> {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase();
    let mut overrides = BTreeMap::new();
    for (name, value) in env {
        let lower = name.to_lowercase();
        let Some(rest) = lower.strip_prefix(&prefix) else {
            continue;
        };
        let key = rest.replace(ENV_SEPARATOR, ".");
        check_env_key(&key, &name, &value)?;
        let raw = if TEXT_SETTINGS.contains(&key.as_str()) {
            Raw::Str(value.clone())
        } else {
            match DeValue::parse(&value) {
                Ok(parsed) => raw(parsed.get_ref()),
                Err(_) => Raw::Str(value.clone()),
            }
        };
        let text = match &raw {
            Raw::Str(text) => as_found(&format!("{text:?}")),
            _ => as_found(value.trim()),
        };
        overrides.insert(
            key,
            Written {
                value: raw,
                origin: Origin::Env {
                    variable: name,
                    value,
                },
                text,
            },
        );
    }
    Ok(overrides)
}

fn check_env_key(key: &str, variable: &str, value: &str) -> Result<(), ConfigError> {
    let error = |message: String| ConfigError::Env {
        variable: variable.to_string(),
        value: value.to_string(),
        message,
    };
    let sections = || {
        SETTINGS
            .iter()
            .map(|(section, _)| section.to_uppercase())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (section, field) = match key.split_once('.') {
        Some((section, field)) => (section, field),
        None if key == "kubeconfig" => ("kubeconfig", ""),
        None => {
            return Err(error(format!(
                "expected {ENV_PREFIX}{ENV_SEPARATOR}SECTION{ENV_SEPARATOR}KEY with SECTION one of {}",
                sections()
            )));
        }
    };
    if section == "kubeconfig" {
        return Err(error(
            "[[kubeconfig]] entries cannot be set from the environment; list them in the config file"
                .to_string(),
        ));
    }
    let Some((_, fields)) = SETTINGS.iter().find(|(name, _)| *name == section) else {
        return Err(error(format!(
            "there is no section [{section}]; sections are {}",
            sections()
        )));
    };
    if !fields.contains(&field) {
        let prefix = format!(
            "{ENV_PREFIX}{ENV_SEPARATOR}{}{ENV_SEPARATOR}",
            section.to_uppercase()
        );
        let known: Vec<String> = fields
            .iter()
            .map(|field| format!("{prefix}{}", field.to_uppercase()))
            .collect();
        return Err(error(format!(
            "there is no setting {section}.{field}; the settings of [{section}] are {}",
            known.join(", ")
        )));
    }
    Ok(())
}

/// Reads settings out of what was written, with the messages of step 3.
struct Reader<'a> {
    path: &'a Path,
    settings: &'a BTreeMap<String, Written>,
    /// Keys asked for, so a test can check that every setting is read.
    read: std::cell::RefCell<BTreeSet<String>>,
}

fn shown(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// Integral and in `i128`; floats never pass as whole numbers (`1.4`).
fn whole_number(value: &Raw) -> Option<i128> {
    match value {
        Raw::Int(number) => *number,
        _ => None,
    }
}

impl<'a> Reader<'a> {
    fn new(path: &'a Path, settings: &'a BTreeMap<String, Written>) -> Self {
        Reader {
            path,
            settings,
            read: Default::default(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Written> {
        self.read.borrow_mut().insert(key.to_string());
        self.settings.get(key)
    }

    fn origin(&self, key: &str) -> Origin {
        self.settings.get(key).map_or_else(
            || Origin::Default {
                path: self.path.to_path_buf(),
            },
            |written| written.origin.clone(),
        )
    }

    fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin(key),
            field: key.to_string(),
            message,
        }
    }

    fn whole(
        &self,
        key: &str,
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let Some(written) = self.get(key) else {
            return Ok(default);
        };
        whole_number(&written.value)
            .and_then(|number| u64::try_from(number).ok())
            .filter(|number| range.contains(number))
            .ok_or_else(|| {
                self.invalid(
                    key,
                    format!(
                        "must be a whole number from {} to {}, found {}",
                        range.start(),
                        range.end(),
                        written.text
                    ),
                )
            })
    }

    fn number(
        &self,
        key: &str,
        default: f64,
        range: RangeInclusive<f64>,
        unit: &str,
    ) -> Result<f64, ConfigError> {
        let Some(written) = self.get(key) else {
            return Ok(default);
        };
        let number = match written.value {
            Raw::Float(number) => Some(number),
            // Every i128 converts, at worst rounded: the range check decides.
            Raw::Int(Some(number)) => Some(number as f64),
            _ => None,
        };
        number
            .filter(|number| range.contains(number))
            .ok_or_else(|| {
                self.invalid(
                    key,
                    format!(
                        "must be a number from {} to {}{unit}, found {}",
                        range.start(),
                        range.end(),
                        written.text
                    ),
                )
            })
    }

    fn boolean(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        let Some(written) = self.get(key) else {
            return Ok(default);
        };
        match &written.value {
            Raw::Bool(value) => Ok(*value),
            Raw::Str(text) if matches!(text.as_str(), "true" | "false") => Err(self.invalid(
                key,
                format!(
                    "must be true or false, found {}; write it without quotes",
                    written.text
                ),
            )),
            _ => Err(self.invalid(
                key,
                format!("must be true or false, found {}", written.text),
            )),
        }
    }

    fn duration(
        &self,
        key: &str,
        default: Duration,
        range: RangeInclusive<Duration>,
    ) -> Result<Duration, ConfigError> {
        let Some(written) = self.get(key) else {
            return Ok(default);
        };
        let expected = format!(
            "must be a duration from {} to {}, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds",
            shown(*range.start()),
            shown(*range.end())
        );
        let parsed = match &written.value {
            Raw::Int(Some(seconds)) => u64::try_from(*seconds).ok().map(Duration::from_secs),
            Raw::Str(text) => {
                let text = text.trim();
                if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                    text.parse::<u64>().ok().map(Duration::from_secs)
                } else {
                    // humantime's own error lists its units at length; what
                    // is expected and what was found say enough.
                    humantime::parse_duration(text).ok()
                }
            }
            _ => None,
        };
        parsed
            .filter(|duration| range.contains(duration))
            .ok_or_else(|| self.invalid(key, format!("{expected}, found {}", written.text)))
    }

    /// One of a few names, e.g. `"helper"` or `"direct"`.
    fn choice<T: Copy>(
        &self,
        key: &str,
        default: T,
        choices: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        let Some(written) = self.get(key) else {
            return Ok(default);
        };
        let chosen = match &written.value {
            Raw::Str(text) => choices.iter().find(|(name, _)| name == text),
            _ => None,
        };
        chosen.map(|(_, value)| *value).ok_or_else(|| {
            let names: Vec<String> = choices
                .iter()
                .map(|(name, _)| format!("{name:?}"))
                .collect();
            self.invalid(
                key,
                format!(
                    "must be one of {}, found {}",
                    names.join(", "),
                    written.text
                ),
            )
        })
    }

    /// Free text, checked by `rule` (which says what it expects).
    fn text(
        &self,
        key: &str,
        default: &str,
        rule: impl Fn(&str) -> Result<(), String>,
    ) -> Result<String, ConfigError> {
        Ok(self
            .optional_text(key, rule)?
            .unwrap_or_else(|| default.to_string()))
    }

    fn optional_text(
        &self,
        key: &str,
        rule: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Option<String>, ConfigError> {
        let Some(written) = self.get(key) else {
            return Ok(None);
        };
        let Raw::Str(text) = &written.value else {
            return Err(self.invalid(
                key,
                format!("must be a quoted string, found {}", written.text),
            ));
        };
        rule(text).map_err(|expected| {
            self.invalid(key, format!("must be {expected}, found {}", written.text))
        })?;
        Ok(Some(text.clone()))
    }
}

fn listen_address(text: &str) -> Result<(), String> {
    text.parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|_| "an IP address and port such as \"0.0.0.0:8080\" or \"[::]:8080\"".to_string())
}

fn image_reference(text: &str) -> Result<(), String> {
    let expected = format!(
        "an image reference of at most {} characters such as \"{DEFAULT_HELPER_IMAGE}\"",
        bounds::IMAGE_LENGTH
    );
    if text.len() > bounds::IMAGE_LENGTH {
        return Err(expected);
    }
    crate::pull::image::normalize(text)
        .map(|_| ())
        .map_err(|error| format!("{expected} ({})", error.reason))
}

/// `name_prefix` becomes part of cluster names in logs, metrics and status.
fn name_prefix_ok(text: &str) -> bool {
    text.len() <= bounds::NAME_PREFIX_LENGTH
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Step 3, the one place that knows every setting's type and bounds.
fn validate(written: &WrittenConfig, path: &Path) -> Result<Config, ConfigError> {
    validate_with(&Reader::new(path, &written.settings), written, path)
}

fn validate_with(
    read: &Reader,
    written: &WrittenConfig,
    path: &Path,
) -> Result<Config, ConfigError> {
    use bounds::*;
    let default = Config::default();
    let count = |value: u64| usize::try_from(value).unwrap_or(usize::MAX);

    let server = ServerConfig {
        listen: read
            .text(
                "server.listen",
                &default.server.listen.to_string(),
                listen_address,
            )?
            .parse()
            .unwrap_or(default.server.listen),
    };

    let d = &default.defaults;
    let defaults = Defaults {
        retry_after: read.duration("defaults.retry_after", d.retry_after, RETRY_AFTER)?,
        pull_timeout: read.duration("defaults.pull_timeout", d.pull_timeout, PULL_TIMEOUT)?,
        max_parallel_per_node: count(read.whole(
            "defaults.max_parallel_per_node",
            d.max_parallel_per_node as u64,
            MAX_PARALLEL_PER_NODE,
        )?),
        max_parallel_per_prefetch: count(read.whole(
            "defaults.max_parallel_per_prefetch",
            d.max_parallel_per_prefetch as u64,
            MAX_PARALLEL_PER_PREFETCH,
        )?),
        max_parallel_per_cluster: count(read.whole(
            "defaults.max_parallel_per_cluster",
            d.max_parallel_per_cluster as u64,
            MAX_PARALLEL_PER_CLUSTER,
        )?),
        max_pairs_per_prefetch: count(read.whole(
            "defaults.max_pairs_per_prefetch",
            d.max_pairs_per_prefetch as u64,
            MAX_PAIRS_PER_PREFETCH,
        )?),
        max_pairs_per_cluster: count(read.whole(
            "defaults.max_pairs_per_cluster",
            d.max_pairs_per_cluster as u64,
            MAX_PAIRS_PER_CLUSTER,
        )?),
        api_qps: read.number(
            "defaults.api_qps",
            d.api_qps,
            API_QPS,
            " requests per second",
        )?,
        status_debounce: read.duration(
            "defaults.status_debounce",
            d.status_debounce,
            STATUS_DEBOUNCE,
        )?,
    };

    let b = &default.backoff;
    let backoff = BackoffConfig {
        initial: read.duration("backoff.initial", b.initial, BACKOFF_INITIAL)?,
        max: read.duration("backoff.max", b.max, BACKOFF_MAX)?,
        multiplier: read.number(
            "backoff.multiplier",
            f64::from(b.multiplier),
            BACKOFF_MULTIPLIER,
            "",
        )? as f32,
        max_attempts: u32::try_from(read.whole(
            "backoff.max_attempts",
            u64::from(b.max_attempts),
            BACKOFF_MAX_ATTEMPTS,
        )?)
        .unwrap_or(b.max_attempts),
    };
    if backoff.initial > backoff.max {
        // Blame the one the user set (initial, unless only max was set).
        let key = if read.settings.contains_key("backoff.initial") {
            "backoff.initial"
        } else {
            "backoff.max"
        };
        return Err(read.invalid(
            key,
            format!(
                "must keep backoff.initial ({}) at most backoff.max ({})",
                shown(backoff.initial),
                shown(backoff.max)
            ),
        ));
    }

    let p = &default.policy;
    let policy = Policy {
        cross_namespace: read.boolean("policy.cross_namespace", p.cross_namespace)?,
        tolerate_all_taints: read.boolean("policy.tolerate_all_taints", p.tolerate_all_taints)?,
        pull_method: read.choice(
            "policy.pull_method",
            p.pull_method,
            &[
                (PullMethod::Helper.as_str(), PullMethod::Helper),
                (PullMethod::Direct.as_str(), PullMethod::Direct),
            ],
        )?,
        helper_image: read.text("policy.helper_image", &p.helper_image, image_reference)?,
        priority_class: read.optional_text("policy.priority_class", |text| {
            names::dns_subdomain(text).map_err(|rule| {
                format!("the name of a PriorityClass, {rule} (remove the key to use none)")
            })
        })?,
    };

    let l = &default.leader_election;
    let leader_election = LeaderElection {
        enabled: read.boolean("leader_election.enabled", l.enabled)?,
        namespace: read.text("leader_election.namespace", &l.namespace, |text| {
            names::dns_label(text).map_err(|rule| format!("a namespace name, {rule}"))
        })?,
        lease_name: read.text("leader_election.lease_name", &l.lease_name, |text| {
            names::dns_subdomain(text).map_err(|rule| format!("a Lease name, {rule}"))
        })?,
    };

    let kubeconfig = kubeconfig_entries(written, path)?;
    Ok(Config {
        server,
        defaults,
        backoff,
        policy,
        kubeconfig,
        leader_election,
    })
}

fn kubeconfig_entries(
    written: &WrittenConfig,
    path: &Path,
) -> Result<Vec<KubeconfigSource>, ConfigError> {
    if written.kubeconfig.is_empty() {
        return Err(ConfigError::NoKubeconfig {
            path: path.to_path_buf(),
        });
    }
    if written.kubeconfig.len() > bounds::KUBECONFIG_ENTRIES {
        return Err(ConfigError::Invalid {
            origin: written
                .kubeconfig_origin
                .clone()
                .unwrap_or(Origin::Default {
                    path: path.to_path_buf(),
                }),
            field: "kubeconfig".to_string(),
            message: format!(
                "must have at most {} [[kubeconfig]] entries, found {}",
                bounds::KUBECONFIG_ENTRIES,
                written.kubeconfig.len()
            ),
        });
    }
    let base = path.parent().unwrap_or(Path::new(""));
    let mut sources = Vec::new();
    for (index, entry) in written.kubeconfig.iter().enumerate() {
        let number = index + 1;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: entry
                .fields
                .get(key)
                .map_or_else(|| entry.origin.clone(), |value| value.origin.clone()),
            field: format!("kubeconfig entry {number}: {key}"),
            message,
        };
        let found = |key: &str| {
            entry
                .fields
                .get(key)
                .map(|value| value.text.as_str())
                .unwrap_or_default()
        };

        let kubeconfig_path = match entry.fields.get("path").map(|value| &value.value) {
            Some(Raw::Str(text))
                if !text.is_empty()
                    && text.len() <= bounds::PATH_LENGTH
                    && !text.contains('\0') =>
            {
                PathBuf::from(text)
            }
            Some(_) => {
                return Err(invalid(
                    "path",
                    format!(
                        "must be the path of a kubeconfig file (at most {} characters), found {}",
                        bounds::PATH_LENGTH,
                        found("path")
                    ),
                ));
            }
            None => {
                return Err(invalid(
                    "path",
                    "is missing; add path = \"...\" naming a kubeconfig file".to_string(),
                ));
            }
        };
        let kubeconfig_path = if kubeconfig_path.is_relative() {
            clean_path(&base.join(&kubeconfig_path))
        } else {
            kubeconfig_path
        };

        let contexts = match entry.fields.get("contexts").map(|value| &value.value) {
            None => None,
            Some(Raw::Array(items)) if items.is_empty() => {
                return Err(invalid(
                    "contexts",
                    "is empty, so it selects no cluster; remove the key to use all contexts"
                        .to_string(),
                ));
            }
            Some(Raw::Array(items)) => {
                let names: Vec<String> = items
                    .iter()
                    .filter_map(|item| match item {
                        Raw::Str(name)
                            if !name.is_empty()
                                && name.len() <= bounds::CONTEXT_NAME_LENGTH
                                && !name.chars().any(char::is_control) =>
                        {
                            Some(name.clone())
                        }
                        _ => None,
                    })
                    .collect();
                if names.len() != items.len() || names.len() > bounds::CONTEXTS_PER_ENTRY {
                    return Err(invalid(
                        "contexts",
                        format!(
                            "must be a list of at most {} context names, each of 1 to {} characters without control characters, found {}",
                            bounds::CONTEXTS_PER_ENTRY,
                            bounds::CONTEXT_NAME_LENGTH,
                            found("contexts")
                        ),
                    ));
                }
                Some(names)
            }
            Some(_) => {
                return Err(invalid(
                    "contexts",
                    format!(
                        "must be a list of context names such as [\"prod-1\", \"prod-2\"], found {}",
                        found("contexts")
                    ),
                ));
            }
        };

        let prefix = match entry.fields.get("name_prefix").map(|value| &value.value) {
            None => String::new(),
            Some(Raw::Str(text)) if name_prefix_ok(text) => text.clone(),
            Some(_) => {
                return Err(invalid(
                    "name_prefix",
                    format!(
                        "must be at most {} letters, digits, '-', '_' and '.', found {}",
                        bounds::NAME_PREFIX_LENGTH,
                        found("name_prefix")
                    ),
                ));
            }
        };
        sources.push(KubeconfigSource {
            path: kubeconfig_path,
            contexts,
            name_prefix: prefix,
        });
    }
    Ok(sources)
}

fn duration<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&shown(*value))
}

fn display<S: Serializer, T: fmt::Display>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Serializes the one test that changes the process environment with the
    /// tests that read it, so they never see each other's variables.
    static PROCESS_ENV: Mutex<()> = Mutex::new(());

    fn kubeconfig_yaml(contexts: &[&str]) -> String {
        let mut clusters = String::new();
        let mut named = String::new();
        let mut users = String::new();
        for (port, name) in (6443..).zip(contexts) {
            clusters.push_str(&format!(
                "- name: {name}\n  cluster:\n    server: https://127.0.0.1:{port}\n"
            ));
            named.push_str(&format!(
                "- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n"
            ));
            users.push_str(&format!("- name: {name}\n  user:\n    token: secret\n"));
        }
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n{clusters}contexts:\n{named}users:\n{users}"
        )
    }

    /// A temporary directory with `kube-prefetch.toml` holding `config`, and
    /// kubeconfig files (relative name, contexts).
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new(config: &str, kubeconfigs: &[(&str, &[&str])]) -> Fixture {
            let dir = tempfile::tempdir().expect("temp dir");
            for (name, contexts) in kubeconfigs {
                let path = dir.path().join(name);
                std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
                std::fs::write(path, kubeconfig_yaml(contexts)).expect("write kubeconfig");
            }
            std::fs::write(dir.path().join("kube-prefetch.toml"), config).expect("write config");
            Fixture { dir }
        }

        fn config_path(&self) -> PathBuf {
            self.dir.path().join("kube-prefetch.toml")
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn load(&self) -> Result<Config, ConfigError> {
            self.load_env(&[])
        }

        fn load_env(&self, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
            let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
            load_with_env(&self.config_path(), env)
        }

        fn error(&self) -> String {
            self.load()
                .expect_err("config should be rejected")
                .to_string()
        }
    }

    const MINIMAL: &str = "[[kubeconfig]]\npath = \"kubeconfig\"\n";

    fn minimal() -> Fixture {
        Fixture::new(MINIMAL, &[("kubeconfig", &["a", "b"])])
    }

    /// A valid config with `line` added to `section`.
    fn with(section: &str, line: &str) -> Fixture {
        Fixture::new(
            &format!("{section}\n{line}\n\n{MINIMAL}"),
            &[("kubeconfig", &["a", "b"])],
        )
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = minimal().load().expect("minimal config loads");
        let defaults = Config {
            kubeconfig: config.kubeconfig.clone(),
            ..Config::default()
        };
        assert_eq!(config, defaults);

        assert_eq!(config.server.listen, "0.0.0.0:8080".parse().expect("addr"));
        let d = &config.defaults;
        assert_eq!(d.retry_after, Duration::from_secs(300));
        assert_eq!(d.pull_timeout, Duration::from_secs(600));
        assert_eq!(
            (
                d.max_parallel_per_node,
                d.max_parallel_per_prefetch,
                d.max_parallel_per_cluster
            ),
            (1, 10, 50)
        );
        assert_eq!(d.api_qps, 20.0);
        assert_eq!(d.status_debounce, Duration::from_secs(1));
        let b = &config.backoff;
        assert_eq!(
            (b.initial, b.max, b.multiplier, b.max_attempts),
            (Duration::from_secs(2), Duration::from_secs(300), 2.0, 5)
        );
        let p = &config.policy;
        assert!(!p.cross_namespace && !p.tolerate_all_taints);
        assert_eq!(
            p.helper_image,
            "ghcr.io/kube-prefetch/kube-prefetch-noop:0.1.0"
        );
        assert_eq!(p.priority_class, None);
        assert_eq!(
            config.leader_election,
            LeaderElection {
                enabled: false,
                namespace: "kube-prefetch".into(),
                lease_name: "kube-prefetch".into()
            }
        );
    }

    #[test]
    fn full_file_round_trip() {
        let text = r#"
[server]
listen = "127.0.0.1:9090"

[defaults]
retry_after = "90s"
pull_timeout = 120
max_parallel_per_node = 2
max_parallel_per_prefetch = 5
max_parallel_per_cluster = 20
api_qps = 7.5
status_debounce = "250ms"

[backoff]
initial = "1s"
max = "1h 30m"
multiplier = 1.5
max_attempts = 3

[policy]
cross_namespace = true
tolerate_all_taints = true
pull_method = "direct"
helper_image = "registry.local/noop:1"
priority_class = "low"

[[kubeconfig]]
path = "kubeconfigs/one.yaml"
contexts = ["b", "a"]
name_prefix = "one-"

[[kubeconfig]]
path = "two.yaml"

[leader_election]
enabled = true
namespace = "ops"
lease_name = "prefetch"
"#;
        let fixture = Fixture::new(
            text,
            &[
                ("kubeconfigs/one.yaml", &["a", "b", "c"]),
                ("two.yaml", &["x"]),
            ],
        );
        let config = fixture.load().expect("full config loads");
        let expected = Config {
            server: ServerConfig {
                listen: "127.0.0.1:9090".parse().expect("addr"),
            },
            defaults: Defaults {
                retry_after: Duration::from_secs(90),
                pull_timeout: Duration::from_secs(120),
                max_parallel_per_node: 2,
                max_parallel_per_prefetch: 5,
                max_parallel_per_cluster: 20,
                max_pairs_per_prefetch: 50_000,
                max_pairs_per_cluster: 200_000,
                api_qps: 7.5,
                status_debounce: Duration::from_millis(250),
            },
            backoff: BackoffConfig {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(5400),
                multiplier: 1.5,
                max_attempts: 3,
            },
            policy: Policy {
                cross_namespace: true,
                tolerate_all_taints: true,
                pull_method: PullMethod::Direct,
                helper_image: "registry.local/noop:1".into(),
                priority_class: Some("low".into()),
            },
            kubeconfig: vec![
                KubeconfigSource {
                    path: fixture.path("kubeconfigs/one.yaml"),
                    contexts: Some(vec!["b".into(), "a".into()]),
                    name_prefix: "one-".into(),
                },
                KubeconfigSource {
                    path: fixture.path("two.yaml"),
                    contexts: None,
                    name_prefix: String::new(),
                },
            ],
            leader_election: LeaderElection {
                enabled: true,
                namespace: "ops".into(),
                lease_name: "prefetch".into(),
            },
        };
        assert_eq!(config, expected);

        // What we write back reads the same (durations as humantime strings).
        let written = toml::to_string(&config).expect("serialize");
        let again = parse_str(&written, &fixture.config_path()).expect("reparse");
        assert_eq!(again, config);

        // An environment layer that changes nothing leaves everything as is.
        let unchanged = fixture
            .load_env(&[("KUBE_PREFETCH__LEADER_ELECTION__LEASE_NAME", "prefetch")])
            .expect("loads with env");
        assert_eq!(unchanged, config);

        let clusters = resolve_clusters(&config).expect("clusters resolve");
        let names: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["one-a", "one-b", "x"]);
        assert_eq!(
            clusters[0],
            ClusterTarget {
                name: "one-a".into(),
                kubeconfig: fixture.path("kubeconfigs/one.yaml"),
                context: "a".into(),
            }
        );
    }

    #[test]
    fn all_contexts_are_used_by_default_and_sorted() {
        let fixture = Fixture::new(MINIMAL, &[("kubeconfig", &["zeta", "alpha", "mid"])]);
        let config = fixture.load().expect("loads");
        let clusters = resolve_clusters(&config).expect("resolves");
        let names: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["alpha", "mid", "zeta"]);
        assert!(
            clusters
                .iter()
                .all(|c| c.kubeconfig == fixture.path("kubeconfig"))
        );
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_directory() {
        let config = parse_str(
            "[[kubeconfig]]\npath = \"../clusters/sim/run/kubeconfig\"\n[[kubeconfig]]\npath = \"/abs/k\"\n",
            Path::new("config/kube-prefetch.toml"),
        )
        .expect("parses");
        assert_eq!(
            config.kubeconfig[0].path,
            Path::new("clusters/sim/run/kubeconfig")
        );
        assert_eq!(config.kubeconfig[1].path, Path::new("/abs/k"));

        let bare = parse_str(MINIMAL, Path::new("kube-prefetch.toml")).expect("parses");
        assert_eq!(bare.kubeconfig[0].path, Path::new("kubeconfig"));
        let up = parse_str(
            "[[kubeconfig]]\npath = \"../k\"\n",
            Path::new("/etc/kp/kube-prefetch.toml"),
        )
        .expect("parses");
        assert_eq!(up.kubeconfig[0].path, Path::new("/etc/k"));
    }

    #[test]
    fn durations_accept_humantime_and_whole_seconds() {
        for (text, expected) in [
            ("\"90s\"", 90),
            ("\"5m\"", 300),
            ("\"1h 30m\"", 5400),
            ("45", 45),
            ("\"45\"", 45),
        ] {
            let config = with("[defaults]", &format!("retry_after = {text}"))
                .load()
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                config.defaults.retry_after,
                Duration::from_secs(expected),
                "{text}"
            );
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nope.toml");
        let error = load(&path).expect_err("missing file").to_string();
        assert!(error.starts_with("cannot read config file "), "{error}");
        assert!(error.contains(&*path.to_string_lossy()), "{error}");
    }

    #[test]
    fn unknown_field_has_file_line_and_column() {
        let text = "[server]\nlisten = \"0.0.0.0:8080\"\n\n[defaults]\npull_timeout = \"60s\"\n\nretry_afterr = \"60s\"\n";
        let error = parse_str(text, Path::new("config/x.toml")).expect_err("typo");
        match &error {
            ConfigError::Parse { line, column, .. } => {
                assert_eq!((*line, *column), (Some(7), Some(1)));
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert_eq!(
            error.to_string(),
            "config/x.toml:7:1: unknown key \"retry_afterr\" in [defaults]; its keys are retry_after, pull_timeout, max_parallel_per_node, max_parallel_per_prefetch, max_parallel_per_cluster, max_pairs_per_prefetch, max_pairs_per_cluster, api_qps, status_debounce"
        );
    }

    #[test]
    fn unknown_section_and_kubeconfig_key_are_rejected() {
        let error = parse_str("[sever]\nlisten = \"x\"\n", Path::new("c.toml"))
            .expect_err("unknown section")
            .to_string();
        assert_eq!(
            error,
            "c.toml:1:2: unknown section [sever]; sections are [server], [defaults], [backoff], [policy], [leader_election], [[kubeconfig]]"
        );

        let error = parse_str(
            "[[kubeconfig]]\npath = \"k\"\ncontext = [\"a\"]\n",
            Path::new("c.toml"),
        )
        .expect_err("unknown kubeconfig key")
        .to_string();
        assert_eq!(
            error,
            "c.toml:3:1: unknown key \"context\" in [[kubeconfig]]; its keys are path, contexts, name_prefix"
        );

        let error = parse_str(
            "[defaults]\nretry_after = 1\n\n[[kubeconfig]]\ncontexts = [\"a\"]\n",
            Path::new("c.toml"),
        )
        .expect_err("missing path")
        .to_string();
        assert_eq!(
            error,
            "c.toml:4:1: kubeconfig entry 1: path is missing; add path = \"...\" naming a kubeconfig file"
        );

        let error = parse_str("server = 5\n", Path::new("c.toml"))
            .expect_err("section as a value")
            .to_string();
        assert_eq!(
            error,
            "c.toml:1:1: server must be a table: write [server] with its keys on the lines below"
        );
    }

    #[test]
    fn duplicate_keys_and_other_toml_shapes() {
        let error = parse_str(
            "[defaults]\nretry_after = 1\nretry_after = 2\n[[kubeconfig]]\npath = \"k\"\n",
            Path::new("c.toml"),
        )
        .expect_err("duplicate key")
        .to_string();
        assert!(error.starts_with("c.toml:3:1: "), "{error}");
        // Dotted keys and inline tables are the same settings.
        let config = parse_str(
            "defaults.retry_after = \"2m\"\nserver = { listen = \"127.0.0.1:9\" }\nkubeconfig = [{ path = \"k\" }]\n",
            Path::new("c.toml"),
        )
        .expect("dotted and inline");
        assert_eq!(config.defaults.retry_after, Duration::from_secs(120));
        assert_eq!(config.server.listen.port(), 9);
        assert_eq!(config.kubeconfig.len(), 1);
    }

    #[test]
    fn single_bracket_kubeconfig_says_to_use_an_array_of_tables() {
        let error = parse_str("[kubeconfig]\npath = \"k\"\n", Path::new("c.toml"))
            .expect_err("[kubeconfig]")
            .to_string();
        assert_eq!(
            error,
            "c.toml:1:2: use [[kubeconfig]] (an array of tables), not [kubeconfig]: each [[kubeconfig]] entry names one kubeconfig file"
        );
    }

    #[test]
    fn syntax_and_type_errors_have_positions() {
        let error = parse_str("[server\nlisten = 1\n", Path::new("c.toml"))
            .expect_err("syntax")
            .to_string();
        assert!(error.starts_with("c.toml:1:"), "{error}");

        let cases = [
            (
                "[defaults]\nmax_parallel_per_node = \"two\"\n",
                "c.toml:2:25: defaults.max_parallel_per_node must be a whole number from 1 to 100, found \"two\"",
            ),
            (
                "[backoff]\nmultiplier = \"x\"\n",
                "c.toml:2:14: backoff.multiplier must be a number from 1 to 10, found \"x\"",
            ),
            (
                "[server]\nlisten = \"localhost\"\n",
                "c.toml:2:10: server.listen must be an IP address and port such as \"0.0.0.0:8080\" or \"[::]:8080\", found \"localhost\"",
            ),
            (
                "[defaults]\n# comment\nretry_after = \"5 parsecs\"\n",
                "c.toml:3:15: defaults.retry_after must be a duration from 1s to 30days, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found \"5 parsecs\"",
            ),
            (
                "[defaults]\npull_timeout = -5\n",
                "c.toml:2:16: defaults.pull_timeout must be a duration from 1s to 1day, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found -5",
            ),
            (
                "[policy]\ncross_namespace = \"true\"\n",
                "c.toml:2:19: policy.cross_namespace must be true or false, found \"true\"; write it without quotes",
            ),
            (
                "[leader_election]\nlease_name = 42\n",
                "c.toml:2:14: leader_election.lease_name must be a quoted string, found 42",
            ),
        ];
        for (text, expected) in cases {
            let text = format!("{text}{MINIMAL}");
            let error = parse_str(&text, Path::new("c.toml"))
                .expect_err(expected)
                .to_string();
            assert_eq!(error, expected);
        }
    }

    #[test]
    fn columns_count_characters() {
        assert_eq!(line_column("ab\ncé", 4), (2, 2));
        assert_eq!(line_column("ab\ncéx", 6), (2, 3));
        assert_eq!(line_column("", 10), (1, 1));
    }

    /// Every range error names the file, line and column of the value, what
    /// is expected and what was found.
    #[test]
    fn range_errors_name_the_line() {
        let cases = [
            (
                "[defaults]",
                "pull_timeout = 0",
                "defaults.pull_timeout must be a duration from 1s to 1day, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found 0",
            ),
            (
                "[defaults]",
                "pull_timeout = \"500ms\"",
                "defaults.pull_timeout must be a duration from 1s to 1day, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found \"500ms\"",
            ),
            (
                "[defaults]",
                "retry_after = 0",
                "defaults.retry_after must be a duration from 1s to 30days, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found 0",
            ),
            (
                "[defaults]",
                "max_parallel_per_node = 0",
                "defaults.max_parallel_per_node must be a whole number from 1 to 100, found 0",
            ),
            (
                "[defaults]",
                "max_parallel_per_prefetch = 0",
                "defaults.max_parallel_per_prefetch must be a whole number from 1 to 10000, found 0",
            ),
            (
                "[defaults]",
                "max_parallel_per_cluster = 10001",
                "defaults.max_parallel_per_cluster must be a whole number from 1 to 10000, found 10001",
            ),
            (
                "[defaults]",
                "api_qps = nan",
                "defaults.api_qps must be a number from 0.1 to 10000 requests per second, found nan",
            ),
            (
                "[backoff]",
                "initial = 0",
                "backoff.initial must be a duration from 10ms to 1h, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found 0",
            ),
            (
                "[backoff]",
                "initial = \"10m\"",
                "backoff.initial must keep backoff.initial (10m) at most backoff.max (5m)",
            ),
            (
                "[backoff]",
                "multiplier = 0.5",
                "backoff.multiplier must be a number from 1 to 10, found 0.5",
            ),
            (
                "[backoff]",
                "max_attempts = 0",
                "backoff.max_attempts must be a whole number from 1 to 100, found 0",
            ),
            (
                "[policy]",
                "helper_image = \"\"",
                "policy.helper_image must be an image reference of at most 4096 characters such as \"ghcr.io/kube-prefetch/kube-prefetch-noop:0.1.0\" (empty reference), found \"\"",
            ),
            (
                "[policy]",
                "priority_class = \" \"",
                "policy.priority_class must be the name of a PriorityClass, a DNS-1123 subdomain: at most 253 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit (remove the key to use none), found \" \"",
            ),
            (
                "[leader_election]",
                "lease_name = \"\"",
                "leader_election.lease_name must be a Lease name, a DNS-1123 subdomain: at most 253 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, found \"\"",
            ),
        ];
        for (section, line, expected) in cases {
            let fixture = with(section, line);
            let column = line.find('=').expect("key = value") + 3;
            let expected = format!("{}:2:{column}: {expected}", fixture.config_path().display());
            assert_eq!(fixture.error(), expected, "{line}");
        }
    }

    #[test]
    fn tiny_or_zero_api_qps_is_refused() {
        for value in ["1e-20", "0", "-1.5", "inf"] {
            let error = parse_str(
                &format!("[defaults]\napi_qps = {value}\n{MINIMAL}"),
                Path::new("c.toml"),
            )
            .expect_err(value)
            .to_string();
            assert_eq!(
                error,
                format!(
                    "c.toml:2:11: defaults.api_qps must be a number from 0.1 to 10000 requests per second, found {value}"
                )
            );
        }
        let config = parse_str(
            &format!("[defaults]\napi_qps = 0.1\n{MINIMAL}"),
            Path::new("c.toml"),
        )
        .expect("0.1 is the least rate");
        assert_eq!(config.defaults.api_qps, 0.1);
    }

    #[test]
    fn huge_durations_are_refused() {
        let cases = [
            (
                "[defaults]\npull_timeout = \"10000000000000h\"\n",
                "c.toml:2:16: defaults.pull_timeout must be a duration from 1s to 1day, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found \"10000000000000h\"",
            ),
            (
                // Above i64::MAX: once silently turned into the default.
                "[defaults]\npull_timeout = 9223372036854775808\n",
                "c.toml:2:16: defaults.pull_timeout must be a duration from 1s to 1day, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found 9223372036854775808",
            ),
            (
                "[defaults]\nstatus_debounce = \"100y\"\n",
                "c.toml:2:19: defaults.status_debounce must be a duration from 0s to 1m, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found \"100y\"",
            ),
            (
                "[backoff]\nmax = \"1000000d\"\n",
                "c.toml:2:7: backoff.max must be a duration from 1s to 1day, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found \"1000000d\"",
            ),
            (
                "[backoff]\nmax = \"99999999999999999999999s\"\n",
                "c.toml:2:7: backoff.max must be a duration from 1s to 1day, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found \"99999999999999999999999s\"",
            ),
        ];
        for (text, expected) in cases {
            let error = parse_str(&format!("{text}{MINIMAL}"), Path::new("c.toml"))
                .expect_err(expected)
                .to_string();
            assert_eq!(error, expected);
        }
    }

    #[test]
    fn whole_numbers_out_of_type_name_no_rust_type() {
        let cases = [
            (
                "-1",
                "c.toml:2:25: defaults.max_parallel_per_node must be a whole number from 1 to 100, found -1",
            ),
            (
                "99999999999999999999",
                "c.toml:2:25: defaults.max_parallel_per_node must be a whole number from 1 to 100, found 99999999999999999999",
            ),
            (
                "999999999999999999999999999999999999999999",
                "c.toml:2:25: defaults.max_parallel_per_node must be a whole number from 1 to 100, found 999999999999999999999999999999999999999999",
            ),
            (
                "1.4",
                "c.toml:2:25: defaults.max_parallel_per_node must be a whole number from 1 to 100, found 1.4",
            ),
            (
                "true",
                "c.toml:2:25: defaults.max_parallel_per_node must be a whole number from 1 to 100, found true",
            ),
            (
                "[1]",
                "c.toml:2:25: defaults.max_parallel_per_node must be a whole number from 1 to 100, found [1]",
            ),
        ];
        for (value, expected) in cases {
            let error = parse_str(
                &format!("[defaults]\nmax_parallel_per_node = {value}\n{MINIMAL}"),
                Path::new("c.toml"),
            )
            .expect_err(value)
            .to_string();
            assert_eq!(error, expected);
            for rust in ["i128", "u64", "usize", "i64", "f64"] {
                assert!(!error.contains(rust), "{error}");
            }
        }
    }

    #[test]
    fn names_sent_to_the_api_server_are_checked() {
        let fixture = with("[leader_election]", "namespace = \"Kube_Prefetch\"");
        assert_eq!(
            fixture.error(),
            format!(
                "{}:2:13: leader_election.namespace must be a namespace name, a DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit, found \"Kube_Prefetch\"",
                fixture.config_path().display()
            )
        );
        let fixture = with("[policy]", "helper_image = \"Not An Image\"");
        assert_eq!(
            fixture.error(),
            format!(
                "{}:2:16: policy.helper_image must be an image reference of at most 4096 characters such as \"ghcr.io/kube-prefetch/kube-prefetch-noop:0.1.0\" (contains whitespace or control characters), found \"Not An Image\"",
                fixture.config_path().display()
            )
        );
    }

    #[test]
    fn name_prefix_with_a_newline_is_refused() {
        for value in [
            "\"a\\nb\"",
            "\"prod/\"",
            "\"x y\"",
            &format!("\"{}\"", "p".repeat(64)),
        ] {
            let error = parse_str(
                &format!("[[kubeconfig]]\npath = \"k\"\nname_prefix = {value}\n"),
                Path::new("c.toml"),
            )
            .expect_err(value)
            .to_string();
            assert_eq!(
                error,
                format!(
                    "c.toml:3:15: kubeconfig entry 1: name_prefix must be at most 63 letters, digits, '-', '_' and '.', found {value}"
                )
            );
        }
        let error = parse_str(
            "[[kubeconfig]]\npath = \"k\"\ncontexts = [\"a\", \"\"]\n",
            Path::new("c.toml"),
        )
        .expect_err("empty context")
        .to_string();
        assert_eq!(
            error,
            "c.toml:3:12: kubeconfig entry 1: contexts must be a list of at most 1000 context names, each of 1 to 253 characters without control characters, found [\"a\", \"\"]"
        );
    }

    #[test]
    fn pull_method_is_one_of_its_names() {
        let error = parse_str(
            &format!("[policy]\npull_method = \"fast\"\n{MINIMAL}"),
            Path::new("c.toml"),
        )
        .expect_err("unknown method")
        .to_string();
        assert_eq!(
            error,
            "c.toml:2:15: policy.pull_method must be one of \"helper\", \"direct\", found \"fast\""
        );
        let config = minimal()
            .load_env(&[("KUBE_PREFETCH__POLICY__PULL_METHOD", "direct")])
            .expect("direct from the environment");
        assert_eq!(config.policy.pull_method, PullMethod::Direct);
        let error = minimal()
            .load_env(&[("KUBE_PREFETCH__POLICY__PULL_METHOD", "Direct")])
            .expect_err("names are lowercase")
            .to_string();
        assert_eq!(
            error,
            "environment variable KUBE_PREFETCH__POLICY__PULL_METHOD=\"Direct\": policy.pull_method must be one of \"helper\", \"direct\", found \"Direct\""
        );
    }

    #[test]
    fn long_values_are_shown_cut_short() {
        let contexts: Vec<String> = (0..1001).map(|i| format!("\"c{i}\"")).collect();
        let error = parse_str(
            &format!(
                "[[kubeconfig]]\npath = \"k\"\ncontexts = [{}]\n",
                contexts.join(", ")
            ),
            Path::new("c.toml"),
        )
        .expect_err("too many contexts")
        .to_string();
        let shown: String = format!("[{}", contexts.join(", "))
            .chars()
            .take(120)
            .collect();
        assert_eq!(
            error,
            format!(
                "c.toml:3:12: kubeconfig entry 1: contexts must be a list of at most 1000 context names, each of 1 to 253 characters without control characters, found {shown}..."
            )
        );
    }

    #[test]
    fn every_setting_is_validated() {
        let written = WrittenConfig::default();
        let path = Path::new("c.toml");
        let reader = Reader::new(path, &written.settings);
        // Fails only for the missing [[kubeconfig]], after every setting.
        assert!(matches!(
            validate_with(&reader, &written, path),
            Err(ConfigError::NoKubeconfig { .. })
        ));
        let expected: BTreeSet<String> = SETTINGS
            .iter()
            .flat_map(|(section, keys)| keys.iter().map(move |key| format!("{section}.{key}")))
            .collect();
        assert_eq!(*reader.read.borrow(), expected);
        for key in TEXT_SETTINGS {
            assert!(expected.contains(*key), "{key}");
        }
    }

    #[test]
    fn at_least_one_kubeconfig_is_required() {
        let fixture = Fixture::new("[server]\nlisten = \"127.0.0.1:1\"\n", &[]);
        let error = fixture.error();
        assert!(
            error.contains("no [[kubeconfig]] entry; add at least one"),
            "{error}"
        );
        assert!(
            error.contains(&*fixture.config_path().to_string_lossy()),
            "{error}"
        );
    }

    #[test]
    fn empty_context_list_is_rejected() {
        let fixture = Fixture::new(
            "[[kubeconfig]]\npath = \"kubeconfig\"\ncontexts = []\n",
            &[("kubeconfig", &["a"])],
        );
        let error = fixture.error();
        assert!(
            error.contains("contexts is empty, so it selects no cluster"),
            "{error}"
        );
    }

    #[test]
    fn missing_kubeconfig_names_the_path() {
        let fixture = Fixture::new("[[kubeconfig]]\npath = \"missing/kubeconfig\"\n", &[]);
        let error = fixture.error();
        let expected = format!(
            "kubeconfig {} (named at {}:2:8) does not exist",
            fixture.path("missing/kubeconfig").display(),
            fixture.config_path().display()
        );
        assert!(error.starts_with(&expected), "{error}");
    }

    #[test]
    fn unparsable_kubeconfig_names_the_path() {
        let fixture = Fixture::new(MINIMAL, &[]);
        std::fs::write(fixture.path("kubeconfig"), "contexts: [[[\n").expect("write");
        let error = fixture.error();
        let expected = format!(
            "cannot load kubeconfig {}",
            fixture.path("kubeconfig").display()
        );
        assert!(error.starts_with(&expected), "{error}");
    }

    #[test]
    fn kubeconfig_without_contexts_is_rejected() {
        let fixture = Fixture::new(MINIMAL, &[("kubeconfig", &[])]);
        let error = fixture.error();
        assert!(error.contains("has no contexts"), "{error}");
    }

    #[test]
    fn unknown_context_names_the_config_file_and_entry() {
        let fixture = Fixture::new(
            "[[kubeconfig]]\npath = \"one\"\n\n[[kubeconfig]]\npath = \"../clusters/sim/run/kubeconfig\"\ncontexts = [\"sim-1\", \"sim-9\"]\n",
            &[
                ("config/one", &["a"]),
                ("clusters/sim/run/kubeconfig", &["sim-1", "sim-2", "sim-3"]),
            ],
        );
        // The config file lives in a subdirectory, like config/kube-prefetch.toml.
        let config_dir = fixture.path("config");
        std::fs::create_dir_all(&config_dir).expect("mkdir");
        let config_path = config_dir.join("kube-prefetch.toml");
        std::fs::rename(fixture.config_path(), &config_path).expect("move config");

        let error = load_with_env(&config_path, Vec::new())
            .expect_err("unknown context")
            .to_string();
        let expected = format!(
            "{}:6:12: kubeconfig entry 2: unknown context \"sim-9\" in kubeconfig {} (it has: sim-1, sim-2, sim-3)",
            config_path.display(),
            fixture.path("clusters/sim/run/kubeconfig").display()
        );
        assert_eq!(error, expected);
    }

    #[test]
    fn duplicate_cluster_names_name_both_sources() {
        let fixture = Fixture::new(
            "[[kubeconfig]]\npath = \"one\"\n\n[[kubeconfig]]\npath = \"two\"\ncontexts = [\"b\"]\n",
            &[("one", &["a", "b"]), ("two", &["b", "c"])],
        );
        let error = fixture.error();
        let expected = format!(
            "{}:4:1: kubeconfig entry 2: cluster name \"b\" is used twice: by context \"b\" of kubeconfig {} and by context \"b\" of kubeconfig {}; give one [[kubeconfig]] entry a distinct name_prefix or list each context once",
            fixture.config_path().display(),
            fixture.path("one").display(),
            fixture.path("two").display()
        );
        assert_eq!(error, expected);

        // A prefix makes them distinct.
        let fixed = Fixture::new(
            "[[kubeconfig]]\npath = \"one\"\n\n[[kubeconfig]]\npath = \"two\"\nname_prefix = \"two-\"\n",
            &[("one", &["a", "b"]), ("two", &["b", "c"])],
        );
        let config = fixed.load().expect("loads");
        let names: Vec<String> = resolve_clusters(&config)
            .expect("resolves")
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["a", "b", "two-b", "two-c"]);

        // The same context listed twice is a duplicate too.
        let twice = Fixture::new(
            "[[kubeconfig]]\npath = \"one\"\ncontexts = [\"a\", \"a\"]\n",
            &[("one", &["a"])],
        );
        assert!(
            twice
                .error()
                .contains(": kubeconfig entry 1: cluster name \"a\" is used twice"),
            "{}",
            twice.error()
        );
    }

    #[test]
    fn resolve_clusters_reports_missing_kubeconfig_without_config_path() {
        let config = parse_str(
            "[[kubeconfig]]\npath = \"/nonexistent/kube-prefetch/kubeconfig\"\n",
            Path::new("c.toml"),
        )
        .expect("parses");
        let error = resolve_clusters(&config).expect_err("missing").to_string();
        assert!(
            error.starts_with("kubeconfig /nonexistent/kube-prefetch/kubeconfig does not exist;"),
            "{error}"
        );
    }

    #[test]
    fn env_overrides_apply_with_typed_values() {
        let config = minimal()
            .load_env(&[
                ("KUBE_PREFETCH__SERVER__LISTEN", "127.0.0.1:9000"),
                ("KUBE_PREFETCH__DEFAULTS__MAX_PARALLEL_PER_NODE", "2"),
                ("KUBE_PREFETCH__POLICY__CROSS_NAMESPACE", "true"),
                ("KUBE_PREFETCH__DEFAULTS__RETRY_AFTER", "90s"),
                ("KUBE_PREFETCH__DEFAULTS__PULL_TIMEOUT", "120"),
                ("KUBE_PREFETCH__DEFAULTS__API_QPS", "5"),
                ("KUBE_PREFETCH__BACKOFF__MULTIPLIER", "1.5"),
                ("KUBE_PREFETCH__POLICY__PRIORITY_CLASS", "low"),
                // A numeric-looking string still lands in a string field.
                ("KUBE_PREFETCH__LEADER_ELECTION__LEASE_NAME", "42"),
                // Not ours: ignored.
                ("KUBE_PREFETCHER", "x"),
                ("HOME", "/root"),
            ])
            .expect("overrides apply");
        assert_eq!(
            config.server.listen,
            "127.0.0.1:9000".parse().expect("addr")
        );
        assert_eq!(config.defaults.max_parallel_per_node, 2);
        assert!(config.policy.cross_namespace);
        assert_eq!(config.defaults.retry_after, Duration::from_secs(90));
        assert_eq!(config.defaults.pull_timeout, Duration::from_secs(120));
        assert_eq!(config.defaults.api_qps, 5.0);
        assert_eq!(config.backoff.multiplier, 1.5);
        assert_eq!(config.policy.priority_class.as_deref(), Some("low"));
        assert_eq!(config.leader_election.lease_name, "42");
        // Untouched values keep the file's (here: default) values.
        assert_eq!(config.defaults.max_parallel_per_cluster, 50);
        assert_eq!(config.kubeconfig.len(), 1);
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let fixture = with("[defaults]", "max_parallel_per_cluster = 7");
        let config = fixture
            .load_env(&[("KUBE_PREFETCH__DEFAULTS__MAX_PARALLEL_PER_CLUSTER", "9")])
            .expect("loads");
        assert_eq!(config.defaults.max_parallel_per_cluster, 9);
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let cases = [
            (
                "KUBE_PREFETCH__DEFAULTS__MAX_PARALLEL_PER_NODE",
                "two",
                "defaults.max_parallel_per_node must be a whole number from 1 to 100, found \"two\"",
            ),
            (
                "KUBE_PREFETCH__SERVER__LISTEN",
                "localhost",
                "server.listen must be an IP address and port such as \"0.0.0.0:8080\" or \"[::]:8080\", found \"localhost\"",
            ),
            (
                "KUBE_PREFETCH__DEFAULTS__RETRY_AFTER",
                "soon",
                "defaults.retry_after must be a duration from 1s to 30days, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found \"soon\"",
            ),
            (
                "KUBE_PREFETCH__POLICY__CROSS_NAMESPACE",
                "maybe",
                "policy.cross_namespace must be true or false, found \"maybe\"",
            ),
        ];
        for (variable, value, expected) in cases {
            let error = minimal()
                .load_env(&[(variable, value)])
                .expect_err("bad value")
                .to_string();
            assert_eq!(
                error,
                format!("environment variable {variable}={value:?}: {expected}")
            );
        }
    }

    /// The environment follows the file's rules: what the file refuses, the
    /// variable refuses with the same words.
    #[test]
    fn env_values_follow_the_file_rules() {
        let cases = [
            (
                "KUBE_PREFETCH__DEFAULTS__MAX_PARALLEL_PER_NODE",
                "1.4",
                "defaults.max_parallel_per_node must be a whole number from 1 to 100, found 1.4",
            ),
            (
                "KUBE_PREFETCH__DEFAULTS__MAX_PARALLEL_PER_NODE",
                "99999999999999999999999",
                "defaults.max_parallel_per_node must be a whole number from 1 to 100, found 99999999999999999999999",
            ),
            (
                "KUBE_PREFETCH__DEFAULTS__MAX_PARALLEL_PER_CLUSTER",
                "-1",
                "defaults.max_parallel_per_cluster must be a whole number from 1 to 10000, found -1",
            ),
            (
                "KUBE_PREFETCH__POLICY__CROSS_NAMESPACE",
                "yes",
                "policy.cross_namespace must be true or false, found \"yes\"",
            ),
            (
                "KUBE_PREFETCH__LEADER_ELECTION__ENABLED",
                "1",
                "leader_election.enabled must be true or false, found 1",
            ),
            (
                "KUBE_PREFETCH__DEFAULTS__API_QPS",
                "1e-20",
                "defaults.api_qps must be a number from 0.1 to 10000 requests per second, found 1e-20",
            ),
            (
                "KUBE_PREFETCH__DEFAULTS__STATUS_DEBOUNCE",
                "100y",
                "defaults.status_debounce must be a duration from 0s to 1m, such as \"90s\", \"5m\" or \"1h 30m\", or a whole number of seconds, found \"100y\"",
            ),
            (
                "KUBE_PREFETCH__LEADER_ELECTION__NAMESPACE",
                "a\nb",
                "leader_election.namespace must be a namespace name, a DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit, found \"a\\nb\"",
            ),
        ];
        for (variable, value, expected) in cases {
            let error = minimal()
                .load_env(&[(variable, value)])
                .expect_err(value)
                .to_string();
            assert_eq!(
                error,
                format!("environment variable {variable}={value:?}: {expected}")
            );
        }
    }

    #[test]
    fn unknown_env_settings_name_the_variable() {
        let error = minimal()
            .load_env(&[("KUBE_PREFETCH__DEFAULTS__MAX_PARALEL_PER_NODE", "2")])
            .expect_err("typo")
            .to_string();
        assert!(
            error.starts_with("environment variable KUBE_PREFETCH__DEFAULTS__MAX_PARALEL_PER_NODE=\"2\": there is no setting defaults.max_paralel_per_node"),
            "{error}"
        );
        assert!(
            error.contains("KUBE_PREFETCH__DEFAULTS__MAX_PARALLEL_PER_NODE"),
            "{error}"
        );

        let error = minimal()
            .load_env(&[("KUBE_PREFETCH__SERVR__LISTEN", "x")])
            .expect_err("typo")
            .to_string();
        assert!(error.contains("there is no section [servr]"), "{error}");

        let error = minimal()
            .load_env(&[("KUBE_PREFETCH__KUBECONFIG__PATH", "/k")])
            .expect_err("kubeconfig")
            .to_string();
        assert!(
            error.contains("cannot be set from the environment"),
            "{error}"
        );

        let error = minimal()
            .load_env(&[("KUBE_PREFETCH__LISTEN", "x")])
            .expect_err("no section")
            .to_string();
        assert!(error.contains("KUBE_PREFETCH__SECTION__KEY"), "{error}");
    }

    #[test]
    fn env_values_are_validated_and_blamed() {
        let fixture = with("[defaults]", "max_parallel_per_node = 2");
        let error = fixture
            .load_env(&[("KUBE_PREFETCH__DEFAULTS__MAX_PARALLEL_PER_NODE", "0")])
            .expect_err("zero")
            .to_string();
        assert_eq!(
            error,
            "environment variable KUBE_PREFETCH__DEFAULTS__MAX_PARALLEL_PER_NODE=\"0\": defaults.max_parallel_per_node must be a whole number from 1 to 100, found 0"
        );
    }

    #[test]
    fn process_environment_is_read_by_load() {
        let _guard = PROCESS_ENV
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let fixture = minimal();
        let variable = "KUBE_PREFETCH__BACKOFF__MAX_ATTEMPTS";
        // SAFETY: Rust 2024 marks set_var unsafe because another thread may
        // read the environment through libc at the same time. The tests of
        // this module read it only through std (which locks) while holding
        // PROCESS_ENV, and nothing else in this test binary calls getenv.
        unsafe { std::env::set_var(variable, "9") };
        let loaded = load(&fixture.config_path());
        unsafe { std::env::remove_var(variable) };
        assert_eq!(loaded.expect("loads").backoff.max_attempts, 9);
    }

    fn repo_file(relative: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
    }

    #[test]
    fn example_config_documents_the_defaults() {
        let origin = repo_file("config/example.toml");
        let text = std::fs::read_to_string(&origin).expect("read example");
        let config = parse_str(&text, &origin).expect("example parses");
        // Every value in the example is the default, except the [[kubeconfig]]
        // entries, which only exist in a real deployment.
        assert_eq!(
            config,
            Config {
                kubeconfig: config.kubeconfig.clone(),
                ..Config::default()
            }
        );
        assert_eq!(
            config.kubeconfig,
            vec![
                KubeconfigSource {
                    path: "/etc/kube-prefetch/kubeconfigs/production.yaml".into(),
                    contexts: Some(vec!["prod-eu-1".into(), "prod-us-1".into()]),
                    name_prefix: String::new(),
                },
                KubeconfigSource {
                    path: "/etc/kube-prefetch/kubeconfigs/staging.yaml".into(),
                    contexts: None,
                    name_prefix: "staging-".into(),
                },
            ]
        );
        // The commented-out option is spelled right.
        let uncommented = text.replace("# priority_class = ", "priority_class = ");
        let config = parse_str(&uncommented, &origin).expect("priority_class parses");
        assert_eq!(
            config.policy.priority_class.as_deref(),
            Some("kube-prefetch-low")
        );
    }

    #[test]
    fn deploy_configmap_holds_a_valid_config() {
        let manifest = std::fs::read_to_string(repo_file("deploy/central/configmap.yaml"))
            .expect("read configmap");
        let configmap: serde_json::Value =
            serde_saphyr::from_str(&manifest).expect("configmap is YAML");
        let text = configmap["data"]["kube-prefetch.toml"]
            .as_str()
            .expect("data.kube-prefetch.toml");
        // Where the Deployment mounts it.
        let origin = Path::new("/etc/kube-prefetch/kube-prefetch.toml");
        let config = parse_str(text, origin).expect("embedded config is valid");
        assert!(!config.kubeconfig.is_empty());
        for source in &config.kubeconfig {
            assert!(
                source.path.starts_with("/etc/kube-prefetch/kubeconfigs/"),
                "{} is outside the Secret's mount",
                source.path.display()
            );
        }
        assert_eq!(
            config.server.listen.port(),
            8080,
            "the probes use port 8080"
        );
    }

    #[test]
    fn demo_config_loads_against_the_sim_kubeconfig() {
        let origin = repo_file("config/kube-prefetch.toml");
        let text = std::fs::read_to_string(&origin).expect("read demo config");

        // Lay the demo out as in the repository, with a stand-in for the
        // kubeconfig that clusters/sim writes when it runs.
        let fixture = Fixture::new(
            "",
            &[("clusters/sim/run/kubeconfig", &["sim-1", "sim-2", "sim-3"])],
        );
        let config_dir = fixture.path("config");
        std::fs::create_dir_all(&config_dir).expect("mkdir");
        let config_path = config_dir.join("kube-prefetch.toml");
        std::fs::write(&config_path, &text).expect("write config");

        let config = load_with_env(&config_path, Vec::new()).expect("demo config loads");
        assert_eq!(
            config.server.listen,
            "127.0.0.1:8080".parse().expect("addr")
        );
        assert!(!config.policy.cross_namespace);
        assert_eq!(config.policy.helper_image, DEFAULT_HELPER_IMAGE);
        let names: Vec<String> = resolve_clusters(&config)
            .expect("resolves")
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["sim-1", "sim-2", "sim-3"]);
        assert_eq!(
            config.kubeconfig[0].path,
            fixture.path("clusters/sim/run/kubeconfig")
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn all_keys() -> Vec<(&'static str, &'static str)> {
            SETTINGS
                .iter()
                .flat_map(|(section, keys)| keys.iter().map(move |key| (*section, *key)))
                .collect()
        }

        /// Values as people write them in TOML, right or wrong.
        fn toml_value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                (0u64..200).prop_map(|n| n.to_string()),
                "-?[0-9]{15,45}",
                any::<f64>().prop_map(|f| format!("{f:?}")),
                prop::sample::select(vec!["nan", "-inf", "inf", "1e-20", "0.1", "1e300", "-0.0"])
                    .prop_map(str::to_string),
                any::<bool>().prop_map(|b| b.to_string()),
                "\"[ -~]{0,20}\"",
                "\"[0-9]{1,25} ?(ns|ms|s|m|h|d|w|y|days|years)?\"",
                "\"[a-z0-9.-]{0,12}(:[0-9]{1,6})?\"",
                "\\[[0-9, \"a-z]{0,12}\\]",
                prop::sample::select(vec!["{ a = 1 }", "1979-05-27T07:32:00Z", "''", "'\\n'"])
                    .prop_map(str::to_string),
            ]
        }

        /// Every value that validation lets through is within its bounds.
        fn assert_in_bounds(config: &Config) -> Result<(), TestCaseError> {
            use bounds::*;
            let d = &config.defaults;
            prop_assert!(RETRY_AFTER.contains(&d.retry_after));
            prop_assert!(PULL_TIMEOUT.contains(&d.pull_timeout));
            prop_assert!(MAX_PARALLEL_PER_NODE.contains(&(d.max_parallel_per_node as u64)));
            prop_assert!(MAX_PARALLEL_PER_PREFETCH.contains(&(d.max_parallel_per_prefetch as u64)));
            prop_assert!(MAX_PARALLEL_PER_CLUSTER.contains(&(d.max_parallel_per_cluster as u64)));
            prop_assert!(MAX_PAIRS_PER_PREFETCH.contains(&(d.max_pairs_per_prefetch as u64)));
            prop_assert!(MAX_PAIRS_PER_CLUSTER.contains(&(d.max_pairs_per_cluster as u64)));
            prop_assert!(API_QPS.contains(&d.api_qps));
            prop_assert!(STATUS_DEBOUNCE.contains(&d.status_debounce));
            let b = &config.backoff;
            prop_assert!(BACKOFF_INITIAL.contains(&b.initial));
            prop_assert!(BACKOFF_MAX.contains(&b.max));
            prop_assert!(b.initial <= b.max);
            prop_assert!(BACKOFF_MULTIPLIER.contains(&f64::from(b.multiplier)));
            prop_assert!(BACKOFF_MAX_ATTEMPTS.contains(&u64::from(b.max_attempts)));
            prop_assert!(names::dns_label(&config.leader_election.namespace).is_ok());
            prop_assert!(names::dns_subdomain(&config.leader_election.lease_name).is_ok());
            prop_assert!(crate::pull::image::normalize(&config.policy.helper_image).is_ok());
            for source in &config.kubeconfig {
                prop_assert!(name_prefix_ok(&source.name_prefix));
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_text_never_panics(text in any::<String>()) {
                let _ = parse_str(&text, Path::new("c.toml"));
            }

            /// Random values for real keys, in the file and the environment:
            /// no panic, what passes is in bounds, and no message names a
            /// Rust type.
            #[test]
            fn any_settings_are_refused_or_in_bounds(
                file in prop::collection::vec((any::<prop::sample::Index>(), toml_value()), 0..6),
                env in prop::collection::vec((any::<prop::sample::Index>(), "[ -~]{0,25}"), 0..3),
                prefix in prop::option::of(toml_value()),
            ) {
                let keys = all_keys();
                let mut by_section: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                for (index, value) in &file {
                    let (section, key) = keys[index.index(keys.len())];
                    by_section.entry(section).or_default().push(format!("{key} = {value}"));
                }
                let mut text = String::new();
                for (section, lines) in &by_section {
                    text.push_str(&format!("[{section}]\n{}\n", lines.join("\n")));
                }
                text.push_str(MINIMAL);
                if let Some(prefix) = &prefix {
                    text.push_str(&format!("name_prefix = {prefix}\n"));
                }
                let path = Path::new("c.toml");
                let variables: Vec<(String, String)> = env
                    .iter()
                    .map(|(index, value)| {
                        let (section, key) = keys[index.index(keys.len())];
                        (
                            format!("KUBE_PREFETCH__{}__{}", section.to_uppercase(), key.to_uppercase()),
                            value.clone(),
                        )
                    })
                    .collect();
                let outcome = read_file(&text, path).and_then(|mut written| {
                    written.settings.extend(env_overrides(variables.clone())?);
                    validate(&written, path)
                });
                match outcome {
                    Ok(config) => assert_in_bounds(&config)?,
                    Err(error) => {
                        let message = error.to_string();
                        let given = format!("{text}{variables:?}");
                        for rust in ["i128", "u64", "usize", "f64", "f32", "invalid type"] {
                            prop_assert!(
                                given.contains(rust) || !message.contains(rust),
                                "{}", message
                            );
                        }
                    }
                }
            }
        }
    }
}
