//! Building schedulers from configs and names: defaults, swaps between classes, and errors.

use diffuse_core::Generator;
use diffuse_schedulers::{from_config, from_name, resolve_name, SchedulerConfig, CLASS_NAMES};

fn cfg(json: &str) -> SchedulerConfig {
    SchedulerConfig::from_json_str(json).unwrap()
}

/// SD 1.5's PNDM config, as shipped.
const SD15: &str = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
  "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
  "clip_sample": false}"#;

#[test]
fn every_class_builds_from_another_classes_config_and_runs() {
    let base = cfg(SD15);
    let sample = candle_core::Tensor::ones(
        (1, 4, 2, 2),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for class in CLASS_NAMES {
        let mut s = from_config(class, &base).unwrap_or_else(|e| panic!("{class}: {e}"));
        assert_eq!(s.class_name(), *class);
        s.set_timesteps(8).unwrap();
        assert!(!s.timesteps().is_empty());
        // The training schedule comes from the shared keys, whatever the class (flow-matching
        // and EDM schedulers have none).
        if let Some(acp) = s.alphas_cumprod() {
            assert!((acp[999] - 0.004_660_3).abs() < 1e-6, "{class}");
            assert_eq!(s.config().map["beta_schedule"], "scaled_linear");
        } else {
            assert!(
                class.starts_with("FlowMatch") || class.starts_with("EDM"),
                "{class} has no alphas_cumprod"
            );
        }
        let mut g = Generator::manual_seed(0);
        let mut x = sample.affine(s.init_noise_sigma(), 0.0).unwrap();
        for t in s.timesteps().to_vec() {
            let inp = s.scale_model_input(&x, t).unwrap();
            let eps = inp.affine(0.1, 0.0).unwrap();
            x = s.step(&eps, t, &x, &mut g).unwrap().prev_sample;
        }
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{class} produced {v:?}");
        // The resolved config records the class and the values used.
        assert_eq!(s.config().class_name(), Some(*class));
    }
}

#[test]
fn absent_keys_take_the_built_classes_defaults() {
    let base = cfg(SD15);
    let euler = from_config("EulerDiscreteScheduler", &base).unwrap();
    assert_eq!(euler.config().map["timestep_spacing"], "linspace");
    let ddim = from_config("DDIMScheduler", &base).unwrap();
    assert_eq!(ddim.config().map["timestep_spacing"], "leading");
}

#[test]
fn bad_values_are_errors_naming_the_field() {
    let cases = [
        (r#"{"beta_schedule": "cosine"}"#, "beta_schedule"),
        (r#"{"num_train_timesteps": -5}"#, "num_train_timesteps"),
        (r#"{"beta_start": "0.1"}"#, "beta_start"),
        (r#"{"prediction_type": "noise"}"#, "prediction_type"),
        (r#"{"timestep_spacing": "even"}"#, "timestep_spacing"),
        (r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas"),
    ];
    for (json, field) in cases {
        for class in [
            "DDIMScheduler",
            "EulerDiscreteScheduler",
            "DPMSolverMultistepScheduler",
        ] {
            let err = match from_config(class, &cfg(json)) {
                Ok(_) => panic!("{class} accepted {json}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(field), "{class} {json}: {err}");
        }
    }
    let err = SchedulerConfig::from_json_str("{not json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid JSON"), "{err}");
}

#[test]
fn impossible_step_counts_are_errors() {
    for class in CLASS_NAMES {
        let mut s = from_config(class, &cfg("{}")).unwrap();
        assert!(s.set_timesteps(0).is_err(), "{class} accepted 0 steps");
        assert!(
            s.set_timesteps(1001).is_err(),
            "{class} accepted more steps than training timesteps"
        );
    }
}

#[test]
fn a1111_and_class_names_resolve() {
    let base = cfg(SD15);
    let s = from_name("DPM++ 2M Karras", &base).unwrap();
    assert_eq!(s.class_name(), "DPMSolverMultistepScheduler");
    assert_eq!(s.config().map["use_karras_sigmas"], true);
    assert_eq!(s.config().map["algorithm_type"], "dpmsolver++");
    for (name, class) in [
        ("Euler a", "EulerAncestralDiscreteScheduler"),
        ("euler", "EulerDiscreteScheduler"),
        ("DDIM", "DDIMScheduler"),
        ("UniPC", "UniPCMultistepScheduler"),
        ("LMS", "LMSDiscreteScheduler"),
        ("Heun", "HeunDiscreteScheduler"),
        ("DPM2", "KDPM2DiscreteScheduler"),
        ("LCM", "LCMScheduler"),
        ("PLMS", "PNDMScheduler"),
        ("EulerDiscreteScheduler", "EulerDiscreteScheduler"),
        ("ddpm", "DDPMScheduler"),
    ] {
        assert_eq!(resolve_name(name).unwrap().0, class, "{name}");
    }
    let err = resolve_name("Euler b").unwrap_err().to_string();
    assert!(err.contains("Euler b") && err.contains("DPM++ 2M"), "{err}");
}

#[test]
fn heun_counts_two_evaluations_per_step() {
    let mut s = from_name("Heun", &cfg(SD15)).unwrap();
    s.set_timesteps(10).unwrap();
    assert_eq!(s.order(), 2);
    assert_eq!(s.timesteps().len(), 19);
}

#[test]
fn flow_matching_schedules_need_what_diffusers_needs() {
    use diffuse_schedulers::TimestepsSpec;
    let dynamic = cfg(r#"{"use_dynamic_shifting": true}"#);
    let mut s = from_config("FlowMatchEulerDiscreteScheduler", &dynamic).unwrap();
    let err = s.set_timesteps(10).unwrap_err().to_string();
    assert!(err.contains("mu"), "{err}");
    s.set_timesteps_with(&TimestepsSpec::steps(10).with_mu(0.5))
        .unwrap();
    assert_eq!(s.timesteps().len(), 10);
    let err = s
        .set_timesteps_with(&TimestepsSpec {
            num_inference_steps: Some(4),
            sigmas: Some(vec![1.0, 0.5]),
            mu: Some(0.5),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_inference_steps"), "{err}");
    // Classes without custom sigmas refuse them by name.
    let mut ddim = from_config("DDIMScheduler", &cfg("{}")).unwrap();
    let err = ddim
        .set_timesteps_with(&TimestepsSpec::sigmas(vec![1.0, 0.5]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("DDIMScheduler") && err.contains("sigmas"),
        "{err}"
    );
    // Flux's mu: base_shift at the base sequence length, max_shift at the largest.
    use diffuse_schedulers::flow_match_euler_discrete::calculate_shift;
    assert!((calculate_shift(256, 256, 4096, 0.5, 1.15) - 0.5).abs() < 1e-12);
    assert!((calculate_shift(4096, 256, 4096, 0.5, 1.15) - 1.15).abs() < 1e-12);
}

#[test]
fn one_timestep_noises_the_whole_batch() {
    let x = candle_core::Tensor::arange(0f32, 24.0, &candle_core::Device::Cpu)
        .unwrap()
        .reshape((3, 2, 2, 2))
        .unwrap();
    let z = x.affine(-0.5, 1.0).unwrap();
    // DDIM inversion has no add_noise.
    for class in CLASS_NAMES.iter().filter(|c| **c != "DDIMInverseScheduler") {
        let mut s = from_config(class, &cfg(SD15)).unwrap();
        s.set_timesteps(10).unwrap();
        let t = s.timesteps()[3];
        let one = s.add_noise(&x, &z, &[t]).unwrap();
        let each = s.add_noise(&x, &z, &[t, t, t]).unwrap();
        let d: f32 = (one - each)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0, "{class}");
        assert!(s.add_noise(&x, &z, &[t, t]).is_err(), "{class}");
    }
}

#[test]
fn the_name_tables_are_consistent() {
    use diffuse_schedulers::{a1111_names, A1111_NAMES, CLASSES};
    assert_eq!(CLASS_NAMES.len(), CLASSES.len());
    let mut seen = std::collections::HashSet::new();
    for a in A1111_NAMES {
        assert!(CLASS_NAMES.contains(&a.class), "{}: {}", a.name, a.class);
        for n in std::iter::once(a.name).chain(a.aliases.iter().copied()) {
            assert!(seen.insert(n.to_ascii_lowercase()), "{n} appears twice");
            // Every spelling resolves to its entry's class and overrides.
            let (class, overrides) = resolve_name(n).unwrap();
            assert_eq!(class, a.class, "{n}");
            assert_eq!(overrides.len(), a.overrides.len(), "{n}");
        }
        // And builds on SD 1.5's config.
        let s = from_name(a.name, &cfg(SD15)).unwrap_or_else(|e| panic!("{}: {e}", a.name));
        for (k, v) in a.overrides {
            assert_eq!(s.config().map[*k], v.to_json(), "{} {k}", a.name);
        }
    }
    for c in CLASS_NAMES {
        assert!(
            !seen.contains(&c.to_ascii_lowercase()),
            "{c} is also an A1111 name"
        );
    }
    // The error lists every class and every A1111 name.
    let err = resolve_name("no such sampler").unwrap_err().to_string();
    for n in CLASS_NAMES.iter().copied().chain(a1111_names()) {
        assert!(err.contains(n), "{n} missing from: {err}");
    }
}

#[test]
fn previous_timestep_follows_the_schedule() {
    // diffusers: the next entry of the schedule (custom or not), -1 after the last; DDPM before
    // set_timesteps steps one training timestep down.
    let mut ddpm = from_config("DDPMScheduler", &cfg("{}")).unwrap();
    assert_eq!(ddpm.previous_timestep(10.0).unwrap(), 9.0);
    ddpm.set_custom_timesteps(&[999.0, 500.0, 20.0]).unwrap();
    assert_eq!(ddpm.previous_timestep(500.0).unwrap(), 20.0);
    assert_eq!(ddpm.previous_timestep(20.0).unwrap(), -1.0);
    assert!(ddpm.previous_timestep(21.0).is_err());
    for class in ["LCMScheduler", "TCDScheduler"] {
        let mut s = from_config(class, &cfg(SD15)).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), [999.0, 759.0, 499.0, 259.0], "{class}");
        assert_eq!(s.previous_timestep(759.0).unwrap(), 499.0, "{class}");
        assert_eq!(s.previous_timestep(259.0).unwrap(), -1.0, "{class}");
        s.set_custom_timesteps(&[899.0, 299.0]).unwrap();
        assert_eq!(s.previous_timestep(899.0).unwrap(), 299.0, "{class}");
        assert!(s.set_custom_timesteps(&[299.0, 899.0]).is_err(), "{class}");
    }
}

/// Runs the toy loop of the fixtures (model output = 0.1 * input + 0.05) and returns the final
/// sample.
fn toy_loop(s: &mut dyn diffuse_schedulers::Scheduler, n: usize) -> Vec<f32> {
    let x0 = candle_core::Tensor::arange(0f32, 16.0, &candle_core::Device::Cpu)
        .unwrap()
        .affine(0.1, -0.8)
        .unwrap()
        .reshape((1, 1, 4, 4))
        .unwrap();
    s.set_timesteps(n).unwrap();
    let mut g = Generator::manual_seed(0);
    let mut x = x0.affine(s.init_noise_sigma(), 0.0).unwrap();
    for t in s.timesteps().to_vec() {
        let inp = s.scale_model_input(&x, t).unwrap();
        let eps = inp.affine(0.1, 0.05).unwrap();
        x = s.step(&eps, t, &x, &mut g).unwrap().prev_sample;
    }
    x.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn unipc_takes_a_dpm_solver_config_as_diffusers_does() {
    // DPM-Solver's solver_type "midpoint" means bh2 to UniPC (and is recorded so).
    let dpm = cfg(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_type": "midpoint",
        "algorithm_type": "deis", "beta_schedule": "scaled_linear"}"#,
    );
    let mut a = from_config("UniPCMultistepScheduler", &dpm).unwrap();
    assert_eq!(a.config().map["solver_type"], "bh2");
    let mut b = from_config(
        "UniPCMultistepScheduler",
        &cfg(r#"{"solver_type": "bh2", "beta_schedule": "scaled_linear"}"#),
    )
    .unwrap();
    assert_eq!(toy_loop(a.as_mut(), 8), toy_loop(b.as_mut(), 8));
    // And DPM-Solver maps "deis" to dpmsolver++ and UniPC's bh2 to midpoint.
    let d = from_config(
        "DPMSolverMultistepScheduler",
        &cfg(r#"{"algorithm_type": "deis", "solver_type": "bh2"}"#),
    )
    .unwrap();
    assert_eq!(d.config().map["algorithm_type"], "dpmsolver++");
    assert_eq!(d.config().map["solver_type"], "midpoint");
}

#[test]
fn unipc_bh1_ends_finite_on_a_zero_sigma() {
    // diffusers 0.42 returns NaN at the last step here (B(h) = -inf times a zero residual).
    let mut s = from_config(
        "UniPCMultistepScheduler",
        &cfg(r#"{"solver_type": "bh1", "beta_schedule": "scaled_linear"}"#),
    )
    .unwrap();
    let v = toy_loop(s.as_mut(), 10);
    assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
}

#[test]
fn dpm_solver_rules_as_diffusers() {
    // The noise-prediction algorithms need final_sigmas_type sigma_min.
    for algo in ["dpmsolver", "sde-dpmsolver"] {
        let err = match from_config(
            "DPMSolverMultistepScheduler",
            &cfg(&format!(r#"{{"algorithm_type": "{algo}"}}"#)),
        ) {
            Ok(_) => panic!("{algo} with a zero final sigma was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("final_sigmas_type"), "{err}");
        from_config(
            "DPMSolverMultistepScheduler",
            &cfg(&format!(
                r#"{{"algorithm_type": "{algo}", "final_sigmas_type": "sigma_min"}}"#
            )),
        )
        .unwrap();
    }
    // Third order has no SDE-DPM-Solver form; custom timesteps exclude respaced sigmas.
    assert!(from_config(
        "DPMSolverMultistepScheduler",
        &cfg(r#"{"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3}"#),
    )
    .is_err());
    let mut k = from_config(
        "DPMSolverMultistepScheduler",
        &cfg(r#"{"use_karras_sigmas": true}"#),
    )
    .unwrap();
    assert!(k.set_custom_timesteps(&[999.0, 500.0]).is_err());
}

#[test]
fn unipc_solver_p_survives_a_fresh_copy() {
    let with_p = cfg(
        r#"{"beta_schedule": "scaled_linear", "solver_p": {"_class_name": "DPMSolverMultistepScheduler",
            "beta_schedule": "scaled_linear"}}"#,
    );
    let mut a = from_config("UniPCMultistepScheduler", &with_p).unwrap();
    // Pipelines rebuild schedulers from their resolved config (fresh_scheduler).
    let mut b = from_config("UniPCMultistepScheduler", a.config()).unwrap();
    let mut plain = from_config(
        "UniPCMultistepScheduler",
        &cfg(r#"{"beta_schedule": "scaled_linear"}"#),
    )
    .unwrap();
    let (va, vb, vp) = (
        toy_loop(a.as_mut(), 8),
        toy_loop(b.as_mut(), 8),
        toy_loop(plain.as_mut(), 8),
    );
    assert_eq!(va, vb);
    assert_ne!(va, vp, "solver_p made no difference");
    let err = match from_config(
        "UniPCMultistepScheduler",
        &cfg(r#"{"solver_p": "DPMSolverMultistepScheduler"}"#),
    ) {
        Ok(_) => panic!("a solver_p that is not a config was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("solver_p"), "{err}");
}
