//! Pseudo-terminals for interactive sessions (`/pty`).

use std::os::fd::{AsRawFd, OwnedFd};

/// A new pseudo-terminal pair.
pub struct PtyPair {
    /// The controller side, kept by the agent.
    pub controller: OwnedFd,
    /// The terminal side, given to the process as stdin, stdout and stderr.
    pub terminal: OwnedFd,
}

/// Opens a pseudo-terminal of `cols`×`rows`. Both descriptors are close-on-exec.
pub fn open(cols: u16, rows: u16) -> std::io::Result<PtyPair> {
    let size = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pair = nix::pty::openpty(&size, None).map_err(std::io::Error::from)?;
    crate::process::set_cloexec(pair.master.as_raw_fd())?;
    crate::process::set_cloexec(pair.slave.as_raw_fd())?;
    Ok(PtyPair {
        controller: pair.master,
        terminal: pair.slave,
    })
}

/// Changes the window size of the terminal behind `controller` (the kernel sends SIGWINCH to
/// the terminal's foreground process group).
pub fn resize(controller: &impl AsRawFd, cols: u16, rows: u16) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
    let r = unsafe { libc::ioctl(controller.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Puts `fd` (a terminal controller) in non-blocking mode, so an async runtime can poll it
/// instead of parking a thread in `read`/`write`.
pub fn set_nonblocking(fd: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags))
        .map(drop)
        .map_err(std::io::Error::from)
}

/// The foreground process group of the terminal behind `controller` (the job a Ctrl-C at the
/// keyboard would reach).
pub fn foreground_group(controller: &impl std::os::fd::AsFd) -> std::io::Result<i32> {
    nix::unistd::tcgetpgrp(controller.as_fd())
        .map(|p| p.as_raw())
        .map_err(std::io::Error::from)
}
