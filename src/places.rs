//! Where tether puts things when the config does not say: the control
//! socket of a daemon run by root is `/run/tether/tether.sock` (systemd's
//! `RuntimeDirectory=tether`), and one run by anyone else lives in that
//! user's runtime directory, so a first try needs neither root nor a
//! `control_socket` line.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The control socket of a daemon run by root.
pub const SYSTEM_SOCKET: &str = "/run/tether/tether.sock";

/// The default control socket for the current user: [`SYSTEM_SOCKET`] for
/// root, for a daemon that may create it (the `tether` user under systemd,
/// whose unit makes `/run/tether`), and for a CLI when a daemon listens
/// there; else `$XDG_RUNTIME_DIR/tether/tether.sock` when that directory
/// exists; else `tether-UID/tether.sock` in the temporary directory.
pub fn control_socket() -> PathBuf {
    use nix::unistd::{access, AccessFlags};
    let uid = nix::unistd::geteuid();
    let system = Path::new(SYSTEM_SOCKET);
    let system_dir = system.parent().expect("BUG: an absolute path");
    if uid.is_root()
        || system.exists()
        || access(system_dir, AccessFlags::W_OK | AccessFlags::X_OK).is_ok()
    {
        return system.to_path_buf();
    }
    user_socket(
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        uid.as_raw(),
    )
}

fn user_socket(runtime_dir: Option<PathBuf>, uid: u32) -> PathBuf {
    match runtime_dir {
        Some(d) if d.is_absolute() && d.is_dir() => d.join("tether").join("tether.sock"),
        _ => std::env::temp_dir()
            .join(format!("tether-{uid}"))
            .join("tether.sock"),
    }
}

/// Creates the directory of the control socket `socket` (mode 0700) when
/// it is missing and its parent exists, as for the default per-user
/// socket. An existing directory is used only if it belongs to this user
/// (or root) and no one else may write to it: in a shared temporary
/// directory another user could have made it first to catch the socket.
pub fn prepare_socket_dir(socket: &Path) -> Result<(), String> {
    let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if !dir.exists() && dir.parent().is_some_and(Path::is_dir) {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!(
                    "cannot create directory {} for the control socket ({e}); create it or set `control_socket`",
                    dir.display()
                ))
            }
        }
    }
    let Ok(m) = std::fs::metadata(dir) else {
        // bind() explains a missing directory.
        return Ok(());
    };
    let me = nix::unistd::geteuid().as_raw();
    let others_write = m.permissions().mode() & 0o022 != 0 && m.permissions().mode() & 0o1000 == 0;
    if (m.uid() != me && m.uid() != 0) || (others_write && m.uid() != me) {
        return Err(format!(
            "directory {} of the control socket belongs to uid {}, not to you (uid {me}); remove it or set `control_socket`",
            dir.display(),
            m.uid()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_socket_is_in_the_runtime_dir_when_there_is_one_else_in_a_temp_dir_of_its_own() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            user_socket(Some(d.path().to_owned()), 1000),
            d.path().join("tether/tether.sock")
        );
        let fallback = std::env::temp_dir().join("tether-1000/tether.sock");
        assert_eq!(user_socket(None, 1000), fallback);
        assert_eq!(user_socket(Some("relative".into()), 1000), fallback);
        assert_eq!(user_socket(Some(d.path().join("gone")), 1000), fallback);
    }

    #[test]
    fn the_socket_directory_is_made_private_when_missing() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("tether/tether.sock");
        prepare_socket_dir(&sock).unwrap();
        let m = std::fs::metadata(d.path().join("tether")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
        // Twice is fine.
        prepare_socket_dir(&sock).unwrap();
    }
}
