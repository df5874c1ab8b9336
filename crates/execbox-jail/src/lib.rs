//! execbox-jail: Linux isolation for execbox sandboxes.
pub mod cgroup;
pub mod landlock_fence;
pub mod seccomp;
