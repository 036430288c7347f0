//! A diffuse built without the `mpi` feature, started as one of several ranks, refuses to run
//! (it would silently do the whole job on every rank). The launcher is simulated by its
//! environment variable, as mpirun sets it.
#![cfg(not(feature = "mpi"))]

use std::process::Command;

#[test]
fn a_launch_as_one_of_several_ranks_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(["train", "--output", "unused", "--data", "missing"])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("built without MPI support") && err.contains("2 processes"),
        "{err}"
    );
    assert!(!std::path::Path::new("unused").exists());
}
