//! Links the `kube-prefetch-noop` helper statically, leaving every other
//! target of the crate untouched.
//!
//! Why: the helper is copied into an emptyDir by an init container and then
//! executed inside an arbitrary target image (distroless, scratch, Alpine...),
//! which may have no libc or a different one. It must therefore carry its own
//! libc and need no dynamic loader.
//!
//! How: on `*-linux-gnu` the usual way is `-C target-feature=+crt-static`,
//! but that is a rustc flag for the whole build (it would also make the main
//! binary static and breaks proc-macros when host == target), and cargo has
//! no stable per-binary rustflags. rustc's dynamic link line asks for
//! `-lgcc_s`, `-lc` and `-lm` after `-Wl,-Bdynamic`; we put a directory first
//! in the library search path in which those three names are tiny linker
//! scripts that pull in the static archives instead (`libc.a`, `libgcc_eh.a`,
//! `libgcc.a`, `libm.a`, found on the normal search path since the bare names
//! are not in our directory), and add `-static-pie`, the same mode rustc
//! itself uses for `crt-static` on glibc. Both GNU ld and lld honour this.
//! The other libraries rustc names (`util`, `rt`, `pthread`, `dl`) only
//! exist as archives on glibc >= 2.34, so they already resolve statically.
//!
//! Needs the static glibc archives (`libc6-dev`), which every Rust build
//! image has. musl targets are static already; other targets are left alone.

use std::path::PathBuf;

const NOOP_BIN: &str = "kube-prefetch-noop";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");

    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let already_static = features.split(',').any(|feature| feature == "crt-static");
    if os != "linux" || env != "gnu" || already_static {
        return;
    }

    let Some(out_dir) = std::env::var_os("OUT_DIR") else {
        // Cargo always sets OUT_DIR for build scripts; without it we cannot
        // write the shims, and a dynamic helper would fail only at run time
        // inside someone's pod, so fail the build loudly instead.
        panic!("OUT_DIR is not set; cannot link {NOOP_BIN} statically");
    };
    let shims = PathBuf::from(out_dir).join("static-shims");
    let scripts = [
        ("libgcc_s.so", "INPUT ( libgcc_eh.a libgcc.a )\n"),
        ("libc.so", "GROUP ( libc.a libgcc_eh.a libgcc.a )\n"),
        ("libm.so", "INPUT ( libm.a )\n"),
    ];
    if let Err(error) = std::fs::create_dir_all(&shims) {
        panic!("cannot create {}: {error}", shims.display());
    }
    for (name, script) in scripts {
        let path = shims.join(name);
        if let Err(error) = std::fs::write(&path, script) {
            panic!("cannot write {}: {error}", path.display());
        }
    }

    println!("cargo:rustc-link-arg-bin={NOOP_BIN}=-L{}", shims.display());
    println!("cargo:rustc-link-arg-bin={NOOP_BIN}=-static-pie");
    // Release builds go into the helper image, pulled once per node: drop
    // the symbol table (about 15% of the file). Debug builds keep it for
    // backtraces.
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        println!("cargo:rustc-link-arg-bin={NOOP_BIN}=-Wl,--strip-all");
    }
}
