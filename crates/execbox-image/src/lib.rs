//! Images for execbox sandboxes: what a sandbox's root is made of.
//!
//! This crate knows nothing of sandboxes or HTTP routes: it turns an image reference into
//! read-only layer directories on the host (pulled, verified and unpacked once, shared by every
//! sandbox that uses them) and builds templates from package registries.

pub mod template;
