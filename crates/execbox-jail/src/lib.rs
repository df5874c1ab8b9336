//! execbox-jail: Linux isolation for execbox sandboxes.
pub mod cgroup;
pub mod fsroot;
pub mod host;
pub mod landlock_fence;
pub mod process;
pub mod pty;
pub mod rootfs;
pub mod runtimes;
pub mod seccomp;
pub mod spawn;
pub mod storage;
pub mod sys;
