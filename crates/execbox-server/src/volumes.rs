//! OpenSandbox `volumes`: host directories under the operator's allowlist and named volumes
//! (`pvc`) that execbox creates and keeps, each an ext4 disk of its own size under
//! `<state-dir>/volumes/<tenant>/<claim>/`, mounted once on the host and shared by every
//! sandbox that names it.
//!
//! Every path a request gives is resolved with `openat2` beneath a directory the server
//! trusts (an allowlisted prefix, a named volume's root): a symlink that leads out of it is
//! refused, and what a sandbox gets is a detached bind mount made from the opened descriptor
//! (see `execbox_jail::storage::detached_volume`), id-mapped so that the sandbox user's files
//! are the configured owner's on the host.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use execbox_jail::fsroot::Dir;
use execbox_jail::storage;
use execbox_proto::lifecycle::Volume;
use nix::fcntl::OFlag;

use crate::config::VolumesConfig;

/// A volume resolved for one sandbox: the directory it shows, opened.
#[derive(Debug)]
pub struct VolumeMount {
    /// The directory (an `O_PATH` descriptor), subPath included.
    pub source: OwnedFd,
    /// Where the sandbox sees it.
    pub mount_path: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// A named volume a sandbox uses, as its record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NamedVolumeRef {
    /// The claim name.
    pub claim: String,
    /// Remove the volume when the last sandbox using it is deleted.
    #[serde(default)]
    pub delete_on_termination: bool,
}

/// A volume the request cannot have: the client's mistake (400), naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct VolumeError {
    /// `volumes[i].…`.
    pub field: String,
    /// Why.
    pub message: String,
}

/// A named volume on this host.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NamedVolume {
    /// Tenant owning it.
    pub tenant: String,
    /// Claim name.
    pub claim: String,
    /// Size of its disk, in bytes.
    pub size_bytes: u64,
    /// Bytes its files take.
    pub used_bytes: u64,
}

/// Named volumes of one state directory, and the operator's rules for host volumes.
#[derive(Debug)]
pub struct Volumes {
    config: VolumesConfig,
    /// `<state-dir>/volumes`.
    dir: PathBuf,
    /// Creation and removal of named volumes, one at a time.
    lock: std::sync::Mutex<()>,
}

/// Mount points a volume may not take (or sit above): where execbox mounts its own things.
const RESERVED: &[&str] = &[
    "/proc",
    "/dev",
    "/sys",
    "/etc",
    "/run/execbox",
    "/.execbox",
    "/opt/execbox",
];

impl Volumes {
    /// The volumes of `state_dir` under `config`'s rules.
    pub fn new(state_dir: &Path, config: VolumesConfig) -> Volumes {
        Volumes {
            config,
            dir: state_dir.join("volumes"),
            lock: std::sync::Mutex::new(()),
        }
    }

    /// Host owner (uid, gid) of what sandboxes write through volumes.
    pub fn owner(&self) -> (u32, u32) {
        (self.config.owner_uid, self.config.owner_gid)
    }

    /// Resolves a request's volumes for `tenant`, creating named volumes as asked. Blocking.
    pub fn resolve(
        &self,
        tenant: &str,
        volumes: &[Volume],
    ) -> Result<(Vec<VolumeMount>, Vec<NamedVolumeRef>), VolumeError> {
        let mut mounts = Vec::new();
        let mut named = Vec::new();
        for (i, v) in volumes.iter().enumerate() {
            let err = |field: &str, message: String| VolumeError {
                field: format!("volumes[{i}]{field}"),
                message,
            };
            let mount_path = check_mount_path(&v.mount_path).map_err(|m| err(".mountPath", m))?;
            let root = if let Some(host) = &v.host {
                self.open_host(&host.path)
                    .map_err(|m| err(".host.path", m))?
            } else if let Some(pvc) = &v.pvc {
                let size = match &pvc.storage {
                    Some(q) => execbox_proto::quantity::parse_memory(q)
                        .map_err(|e| err(".pvc.storage", e.to_string()))?,
                    None => self.config.default_size_bytes,
                };
                if size > self.config.max_size_bytes {
                    return Err(err(
                        ".pvc.storage",
                        format!(
                            "{size} bytes is more than this server's largest volume ({} bytes)",
                            self.config.max_size_bytes
                        ),
                    ));
                }
                let dir = self
                    .open_named(
                        tenant,
                        &pvc.claim_name,
                        pvc.create_if_not_exists != Some(false),
                        size,
                    )
                    .map_err(|m| err(".pvc.claimName", m))?;
                named.push(NamedVolumeRef {
                    claim: pvc.claim_name.clone(),
                    delete_on_termination: pvc.delete_on_sandbox_termination == Some(true),
                });
                dir
            } else {
                return Err(err(
                    "",
                    "only host and pvc volumes are supported by this server".into(),
                ));
            };
            let source = match &v.sub_path {
                Some(sub) if !sub.is_empty() => self
                    .sub_dir(&root, Path::new(sub))
                    .map_err(|m| err(".subPath", m))?,
                _ => root
                    .fd()
                    .try_clone_to_owned()
                    .map_err(|e| err("", e.to_string()))?,
            };
            mounts.push(VolumeMount {
                source,
                mount_path,
                read_only: v.read_only == Some(true),
            });
        }
        Ok((mounts, named))
    }

    /// The host directory `path`, beneath one of the allowlisted prefixes.
    fn open_host(&self, path: &str) -> Result<Dir, String> {
        let path = Path::new(path);
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(format!("{} has '..' in it", path.display()));
        }
        let Some((prefix, rest)) = self
            .config
            .host_paths
            .iter()
            .find_map(|p| path.strip_prefix(p).ok().map(|rest| (p, rest)))
        else {
            return Err(if self.config.host_paths.is_empty() {
                "host volumes are not allowed by this server's configuration ([volumes] host_paths is empty)".into()
            } else {
                format!(
                    "{} is not under a directory this server shares ([volumes] host_paths: {})",
                    path.display(),
                    self.config
                        .host_paths
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
        };
        let base = Dir::open_trusted(prefix)
            .map_err(|e| format!("the shared directory {}: {e}", prefix.display()))?;
        if rest.as_os_str().is_empty() {
            return Ok(base);
        }
        base.resolve_beneath(rest, OFlag::O_PATH | OFlag::O_DIRECTORY, true)
            .map(Dir::from_fd)
            .map_err(|e| describe(path, &e))
    }

    /// `sub` beneath `root`, made (owned by the volume owner) when missing.
    fn sub_dir(&self, root: &Dir, sub: &Path) -> Result<OwnedFd, String> {
        // Symlinks are followed while they stay in the volume (`RESOLVE_BENEATH`).
        match root.resolve_beneath(sub, OFlag::O_PATH | OFlag::O_DIRECTORY, true) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(describe(sub, &e)),
        }
        let mut dir = root.try_clone().map_err(|e| e.to_string())?;
        for part in sub.components() {
            let Component::Normal(name) = part else {
                continue;
            };
            dir = match dir.resolve_beneath(
                Path::new(name),
                OFlag::O_PATH | OFlag::O_DIRECTORY,
                true,
            ) {
                Ok(fd) => Dir::from_fd(fd),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    dir.mkdir(name, 0o755).map_err(|e| describe(sub, &e))?;
                    let (uid, gid) = self.owner();
                    dir.chown(name, Some(uid), Some(gid))
                        .map_err(|e| describe(sub, &e))?;
                    dir.subdir(name).map_err(|e| describe(sub, &e))?
                }
                Err(e) => return Err(describe(sub, &e)),
            };
        }
        dir.fd().try_clone_to_owned().map_err(|e| e.to_string())
    }

    fn tenant_dir(&self, tenant: &str) -> PathBuf {
        self.dir.join(path_safe(tenant))
    }

    /// The root of the named volume `claim` of `tenant`, mounted (made first when `create`).
    fn open_named(
        &self,
        tenant: &str,
        claim: &str,
        create: bool,
        size: u64,
    ) -> Result<Dir, String> {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let home = self.tenant_dir(tenant).join(claim);
        let disk = home.join("disk.ext4");
        let mnt = home.join("mnt");
        if !disk.exists() {
            if !create {
                return Err(format!(
                    "no volume named {claim:?} (createIfNotExists is false)"
                ));
            }
            std::fs::create_dir_all(&mnt).map_err(|e| format!("creating the volume: {e}"))?;
            let partial = home.join("disk.ext4.partial");
            storage::format_volume(&partial, size, self.owner())
                .and_then(|()| std::fs::rename(&partial, &disk))
                .map_err(|e| format!("creating the volume: {e}"))?;
            tracing::info!(tenant, claim, size, "named volume created");
        }
        if !is_mount_point(&mnt) {
            std::fs::create_dir_all(&mnt).map_err(|e| format!("mounting the volume: {e}"))?;
            storage::mount_shared_disk(&disk, &mnt)
                .map_err(|e| format!("mounting the volume: {e}"))?;
        }
        Dir::open_trusted(&mnt).map_err(|e| format!("opening the volume: {e}"))
    }

    /// Every named volume.
    pub fn list(&self) -> Vec<NamedVolume> {
        let mut out = Vec::new();
        let Ok(tenants) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for tenant in tenants.flatten() {
            let Ok(claims) = std::fs::read_dir(tenant.path()) else {
                continue;
            };
            for claim in claims.flatten() {
                let disk = claim.path().join("disk.ext4");
                let Ok(meta) = std::fs::metadata(&disk) else {
                    continue;
                };
                out.push(NamedVolume {
                    tenant: tenant.file_name().to_string_lossy().into_owned(),
                    claim: claim.file_name().to_string_lossy().into_owned(),
                    size_bytes: meta.len(),
                    used_bytes: meta.blocks() * 512,
                });
            }
        }
        out.sort_by(|a, b| (&a.tenant, &a.claim).cmp(&(&b.tenant, &b.claim)));
        out
    }

    /// Removes the named volume `claim` of `tenant` unless `in_use` names it (`tenant/claim`).
    /// Sandboxes still holding it keep their mount until they end.
    pub fn remove(
        &self,
        tenant: &str,
        claim: &str,
        in_use: &HashSet<String>,
    ) -> Result<(), String> {
        if in_use.contains(&format!("{tenant}/{claim}")) {
            return Err(format!(
                "volume {claim:?} of tenant {tenant:?} is in use by a sandbox"
            ));
        }
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let home = self.tenant_dir(tenant).join(claim);
        if !home.join("disk.ext4").exists() {
            return Err(format!("no volume {claim:?} of tenant {tenant:?}"));
        }
        let mnt = home.join("mnt");
        if is_mount_point(&mnt) {
            storage::detach(&mnt).map_err(|e| e.to_string())?;
        }
        std::fs::remove_dir_all(&home).map_err(|e| format!("removing {}: {e}", home.display()))?;
        tracing::info!(tenant, claim, "named volume removed");
        Ok(())
    }
}

/// Checks a mount path: absolute, normal, not `/`, not at or above a path execbox mounts.
fn check_mount_path(path: &str) -> Result<String, String> {
    let p = Path::new(path);
    let mut clean = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => clean.push(n),
            _ => return Err(format!("{path:?} must be an absolute path without '..'")),
        }
    }
    if clean == Path::new("/") {
        return Err("a volume cannot be the sandbox's root".into());
    }
    for r in RESERVED {
        let r = Path::new(r);
        if clean.starts_with(r) || r.starts_with(&clean) {
            return Err(format!(
                "{} is where execbox mounts its own files ({})",
                clean.display(),
                r.display()
            ));
        }
    }
    Ok(clean.to_string_lossy().into_owned())
}

/// Whether `dir` is the root of a mount (its device differs from its parent's).
fn is_mount_point(dir: &Path) -> bool {
    match (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) {
        (Ok(d), Some(Ok(p))) => d.dev() != p.dev(),
        _ => false,
    }
}

/// A tenant name as one path component: kept when plainly safe, hex-encoded otherwise.
fn path_safe(name: &str) -> String {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if plain {
        name.to_string()
    } else {
        format!(
            "x-{}",
            name.bytes().map(|b| format!("{b:02x}")).collect::<String>()
        )
    }
}

fn describe(path: &Path, e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(nix::libc::EXDEV) | Some(nix::libc::ELOOP) => format!(
            "{} leads outside the volume through a symlink",
            path.display()
        ),
        Some(nix::libc::ENOENT) => format!("{} does not exist", path.display()),
        Some(nix::libc::ENOTDIR) => format!("{} is not a directory", path.display()),
        _ => format!("{}: {e}", path.display()),
    }
}

/// Claims (`tenant/claim`) that the records name.
pub fn in_use(records: &[crate::registry::SandboxRecord]) -> HashSet<String> {
    records
        .iter()
        .flat_map(|r| {
            r.volumes
                .iter()
                .map(move |v| format!("{}/{}", r.tenant, v.claim))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_stay_clear_of_execbox_mounts() {
        assert_eq!(check_mount_path("/data/./x/").as_deref(), Ok("/data/x"));
        for bad in [
            "/",
            "/proc/x",
            "/run",
            "/opt",
            "/etc",
            "/a/../b",
            "/.execbox/lib",
        ] {
            assert!(check_mount_path(bad).is_err(), "{bad}");
        }
        assert!(check_mount_path("/workspace/data").is_ok());
        assert!(check_mount_path("/mnt").is_ok());
    }

    #[test]
    fn tenant_names_are_one_safe_component() {
        assert_eq!(path_safe("acme"), "acme");
        assert_eq!(path_safe("../x"), "x-2e2e2f78");
        assert_eq!(path_safe(".."), "x-2e2e");
    }
}
