//! One process per data directory: an advisory lock held for the node's lifetime.
//!
//! The data directory holds the node's identity key. Two processes that load the same key are
//! the same peer to the network: a viewer started beside a broadcaster on one machine (both with
//! the default `~/.local/share/waterfall`) would dial itself and find no room. So a node takes an
//! exclusive advisory lock (`flock` on Unix, `LockFileEx` on Windows, through std's
//! [`File::try_lock`]) on `<dir>/lock` and keeps it until it stops. A second process finds the
//! lock taken and runs with a fresh in-memory identity instead ([`Claim::InUse`]); it never waits,
//! because the first may run for days.
//!
//! The lock is advisory and released by the kernel when the holder exits, however it exits
//! (`kill -9` included), so a stale lock file never blocks the next run. The holder writes its
//! process id into the file so that the second process can say who holds it. A filesystem
//! without locks (some network mounts) gives an I/O error rather than "would block": the
//! directory is then used unlocked, as before this lock existed, and the error is logged.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::crypto::{CryptoError, Identity};

/// Name of the lock file inside the data directory.
const LOCK_FILE: &str = "lock";

/// Errors claiming a data directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// The directory or its lock file could not be created or opened.
    #[error("data directory {}: {source}", path.display())]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The identity key in it could not be read or written.
    #[error(transparent)]
    Identity(#[from] CryptoError),
}

/// A data directory this process holds (the lock is released when it is dropped).
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Held open for the lock; `None` on a filesystem that has no locks.
    _lock: Option<File>,
}

/// The outcome of [`DataDir::claim`].
#[derive(Debug)]
pub enum Claim {
    /// This process holds the directory: its identity is ours to use.
    Held(DataDir),
    /// Another process holds it.
    InUse {
        /// The directory.
        path: PathBuf,
        /// The holder's process id, when it wrote one.
        holder: Option<u32>,
    },
}

impl DataDir {
    /// Creates the directory (mode 0700 on Unix) if needed and tries to lock it; never blocks.
    pub fn claim(path: impl AsRef<Path>) -> Result<Claim, DataDirError> {
        let path = path.as_ref().to_path_buf();
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| DataDirError::Io { path: p, source }
        };
        create_private_dir(&path).map_err(io(&path))?;
        let lock_path = path.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match file.try_lock() {
            Ok(()) => {
                // Best effort: the pid only makes the other process's notice more helpful.
                let pid = std::process::id().to_string();
                let _ = file
                    .set_len(0)
                    .and_then(|_| file.rewind())
                    .and_then(|_| file.write_all(pid.as_bytes()));
                Ok(Claim::Held(DataDir {
                    path,
                    _lock: Some(file),
                }))
            }
            Err(TryLockError::WouldBlock) => {
                let mut s = String::new();
                let holder = file
                    .read_to_string(&mut s)
                    .ok()
                    .and_then(|_| s.trim().parse().ok());
                Ok(Claim::InUse { path, holder })
            }
            Err(TryLockError::Error(e)) => {
                tracing::warn!(
                    "cannot lock {}: {e}; using it unlocked (two processes sharing it would share \
                     one identity)",
                    lock_path.display()
                );
                Ok(Claim::Held(DataDir { path, _lock: None }))
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The identity kept in this directory, created on first use.
    pub fn identity(&self) -> Result<Identity, DataDirError> {
        Ok(Identity::load_or_create(&self.path)?)
    }
}

#[cfg(unix)]
fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

#[cfg(not(unix))]
fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_finds_the_directory_in_use_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let Claim::Held(first) = DataDir::claim(dir.path()).unwrap() else {
            panic!("a fresh directory is free");
        };
        let id = first.identity().unwrap();
        match DataDir::claim(dir.path()).unwrap() {
            Claim::InUse { path, holder } => {
                assert_eq!(path, dir.path());
                assert_eq!(holder, Some(std::process::id()));
            }
            Claim::Held(_) => panic!("the directory is held by `first`"),
        }
        drop(first);
        let Claim::Held(again) = DataDir::claim(dir.path()).unwrap() else {
            panic!("dropping the holder releases the lock");
        };
        assert_eq!(again.identity().unwrap().peer_id(), id.peer_id());
    }
}
