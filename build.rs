//! Build script: what `cargo test` needs to embed the build's Python.
//!
//! The library is a Python extension module and links no libpython (any CPython 3.11+ loads
//! it and provides the C API). Its unit tests are a program of their own that embeds
//! Python, so for them only (`src/python.rs` includes the generated `#[link]` under
//! `cfg(test)`) this links the libpython of the interpreter named by `PYO3_PYTHON`, with an
//! rpath (without it a test binary either fails to start or loads another libpython), and
//! records that interpreter's home so that the tests do not depend on `$PATH`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    let python = std::env::var("PYO3_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = Command::new(&python)
        .args([
            "-c",
            "import sys, sysconfig as s\n\
             print(sys.base_prefix)\n\
             print(s.get_config_var('LIBDIR') or '')\n\
             print(s.get_config_var('LDVERSION') or '')",
        ])
        .output()
        .unwrap_or_else(|e| panic!("build.rs: cannot run the Python interpreter {python:?} (PYO3_PYTHON): {e}"));
    assert!(out.status.success(), "build.rs: {python} failed to describe itself");
    let text = String::from_utf8(out.stdout).expect("build.rs: non-UTF-8 interpreter paths");
    let mut lines = text.lines();
    let (home, libdir, ldversion) = (
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
    );
    println!("cargo:rustc-env=PYPORT_TEST_PYTHON_HOME={home}");
    println!("cargo:rustc-link-search=native={libdir}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{libdir}");
    let link = format!("#[link(name = \"python{ldversion}\")]\nextern \"C\" {{}}\n");
    let dest = std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("link_python.rs");
    std::fs::write(&dest, link).expect("build.rs: cannot write link_python.rs");
}
