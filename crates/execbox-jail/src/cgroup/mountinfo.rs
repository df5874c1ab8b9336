//! Parsing of `/proc/self/mountinfo` for cgroup mounts.

use std::path::PathBuf;

use super::CgroupVersion;

/// v1 controller names recognised in mount options.
const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// One cgroup filesystem mount found in mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    /// `V1` for `cgroup`, `V2` for `cgroup2` mounts.
    pub version: CgroupVersion,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// v1: the controllers bound to this hierarchy (from the super options);
    /// v2: empty (read `cgroup.controllers` instead).
    pub controllers: Vec<String>,
    /// `major:minor` of the mount; bind mounts of one hierarchy share it.
    pub device: String,
    /// Whether the mount is read-only.
    pub read_only: bool,
}

/// Undoes the octal escapes (`\040` etc.) of mountinfo path fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text and returns its cgroup (v1) and cgroup2 mounts, in
/// order, with later bind mounts of an already-seen hierarchy dropped.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out: Vec<CgroupMount> = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if sep < 6 || fields.len() < sep + 4 {
            continue;
        }
        let version = match fields[sep + 1] {
            "cgroup" => CgroupVersion::V1,
            "cgroup2" => CgroupVersion::V2,
            _ => continue,
        };
        let device = fields[2].to_string();
        if out.iter().any(|m| m.device == device) {
            continue;
        }
        let mount_opts = fields[5];
        let super_opts = fields[sep + 3];
        let read_only = mount_opts.split(',').any(|o| o == "ro");
        let controllers = match version {
            CgroupVersion::V1 => super_opts
                .split(',')
                .filter(|o| V1_CONTROLLERS.contains(o))
                .map(str::to_string)
                .collect(),
            CgroupVersion::V2 => Vec::new(),
        };
        out.push(CgroupMount {
            version,
            mount_point: PathBuf::from(unescape(fields[4])),
            controllers,
            device,
            read_only,
        });
    }
    out
}
