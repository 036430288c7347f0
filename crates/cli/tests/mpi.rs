//! `mpirun --allow-run-as-root --oversubscribe -np 2 diffuse …` on loopback, against the same
//! command in one process: data-parallel training follows the single-process loss curve,
//! resumes across rank counts after a rank was killed, refuses a batch that does not divide,
//! and ends the job when a rank stalls. (A build without the `mpi` feature refuses a launch
//! as one of several ranks instead: tests/mpi_refused.rs.)
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{file_names, repo, write_two_classes};

const BIN: &str = env!("CARGO_BIN_EXE_diffuse");

/// The tiny model and schedule of these tests: 8×8 images, two levels of 8 and 16 channels,
/// a constant learning rate (a run extended with --resume matches an uninterrupted one), one
/// thread per rank (CI has two cores).
fn train_args(data: &Path, out: &Path, batch: usize, steps: u64) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--grayscale",
        "--resolution",
        "8",
        "--channels",
        "8,16",
        "--layers-per-block",
        "1",
        "--classes",
        "2",
        "--warmup",
        "0",
        "--lr-schedule",
        "constant",
        "--sample-steps",
        "2",
        "--num-samples",
        "2",
        "--checkpoint-every",
        "2",
        "--log-every",
        "1",
        "--threads",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (k, v) in [
        ("--data", data.display().to_string()),
        ("--output", out.display().to_string()),
        ("--batch-size", batch.to_string()),
        ("--steps", steps.to_string()),
    ] {
        a.push(k.into());
        a.push(v);
    }
    a
}

/// Each line of `<out>/metrics.jsonl`: (step, loss).
fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// Two ranks sum their shares' gradients in another order than one process sums its batch
/// (and run their convolutions on half batches): float rounding, measured at ~1e-7 relative
/// over these runs. 1e-5 relative still catches any real difference in the data or the
/// random draws, which changes the loss by percents.
const LOSS_RTOL: f64 = 1e-5;

fn assert_same_curve(got: &[(u64, f64)], want: &[(u64, f64)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for ((s, a), (t, b)) in got.iter().zip(want) {
        assert_eq!(s, t, "{what}: steps");
        assert!(
            (a - b).abs() <= LOSS_RTOL * b.abs(),
            "{what}: step {s} loss {a} vs {b} (relative tolerance {LOSS_RTOL})"
        );
    }
}

fn run_single(args: &[String]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

/// A running `mpirun -np N diffuse …` with its stderr collected.
struct Job {
    child: std::process::Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Job {
    fn start(np: usize, args: &[String]) -> Self {
        let mut child = Command::new("mpirun")
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "-np",
                &np.to_string(),
                BIN,
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running mpirun: install Open MPI (Debian: openmpi-bin)");
        let mut pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut pipe, &mut s).unwrap();
            s
        });
        Self {
            child,
            stderr: Some(stderr),
        }
    }

    /// Waits for the job to end; panics (failing the test) when it takes longer than `limit`.
    fn wait(mut self, limit: Duration) -> (ExitStatus, String) {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let err = self.stderr.take().unwrap().join().unwrap();
                return (status, err);
            }
            assert!(
                t0.elapsed() < limit,
                "mpirun still running after {limit:?}: the job hangs"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // A failed test must not leave a job running: mpirun ends its ranks on SIGTERM.
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.child.id() as i32, libc::SIGTERM);
            let t0 = Instant::now();
            while self.child.try_wait().ok().flatten().is_none() {
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn run_mpi(np: usize, args: &[String]) -> (bool, String) {
    let (status, err) = Job::start(np, args).wait(Duration::from_secs(300));
    (status.success(), err)
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) only sends a signal; `pid` is a process this test started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The pid of the rank `rank` whose command line mentions `tag` (its output folder).
fn rank_pid(rank: usize, tag: &str) -> Option<i32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        // Both files hold NUL-separated strings.
        let has = |hay: &[u8], s: &str| hay.split(|&b| b == 0).any(|p| p == s.as_bytes());
        (has(&cmdline, BIN) && has(&cmdline, tag) && has(&environ, &want)).then_some(pid)
    })
}

/// Waits (at most two minutes) until `path` exists.
fn wait_for(path: &Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The newest checkpoint's step under `<out>/checkpoints`.
fn latest_step(out: &Path) -> u64 {
    std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
        })
        .max()
        .expect("a checkpoint")
}

/// The mpirun jobs of this file run one at a time: two at once on CI's two cores would make
/// the timing of the stall test meaningless.
static ONE_JOB: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn setup() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_two_classes(&data);
    (tmp, data)
}

#[test]
fn two_ranks_train_the_loss_curve_of_one() {
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let (tmp, data) = setup();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    run_single(&train_args(&data, &one, 4, 6));
    let (ok, err) = run_mpi(2, &train_args(&data, &two, 4, 6));
    assert!(ok, "{err}");
    // Each rank says which images of every global batch of 4 it takes.
    for line in [
        "rank 0/2: images 0..2 of every global batch of 4",
        "rank 1/2: images 2..4 of every global batch of 4",
    ] {
        assert!(err.contains(line), "no `{line}` in:\n{err}");
    }
    assert!(err.contains("trained steps 0..6"), "{err}");
    // Rank 0 alone writes: one metrics line per step, not two.
    assert_same_curve(&losses(&two), &losses(&one), "2 ranks vs 1");
    for f in [
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "checkpoints/checkpoint-6/state.json",
        "samples/step-0000006.png",
    ] {
        assert!(two.join(f).is_file(), "{f} missing");
    }
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_under_other_rank_counts() {
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let (tmp, data) = setup();
    let out = tmp.path().join("killed");
    let tag = out.display().to_string();
    let job = Job::start(2, &train_args(&data, &out, 4, 1_000_000));
    wait_for(&out.join("checkpoints/checkpoint-2/state.json"));
    let pid = rank_pid(1, &tag).expect("rank 1's process");
    signal(pid, libc::SIGKILL);
    let (status, err) = job.wait(Duration::from_secs(60));
    assert!(!status.success(), "{err}");
    // Open MPI's launcher names the rank that died and how.
    assert!(
        err.contains("rank 1") && err.contains("signal 9"),
        "no word of rank 1's death in:\n{err}"
    );

    // Resume in one process, then with two ranks again: the curve of an uninterrupted
    // single-process run of the same length.
    let k = latest_step(&out);
    let reference = tmp.path().join("reference");
    run_single(&train_args(&data, &reference, 4, k + 4));
    let mut args = train_args(&data, &out, 4, k + 2);
    args.extend(["--resume".into(), "latest".into()]);
    let err = run_single(&args);
    assert!(err.contains(&format!("at step {k}")), "{err}");
    let mut args = train_args(&data, &out, 4, k + 4);
    args.extend(["--resume".into(), "latest".into()]);
    let (ok, err) = run_mpi(2, &args);
    assert!(ok, "{err}");
    assert!(err.contains(&format!("at step {}", k + 2)), "{err}");
    assert!(err.contains("rank 1/2: images 2..4"), "{err}");
    assert_same_curve(
        &losses(&out),
        &losses(&reference),
        "resumed vs uninterrupted",
    );
}

#[test]
fn a_batch_that_does_not_divide_among_the_ranks_is_refused_at_start() {
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let (tmp, data) = setup();
    let out = tmp.path().join("odd");
    let (ok, err) = run_mpi(2, &train_args(&data, &out, 3, 2));
    assert!(!ok, "{err}");
    assert!(
        err.contains("the batch size 3 does not divide among 2 ranks"),
        "{err}"
    );
    assert!(!out.join("checkpoints").exists(), "it trained anyway");
}

#[test]
fn a_stalled_rank_ends_the_job_after_the_collective_timeout() {
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let (tmp, data) = setup();
    let out = tmp.path().join("stalled");
    let tag = out.display().to_string();
    let mut args = train_args(&data, &out, 4, 1_000_000);
    args.extend(["--comm-timeout".into(), "2".into()]);
    let job = Job::start(2, &args);
    wait_for(&out.join("checkpoints/checkpoint-2/state.json"));
    let pid = rank_pid(1, &tag).expect("rank 1's process");
    // Stopped, rank 1 is alive to the launcher but never joins the next gradient sum.
    signal(pid, libc::SIGSTOP);
    let t0 = Instant::now();
    let (status, err) = job.wait(Duration::from_secs(60));
    // mpirun ends a stopped rank too; never signal a pid that is no longer ours.
    if rank_pid(1, &tag) == Some(pid) {
        signal(pid, libc::SIGKILL);
    }
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("rank 0/2: error: the gradient sum of step")
            && err.contains("a rank has died or hangs"),
        "{err}"
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "ended before the timeout"
    );
}

/// Runs each task (a command and its model flags; `images`: the files it writes) with
/// `--seed 7 --steps 3 --prompt sneaker` in one process and split between two ranks, and
/// checks that the files are the same, byte for byte.
fn assert_two_ranks_write_the_files_of_one(tasks: &[(Vec<&str>, usize)]) {
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    for (i, (task, images)) in tasks.iter().enumerate() {
        let (one, two) = (
            tmp.path().join(format!("one{i}")),
            tmp.path().join(format!("two{i}")),
        );
        let args = |out: &Path| -> Vec<String> {
            std::fs::create_dir_all(out).unwrap();
            let prompt: &[&str] = if task.contains(&"--prompts-file") {
                &[]
            } else {
                &["--prompt", "sneaker"]
            };
            let settings = [prompt, &["--steps", "3", "--seed", "7"]].concat();
            let more = ["--output", out.to_str().unwrap()];
            task.iter()
                .chain(&settings)
                .chain(&more)
                .map(|s| s.to_string())
                .collect()
        };
        run_single(&args(&one));
        let (ok, err) = run_mpi(2, &args(&two));
        assert!(ok, "{task:?}: {err}");
        let half = images.div_ceil(2);
        for line in [
            format!("rank 0/2: images 0..{half} of {images}"),
            format!("rank 1/2: images {half}..{images} of {images}"),
        ] {
            assert!(err.contains(&line), "{task:?}: no `{line}` in:\n{err}");
        }
        let written = file_names(&one);
        assert_eq!(
            written.len(),
            *images,
            "{task:?}: files in {}",
            one.display()
        );
        assert_eq!(
            file_names(&two),
            written,
            "{task:?}: files of 2 ranks\n{err}"
        );
        for name in written {
            let a = std::fs::read(one.join(&name)).unwrap();
            let b = std::fs::read(two.join(&name)).unwrap();
            assert!(a == b, "{task:?}: {name} differs between 1 and 2 ranks");
        }
    }
}

/// `diffuse generate` (Stable Diffusion and the class-conditional DDPM model) and img2img with
/// `--num-images 3`, in one process and split 2 + 1 between two ranks: the same files, byte for
/// byte. And a prompts file of three prompts with two images each, split 3 + 3: rank 0 makes
/// both images of the first prompt and the first of the second, rank 1 the rest. Euler ancestral and DDPM draw new noise for the whole batch at every step, so each
/// rank must also draw the step noise of the images it does not make.
#[test]
fn two_ranks_write_the_files_of_one() {
    let sd = repo("fixtures/pipelines/tiny_sd");
    let ddpm = repo("models/fashion-mnist-ddpm");
    let init = repo("fixtures/pipelines/outputs/img2img_pndm.png");
    let n3 = ["--num-images", "3"];
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red square\na blue circle\na green field\n").unwrap();
    let prompts = prompts.to_str().unwrap();
    // (The DDPM model is class-conditional: its prompt is a class name.)
    assert_two_ranks_write_the_files_of_one(&[
        (
            vec![
                "generate",
                "--model",
                &sd,
                "--scheduler",
                "Euler a",
                "--prompts-file",
                prompts,
                "--num-images",
                "2",
            ],
            6,
        ),
        (
            [
                &["generate", "--model", &sd, "--scheduler", "Euler a"][..],
                &n3,
            ]
            .concat(),
            3,
        ),
        (
            [
                &["img2img", "--model", &sd, "--strength", "0.7"][..],
                &["--init-image", &init],
                &n3,
            ]
            .concat(),
            3,
        ),
        (
            [
                &["generate", "--model", &ddpm, "--scheduler", "DDPMScheduler"][..],
                &n3,
            ]
            .concat(),
            3,
        ),
    ]);
}

/// The same for the other pipeline families: SDXL text-to-image (Euler ancestral) and
/// inpainting, SD3 and Flux (flow matching, T5 prompts), and DiT with two classes of 3 images
/// each, split 3 + 3, under DDPM: DiT steps the guided batch `[x; x]`, so each rank draws the
/// step noise of both copies of the whole batch and keeps its rows of each.
#[test]
fn two_ranks_write_the_files_of_one_for_every_pipeline_family() {
    let sdxl = repo("fixtures/cases/_models/tiny_sdxl");
    let sd3 = repo("fixtures/cases/_models/tiny_sd3");
    let flux = repo("fixtures/cases/_models/tiny_flux");
    let dit = repo("fixtures/cases/_models/tiny_dit");
    let init = repo("fixtures/cases/sdxl_inpaint_euler/init_image.png");
    let mask = repo("fixtures/cases/sdxl_inpaint_euler/mask_image.png");
    let n3 = ["--num-images", "3"];
    let small = [
        "--width",
        "32",
        "--height",
        "32",
        "--max-sequence-length",
        "16",
    ];
    assert_two_ranks_write_the_files_of_one(&[
        (
            [
                &["generate", "--model", &sdxl, "--scheduler", "Euler a"][..],
                &n3,
            ]
            .concat(),
            3,
        ),
        (
            [
                &["inpaint", "--model", &sdxl, "--strength", "0.85"][..],
                &["--init-image", &init, "--mask", &mask],
                &n3,
            ]
            .concat(),
            3,
        ),
        (
            [&["generate", "--model", &sd3][..], &small, &n3].concat(),
            3,
        ),
        (
            [&["generate", "--model", &flux][..], &small, &n3].concat(),
            3,
        ),
        (
            [
                &["generate", "--model", &dit][..],
                &["--class-labels", "1,7", "--scheduler", "DDPMScheduler"],
                &n3,
            ]
            .concat(),
            6,
        ),
    ]);
}
