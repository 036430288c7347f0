//! How long the gradient sum takes against the model size: run under the launcher,
//! `mpirun -np 2 target/release/examples/allreduce`, it times `all_reduce_sum` over buffers of
//! 10^3 … 10^8 f32 (4 kB … 400 MB) and rank 0 prints the median of the repeats.

use std::time::{Duration, Instant};

use diffuse_dist::Dist;

fn main() -> diffuse_core::Result<()> {
    let dist = Dist::init(Duration::from_secs(600))?;
    let comm = dist.comm();
    if comm.rank() == 0 {
        println!(
            "ranks {}: f32 elements, MB, median ms, GB/s of buffer",
            comm.size()
        );
    }
    for exp in 3..=8 {
        let n = 10usize.pow(exp);
        let mut buf = vec![1.0f32; n];
        let repeats = if n >= 10_000_000 { 5 } else { 20 };
        let mut times = Vec::with_capacity(repeats);
        comm.barrier("the start")?;
        for _ in 0..repeats {
            let t0 = Instant::now();
            comm.all_reduce_sum("the timed sum", &mut buf)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[repeats / 2];
        if comm.rank() == 0 {
            println!(
                "{n:>11} {:>9.3} {:>10.3} {:>8.2}",
                n as f64 * 4e-6,
                median * 1e3,
                n as f64 * 4e-9 / median
            );
        }
    }
    Ok(())
}
