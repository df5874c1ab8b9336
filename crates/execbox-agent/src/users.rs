//! Users and groups of the sandbox, from its own `/etc/passwd` and `/etc/group` (no NSS: the
//! sandbox's files are the whole truth). Used for file owners and for commands run as another
//! uid.

#[derive(Debug)]
struct User {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

#[derive(Debug)]
struct Group {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// The sandbox's user and group databases.
#[derive(Debug, Default)]
pub struct Names {
    users: Vec<User>,
    groups: Vec<Group>,
}

impl Names {
    /// Reads the sandbox's databases; a missing file means no names.
    pub fn load() -> Self {
        let read = |p| std::fs::read_to_string(p).unwrap_or_default();
        Self::parse(&read("/etc/passwd"), &read("/etc/group"))
    }

    /// From the text of `passwd` and `group`.
    pub fn parse(passwd: &str, group: &str) -> Self {
        let records = |text: &str| -> Vec<Vec<String>> {
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .map(|l| l.split(':').map(str::to_string).collect())
                .collect()
        };
        let users = records(passwd)
            .into_iter()
            .filter_map(|f| {
                Some(User {
                    name: f.first().filter(|n| !n.is_empty())?.clone(),
                    uid: f.get(2)?.parse().ok()?,
                    gid: f.get(3)?.parse().ok()?,
                    home: f.get(5).cloned().unwrap_or_default(),
                })
            })
            .collect();
        let groups = records(group)
            .into_iter()
            .filter_map(|f| {
                Some(Group {
                    name: f.first().filter(|n| !n.is_empty())?.clone(),
                    gid: f.get(2)?.parse().ok()?,
                    members: f
                        .get(3)
                        .map(|m| {
                            m.split(',')
                                .filter(|s| !s.is_empty())
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect();
        Names { users, groups }
    }

    /// Home directory of `uid`, if it has one.
    pub fn home_of(&self, uid: u32) -> Option<&str> {
        self.users
            .iter()
            .find(|u| u.uid == uid)
            .map(|u| u.home.as_str())
            .filter(|h| h.starts_with('/'))
    }

    /// Name of `uid`, or the number.
    pub fn user_name(&self, uid: u32) -> String {
        self.users
            .iter()
            .find(|u| u.uid == uid)
            .map(|u| u.name.clone())
            .unwrap_or_else(|| uid.to_string())
    }

    /// Name of `gid`, or the number.
    pub fn group_name(&self, gid: u32) -> String {
        self.groups
            .iter()
            .find(|g| g.gid == gid)
            .map(|g| g.name.clone())
            .unwrap_or_else(|| gid.to_string())
    }

    /// Uid of a user name (a number is taken as is).
    pub fn uid(&self, name: &str) -> Option<u32> {
        self.users
            .iter()
            .find(|u| u.name == name)
            .map(|u| u.uid)
            .or_else(|| name.parse().ok())
    }

    /// Gid of a group name (a number is taken as is).
    pub fn gid(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|g| g.name == name)
            .map(|g| g.gid)
            .or_else(|| name.parse().ok())
    }

    /// Primary gid of `uid`, if the user is known.
    pub fn primary_gid(&self, uid: u32) -> Option<u32> {
        self.users.iter().find(|u| u.uid == uid).map(|u| u.gid)
    }

    /// Supplementary groups of `uid`: the groups listing the user's name as a member.
    pub fn supplementary_gids(&self, uid: u32) -> Vec<u32> {
        let Some(user) = self.users.iter().find(|u| u.uid == uid) else {
            return Vec::new();
        };
        self.groups
            .iter()
            .filter(|g| g.members.contains(&user.name))
            .map(|g| g.gid)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names::parse(
            "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n\
             nobody:x:65534:65534::/:/usr/sbin/nologin\n",
            "root:x:0:\ntty:x:5:user\nuser:x:1000:\nnogroup:x:65534:\n",
        )
    }

    #[test]
    fn names_resolve_both_ways() {
        let n = names();
        assert_eq!(n.user_name(1000), "user");
        assert_eq!(n.user_name(4242), "4242");
        assert_eq!(n.group_name(65534), "nogroup");
        assert_eq!(n.uid("nobody"), Some(65534));
        assert_eq!(n.gid("tty"), Some(5));
        assert_eq!(n.uid("1234"), Some(1234));
        assert_eq!(n.uid("mallory"), None);
    }

    #[test]
    fn primary_and_supplementary_groups() {
        let n = names();
        assert_eq!(n.primary_gid(65534), Some(65534));
        assert_eq!(n.primary_gid(4242), None);
        assert_eq!(n.supplementary_gids(1000), vec![5]);
        assert!(n.supplementary_gids(0).is_empty());
    }
}
