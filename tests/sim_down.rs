//! `clusters/sim/down` stops everything `up` started, real nodes included.
//! It stops the clusters every other test uses, so it is ignored by a plain
//! `cargo test`; `make test` runs it last: `cargo test --test sim_down --
//! --ignored`.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// Pids recorded in the pid files of every cluster under the run dir.
fn recorded_pids(run_dir: &Path) -> Vec<(String, u32)> {
    let mut pids = Vec::new();
    for cluster in std::fs::read_dir(run_dir)
        .expect("run dir is readable")
        .flatten()
    {
        let Ok(files) = std::fs::read_dir(cluster.path()) else {
            continue;
        };
        for file in files.flatten() {
            let path = file.path();
            if path.extension().is_some_and(|e| e == "pid") {
                let text = std::fs::read_to_string(&path).expect("pid file is readable");
                let pid = text.trim().parse().expect("pid file holds a number");
                pids.push((path.display().to_string(), pid));
            }
        }
    }
    pids
}

/// A live process, as opposed to one that is gone or a zombie (which holds
/// no ports or files and may never be reaped in a container).
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Listening TCP ports, with the `users:((...,pid=N,...))` column of `ss -ltnp`.
fn listening() -> Vec<(u16, String)> {
    let out = Command::new("ss")
        .args(["-Hltnp"])
        .output()
        .expect("ss runs");
    assert!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields.get(3)?.rsplit_once(':')?.1.parse().ok()?;
            Some((port, fields.get(5).copied().unwrap_or("").to_string()))
        })
        .collect()
}

/// Live processes whose command line names the run dir: every daemon of the
/// clusters and real nodes, and containerd's shims (they name the socket).
fn processes_naming(run_dir: &Path) -> Vec<(u32, String)> {
    let needle = run_dir.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .expect("/proc is readable")
        .flatten()
    {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) && is_running(pid) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Mount points at or under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo is readable")
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4).map(str::to_string))
        .filter(|mount| mount == &prefix || mount.starts_with(&format!("{prefix}/")))
        .collect()
}

fn port_offset() -> u16 {
    std::env::var("KUBE_PREFETCH_SIM_PORT_OFFSET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What the real nodes may leave on the host outside the run dir: cgroups,
/// bridges, CNI result files, iptables chains. Empty when all is clean.
fn real_node_leftovers() -> Vec<String> {
    let offset = port_offset();
    let mut left = Vec::new();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let ours = hierarchy.path().join(format!("kube-prefetch-sim-{offset}"));
        if ours.exists() {
            left.push(format!("cgroup {}", ours.display()));
        }
    }
    for link in std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = link.file_name().to_string_lossy().to_string();
        if name.starts_with(&format!("kp{offset}br")) {
            left.push(format!("network interface {name}"));
        }
    }
    for result in std::fs::read_dir("/var/lib/cni/results")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = result.file_name().to_string_lossy().to_string();
        if name.starts_with(&format!("kube-prefetch-sim-{offset}-")) {
            left.push(format!("CNI result {name}"));
        }
    }
    for tool in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle"] {
            let Ok(out) = Command::new(tool).args(["-t", table, "-S"]).output() else {
                continue;
            };
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if line.starts_with("-N KUBE-") {
                    left.push(format!("{tool} -t {table}: {line}"));
                }
            }
        }
    }
    left
}

fn run_script(name: &str, args: &[&str]) {
    let script = support::repo_root().join("clusters/sim").join(name);
    let out = Command::new(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} runs: {e}"));
    assert!(
        out.status.success(),
        "{name} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_all_gone(run_dir: &Path) {
    let left = processes_naming(run_dir);
    assert!(left.is_empty(), "processes left after down: {left:?}");
    let mounts = mounts_under(run_dir);
    assert!(mounts.is_empty(), "mounts left after down: {mounts:?}");
    let leftovers = real_node_leftovers();
    assert!(
        leftovers.is_empty(),
        "left on the host after down: {leftovers:?}"
    );
    assert!(!run_dir.exists(), "{} still exists", run_dir.display());
    run_script("check-ports", &[]);
}

#[tokio::test]
#[ignore = "stops the sim clusters; make test runs it after all other tests"]
async fn down_leaves_no_process_or_port_behind() {
    let sim = support::sim().await;
    let pids = recorded_pids(&sim.run_dir);
    // etcd, kube-apiserver, kwok and the image reporter per cluster (with real nodes, also the
    // node lifecycle controller's in run/real-nodes/).
    let cluster_daemons = pids
        .iter()
        .filter(|(file, _)| !file.contains("/real-nodes/"))
        .count();
    assert_eq!(
        cluster_daemons,
        4 * sim.clusters.len(),
        "pid files: {pids:?}"
    );
    for (file, pid) in &pids {
        assert!(
            is_running(*pid),
            "{file}: pid {pid} is not running before down"
        );
    }
    let ours: BTreeSet<u16> = listening()
        .into_iter()
        .filter(|(_, users)| {
            pids.iter()
                .any(|(_, pid)| users.contains(&format!("pid={pid},")))
        })
        .map(|(port, _)| port)
        .collect();
    // Each cluster listens on an etcd client and peer port and an apiserver port.
    assert!(
        ours.len() >= 3 * sim.clusters.len(),
        "ports of our processes: {ours:?}"
    );

    let down = support::repo_root().join("clusters/sim/down");
    let out = Command::new(&down)
        .output()
        .expect("clusters/sim/down runs");
    assert!(
        out.status.success(),
        "down failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let alive: Vec<_> = pids.iter().filter(|(_, pid)| is_running(*pid)).collect();
    assert!(alive.is_empty(), "still running after down: {alive:?}");
    let still: Vec<_> = listening()
        .into_iter()
        .filter(|(port, _)| ours.contains(port))
        .collect();
    assert!(still.is_empty(), "still listening after down: {still:?}");
    assert!(
        !sim.run_dir.exists(),
        "{} still exists",
        sim.run_dir.display()
    );
    assert!(
        !sim.kubeconfig.exists(),
        "{} still exists",
        sim.kubeconfig.display()
    );
    assert_all_gone(&sim.run_dir);
}

/// Real nodes: `down` stops their kubelets, containerds, shims and
/// containers, unmounts, removes their cgroups, bridges and CNI state and the
/// registries; a second `up` after `down` works, and so does its `down`.
#[tokio::test]
#[ignore = "starts and stops real nodes; make test runs it after all other tests"]
async fn down_removes_real_nodes_and_up_works_again() {
    let sim = support::sim().await;
    let nodes = support::node_count().to_string();
    let clusters = sim.clusters.len().to_string();
    let up = [
        "--clusters",
        clusters.as_str(),
        "--nodes",
        nodes.as_str(),
        "--real-nodes",
        "1",
    ];
    for round in 1..=2 {
        run_script("up", &up);
        let real = sim.run_dir.join("real-nodes");
        let daemons = processes_naming(&real);
        // A kubelet and a containerd at least, plus a shim per running pod.
        assert!(
            daemons.len() >= 2,
            "round {round}: real-node processes: {daemons:?}"
        );
        run_script("down", &[]);
        assert_all_gone(&sim.run_dir);
    }
}
