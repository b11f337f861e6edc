//! Starts one ClusterActor per kubeconfig context, each on its own Arbiter
//! (its own thread and runtime), and applies config reloads by adding and
//! removing clusters without touching the others.
//!
//! Failure isolation: a panic on a cluster's thread (its ClusterActor, its
//! PrefetchActors, the watch tasks they spawn) is reported here by a panic
//! hook; that cluster's Arbiter is stopped (its state may be half-updated)
//! and started afresh after a backoff. The other clusters run on.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Once, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::{error, info};

use crate::actors::cluster::ClusterActor;
use crate::actors::status::{
    ClusterAdded, ClusterCrashed, ClusterRemoved, ClusterRestarted, StatusActor,
};
use crate::config::{self, ClusterTarget, Config};
use crate::leader::WriteGate;
use crate::metrics::Metrics;

/// The running clusters' actors by name, for the HTTP endpoints that ask a
/// cluster what only it holds (a Prefetch's drill-down). The supervisor
/// keeps it current: a cluster is in it from its start until it stops or
/// panics, and back in when it restarts.
#[derive(Clone, Default)]
pub struct ClusterRegistry(Arc<RwLock<BTreeMap<String, Addr<ClusterActor>>>>);

impl ClusterRegistry {
    pub fn get(&self, cluster: &str) -> Option<Addr<ClusterActor>> {
        self.read(|clusters| clusters.get(cluster).cloned())
    }

    fn insert(&self, cluster: &str, addr: Addr<ClusterActor>) {
        self.write(|clusters| clusters.insert(cluster.to_string(), addr));
    }

    fn remove(&self, cluster: &str) {
        self.write(|clusters| clusters.remove(cluster));
    }

    // A panic elsewhere while holding the lock leaves a map that is still
    // whole (each write is one insert or remove): use it.
    fn read<T>(&self, f: impl FnOnce(&BTreeMap<String, Addr<ClusterActor>>) -> T) -> T {
        f(&self
            .0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    fn write<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Addr<ClusterActor>>) -> T) -> T {
        f(&mut self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

struct RunningCluster {
    target: ClusterTarget,
    arbiter: Arbiter,
    /// Tells a panic report of this run from one of an earlier run.
    incarnation: u64,
    started: Instant,
}

/// A cluster stopped after a panic, waiting for its restart.
struct CrashedCluster {
    target: ClusterTarget,
    restart: SpawnHandle,
}

/// A run that lasted this long before panicking resets the backoff: the
/// panic is a new one, not the same one again.
const STABLE_RUN: Duration = Duration::from_secs(600);

/// Delay before the `consecutive`-th restart in a row (1-based): 1 s
/// doubling to 5 min, so a cluster that panics at once on every start costs
/// little, and one that panicked once comes back quickly.
pub fn restart_delay(consecutive: u32) -> Duration {
    let exponent = consecutive.saturating_sub(1).min(9);
    Duration::from_secs(1u64 << exponent).min(Duration::from_secs(300))
}

/// A panic on some cluster's thread.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClusterPanicked {
    pub cluster: String,
    pub incarnation: u64,
    /// "panicked at file:line:column: message".
    pub panic: String,
}

/// Whom the panic hook tells about a panic on this thread.
struct PanicReporter {
    cluster: String,
    incarnation: u64,
    supervisor: Recipient<ClusterPanicked>,
}

thread_local! {
    /// Set on each cluster's Arbiter thread (one thread per cluster).
    static CLUSTER_OF_THREAD: RefCell<Option<PanicReporter>> = const { RefCell::new(None) };
}

/// The panic's location and message, without Rust's "thread ... panicked" framing.
fn describe_panic(info: &std::panic::PanicHookInfo<'_>) -> String {
    // `panic!` with a literal gives a &str, with arguments a String
    // (`PanicHookInfo::payload_as_str` is newer than our MSRV).
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)");
    match info.location() {
        Some(location) => format!("panicked at {location}: {message}"),
        None => format!("panicked: {message}"),
    }
}

/// Installs (once per process) the hook that reports a panic on a cluster's
/// thread to the supervisor; panics elsewhere go to the previous hook.
fn install_panic_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let reported = CLUSTER_OF_THREAD
                .try_with(|slot| {
                    let slot = slot.try_borrow().ok()?;
                    let reporter = slot.as_ref()?;
                    let panic = describe_panic(info);
                    error!(cluster = %reporter.cluster, %panic, "cluster panicked; stopping it");
                    reporter.supervisor.do_send(ClusterPanicked {
                        cluster: reporter.cluster.clone(),
                        incarnation: reporter.incarnation,
                        panic,
                    });
                    Some(())
                })
                .ok()
                .flatten();
            if reported.is_none() {
                previous(info);
            }
        }));
    });
}

pub struct Supervisor {
    config_path: PathBuf,
    config: Arc<Config>,
    targets: Vec<ClusterTarget>,
    gate: WriteGate,
    status: Addr<StatusActor>,
    metrics: Metrics,
    registry: ClusterRegistry,
    running: BTreeMap<String, RunningCluster>,
    crashed: BTreeMap<String, CrashedCluster>,
    /// Panics in a row per cluster (reset by a stable run), for the backoff.
    consecutive_panics: BTreeMap<String, u32>,
    next_incarnation: u64,
    /// After [`StopClusters`]: nothing starts again.
    stopped: bool,
}

impl Supervisor {
    pub fn new(
        config_path: PathBuf,
        config: Config,
        targets: Vec<ClusterTarget>,
        gate: WriteGate,
        status: Addr<StatusActor>,
        metrics: Metrics,
        registry: ClusterRegistry,
    ) -> Self {
        Supervisor {
            config_path,
            config: Arc::new(config),
            targets,
            gate,
            status,
            metrics,
            registry,
            running: BTreeMap::new(),
            crashed: BTreeMap::new(),
            consecutive_panics: BTreeMap::new(),
            next_incarnation: 0,
            stopped: false,
        }
    }

    fn start_cluster(&mut self, target: ClusterTarget, ctx: &mut Context<Self>) {
        let arbiter = Arbiter::new();
        let config = self.config.clone();
        let status = self.status.clone();
        let metrics = self.metrics.clone();
        let gate = self.gate.clone();
        let actor_target = target.clone();
        let incarnation = self.next_incarnation;
        self.next_incarnation = self.next_incarnation.wrapping_add(1);
        let reporter = PanicReporter {
            cluster: target.name.clone(),
            incarnation,
            supervisor: ctx.address().recipient(),
        };
        self.status.do_send(ClusterAdded {
            cluster: target.name.clone(),
        });
        // Runs on the new Arbiter's thread, before anything of the cluster.
        let addr = ClusterActor::start_in_arbiter(&arbiter.handle(), move |_| {
            CLUSTER_OF_THREAD.with(|slot| *slot.borrow_mut() = Some(reporter));
            ClusterActor::new(actor_target, config, gate, status, metrics)
        });
        self.registry.insert(&target.name, addr);
        self.running.insert(
            target.name.clone(),
            RunningCluster {
                target,
                arbiter,
                incarnation,
                started: Instant::now(),
            },
        );
    }

    fn stop_cluster(&mut self, name: &str, ctx: &mut Context<Self>) {
        let running = self.running.remove(name);
        let crashed = self.crashed.remove(name);
        self.registry.remove(name);
        if let Some(running) = running {
            info!(cluster = %name, "stopping cluster");
            // Stopping the Arbiter drops its actors, their watches and client.
            running.arbiter.stop();
        }
        if let Some(crashed) = &crashed {
            ctx.cancel_future(crashed.restart);
        }
        self.status.do_send(ClusterRemoved {
            cluster: name.to_string(),
        });
    }
}

impl Handler<ClusterPanicked> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: ClusterPanicked, ctx: &mut Self::Context) {
        let cluster = msg.cluster;
        // A second panic of the same run (another task on that thread), or
        // one of a run already replaced, changes nothing.
        let Some(running) = self.running.remove_entry(&cluster) else {
            return;
        };
        if running.1.incarnation != msg.incarnation {
            self.running.insert(running.0, running.1);
            return;
        }
        let (_, running) = running;
        self.registry.remove(&cluster);
        // Its state may be half-updated: drop all of it (actors, watches,
        // client) and start from the API servers' state again.
        running.arbiter.stop();
        let consecutive = self.consecutive_panics.entry(cluster.clone()).or_insert(0);
        if running.started.elapsed() >= STABLE_RUN {
            *consecutive = 0;
        }
        *consecutive = consecutive.saturating_add(1);
        let delay = restart_delay(*consecutive);
        error!(cluster = %cluster, panic = %msg.panic, restart_in = ?delay, panics_in_a_row = *consecutive, "cluster stopped after a panic");
        self.status.do_send(ClusterCrashed {
            cluster: cluster.clone(),
            reason: format!(
                "{}; restarting in {} (panics in a row: {})",
                msg.panic,
                humantime::format_duration(delay),
                *consecutive,
            ),
            panic: msg.panic,
        });
        let name = cluster.clone();
        let restart = ctx.run_later(delay, move |supervisor, ctx| {
            if let Some(crashed) = supervisor.crashed.remove(&name) {
                info!(cluster = %name, "restarting cluster after a panic");
                supervisor.status.do_send(ClusterRestarted {
                    cluster: name.clone(),
                });
                supervisor.start_cluster(crashed.target, ctx);
            }
        });
        self.crashed.insert(
            cluster,
            CrashedCluster {
                target: running.target,
                restart,
            },
        );
    }
}

impl Supervisor {
    /// Stops the running clusters and forgets the crashed ones.
    fn stop_every_cluster(&mut self, ctx: &mut Context<Self>) {
        let names: Vec<String> = self
            .running
            .keys()
            .chain(self.crashed.keys())
            .cloned()
            .collect();
        for name in names {
            self.stop_cluster(&name, ctx);
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        install_panic_hook();
        for target in self.targets.clone() {
            self.start_cluster(target, ctx);
        }
        info!(clusters = self.running.len(), "supervisor started");
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.stop_every_cluster(ctx);
    }
}

/// Stop every cluster now (shutdown, or the Lease lost): no more dispatch
/// while the process winds down.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopClusters;

impl Handler<StopClusters> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: StopClusters, ctx: &mut Self::Context) {
        // Nothing is reloaded or restarted after this.
        self.stopped = true;
        self.stop_every_cluster(ctx);
        info!("stopped every cluster");
    }
}

/// Re-read the config file (SIGHUP).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reload;

impl Handler<Reload> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Reload, ctx: &mut Self::Context) {
        if self.stopped {
            return;
        }
        let loaded = config::load(&self.config_path).and_then(|config| {
            let targets = config::resolve_clusters(&config)?;
            Ok((config, targets))
        });
        let (config, targets) = match loaded {
            Ok(loaded) => loaded,
            Err(problem) => {
                // A bad edit must not take down clusters that work.
                error!(error = %problem, "config reload failed; keeping the running configuration");
                return;
            }
        };
        // Cluster sources are compared per target below; every other setting
        // is shared by all clusters, so a change there restarts them all.
        let settings_changed = {
            let mut old = (*self.config).clone();
            let mut new = config.clone();
            old.kubeconfig.clear();
            new.kubeconfig.clear();
            old != new
        };
        self.config = Arc::new(config);
        let wanted: BTreeMap<String, ClusterTarget> = targets
            .into_iter()
            .map(|target| (target.name.clone(), target))
            .collect();
        // A crashed cluster waiting for its restart counts as running: it
        // restarts as planned unless its target or the settings changed.
        let stale: Vec<String> = self
            .running
            .iter()
            .map(|(name, running)| (name, &running.target))
            .chain(
                self.crashed
                    .iter()
                    .map(|(name, crashed)| (name, &crashed.target)),
            )
            .filter(|(name, target)| settings_changed || wanted.get(*name) != Some(*target))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.stop_cluster(&name, ctx);
        }
        for (name, target) in wanted {
            if !self.running.contains_key(&name) && !self.crashed.contains_key(&name) {
                info!(cluster = %name, "starting cluster");
                self.start_cluster(target, ctx);
            }
        }
        info!(clusters = self.running.len(), "config reloaded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delay_doubles_from_a_second_to_five_minutes() {
        let delays: Vec<u64> = [0, 1, 2, 3, 9, 10, 1000, u32::MAX]
            .into_iter()
            .map(|n| restart_delay(n).as_secs())
            .collect();
        assert_eq!(delays, [1, 1, 2, 4, 256, 300, 300, 300]);
    }
}
