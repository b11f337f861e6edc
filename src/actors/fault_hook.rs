//! Test-only fault injection, compiled only with the `test-hooks` feature
//! (the integration tests build with it; `cargo build --release` and the
//! image do not): with `KUBE_PREFETCH_TEST_PANIC_DIR` set, a ClusterActor
//! panics inside its own context when a file named after its cluster
//! appears in that directory. The file is removed first, so the restarted
//! actor runs normally: one file, one panic.

use std::path::PathBuf;
use std::time::Duration;

use actix::prelude::*;

/// Set by the tests to a directory they create the trigger files in.
pub const PANIC_DIR_VARIABLE: &str = "KUBE_PREFETCH_TEST_PANIC_DIR";

/// Polls for the trigger file of `cluster` while the actor runs.
pub fn arm<A>(ctx: &mut Context<A>, cluster: &str)
where
    A: Actor<Context = Context<A>>,
{
    let Some(dir) = std::env::var_os(PANIC_DIR_VARIABLE) else {
        return;
    };
    let trigger = PathBuf::from(dir).join(cluster);
    let cluster = cluster.to_string();
    ctx.run_interval(Duration::from_millis(200), move |_, _| {
        if std::fs::remove_file(&trigger).is_ok() {
            panic!("test hook: injected panic in cluster {cluster}");
        }
    });
}
