//! Who may use the control socket: each client's credentials, as the kernel
//! reports them for the connection (`SO_PEERCRED`: the uid and gid of the
//! process that connected), checked against an allow-list resolved once at
//! start from `[control]` in `tether.toml`.
//!
//! The socket file's mode (0660) already keeps out everyone but its owner,
//! its group and root; the check here holds even when the file's mode or
//! group is changed, and lets an allow-list be narrower than the group.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Mutex;

use nix::unistd::{Gid, Group, Uid, User};

use crate::config::{ControlConfig, IdOrName};

/// The resolved allow-list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Allowed users: uid and name (when the system knows one).
    users: BTreeMap<u32, Option<String>>,
    /// Allowed groups: gid, name, and the uids the group database lists as
    /// members (a client is in a group when its gid is the group's, or its
    /// uid is listed).
    groups: BTreeMap<u32, (Option<String>, BTreeSet<u32>)>,
}

impl Access {
    /// Users `uids` and members of groups `gids` (group members given as
    /// uids); names are only shown.
    pub fn new(
        users: impl IntoIterator<Item = (u32, Option<String>)>,
        groups: impl IntoIterator<Item = (u32, Option<String>, BTreeSet<u32>)>,
    ) -> Access {
        Access {
            users: users.into_iter().collect(),
            groups: groups
                .into_iter()
                .map(|(gid, name, members)| (gid, (name, members)))
                .collect(),
        }
    }

    /// Resolves `[control]`: the users and groups it names, or the
    /// defaults (root and the daemon's own user; the daemon's group).
    /// A name the system does not know is an error naming the key.
    pub fn resolve(cfg: &ControlConfig) -> Result<Access, String> {
        let me = nix::unistd::geteuid().as_raw();
        let my_group = nix::unistd::getegid().as_raw();
        let default_users = [IdOrName::Id(0), IdOrName::Id(me)];
        let default_groups = [IdOrName::Id(my_group)];
        let users = cfg.allow_users.as_deref().unwrap_or(&default_users);
        let groups = cfg.allow_groups.as_deref().unwrap_or(&default_groups);
        let mut access = Access::default();
        for u in users {
            let (uid, name) = user(u).map_err(|e| format!("control.allow_users: {e}"))?;
            access.users.insert(uid, name);
        }
        for g in groups {
            let (gid, name, members) =
                group(g).map_err(|e| format!("control.allow_groups: {e}"))?;
            access.groups.insert(gid, (name, members));
        }
        Ok(access)
    }

    /// Whether a client with these credentials may use the socket.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.users.contains_key(&uid)
            || self.groups.contains_key(&gid)
            || self
                .groups
                .values()
                .any(|(_, members)| members.contains(&uid))
    }

    /// Who is allowed, for messages: "uid 0 (root), members of group 1000
    /// (staff)", or "nobody".
    pub fn describe(&self) -> String {
        let named = |what: &str, id: u32, name: &Option<String>| match name {
            Some(n) => format!("{what} {id} ({n})"),
            None => format!("{what} {id}"),
        };
        let parts: Vec<String> = self
            .users
            .iter()
            .map(|(uid, name)| named("uid", *uid, name))
            .chain(
                self.groups
                    .iter()
                    .map(|(gid, (name, _))| format!("members of {}", named("group", *gid, name))),
            )
            .collect();
        if parts.is_empty() {
            "nobody".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

fn lookup_failed(what: &str, e: nix::Error) -> String {
    format!("cannot look up {what} in the system's user database: {e}")
}

/// A user's uid and name.
fn user(u: &IdOrName) -> Result<(u32, Option<String>), String> {
    match u {
        IdOrName::Id(uid) => {
            let name = User::from_uid(Uid::from_raw(*uid))
                .map_err(|e| lookup_failed(&format!("uid {uid}"), e))?
                .map(|u| u.name);
            Ok((*uid, name))
        }
        IdOrName::Name(n) => match User::from_name(n) {
            Ok(Some(u)) => Ok((u.uid.as_raw(), Some(u.name))),
            Ok(None) => Err(format!(
                "no user named {n:?} on this system; name an existing user or give a uid"
            )),
            Err(e) => Err(lookup_failed(&format!("user {n:?}"), e)),
        },
    }
}

/// A group's gid, name and members (as uids).
fn group(g: &IdOrName) -> Result<(u32, Option<String>, BTreeSet<u32>), String> {
    let found = match g {
        IdOrName::Id(gid) => Group::from_gid(Gid::from_raw(*gid))
            .map_err(|e| lookup_failed(&format!("gid {gid}"), e))?,
        IdOrName::Name(n) => match Group::from_name(n) {
            Ok(Some(g)) => Some(g),
            Ok(None) => {
                return Err(format!(
                    "no group named {n:?} on this system; name an existing group or give a gid"
                ))
            }
            Err(e) => return Err(lookup_failed(&format!("group {n:?}"), e)),
        },
    };
    let Some(found) = found else {
        // A gid the system has no entry for: its members are the clients
        // running with it.
        let IdOrName::Id(gid) = g else {
            unreachable!("a name was found above")
        };
        return Ok((*gid, None, BTreeSet::new()));
    };
    let members = found
        .mem
        .iter()
        .filter_map(|m| User::from_name(m).ok().flatten())
        .map(|u| u.uid.as_raw())
        .collect();
    Ok((found.gid.as_raw(), Some(found.name), members))
}

/// Refusals are logged once per uid (a client retrying in a loop does not
/// flood the log); at most this many uids are remembered.
const REMEMBERED: usize = 1024;

/// Which refused uids were logged already.
#[derive(Default)]
pub struct RefusalLog {
    seen: Mutex<HashSet<u32>>,
}

impl RefusalLog {
    /// Whether this refusal of `uid` is the first (to be logged).
    pub fn first(&self, uid: u32) -> bool {
        let mut seen = self.seen.lock().expect("BUG: poisoned");
        if seen.contains(&uid) || seen.len() >= REMEMBERED {
            return false;
        }
        seen.insert(uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_for(me: u32, my_group: u32) -> Access {
        Access::new(
            [(0, Some("root".into())), (me, Some("tether".into()))],
            [(my_group, Some("tether".into()), BTreeSet::from([1005]))],
        )
    }

    #[test]
    fn root_the_daemons_user_and_its_group_are_allowed_by_default() {
        let a = default_for(998, 997);
        assert!(a.allows(0, 0), "root");
        assert!(a.allows(998, 998), "the daemon's user");
        assert!(
            a.allows(1000, 997),
            "a client whose gid is the daemon's group"
        );
        assert!(
            a.allows(1005, 1005),
            "a member of the daemon's group by the group database"
        );
        assert!(!a.allows(1000, 1000), "anyone else");
        assert!(!a.allows(65534, 65534), "nobody");
    }

    #[test]
    fn a_configured_list_replaces_the_defaults_root_included() {
        let a = Access::new([(12345, None)], []);
        assert!(a.allows(12345, 12345));
        assert!(!a.allows(0, 0), "root is refused unless listed");
        assert_eq!(a.describe(), "uid 12345");
        assert!(!Access::default().allows(0, 0));
        assert_eq!(Access::default().describe(), "nobody");
    }

    #[test]
    fn the_description_names_users_and_groups() {
        assert_eq!(
            default_for(998, 997).describe(),
            "uid 0 (root), uid 998 (tether), members of group 997 (tether)"
        );
    }

    #[test]
    fn configured_names_and_numbers_resolve_and_unknown_names_are_refused() {
        let cfg = ControlConfig {
            allow_users: Some(vec![IdOrName::Name("root".into()), IdOrName::Id(12345)]),
            allow_groups: Some(vec![IdOrName::Id(54321)]),
            ..ControlConfig::default()
        };
        let a = Access::resolve(&cfg).unwrap();
        assert!(a.allows(0, 0) && a.allows(12345, 1) && a.allows(7, 54321));
        assert!(!a.allows(7, 7));
        let cfg = ControlConfig {
            allow_groups: Some(vec![IdOrName::Name("no-such-group-here".into())]),
            ..ControlConfig::default()
        };
        let e = Access::resolve(&cfg).unwrap_err();
        assert!(
            e.starts_with("control.allow_groups: no group named \"no-such-group-here\""),
            "{e}"
        );
        let cfg = ControlConfig {
            allow_users: Some(vec![IdOrName::Name("no-such-user-here".into())]),
            ..ControlConfig::default()
        };
        let e = Access::resolve(&cfg).unwrap_err();
        assert!(e.starts_with("control.allow_users: no user named"), "{e}");
    }

    #[test]
    fn the_defaults_allow_this_process() {
        let a = Access::resolve(&ControlConfig::default()).unwrap();
        let (me, my_group) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        assert!(a.allows(me, my_group) && a.allows(0, 0));
    }

    #[test]
    fn a_refused_uid_is_logged_once() {
        let log = RefusalLog::default();
        assert!(log.first(1000));
        assert!(!log.first(1000));
        assert!(log.first(1001));
    }
}
