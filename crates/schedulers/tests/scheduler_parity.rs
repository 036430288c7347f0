//! Scheduler parity with diffusers: every case folder under `<fixtures>/schedulers/`.
//!
//! Each case: the training schedule, the inference schedule for every traced step count, the
//! full denoising trace with the fixtures' toy model (every model input, prev_sample and
//! pred_original_sample, and the noise stochastic schedulers draw from the torch-compatible
//! generator), and `add_noise` before and after `set_timesteps`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use diffuse_core::testing::*;
use diffuse_core::{Generator, NoiseSource};
use diffuse_schedulers::{from_own_config, Scheduler, SchedulerConfig, TimestepsSpec};

const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-5;

/// Remembers the last noise tensor drawn, to compare with the fixture's.
struct Recorder {
    g: Generator,
    last: Option<Tensor>,
}

impl NoiseSource for Recorder {
    fn randn_like(&mut self, t: &Tensor) -> candle_core::Result<Tensor> {
        let z = self.g.randn_like(t)?;
        self.last = Some(z.clone());
        Ok(z)
    }
}

fn vec_tensor(v: &[f64]) -> Result<Tensor> {
    Ok(Tensor::new(v, &Device::Cpu)?.to_dtype(DType::F32)?)
}

fn f32s(v: &[f32]) -> Result<Tensor> {
    Ok(Tensor::new(v, &Device::Cpu)?)
}

fn fresh(config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    Ok(from_own_config(config)?)
}

/// Fails on a key this harness does not know, so that a fixture it cannot fully run fails.
fn known_keys(what: &str, v: &serde_json::Value, known: &[&str]) -> Result<()> {
    let obj = v
        .as_object()
        .with_context(|| format!("{what}: not an object"))?;
    if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
        bail!("{what}: unknown key {k:?} (the harness cannot run this case)");
    }
    Ok(())
}

/// Fails on a tensor a fixture file holds that the harness does not check.
fn known_tensors(what: &str, t: &HashMap<String, Tensor>, known: &[String]) -> Result<()> {
    let mut extra: Vec<&String> = t.keys().filter(|k| !known.contains(k)).collect();
    extra.sort();
    if !extra.is_empty() {
        bail!("{what}: unexpected tensors {extra:?} (the harness cannot check them)");
    }
    Ok(())
}

/// `set_timesteps(n)`, or the keyword arguments the fixture gave diffusers' `set_timesteps`.
fn set_timesteps(sched: &mut dyn Scheduler, n: usize, kwargs: &serde_json::Value) -> Result<()> {
    if kwargs.is_null() {
        sched.set_timesteps(n)?;
        return Ok(());
    }
    known_keys(
        "set_timesteps_kwargs",
        kwargs,
        &["num_inference_steps", "timesteps", "sigmas", "mu"],
    )?;
    let list = |k: &str| -> Result<Option<Vec<f64>>> {
        match &kwargs[k] {
            serde_json::Value::Null => Ok(None),
            v => Ok(Some(
                v.as_array()
                    .with_context(|| format!("{k}: not a list"))?
                    .iter()
                    .map(|x| x.as_f64().with_context(|| format!("{k}: not a number")))
                    .collect::<Result<_>>()?,
            )),
        }
    };
    let spec = TimestepsSpec {
        num_inference_steps: kwargs["num_inference_steps"].as_u64().map(|n| n as usize),
        timesteps: list("timesteps")?,
        sigmas: list("sigmas")?,
        mu: kwargs["mu"].as_f64(),
    };
    sched.set_timesteps_with(&spec)?;
    Ok(())
}

/// Compares `key` with our sigmas: the fixture has them exactly when our scheduler has some.
fn check_sigmas(
    key: &str,
    sched: &dyn Scheduler,
    t: &HashMap<String, Tensor>,
    known: &mut Vec<String>,
) -> Result<()> {
    match (sched.sigmas(), t.get(key)) {
        (Some(ours), Some(sig)) => assert_close(key, &f32s(ours)?, sig, ATOL, RTOL)?,
        (None, None) => {}
        (Some(_), None) => bail!("the scheduler has sigmas but the fixture has no {key}"),
        (None, Some(_)) => bail!("fixture has {key} but the scheduler has no sigmas"),
    }
    known.push(key.into());
    Ok(())
}

fn check_schedule(dir: &Path, config: &SchedulerConfig) -> Result<()> {
    let s = load_tensors(&dir.join("schedule.safetensors"))?;
    let meta = read_json(&dir.join("schedule.json"))?;
    let sched = fresh(config)?;
    // The training schedule: the fixture has it exactly when our scheduler has one.
    let mut known: Vec<String> = vec![];
    match (sched.alphas_cumprod(), sched.betas()) {
        (Some(acp), Some(betas)) => {
            assert_close(
                "alphas_cumprod",
                &f32s(acp)?,
                get(&s, "alphas_cumprod")?,
                ATOL,
                RTOL,
            )?;
            assert_close("betas", &f32s(&betas)?, get(&s, "betas")?, ATOL, RTOL)?;
            known.extend(["alphas_cumprod".into(), "betas".into()]);
        }
        _ => {
            for k in ["alphas_cumprod", "betas"] {
                if s.contains_key(k) {
                    bail!("fixture has {k} but the scheduler has none");
                }
            }
        }
    }
    let runs = meta["set_timesteps"]
        .as_object()
        .context("schedule.json: no set_timesteps")?;
    for (n, info) in runs {
        let n: usize = n.parse()?;
        known_keys(
            &format!("schedule.json N={n}"),
            info,
            &[
                "timesteps",
                "timesteps_dtype",
                "sigmas",
                "init_noise_sigma",
                "set_timesteps_kwargs",
            ],
        )?;
        let mut sched = fresh(config)?;
        set_timesteps(sched.as_mut(), n, &info["set_timesteps_kwargs"])?;
        assert_close(
            &format!("timesteps_N{n}"),
            &vec_tensor(sched.timesteps())?,
            get(&s, &format!("timesteps_N{n}"))?,
            ATOL,
            RTOL,
        )?;
        known.push(format!("timesteps_N{n}"));
        check_sigmas(&format!("sigmas_N{n}"), sched.as_ref(), &s, &mut known)?;
        let ins = info["init_noise_sigma"]
            .as_f64()
            .context("init_noise_sigma")?;
        if (sched.init_noise_sigma() - ins).abs() > ATOL * (1.0 + ins.abs()) {
            bail!(
                "N={n}: init_noise_sigma {} != {ins}",
                sched.init_noise_sigma()
            );
        }
    }
    known_tensors("schedule.safetensors", &s, &known)?;
    Ok(())
}

/// A trace's tolerances: the default, loosened at the steps an optional `tolerances.json` in the
/// case folder names: `{"trace_N25": {"steps": [0], "atol": .., "rtol": .., "reason": ".."}}`.
/// Each override needs its steps and a stated reason. After a loosened step the loop continues
/// from diffusers' `prev_sample`.
struct TraceTolerance {
    steps: Vec<usize>,
    atol: f64,
    rtol: f64,
}

impl TraceTolerance {
    fn read(dir: &Path, json: &Path) -> Result<Self> {
        let none = Self {
            steps: vec![],
            atol: ATOL,
            rtol: RTOL,
        };
        let f = dir.join("tolerances.json");
        if !f.exists() {
            return Ok(none);
        }
        let all = read_json(&f)?;
        let stem = json
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let Some(o) = all.get(stem) else {
            return Ok(none);
        };
        known_keys("tolerances.json", o, &["steps", "atol", "rtol", "reason"])?;
        if o["reason"].as_str().unwrap_or("").is_empty() {
            bail!("tolerances.json: override for {stem} gives no reason");
        }
        let steps = o["steps"]
            .as_array()
            .filter(|a| !a.is_empty())
            .with_context(|| format!("tolerances.json: override for {stem} names no steps"))?
            .iter()
            .map(|s| {
                s.as_u64()
                    .map(|s| s as usize)
                    .context("steps: not an index")
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            steps,
            atol: o["atol"].as_f64().context("atol")?,
            rtol: o["rtol"].as_f64().context("rtol")?,
        })
    }

    /// Whether step `i` is compared at the loosened tolerance.
    fn loosened(&self, i: usize) -> bool {
        self.steps.contains(&i)
    }

    /// (atol, rtol) at step `i`.
    fn at(&self, i: usize) -> (f64, f64) {
        if self.loosened(i) {
            (self.atol, self.rtol)
        } else {
            (ATOL, RTOL)
        }
    }
}

fn check_trace(dir: &Path, config: &SchedulerConfig, json: &Path) -> Result<()> {
    let tol = TraceTolerance::read(dir, json)?;
    let meta = read_json(json)?;
    known_keys(
        "trace json",
        &meta,
        &[
            "num_inference_steps",
            "num_model_evals",
            "init_noise_sigma",
            "step_kwargs",
            "generator_seed",
            "stochastic",
            "order",
            "steps",
            "scheduler",
            "config_name",
            "set_timesteps_kwargs",
            "begin_index",
        ],
    )?;
    known_keys("step_kwargs", &meta["step_kwargs"], &["eta"])?;
    let tr = load_tensors(&json.with_extension("safetensors"))?;
    let n = meta["num_inference_steps"]
        .as_u64()
        .context("num_inference_steps")? as usize;
    let mut sched = fresh(config)?;
    if let Some(eta) = meta["step_kwargs"].get("eta").and_then(|e| e.as_f64()) {
        sched.set_eta(eta);
    }
    set_timesteps(sched.as_mut(), n, &meta["set_timesteps_kwargs"])?;
    let begin = meta["begin_index"].as_u64().map(|b| b as usize);
    if let Some(b) = begin {
        sched.set_begin_index(b);
    }
    let k = meta["num_model_evals"]
        .as_u64()
        .context("num_model_evals")? as usize;
    let order = meta["order"].as_u64().context("order")? as usize;
    if sched.order() != order {
        bail!("order {}, diffusers {order}", sched.order());
    }
    let timesteps = sched.timesteps()[begin.unwrap_or(0)..].to_vec();
    if timesteps.len() != k {
        bail!("{} model evaluations, expected {k}", timesteps.len());
    }
    assert_close(
        "timesteps",
        &vec_tensor(&timesteps)?,
        get(&tr, "timesteps")?,
        ATOL,
        RTOL,
    )?;
    let mut known: Vec<String> = [
        "init_sample",
        "fixed",
        "start_sample",
        "timesteps",
        "model_input",
        "model_output",
        "prev_sample",
        "pred_original_sample",
        "noise",
        "final_sample",
    ]
    .map(String::from)
    .to_vec();
    check_sigmas("sigmas", sched.as_ref(), &tr, &mut known)?;
    known_tensors("trace", &tr, &known)?;
    let seed = meta["generator_seed"].as_u64().unwrap_or(0);
    let mut rng = Recorder {
        g: Generator::manual_seed(seed),
        last: None,
    };
    let fixed = get(&tr, "fixed")?;
    let mut sample = get(&tr, "init_sample")?.affine(sched.init_noise_sigma(), 0.0)?;
    assert_close(
        "start_sample",
        &sample,
        get(&tr, "start_sample")?,
        ATOL,
        RTOL,
    )?;
    let pick = |name: &str, i: usize| -> Result<Tensor> { Ok(get(&tr, name)?.get(i)?) };
    for (i, &t) in timesteps.iter().enumerate() {
        let at = |what: &str| format!("step {i} (t={t}) {what}");
        let (step_atol, step_rtol) = tol.at(i);
        let input = sched.scale_model_input(&sample, t)?;
        assert_close(
            &at("model_input"),
            &input,
            &pick("model_input", i)?,
            step_atol,
            step_rtol,
        )?;
        let coef = (0.1 * (t / 1000.0).cos()) as f32;
        let output = (input.affine(coef as f64, 0.0)? + fixed)?;
        assert_close(
            &at("model_output"),
            &output,
            &pick("model_output", i)?,
            step_atol,
            step_rtol,
        )?;
        rng.last = None;
        let out = sched.step(&output, t, &sample, &mut rng)?;
        let drew = meta["steps"][i]["noise_drawn"].as_bool().unwrap_or(false);
        match (&rng.last, drew) {
            (Some(z), true) => assert_close(&at("noise"), z, &pick("noise", i)?, 0.0, 0.0)?,
            (None, false) => {}
            (got, _) => bail!(
                "{}: drew noise: {}, diffusers drew: {drew}",
                at(""),
                got.is_some()
            ),
        }
        let exp_x0 = pick("pred_original_sample", i)?;
        let fixture_has_x0 = !exp_x0
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_nan());
        match (&out.pred_original_sample, fixture_has_x0) {
            (Some(x0), true) => assert_close(
                &at("pred_original_sample"),
                x0,
                &exp_x0,
                step_atol,
                step_rtol,
            )?,
            (None, false) => {}
            (ours, _) => bail!(
                "{}: we return a pred_original_sample: {}, diffusers: {fixture_has_x0}",
                at(""),
                ours.is_some()
            ),
        }
        assert_close(
            &at("prev_sample"),
            &out.prev_sample,
            &pick("prev_sample", i)?,
            step_atol,
            step_rtol,
        )?;
        // After a step compared at a loosened tolerance, go on from diffusers' sample, so that
        // step's justified difference is not carried into the steps checked at the default.
        sample = if tol.loosened(i) {
            pick("prev_sample", i)?
        } else {
            out.prev_sample
        };
    }
    let (atol, rtol) = tol.at(k - 1);
    assert_close(
        "final_sample",
        &sample,
        get(&tr, "final_sample")?,
        atol,
        rtol,
    )?;
    Ok(())
}

fn check_add_noise(dir: &Path, config: &SchedulerConfig) -> Result<()> {
    let meta = read_json(&dir.join("add_noise.json"))?;
    known_keys(
        "add_noise.json",
        &meta,
        &["after_set10", "raw", "method", "note"],
    )?;
    // The flow-matching schedulers noise with `scale_noise`, which our `add_noise` implements;
    // a class with neither (DDIM inversion) must refuse.
    match meta["method"].as_str() {
        None | Some("add_noise" | "scale_noise") => {}
        Some("none") => {
            let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu)?;
            let mut s = fresh(config)?;
            s.set_timesteps(10)?;
            let t = s.timesteps()[0];
            if s.add_noise(&x, &x, &[t]).is_ok() {
                bail!("diffusers has no add_noise for this class, ours noised");
            }
            return Ok(());
        }
        Some(m) => bail!("add_noise.json: unknown method {m:?}"),
    }
    let t: HashMap<String, Tensor> = load_tensors(&dir.join("add_noise.safetensors"))?;
    let known = [
        "original",
        "noise",
        "timesteps_after_set10",
        "noisy_after_set10",
        "timesteps_raw",
        "noisy_raw",
    ]
    .map(String::from);
    known_tensors("add_noise.safetensors", &t, &known)?;
    let (x, z) = (get(&t, "original")?, get(&t, "noise")?);
    let ts = |k: &str| -> Result<Vec<f64>> { to_vec_f64(get(&t, k)?) };
    let schedule = read_json(&dir.join("schedule.json"))?;
    let mut s = fresh(config)?;
    set_timesteps(
        s.as_mut(),
        10,
        &schedule["set_timesteps"]["10"]["set_timesteps_kwargs"],
    )?;
    // The fixture noised to timesteps[[0, len/2, -1]]: take ours at those positions (fractional
    // timesteps can differ from diffusers' in the last bit) after checking they agree.
    let sched_ts = s.timesteps();
    let ours: Vec<f64> = [0, sched_ts.len() / 2, sched_ts.len() - 1]
        .iter()
        .map(|&i| sched_ts[i])
        .collect();
    assert_close(
        "timesteps_after_set10",
        &vec_tensor(&ours)?,
        get(&t, "timesteps_after_set10")?,
        ATOL,
        RTOL,
    )?;
    let got = s.add_noise(x, z, &ours)?;
    assert_close(
        "noisy_after_set10",
        &got,
        get(&t, "noisy_after_set10")?,
        ATOL,
        RTOL,
    )?;
    let s = fresh(config)?;
    // Fractional timesteps of respaced schedules can differ from diffusers' in the last bit:
    // noise at our equal-within-tolerance timestep.
    let raw: Vec<f64> = ts("timesteps_raw")?
        .into_iter()
        .map(|t| {
            s.timesteps()
                .iter()
                .copied()
                .find(|&o| (o - t).abs() <= ATOL * (1.0 + t.abs()))
                .unwrap_or(t)
        })
        .collect();
    let got = s.add_noise(x, z, &raw)?;
    assert_close("noisy_raw", &got, get(&t, "noisy_raw")?, ATOL, RTOL)?;
    Ok(())
}

fn run_case(dir: &Path) -> Result<()> {
    let mut config = SchedulerConfig::from_file(&dir.join("scheduler_config.json"))?;
    // UniPC's predictor scheduler, which diffusers cannot put in the config itself.
    let solver_p = dir.join("solver_p_config.json");
    if solver_p.exists() {
        let p = SchedulerConfig::from_file(&solver_p)?;
        config.set("solver_p", serde_json::Value::Object(p.map));
    }
    check_schedule(dir, &config).context("schedule")?;
    let mut traces: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("trace_") && n.ends_with(".json"))
        })
        .collect();
    traces.sort();
    if traces.is_empty() {
        bail!("no trace_*.json in case");
    }
    for tr in &traces {
        check_trace(dir, &config, tr)
            .with_context(|| format!("{}", tr.file_name().unwrap().to_string_lossy()))?;
    }
    check_add_noise(dir, &config).context("add_noise")?;
    Ok(())
}

#[test]
fn every_scheduler_case_matches_diffusers() {
    let cases = case_dirs(&fixture_subdir("schedulers"));
    run_all(
        "schedulers",
        &cases,
        |p| p.file_name().unwrap().to_string_lossy().into_owned(),
        |p| run_case(p),
    );
}

// ---- the harness itself: cases it cannot fully check must fail --------------------------------

/// The repo's own scheduler fixtures (not `DIFFUSE_FIXTURES`): these tests doctor known cases.
fn repo_case(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/schedulers")
        .join(name)
}

/// A copy of a repo case in a temporary folder, with `edit` applied to it.
fn doctored(name: &str, edit: impl FnOnce(&Path) -> Result<()>) -> Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir)?;
    for e in std::fs::read_dir(repo_case(name))? {
        let p = e?.path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap()))?;
    }
    edit(&dir)?;
    Ok(tmp)
}

/// Rewrites one safetensors file of a case through `f`.
fn edit_tensors(
    dir: &Path,
    file: &str,
    f: impl FnOnce(&mut HashMap<String, Tensor>) -> Result<()>,
) -> Result<()> {
    let path = dir.join(file);
    let mut t = load_tensors(&path)?;
    f(&mut t)?;
    candle_core::safetensors::save(&t, &path)?;
    Ok(())
}

fn run_doctored(name: &str, edit: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = doctored(name, edit)?;
    run_case(&tmp.path().join(name))
}

#[test]
fn the_undoctored_copies_pass() {
    for name in ["ddpm_linear_eps", "euler_sd_eps", "ddim_cos_vpred_eta1"] {
        run_doctored(name, |_| Ok(())).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
}

#[test]
fn absent_or_unexpected_schedule_keys_fail() {
    type Edit = Box<dyn Fn(&mut HashMap<String, Tensor>)>;
    let remove = |k: &'static str| -> Edit { Box::new(move |t| drop(t.remove(k))) };
    let add = |k: &'static str| -> Edit {
        Box::new(move |t| {
            let extra = t.values().next().unwrap().clone();
            t.insert(k.into(), extra);
        })
    };
    // (case, file, edit, what the error must name)
    let cases: Vec<(&str, &str, Edit, &str)> = vec![
        (
            "ddpm_linear_eps",
            "schedule.safetensors",
            remove("betas"),
            "betas",
        ),
        (
            "ddpm_linear_eps",
            "schedule.safetensors",
            remove("alphas_cumprod"),
            "alphas_cumprod",
        ),
        (
            "euler_sd_eps",
            "schedule.safetensors",
            remove("sigmas_N10"),
            "sigmas_N10",
        ),
        (
            "euler_sd_eps",
            "trace_N10.safetensors",
            remove("sigmas"),
            "sigmas",
        ),
        (
            "ddpm_linear_eps",
            "schedule.safetensors",
            add("sigmas_N10"),
            "sigmas_N10",
        ),
        (
            "flow_euler_sd3_shift3",
            "schedule.safetensors",
            add("betas"),
            "betas",
        ),
        (
            "euler_sd_eps",
            "add_noise.safetensors",
            add("noisy_x"),
            "noisy_x",
        ),
        ("lms_sd_eps", "trace_N25.safetensors", add("extra"), "extra"),
    ];
    for (name, file, edit, names) in cases {
        let r = run_doctored(name, |d| {
            edit_tensors(d, file, |t| {
                edit(t);
                Ok(())
            })
        });
        match r {
            Ok(()) => panic!("{name}: the harness passed a doctored {file}"),
            Err(e) => {
                let e = format!("{e:#}");
                assert!(e.contains(names), "{name} {file}: {e}");
            }
        }
    }
}

#[test]
fn a_tolerance_override_covers_only_its_steps() {
    // ddim_cos_vpred_eta1's N=25 override loosens step 0 to atol 3e-4; a 1e-4 error at step 5
    // must still fail.
    let r = run_doctored("ddim_cos_vpred_eta1", |d| {
        edit_tensors(d, "trace_N25.safetensors", |t| {
            let p = t["prev_sample"].clone();
            let bump = Tensor::zeros_like(&p)?.slice_assign(
                &[5..6, 0..1, 0..1, 0..1, 0..1],
                &Tensor::full(1e-4f32, (1, 1, 1, 1, 1), &Device::Cpu)?,
            )?;
            t.insert("prev_sample".into(), (p + bump)?);
            Ok(())
        })
    });
    assert!(
        r.is_err(),
        "a 1e-4 error at step 5 passed under step 0's override"
    );
    // An override that names no steps is refused.
    let r = run_doctored("ddim_cos_vpred_eta1", |d| {
        let f = d.join("tolerances.json");
        let mut j = read_json(&f)?;
        j["trace_N25"].as_object_mut().unwrap().remove("steps");
        std::fs::write(&f, serde_json::to_string(&j)?)?;
        Ok(())
    });
    assert!(r.is_err(), "an override without steps was accepted");
}
