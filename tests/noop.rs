//! The static no-op helper, exercised as the pull pod uses it. No cluster needed.

use std::path::Path;
use std::process::Command;

const NOOP: &str = env!("CARGO_BIN_EXE_kube-prefetch-noop");
const MAIN: &str = env!("CARGO_BIN_EXE_kube-prefetch");

#[test]
fn exits_zero_without_arguments() {
    let output = Command::new(NOOP).output().expect("run noop");
    assert!(output.status.success(), "status: {:?}", output.status);
    assert!(output.stdout.is_empty());
    assert!(output.stderr.is_empty());
}

#[test]
fn install_copies_an_executable_that_runs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dest = dir.path().join("kube-prefetch-noop");

    let output = Command::new(NOOP)
        .arg("install")
        .arg(&dest)
        .output()
        .expect("run noop install");
    assert!(
        output.status.success(),
        "install failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.stdout.is_empty(), "install must print nothing");
    assert!(output.stderr.is_empty(), "install must print nothing");

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dest)
        .expect("installed file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755, "mode of the installed copy: {mode:o}");
    assert_eq!(
        std::fs::read(&dest).expect("read copy"),
        std::fs::read(NOOP).expect("read original"),
        "the copy must be byte-identical"
    );
    assert!(
        !dir.path().join("kube-prefetch-noop.tmp").exists(),
        "the temporary file must be renamed away"
    );

    // Installing again over an existing file replaces it.
    let again = Command::new(NOOP)
        .arg("install")
        .arg(&dest)
        .status()
        .expect("run noop install");
    assert!(again.success());

    let run = Command::new(&dest)
        .status()
        .expect("run the installed copy");
    assert!(run.success(), "installed copy exited with {run:?}");
}

#[test]
fn install_to_a_missing_directory_fails_and_names_the_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dest = dir.path().join("missing").join("kube-prefetch-noop");

    let output = Command::new(NOOP)
        .arg("install")
        .arg(&dest)
        .output()
        .expect("run noop install");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!(
        "kube-prefetch-noop: cannot install to {}: directory {} does not exist",
        dest.display(),
        dir.path().join("missing").display()
    );
    assert_eq!(stderr.trim_end(), expected);
    assert!(!dest.exists());
}

#[test]
fn install_to_a_directory_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(NOOP)
        .arg("install")
        .arg(dir.path())
        .output()
        .expect("run noop install");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("is a directory"));
}

#[test]
fn unknown_arguments_and_help_print_usage_and_exit_2() {
    for args in [
        &["--help"][..],
        &["-h"],
        &["frobnicate"],
        &["install"],
        &["install", "a", "b"],
    ] {
        let output = Command::new(NOOP).args(args).output().expect("run noop");
        assert_eq!(output.status.code(), Some(2), "args {args:?}");
        assert!(output.stdout.is_empty(), "args {args:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("usage:"),
            "args {args:?}"
        );
    }
}

#[test]
fn noop_is_statically_linked() {
    let elf = Elf::read(Path::new(NOOP));
    assert!(
        !elf.has_interpreter,
        "{NOOP} has a PT_INTERP header: it needs a dynamic loader"
    );
    assert_eq!(
        elf.needed, 0,
        "{NOOP} has DT_NEEDED entries: it needs shared libraries"
    );
}

#[test]
fn main_binary_is_not_forced_static() {
    // The static link flags are scoped to the helper (build.rs); the main
    // binary keeps the platform's normal dynamic linking.
    let elf = Elf::read(Path::new(MAIN));
    assert!(elf.has_interpreter, "{MAIN} should name a dynamic loader");
    // Also proves the DT_NEEDED reader above finds entries where they exist.
    assert!(elf.needed > 0, "{MAIN} should need shared libraries");
}

/// Just enough of an ELF reader to tell a static executable from a dynamic one:
/// a `PT_INTERP` program header names a loader, and `DT_NEEDED` entries in the
/// dynamic section name shared libraries. A static-pie has a dynamic section
/// (for self-relocation) but neither of those.
struct Elf {
    has_interpreter: bool,
    needed: usize,
}

impl Elf {
    fn read(path: &Path) -> Elf {
        let bytes = std::fs::read(path).expect("read executable");
        assert_eq!(
            &bytes[..4],
            b"\x7fELF",
            "{} is not an ELF file",
            path.display()
        );
        let wide = match bytes[4] {
            1 => false,
            2 => true,
            class => panic!("unknown ELF class {class}"),
        };
        let little = match bytes[5] {
            1 => true,
            2 => false,
            data => panic!("unknown ELF data encoding {data}"),
        };
        let uint = |offset: usize, size: usize| -> u64 {
            let field = &bytes[offset..offset + size];
            let mut value = 0u64;
            for i in 0..size {
                let byte = if little {
                    field[size - 1 - i]
                } else {
                    field[i]
                };
                value = (value << 8) | u64::from(byte);
            }
            value
        };
        let word = if wide { 8 } else { 4 };
        let (phoff, phentsize, phnum) = if wide {
            (uint(0x20, 8), uint(0x36, 2), uint(0x38, 2))
        } else {
            (uint(0x1c, 4), uint(0x2a, 2), uint(0x2c, 2))
        };

        const PT_DYNAMIC: u64 = 2;
        const PT_INTERP: u64 = 3;
        const DT_NULL: u64 = 0;
        const DT_NEEDED: u64 = 1;
        let mut elf = Elf {
            has_interpreter: false,
            needed: 0,
        };
        for index in 0..phnum {
            let header = (phoff + index * phentsize) as usize;
            match uint(header, 4) {
                PT_INTERP => elf.has_interpreter = true,
                PT_DYNAMIC => {
                    let (offset, size) = if wide {
                        (uint(header + 0x08, 8), uint(header + 0x20, 8))
                    } else {
                        (uint(header + 0x04, 4), uint(header + 0x10, 4))
                    };
                    let mut entry = offset as usize;
                    while entry + 2 * word <= (offset + size) as usize {
                        match uint(entry, word) {
                            DT_NULL => break,
                            DT_NEEDED => elf.needed += 1,
                            _ => {}
                        }
                        entry += 2 * word;
                    }
                }
                _ => {}
            }
        }
        elf
    }
}
