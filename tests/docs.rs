//! docs/reference.md kept true: its tables of config keys, Prefetch fields,
//! metrics, Event reasons and HTTP endpoints are compared with what the
//! code has, in both directions, and every failure reason the code reports
//! has a troubleshooting section.

mod harness;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result};
use harness::*;
use kube::CustomResourceExt;
use kube_prefetch::actors::status::{ClusterHealth, ClusterView, PrefetchSummary, StatusView};
use kube_prefetch::api::{Phase, Prefetch, PullCounts};
use kube_prefetch::config::{Config, ENV_PREFIX, ENV_SEPARATOR, KubeconfigSource};
use kube_prefetch::metrics::Metrics;
use serde_json::json;

fn read(relative: &str) -> String {
    let path = support::repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn reference() -> String {
    read("docs/reference.md")
}

/// The rows (cells, trimmed) of the table between `<!-- marker -->` and
/// `<!-- /marker -->`, without its header and separator.
fn table(doc: &str, marker: &str) -> Vec<Vec<String>> {
    let start = format!("<!-- {marker} -->");
    let end = format!("<!-- /{marker} -->");
    let from = doc
        .find(&start)
        .unwrap_or_else(|| panic!("no {start} in docs/reference.md"));
    let to = doc[from..]
        .find(&end)
        .unwrap_or_else(|| panic!("no {end} in docs/reference.md"))
        + from;
    let rows: Vec<Vec<String>> = doc[from + start.len()..to]
        .lines()
        .filter(|line| line.starts_with('|'))
        .skip(2)
        .map(|line| {
            line.trim_matches('|')
                .split(" | ")
                .map(|cell| cell.trim().to_string())
                .collect()
        })
        .collect();
    assert!(!rows.is_empty(), "empty table {marker}");
    rows
}

/// `` `name` `` -> `name`.
fn unquote(cell: &str) -> String {
    cell.trim_matches('`').to_string()
}

fn first_column(rows: &[Vec<String>]) -> BTreeSet<String> {
    rows.iter().map(|row| unquote(&row[0])).collect()
}

fn assert_same(what: &str, in_code: &BTreeSet<String>, documented: &BTreeSet<String>) {
    let undocumented: Vec<_> = in_code.difference(documented).collect();
    let stale: Vec<_> = documented.difference(in_code).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "{what}: in the code but not in docs/reference.md: {undocumented:?}; \
         in docs/reference.md but not in the code: {stale:?}"
    );
}

/// Dotted keys and values of the leaves of a TOML document; an array of
/// tables (`[[kubeconfig]]`) contributes the keys of its entries.
fn toml_leaves(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => toml_leaves(&path, inner, out),
            toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                for item in items {
                    if let toml::Value::Table(inner) = item {
                        toml_leaves(&path, inner, out);
                    }
                }
            }
            leaf => {
                out.insert(path, leaf.clone());
            }
        }
    }
}

fn config_leaves(config: &Config) -> BTreeMap<String, toml::Value> {
    let value = toml::Value::try_from(config).expect("the config serializes to TOML");
    let table = value.as_table().expect("the config is a table");
    let mut leaves = BTreeMap::new();
    toml_leaves("", table, &mut leaves);
    leaves
}

#[test]
fn every_config_key_is_documented_with_its_default_and_variable() {
    // Optional keys are left out when unset: set them so that every key the
    // code knows is serialized.
    let mut everything = Config::default();
    everything.policy.priority_class = Some("low".into());
    everything.kubeconfig.push(KubeconfigSource {
        path: "kubeconfig".into(),
        contexts: Some(vec!["one".into()]),
        name_prefix: String::new(),
    });
    let in_code: BTreeSet<String> = config_leaves(&everything).into_keys().collect();
    assert!(in_code.contains("server.listen"), "{in_code:?}");
    let rows = table(&reference(), "config-keys");
    assert_same("config keys", &in_code, &first_column(&rows));

    // Defaults as the loader applies them to a file that sets only the one
    // required key.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let minimal = dir.path().join("minimal.toml");
    let kubeconfig = "apiVersion: v1\nkind: Config\n\
        clusters: [{name: c, cluster: {server: \"https://127.0.0.1:1\"}}]\n\
        users: [{name: u, user: {token: t}}]\n\
        contexts: [{name: one, context: {cluster: c, user: u}}]\n";
    std::fs::write(dir.path().join("kubeconfig"), kubeconfig).expect("writing");
    std::fs::write(&minimal, "[[kubeconfig]]\npath = \"kubeconfig\"\n").expect("writing");
    let loaded = kube_prefetch::config::load(&minimal).expect("a minimal config loads");
    let mut defaults = config_leaves(&loaded);
    defaults.remove("kubeconfig.path");
    for row in &rows {
        let key = unquote(&row[0]);
        let [_, _, default, variable, meaning] = &row[..] else {
            panic!("config row {row:?} does not have 5 cells");
        };
        assert!(!meaning.is_empty(), "{key} has no meaning");
        match defaults.get(&key) {
            Some(value) => assert_eq!(default, &format!("`{value}`"), "default of {key}"),
            None => assert!(
                default == "not set" || default == "required" || default.starts_with("not set:"),
                "{key} has no default in the code, the docs say {default}"
            ),
        }
        if key.starts_with("kubeconfig.") {
            assert_eq!(variable, "none", "[[kubeconfig]] is not overridable");
        } else {
            let expected = format!(
                "{ENV_PREFIX}{ENV_SEPARATOR}{}",
                key.replace('.', ENV_SEPARATOR).to_uppercase()
            );
            assert_eq!(variable, &format!("`{expected}`"), "variable of {key}");
        }
    }
}

/// Paths of every property below `schema`: `a.b`, `list[].c`.
fn schema_paths(prefix: &str, schema: &serde_json::Value, out: &mut BTreeSet<String>) {
    if let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, property) in properties {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            out.insert(path.clone());
            schema_paths(&path, property, out);
        }
    }
    if let Some(items) = schema.get("items") {
        schema_paths(&format!("{prefix}[]"), items, out);
    }
}

#[test]
fn every_prefetch_field_of_the_crd_schema_is_documented() {
    let crd = Prefetch::crd();
    let version = crd.spec.versions.first().expect("one version");
    let schema = serde_json::to_value(
        version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("a schema"),
    )
    .expect("schema to JSON");
    let mut in_code = BTreeSet::new();
    schema_paths("", &schema, &mut in_code);
    // The two roots are sections, not fields.
    assert!(
        in_code.remove("spec") && in_code.remove("status"),
        "{in_code:?}"
    );
    assert!(
        in_code.contains("status.failures[].permanent"),
        "{in_code:?}"
    );
    assert_same(
        "Prefetch fields",
        &in_code,
        &first_column(&table(&reference(), "prefetch-fields")),
    );
}

/// The names given to `registry.register(` in src/metrics.rs.
fn registered_metric_names() -> BTreeSet<String> {
    let source = read("src/metrics.rs");
    source
        .split(".register(")
        .skip(1)
        .filter_map(|after| {
            let start = after.find('"')? + 1;
            let end = after[start..].find('"')? + start;
            Some(format!("kube_prefetch_{}", &after[start..end]))
        })
        .collect()
}

/// (family -> type) and (family -> label names) of an OpenMetrics text.
fn served_metrics(text: &str) -> (BTreeMap<String, String>, BTreeMap<String, BTreeSet<String>>) {
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                types.insert(name.to_string(), kind.to_string());
            }
        }
    }
    let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let family = types
            .keys()
            .find(|family| name == *family || name.strip_suffix("_total") == Some(family))
            .cloned()
            .unwrap_or_else(|| name.to_string());
        let names = rest
            .split_once('}')
            .map(|(inside, _)| inside)
            .unwrap_or_default()
            .split(',')
            .filter_map(|pair| pair.split_once('=').map(|(key, _)| key.to_string()));
        labels.entry(family).or_default().extend(names);
    }
    (types, labels)
}

fn documented_metrics() -> BTreeMap<String, (String, BTreeSet<String>)> {
    table(&reference(), "metrics")
        .into_iter()
        .map(|row| {
            let labels = row[2].split(", ").map(unquote).collect();
            (unquote(&row[0]), (row[1].clone(), labels))
        })
        .collect()
}

fn assert_metrics_documented(text: &str) {
    let (types, labels) = served_metrics(text);
    let documented = documented_metrics();
    assert_same(
        "metrics served",
        &types.keys().cloned().collect(),
        &documented.keys().cloned().collect(),
    );
    for (name, (kind, documented_labels)) in &documented {
        assert_eq!(types.get(name), Some(kind), "type of {name}:\n{text}");
        assert_eq!(
            labels.get(name),
            Some(documented_labels),
            "labels of {name}:\n{text}"
        );
    }
}

#[test]
fn every_registered_metric_is_documented_with_its_type_and_labels() {
    assert_same(
        "metrics registered in src/metrics.rs",
        &registered_metric_names(),
        &documented_metrics().keys().cloned().collect(),
    );
    // Gauges and counters appear once they have a value: give them one each.
    let metrics = Metrics::default();
    metrics.pull_created("sim-1");
    metrics.pull_finished("sim-1", "succeeded");
    metrics.status_written("sim-1");
    metrics.api_response("sim-1", 429);
    let view = StatusView {
        standby: false,
        clusters: vec![ClusterView {
            name: "sim-1".into(),
            health: ClusterHealth::Connected {
                version: "v1.36.3".into(),
            },
            prefetches: vec![PrefetchSummary {
                namespace: "default".into(),
                name: "cache".into(),
                phase: Phase::Ready,
                images: vec!["docker.io/library/nginx:1.7.9".into()],
                nodes: 1,
                pulls: PullCounts {
                    ready: 1,
                    reverifying: 0,
                    in_flight: 0,
                    failed: 0,
                    total: 1,
                },
                message: None,
                failures: Vec::new(),
            }],
            restarts: 0,
            last_panic: None,
        }],
    };
    let text = metrics.render(&view).expect("metrics render");
    assert_metrics_documented(&text);
}

/// What a running kube-prefetch serves at /metrics after real pulls, one of
/// them failed, is exactly the documented set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_served_on_the_sim_are_the_documented_ones() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "docs-metrics").await?;
    apply(
        &ns.api::<Prefetch>(),
        json!({
            "apiVersion": "cache.techsquad.rocks/v1",
            "kind": "Prefetch",
            "metadata": { "name": "mixed" },
            "spec": {
                "images": ["busybox:1.36", "fail.invalid/docs:1"],
                "node_filter": "worker",
            },
        }),
    )
    .await?;
    let orchestrator = Orchestrator::start(
        "docs-metrics",
        Options {
            max_attempts: 1,
            ..Options::default()
        },
    )
    .await?;
    wait_phase(
        &ns.client(),
        ns.name(),
        "mixed",
        Phase::Failed,
        Duration::from_secs(90),
    )
    .await?;
    // Status writes are debounced: wait for the counter, then read it all.
    let text = support::wait_for("status writes counted", Duration::from_secs(30), || {
        let orchestrator = &orchestrator;
        async move {
            let text = orchestrator.get("/metrics").await?;
            Ok(text
                .contains("kube_prefetch_status_writes_total")
                .then_some(text))
        }
    })
    .await
    .context("reading /metrics")?;
    assert_metrics_documented(&text);
    drop(orchestrator);
    ns.cleanup().await?;
    Ok(())
}

/// (type, reason) of every Event the code records: `EventType::X` followed
/// by a string literal, as `publish_event` calls and the phase events use.
fn event_reasons_in_code() -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    let mut stack = vec![support::repo_root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).expect("source is readable");
            for after in source.split("EventType::").skip(1) {
                let kind: String = after
                    .chars()
                    .take_while(char::is_ascii_alphabetic)
                    .collect();
                let rest = after[kind.len()..].trim_start();
                let Some(rest) = rest.strip_prefix(',') else {
                    continue;
                };
                let Some(rest) = rest.trim_start().strip_prefix('"') else {
                    continue;
                };
                if let Some(end) = rest.find('"') {
                    found.insert((kind, rest[..end].to_string()));
                }
            }
        }
    }
    found
}

#[test]
fn every_event_reason_is_documented() {
    let in_code = event_reasons_in_code();
    // The three kube-prefetch has recorded since the article's operator.
    for expected in ["PullFailed", "Ready", "Failed"] {
        assert!(
            in_code.iter().any(|(_, reason)| reason == expected),
            "the scan misses {expected}: {in_code:?}"
        );
    }
    let documented: BTreeSet<(String, String)> = table(&reference(), "event-reasons")
        .into_iter()
        .map(|row| (row[1].clone(), unquote(&row[0])))
        .collect();
    let as_text = |set: &BTreeSet<(String, String)>| -> BTreeSet<String> {
        set.iter()
            .map(|(kind, reason)| format!("{kind} {reason}"))
            .collect()
    };
    assert_same("Event reasons", &as_text(&in_code), &as_text(&documented));
}

#[test]
fn every_http_endpoint_is_documented() {
    let source = read("src/http.rs");
    let mut in_code = BTreeSet::new();
    for method in ["get", "post", "put", "delete", "patch"] {
        for after in source.split(&format!("#[{method}(\"")).skip(1) {
            if let Some(end) = after.find('"') {
                in_code.insert(format!("{} {}", method.to_uppercase(), &after[..end]));
            }
        }
    }
    assert!(in_code.contains("GET /api/v1/status"), "{in_code:?}");
    // A row may name several endpoints: `GET /a`, `GET /b`.
    let documented: BTreeSet<String> = table(&reference(), "http-endpoints")
        .iter()
        .flat_map(|row| row[0].split(", ").map(unquote).collect::<Vec<_>>())
        .collect();
    assert_same("HTTP endpoints", &in_code, &documented);
}

/// The string literals of a `const NAME: &[&str] = &[...]` in `source`.
fn const_list(source: &str, name: &str) -> Vec<String> {
    let start = source
        .find(&format!("const {name}: &[&str] = &["))
        .unwrap_or_else(|| panic!("no const {name}"));
    let body = &source[start..];
    let body = &body[body.find("&[").unwrap_or(0) + 2..body.find("];").unwrap_or(0)];
    body.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Every label a cluster state can have (a new variant breaks this match).
fn cluster_state_labels() -> Vec<&'static str> {
    let all = [
        ClusterHealth::Connecting,
        ClusterHealth::Connected {
            version: String::new(),
        },
        ClusterHealth::Unreachable {
            reason: String::new(),
        },
        ClusterHealth::Forbidden {
            what: String::new(),
        },
        ClusterHealth::CrdMissing {
            reason: String::new(),
        },
        ClusterHealth::Crashed {
            reason: String::new(),
        },
    ];
    all.iter()
        .filter(|health| match health {
            ClusterHealth::Connected { .. } => false,
            ClusterHealth::Connecting
            | ClusterHealth::Unreachable { .. }
            | ClusterHealth::Forbidden { .. }
            | ClusterHealth::CrdMissing { .. }
            | ClusterHealth::Crashed { .. } => true,
        })
        .map(ClusterHealth::label)
        .collect()
}

#[test]
fn every_failure_reason_has_a_troubleshooting_entry() {
    let doc = reference();
    let troubleshooting = doc
        .split("\n## Troubleshooting\n")
        .nth(1)
        .expect("a Troubleshooting section");
    let headings: Vec<&str> = troubleshooting
        .lines()
        .filter(|line| line.starts_with("### "))
        .collect();
    let mut reasons = const_list(&read("src/pull/outcome.rs"), "PULL_FAILURE_REASONS");
    // Reasons the pull pod's owner reports itself.
    for source in ["src/actors/prefetch.rs", "src/pull/outcome.rs"] {
        let source = read(source);
        let code = source.split("#[cfg(test)]").next().unwrap_or_default();
        for after in code.split("reason: \"").skip(1) {
            if let Some(end) = after.find('"') {
                reasons.push(after[..end].to_string());
            }
        }
        // The reason of a failed pod that gives none.
        if code.contains("\"PodFailed\"") {
            reasons.push("PodFailed".into());
        }
    }
    assert!(
        reasons.iter().any(|r| r == "DeadlineExceeded"),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r == "PodFailed"), "{reasons:?}");
    let helper = kube_prefetch::pull::outcome::HELPER_REASON_PREFIX.trim_end_matches(": ");
    reasons.push(helper.to_string());
    reasons.push("StartError".into());
    reasons.extend(cluster_state_labels().into_iter().map(String::from));
    let missing: Vec<&String> = reasons
        .iter()
        .filter(|reason| {
            !headings
                .iter()
                .any(|heading| heading.to_lowercase().contains(&reason.to_lowercase()))
        })
        .collect();
    // Cluster states share one section, each with its own bullet.
    let missing: Vec<&&String> = missing
        .iter()
        .filter(|reason| !troubleshooting.contains(&format!("- **{reason}**")))
        .collect();
    assert!(
        missing.is_empty(),
        "no troubleshooting entry in docs/reference.md for {missing:?} (headings: {headings:?})"
    );
}

#[test]
fn the_readme_links_the_reference() {
    assert!(read("README.md").contains("(docs/reference.md)"));
}
