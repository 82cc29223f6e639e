//! Files that hold tenants' data (the embedded database, the usage spool)
//! are private to the gateway's user: directories 0700, files 0600, so
//! another local account cannot read usage, keys' hashes or prices. Knows
//! paths and modes, nothing of what the files hold.

use std::fs::OpenOptions;
use std::io;
use std::path::Path;

#[cfg(unix)]
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

/// Creates `dir` (and its parents) if missing and makes it 0700, also when
/// an earlier version left it more open.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// Options that create files 0600.
pub fn private_file() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    options.mode(0o600);
    options
}

/// Makes an existing file 0600 (creating it empty, 0600, when missing).
pub fn restrict_file(path: &Path) -> io::Result<()> {
    private_file().create(true).append(true).open(path)?;
    #[cfg(unix)]
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}
