//! Which entries of a manifest directory are read, for `render DIR` and `run --from-dir DIR`
//! alike: the regular files (or links to them) named `*.yaml`, `*.yml` or `*.json`, in name
//! order. Other entries that could be meant as manifests (subdirectories, dangling links, link
//! loops, FIFOs, sockets, devices, entries whose type cannot be read) are skipped with a
//! reason. Files with other names are ignored without a note, as `kubectl apply -f DIR` does,
//! and so are hidden entries (`.name`: editors' swap files, a ConfigMap volume's `..data`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::note::Note;

/// What a directory holds for kproxy.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// The manifest files, in name order.
    pub files: Vec<PathBuf>,
    /// Entries not read, in name order.
    pub skipped: Vec<Skipped>,
}

/// A directory entry that is not read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

impl Skipped {
    pub fn note(&self) -> Note {
        Note::SkippedEntry {
            path: self.path.display().to_string(),
            reason: self.reason.clone(),
        }
    }
}

pub fn is_manifest_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Lists `dir` (not recursing). Fails only when the directory itself cannot be read.
pub fn list_manifest_dir(dir: &Path) -> io::Result<Listing> {
    let mut listing = Listing::default();
    for entry in fs::read_dir(dir)? {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                listing.skipped.push(Skipped {
                    path: dir.to_path_buf(),
                    reason: format!("an entry cannot be read: {err}"),
                });
                continue;
            }
        };
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        match entry_kind(&path) {
            EntryKind::File if is_manifest_file(&path) => listing.files.push(path),
            EntryKind::File => {}
            EntryKind::Skip(reason) => listing.skipped.push(Skipped { path, reason }),
        }
    }
    listing.files.sort();
    listing.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(listing)
}

enum EntryKind {
    File,
    Skip(String),
}

/// What an entry is, following symbolic links.
fn entry_kind(path: &Path) -> EntryKind {
    let metadata = match fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(err) => {
            let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            return EntryKind::Skip(match err.raw_os_error() {
                Some(libc::ELOOP) => "a symbolic link loop".to_string(),
                Some(libc::ENOENT) if is_link => {
                    "a dangling symbolic link (its target does not exist)".to_string()
                }
                _ => format!("its type cannot be read: {err}"),
            });
        }
    };
    let file_type = metadata.file_type();
    let what = if file_type.is_file() {
        return EntryKind::File;
    } else if file_type.is_dir() {
        "a directory (subdirectories are not read)"
    } else if file_type.is_fifo() {
        "a FIFO, not a regular file"
    } else if file_type.is_socket() {
        "a socket, not a regular file"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device, not a regular file"
    } else {
        "not a regular file"
    };
    EntryKind::Skip(what.to_string())
}

/// Reads a file found in a directory listing; `None` when it is not a regular file (any
/// more). Opening does not block on a FIFO put in its place, and nothing else is read.
pub fn read_regular_file(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    file.read_to_end(&mut data)?;
    Ok(Some(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mkfifo(path: &Path) {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn skipped_entries_are_listed_with_why() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("b.yaml"), "").unwrap();
        fs::write(dir.join("a.json"), "").unwrap();
        fs::write(dir.join("README.md"), "").unwrap();
        fs::write(dir.join(".swap.yaml"), "").unwrap();
        symlink("b.yaml", dir.join("c.yml")).unwrap();
        symlink("missing.yaml", dir.join("dangling.yaml")).unwrap();
        symlink("loop.yaml", dir.join("loop.yaml")).unwrap();
        fs::create_dir(dir.join("sub.yaml")).unwrap();
        mkfifo(&dir.join("fifo.yaml"));

        let listing = list_manifest_dir(dir).unwrap();
        let names = |paths: Vec<&PathBuf>| -> Vec<String> {
            paths
                .into_iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(listing.files.iter().collect()),
            ["a.json", "b.yaml", "c.yml"]
        );
        let skipped: Vec<(String, &str)> = listing
            .skipped
            .iter()
            .map(|s| {
                let name = s.path.file_name().unwrap().to_string_lossy().into_owned();
                (name, s.reason.as_str())
            })
            .collect();
        assert_eq!(
            skipped,
            [
                (
                    "dangling.yaml".to_string(),
                    "a dangling symbolic link (its target does not exist)"
                ),
                ("fifo.yaml".to_string(), "a FIFO, not a regular file"),
                ("loop.yaml".to_string(), "a symbolic link loop"),
                (
                    "sub.yaml".to_string(),
                    "a directory (subdirectories are not read)"
                ),
            ]
        );
    }

    #[test]
    fn reading_a_fifo_does_not_hang() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("x.yaml");
        mkfifo(&fifo);
        // No writer: a blocking open would wait forever.
        assert_eq!(read_regular_file(&fifo).unwrap(), None);
    }
}
