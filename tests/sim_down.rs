//! `clusters/sim/down` stops everything `up` started. It stops the clusters
//! every other test uses, so it is ignored by a plain `cargo test`; `make
//! test` runs it last: `cargo test --test sim_down -- --ignored`.

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

#[tokio::test]
#[ignore = "stops the sim clusters; make test runs it after all other tests"]
async fn down_leaves_no_process_or_port_behind() {
    let sim = support::sim().await;
    let pids = recorded_pids(&sim.run_dir);
    // etcd, kube-apiserver and kwok per cluster.
    assert_eq!(pids.len(), 3 * sim.clusters.len(), "pid files: {pids:?}");
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
}
