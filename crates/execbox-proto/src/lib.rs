//! execbox-proto: wire types of every execbox API surface. No I/O.
pub mod lifecycle;
