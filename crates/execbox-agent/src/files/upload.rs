//! `POST /files/upload`: multipart pairs of `metadata` and `file`, each file streamed into a
//! hidden temporary file beside its destination and renamed into place once complete.
//!
//! The request body is never held in memory: chunks are gathered into ~1 MiB batches (without
//! copying) and handed to a blocking writer thread, which writes each batch with one `writev`,
//! through a small bounded channel that also gives backpressure.
//! The writer only renames after an explicit commit; if the request fails or is cut, the
//! channel closes without one and the temporary file is removed.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{Multipart, State};
use axum::http::StatusCode;
use execbox_jail::process::Credentials;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::info::Names;
use super::resolve::{self, Dir, Owner, DEFAULT_MODE};
use super::{blocking, parent_owner, Permission};
use crate::error::ApiError;
use crate::paths;
use crate::AppState;

/// Bytes gathered before a batch goes to the writer.
const BATCH: usize = 1024 * 1024;
/// Buffers in flight between the request and the writer.
const IN_FLIGHT: usize = 4;
/// Largest accepted metadata part.
const MAX_METADATA: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
struct UploadMetadata {
    #[serde(default)]
    path: Option<String>,
    #[serde(flatten)]
    permission: Permission,
}

enum Msg {
    Data(Vec<Bytes>),
    Commit,
}

/// A temporary file ready to receive one upload.
pub(crate) struct Target {
    shown: PathBuf,
    dir: Dir,
    name: OsString,
    temp: OsString,
    file: File,
    owner: Owner,
}

fn form_error(e: MultipartError) -> ApiError {
    ApiError::InvalidFile(format!("error reading multipart form. {}", e.body_text()))
}

fn parse_metadata(raw: &[u8]) -> Result<(String, Permission), ApiError> {
    let meta: UploadMetadata = serde_json::from_slice(raw)
        .map_err(|e| ApiError::InvalidFileMetadata(format!("error parsing metadata. {e}")))?;
    match meta.path {
        Some(p) if !p.is_empty() => Ok((p, meta.permission)),
        _ => Err(ApiError::InvalidFileMetadata(
            "invalid metadata. path is empty".into(),
        )),
    }
}

async fn read_metadata(field: &mut Field<'_>) -> Result<Vec<u8>, ApiError> {
    let mut raw = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(form_error)? {
        if raw.len() + chunk.len() > MAX_METADATA {
            return Err(ApiError::InvalidFileMetadata(format!(
                "metadata part larger than {MAX_METADATA} bytes"
            )));
        }
        raw.extend_from_slice(&chunk);
    }
    Ok(raw)
}

/// Resolves the destination (creating parents), validates the Permission and opens the
/// temporary file.
pub(crate) fn prepare(
    shown: PathBuf,
    perm: &Permission,
    user: Credentials,
) -> Result<Target, ApiError> {
    prepare_with_mode(shown, perm, user, DEFAULT_MODE)
}

/// [`prepare`], a new file getting `new_mode` when the request names none.
pub(crate) fn prepare_with_mode(
    shown: PathBuf,
    perm: &Permission,
    user: Credentials,
    new_mode: u32,
) -> Result<Target, ApiError> {
    let wanted = perm.resolve(&Names::load())?;
    let (dir, name) =
        resolve::for_create(&shown, parent_owner(user)).map_err(|e| e.into_api(&shown))?;
    let err = |e: io::Error| ApiError::from_io(&format!("error writing {}", shown.display()), &e);
    // Without a requested mode, a file being overwritten keeps its mode, as with truncate.
    let mut default_mode = new_mode;
    match dir.lstat(&name) {
        Ok(md) if md.is_dir() => {
            return Err(ApiError::BadRequest(format!(
                "invalid request, validation error {} is a directory",
                shown.display()
            )))
        }
        Ok(md) if md.is_file() => default_mode = md.mode() & 0o7777,
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let (file, temp) = dir.temp_file().map_err(err)?;
    Ok(Target {
        owner: wanted.for_new(user, default_mode),
        shown,
        dir,
        name,
        temp,
        file,
    })
}

/// Writes every chunk, with as few `writev` calls as the kernel allows.
fn write_chunks(file: &mut File, chunks: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The blocking writer: writes every buffer, and renames into place only on `Commit`.
fn write_target(target: Target, mut rx: mpsc::Receiver<Msg>) -> Result<(), ApiError> {
    let Target {
        shown,
        dir,
        name,
        temp,
        mut file,
        owner,
    } = target;
    let written = (|| {
        while let Some(msg) = rx.blocking_recv() {
            match msg {
                Msg::Data(chunks) => write_chunks(&mut file, &chunks)?,
                Msg::Commit => return Ok(true),
            }
        }
        Ok::<_, io::Error>(false)
    })();
    let err =
        |e: io::Error| match ApiError::from_io(&format!("error writing {}", shown.display()), &e) {
            // Name the limit that was hit: the size of the file system it was written to.
            ApiError::StorageFull(_) => ApiError::StorageFull(format!(
                "error writing {}. it does not fit in the sandbox's storage: the file system \
             holding it is limited to {} bytes",
                shown.display(),
                crate::storage_limit_of(dir.fs())
            )),
            other => other,
        };
    match written {
        Ok(true) => dir.commit(file, &temp, &name, owner).map_err(err),
        Ok(false) => {
            drop(file);
            dir.remove_temp(&temp);
            Err(ApiError::Runtime(format!(
                "error writing {}. upload aborted",
                shown.display()
            )))
        }
        Err(e) => {
            drop(file);
            dir.remove_temp(&temp);
            Err(err(e))
        }
    }
}

/// Streams one `file` part to its destination. `total` counts file bytes of the whole request
/// against `limit` (0 = none).
/// A source of body chunks: a multipart part, or a whole request body.
pub(crate) trait Chunks {
    /// The next chunk; `None` at the end.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ApiError>;
}

impl Chunks for Field<'_> {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ApiError> {
        self.chunk().await.map_err(form_error)
    }
}

pub(crate) async fn receive(
    field: &mut impl Chunks,
    target: Target,
    total: &mut u64,
    limit: u64,
) -> Result<(), ApiError> {
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    let writer = tokio::task::spawn_blocking(move || write_target(target, rx));
    let (mut batch, mut batched) = (Vec::new(), 0usize);
    // Set when the request side fails; the writer then aborts because no commit comes.
    let mut failure = None;
    loop {
        match field.next_chunk().await {
            Ok(Some(chunk)) => {
                *total += chunk.len() as u64;
                if limit > 0 && *total > limit {
                    failure = Some(ApiError::TooLarge(format!(
                        "upload larger than the limit of {limit} bytes"
                    )));
                    break;
                }
                // Empty chunks would make `writev` report 0 bytes written.
                if chunk.is_empty() {
                    continue;
                }
                batched += chunk.len();
                batch.push(chunk);
                if batched >= BATCH {
                    batched = 0;
                    // A closed channel means the writer failed; its result says why.
                    if tx
                        .send(Msg::Data(std::mem::take(&mut batch)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            Ok(None) => {
                if !batch.is_empty() && tx.send(Msg::Data(batch)).await.is_err() {
                    break;
                }
                let _ = tx.send(Msg::Commit).await;
                break;
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ApiError::Runtime(format!("upload writer failed. {e}")))?;
    match failure {
        Some(e) => Err(e),
        None => written,
    }
}

/// `POST /files/upload`.
#[utoipa::path(
    post,
    path = "/files/upload",
    operation_id = "execdUploadFiles",
    tag = "execd",
    description = "Uploads files: `metadata` parts (JSON `{path, owner?, group?, mode?}`) each followed by its `file` part.",
    request_body(content = String, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Written."),
        (status = 400, description = "`INVALID_FILE`, `INVALID_FILE_CONTENT` or `INVALID_FILE_METADATA`.", body = execbox_proto::execd::ExecdError),
        (status = 404, description = "`FILE_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 413, description = "Over the upload limit, or the storage is full.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn upload(
    State(app): State<Arc<AppState>>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<StatusCode, ApiError> {
    let mut form =
        form.map_err(|e| ApiError::InvalidFile(format!("error parsing multipart form. {e}")))?;
    let env = app.runner.env_with(&[]);
    let user = app.runner.user();
    let mut pending: VecDeque<(String, Permission)> = VecDeque::new();
    let (mut metadata_parts, mut file_parts) = (0usize, 0usize);
    let mut out_of_order = None;
    let mut total = 0u64;
    while let Some(mut field) = form.next_field().await.map_err(form_error)? {
        // Once the pairing is broken only the counts matter; `next_field` skips unread data.
        match field.name() {
            Some("metadata") => {
                metadata_parts += 1;
                if out_of_order.is_none() {
                    let raw = read_metadata(&mut field).await?;
                    pending.push_back(parse_metadata(&raw)?);
                }
            }
            Some("file") => {
                file_parts += 1;
                if out_of_order.is_some() {
                    continue;
                }
                let Some((raw_path, perm)) = pending.pop_front() else {
                    out_of_order = Some(file_parts);
                    continue;
                };
                let shown = paths::resolve(&raw_path, &env)?;
                let target = blocking(move || prepare(shown, &perm, user)).await?;
                receive(&mut field, target, &mut total, app.max_upload_bytes).await?;
            }
            _ => {}
        }
    }
    if metadata_parts == 0 && file_parts == 0 {
        return Err(ApiError::InvalidFile("multipart form is empty".into()));
    }
    if metadata_parts == 0 {
        return Err(ApiError::InvalidFileMetadata(
            "metadata file is missing".into(),
        ));
    }
    if file_parts == 0 {
        return Err(ApiError::InvalidFileContent("file is missing".into()));
    }
    if metadata_parts != file_parts {
        return Err(ApiError::InvalidFile(format!(
            "metadata and file count mismatch: {metadata_parts} vs {file_parts}"
        )));
    }
    if let Some(n) = out_of_order {
        return Err(ApiError::InvalidFile(format!(
            "file part {n} came before its metadata part"
        )));
    }
    Ok(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::FromRequest;
    use std::path::Path;

    const B: &str = "unit-boundary";

    fn scratch() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "execbox-upload-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::canonicalize(&d).unwrap()
    }

    fn me(dir: &Path) -> Credentials {
        let md = std::fs::metadata(dir).unwrap();
        Credentials {
            uid: md.uid(),
            gid: md.gid(),
        }
    }

    /// Streams one `file` part (whose body chunks are `chunks`) into `dest`.
    async fn run(
        dest: PathBuf,
        chunks: Vec<io::Result<Bytes>>,
        limit: u64,
    ) -> Result<(), ApiError> {
        let user = me(dest.ancestors().find(|p| p.exists()).unwrap());
        let mut parts: Vec<io::Result<Bytes>> = vec![Ok(Bytes::from(format!(
            "--{B}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n"
        )))];
        parts.extend(chunks);
        // Fed through a channel with pauses, as a network would: multer reads ahead greedily.
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            for p in parts {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                if tx.send(p).await.is_err() {
                    return;
                }
            }
        });
        let req = axum::http::Request::builder()
            .header("content-type", format!("multipart/form-data; boundary={B}"))
            .body(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .unwrap();
        let mut form = Multipart::from_request(req, &()).await.unwrap();
        let mut field = form.next_field().await.unwrap().unwrap();
        let target = prepare(dest, &Permission::default(), user)?;
        let mut total = 0;
        receive(&mut field, target, &mut total, limit).await
    }

    fn end() -> io::Result<Bytes> {
        Ok(Bytes::from(format!("\r\n--{B}--\r\n")))
    }

    #[test]
    fn writes_more_chunks_than_one_writev_takes() {
        let d = scratch();
        let mut file = File::create(d.join("w")).unwrap();
        // More slices than IOV_MAX (1024): written over several calls.
        let chunks: Vec<Bytes> = (0..3000u32)
            .map(|i| Bytes::from(vec![(i % 251) as u8; 1 + (i as usize % 7)]))
            .collect();
        write_chunks(&mut file, &chunks).unwrap();
        let want: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(std::fs::read(d.join("w")).unwrap(), want);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn streams_commits_and_cleans_up() {
        let d = scratch();
        // Under the extractor's default 2 MB limit (the route disables it; this test has no route).
        let big = Bytes::from(vec![1u8; BATCH + BATCH / 2 + 17]);
        run(
            d.join("ok/a.bin"),
            vec![Ok(big.clone()), Ok(Bytes::from_static(b"tail")), end()],
            0,
        )
        .await
        .unwrap();
        let got = std::fs::read(d.join("ok/a.bin")).unwrap();
        assert_eq!(got.len(), big.len() + 4);
        assert_eq!(
            std::fs::metadata(d.join("ok/a.bin")).unwrap().mode() & 0o7777,
            DEFAULT_MODE
        );

        // Over the limit: 413, no destination, no temporary file.
        let r = run(d.join("big.bin"), vec![Ok(big.clone()), end()], 1000).await;
        assert!(matches!(r, Err(ApiError::TooLarge(_))), "{r:?}");
        // A body that breaks off mid-file.
        let r = run(
            d.join("cut.bin"),
            vec![Ok(big.clone()), Err(io::Error::other("connection reset"))],
            0,
        )
        .await;
        assert!(matches!(r, Err(ApiError::InvalidFile(_))), "{r:?}");
        // A multipart stream without its closing boundary.
        let r = run(d.join("open.bin"), vec![Ok(big)], 0).await;
        assert!(r.is_err(), "{r:?}");
        let mut left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, vec![std::ffi::OsString::from("ok")]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn metadata_parsing() {
        let (p, perm) =
            parse_metadata(br#"{"path":"/a","owner":null,"group":null,"mode":755}"#).unwrap();
        assert_eq!(p, "/a");
        assert_eq!(perm.mode, Some(755));
        assert!(perm.owner.is_none());
        assert!(matches!(
            parse_metadata(br#"{"path":""}"#),
            Err(ApiError::InvalidFileMetadata(_))
        ));
        assert!(matches!(
            parse_metadata(b"not json"),
            Err(ApiError::InvalidFileMetadata(_))
        ));
    }
}
