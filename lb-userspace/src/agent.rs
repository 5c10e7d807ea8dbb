//! `lb run`: load and attach the data plane, fill it from the config, serve
//! metrics, reload on SIGHUP, detach cleanly on SIGINT/SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    balancer::Balancer,
    config::{self, Config},
    dataplane::{self, Dataplane},
    metrics,
};

/// Options of `lb run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Path of the TOML configuration.
    pub config: PathBuf,
    /// Path of the `lb-xdp` object; found automatically when `None`.
    pub bpf_object: Option<PathBuf>,
}

fn load_config(path: &Path) -> Result<Config> {
    config::load(path).map_err(|errors| anyhow!("invalid configuration:\n{errors}"))
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(opts: RunOptions) -> Result<()> {
    let config = load_config(&opts.config)?;
    let object = match &opts.bpf_object {
        Some(p) => p.clone(),
        None => dataplane::default_object_path()?,
    };
    let dataplane = Dataplane::load(&object)?;
    let mut balancer = Balancer::new(dataplane);
    // Tables are complete before the first packet can reach the program.
    balancer.apply(&config)?;
    for iface in &config.interfaces {
        let mode = balancer.dataplane().attach(iface, config.xdp_mode)?;
        info!(%iface, ?mode, "XDP program attached");
    }
    let balancer = Arc::new(Mutex::new(balancer));
    let metrics_task = match config.metrics {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding metrics endpoint {addr}"))?;
            info!(%addr, "serving metrics");
            Some(tokio::spawn(metrics::serve(listener, balancer.clone())))
        }
        None => None,
    };
    info!(services = config.services.len(), "load balancer running");

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => reload(&opts.config, &balancer),
        }
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    // Dropping the data plane closes the XDP links, which detaches the program.
    drop(balancer);
    info!("detached; bye");
    Ok(())
}

/// Re-reads the config; a bad one is reported and the running one stays in force.
fn reload(path: &Path, balancer: &Arc<Mutex<Balancer>>) {
    let new = match load_config(path) {
        Ok(c) => c,
        Err(e) => {
            error!("reload rejected, keeping the running configuration: {e:#}");
            return;
        }
    };
    let Ok(mut balancer) = balancer.lock() else {
        error!("reload skipped: balancer state poisoned");
        return;
    };
    if let Some(old) = balancer.config()
        && (old.interfaces != new.interfaces || old.metrics != new.metrics)
    {
        warn!("interfaces and metrics address take effect on restart only");
    }
    match balancer.apply(&new) {
        Ok(summary) => info!(?summary, "configuration reloaded"),
        Err(e) => error!("reload failed part-way: {e:#}"),
    }
}
