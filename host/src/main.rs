fn main() -> std::process::ExitCode {
    #[cfg(target_os = "linux")]
    provide_runtime_dir();
    host::cli::main()
}

/// Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid or not set" when
/// a process has no login session (containers, CI, ssh without a session manager),
/// which reads like a failure of the command. Such a process gets a private
/// per-user directory instead; a set and valid one is left alone.
#[cfg(target_os = "linux")]
fn provide_runtime_dir() {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir()) {
        return;
    }
    // /proc/self belongs to this process's user.
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else { return };
    let dir = std::env::temp_dir().join(format!("online-merge-runtime-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    // Only a real directory of this user, closed to everyone else, is used.
    let Ok(meta) = std::fs::symlink_metadata(&dir) else { return };
    if meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o077 == 0 {
        // SAFETY: the first thing main does, before any thread exists.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
    }
}
