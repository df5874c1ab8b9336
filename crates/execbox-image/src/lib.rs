//! Images for execbox sandboxes: what a sandbox's root is made of.
//!
//! This crate knows nothing of sandboxes or HTTP routes: it turns an image reference into
//! read-only layer directories on the host (pulled, verified and unpacked once, shared by every
//! sandbox that uses them) and builds templates from package registries.
//!
//! # The image store
//!
//! [`ImageStore`] pulls OCI images (and Docker schema 2 images) from registries, imports them
//! from OCI layouts, and keeps their layers unpacked, content-addressed and shared. A sandbox's
//! root is an overlayfs whose lower layers are an [`Image`]'s `layers` (bottom first here;
//! `lowerdir=` wants them top first), mounted with `userxattr`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), execbox_image::ImageError> {
//! use std::collections::HashSet;
//! use execbox_image::{ImageStore, StoreConfig};
//!
//! let store = ImageStore::open("/var/lib/execbox/images".as_ref(), StoreConfig::default())?;
//! // Pulled once (concurrent callers wait for the same pull); later calls are a lookup.
//! let image = store.resolve("python:3.12-slim", None).await?;
//! println!("{} {} {:?}", image.reference, image.id, image.config.cmd);
//! for layer in &image.layers {
//!     println!("lower layer (bottom first): {}", layer.display());
//! }
//! // Live sandboxes' image ids keep their images.
//! let in_use: HashSet<String> = [image.id.clone()].into();
//! store.gc(&in_use)?;
//! # Ok(()) }
//! ```
//!
//! | call | what it does |
//! |---|---|
//! | `ImageStore::open(root, StoreConfig)` | opens (creates) the store; removes what crashed operations left in `tmp/` |
//! | `resolve(reference, Option<&Credentials>).await -> Arc<Image>` | the stored image, or pulls it: a memory lookup and one `stat` when stored (~10 µs, no network); single flight per image and per layer |
//! | `pull(reference, auth, &dyn Fn(&PullEvent)).await -> Arc<Image>` | always asks the registry again (a tag may have moved); stored layers are not downloaded again |
//! | `get(reference) -> Option<Arc<Image>>`, `list() -> Vec<ImageSummary>` | what is stored |
//! | `remove(reference, &in_use)` | forgets a reference; refuses ([`ImageError::InUse`]) when its image id is in use and no other reference keeps it |
//! | `gc(&in_use) -> GcReport` | removes layers and blobs that no stored image, no image in use and no running pull (of any process) references |
//! | `import_oci_layout(dir, tag, name)`, `import_oci_archive(file, tag, name)` | imports from local files: for the command line only, never on behalf of an API client |
//! | `stats() -> StoreStats` | counters: manifests and blobs fetched, bytes, layers unpacked |
//!
//! References are normalized as Docker does (`python:3.12-slim` is
//! `docker.io/library/python:3.12-slim`). A registry on a loopback address (`localhost`,
//! `127.0.0.0/8`, `::1`) may be plain HTTP; any other needs TLS (rustls, the system's roots)
//! unless listed in [`StoreConfig::insecure_registries`]. Credentials given to a call win over
//! [`StoreConfig::credentials`] (keyed by `host[:port]`, `docker.io` for Docker Hub); registry
//! clients, and the tokens they earn, are never shared between credentials. A multi-platform
//! index resolves to [`StoreConfig::platform`] (Linux on this machine's architecture).
//!
//! An image already stored is returned whoever asks, whatever credentials pulled it: deciding
//! who may use which image is the caller's business.
//!
//! # Verification
//!
//! Every blob is checked against its descriptor's digest and size as it arrives (manifests
//! against the digest a reference names); each layer's uncompressed stream (gzip, zstd or plain
//! tar, told apart by content) must match the configuration's `rootfs.diff_ids`, which name the
//! layer directories. A layer or configuration over the limits of [`StoreConfig`] is refused.
//!
//! # Unpacking untrusted layers
//!
//! Every entry is created through the kernel's scoped resolution (`execbox_jail::fsroot`:
//! `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`) and one-name `*at` calls that never
//! follow a link. A name with `..`, or whose parent resolves outside the layer (through an
//! absolute or climbing symlink of the layer), fails the pull ([`ImageError::UnsafeLayer`]);
//! symlinks are kept as written; hard links only to entries of the same layer; device nodes are
//! dropped; setuid/setgid bits and every extended attribute of the tar (file capabilities
//! included) are dropped; owners are kept (root) or not (rootless); times are kept. Whiteouts
//! become what overlayfs reads: `.wh.NAME` a character device 0/0, `.wh..wh..opq` the xattr
//! `user.overlay.opaque=y`.
//!
//! # Layout on disk
//!
//! ```text
//! <root>/
//!   store.json                   {"version": 1}
//!   store.lock                   flock: the short critical sections (below)
//!   layers/<hex>/                an unpacked layer; <hex> = its diff_id (sha256 of the
//!                                uncompressed tar). Appears whole (rename) and never changes.
//!   blobs/sha256/<hex>           manifests and configurations, verified
//!   images/<sha256(ref)>.json    one record per normalized reference: manifest and config
//!                                digests, diff_ids (bottom first), the run configuration
//!   tmp/op-<uuid>/               one per running operation (pull, import, gc), flocked while
//!                                it runs: its downloads, unpacks, `pins`, trash; removed when
//!                                it ends
//! ```
//!
//! The server and `execbox image` may use one store at once. Writers take `store.lock`
//! (exclusive, held for milliseconds: records, blobs, pins, gc's choice of victims), never
//! during downloads or unpacks. A pull writes the diff_ids it needs to its `pins` before
//! checking which layers exist, so a gc or a failing pull of any process spares them; a layer
//! is unpacked in the pull's work directory, synced, then renamed into `layers/` (the first of
//! two concurrent unpackers wins, the other discards its copy). When a pull fails (or its future
//! is dropped), the layers it added go unless an image or another running pull needs them, and
//! its work directory goes: nothing of it remains. A work directory whose lock can be taken
//! belongs to a process that died; `open` and `gc` remove it.

mod error;
mod flight;
mod hashing;
mod reference;
mod registry;
mod spec;
mod store;
pub mod template;
mod unpack;

pub use error::ImageError;
pub use spec::ImageConfig;
pub use store::{
    Credentials, GcReport, Image, ImageStore, ImageSummary, Platform, PullEvent, StoreConfig,
    StoreStats,
};
