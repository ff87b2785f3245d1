//! Build script: link libpython with an rpath and record where the interpreter lives.
//!
//! Without the rpath the binary either fails to start (exit 127) or silently loads the
//! system's libpython instead of the one it was built against. The recorded home and
//! executable let the port initialise Python through `PyConfig` without consulting
//! whatever `python3` happens to be first on `$PATH` at run time.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    pyo3_build_config::add_libpython_rpath_link_args();

    let config = pyo3_build_config::get();
    let python = config
        .executable()
        .map(str::to_string)
        .or_else(|| std::env::var("PYO3_PYTHON").ok())
        .unwrap_or_else(|| "python3".to_string());
    let out = Command::new(&python)
        .args([
            "-c",
            "import sys; print(sys.base_prefix); print(sys.executable); print(sys.version.split()[0])",
        ])
        .output()
        .expect("build.rs: cannot run the Python interpreter named by PYO3_PYTHON");
    assert!(out.status.success(), "build.rs: {python} failed to report its prefix");
    let text = String::from_utf8(out.stdout).expect("build.rs: non-UTF-8 interpreter paths");
    let mut lines = text.lines();
    let home = lines.next().unwrap_or_default();
    let executable = lines.next().unwrap_or_default();
    let version = lines.next().unwrap_or_default();
    println!("cargo:rustc-env=PYPORT_PYTHON_HOME={home}");
    println!("cargo:rustc-env=PYPORT_PYTHON_EXECUTABLE={executable}");
    println!("cargo:rustc-env=PYPORT_PYTHON_VERSION={version}");
}
