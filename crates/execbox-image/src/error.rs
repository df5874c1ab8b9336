//! The one error type of the image store.

use std::io;

/// Why an image could not be resolved, pulled, imported or removed.
///
/// Variants name what a caller needs to tell its client: the reference, the registry (host and
/// port as written in the reference), the layer digest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The reference is not a valid image reference.
    #[error("bad image reference {reference:?}: {why}")]
    BadReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        why: String,
    },
    /// The registry could not be reached (connection refused, DNS, TLS, timeout, broken
    /// transfer).
    #[error("registry {registry} is unreachable: {why}")]
    Unreachable {
        /// The registry's host (and port).
        registry: String,
        /// The transport's error.
        why: String,
    },
    /// The registry has no such repository, tag or digest.
    #[error("image {reference} not found")]
    NotFound {
        /// The normalized reference.
        reference: String,
    },
    /// The registry refused access: credentials missing, wrong or without rights.
    #[error("registry {registry} refused access (credentials missing or wrong)")]
    Unauthorized {
        /// The registry's host (and port).
        registry: String,
    },
    /// The registry answered in a way the protocol does not allow, or failed (5xx).
    #[error("registry {registry} failed: {why}")]
    Registry {
        /// The registry's host (and port).
        registry: String,
        /// What it answered.
        why: String,
    },
    /// Something this store does not handle: a media type, a platform, a digest algorithm.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What it is.
        what: String,
    },
    /// A layer tries to leave its directory or to create what a layer must not contain.
    #[error("unsafe layer {digest}: {why}")]
    UnsafeLayer {
        /// The layer's blob digest.
        digest: String,
        /// Which entry and why.
        why: String,
    },
    /// Content does not match its digest, or a document is malformed.
    #[error("corrupt {what}")]
    Corrupt {
        /// What and how.
        what: String,
    },
    /// A size limit of the store was exceeded.
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge {
        /// What.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// The image is used by a live sandbox.
    #[error("image {reference} is in use")]
    InUse {
        /// The normalized reference.
        reference: String,
    },
    /// A file operation of the store failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
        let what = what.into();
        move |source| ImageError::Io { what, source }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> ImageError {
        ImageError::Corrupt { what: what.into() }
    }

    pub(crate) fn unsupported(what: impl Into<String>) -> ImageError {
        ImageError::Unsupported { what: what.into() }
    }
}
