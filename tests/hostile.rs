//! Hostile and broken input (issue 8): what a person sees when a value or a
//! Prefetch is wrong. The command-line tests need no cluster (they point at
//! a closed port); the Prefetch tests run against the sim clusters.

use std::path::Path;
use std::process::{Command, Output};

/// A kubeconfig whose one context, `dead`, points at a closed port.
const DEAD_KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters:
- name: dead
  cluster:
    server: https://127.0.0.1:1
contexts:
- name: dead
  context:
    cluster: dead
    user: dead
current-context: dead
users:
- name: dead
  user:
    token: x
";

/// Writes the dead kubeconfig and a config naming it into `dir`.
fn dead_cluster_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("kubeconfig"), DEAD_KUBECONFIG).expect("write kubeconfig");
    let config = dir.join("kube-prefetch.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{extra}\n[[kubeconfig]]\npath = \"kubeconfig\"\n"
        ),
    )
    .expect("write config");
    config
}

/// Runs the binary with stdout and stderr captured (pipes, not terminals),
/// without any KUBE_PREFETCH__ override from the caller's environment.
fn kube_prefetch(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kube-prefetch"));
    command.args(args).env_remove("NO_COLOR");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KUBE_PREFETCH__") {
            command.env_remove(name);
        }
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("running kube-prefetch")
}

#[test]
fn check_into_a_pipe_prints_no_colour_codes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dead_cluster_config(dir.path(), "");
    let output = kube_prefetch(&["check", "--config", &config.to_string_lossy()], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.starts_with(&format!(
            "config {} is valid: 1 cluster(s)\ndead: PROBLEM\n  unreachable: ",
            config.display()
        )),
        "{stdout}"
    );
    assert!(
        !stdout.contains('\x1b'),
        "colour codes on stdout: {stdout:?}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "colour codes on stderr: {stderr:?}"
    );
}

#[test]
fn leader_election_start_up_error_prints_its_cause_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dead_cluster_config(dir.path(), "[leader_election]\nenabled = true\n");
    let kubeconfig = dir.path().join("kubeconfig");
    let output = kube_prefetch(
        &["run", "--config", &config.to_string_lossy()],
        &[("KUBECONFIG", &kubeconfig)],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        "kube-prefetch: error: leader election: cannot use Lease kube-prefetch/kube-prefetch in the home cluster: ServiceError: client error (Connect): tcp connect error: Connection refused (os error 111)"
    );
}

#[test]
fn check_refuses_a_bad_value_naming_file_line_and_column() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dead_cluster_config(dir.path(), "[defaults]\napi_qps = 1e-20\n");
    let output = kube_prefetch(&["check", "--config", &config.to_string_lossy()], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "kube-prefetch: error: {}:4:11: defaults.api_qps must be a number from 0.1 to 10000 requests per second, found 1e-20",
            config.display()
        )
    );
}
