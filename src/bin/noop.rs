//! `kube-prefetch-noop`: the static helper that lets a pull pod run in any
//! image, even one without a shell or libc (distroless, scratch).
//!
//! The pull pod's init container (our helper image) runs
//! `kube-prefetch-noop install /noop/kube-prefetch-noop` to copy this binary
//! into an emptyDir; the container using the image to prefetch then runs the
//! copy with no arguments, which exits 0 at once. So the kubelet pulls the
//! image, and no code of that image ever runs.
//!
//! Std only and statically linked (see `build.rs`): it must work inside
//! images whose libc, if any, we know nothing about.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "\
usage: kube-prefetch-noop              exit 0 at once (the prefetch container)
       kube-prefetch-noop install DEST copy this executable to DEST (mode 0755, atomically)
";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match args.as_slice() {
        [] => ExitCode::SUCCESS,
        [command, dest] if command == "install" => match install(Path::new(dest)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("kube-prefetch-noop: {message}");
                ExitCode::from(1)
            }
        },
        _ => {
            eprint!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Copies our own executable to `dest`: written to `dest.tmp`, made
/// executable, flushed, then renamed, so a reader never sees a partial file
/// and an existing `dest` (even one being executed) is replaced cleanly.
fn install(dest: &Path) -> Result<(), String> {
    if dest.is_dir() {
        return Err(format!(
            "cannot install to {}: it is a directory; give the full path of the file to create",
            dest.display()
        ));
    }
    let mut source = open_self()?;
    let tmp = tmp_path(dest);
    let result = copy_to(&mut source, &tmp, dest).and_then(|()| {
        fs::rename(&tmp, dest).map_err(|error| {
            format!(
                "cannot rename {} to {}: {error}",
                tmp.display(),
                dest.display()
            )
        })
    });
    if result.is_err() {
        // Best effort: do not leave a half-written file behind. A failure
        // here changes nothing about the error we report.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Opens the running executable. `/proc/self/exe` works even when the file
/// was replaced or deleted since we started; without `/proc` (a bare chroot)
/// we fall back to `current_exe`, then to `argv[0]` when it is a path.
fn open_self() -> Result<File, String> {
    if let Ok(file) = File::open("/proc/self/exe") {
        return Ok(file);
    }
    let path = match std::env::current_exe() {
        Ok(path) => path,
        Err(error) => std::env::args_os()
            .next()
            .map(PathBuf::from)
            .filter(|path| path.components().count() > 1)
            .ok_or_else(|| format!("cannot find our own executable: {error}"))?,
    };
    File::open(&path).map_err(|error| format!("cannot read {}: {error}", path.display()))
}

fn tmp_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(OsStr::new(".tmp"));
    PathBuf::from(name)
}

fn copy_to(source: &mut File, tmp: &Path, dest: &Path) -> Result<(), String> {
    let mut target = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(tmp)
        .map_err(|error| describe_create_error(tmp, dest, &error))?;
    let write_error = |error: io::Error| format!("cannot write {}: {error}", tmp.display());
    io::copy(source, &mut target).map_err(write_error)?;
    // `mode` above is filtered by the umask; the copy must be executable by
    // whichever user the target image's container runs as.
    target
        .set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(write_error)?;
    target.flush().map_err(write_error)?;
    target.sync_all().map_err(write_error)
}

fn describe_create_error(tmp: &Path, dest: &Path, error: &io::Error) -> String {
    let parent = dest
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if error.kind() == io::ErrorKind::NotFound && !parent.is_dir() {
        format!(
            "cannot install to {}: directory {} does not exist",
            dest.display(),
            parent.display()
        )
    } else {
        format!(
            "cannot install to {}: cannot create {}: {error}",
            dest.display(),
            tmp.display()
        )
    }
}
