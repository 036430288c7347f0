//! The [`Comm`] of an MPI job (rsmpi over the system's MPI library), on `MPI_COMM_WORLD`.

use std::sync::Arc;
use std::time::Duration;

use diffuse_core::{Error, Result};
use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use crate::watchdog::Watchdog;
use crate::{Comm, EXIT_TIMEOUT};

/// MPI counts are C ints: larger buffers go in pieces of this many elements.
const MAX_COUNT: usize = 1 << 28;

pub(crate) struct MpiComm {
    rank: usize,
    size: usize,
    watchdog: Watchdog,
}

/// The MPI session: finalizes MPI when dropped. (Fields drop in order: the watchdog inside
/// `comm` stops before `universe` calls MPI_Finalize, unless the comm is still held elsewhere,
/// which only leaves an idle thread until the process exits.)
pub(crate) struct MpiRuntime {
    comm: Arc<MpiComm>,
    _universe: Universe,
}

impl MpiRuntime {
    pub(crate) fn init(timeout: Duration) -> Result<Self> {
        // The watchdog thread calls MPI_Abort while the main thread may be inside a
        // collective: that needs MPI_THREAD_MULTIPLE.
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| Error::invalid("MPI was already initialized in this process"))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let multithreaded = threading == Threading::Multiple;
        let watchdog = Watchdog::start(timeout, format!("rank {rank}/{size}"), move || {
            if multithreaded {
                SimpleCommunicator::world().abort(EXIT_TIMEOUT)
            } else {
                // Without thread support only this process can be ended; the launcher then
                // ends the others (mpirun does; srun with --kill-on-bad-exit).
                std::process::exit(EXIT_TIMEOUT)
            }
        });
        Ok(Self {
            comm: Arc::new(MpiComm {
                rank,
                size,
                watchdog,
            }),
            _universe: universe,
        })
    }

    pub(crate) fn comm(&self) -> Arc<dyn Comm> {
        self.comm.clone()
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, what: &str, buf: &mut [f32]) -> Result<()> {
        // MPI's default error handler aborts the job on a failed call, so there is no error
        // to return here.
        self.watchdog.guard(what, || {
            let world = SimpleCommunicator::world();
            for chunk in buf.chunks_mut(MAX_COUNT) {
                let send = chunk.to_vec();
                world.all_reduce_into(&send[..], chunk, SystemOperation::sum());
            }
        });
        Ok(())
    }

    fn all_gather_u64(&self, what: &str, value: u64) -> Result<Vec<u64>> {
        let mut all = vec![0u64; self.size];
        self.watchdog.guard(what, || {
            SimpleCommunicator::world().all_gather_into(&value, &mut all[..])
        });
        Ok(all)
    }

    fn barrier(&self, what: &str) -> Result<()> {
        self.watchdog
            .guard(what, || SimpleCommunicator::world().barrier());
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        SimpleCommunicator::world().abort(code)
    }
}
