//! A reader that hashes and counts what passes through it, and refuses to go past a limit.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::spec::Digest;

/// Hashes (sha256) and counts the bytes read through it; reading past `limit` bytes fails.
pub(crate) struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    exceeded: bool,
}

impl<R: Read> Hashing<R> {
    pub(crate) fn new(inner: R, limit: u64) -> Hashing<R> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
            exceeded: false,
        }
    }

    /// Whether a read went past the limit.
    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded
    }

    /// Reads what is left, still counted against the limit.
    pub(crate) fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(|_| ())
    }

    /// The digest of everything read.
    pub(crate) fn finish(self) -> (Digest, u64) {
        (Digest::from_hasher(self.hasher), self.count)
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit {
            self.exceeded = true;
            return Err(io::Error::other(format!("more than {} bytes", self.limit)));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
