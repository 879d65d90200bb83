//! Ends the agent when its `--config` file changes, as kube-proxy does (spec
//! kube-proxy-agent.md §1.1): the supervisor (kubelet, systemd) restarts it with the new
//! configuration. The file's directory is watched, so that a ConfigMap's atomic symlink swap
//! is seen too, and only a change of the file's content counts.

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

/// Watches `path`, whose content at start-up was `started_with`; sends one error on `fatal`
/// when the content differs, then returns.
pub async fn watch_config_file(
    path: PathBuf,
    started_with: String,
    fatal: UnboundedSender<anyhow::Error>,
) {
    let Some(dir) = path.parent().map(|p| p.to_path_buf()) else {
        return;
    };
    let (tx, mut rx) = unbounded_channel();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(err) => {
            tracing::warn!("cannot watch --config {}: {err}", path.display());
            return;
        }
    };
    if let Err(err) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!("cannot watch --config {}: {err}", path.display());
        return;
    }
    while rx.recv().await.is_some() {
        // Let a burst of events (a ConfigMap update) settle first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while rx.try_recv().is_ok() {}
        let now = tokio::fs::read_to_string(&path).await.unwrap_or_default();
        if now != started_with {
            let _ = fatal.send(anyhow::anyhow!(
                "the configuration file {} changed; exiting so that the agent restarts with it",
                path.display()
            ));
            return;
        }
    }
}
