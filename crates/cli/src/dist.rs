//! The options and set-up shared by the commands that run over several processes
//! (`mpirun -np N diffuse train|generate …`, or Slurm's `srun`).

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use diffuse_dist::{Dist, LaunchEnv};

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Several processes (mpirun, srun)")]
pub struct DistArgs {
    /// Seconds a rank waits for the others in a collective (the gradient sum of a training
    /// step, which also waits out rank 0's checkpoints and sample grids; the end of a run)
    /// before it ends the whole job as hung.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 1800.0)]
    pub comm_timeout: f64,
}

impl DistArgs {
    /// Joins the job this process was launched into (or is a job of one).
    pub fn init(&self) -> Result<Dist> {
        if !(self.comm_timeout.is_finite() && self.comm_timeout > 0.0) {
            bail!(
                "--comm-timeout must be a positive number of seconds, not {}",
                self.comm_timeout
            );
        }
        Ok(Dist::init(Duration::from_secs_f64(self.comm_timeout))?)
    }
}

/// CPU threads for the tensor maths when `--threads` is not given: the cores this process may
/// use, shared with the other ranks on this machine unless the launcher already bound each
/// rank to its own cores.
pub fn default_threads() -> usize {
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    let local = LaunchEnv::from_env().local_size.unwrap_or(1).max(1);
    if usable < online_cpus() {
        usable
    } else {
        (usable / local).max(1)
    }
}

fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a system setting.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}
