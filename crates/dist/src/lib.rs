//! Running one diffuse job over several processes ("ranks"), started by an MPI launcher
//! (`mpirun -np N`, Slurm's `srun`): which rank this process is, the collectives data-parallel
//! training needs (a sum over all ranks, a gather, a barrier), each with a timeout so that a
//! rank that died or hangs ends the job instead of stalling it, and how work is split.
//!
//! A process not started by a launcher is a job of one rank ([`Dist::single`]); so is every
//! process of a build without the `mpi` feature, which therefore refuses to run as one of
//! several ranks (it would silently do the whole job on each).

use std::fmt::Display;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use diffuse_core::{Error, Result};

#[cfg(feature = "mpi")]
mod mpi_comm;
mod watchdog;

/// The exit code of a job ended because a collective waited past its timeout.
pub const EXIT_TIMEOUT: i32 = 3;
/// The exit code of a job ended because a rank failed (its error is printed first).
pub const EXIT_RANK_FAILED: i32 = 1;

/// The processes of one job and the collectives between them. Every rank must call the same
/// collectives in the same order. `what` names the call in timeout messages ("the gradient
/// sum of step 12").
pub trait Comm: Send + Sync {
    /// This process's index, `0..size`.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn size(&self) -> usize;
    /// Replaces `buf` by its element-wise sum over all ranks; every rank gets the same result.
    fn all_reduce_sum(&self, what: &str, buf: &mut [f32]) -> Result<()>;
    /// Every rank's `value`, by rank.
    fn all_gather_u64(&self, what: &str, value: u64) -> Result<Vec<u64>>;
    /// Waits until every rank has called it.
    fn barrier(&self, what: &str) -> Result<()>;
    /// Ends every process of the job with `code` (the caller has printed why).
    fn abort(&self, code: i32) -> !;
}

/// A job of one process: the collectives are identities.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Comm for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _what: &str, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather_u64(&self, _what: &str, value: u64) -> Result<Vec<u64>> {
        Ok(vec![value])
    }
    fn barrier(&self, _what: &str) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The ranks `0..size` split `0..total` into contiguous blocks, the first `total % size`
/// ranks taking one item more; this is rank `rank`'s block.
pub fn shard(total: usize, rank: usize, size: usize) -> Range<usize> {
    assert!(size > 0 && rank < size, "rank {rank} of {size}");
    let (q, r) = (total / size, total % size);
    let start = rank * q + rank.min(r);
    start..start + q + usize::from(rank < r)
}

/// Prints `rank R/N: <text>` on stderr, on every rank of a job of several processes or of one
/// an MPI launcher started (a launch that runs the whole job on every process then shows N
/// lines saying `rank 0/1`). A plain run of one process says nothing: its share is the job.
pub fn report(comm: &dyn Comm, text: impl Display) {
    if comm.size() > 1 || LaunchEnv::from_env().launcher.is_some() {
        eprint_line(format_args!("rank {}/{}: {text}", comm.rank(), comm.size()));
    }
}

/// `eprintln!` in one write: the launcher merges the ranks' stderr, and a line written in
/// pieces (as `eprintln!` writes each formatted part) can be cut by another rank's line.
pub fn eprint_line(text: impl Display) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{text}\n").as_bytes());
}

/// How the environment says this process was started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    /// The launcher's variable that was found, when started by one.
    pub launcher: Option<&'static str>,
    /// The number of processes the launcher started, when it says.
    pub size: Option<usize>,
    /// How many of them run on this machine, when the launcher says (Open MPI's
    /// `OMPI_COMM_WORLD_LOCAL_SIZE`, MPICH's `MPI_LOCALNRANKS`).
    pub local_size: Option<usize>,
}

impl LaunchEnv {
    /// Reads Open MPI's (`OMPI_COMM_WORLD_SIZE`), MPICH's and Slurm PMI-2's (`PMI_SIZE`,
    /// `PMI_RANK`) and PMIx's (`PMIX_RANK`, with Slurm's `SLURM_STEP_NUM_TASKS`) variables.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let num = |k: &str| get(k).and_then(|v| v.trim().parse::<usize>().ok());
        let local_size = num("OMPI_COMM_WORLD_LOCAL_SIZE").or_else(|| num("MPI_LOCALNRANKS"));
        for (key, size_key) in [
            ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
            ("PMI_SIZE", "PMI_SIZE"),
            ("PMI_RANK", "PMI_SIZE"),
            ("PMIX_RANK", "SLURM_STEP_NUM_TASKS"),
        ] {
            if get(key).is_some() {
                return Self {
                    launcher: Some(key),
                    size: num(size_key),
                    local_size,
                };
            }
        }
        Self {
            launcher: None,
            size: None,
            local_size: None,
        }
    }
}

/// This process's place in its job; ends the MPI session (if any) when dropped.
pub struct Dist {
    comm: Arc<dyn Comm>,
    #[cfg(feature = "mpi")]
    _runtime: Option<mpi_comm::MpiRuntime>,
}

impl Dist {
    /// A job of one process.
    pub fn single() -> Self {
        Self {
            comm: Arc::new(SingleProcess),
            #[cfg(feature = "mpi")]
            _runtime: None,
        }
    }

    /// Joins the MPI job this process was launched into (see [`LaunchEnv`]), or is a job of
    /// one. `timeout` bounds how long any collective may wait for the other ranks.
    pub fn init(timeout: Duration) -> Result<Self> {
        if timeout.is_zero() {
            return Err(Error::invalid("the collective timeout must be positive"));
        }
        let env = LaunchEnv::from_env();
        let Some(launcher) = env.launcher else {
            return Ok(Self::single());
        };
        Self::init_launched(launcher, env.size, timeout)
    }

    #[cfg(feature = "mpi")]
    fn init_launched(launcher: &str, expected: Option<usize>, timeout: Duration) -> Result<Self> {
        let runtime = mpi_comm::MpiRuntime::init(timeout)?;
        let comm = runtime.comm();
        if let Some(n) = expected.filter(|&n| n != comm.size()) {
            return Err(Error::invalid(format!(
                "the launcher started {n} processes ({launcher} is set) but MPI sees a job of {}: \
                 is the MPI library the one the launcher belongs to (with srun: --mpi=pmix or pmi2)?",
                comm.size()
            )));
        }
        Ok(Self {
            comm,
            _runtime: Some(runtime),
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn init_launched(launcher: &str, expected: Option<usize>, _timeout: Duration) -> Result<Self> {
        match expected {
            Some(1) => Ok(Self::single()),
            n => Err(Error::invalid(format!(
                "started by an MPI launcher ({launcher} is set{}) but this diffuse was built \
                 without MPI support: every process would run the whole job. Build it with the \
                 `mpi` feature (the default), or start one process",
                n.map(|n| format!(", {n} processes")).unwrap_or_default()
            ))),
        }
    }

    pub fn comm(&self) -> Arc<dyn Comm> {
        self.comm.clone()
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Passes `result` on; but an error on a rank of a job of several ends the whole job (after
    /// printing it with the rank), since the other ranks would otherwise wait for this one.
    pub fn finish<T, E: Display>(
        self,
        result: std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        match result {
            Err(e) if self.size() > 1 => {
                report(self.comm.as_ref(), format_args!("error: {e:#}"));
                self.comm.abort(EXIT_RANK_FAILED)
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_range_in_order() {
        for total in 0..20 {
            for size in 1..6 {
                let blocks: Vec<_> = (0..size).map(|r| shard(total, r, size)).collect();
                assert_eq!(blocks[0].start, 0);
                assert_eq!(blocks[size - 1].end, total);
                for w in blocks.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1);
                }
            }
        }
        assert_eq!(shard(10, 2, 4), 6..8);
        assert_eq!(shard(10, 1, 4), 3..6);
    }

    #[test]
    fn reads_the_launchers_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            LaunchEnv::from_lookup(|k| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.to_string())
            })
        };
        assert_eq!(env(&[]).launcher, None);
        let ompi = env(&[
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("PMIX_RANK", "1"),
        ]);
        assert_eq!(
            (ompi.launcher, ompi.size, ompi.local_size),
            (Some("OMPI_COMM_WORLD_SIZE"), Some(4), Some(2))
        );
        let slurm = env(&[("PMIX_RANK", "0"), ("SLURM_STEP_NUM_TASKS", "64")]);
        assert_eq!((slurm.launcher, slurm.size), (Some("PMIX_RANK"), Some(64)));
        let hydra = env(&[("PMI_RANK", "3"), ("PMI_SIZE", "8")]);
        assert_eq!(hydra.size, Some(8));
    }
}
