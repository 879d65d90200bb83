//! A directory of manifests as a source for the agent (`kproxy run --from-dir`): read at start,
//! re-read whenever something in it changes (inotify through `notify`). A file that fails to
//! read or parse keeps its last good content and is reported; it never stops the agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc::{self, UnboundedSender};

use super::listing::{list_manifest_dir, read_regular_file, Skipped};
use super::{Escaped, Kind, Manifests, Object, SourceEvent};

/// How long to wait for more events after one, so that an editor's several writes or a
/// ConfigMap's symlink swap lead to one re-read.
const SETTLE: Duration = Duration::from_millis(50);

#[derive(Debug)]
struct FileContent {
    data: Vec<u8>,
    manifests: Manifests,
}

/// The manifests of one directory, by file, with each file's last good content.
#[derive(Debug)]
pub struct ManifestDir {
    path: PathBuf,
    files: BTreeMap<PathBuf, FileContent>,
    /// The content of files that failed to parse, so that each failure is reported once.
    failed: BTreeMap<PathBuf, Vec<u8>>,
    /// The entries skipped at the last reading, so that each is reported once.
    skipped: Vec<Skipped>,
}

impl ManifestDir {
    pub fn new(path: impl Into<PathBuf>) -> ManifestDir {
        ManifestDir {
            path: path.into(),
            files: BTreeMap::new(),
            failed: BTreeMap::new(),
            skipped: Vec::new(),
        }
    }

    /// Re-reads the directory. Files that changed are parsed again; a file that cannot be
    /// read or parsed keeps its previous content. Returns a message for everything worth
    /// reporting (bad files, entries that are not read, ignored kinds, objects that do not
    /// match the schema), each once per change.
    pub fn reread(&mut self) -> Result<Vec<String>, std::io::Error> {
        let mut reports = Vec::new();
        let listing = list_manifest_dir(&self.path)?;
        reports.extend(
            listing
                .skipped
                .iter()
                .filter(|entry| !self.skipped.contains(entry))
                .map(|entry| entry.note().to_string()),
        );
        self.skipped = listing.skipped;
        let present = listing.files;
        self.files.retain(|path, _| present.contains(path));
        self.failed.retain(|path, _| present.contains(path));
        for path in present {
            let origin = path.display().to_string();
            let data = match read_regular_file(&path) {
                Ok(Some(data)) => data,
                Ok(None) => {
                    reports.push(format!(
                        "{}: not a regular file any more; keeping its last good content",
                        Escaped(&origin)
                    ));
                    continue;
                }
                Err(err) => {
                    reports.push(format!(
                        "cannot read {}: {err}; keeping its last good content",
                        Escaped(&origin)
                    ));
                    continue;
                }
            };
            if self.files.get(&path).is_some_and(|f| f.data == data)
                || self.failed.get(&path) == Some(&data)
            {
                continue;
            }
            let mut manifests = Manifests::default();
            match manifests.add_bytes(&data, &origin) {
                Ok(()) => {
                    reports.extend(manifests.notes.iter().map(ToString::to_string));
                    self.failed.remove(&path);
                    self.files.insert(path, FileContent { data, manifests });
                }
                Err(err) => {
                    let kept = if self.files.contains_key(&path) {
                        "keeping its last good content"
                    } else {
                        "ignoring it until it parses"
                    };
                    reports.push(format!("{}; {kept}", err.with_causes()));
                    self.failed.insert(path, data);
                }
            }
        }
        Ok(reports)
    }

    /// Every object of every file, in file order.
    pub fn objects(&self) -> (Vec<Object>, Vec<Object>) {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for file in self.files.values() {
            let state = &file.manifests.state;
            services.extend(
                state
                    .services
                    .iter()
                    .map(|s| Object::Service(Box::new(s.clone()))),
            );
            slices.extend(
                state
                    .endpoint_slices
                    .iter()
                    .map(|s| Object::EndpointSlice(Box::new(s.clone()))),
            );
        }
        (services, slices)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads `dir` and sends its objects as complete lists, then again after every change, until
/// the receiver is gone. Fails only when the directory cannot be watched at all.
pub async fn watch_dir(
    mut dir: ManifestDir,
    events: UnboundedSender<SourceEvent>,
) -> anyhow::Result<()> {
    let (notify_tx, mut notify_rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the files makes access events of our own: only changes count.
        let relevant = match &event {
            Ok(event) => !matches!(event.kind, notify::EventKind::Access(_)),
            Err(_) => true,
        };
        if relevant {
            let _ = notify_tx.send(event.map(|_| ()));
        }
    })?;
    watcher
        .watch(dir.path(), RecursiveMode::NonRecursive)
        .map_err(|err| {
            anyhow::anyhow!("cannot watch the directory {}: {err}", dir.path().display())
        })?;
    loop {
        match dir.reread() {
            Ok(reports) => {
                for report in reports {
                    tracing::warn!("{report}");
                }
                let (services, slices) = dir.objects();
                for (kind, objects) in [(Kind::Service, services), (Kind::EndpointSlice, slices)] {
                    if events.send(SourceEvent::Listed { kind, objects }).is_err() {
                        return Ok(());
                    }
                }
            }
            Err(err) => tracing::warn!(
                "cannot list the directory {}: {err}; keeping what was read before",
                dir.path().display()
            ),
        }
        // Wait for a change, then for the burst of events it comes with to settle.
        match notify_rx.recv().await {
            None => return Ok(()),
            Some(Err(err)) => tracing::warn!("watching {} failed: {err}", dir.path().display()),
            Some(Ok(())) => {}
        }
        loop {
            match tokio::time::timeout(SETTLE, notify_rx.recv()).await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n";

    #[test]
    fn a_broken_file_keeps_its_last_good_content() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a.yaml");
        std::fs::write(&file, SERVICE).unwrap();
        std::fs::write(tmp.path().join("notes.txt"), "not a manifest").unwrap();
        let mut dir = ManifestDir::new(tmp.path());
        assert!(dir.reread().unwrap().is_empty());
        assert_eq!(dir.objects().0.len(), 1);

        std::fs::write(&file, "kind: Service\nmetadata: [\n").unwrap();
        let reports = dir.reread().unwrap();
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(
            reports[0].contains("a.yaml: malformed YAML/JSON at line"),
            "{}",
            reports[0]
        );
        assert!(reports[0].ends_with("keeping its last good content"));
        assert_eq!(dir.objects().0.len(), 1, "the last good Service stays");
        assert!(
            dir.reread().unwrap().is_empty(),
            "a failure is reported once"
        );

        std::fs::remove_file(&file).unwrap();
        dir.reread().unwrap();
        assert!(dir.objects().0.is_empty(), "a removed file's objects go");
    }

    #[test]
    fn skipped_entries_are_reported_once_and_a_fifo_does_not_block() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a.yaml"), SERVICE).unwrap();
        std::os::unix::fs::symlink("gone.yaml", tmp.path().join("b.yaml")).unwrap();
        let fifo = std::ffi::CString::new(
            tmp.path()
                .join("c.yaml")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let mut dir = ManifestDir::new(tmp.path());
        let reports = dir.reread().unwrap();
        let expected = [
            format!(
                "note: {}: not read: a dangling symbolic link (its target does not exist)",
                tmp.path().join("b.yaml").display()
            ),
            format!(
                "note: {}: not read: a FIFO, not a regular file",
                tmp.path().join("c.yaml").display()
            ),
        ];
        assert_eq!(reports, expected);
        assert_eq!(dir.objects().0.len(), 1);
        assert!(dir.reread().unwrap().is_empty(), "reported once");
        std::fs::remove_file(tmp.path().join("c.yaml")).unwrap();
        std::fs::create_dir(tmp.path().join("c.yaml")).unwrap();
        let reports = dir.reread().unwrap();
        assert_eq!(
            reports,
            [format!(
                "note: {}: not read: a directory (subdirectories are not read)",
                tmp.path().join("c.yaml").display()
            )],
            "a changed entry is reported again"
        );
    }
}
