//! Unpacking an untrusted layer tar into a directory.
//!
//! A layer comes from whoever controls the registry (or wrote the image), so every entry name
//! is hostile until the kernel has resolved it. The rules:
//!
//! - names are split on `/`; a leading `/` and `.` components are dropped; a `..` component
//!   anywhere fails the layer ([`ImageError::UnsafeLayer`]);
//! - an entry's parent directory is resolved by the kernel beneath the layer directory
//!   (`openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` through [`execbox_jail::fsroot`]): a
//!   symlink of this layer is followed only while it stays inside, so an absolute link or one
//!   that climbs out fails the layer; missing parents are created (0755);
//! - the entry itself is created with one `*at` call on that pinned parent and its plain name,
//!   never following a symlink there; what was at that name (an earlier entry of this layer) is
//!   removed first, so nothing is ever written through a link;
//! - symlinks are created with their target text unchanged (it is data: the sandbox resolves it
//!   inside its own root);
//! - hard links only to an entry of this layer (the directory holds nothing else), never to a
//!   directory;
//! - character and block devices are dropped (sockets cannot be in a tar); named pipes are kept;
//! - setuid and setgid bits are dropped, the sticky bit is kept; no extended attribute of the tar
//!   is applied (file capabilities included);
//! - owners are kept (without following links) when the store runs as root, and left to the
//!   store's user otherwise; modification times are kept;
//! - whiteouts become what overlayfs reads: `.wh.NAME` a character device 0/0 named `NAME`,
//!   `.wh..wh..opq` the xattr `user.overlay.opaque=y` on its directory (the sandbox mounts the
//!   overlay with `userxattr`);
//! - directories are created 0700 and get their own mode, owner and time once every entry is
//!   in, deepest first, so a read-only directory of the image does not stop its own contents.
//!
//! The uncompressed stream is hashed as it is read, and the whole of it (the tar's trailing
//! blocks too) must match the `diff_id` of the image's configuration.

use std::cmp::Reverse;
use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use execbox_jail::fsroot::{self, Dir, OpenFlags, OVERLAY_OPAQUE_XATTR};
use tar::EntryType;

use crate::error::ImageError;
use crate::hashing::Hashing;
use crate::spec::Digest;

/// Deepest entry accepted (the store's own tree removal goes no deeper).
const MAX_DEPTH: usize = fsroot::MAX_TREE_DEPTH - 16;

/// Read buffer of the decompressor and of file copies.
const BUF: usize = 256 * 1024;

/// How to unpack.
pub(crate) struct UnpackOptions<'a> {
    /// Keep the tar's owners (the store runs as root).
    pub chown: bool,
    /// Most uncompressed bytes.
    pub max_bytes: u64,
    /// Read `.wh.` entries as overlay whiteouts (layers); false for other archives.
    pub whiteouts: bool,
    /// The digest the whole uncompressed stream must have.
    pub expect: Option<&'a Digest>,
    /// Set when the pull this unpack serves was abandoned: stop at the next entry.
    pub cancel: Option<&'a AtomicBool>,
}

/// What an unpack read.
#[derive(Debug)]
pub(crate) struct Unpacked {
    /// sha256 of the uncompressed stream.
    #[cfg_attr(not(test), allow(dead_code))]
    pub diff_id: Digest,
    /// Its length.
    pub bytes: u64,
    /// Entries read.
    pub entries: u64,
}

/// Unpacks the (gzip, zstd or plain) tar read from `input` into `root`, an empty directory the
/// caller made. `layer` names the blob in errors. On error `root` holds a partial tree: the
/// caller removes it.
pub(crate) fn unpack(
    input: impl Read,
    root: &Dir,
    layer: &str,
    opts: &UnpackOptions<'_>,
) -> Result<Unpacked, ImageError> {
    let mut buffered = BufReader::with_capacity(BUF, input);
    let magic = buffered
        .fill_buf()
        .map_err(|e| read_error(layer, e))?
        .get(..4)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    // The content decides, not the media type: some registries mislabel layers.
    let decoder: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(buffered)
                .map_err(ImageError::io("starting the zstd decoder"))?,
        )
    } else {
        Box::new(buffered)
    };
    let mut archive = tar::Archive::new(Hashing::new(decoder, opts.max_bytes));
    let mut u = Unpacker {
        root,
        layer,
        opts,
        dirs: Vec::new(),
        cache: None,
        entries: 0,
        buf: vec![0; BUF],
    };
    let walked = u.walk(&mut archive);
    let mut stream = archive.into_inner();
    let too_large = |stream: &Hashing<_>| {
        stream.exceeded().then(|| ImageError::TooLarge {
            what: format!("layer {layer} (uncompressed)"),
            limit: opts.max_bytes,
        })
    };
    if let Some(e) = too_large(&stream) {
        return Err(e);
    }
    walked?;
    // The diff_id covers the whole stream, the tar's end blocks and padding included.
    if let Err(e) = stream.drain() {
        return Err(too_large(&stream).unwrap_or_else(|| read_error(layer, e)));
    }
    u.finish_dirs()?;
    let entries = u.entries;
    let (diff_id, bytes) = stream.finish();
    if let Some(want) = opts.expect {
        if *want != diff_id {
            return Err(ImageError::corrupt(format!(
                "layer {layer}: its content is {diff_id}, the image configuration says {want}"
            )));
        }
    }
    Ok(Unpacked {
        diff_id,
        bytes,
        entries,
    })
}

fn read_error(layer: &str, e: io::Error) -> ImageError {
    ImageError::corrupt(format!("layer {layer}: {e}"))
}

/// A directory's own metadata, applied once its contents are in.
struct DirMeta {
    path: Vec<OsString>,
    mode: u32,
    owner: (u32, u32),
    mtime: i64,
}

struct Unpacker<'a> {
    root: &'a Dir,
    layer: &'a str,
    opts: &'a UnpackOptions<'a>,
    dirs: Vec<DirMeta>,
    /// The last parent resolved (entries come grouped by directory).
    cache: Option<(Vec<OsString>, Dir)>,
    entries: u64,
    buf: Vec<u8>,
}

/// The metadata of one entry, PAX records applied.
struct Meta {
    mode: u32,
    owner: (u32, u32),
    mtime: i64,
}

impl Unpacker<'_> {
    fn walk<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<(), ImageError> {
        let entries = archive.entries().map_err(|e| read_error(self.layer, e))?;
        for entry in entries {
            if self.opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(ImageError::Io {
                    what: format!("unpacking layer {}", self.layer),
                    source: io::Error::new(io::ErrorKind::Interrupted, "the pull was abandoned"),
                });
            }
            let mut entry = entry.map_err(|e| read_error(self.layer, e))?;
            self.entries += 1;
            self.entry(&mut entry)?;
        }
        Ok(())
    }

    fn unsafe_entry(&self, name: &str, why: impl std::fmt::Display) -> ImageError {
        ImageError::UnsafeLayer {
            digest: self.layer.to_owned(),
            why: format!("{name:?}: {why}"),
        }
    }

    /// An error of the file system while creating `name`.
    fn fs_error(&self, name: &str, doing: &str, e: io::Error) -> ImageError {
        match e.raw_os_error() {
            // What the entries themselves cause.
            Some(
                libc::ENAMETOOLONG
                | libc::EEXIST
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::EINVAL
                | libc::ENOTEMPTY,
            ) => ImageError::corrupt(format!("layer {}: {name:?}: {doing}: {e}", self.layer)),
            // A symlink of the layer leads out of it (absolute, or `..` above it).
            Some(libc::EXDEV | libc::ELOOP) => {
                self.unsafe_entry(name, format!("{doing}: resolves outside the layer ({e})"))
            }
            _ => ImageError::Io {
                what: format!("layer {}: {name:?}: {doing}", self.layer),
                source: e,
            },
        }
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>, name: &str) -> Result<Meta, ImageError> {
        let h = entry.header();
        let bad = |what: &str, e: io::Error| {
            ImageError::corrupt(format!("layer {}: {name:?}: {what}: {e}", self.layer))
        };
        let mode = h.mode().map_err(|e| bad("mode", e))? & 0o1777;
        let mut uid = h.uid().map_err(|e| bad("uid", e))?;
        let mut gid = h.gid().map_err(|e| bad("gid", e))?;
        let mut mtime = i64::try_from(h.mtime().map_err(|e| bad("mtime", e))?).unwrap_or(i64::MAX);
        // PAX records override the header's fields (ids and times that do not fit in it).
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for rec in pax.flatten() {
                let value = rec.value().unwrap_or("");
                match rec.key_bytes() {
                    b"uid" => uid = value.parse().unwrap_or(uid),
                    b"gid" => gid = value.parse().unwrap_or(gid),
                    b"mtime" => {
                        let secs = value.split('.').next().unwrap_or("");
                        mtime = secs.parse().unwrap_or(mtime);
                    }
                    _ => {}
                }
            }
        }
        let id = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| {
                ImageError::corrupt(format!(
                    "layer {}: {name:?}: {what} {v} out of range",
                    self.layer
                ))
            })
        };
        Ok(Meta {
            mode,
            owner: (id(uid, "uid")?, id(gid, "gid")?),
            mtime,
        })
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let kind = entry.header().entry_type();
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            tracing::debug!(layer = self.layer, name = %shown, "tar extension header skipped");
            return Ok(());
        }
        let comps = split_name(&raw).map_err(|why| self.unsafe_entry(&shown, why))?;
        let meta = self.meta(entry, &shown)?;
        let Some((name, parents)) = comps.split_last() else {
            // `./` or `/`: the layer's root itself.
            if kind == EntryType::Directory {
                self.dirs.push(DirMeta {
                    path: Vec::new(),
                    mode: meta.mode,
                    owner: meta.owner,
                    mtime: meta.mtime,
                });
                return Ok(());
            }
            return Err(self.unsafe_entry(&shown, "names the layer's root but is not a directory"));
        };
        let name = name.as_os_str();
        if self.opts.whiteouts {
            if let Some(hidden) = name.as_bytes().strip_prefix(b".wh.") {
                return self.whiteout(parents, hidden, &shown);
            }
        }
        let parent = self.parent(parents, &shown)?;
        match kind {
            EntryType::Directory => {
                match parent.lstat(name) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => {
                        self.clear(&parent, name, &shown)?;
                        parent
                            .mkdir(name, 0o700)
                            .map_err(|e| self.fs_error(&shown, "mkdir", e))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        parent
                            .mkdir(name, 0o700)
                            .map_err(|e| self.fs_error(&shown, "mkdir", e))?;
                    }
                    Err(e) => return Err(self.fs_error(&shown, "lstat", e)),
                }
                self.dirs.push(DirMeta {
                    path: comps.clone(),
                    mode: meta.mode,
                    owner: meta.owner,
                    mtime: meta.mtime,
                });
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.clear(&parent, name, &shown)?;
                let mut file = parent
                    .create_new(name, 0o600)
                    .map_err(|e| self.fs_error(&shown, "create", e))?;
                self.copy(entry, &mut file, &shown)?;
                if self.opts.chown {
                    fsroot::chown_fd(file.as_fd(), Some(meta.owner.0), Some(meta.owner.1))
                        .map_err(|e| self.fs_error(&shown, "chown", e))?;
                }
                file.set_permissions(std::fs::Permissions::from_mode(meta.mode))
                    .map_err(|e| self.fs_error(&shown, "chmod", e))?;
                drop(file);
                self.times(&parent, name, meta.mtime, &shown)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .filter(|t| !t.is_empty() && !t.contains(&0))
                    .ok_or_else(|| {
                        ImageError::corrupt(format!(
                            "layer {}: symlink {shown:?} has no target",
                            self.layer
                        ))
                    })?;
                self.clear(&parent, name, &shown)?;
                parent
                    .symlink(Path::new(OsStr::from_bytes(&target)), name)
                    .map_err(|e| self.fs_error(&shown, "symlink", e))?;
                self.own_and_time(&parent, name, &meta, &shown)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                self.hard_link(&parent, name, &comps, &target, &shown)?;
            }
            EntryType::Fifo => {
                self.clear(&parent, name, &shown)?;
                parent
                    .mkfifo(name, meta.mode)
                    .map_err(|e| self.fs_error(&shown, "mkfifo", e))?;
                // mknod applies the umask.
                let pinned = parent
                    .pin(name)
                    .map_err(|e| self.fs_error(&shown, "open", e))?;
                fsroot::chmod_fd(pinned.as_fd(), meta.mode)
                    .map_err(|e| self.fs_error(&shown, "chmod", e))?;
                self.own_and_time(&parent, name, &meta, &shown)?;
            }
            EntryType::Char | EntryType::Block => {
                tracing::debug!(layer = self.layer, name = %shown, "device node dropped");
            }
            other => {
                tracing::debug!(layer = self.layer, name = %shown, kind = ?other, "entry type skipped");
            }
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        parents: &[OsString],
        hidden: &[u8],
        shown: &str,
    ) -> Result<(), ImageError> {
        let parent = self.parent(parents, shown)?;
        if hidden == b".wh..opq" {
            return parent.set_xattr(OVERLAY_OPAQUE_XATTR, b"y").map_err(|e| {
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    ImageError::unsupported(
                        "the store's file system has no user extended attributes (opaque directories need them)",
                    )
                } else {
                    self.fs_error(shown, "marking the directory opaque", e)
                }
            });
        }
        if hidden.starts_with(b".wh.") {
            // aufs's own bookkeeping (`.wh..wh.plnk`, `.wh..wh.aufs`): nothing for overlayfs.
            tracing::debug!(layer = self.layer, name = %shown, "aufs metadata skipped");
            return Ok(());
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&0) {
            return Err(self.unsafe_entry(shown, "whiteout of no name"));
        }
        let hidden = OsStr::from_bytes(hidden);
        match parent.lstat(hidden) {
            // A whiteout hides the layers below, never an entry of its own layer.
            Ok(_) => {
                tracing::debug!(layer = self.layer, name = %shown, "whiteout of an entry of the same layer: entry kept");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => parent
                .whiteout(hidden)
                .map_err(|e| self.fs_error(shown, "creating the whiteout", e)),
            Err(e) => Err(self.fs_error(shown, "lstat", e)),
        }
    }

    fn hard_link(
        &mut self,
        parent: &Dir,
        name: &OsStr,
        comps: &[OsString],
        target: &[u8],
        shown: &str,
    ) -> Result<(), ImageError> {
        let tcomps = split_name(target)
            .map_err(|why| self.unsafe_entry(shown, format!("hard link target: {why}")))?;
        let Some((tname, tparents)) = tcomps.split_last() else {
            return Err(self.unsafe_entry(shown, "hard link to the layer's root"));
        };
        if tcomps == comps {
            return Ok(());
        }
        let not_here = || {
            self.unsafe_entry(
                shown,
                format!(
                    "hard link to {:?}, which is not in this layer",
                    String::from_utf8_lossy(target)
                ),
            )
        };
        let tparent = match self.resolve(tparents) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_here()),
            Err(e) => return Err(self.fs_error(shown, "resolving the hard link's target", e)),
        };
        match tparent.lstat(tname) {
            Ok(md) if md.is_dir() => {
                return Err(self.unsafe_entry(shown, "hard link to a directory"))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_here()),
            Err(e) => return Err(self.fs_error(shown, "lstat of the hard link's target", e)),
        }
        self.clear(parent, name, shown)?;
        tparent
            .hard_link(tname, parent, name)
            .map_err(|e| self.fs_error(shown, "link", e))
    }

    /// Resolves an existing directory of the layer, beneath its root.
    fn resolve(&self, comps: &[OsString]) -> io::Result<Dir> {
        if comps.is_empty() {
            return self.root.try_clone();
        }
        let path: PathBuf = comps.iter().collect();
        self.root
            .resolve_beneath(&path, OpenFlags::O_PATH | OpenFlags::O_DIRECTORY, true)
            .map(Dir::from_fd)
    }

    /// The parent directory of an entry, created (0755) where missing.
    fn parent(&mut self, comps: &[OsString], shown: &str) -> Result<Dir, ImageError> {
        if let Some((path, dir)) = &self.cache {
            if path.as_slice() == comps {
                return dir
                    .try_clone()
                    .map_err(ImageError::io("duplicating a descriptor"));
            }
        }
        let dir = match self.resolve(comps) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut cur = self
                    .root
                    .try_clone()
                    .map_err(ImageError::io("duplicating a descriptor"))?;
                for i in 0..comps.len() {
                    cur = match self.resolve(&comps[..=i]) {
                        Ok(d) => d,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            cur.mkdir(&comps[i], 0o755).map_err(|e| {
                                self.fs_error(shown, "creating a parent directory", e)
                            })?;
                            cur.subdir(&comps[i]).map_err(|e| {
                                self.fs_error(shown, "opening a parent directory", e)
                            })?
                        }
                        Err(e) => {
                            return Err(self.fs_error(shown, "resolving the parent directory", e))
                        }
                    };
                }
                cur
            }
            Err(e) => return Err(self.fs_error(shown, "resolving the parent directory", e)),
        };
        self.cache = Some((
            comps.to_vec(),
            dir.try_clone()
                .map_err(ImageError::io("duplicating a descriptor"))?,
        ));
        Ok(dir)
    }

    /// Removes what an earlier entry put at `name` (a directory with its contents).
    fn clear(&mut self, parent: &Dir, name: &OsStr, shown: &str) -> Result<(), ImageError> {
        match parent.lstat(name) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.fs_error(shown, "lstat", e)),
            Ok(md) => {
                // The cached parent may lie inside what goes.
                self.cache = None;
                if md.is_dir() {
                    parent.remove_tree(name)
                } else {
                    parent.unlink(name)
                }
                .map_err(|e| self.fs_error(shown, "replacing an earlier entry", e))
            }
        }
    }

    fn copy<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        file: &mut std::fs::File,
        shown: &str,
    ) -> Result<(), ImageError> {
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The stream's own error (truncated, over the limit): `unpack` tells which.
                Err(e) => return Err(read_error(self.layer, e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| self.fs_error(shown, "write", e))?;
        }
    }

    fn own_and_time(
        &self,
        parent: &Dir,
        name: &OsStr,
        meta: &Meta,
        shown: &str,
    ) -> Result<(), ImageError> {
        if self.opts.chown {
            parent
                .chown(name, Some(meta.owner.0), Some(meta.owner.1))
                .map_err(|e| self.fs_error(shown, "chown", e))?;
        }
        self.times(parent, name, meta.mtime, shown)
    }

    fn times(&self, parent: &Dir, name: &OsStr, mtime: i64, shown: &str) -> Result<(), ImageError> {
        match parent.set_times(name, (mtime, 0), (mtime, 0)) {
            // A time the file system cannot hold is not worth failing the image for.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOVERFLOW)) => {
                tracing::debug!(layer = self.layer, name = %shown, mtime, "time not kept: {e}");
                Ok(())
            }
            r => r.map_err(|e| self.fs_error(shown, "setting times", e)),
        }
    }

    /// Applies each directory's own metadata, deepest first.
    fn finish_dirs(&mut self) -> Result<(), ImageError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|d| Reverse(d.path.len()));
        for d in &dirs {
            let shown = d
                .path
                .iter()
                .map(|c| c.to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let (parents, name) = match d.path.split_last() {
                Some((name, parents)) => (parents, name.as_os_str()),
                None => (&[][..], OsStr::new(".")),
            };
            // A later entry may have replaced the directory: then there is nothing to apply.
            let Ok(parent) = self.resolve(parents) else {
                continue;
            };
            let Ok(pinned) = parent.pin(name) else {
                continue;
            };
            if !pinned.metadata().is_ok_and(|m| m.is_dir()) {
                continue;
            }
            if self.opts.chown {
                fsroot::chown_fd(pinned.as_fd(), Some(d.owner.0), Some(d.owner.1))
                    .map_err(|e| self.fs_error(&shown, "chown", e))?;
            }
            fsroot::chmod_fd(pinned.as_fd(), d.mode)
                .map_err(|e| self.fs_error(&shown, "chmod", e))?;
            self.times(&parent, name, d.mtime, &shown)?;
        }
        Ok(())
    }
}

/// Splits an entry name into plain components: a leading `/` and `.` components dropped, `..`
/// refused.
fn split_name(raw: &[u8]) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("has a `..` component".into()),
            c if c.contains(&0) => return Err("contains a NUL byte".into()),
            c => out.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    if out.len() > MAX_DEPTH {
        return Err(format!("deeper than {MAX_DEPTH} levels"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::sync::atomic::AtomicU64;

    /// A tar written header by header, names and link targets as raw bytes (the tar crate's
    /// own builder refuses the hostile names these tests need).
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Tar {
            Tar(tar::Builder::new(Vec::new()))
        }
        fn add(
            &mut self,
            kind: EntryType,
            name: &str,
            link: &str,
            mode: u32,
            data: &[u8],
        ) -> &mut Tar {
            let mut h = tar::Header::new_gnu();
            {
                let old = h.as_old_mut();
                old.name[..name.len()].copy_from_slice(name.as_bytes());
                old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_uid(1234);
            h.set_gid(2345);
            h.set_mtime(1_600_000_000);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn file(&mut self, name: &str, data: &str) -> &mut Tar {
            self.add(EntryType::Regular, name, "", 0o644, data.as_bytes())
        }
        fn dir(&mut self, name: &str, mode: u32) -> &mut Tar {
            self.add(EntryType::Directory, name, "", mode, b"")
        }
        fn symlink(&mut self, name: &str, target: &str) -> &mut Tar {
            self.add(EntryType::Symlink, name, target, 0o777, b"")
        }
        fn hardlink(&mut self, name: &str, target: &str) -> &mut Tar {
            self.add(EntryType::Link, name, target, 0o644, b"")
        }
        fn bytes(&mut self) -> Vec<u8> {
            std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()))
                .into_inner()
                .unwrap()
        }
    }

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "execbox-unpack-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(p.join("layer")).unwrap();
            std::fs::create_dir_all(p.join("outside")).unwrap();
            Scratch(p)
        }
        fn layer(&self) -> PathBuf {
            self.0.join("layer")
        }
        fn outside(&self) -> PathBuf {
            self.0.join("outside")
        }
        fn unpack(&self, tar: &[u8]) -> Result<Unpacked, ImageError> {
            let root = Dir::open_trusted(&self.layer()).unwrap();
            let opts = UnpackOptions {
                chown: nix::unistd::geteuid().is_root(),
                max_bytes: 1 << 30,
                whiteouts: true,
                expect: None,
                cancel: None,
            };
            unpack(tar, &root, "sha256:test", &opts)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = Command::new("chmod")
                .arg("-R")
                .arg("u+rwx")
                .arg(&self.0)
                .status();
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    use std::process::Command;

    fn is_unsafe(r: Result<Unpacked, ImageError>) -> String {
        match r {
            Err(ImageError::UnsafeLayer { why, .. }) => why,
            other => panic!("expected UnsafeLayer, got {other:?}"),
        }
    }

    #[test]
    fn dot_dot_fails_the_layer() {
        for name in ["../evil", "a/../../evil", "./../evil", "a/b/../../../evil"] {
            let s = Scratch::new("dotdot");
            let why = is_unsafe(s.unpack(&Tar::new().file(name, "x").bytes()));
            assert!(why.contains(".."), "{name}: {why}");
            assert!(!s.0.join("evil").exists() && !s.outside().join("evil").exists());
        }
    }

    #[test]
    fn absolute_names_stay_in_the_layer() {
        let s = Scratch::new("abs");
        s.unpack(&Tar::new().file("/etc/hosts", "inside").bytes())
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(s.layer().join("etc/hosts")).unwrap(),
            "inside"
        );
    }

    #[test]
    fn a_file_beneath_an_absolute_symlink_fails_the_layer() {
        let s = Scratch::new("abslink");
        let out = s.outside();
        let why = is_unsafe(
            s.unpack(
                &Tar::new()
                    .symlink("evil", out.to_str().unwrap())
                    .file("evil/pwned", "x")
                    .bytes(),
            ),
        );
        assert!(why.contains("outside the layer"), "{why}");
        assert!(!out.join("pwned").exists());
        // The symlink itself is data: kept as written.
        assert_eq!(std::fs::read_link(s.layer().join("evil")).unwrap(), out);
    }

    #[test]
    fn a_file_beneath_a_climbing_symlink_fails_the_layer() {
        let s = Scratch::new("uplink");
        let tar = Tar::new()
            .symlink("up", "../outside")
            .file("up/pwned", "x")
            .bytes();
        is_unsafe(s.unpack(&tar));
        assert!(!s.outside().join("pwned").exists());
        // A symlink that stays inside is followed.
        let s = Scratch::new("inlink");
        s.unpack(
            &Tar::new()
                .dir("usr/lib", 0o755)
                .symlink("lib", "usr/lib")
                .file("lib/x", "y")
                .bytes(),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(s.layer().join("usr/lib/x")).unwrap(),
            "y"
        );
    }

    #[test]
    fn a_file_never_goes_through_an_earlier_symlink_of_its_name() {
        let s = Scratch::new("replace");
        let victim = s.outside().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        s.unpack(
            &Tar::new()
                .symlink("f", victim.to_str().unwrap())
                .file("f", "new")
                .bytes(),
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let md = std::fs::symlink_metadata(s.layer().join("f")).unwrap();
        assert!(md.is_file());
        assert_eq!(std::fs::read_to_string(s.layer().join("f")).unwrap(), "new");
    }

    #[test]
    fn hard_links_only_inside_the_layer() {
        for target in ["../outside/secret", "/etc/passwd", "missing", "a/../../x"] {
            let s = Scratch::new("hardlink");
            std::fs::write(s.outside().join("secret"), "s").unwrap();
            is_unsafe(s.unpack(&Tar::new().hardlink("h", target).bytes()));
            assert!(
                std::fs::symlink_metadata(s.layer().join("h")).is_err(),
                "{target}"
            );
        }
        // Through a symlink that leads out.
        let s = Scratch::new("hardlink-sym");
        std::fs::write(s.outside().join("secret"), "s").unwrap();
        let out = s.outside();
        is_unsafe(
            s.unpack(
                &Tar::new()
                    .symlink("o", out.to_str().unwrap())
                    .hardlink("h", "o/secret")
                    .bytes(),
            ),
        );
        assert_eq!(std::fs::metadata(out.join("secret")).unwrap().nlink(), 1);
        // To a directory.
        let s = Scratch::new("hardlink-dir");
        is_unsafe(s.unpack(&Tar::new().dir("d", 0o755).hardlink("h", "d").bytes()));
        // To an entry of the layer: one inode.
        let s = Scratch::new("hardlink-ok");
        s.unpack(
            &Tar::new()
                .file("a/f", "data")
                .hardlink("b/g", "/a/f")
                .bytes(),
        )
        .unwrap();
        let (f, g) = (
            std::fs::metadata(s.layer().join("a/f")).unwrap(),
            std::fs::metadata(s.layer().join("b/g")).unwrap(),
        );
        assert_eq!(f.ino(), g.ino());
    }

    #[test]
    fn devices_dropped_fifos_kept_setuid_dropped() {
        let s = Scratch::new("special");
        let mut t = Tar::new();
        t.add(EntryType::Char, "dev/null", "", 0o666, b"")
            .add(EntryType::Block, "dev/sda", "", 0o660, b"")
            .add(EntryType::Fifo, "pipe", "", 0o640, b"")
            .add(EntryType::Regular, "bin/su", "", 0o6755, b"#!")
            .add(EntryType::Directory, "shared", "", 0o3777, b"");
        s.unpack(&t.bytes()).unwrap();
        assert!(std::fs::symlink_metadata(s.layer().join("dev/null")).is_err());
        assert!(std::fs::symlink_metadata(s.layer().join("dev/sda")).is_err());
        let pipe = std::fs::symlink_metadata(s.layer().join("pipe")).unwrap();
        assert!(pipe.file_type().is_fifo());
        assert_eq!(pipe.mode() & 0o7777, 0o640);
        let su = std::fs::metadata(s.layer().join("bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o755);
        let shared = std::fs::metadata(s.layer().join("shared")).unwrap();
        assert_eq!(shared.mode() & 0o7777, 0o1777);
    }

    #[test]
    fn whiteouts_and_opaque_directories() {
        let s = Scratch::new("whiteout");
        s.unpack(
            &Tar::new()
                .dir("etc", 0o755)
                .file("etc/.wh.gone", "")
                .file(".wh.top", "")
                .dir("opaque", 0o755)
                .file("opaque/.wh..wh..opq", "")
                .file("opaque/kept", "k")
                // Same-layer entry: the whiteout does not hide it.
                .file("same", "s")
                .file(".wh.same", "")
                .bytes(),
        )
        .unwrap();
        for w in ["etc/gone", "top"] {
            let md = std::fs::symlink_metadata(s.layer().join(w)).unwrap();
            assert!(md.file_type().is_char_device(), "{w}");
            assert_eq!(md.rdev(), 0, "{w}");
        }
        assert!(std::fs::symlink_metadata(s.layer().join("etc/.wh.gone")).is_err());
        let opaque = Dir::open_trusted(&s.layer().join("opaque")).unwrap();
        assert_eq!(
            opaque.xattr(OVERLAY_OPAQUE_XATTR).unwrap().as_deref(),
            Some(&b"y"[..])
        );
        assert!(std::fs::symlink_metadata(s.layer().join("opaque/.wh..wh..opq")).is_err());
        assert_eq!(
            std::fs::read_to_string(s.layer().join("same")).unwrap(),
            "s"
        );
        let etc = Dir::open_trusted(&s.layer().join("etc")).unwrap();
        assert_eq!(etc.xattr(OVERLAY_OPAQUE_XATTR).unwrap(), None);
    }

    #[test]
    fn metadata_kept_and_read_only_directories_filled() {
        let s = Scratch::new("meta");
        s.unpack(
            &Tar::new()
                .dir("./", 0o755)
                .dir("ro", 0o555)
                .file("ro/f", "x")
                .symlink("ro/l", "/etc/passwd")
                .bytes(),
        )
        .unwrap();
        let ro = std::fs::metadata(s.layer().join("ro")).unwrap();
        assert_eq!(ro.mode() & 0o7777, 0o555);
        assert_eq!(ro.mtime(), 1_600_000_000);
        let f = std::fs::metadata(s.layer().join("ro/f")).unwrap();
        assert_eq!((f.mode() & 0o7777, f.mtime()), (0o644, 1_600_000_000));
        let l = std::fs::symlink_metadata(s.layer().join("ro/l")).unwrap();
        assert_eq!(l.mtime(), 1_600_000_000);
        assert_eq!(
            std::fs::read_link(s.layer().join("ro/l")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(std::fs::metadata(s.layer()).unwrap().mtime(), 1_600_000_000);
        if nix::unistd::geteuid().is_root() {
            for p in ["ro", "ro/f"] {
                let md = std::fs::metadata(s.layer().join(p)).unwrap();
                assert_eq!((md.uid(), md.gid()), (1234, 2345), "{p}");
            }
            assert_eq!(l.uid(), 1234);
        }
    }

    #[test]
    fn compressed_layers_and_the_diff_id() {
        let tar = Tar::new().file("a", "hello").bytes();
        let diff = Digest::of(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(&tar[..], 3).unwrap();
        for blob in [&tar, &gz, &zst] {
            let s = Scratch::new("compressed");
            let root = Dir::open_trusted(&s.layer()).unwrap();
            let opts = UnpackOptions {
                chown: false,
                max_bytes: 1 << 20,
                whiteouts: true,
                expect: Some(&diff),
                cancel: None,
            };
            let u = unpack(&blob[..], &root, "sha256:t", &opts).unwrap();
            assert_eq!(
                (u.diff_id.clone(), u.bytes),
                (diff.clone(), tar.len() as u64)
            );
            assert_eq!(
                std::fs::read_to_string(s.layer().join("a")).unwrap(),
                "hello"
            );
            // Another diff_id: refused.
            let s = Scratch::new("compressed-bad");
            let root = Dir::open_trusted(&s.layer()).unwrap();
            let other = Digest::of(b"other");
            let opts = UnpackOptions {
                expect: Some(&other),
                ..opts
            };
            assert!(matches!(
                unpack(&blob[..], &root, "sha256:t", &opts),
                Err(ImageError::Corrupt { .. })
            ));
        }
    }

    #[test]
    fn size_limit_and_truncation() {
        let big = "x".repeat(100_000);
        let tar = Tar::new().file("big", &big).bytes();
        let s = Scratch::new("limit");
        let root = Dir::open_trusted(&s.layer()).unwrap();
        let opts = UnpackOptions {
            chown: false,
            max_bytes: 50_000,
            whiteouts: true,
            expect: None,
            cancel: None,
        };
        assert!(matches!(
            unpack(&tar[..], &root, "sha256:t", &opts),
            Err(ImageError::TooLarge { .. })
        ));
        let s = Scratch::new("truncated");
        let root = Dir::open_trusted(&s.layer()).unwrap();
        let opts = UnpackOptions {
            max_bytes: 1 << 20,
            ..opts
        };
        let r = unpack(&tar[..60_000], &root, "sha256:t", &opts);
        assert!(matches!(r, Err(ImageError::Corrupt { .. })), "{r:?}");
    }

    #[test]
    fn entry_kinds_replace_each_other() {
        let s = Scratch::new("kinds");
        s.unpack(
            &Tar::new()
                .file("d/inner", "x")
                // A file replaces a directory of the same layer, and a directory a file.
                .file("d", "now a file")
                .file("e", "file")
                .dir("e", 0o755)
                .file("e/x", "y")
                .bytes(),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(s.layer().join("d")).unwrap(),
            "now a file"
        );
        assert_eq!(std::fs::read_to_string(s.layer().join("e/x")).unwrap(), "y");
    }
}
