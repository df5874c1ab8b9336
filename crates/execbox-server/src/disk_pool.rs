//! Disks made ahead of the creates that need them: a background thread keeps a few sandbox
//! disks of the default size copied, attached to a loop device and mounted, so that a create
//! only moves one into place. Copying, attaching and mounting a disk are the slowest steps of
//! staging a root; a create that finds the pool empty (a burst, another size) makes its own.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use execbox_jail::storage;

/// Disks kept ready.
const READY: usize = 2;

/// A disk ready for a sandbox: its file and where it is mounted.
struct ReadyDisk {
    file: PathBuf,
    mount: PathBuf,
}

/// Ready disks of one size.
pub(crate) struct DiskPool {
    size: u64,
    /// The formatted empty disk each is a copy of.
    golden: PathBuf,
    /// Where their files wait (a directory of the state directory's file system, so that a
    /// rename gives one to a sandbox).
    files: PathBuf,
    /// Where they are mounted (in the server's private mount namespace).
    mounts: PathBuf,
    ready: Mutex<Vec<ReadyDisk>>,
    wanted: Condvar,
}

impl DiskPool {
    /// Starts keeping disks of `size` (copies of `golden`) ready. What a previous server left
    /// in `files` goes: its mounts died with its mount namespace.
    pub(crate) fn start(
        size: u64,
        golden: PathBuf,
        files: PathBuf,
        mounts: PathBuf,
    ) -> Arc<DiskPool> {
        let _ = std::fs::remove_dir_all(&files);
        let _ = std::fs::create_dir_all(&files);
        let _ = std::fs::create_dir_all(&mounts);
        let pool = Arc::new(DiskPool {
            size,
            golden,
            files,
            mounts,
            ready: Mutex::new(Vec::new()),
            wanted: Condvar::new(),
        });
        let filler = pool.clone();
        let spawned = std::thread::Builder::new()
            .name("disk-pool".into())
            .spawn(move || filler.fill());
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no disk pool: every create makes its own disk");
        }
        pool
    }

    fn fill(&self) {
        let mut made: u64 = 0;
        loop {
            {
                let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
                while ready.len() >= READY {
                    ready = self.wanted.wait(ready).unwrap_or_else(|p| p.into_inner());
                }
            }
            made += 1;
            match self.make(made) {
                Ok(disk) => self
                    .ready
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(disk),
                Err(e) => {
                    tracing::warn!(error = %e, "making a ready disk failed");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    fn make(&self, n: u64) -> std::io::Result<ReadyDisk> {
        let file = self.files.join(format!("{n}.ext4"));
        let mount = self.mounts.join(n.to_string());
        storage::sparse_copy(&self.golden, &file)?;
        std::fs::create_dir_all(&mount)?;
        if let Err(e) = storage::mount_disk(&file, &mount, None) {
            let _ = std::fs::remove_file(&file);
            let _ = std::fs::remove_dir(&mount);
            return Err(e);
        }
        Ok(ReadyDisk { file, mount })
    }

    /// Gives a ready disk of `size` to a sandbox: its file becomes `file`, its mount moves to
    /// `target`. False when none is ready (or it is another size): the caller makes its own.
    pub(crate) fn take(&self, size: u64, file: &Path, target: &Path) -> bool {
        if size != self.size {
            return false;
        }
        let disk = {
            let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
            let disk = ready.pop();
            self.wanted.notify_one();
            disk
        };
        let Some(disk) = disk else {
            return false;
        };
        let moved = std::fs::rename(&disk.file, file)
            .and_then(|()| storage::move_mount(&disk.mount, target));
        match moved {
            Ok(()) => {
                let _ = std::fs::remove_dir(&disk.mount);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "using a ready disk failed");
                let _ = storage::detach(&disk.mount);
                let _ = std::fs::remove_dir(&disk.mount);
                let _ = std::fs::remove_file(&disk.file);
                let _ = std::fs::remove_file(file);
                false
            }
        }
    }
}
