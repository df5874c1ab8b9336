//! The bounds every API surface applies to what a request may ask of a sandbox, whatever the
//! server's policy: the smallest limits a sandbox can live with, and the sizes the kernel accepts
//! for one `exec`. A request outside them is the client's mistake (a 4xx naming the field), never
//! a failure halfway through starting a sandbox.

/// Smallest memory limit: the agent, PID 1 of the sandbox, is charged to it too.
pub const MIN_MEMORY_BYTES: u64 = 32 << 20;

/// Smallest CPU limit, in millicores (a CFS quota of 10 ms per 100 ms period). The agent, charged
/// to the sandbox's CPU limit too, needs 25–100 ms of CPU to start (its loader and relocations,
/// more with cold caches): at 10m, the kernel's smallest quota, that is up to 10 s, the time
/// a sandbox has to become ready, and every request it serves afterwards crawls.
pub const MIN_CPU_MILLICORES: u64 = 100;

/// Smallest pids limit: the agent's own threads count against it.
pub const MIN_PIDS: u64 = 16;

/// Smallest size of a writable area (`disk`, `/sandbox`, `/tmp`).
pub const MIN_DISK_BYTES: u64 = 1 << 20;

/// Longest single argument or environment string (`NAME=value`) one `exec` takes: the kernel's
/// `MAX_ARG_STRLEN` (32 pages) less the terminating NUL. Longer is `E2BIG`.
pub const MAX_ARG_BYTES: usize = 32 * 4096 - 1;

/// Largest environment a request may give, all `NAME=value` strings together: well under the
/// kernel's bound on arguments and environment of one `exec` (a quarter of the 8 MiB default
/// stack), leaving room for the program's arguments.
pub const MAX_ENV_BYTES: usize = 256 << 10;

/// Largest JSON encoding of a lifecycle sandbox's `entrypoint` and `env` together: both travel to
/// the agent inside one environment string, which must stay under [`MAX_ARG_BYTES`] with the
/// rest of the agent's configuration.
pub const MAX_LAUNCH_BYTES: usize = 96 << 10;

/// Longest path the kernel resolves (`PATH_MAX` less the NUL).
pub const MAX_PATH_BYTES: usize = 4095;

/// Longest path component (`NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;

/// Why the environment `env` cannot be given to one `exec`, naming the variable; `None` when it
/// can. Names and values are counted as `NAME=value` strings.
pub fn env_too_large<'a>(
    env: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Option<(String, String)> {
    let mut total = 0usize;
    for (k, v) in env {
        let one = k.len() + 1 + v.len();
        if one > MAX_ARG_BYTES {
            return Some((
                k.clone(),
                format!(
                    "{one} bytes as NAME=value, over the kernel's limit of {MAX_ARG_BYTES} for \
                     one variable"
                ),
            ));
        }
        total += one + 1;
        if total > MAX_ENV_BYTES {
            return Some((
                k.clone(),
                format!("the environment is over {MAX_ENV_BYTES} bytes in all"),
            ));
        }
    }
    None
}

/// Why `path` is longer than the kernel resolves (`PATH_MAX`, or a component over `NAME_MAX`);
/// `None` when it is not.
pub fn path_too_long(path: &str) -> Option<String> {
    if path.len() > MAX_PATH_BYTES {
        return Some(format!(
            "is {} bytes long, over the limit of {MAX_PATH_BYTES}",
            path.len()
        ));
    }
    path.split('/').find(|c| c.len() > MAX_NAME_BYTES).map(|c| {
        format!(
            "has a component of {} bytes, over the limit of {MAX_NAME_BYTES}",
            c.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_over_the_kernels_limits_are_named() {
        assert_eq!(path_too_long("/workspace/a.txt"), None);
        assert!(path_too_long(&format!("/workspace/{}", "a".repeat(256)))
            .is_some_and(|m| m.contains("component")));
        let deep = "/abc".repeat(1024);
        assert!(path_too_long(&deep).is_some_and(|m| m.contains("4095")));
        assert_eq!(path_too_long(&format!("/{}", "a".repeat(255))), None);
    }

    #[test]
    fn environments_over_one_exec_are_named() {
        let small: Vec<(String, String)> = vec![("A".into(), "b".into())];
        assert_eq!(env_too_large(small.iter().map(|(k, v)| (k, v))), None);
        let big: Vec<(String, String)> = vec![("BIG".into(), "x".repeat(MAX_ARG_BYTES))];
        assert_eq!(
            env_too_large(big.iter().map(|(k, v)| (k, v))).map(|e| e.0),
            Some("BIG".to_string())
        );
        let many: Vec<(String, String)> = (0..10)
            .map(|i| (format!("V{i}"), "x".repeat(MAX_ARG_BYTES / 2)))
            .collect();
        assert!(env_too_large(many.iter().map(|(k, v)| (k, v))).is_some());
    }
}
