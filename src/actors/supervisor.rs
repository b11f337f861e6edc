//! Starts one ClusterActor per kubeconfig context, each on its own Arbiter
//! (its own thread and runtime), and applies config reloads by adding and
//! removing clusters without touching the others.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;
use tracing::{error, info};

use crate::actors::cluster::ClusterActor;
use crate::actors::status::{ClusterAdded, ClusterRemoved, StatusActor};
use crate::config::{self, ClusterTarget, Config};
use crate::metrics::Metrics;

struct RunningCluster {
    target: ClusterTarget,
    arbiter: Arbiter,
    _addr: Addr<ClusterActor>,
}

pub struct Supervisor {
    config_path: PathBuf,
    config: Arc<Config>,
    targets: Vec<ClusterTarget>,
    status: Addr<StatusActor>,
    metrics: Metrics,
    running: BTreeMap<String, RunningCluster>,
}

impl Supervisor {
    pub fn new(
        config_path: PathBuf,
        config: Config,
        targets: Vec<ClusterTarget>,
        status: Addr<StatusActor>,
        metrics: Metrics,
    ) -> Self {
        Supervisor {
            config_path,
            config: Arc::new(config),
            targets,
            status,
            metrics,
            running: BTreeMap::new(),
        }
    }

    fn start_cluster(&mut self, target: ClusterTarget) {
        let arbiter = Arbiter::new();
        let config = self.config.clone();
        let status = self.status.clone();
        let metrics = self.metrics.clone();
        let actor_target = target.clone();
        self.status.do_send(ClusterAdded {
            cluster: target.name.clone(),
        });
        let addr = ClusterActor::start_in_arbiter(&arbiter.handle(), move |_| {
            ClusterActor::new(actor_target, config, status, metrics)
        });
        self.running.insert(
            target.name.clone(),
            RunningCluster {
                target,
                arbiter,
                _addr: addr,
            },
        );
    }

    fn stop_cluster(&mut self, name: &str) {
        if let Some(running) = self.running.remove(name) {
            info!(cluster = %name, "stopping cluster");
            // Stopping the Arbiter drops its actors, their watches and client.
            running.arbiter.stop();
            self.status.do_send(ClusterRemoved {
                cluster: name.to_string(),
            });
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        for target in self.targets.clone() {
            self.start_cluster(target);
        }
        info!(clusters = self.running.len(), "supervisor started");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            self.stop_cluster(&name);
        }
    }
}

/// Re-read the config file (SIGHUP).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reload;

impl Handler<Reload> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Reload, _: &mut Self::Context) {
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
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, running)| {
                settings_changed || wanted.get(*name) != Some(&running.target)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.stop_cluster(&name);
        }
        for (name, target) in wanted {
            if !self.running.contains_key(&name) {
                info!(cluster = %name, "starting cluster");
                self.start_cluster(target);
            }
        }
        info!(clusters = self.running.len(), "config reloaded");
    }
}
