//! The image store: its layout on disk, the locking that lets the server and the CLI share it,
//! pulls, imports, removal and garbage collection. The layout is described in the crate's
//! documentation.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use execbox_jail::fsroot::{Dir, OpenFlags};
use futures_util::{StreamExt, TryStreamExt};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::ImageError;
use crate::flight::Flights;
use crate::hashing::Hashing;
use crate::reference::{self, ImageRef};
use crate::registry::{self, Registries, Session};
use crate::spec::{
    self, ConfigFile, Descriptor, Digest, ImageConfig, Index, Manifest, ManifestDoc,
};
use crate::unpack::{unpack, UnpackOptions};

/// Version of the layout, in `store.json`.
const LAYOUT_VERSION: u32 = 1;
/// Largest image configuration accepted (long histories make them big, not this big).
const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Largest manifest or index read from an OCI layout.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Bytes between two progress reports of a download.
const PROGRESS_STEP: u64 = 512 * 1024;
/// The annotation that names an image of an OCI layout (`skopeo copy … oci:DIR:TAG`).
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Credentials for a registry (HTTP basic, exchanged for a token where the registry wants one).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The platform whose image is taken from a multi-platform index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// OCI architecture name: `amd64`, `arm64`, …
    pub architecture: String,
    /// Variant (`v8`, `v7`), preferred when given.
    pub variant: Option<String>,
}

impl Platform {
    /// Linux on this machine's architecture (`linux/amd64` on x86-64).
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
    }
}

impl Default for Platform {
    fn default() -> Platform {
        Platform::host()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// How the store reaches registries and what it accepts.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Registries (`host[:port]`, as in references) spoken to in plain HTTP. Loopback
    /// registries (`localhost`, `127.0.0.0/8`, `::1`) always may be; every other needs TLS.
    pub insecure_registries: Vec<String>,
    /// Credentials per registry (`host[:port]` as in references; `docker.io` for Docker Hub),
    /// used when a call gives none.
    pub credentials: HashMap<String, Credentials>,
    /// The platform taken from multi-platform images (default: Linux on this machine's
    /// architecture, `linux/amd64` here).
    pub platform: Platform,
    /// Largest layer, compressed or not, in bytes.
    pub max_layer_bytes: u64,
    /// Layers of one image downloaded and unpacked at once.
    pub concurrent_layers: usize,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            insecure_registries: Vec::new(),
            credentials: HashMap::new(),
            platform: Platform::host(),
            max_layer_bytes: 32 << 30,
            concurrent_layers: 3,
        }
    }
}

/// An image of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The normalized reference (`docker.io/library/python:3.12-slim`).
    pub reference: String,
    /// The image id: the digest of its configuration.
    pub id: String,
    /// The digest of its manifest (the platform's own, when the reference names an index).
    pub manifest_digest: String,
    /// The unpacked layer directories, bottom first (overlayfs `lowerdir=` lists them top
    /// first). Read-only: shared by every image and sandbox that has them.
    pub layers: Vec<PathBuf>,
    /// How a sandbox runs it.
    pub config: ImageConfig,
    /// Compressed size of its layers in bytes.
    pub size: u64,
}

/// One line of [`ImageStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// The normalized reference.
    pub reference: String,
    /// The image id (configuration digest).
    pub id: String,
    /// The manifest digest.
    pub manifest_digest: String,
    /// Number of layers.
    pub layers: usize,
    /// Compressed size of its layers in bytes.
    pub size: u64,
    /// When it was stored (seconds since the epoch).
    pub stored_at: u64,
}

/// What [`ImageStore::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Layer directories removed.
    pub layers_removed: usize,
    /// Manifest and configuration blobs removed.
    pub blobs_removed: usize,
    /// Bytes of file content freed.
    pub bytes_freed: u64,
}

/// Counters since the store was opened (for metrics, and for tests that check single flight).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Manifests and indexes fetched from registries.
    pub manifest_fetches: u64,
    /// Blobs (configurations and layers) fetched from registries.
    pub blob_downloads: u64,
    /// Bytes of those blobs.
    pub bytes_downloaded: u64,
    /// Layers unpacked into the store (pulled or imported).
    pub layers_unpacked: u64,
}

/// Progress of a pull, reported to the caller's callback (and logged).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PullEvent {
    /// Asking the registry for the manifest.
    Resolving {
        /// The normalized reference.
        reference: String,
    },
    /// Manifest and configuration fetched.
    Resolved {
        /// The normalized reference.
        reference: String,
        /// The manifest digest.
        manifest_digest: String,
        /// Number of layers.
        layers: usize,
        /// Compressed size of all layers (what is downloaded when none is in the store yet).
        bytes: u64,
    },
    /// Layer `index` (0 = bottom) of `count` starts downloading.
    LayerStarted {
        /// 0-based, bottom first.
        index: usize,
        /// Layers of the image.
        count: usize,
        /// The layer's blob digest.
        digest: String,
        /// Its compressed size.
        size: u64,
    },
    /// Bytes of a layer received so far.
    LayerProgress {
        /// 0-based, bottom first.
        index: usize,
        /// Layers of the image.
        count: usize,
        /// The layer's blob digest.
        digest: String,
        /// Bytes received.
        received: u64,
        /// Its compressed size.
        size: u64,
    },
    /// A layer is downloaded and being unpacked.
    LayerUnpacking {
        /// 0-based, bottom first.
        index: usize,
        /// Layers of the image.
        count: usize,
        /// The layer's blob digest.
        digest: String,
    },
    /// A layer is in the store.
    LayerDone {
        /// 0-based, bottom first.
        index: usize,
        /// Layers of the image.
        count: usize,
        /// The layer's blob digest.
        digest: String,
        /// It was there already (no download).
        cached: bool,
    },
    /// The image is stored.
    Done {
        /// The normalized reference.
        reference: String,
        /// The image id.
        id: String,
    },
}

/// The record of one reference in `images/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    reference: String,
    manifest_digest: String,
    config_digest: String,
    /// Uncompressed layer digests (`rootfs.diff_ids`), bottom first: the layer directories.
    layers: Vec<String>,
    config: ImageConfig,
    size: u64,
    stored_at: u64,
}

/// Identity of a record file as last read: a changed file is read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    len: u64,
}

impl Stamp {
    fn of(md: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: md.dev(),
            ino: md.ino(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
            len: md.len(),
        }
    }
}

/// A reference as given, parsed once: its normalized form and its record file.
struct Parsed {
    image: ImageRef,
    record: String,
    path: PathBuf,
}

/// References remembered parsed (the text a caller gives → its normalized form) before the
/// memo starts over.
const MAX_PARSED: usize = 4096;

struct Cached {
    image: Arc<Image>,
    stamp: Stamp,
}

/// The store's directories, pinned.
struct Dirs {
    root: Dir,
    layers: Dir,
    images: Dir,
    blobs: Dir,
    tmp: Dir,
}

/// A directory of `tmp/` for one operation (a pull, an import, a gc): its downloads, unpacks,
/// pins and trash. Locked (flock) while the operation runs and removed when it ends; one whose
/// lock can be taken was left by a process that died.
struct Work {
    tmp: Dir,
    name: String,
    dir: Dir,
    _lock: Flock<File>,
}

impl Drop for Work {
    fn drop(&mut self) {
        // Removed before the lock goes (fields drop after this body).
        if let Err(e) = remove_all(&self.tmp, OsStr::new(&self.name)) {
            tracing::warn!(name = %self.name, error = %e, "removing a work directory");
        }
    }
}

#[derive(Default)]
struct Counters {
    manifest_fetches: AtomicU64,
    blob_downloads: AtomicU64,
    bytes_downloaded: AtomicU64,
    layers_unpacked: AtomicU64,
}

/// Pulled and imported images: content-addressed layers unpacked once and shared, an index of
/// references, garbage collection. `Send + Sync`; meant to be shared behind an `Arc`.
pub struct ImageStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    layers_path: PathBuf,
    images_path: PathBuf,
    dirs: Dirs,
    config: StoreConfig,
    registries: Registries,
    cache: RwLock<HashMap<String, Cached>>,
    parsed: RwLock<HashMap<String, Arc<Parsed>>>,
    image_flights: Flights,
    layer_flights: Flights,
    stats: Counters,
    /// Running as root: the tar's owners are kept.
    chown: bool,
    seq: AtomicU64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn record_name(canonical: &str) -> String {
    format!("{}.json", Digest::of(canonical.as_bytes()).hex())
}

fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// Creates `name` in `parent` unless it exists, and opens it.
fn ensure_dir(parent: &Dir, name: &str, mode: u32) -> io::Result<(Dir, bool)> {
    let created = match parent.mkdir(OsStr::new(name), mode) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(e),
    };
    Ok((parent.subdir(OsStr::new(name))?, created))
}

fn read_all(mut f: impl Read, limit: u64, what: &str) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    (&mut f)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(ImageError::io(format!("reading {what}")))?;
    if out.len() as u64 > limit {
        return Err(ImageError::TooLarge {
            what: what.to_owned(),
            limit,
        });
    }
    Ok(out)
}

impl ImageStore {
    /// Opens (creating it when missing) the store at `root`, and removes what crashed pulls of
    /// earlier processes left in `tmp/`.
    pub fn open(root: &Path, config: StoreConfig) -> Result<ImageStore, ImageError> {
        let shown = root.display().to_string();
        let existed = root.exists();
        std::fs::create_dir_all(root)
            .map_err(ImageError::io(format!("creating the image store {shown}")))?;
        let root = std::fs::canonicalize(root)
            .map_err(ImageError::io(format!("opening the image store {shown}")))?;
        let io = |what: &str| ImageError::io(format!("{what} of the image store {shown}"));
        let root_dir = Dir::open_trusted(&root).map_err(io("opening the root"))?;
        if !existed {
            // Traversable, not listable: sandboxes' mounts reach layers by path.
            execbox_jail::fsroot::chmod_fd(std::os::fd::AsFd::as_fd(&root_dir), 0o711)
                .map_err(io("chmod"))?;
        }
        check_version(&root_dir, &shown)?;
        let (layers, _) = ensure_dir(&root_dir, "layers", 0o711).map_err(io("creating layers/"))?;
        let (images, _) = ensure_dir(&root_dir, "images", 0o700).map_err(io("creating images/"))?;
        let (blobs_top, _) =
            ensure_dir(&root_dir, "blobs", 0o700).map_err(io("creating blobs/"))?;
        let (blobs, _) =
            ensure_dir(&blobs_top, "sha256", 0o700).map_err(io("creating blobs/sha256/"))?;
        let (tmp, _) = ensure_dir(&root_dir, "tmp", 0o700).map_err(io("creating tmp/"))?;
        let dirs = Dirs {
            root: root_dir,
            layers,
            images,
            blobs,
            tmp,
        };
        {
            let _lock = lock_store(&dirs.root)?;
            let removed = clean_tmp(&dirs.tmp)?;
            if removed > 0 {
                tracing::info!(store = %shown, removed, "removed what interrupted pulls left");
            }
        }
        let inner = Inner {
            layers_path: root.join("layers"),
            images_path: root.join("images"),
            root,
            dirs,
            registries: Registries::new(&config.insecure_registries, &config.credentials),
            config,
            cache: RwLock::new(HashMap::new()),
            parsed: RwLock::new(HashMap::new()),
            image_flights: Flights::default(),
            layer_flights: Flights::default(),
            stats: Counters::default(),
            chown: nix::unistd::geteuid().is_root(),
            seq: AtomicU64::new(0),
        };
        let store = ImageStore {
            inner: Arc::new(inner),
        };
        let images = store.list();
        tracing::info!(store = %shown, images = images.len(), "image store open");
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Counters since the store was opened.
    pub fn stats(&self) -> StoreStats {
        let s = &self.inner.stats;
        StoreStats {
            manifest_fetches: s.manifest_fetches.load(Ordering::Relaxed),
            blob_downloads: s.blob_downloads.load(Ordering::Relaxed),
            bytes_downloaded: s.bytes_downloaded.load(Ordering::Relaxed),
            layers_unpacked: s.layers_unpacked.load(Ordering::Relaxed),
        }
    }

    /// The image for `reference`, pulled when the store does not have it yet. When it does,
    /// this is a memory lookup and one `stat` (no network). Concurrent calls for one image pull
    /// it once, and a layer shared by images being pulled at once is downloaded once.
    ///
    /// `auth` is used for this pull instead of the configured credentials of the registry.
    /// An image already stored is returned whoever asks: the caller decides who may use it.
    pub async fn resolve(
        &self,
        reference: &str,
        auth: Option<&Credentials>,
    ) -> Result<Arc<Image>, ImageError> {
        let p = self.inner.parse(reference)?;
        if let Some(img) = self.inner.cached(&p) {
            return Ok(img);
        }
        let _flight = self.inner.image_flights.enter(&p.image.canonical).await;
        if let Some(img) = self.inner.cached(&p) {
            return Ok(img);
        }
        self.pull_ref(&p.image, auth, &|_| {}).await
    }

    /// Pulls `reference` from its registry even when the store has it (a tag may have moved);
    /// layers already in the store are not downloaded again.
    pub async fn pull(
        &self,
        reference: &str,
        auth: Option<&Credentials>,
        progress: &(dyn Fn(&PullEvent) + Send + Sync),
    ) -> Result<Arc<Image>, ImageError> {
        let p = self.inner.parse(reference)?;
        let _flight = self.inner.image_flights.enter(&p.image.canonical).await;
        self.pull_ref(&p.image, auth, progress).await
    }

    /// The stored image for `reference`, if any (no network).
    pub fn get(&self, reference: &str) -> Option<Arc<Image>> {
        let p = self.inner.parse(reference).ok()?;
        self.inner.cached(&p)
    }

    /// Every stored image, by reference.
    pub fn list(&self) -> Vec<ImageSummary> {
        let inner = &self.inner;
        let records = match inner.records() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "listing images");
                return Vec::new();
            }
        };
        let mut out: Vec<ImageSummary> = records
            .into_iter()
            .map(|(_, r)| ImageSummary {
                reference: r.reference,
                id: r.config_digest,
                manifest_digest: r.manifest_digest,
                layers: r.layers.len(),
                size: r.size,
                stored_at: r.stored_at,
            })
            .collect();
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        out
    }

    /// Removes the reference `reference` from the store. Refused ([`ImageError::InUse`]) when
    /// its image id is in `in_use` (ids of images live sandboxes use) and no other reference
    /// keeps that image. Its layers stay until [`ImageStore::gc`].
    pub fn remove(&self, reference: &str, in_use: &HashSet<String>) -> Result<(), ImageError> {
        let p = self.inner.parse(reference)?;
        self.inner.remove(&p.image.canonical, in_use)
    }

    /// Removes the layers and blobs that no stored image, no image in `in_use` (ids) and no
    /// pull in progress (in any process) references.
    pub fn gc(&self, in_use: &HashSet<String>) -> Result<GcReport, ImageError> {
        self.inner.gc(in_use)
    }

    /// Imports an image from a local OCI layout directory (`oci-layout`, `index.json`,
    /// `blobs/`), storing it as `name`. `tag` picks the image by its
    /// `org.opencontainers.image.ref.name` annotation; without it the layout must hold exactly
    /// one. Blocking. For the command line only: an API client must never make the server
    /// read host paths.
    pub fn import_oci_layout(
        &self,
        path: &Path,
        tag: Option<&str>,
        name: &str,
    ) -> Result<Arc<Image>, ImageError> {
        let r = reference::parse(name)?;
        let layout = Dir::open_trusted(path).map_err(ImageError::io(format!(
            "opening the OCI layout {}",
            path.display()
        )))?;
        self.inner
            .import_layout(&layout, &path.display().to_string(), tag, &r)
    }

    /// Imports an image from an OCI archive (a tar, possibly compressed, of an OCI layout), as
    /// [`ImageStore::import_oci_layout`] does.
    pub fn import_oci_archive(
        &self,
        path: &Path,
        tag: Option<&str>,
        name: &str,
    ) -> Result<Arc<Image>, ImageError> {
        let r = reference::parse(name)?;
        let shown = path.display().to_string();
        let file =
            File::open(path).map_err(ImageError::io(format!("opening the OCI archive {shown}")))?;
        let inner = &self.inner;
        let work = inner.begin()?;
        work.dir
            .mkdir(OsStr::new("layout"), 0o700)
            .map_err(ImageError::io("creating a temporary directory"))?;
        let dir = work
            .dir
            .subdir(OsStr::new("layout"))
            .map_err(ImageError::io("opening a temporary directory"))?;
        let opts = UnpackOptions {
            chown: false,
            max_bytes: inner.config.max_layer_bytes.saturating_mul(4),
            whiteouts: false,
            expect: None,
            cancel: None,
        };
        unpack(file, &dir, &shown, &opts)?;
        inner.import_layout(&dir, &shown, tag, &r)
    }

    async fn pull_ref(
        &self,
        r: &ImageRef,
        auth: Option<&Credentials>,
        progress: &(dyn Fn(&PullEvent) + Send + Sync),
    ) -> Result<Arc<Image>, ImageError> {
        let inner = &self.inner;
        let started = Instant::now();
        let canonical = r.canonical.clone();
        tracing::info!(reference = %canonical, "pulling image");
        progress(&PullEvent::Resolving {
            reference: canonical.clone(),
        });
        let session = inner.registries.session(r, auth)?;
        let (resolved, fetched) = session.resolve(&inner.config.platform).await?;
        inner
            .stats
            .manifest_fetches
            .fetch_add(fetched, Ordering::Relaxed);
        let manifest = &resolved.manifest;
        inner.stats.blob_downloads.fetch_add(1, Ordering::Relaxed);
        let config_raw = session
            .blob_bytes(&manifest.config, MAX_CONFIG_BYTES)
            .await?;
        inner
            .stats
            .bytes_downloaded
            .fetch_add(config_raw.len() as u64, Ordering::Relaxed);
        let checked = inner.check_image(&canonical, manifest, &config_raw)?;
        progress(&PullEvent::Resolved {
            reference: canonical.clone(),
            manifest_digest: resolved.digest.to_string(),
            layers: manifest.layers.len(),
            bytes: checked.size,
        });
        let guard = PullGuard::new(inner, &checked.diffs)?;
        let layers = self.fetch_layers(&session, manifest, &checked.diffs, progress, &guard);
        let result = match layers.await {
            Ok(()) => {
                let inner2 = inner.clone();
                let work = guard.work.clone();
                let (canonical2, manifest_raw, digest) = (
                    canonical.clone(),
                    resolved.raw.clone(),
                    resolved.digest.clone(),
                );
                tokio::task::spawn_blocking(move || {
                    inner2.commit(
                        &work.dir,
                        &canonical2,
                        &manifest_raw,
                        &digest,
                        &config_raw,
                        checked,
                    )
                })
                .await
                .map_err(|e| ImageError::Io {
                    what: "storing the image".into(),
                    source: io::Error::other(e),
                })
                .and_then(|r| r)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(image) => {
                guard.finish();
                tracing::info!(reference = %canonical, id = %image.id, layers = image.layers.len(),
                    secs = started.elapsed().as_secs_f32(), "image stored");
                progress(&PullEvent::Done {
                    reference: canonical,
                    id: image.id.clone(),
                });
                Ok(image)
            }
            Err(e) => {
                guard.abandon().await;
                tracing::warn!(reference = %canonical, error = %e, "pull failed");
                Err(e)
            }
        }
    }

    async fn fetch_layers(
        &self,
        session: &Session<'_>,
        manifest: &Manifest,
        diffs: &[Digest],
        progress: &(dyn Fn(&PullEvent) + Send + Sync),
        guard: &PullGuard,
    ) -> Result<(), ImageError> {
        let count = manifest.layers.len();
        futures_util::stream::iter(0..count)
            .map(|index| {
                self.fetch_layer(
                    session,
                    index,
                    count,
                    &manifest.layers[index],
                    &diffs[index],
                    progress,
                    guard,
                )
            })
            .buffer_unordered(self.inner.config.concurrent_layers.max(1))
            .try_collect::<Vec<()>>()
            .await
            .map(drop)
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_layer(
        &self,
        session: &Session<'_>,
        index: usize,
        count: usize,
        desc: &Descriptor,
        diff: &Digest,
        progress: &(dyn Fn(&PullEvent) + Send + Sync),
        guard: &PullGuard,
    ) -> Result<(), ImageError> {
        let inner = &self.inner;
        let _flight = inner.layer_flights.enter(diff.hex()).await;
        let digest = desc.digest.clone();
        if inner.has_layer(diff) {
            tracing::info!(layer = index + 1, of = count, %digest, "layer already in the store");
            progress(&PullEvent::LayerDone {
                index,
                count,
                digest,
                cached: true,
            });
            return Ok(());
        }
        let size = desc.size()?;
        progress(&PullEvent::LayerStarted {
            index,
            count,
            digest: digest.clone(),
            size,
        });
        let started = Instant::now();
        let blob = inner.tmp_file(&guard.work.dir, "blob")?;
        let mut file = tokio::fs::File::from_std(
            blob.file
                .try_clone()
                .map_err(ImageError::io("duplicating a descriptor"))?,
        );
        inner.stats.blob_downloads.fetch_add(1, Ordering::Relaxed);
        let mut reported = 0;
        let received = session
            .blob_to_file(desc, &mut file, |received| {
                if received - reported >= PROGRESS_STEP || received == size {
                    reported = received;
                    progress(&PullEvent::LayerProgress {
                        index,
                        count,
                        digest: digest.clone(),
                        received,
                        size,
                    });
                }
            })
            .await?;
        drop(file);
        inner
            .stats
            .bytes_downloaded
            .fetch_add(received, Ordering::Relaxed);
        let downloaded = started.elapsed();
        progress(&PullEvent::LayerUnpacking {
            index,
            count,
            digest: digest.clone(),
        });
        let mut reader = blob
            .file
            .try_clone()
            .map_err(ImageError::io("duplicating a descriptor"))?;
        reader
            .rewind()
            .map_err(ImageError::io(format!("reading blob {digest}")))?;
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let (inner2, digest2, diff2, flag) = (
            inner.clone(),
            digest.clone(),
            diff.clone(),
            cancel.0.clone(),
        );
        let want = Digest::parse(&digest)?;
        let (work, created) = (guard.work.clone(), guard.created.clone());
        tokio::task::spawn_blocking(move || {
            let new = inner2.unpack_and_commit(
                &work.dir,
                reader,
                &digest2,
                Some((&want, size)),
                &diff2,
                Some(&flag),
            )?;
            if new {
                created
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(diff2);
            }
            Ok::<_, ImageError>(())
        })
        .await
        .map_err(|e| ImageError::Io {
            what: format!("unpacking layer {digest}"),
            source: io::Error::other(e),
        })??;
        drop(blob);
        tracing::info!(layer = index + 1, of = count, %digest, bytes = received,
            download_secs = downloaded.as_secs_f32(), total_secs = started.elapsed().as_secs_f32(), "layer stored");
        progress(&PullEvent::LayerDone {
            index,
            count,
            digest,
            cached: false,
        });
        Ok(())
    }
}

/// What the checks of a manifest and its configuration yield.
struct Checked {
    config_digest: Digest,
    config: ImageConfig,
    diffs: Vec<Digest>,
    size: u64,
}

/// Sets its flag when dropped: tells an unpack running on a blocking thread that its pull is
/// gone.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A file of a work directory, unlinked when dropped.
struct TmpFile<'a> {
    dir: &'a Dir,
    name: String,
    file: File,
}

impl Drop for TmpFile<'_> {
    fn drop(&mut self) {
        let _ = self.dir.unlink(OsStr::new(&self.name));
    }
}

/// A tree of a work directory, removed when dropped unless kept.
struct TmpTree<'a> {
    dir: &'a Dir,
    name: String,
}

impl TmpTree<'_> {
    /// Moved elsewhere: nothing to remove.
    fn keep(mut self) {
        self.name.clear();
    }
}

impl Drop for TmpTree<'_> {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        if let Err(e) = remove_all(self.dir, OsStr::new(&self.name)) {
            tracing::warn!(name = %self.name, error = %e, "removing a temporary tree");
        }
    }
}

/// A pull (or import) in progress: its work directory with its pin, and the layers it added.
/// Unless finished, it removes those layers when no other image or pull needs them (on error,
/// or when the pull's future is dropped); its work directory goes in any case.
struct PullGuard {
    inner: Arc<Inner>,
    /// Shared with the blocking tasks of the pull, so that it goes once they are done too.
    work: Arc<Work>,
    /// Written by the blocking tasks too: a layer moved into `layers/` is recorded by the
    /// task that moved it, even when the pull's future is gone by then.
    created: Arc<Mutex<Vec<Digest>>>,
    done: bool,
}

impl PullGuard {
    /// Starts a pull of an image whose layers are `diffs`: from now on no gc and no failing
    /// pull (of any process) removes them.
    fn new(inner: &Arc<Inner>, diffs: &[Digest]) -> Result<PullGuard, ImageError> {
        let work = inner.begin()?;
        inner.pin(&work, diffs)?;
        Ok(PullGuard {
            inner: inner.clone(),
            work: Arc::new(work),
            created: Arc::default(),
            done: false,
        })
    }

    fn finish(mut self) {
        self.done = true;
    }

    /// Undoes the pull on a blocking thread (removing layers takes time), once the unpacks of
    /// its other layers, still running on blocking threads, have stopped: they notice at their
    /// next entry, and only then is nothing of the pull left to find.
    async fn abandon(self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Arc::strong_count(&self.work) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

impl Drop for PullGuard {
    fn drop(&mut self) {
        if !self.done {
            let created =
                std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
            self.inner.abandon(&self.work, created);
        }
    }
}

fn lock_store(root: &Dir) -> Result<Flock<File>, ImageError> {
    let f = root
        .open(
            OsStr::new("store.lock"),
            OpenFlags::O_RDWR | OpenFlags::O_CREAT,
            0o600,
        )
        .map_err(ImageError::io("opening the store's lock file"))?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| ImageError::Io {
        what: "locking the store".into(),
        source: e.into(),
    })
}

fn check_version(root: &Dir, shown: &str) -> Result<(), ImageError> {
    #[derive(Serialize, Deserialize)]
    struct Version {
        version: u32,
    }
    match root.open(OsStr::new("store.json"), OpenFlags::O_RDONLY, 0) {
        Ok(f) => {
            let raw = read_all(f, 4096, "store.json")?;
            let v: Version = serde_json::from_slice(&raw)
                .map_err(|e| ImageError::corrupt(format!("{shown}/store.json: {e}")))?;
            if v.version != LAYOUT_VERSION {
                return Err(ImageError::unsupported(format!(
                    "image store {shown} has layout version {} (this execbox reads {LAYOUT_VERSION})",
                    v.version
                )));
            }
            Ok(())
        }
        Err(e) if is_missing(&e) => {
            let json = serde_json::to_vec(&Version {
                version: LAYOUT_VERSION,
            })
            .map_err(|e| ImageError::corrupt(e.to_string()))?;
            let tmp = format!("store.json.{}", uuid::Uuid::new_v4().simple());
            let mut f = root
                .create_new(OsStr::new(&tmp), 0o644)
                .map_err(ImageError::io("writing store.json"))?;
            f.write_all(&json)
                .map_err(ImageError::io("writing store.json"))?;
            match root.rename(OsStr::new(&tmp), root, OsStr::new("store.json"), true) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = root.unlink(OsStr::new(&tmp));
                    // Another process wrote it first.
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(ImageError::io("writing store.json")(e))
                    }
                }
            }
        }
        Err(e) => Err(ImageError::io("reading store.json")(e)),
    }
}

/// Whether the work directory `name` of `tmp/` belongs to a running operation; `None` when it
/// is not a work directory.
fn work_alive(tmp: &Dir, name: &OsStr) -> io::Result<Option<bool>> {
    if !name.as_bytes().starts_with(b"op-") {
        return Ok(None);
    }
    let f = match tmp.open(name, OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY, 0) {
        Ok(f) => f,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => return Ok(None),
        Err(e) => return Err(e),
    };
    // flock belongs to the open file description: this new one conflicts with the owner's,
    // in this process too.
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(_released_at_once) => Ok(Some(false)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(Some(true)),
        Err((_, e)) => Err(e.into()),
    }
}

/// Removes from `tmp/` everything but the work directories of running operations. Called with
/// the store lock held (work directories are created under it, so a new one is never taken for
/// a dead one).
fn clean_tmp(tmp: &Dir) -> Result<usize, ImageError> {
    let mut removed = 0;
    for name in tmp.names().map_err(ImageError::io("listing tmp/"))? {
        match work_alive(tmp, &name) {
            Ok(Some(true)) => continue,
            Err(e) if is_missing(&e) => continue,
            Err(e) => return Err(ImageError::io("checking a work directory in tmp/")(e)),
            Ok(_) => {}
        }
        remove_all(tmp, &name).map_err(ImageError::io(format!(
            "removing tmp/{}",
            name.to_string_lossy()
        )))?;
        removed += 1;
    }
    Ok(removed)
}

/// Removes `name` and everything below it, through descriptors. A layer may hold read-only
/// directories: where the owner lacks the right to empty one (rootless), the directories are
/// made writable first.
fn remove_all(parent: &Dir, name: &OsStr) -> io::Result<()> {
    match parent.remove_tree(name) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(parent, name, 0);
            parent.remove_tree(name)
        }
        r => r,
    }
}

fn make_writable(parent: &Dir, name: &OsStr, depth: usize) {
    if depth >= execbox_jail::fsroot::MAX_TREE_DEPTH {
        return;
    }
    let Ok(pinned) = parent.pin(name) else {
        return;
    };
    if !pinned.metadata().is_ok_and(|m| m.is_dir()) {
        return;
    }
    let _ = execbox_jail::fsroot::chmod_fd(std::os::fd::AsFd::as_fd(&pinned), 0o700);
    let Ok(sub) = parent.subdir(name) else {
        return;
    };
    for child in sub.names().unwrap_or_default() {
        make_writable(&sub, &child, depth + 1);
    }
}

/// File content bytes below `name` (each inode counted once).
fn tree_size(parent: &Dir, name: &OsStr, depth: usize, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let Ok(md) = parent.lstat(name) else {
        return 0;
    };
    if md.is_dir() {
        if depth >= execbox_jail::fsroot::MAX_TREE_DEPTH {
            return 0;
        }
        let Ok(sub) = parent.subdir(name) else {
            return 0;
        };
        let names = sub.names().unwrap_or_default();
        return names
            .iter()
            .map(|n| tree_size(&sub, n, depth + 1, seen))
            .sum();
    }
    if md.nlink() > 1 && !seen.insert((md.dev(), md.ino())) {
        return 0;
    }
    if md.is_file() {
        md.len()
    } else {
        0
    }
}

impl Inner {
    /// `reference` parsed and normalized, remembered for the next call.
    fn parse(&self, reference: &str) -> Result<Arc<Parsed>, ImageError> {
        if let Some(p) = self
            .parsed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(reference)
        {
            return Ok(p.clone());
        }
        let image = reference::parse(reference)?;
        let record = record_name(&image.canonical);
        let p = Arc::new(Parsed {
            path: self.images_path.join(&record),
            record,
            image,
        });
        let mut memo = self.parsed.write().unwrap_or_else(|e| e.into_inner());
        if memo.len() >= MAX_PARSED {
            memo.clear();
        }
        memo.insert(reference.to_owned(), p.clone());
        Ok(p)
    }

    fn tmp_name(&self, what: &str) -> String {
        format!("{what}-{}", self.seq.fetch_add(1, Ordering::Relaxed))
    }

    /// A work directory for one operation.
    fn begin(&self) -> Result<Work, ImageError> {
        let _lock = self.lock()?;
        let name = format!("op-{}", uuid::Uuid::new_v4().simple());
        let os = OsStr::new(&name);
        let tmp = &self.dirs.tmp;
        tmp.mkdir(os, 0o700)
            .map_err(ImageError::io("creating a work directory"))?;
        let made = (|| {
            let f = tmp.open(os, OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY, 0)?;
            let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| io::Error::from(e))?;
            Ok::<_, io::Error>((tmp.try_clone()?, tmp.subdir(os)?, lock))
        })();
        match made {
            Ok((tmp, dir, lock)) => Ok(Work {
                tmp,
                name,
                dir,
                _lock: lock,
            }),
            Err(e) => {
                let _ = remove_all(tmp, os);
                Err(ImageError::io("opening a work directory")(e))
            }
        }
    }

    fn tmp_file<'a>(&self, work: &'a Dir, what: &str) -> Result<TmpFile<'a>, ImageError> {
        let name = self.tmp_name(what);
        let file = work
            .open(
                OsStr::new(&name),
                OpenFlags::O_RDWR | OpenFlags::O_CREAT | OpenFlags::O_EXCL,
                0o600,
            )
            .map_err(ImageError::io("creating a temporary file"))?;
        Ok(TmpFile {
            dir: work,
            name,
            file,
        })
    }

    fn lock(&self) -> Result<Flock<File>, ImageError> {
        lock_store(&self.dirs.root)
    }

    fn has_layer(&self, diff: &Digest) -> bool {
        self.dirs
            .layers
            .lstat(OsStr::new(diff.hex()))
            .is_ok_and(|m| m.is_dir())
    }

    /// Records in `work` that its operation needs the layers `diffs`: from now on no gc and
    /// no failing pull (of any process) removes them. The pin goes with the work directory.
    fn pin(&self, work: &Work, diffs: &[Digest]) -> Result<(), ImageError> {
        let _lock = self.lock()?;
        let mut f = work
            .dir
            .create_new(OsStr::new("pins"), 0o600)
            .map_err(ImageError::io("writing a pin"))?;
        let text: String = diffs.iter().map(|d| format!("{}\n", d.hex())).collect();
        f.write_all(text.as_bytes())
            .map_err(ImageError::io("writing a pin"))
    }

    /// Layers pinned by running operations (of this process too), and the names of dead work
    /// directories. Called with the store lock held.
    fn live_pins(&self) -> Result<(HashSet<String>, Vec<OsString>), ImageError> {
        let mut pins = HashSet::new();
        let mut dead = Vec::new();
        for name in self
            .dirs
            .tmp
            .names()
            .map_err(ImageError::io("listing tmp/"))?
        {
            match work_alive(&self.dirs.tmp, &name) {
                Ok(Some(true)) => {}
                Ok(Some(false)) => {
                    dead.push(name);
                    continue;
                }
                Ok(None) => continue,
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(ImageError::io("checking a work directory")(e)),
            }
            let Ok(work) = self.dirs.tmp.subdir(&name) else {
                continue;
            };
            // No pin (yet, or any more): it protects nothing.
            let Ok(f) = work.open(OsStr::new("pins"), OpenFlags::O_RDONLY, 0) else {
                continue;
            };
            let text = read_all(f, 1 << 20, "a pin")?;
            for line in String::from_utf8_lossy(&text).lines() {
                if Digest::from_hex(line).is_some() {
                    pins.insert(line.to_owned());
                }
            }
        }
        Ok((pins, dead))
    }

    /// Every record of `images/`: (file name, record). Unreadable ones are skipped (logged).
    fn records(&self) -> Result<Vec<(String, Record)>, ImageError> {
        let mut out = Vec::new();
        for name in self
            .dirs
            .images
            .names()
            .map_err(ImageError::io("listing images/"))?
        {
            let Some(name) = name.to_str().filter(|n| n.ends_with(".json")) else {
                continue;
            };
            match self.load(name) {
                Ok(Some((rec, _))) => out.push((name.to_owned(), rec)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(record = name, error = %e, "unreadable image record skipped")
                }
            }
        }
        Ok(out)
    }

    fn load(&self, name: &str) -> Result<Option<(Record, Stamp)>, ImageError> {
        let f = match self
            .dirs
            .images
            .open(OsStr::new(name), OpenFlags::O_RDONLY, 0)
        {
            Ok(f) => f,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(ImageError::io(format!("reading images/{name}"))(e)),
        };
        let md = f
            .metadata()
            .map_err(ImageError::io(format!("reading images/{name}")))?;
        let raw = read_all(f, 16 << 20, name)?;
        let rec: Record = serde_json::from_slice(&raw)
            .map_err(|e| ImageError::corrupt(format!("images/{name}: {e}")))?;
        Ok(Some((rec, Stamp::of(&md))))
    }

    fn image_of(&self, rec: &Record) -> Result<Image, ImageError> {
        let layers = rec
            .layers
            .iter()
            .map(|d| Digest::parse(d).map(|d| self.layers_path.join(d.hex())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Image {
            reference: rec.reference.clone(),
            id: rec.config_digest.clone(),
            manifest_digest: rec.manifest_digest.clone(),
            layers,
            config: rec.config.clone(),
            size: rec.size,
        })
    }

    /// The stored image of a normalized reference: from memory while its record file is
    /// unchanged (one `stat`), else read again.
    fn cached(&self, p: &Parsed) -> Option<Arc<Image>> {
        let (canonical, name) = (p.image.canonical.as_str(), &p.record);
        let forget = || {
            self.cache
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(canonical);
        };
        let Ok(md) = std::fs::symlink_metadata(&p.path) else {
            forget();
            return None;
        };
        let stamp = Stamp::of(&md);
        if let Some(c) = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(canonical)
        {
            if c.stamp == stamp {
                return Some(c.image.clone());
            }
        }
        let loaded = match self.load(name) {
            Ok(Some((rec, stamp))) if rec.reference == canonical => {
                self.image_of(&rec).map(|i| (i, stamp))
            }
            Ok(_) => return None,
            Err(e) => Err(e),
        };
        match loaded {
            // Every layer must be there: a record whose layers are gone is as good as none.
            Ok((image, stamp)) if image.layers.iter().all(|l| l.is_dir()) => {
                let image = Arc::new(image);
                self.cache
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        canonical.to_owned(),
                        Cached {
                            image: image.clone(),
                            stamp,
                        },
                    );
                Some(image)
            }
            Ok(_) => {
                tracing::warn!(
                    reference = canonical,
                    "image record whose layers are missing: pulled again"
                );
                forget();
                None
            }
            Err(e) => {
                tracing::warn!(reference = canonical, error = %e, "unreadable image record");
                forget();
                None
            }
        }
    }

    /// The checks every image passes before its layers are fetched.
    fn check_image(
        &self,
        what: &str,
        manifest: &Manifest,
        config_raw: &[u8],
    ) -> Result<Checked, ImageError> {
        let config_digest = Digest::parse(&manifest.config.digest)?;
        let (cfg, config, diffs) = spec::parse_config(config_raw, what)?;
        check_platform(&cfg, &self.config.platform, what)?;
        if manifest.layers.is_empty() {
            return Err(ImageError::unsupported(format!("{what} has no layers")));
        }
        if diffs.len() != manifest.layers.len() {
            return Err(ImageError::corrupt(format!(
                "{what}: {} layers in the manifest, {} in the configuration",
                manifest.layers.len(),
                diffs.len()
            )));
        }
        let mut size = 0u64;
        for l in &manifest.layers {
            let s = l.size()?;
            if s > self.config.max_layer_bytes {
                return Err(ImageError::TooLarge {
                    what: format!("layer {}", l.digest),
                    limit: self.config.max_layer_bytes,
                });
            }
            Digest::parse(&l.digest)?;
            size = size.saturating_add(s);
        }
        Ok(Checked {
            config_digest,
            config,
            diffs,
            size,
        })
    }

    /// Unpacks a layer blob into `work`, checks it, and moves it into `layers/`. Returns
    /// whether this call added it (false: another pull, maybe of another process, got there
    /// first).
    fn unpack_and_commit(
        &self,
        work: &Dir,
        blob: impl Read,
        layer: &str,
        want_blob: Option<(&Digest, u64)>,
        diff: &Digest,
        cancel: Option<&AtomicBool>,
    ) -> Result<bool, ImageError> {
        let name = self.tmp_name("layer");
        let os = OsStr::new(&name);
        work.mkdir(os, 0o755)
            .map_err(ImageError::io("creating a layer directory"))?;
        let tree = TmpTree {
            dir: work,
            name: name.clone(),
        };
        let dir = work
            .subdir(os)
            .map_err(ImageError::io("opening a layer directory"))?;
        let started = Instant::now();
        let mut input = Hashing::new(blob, u64::MAX);
        let opts = UnpackOptions {
            chown: self.chown,
            max_bytes: self.config.max_layer_bytes,
            whiteouts: true,
            expect: Some(diff),
            cancel,
        };
        let unpacked = unpack(&mut input, &dir, layer, &opts)?;
        input
            .drain()
            .map_err(ImageError::io(format!("reading blob {layer}")))?;
        let (got, len) = input.finish();
        if let Some((want, size)) = want_blob {
            if got != *want || len != size {
                return Err(ImageError::corrupt(format!(
                    "blob {layer}: its content is {got} ({len} bytes)"
                )));
            }
        }
        // On disk before it is visible: a crash must not leave a layer with empty files.
        // syncfs needs a descriptor that is not O_PATH.
        dir.open(
            OsStr::new("."),
            OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY,
            0,
        )
        .and_then(|d| nix::unistd::syncfs(d).map_err(io::Error::from))
        .map_err(ImageError::io(format!("syncing layer {layer}")))?;
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(ImageError::Io {
                what: format!("unpacking layer {layer}"),
                source: io::Error::new(io::ErrorKind::Interrupted, "the pull was abandoned"),
            });
        }
        match work.rename(os, &self.dirs.layers, OsStr::new(diff.hex()), true) {
            Ok(()) => {
                tree.keep();
                let _ = self.dirs.layers.sync();
                self.stats.layers_unpacked.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%layer, %diff, entries = unpacked.entries, bytes = unpacked.bytes,
                    secs = started.elapsed().as_secs_f32(), "layer unpacked");
                Ok(true)
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) => Ok(false),
            Err(e) => Err(ImageError::io(format!("storing layer {diff}"))(e)),
        }
    }

    /// Writes `bytes` as the entry `name` of `dir`, atomically (through `work`). With
    /// `replace` false an existing entry is kept (content-addressed: same content).
    fn write_atomic(
        &self,
        work: &Dir,
        dir: &Dir,
        name: &str,
        bytes: &[u8],
        replace: bool,
    ) -> Result<(), ImageError> {
        let tmp = self.tmp_file(work, "write")?;
        let mut f = &tmp.file;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(ImageError::io(format!("writing {name}")))?;
        match work.rename(OsStr::new(&tmp.name), dir, OsStr::new(name), !replace) {
            Ok(()) => {}
            Err(e) if !replace && e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ImageError::io(format!("storing {name}"))(e)),
        }
        dir.sync()
            .map_err(ImageError::io(format!("storing {name}")))
    }

    /// Stores the image's blobs and record (its layers are in `layers/` already).
    fn commit(
        &self,
        work: &Dir,
        canonical: &str,
        manifest_raw: &[u8],
        manifest_digest: &Digest,
        config_raw: &[u8],
        checked: Checked,
    ) -> Result<Arc<Image>, ImageError> {
        let _lock = self.lock()?;
        for d in &checked.diffs {
            if !self.has_layer(d) {
                return Err(ImageError::Io {
                    what: format!("storing {canonical}"),
                    source: io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("layer {d} vanished from the store"),
                    ),
                });
            }
        }
        self.write_atomic(
            work,
            &self.dirs.blobs,
            manifest_digest.hex(),
            manifest_raw,
            false,
        )?;
        self.write_atomic(
            work,
            &self.dirs.blobs,
            checked.config_digest.hex(),
            config_raw,
            false,
        )?;
        let record = Record {
            reference: canonical.to_owned(),
            manifest_digest: manifest_digest.to_string(),
            config_digest: checked.config_digest.to_string(),
            layers: checked.diffs.iter().map(Digest::to_string).collect(),
            config: checked.config,
            size: checked.size,
            stored_at: now_secs(),
        };
        let json =
            serde_json::to_vec_pretty(&record).map_err(|e| ImageError::corrupt(e.to_string()))?;
        let name = record_name(canonical);
        self.write_atomic(work, &self.dirs.images, &name, &json, true)?;
        let image = Arc::new(self.image_of(&record)?);
        let md = self
            .dirs
            .images
            .lstat(OsStr::new(&name))
            .map_err(ImageError::io(format!("reading images/{name}")))?;
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                canonical.to_owned(),
                Cached {
                    image: image.clone(),
                    stamp: Stamp::of(&md),
                },
            );
        Ok(image)
    }

    /// Undoes a pull that did not finish: its pin goes, and the layers it added go unless an
    /// image or another running pull needs them.
    fn abandon(&self, work: &Work, created: Vec<Digest>) {
        // Its own pin would keep them.
        let _ = work.dir.unlink(OsStr::new("pins"));
        if created.is_empty() {
            return;
        }
        let mut trash = Vec::new();
        let result = (|| -> Result<(), ImageError> {
            let _lock = self.lock()?;
            let kept: HashSet<String> = self
                .records()?
                .into_iter()
                .flat_map(|(_, r)| r.layers)
                .filter_map(|d| Digest::parse(&d).ok().map(|d| d.hex().to_owned()))
                .collect();
            let (pins, _) = self.live_pins()?;
            for d in &created {
                if kept.contains(d.hex()) || pins.contains(d.hex()) {
                    continue;
                }
                let t = self.tmp_name("trash");
                self.dirs
                    .layers
                    .rename(OsStr::new(d.hex()), &work.dir, OsStr::new(&t), true)
                    .map_err(ImageError::io(format!("removing layer {d}")))?;
                trash.push(t);
            }
            Ok(())
        })();
        for t in trash {
            drop(TmpTree {
                dir: &work.dir,
                name: t,
            });
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, "cleaning up after a failed pull (gc will finish it)");
        }
    }

    fn remove(&self, canonical: &str, in_use: &HashSet<String>) -> Result<(), ImageError> {
        let _lock = self.lock()?;
        let name = record_name(canonical);
        let Some((rec, _)) = self.load(&name)? else {
            return Err(ImageError::NotFound {
                reference: canonical.to_owned(),
            });
        };
        if in_use.contains(&rec.config_digest) {
            let kept_by_another = self
                .records()?
                .iter()
                .any(|(n, r)| *n != name && r.config_digest == rec.config_digest);
            if !kept_by_another {
                return Err(ImageError::InUse {
                    reference: canonical.to_owned(),
                });
            }
        }
        self.dirs
            .images
            .unlink(OsStr::new(&name))
            .map_err(ImageError::io(format!("removing images/{name}")))?;
        let _ = self.dirs.images.sync();
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(canonical);
        tracing::info!(reference = canonical, id = %rec.config_digest, "image removed");
        Ok(())
    }

    fn gc(&self, in_use: &HashSet<String>) -> Result<GcReport, ImageError> {
        let mut report = GcReport::default();
        let mut trash = Vec::new();
        let work = self.begin()?;
        {
            let _lock = self.lock()?;
            let mut keep_layers = HashSet::new();
            let mut keep_blobs = HashSet::new();
            let mut keep = |layers: &[String], blobs: &[&str]| {
                for d in layers {
                    if let Ok(d) = Digest::parse(d) {
                        keep_layers.insert(d.hex().to_owned());
                    }
                }
                for d in blobs {
                    if let Ok(d) = Digest::parse(d) {
                        keep_blobs.insert(d.hex().to_owned());
                    }
                }
            };
            for (_, r) in self.records()? {
                keep(&r.layers, &[&r.manifest_digest, &r.config_digest]);
            }
            // Images of live sandboxes whose reference is gone: their configuration names
            // their layers.
            for id in in_use {
                let Ok(d) = Digest::parse(id) else { continue };
                let Ok(f) = self
                    .dirs
                    .blobs
                    .open(OsStr::new(d.hex()), OpenFlags::O_RDONLY, 0)
                else {
                    continue;
                };
                let raw = read_all(f, MAX_CONFIG_BYTES, "a configuration")?;
                if let Ok((_, _, diffs)) = spec::parse_config(&raw, id) {
                    let diffs: Vec<String> = diffs.iter().map(Digest::to_string).collect();
                    keep(&diffs, &[id]);
                }
            }
            let (pins, dead) = self.live_pins()?;
            keep_layers.extend(pins);
            for name in self
                .dirs
                .layers
                .names()
                .map_err(ImageError::io("listing layers/"))?
            {
                let Some(hex) = name.to_str().filter(|n| Digest::from_hex(n).is_some()) else {
                    tracing::warn!(name = %name.to_string_lossy(), "unexpected entry in layers/ left alone");
                    continue;
                };
                if keep_layers.contains(hex) {
                    continue;
                }
                let t = self.tmp_name("trash");
                self.dirs
                    .layers
                    .rename(&name, &work.dir, OsStr::new(&t), true)
                    .map_err(ImageError::io(format!("removing layer {hex}")))?;
                trash.push(t);
                report.layers_removed += 1;
            }
            for name in self
                .dirs
                .blobs
                .names()
                .map_err(ImageError::io("listing blobs/"))?
            {
                if name.to_str().is_some_and(|n| keep_blobs.contains(n)) {
                    continue;
                }
                let len = self.dirs.blobs.lstat(&name).map(|m| m.len()).unwrap_or(0);
                self.dirs
                    .blobs
                    .unlink(&name)
                    .map_err(ImageError::io(format!(
                        "removing blob {}",
                        name.to_string_lossy()
                    )))?;
                report.blobs_removed += 1;
                report.bytes_freed += len;
            }
            // Leases of stores that are gone (crashed processes) go too.
            for name in dead {
                let t = self.tmp_name("trash");
                if self
                    .dirs
                    .tmp
                    .rename(&name, &work.dir, OsStr::new(&t), true)
                    .is_ok()
                {
                    trash.push(t);
                }
            }
        }
        // The removal itself, outside the lock: pulls and other processes go on meanwhile.
        let mut seen = HashSet::new();
        for t in trash {
            report.bytes_freed += tree_size(&work.dir, OsStr::new(&t), 0, &mut seen);
            drop(TmpTree {
                dir: &work.dir,
                name: t,
            });
        }
        tracing::info!(
            layers = report.layers_removed,
            blobs = report.blobs_removed,
            bytes = report.bytes_freed,
            "image store collected"
        );
        Ok(report)
    }

    fn import_layout(
        self: &Arc<Self>,
        layout: &Dir,
        shown: &str,
        tag: Option<&str>,
        r: &ImageRef,
    ) -> Result<Arc<Image>, ImageError> {
        let marker = match layout.open(OsStr::new("oci-layout"), OpenFlags::O_RDONLY, 0) {
            Ok(f) => read_all(f, 4096, "oci-layout")?,
            Err(e) if is_missing(&e) => {
                return Err(ImageError::corrupt(format!(
                    "{shown} is not an OCI layout (no oci-layout file)"
                )))
            }
            Err(e) => return Err(ImageError::io(format!("reading {shown}/oci-layout"))(e)),
        };
        #[derive(Deserialize)]
        struct LayoutMarker {
            #[serde(rename = "imageLayoutVersion")]
            version: String,
        }
        let marker: LayoutMarker = serde_json::from_slice(&marker)
            .map_err(|e| ImageError::corrupt(format!("{shown}/oci-layout: {e}")))?;
        if !marker.version.starts_with("1.") {
            return Err(ImageError::unsupported(format!(
                "OCI layout version {}",
                marker.version
            )));
        }
        let index_raw = match layout.open(OsStr::new("index.json"), OpenFlags::O_RDONLY, 0) {
            Ok(f) => read_all(f, MAX_MANIFEST_BYTES, "index.json")?,
            Err(e) => return Err(ImageError::io(format!("reading {shown}/index.json"))(e)),
        };
        let index: Index = serde_json::from_slice(&index_raw)
            .map_err(|e| ImageError::corrupt(format!("{shown}/index.json: {e}")))?;
        let mut desc = pick_from_layout(&index, tag, shown)?.clone();
        let blobs = layout
            .subdir(OsStr::new("blobs"))
            .and_then(|b| b.subdir(OsStr::new("sha256")))
            .map_err(|e| ImageError::corrupt(format!("{shown}: no blobs/sha256 ({e})")))?;
        let what = format!("{shown} ({})", r.canonical);
        let (manifest, manifest_raw, manifest_digest) = {
            let mut found = None;
            for _ in 0..3 {
                let raw = read_layout_blob(&blobs, &desc, MAX_MANIFEST_BYTES, shown)?;
                match spec::parse_manifest(&raw, &what)? {
                    ManifestDoc::Image(m) => {
                        found = Some((m, raw, Digest::parse(&desc.digest)?));
                        break;
                    }
                    ManifestDoc::Index(i) => {
                        desc = registry::choose_platform(&i, &self.config.platform)
                            .ok_or_else(|| {
                                ImageError::unsupported(format!(
                                    "{what} has no {} image (it has: {})",
                                    self.config.platform,
                                    registry::platforms_of(&i)
                                ))
                            })?
                            .clone();
                    }
                }
            }
            found.ok_or_else(|| {
                ImageError::unsupported(format!("{what}: image indexes nested too deep"))
            })?
        };
        let config_raw = read_layout_blob(&blobs, &manifest.config, MAX_CONFIG_BYTES, shown)?;
        let checked = self.check_image(&what, &manifest, &config_raw)?;
        let guard = PullGuard::new(self, &checked.diffs)?;
        for (i, (l, diff)) in manifest.layers.iter().zip(&checked.diffs).enumerate() {
            if self.has_layer(diff) {
                tracing::info!(layer = i + 1, of = manifest.layers.len(), digest = %l.digest, "layer already in the store");
                continue;
            }
            let d = Digest::parse(&l.digest)?;
            let f = blobs
                .open(OsStr::new(d.hex()), OpenFlags::O_RDONLY, 0)
                .map_err(|e| ImageError::corrupt(format!("{shown}: blob {d}: {e}")))?;
            if self.unpack_and_commit(
                &guard.work.dir,
                f,
                &l.digest,
                Some((&d, l.size()?)),
                diff,
                None,
            )? {
                guard
                    .created
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(diff.clone());
            }
        }
        let image = self.commit(
            &guard.work.dir,
            &r.canonical,
            &manifest_raw,
            &manifest_digest,
            &config_raw,
            checked,
        )?;
        guard.finish();
        tracing::info!(reference = %r.canonical, id = %image.id, from = shown, "image imported");
        Ok(image)
    }
}

fn check_platform(cfg: &ConfigFile, want: &Platform, what: &str) -> Result<(), ImageError> {
    let os = cfg.os.as_deref().unwrap_or("");
    let arch = cfg.architecture.as_deref().unwrap_or("");
    if (!os.is_empty() && os != want.os) || (!arch.is_empty() && arch != want.architecture) {
        return Err(ImageError::unsupported(format!(
            "{what} is an image for {os}/{arch}, this store runs {want} images"
        )));
    }
    Ok(())
}

fn pick_from_layout<'i>(
    index: &'i Index,
    tag: Option<&str>,
    shown: &str,
) -> Result<&'i Descriptor, ImageError> {
    let name_of = |d: &Descriptor| {
        d.annotations
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .cloned()
    };
    match tag {
        Some(t) => index
            .manifests
            .iter()
            .find(|d| name_of(d).as_deref() == Some(t))
            .ok_or_else(|| ImageError::NotFound {
                reference: format!("{shown}:{t}"),
            }),
        None => match index.manifests.as_slice() {
            [one] => Ok(one),
            [] => Err(ImageError::corrupt(format!(
                "{shown}: the layout holds no image"
            ))),
            many => {
                let names: Vec<String> = many.iter().filter_map(name_of).collect();
                Err(ImageError::BadReference {
                    reference: shown.to_owned(),
                    why: format!(
                        "the layout holds {} images; choose one by tag ({})",
                        many.len(),
                        names.join(", ")
                    ),
                })
            }
        },
    }
}

/// A blob of an OCI layout, checked against its descriptor.
fn read_layout_blob(
    blobs: &Dir,
    desc: &Descriptor,
    limit: u64,
    shown: &str,
) -> Result<Vec<u8>, ImageError> {
    let d = Digest::parse(&desc.digest)?;
    let f = blobs
        .open(OsStr::new(d.hex()), OpenFlags::O_RDONLY, 0)
        .map_err(|e| ImageError::corrupt(format!("{shown}: blob {d}: {e}")))?;
    let raw = read_all(f, limit, &format!("blob {d}"))?;
    if Digest::of(&raw) != d || raw.len() as u64 != desc.size()? {
        return Err(ImageError::corrupt(format!(
            "{shown}: blob {d} does not match its digest or size"
        )));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn the_store_is_shared_between_threads() {
        assert_send_sync::<ImageStore>();
        assert_send_sync::<Image>();
    }

    #[test]
    fn read_only_trees_are_removed() {
        let d = std::env::temp_dir().join(format!("execbox-store-rm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("t/ro/inner")).unwrap();
        std::fs::write(d.join("t/ro/inner/f"), "x").unwrap();
        std::fs::create_dir_all(d.join("t/closed")).unwrap();
        std::fs::write(d.join("t/closed/g"), "y").unwrap();
        for (p, mode) in [("t/ro/inner", 0o555), ("t/ro", 0o555), ("t/closed", 0o000)] {
            std::fs::set_permissions(
                d.join(p),
                std::os::unix::fs::PermissionsExt::from_mode(mode),
            )
            .unwrap();
        }
        let root = Dir::open_trusted(&d).unwrap();
        remove_all(&root, OsStr::new("t")).unwrap();
        assert!(!d.join("t").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn store_names() {
        assert_eq!(record_name("a").len(), 64 + 5);
        assert_eq!(Platform::host().os, "linux");
        let p = Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: Some("v8".into()),
        };
        assert_eq!(p.to_string(), "linux/arm64/v8");
        let c = Credentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
