//! TOML configuration: strict parsing, env overrides, semantic checks.
//!
//! Loading happens in three steps, so that every mistake is reported where
//! the user can fix it:
//!
//! 1. The file is parsed strictly with the `toml` crate into structs that deny
//!    unknown fields: a typo fails with `file:line:column`.
//! 2. Environment overrides `KUBE_PREFETCH__SECTION__KEY=value` are layered on
//!    top with the `config` crate (values are strings and must parse into the
//!    typed field): a bad value fails naming the variable.
//! 3. Semantic checks: durations and caps in range, at least one
//!    `[[kubeconfig]]`, each kubeconfig readable, each listed context present,
//!    cluster names unique.
//!
//! [`parse_str`] runs steps 1 and 3 without touching the file system or the
//! environment (it skips the kubeconfig checks); the tests of the shipped
//! example use it, since its kubeconfig paths only exist in a real deployment.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(with = "socket_addr")]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Defaults {
    /// Re-verification period of a satisfied (node, image) pair.
    #[serde(with = "duration")]
    pub retry_after: Duration,
    /// Deadline of one pull pod.
    #[serde(with = "duration")]
    pub pull_timeout: Duration,
    /// In-flight pull pods per node; the kubelet pulls serially by default.
    pub max_parallel_per_node: usize,
    /// In-flight pull pods per `Prefetch`, unless its `max_parallel` says less.
    pub max_parallel_per_prefetch: usize,
    /// In-flight pull pods per cluster.
    pub max_parallel_per_cluster: usize,
    /// Client-side request rate to each API server, in requests per second.
    pub api_qps: f64,
    /// Status writes of one `Prefetch` are coalesced over this window.
    #[serde(with = "duration")]
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
            api_qps: 20.0,
            status_debounce: Duration::from_secs(1),
        }
    }
}

/// `[backoff]`: retries of a failed (node, image) pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    #[serde(with = "duration")]
    pub initial: Duration,
    #[serde(with = "duration")]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeconfigSource {
    /// After loading, relative paths are resolved against the directory of
    /// the config file (not the working directory).
    pub path: PathBuf,
    /// Contexts to use; `None` means all contexts of the file.
    #[serde(default)]
    pub contexts: Option<Vec<String>>,
    /// Prepended to each context name to form the cluster name, to keep names
    /// unique across files.
    #[serde(default)]
    pub name_prefix: String,
}

/// `[leader_election]`: for running more than one replica (the Lease lives
/// in the cluster the process runs in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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

/// Everything that can be wrong with a configuration. Each message says
/// where the problem is and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },

    /// The file is not valid TOML or does not fit the schema.
    #[error("{}: {message}", location(path, *line, *column))]
    Parse {
        path: PathBuf,
        /// 1-based; `None` when the parser could not point at a place.
        line: Option<usize>,
        /// 1-based, in characters.
        column: Option<usize>,
        message: String,
    },

    /// An environment override has an unknown name or a value that does not
    /// parse into its field.
    #[error("environment variable {variable}={value:?}: {message}")]
    Env {
        variable: String,
        value: String,
        message: String,
    },

    /// A value parses but is out of range or inconsistent.
    #[error("{}: {field} {message}", path.display())]
    Invalid {
        path: PathBuf,
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
        named_in(config.as_deref())
    )]
    KubeconfigMissing {
        path: PathBuf,
        /// The config file naming it, when known.
        config: Option<PathBuf>,
    },

    #[error("cannot load kubeconfig {}{}: {message}", path.display(), named_in(config.as_deref()))]
    KubeconfigInvalid {
        path: PathBuf,
        config: Option<PathBuf>,
        message: String,
    },

    #[error(
        "kubeconfig {} has no contexts, so it names no cluster; add a context or remove its [[kubeconfig]] entry",
        path.display()
    )]
    NoContexts { path: PathBuf },

    #[error(
        "unknown context {context:?} in kubeconfig {} (it has: {})",
        kubeconfig.display(),
        available.join(", ")
    )]
    UnknownContext {
        context: String,
        kubeconfig: PathBuf,
        available: Vec<String>,
    },

    #[error(
        "cluster name {name:?} is used twice: by context {first_context:?} of kubeconfig {} and by context {second_context:?} of kubeconfig {}; give one [[kubeconfig]] entry a distinct name_prefix or list each context once",
        first_kubeconfig.display(),
        second_kubeconfig.display()
    )]
    DuplicateCluster {
        name: String,
        first_kubeconfig: PathBuf,
        first_context: String,
        second_kubeconfig: PathBuf,
        second_context: String,
    },
}

fn named_in(config: Option<&Path>) -> String {
    config.map_or_else(String::new, |config| {
        format!(" (named in {})", config.display())
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
    let config = parse_strict(&text, path)?;
    let overrides = EnvOverrides::collect(env)?;
    let config = overrides.apply(config)?;
    validate(&config, path, &overrides)?;
    // Checks the kubeconfig files, their contexts and the cluster names, so
    // a broken setup fails at start-up rather than when a cluster connects.
    resolve_clusters_from(&config, Some(path))?;
    Ok(config)
}

/// Parses `text` as if it were the file `origin` (used in messages and to
/// resolve relative kubeconfig paths) and validates it, without reading the
/// environment or the kubeconfig files.
pub fn parse_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    let config = parse_strict(text, origin)?;
    validate(&config, origin, &EnvOverrides::default())?;
    Ok(config)
}

/// The target clusters: every selected context of every kubeconfig, sorted
/// by cluster name.
pub fn resolve_clusters(config: &Config) -> Result<Vec<ClusterTarget>, ConfigError> {
    resolve_clusters_from(config, None)
}

fn resolve_clusters_from(
    config: &Config,
    config_path: Option<&Path>,
) -> Result<Vec<ClusterTarget>, ConfigError> {
    // name -> index in `clusters`, to name both sources of a duplicate.
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut clusters: Vec<ClusterTarget> = Vec::new();
    for source in &config.kubeconfig {
        for context in selected_contexts(source, config_path)? {
            let target = ClusterTarget {
                name: format!("{}{}", source.name_prefix, context),
                kubeconfig: source.path.clone(),
                context,
            };
            if let Some(&first) = by_name.get(&target.name) {
                let first = &clusters[first];
                return Err(ConfigError::DuplicateCluster {
                    name: target.name,
                    first_kubeconfig: first.kubeconfig.clone(),
                    first_context: first.context.clone(),
                    second_kubeconfig: target.kubeconfig,
                    second_context: target.context,
                });
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
    config_path: Option<&Path>,
) -> Result<Vec<String>, ConfigError> {
    let path = &source.path;
    if !path.exists() {
        return Err(ConfigError::KubeconfigMissing {
            path: path.clone(),
            config: config_path.map(Path::to_path_buf),
        });
    }
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|error| {
        ConfigError::KubeconfigInvalid {
            path: path.clone(),
            config: config_path.map(Path::to_path_buf),
            message: error.to_string(),
        }
    })?;
    let available: Vec<String> = kubeconfig.contexts.into_iter().map(|c| c.name).collect();
    if available.is_empty() {
        return Err(ConfigError::NoContexts { path: path.clone() });
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
                    });
                }
            }
            Ok(wanted.clone())
        }
    }
}

/// Step 1: strict TOML parsing, then relative kubeconfig paths resolved
/// against the config file's directory.
fn parse_strict(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    let mut config: Config = toml::from_str(text).map_err(|error| {
        let (line, column) = match error.span() {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        ConfigError::Parse {
            path: origin.to_path_buf(),
            line,
            column,
            message: plain_type_names(error.message().trim_end()),
        }
    })?;
    let base = origin.parent().unwrap_or(Path::new(""));
    for source in &mut config.kubeconfig {
        if source.path.is_relative() {
            source.path = clean_path(&base.join(&source.path));
        }
    }
    Ok(config)
}

/// serde names Rust types in "expected ..." (`usize`, `f32`); a user
/// editing TOML wants to read what to write instead.
fn plain_type_names(message: &str) -> String {
    const NAMES: &[(&str, &str)] = &[
        ("expected usize", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
    ];
    for (rust, plain) in NAMES {
        if let Some(head) = message.strip_suffix(rust) {
            return format!("{head}{plain}");
        }
    }
    message.to_string()
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

/// The process environment's variables that carry our prefix (any case, as
/// the `config` crate matches them case-insensitively).
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

/// Step 2: the environment overrides, keyed like the config crate keys them
/// (`defaults.max_parallel_per_node`), with the variable each came from.
#[derive(Debug, Default)]
struct EnvOverrides {
    /// key -> (variable name, raw value)
    by_key: BTreeMap<String, (String, String)>,
}

impl EnvOverrides {
    fn collect(env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase();
        let mut by_key = BTreeMap::new();
        for (name, value) in env {
            let lower = name.to_lowercase();
            let Some(rest) = lower.strip_prefix(&prefix) else {
                continue;
            };
            let key = rest.replace(ENV_SEPARATOR, ".");
            check_env_key(&key, &name, &value)?;
            by_key.insert(key, (name, value));
        }
        Ok(EnvOverrides { by_key })
    }

    /// The variable that set `key`, if any (for validation messages).
    fn variable(&self, key: &str) -> Option<&str> {
        self.by_key.get(key).map(|(name, _)| name.as_str())
    }

    fn apply(&self, config: Config) -> Result<Config, ConfigError> {
        if self.by_key.is_empty() {
            return Ok(config);
        }
        let raw: HashMap<String, String> = self
            .by_key
            .values()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
            .try_parsing(true)
            .source(Some(raw.into_iter().collect()));
        let layered = config::Config::try_from(&config)
            .and_then(|base| {
                config::Config::builder()
                    .add_source(base)
                    .add_source(environment)
                    .build()
            })
            .and_then(|layered| layered.try_deserialize::<Config>());
        layered.map_err(|error| self.describe(error))
    }

    /// Turns a `config` crate error into one naming the variable at fault.
    fn describe(&self, error: config::ConfigError) -> ConfigError {
        let (key, message) = match &error {
            config::ConfigError::Type {
                unexpected,
                expected,
                key,
                ..
            } => (
                key.clone(),
                format!("expected {expected}, found {unexpected}"),
            ),
            config::ConfigError::At { error, key, .. } => (key.clone(), error.to_string()),
            other => (None, other.to_string()),
        };
        let culprit = key
            .as_deref()
            .and_then(|key| self.by_key.get_key_value(key));
        match culprit {
            Some((key, (variable, value))) => ConfigError::Env {
                variable: variable.clone(),
                value: value.clone(),
                message: format!("not a valid value for {key}: {message}"),
            },
            None => {
                let variables: Vec<&str> = self
                    .by_key
                    .values()
                    .map(|(name, _)| name.as_str())
                    .collect();
                ConfigError::Env {
                    variable: variables.join(", "),
                    value: String::new(),
                    message: format!("cannot apply these overrides: {error}"),
                }
            }
        }
    }
}

/// Settings that can be overridden from the environment: every key of every
/// section except the `[[kubeconfig]]` list (a list of tables has no natural
/// spelling as one variable).
const ENV_SETTINGS: &[(&str, &[&str])] = &[
    ("server", &["listen"]),
    (
        "defaults",
        &[
            "retry_after",
            "pull_timeout",
            "max_parallel_per_node",
            "max_parallel_per_prefetch",
            "max_parallel_per_cluster",
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

fn check_env_key(key: &str, variable: &str, value: &str) -> Result<(), ConfigError> {
    let error = |message: String| ConfigError::Env {
        variable: variable.to_string(),
        value: value.to_string(),
        message,
    };
    let sections = || {
        ENV_SETTINGS
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
    let Some((_, fields)) = ENV_SETTINGS.iter().find(|(name, _)| *name == section) else {
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

/// Step 3: ranges and consistency. Kubeconfig files are checked separately.
fn validate(config: &Config, path: &Path, env: &EnvOverrides) -> Result<(), ConfigError> {
    let invalid = |field: &str, message: String| {
        let origin = match env.variable(field) {
            Some(variable) => format!(" (set by environment variable {variable})"),
            None => String::new(),
        };
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            message: format!("{message}{origin}"),
        })
    };
    let shown = |duration: Duration| humantime::format_duration(duration).to_string();

    let defaults = &config.defaults;
    if defaults.retry_after.is_zero() {
        return invalid(
            "defaults.retry_after",
            "must be greater than 0, e.g. \"300s\"".to_string(),
        );
    }
    if defaults.pull_timeout < Duration::from_secs(1) {
        // Pull pods get it as `activeDeadlineSeconds`, a whole number >= 1.
        return invalid(
            "defaults.pull_timeout",
            format!(
                "must be at least 1s, e.g. \"600s\" (got {})",
                shown(defaults.pull_timeout)
            ),
        );
    }
    let caps = [
        (
            "defaults.max_parallel_per_node",
            defaults.max_parallel_per_node,
        ),
        (
            "defaults.max_parallel_per_prefetch",
            defaults.max_parallel_per_prefetch,
        ),
        (
            "defaults.max_parallel_per_cluster",
            defaults.max_parallel_per_cluster,
        ),
    ];
    for (field, value) in caps {
        if value < 1 {
            return invalid(field, "must be at least 1".to_string());
        }
    }
    if !(defaults.api_qps.is_finite() && defaults.api_qps > 0.0) {
        return invalid(
            "defaults.api_qps",
            format!(
                "must be a number of requests per second greater than 0 (got {})",
                defaults.api_qps
            ),
        );
    }

    let backoff = &config.backoff;
    if backoff.initial.is_zero() {
        return invalid(
            "backoff.initial",
            "must be greater than 0, e.g. \"2s\"".to_string(),
        );
    }
    if backoff.initial > backoff.max {
        return invalid(
            "backoff.initial",
            format!(
                "({}) must not be greater than backoff.max ({})",
                shown(backoff.initial),
                shown(backoff.max)
            ),
        );
    }
    if !(backoff.multiplier.is_finite() && backoff.multiplier >= 1.0) {
        return invalid(
            "backoff.multiplier",
            format!(
                "must be at least 1.0 so delays do not shrink (got {})",
                backoff.multiplier
            ),
        );
    }
    if backoff.max_attempts < 1 {
        return invalid(
            "backoff.max_attempts",
            "must be at least 1 (the first attempt counts)".to_string(),
        );
    }

    let policy = &config.policy;
    if policy.helper_image.trim().is_empty() {
        return invalid(
            "policy.helper_image",
            format!("must name an image, e.g. \"{DEFAULT_HELPER_IMAGE}\""),
        );
    }
    if let Some(class) = &policy.priority_class
        && class.trim().is_empty()
    {
        return invalid(
            "policy.priority_class",
            "must name a PriorityClass; remove the key to use none".to_string(),
        );
    }

    let election = &config.leader_election;
    if election.namespace.trim().is_empty() {
        return invalid(
            "leader_election.namespace",
            "must name the namespace of the Lease".to_string(),
        );
    }
    if election.lease_name.trim().is_empty() {
        return invalid(
            "leader_election.lease_name",
            "must name the Lease".to_string(),
        );
    }

    if config.kubeconfig.is_empty() {
        return Err(ConfigError::NoKubeconfig {
            path: path.to_path_buf(),
        });
    }
    for (index, source) in config.kubeconfig.iter().enumerate() {
        let entry = index + 1;
        if source.path.as_os_str().is_empty() {
            return invalid(
                &format!("kubeconfig entry {entry}: path"),
                "must name a kubeconfig file".to_string(),
            );
        }
        if let Some(contexts) = &source.contexts {
            if contexts.is_empty() {
                return invalid(
                    &format!(
                        "kubeconfig entry {entry} ({}): contexts",
                        source.path.display()
                    ),
                    "is empty, so it selects no cluster; remove the key to use all contexts"
                        .to_string(),
                );
            }
            if contexts.iter().any(|context| context.is_empty()) {
                return invalid(
                    &format!(
                        "kubeconfig entry {entry} ({}): contexts",
                        source.path.display()
                    ),
                    "contains an empty context name".to_string(),
                );
            }
        }
    }
    Ok(())
}

/// Durations: humantime strings ("90s", "5m", "1h 30m") or whole seconds
/// (`300` or "300", the latter as environment overrides arrive).
mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl serde::de::Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration such as \"90s\" or \"5m\", or a whole number of seconds")
        }

        fn visit_u64<E: serde::de::Error>(self, seconds: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(seconds))
        }

        fn visit_i64<E: serde::de::Error>(self, seconds: i64) -> Result<Duration, E> {
            u64::try_from(seconds)
                .map(Duration::from_secs)
                .map_err(|_| {
                    E::custom(format!(
                        "a duration cannot be negative (got {seconds}); expected e.g. \"90s\" or 90"
                    ))
                })
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            let text = text.trim();
            if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                return text
                    .parse::<u64>()
                    .map(Duration::from_secs)
                    .map_err(|_| E::custom(format!("duration {text:?} is too large")));
            }
            humantime::parse_duration(text).map_err(|error| {
                E::custom(format!(
                    "invalid duration {text:?}: {error}; expected e.g. \"90s\", \"5m\" or a whole number of seconds"
                ))
            })
        }
    }
}

/// `listen`: "ip:port", with a message that says so.
mod socket_addr {
    use super::*;

    pub fn serialize<S: Serializer>(value: &SocketAddr, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.trim().parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "invalid listen address {text:?}; expected an IP address and port such as \"0.0.0.0:8080\" or \"[::]:8080\""
            ))
        })
    }
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
        let message = error.to_string();
        assert!(
            message.starts_with("config/x.toml:7:1: unknown field `retry_afterr`, expected one of"),
            "{message}"
        );
        assert!(message.contains("`retry_after`"), "{message}");
    }

    #[test]
    fn unknown_section_and_kubeconfig_key_are_rejected() {
        let error = parse_str("[sever]\nlisten = \"x\"\n", Path::new("c.toml"))
            .expect_err("unknown section")
            .to_string();
        assert!(
            error.starts_with("c.toml:1:2: unknown field `sever`"),
            "{error}"
        );

        let error = parse_str(
            "[[kubeconfig]]\npath = \"k\"\ncontext = [\"a\"]\n",
            Path::new("c.toml"),
        )
        .expect_err("unknown kubeconfig key")
        .to_string();
        assert!(
            error.starts_with("c.toml:3:1: unknown field `context`"),
            "{error}"
        );

        let error = parse_str("[[kubeconfig]]\ncontexts = [\"a\"]\n", Path::new("c.toml"))
            .expect_err("missing path")
            .to_string();
        assert!(error.contains("missing field `path`"), "{error}");
    }

    #[test]
    fn syntax_and_type_errors_have_positions() {
        let error = parse_str("[server\nlisten = 1\n", Path::new("c.toml"))
            .expect_err("syntax")
            .to_string();
        assert!(error.starts_with("c.toml:1:"), "{error}");

        let error = parse_str(
            "[defaults]\nmax_parallel_per_node = \"two\"\n",
            Path::new("c.toml"),
        )
        .expect_err("type")
        .to_string();
        assert_eq!(
            error,
            "c.toml:2:25: invalid type: string \"two\", expected a whole number"
        );

        let error = parse_str("[backoff]\nmultiplier = \"x\"\n", Path::new("c.toml"))
            .expect_err("type")
            .to_string();
        assert_eq!(
            error,
            "c.toml:2:14: invalid type: string \"x\", expected a number"
        );

        let error = parse_str("[server]\nlisten = \"localhost\"\n", Path::new("c.toml"))
            .expect_err("listen")
            .to_string();
        assert!(
            error.starts_with("c.toml:2:10: invalid listen address \"localhost\""),
            "{error}"
        );
        assert!(error.contains("0.0.0.0:8080"), "{error}");

        let error = parse_str(
            "[defaults]\n# comment\nretry_after = \"5 parsecs\"\n",
            Path::new("c.toml"),
        )
        .expect_err("duration")
        .to_string();
        assert!(
            error.starts_with("c.toml:3:15: invalid duration \"5 parsecs\""),
            "{error}"
        );

        let error = parse_str("[defaults]\npull_timeout = -5\n", Path::new("c.toml"))
            .expect_err("negative")
            .to_string();
        assert!(error.contains("cannot be negative"), "{error}");
    }

    #[test]
    fn columns_count_characters() {
        assert_eq!(line_column("ab\ncé", 4), (2, 2));
        assert_eq!(line_column("ab\ncéx", 6), (2, 3));
        assert_eq!(line_column("", 10), (1, 1));
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let cases = [
            (
                "[defaults]",
                "pull_timeout = 0",
                "defaults.pull_timeout must be at least 1s",
            ),
            (
                "[defaults]",
                "pull_timeout = \"500ms\"",
                "defaults.pull_timeout must be at least 1s",
            ),
            (
                "[defaults]",
                "retry_after = 0",
                "defaults.retry_after must be greater than 0",
            ),
            (
                "[defaults]",
                "max_parallel_per_node = 0",
                "defaults.max_parallel_per_node must be at least 1",
            ),
            (
                "[defaults]",
                "max_parallel_per_prefetch = 0",
                "defaults.max_parallel_per_prefetch must be at least 1",
            ),
            (
                "[defaults]",
                "max_parallel_per_cluster = 0",
                "defaults.max_parallel_per_cluster must be at least 1",
            ),
            ("[defaults]", "api_qps = 0", "defaults.api_qps must be"),
            ("[defaults]", "api_qps = nan", "defaults.api_qps must be"),
            (
                "[backoff]",
                "initial = 0",
                "backoff.initial must be greater than 0",
            ),
            (
                "[backoff]",
                "initial = \"10m\"",
                "backoff.initial (10m) must not be greater than backoff.max (5m)",
            ),
            (
                "[backoff]",
                "multiplier = 0.5",
                "backoff.multiplier must be at least 1.0",
            ),
            (
                "[backoff]",
                "max_attempts = 0",
                "backoff.max_attempts must be at least 1",
            ),
            (
                "[policy]",
                "helper_image = \"\"",
                "policy.helper_image must name an image",
            ),
            (
                "[policy]",
                "priority_class = \" \"",
                "policy.priority_class must name a PriorityClass",
            ),
            (
                "[leader_election]",
                "namespace = \"\"",
                "leader_election.namespace must name",
            ),
            (
                "[leader_election]",
                "lease_name = \"\"",
                "leader_election.lease_name must name",
            ),
        ];
        for (section, line, expected) in cases {
            let fixture = with(section, line);
            let error = fixture.error();
            let prefix = format!("{}: {expected}", fixture.config_path().display());
            assert!(error.starts_with(&prefix), "{line}: {error}");
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
            "kubeconfig {} (named in {}) does not exist",
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
    fn unknown_context_lists_the_available_ones() {
        let fixture = Fixture::new(
            "[[kubeconfig]]\npath = \"../clusters/sim/run/kubeconfig\"\ncontexts = [\"sim-1\", \"sim-9\"]\n",
            &[("clusters/sim/run/kubeconfig", &["sim-1", "sim-2", "sim-3"])],
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
            "unknown context \"sim-9\" in kubeconfig {} (it has: sim-1, sim-2, sim-3)",
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
            "cluster name \"b\" is used twice: by context \"b\" of kubeconfig {} and by context \"b\" of kubeconfig {}",
            fixture.path("one").display(),
            fixture.path("two").display()
        );
        assert!(error.starts_with(&expected), "{error}");
        assert!(error.contains("name_prefix"), "{error}");

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
                .starts_with("cluster name \"a\" is used twice")
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
                "defaults.max_parallel_per_node",
            ),
            (
                "KUBE_PREFETCH__SERVER__LISTEN",
                "localhost",
                "invalid listen address",
            ),
            (
                "KUBE_PREFETCH__DEFAULTS__RETRY_AFTER",
                "soon",
                "invalid duration \"soon\"",
            ),
            (
                "KUBE_PREFETCH__POLICY__CROSS_NAMESPACE",
                "maybe",
                "policy.cross_namespace",
            ),
        ];
        for (variable, value, expected) in cases {
            let error = minimal()
                .load_env(&[(variable, value)])
                .expect_err("bad value")
                .to_string();
            let prefix = format!("environment variable {variable}={value:?}: ");
            assert!(error.starts_with(&prefix), "{error}");
            assert!(error.contains(expected), "{error}");
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
        let fixture = minimal();
        let error = fixture
            .load_env(&[("KUBE_PREFETCH__DEFAULTS__MAX_PARALLEL_PER_NODE", "0")])
            .expect_err("zero")
            .to_string();
        let expected = format!(
            "{}: defaults.max_parallel_per_node must be at least 1 (set by environment variable KUBE_PREFETCH__DEFAULTS__MAX_PARALLEL_PER_NODE)",
            fixture.config_path().display()
        );
        assert_eq!(error, expected);
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
}
