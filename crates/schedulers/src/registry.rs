//! The tables of names: every scheduler class with its constructor ([`CLASSES`]), and the
//! AUTOMATIC1111 sampler names with the class and config overrides each stands for
//! ([`A1111_NAMES`]). Building by class or by name, the error messages and the CLI's list all
//! read these two tables.

use diffuse_core::{Error, Result};
use serde_json::Value;

use crate::config::SchedulerConfig;
use crate::scheduler::Scheduler;
use crate::{
    ddim, ddim_inverse, ddpm, deis_multistep, dpmsolver_multistep, dpmsolver_singlestep,
    edm_dpmsolver_multistep, edm_euler, euler_ancestral_discrete, euler_discrete,
    flow_match_euler_discrete, flow_match_heun_discrete, heun_discrete, k_dpm_2_ancestral_discrete,
    k_dpm_2_discrete, lcm, lms_discrete, pndm, tcd, unipc_multistep,
};

/// A scheduler class: its diffusers name and its constructor from a config.
pub struct SchedulerClass {
    pub name: &'static str,
    pub build: fn(&SchedulerConfig) -> Result<Box<dyn Scheduler>>,
}

/// Every scheduler class this crate implements.
pub const CLASSES: &[SchedulerClass] = &[
    SchedulerClass {
        name: "DDPMScheduler",
        build: |c| Ok(Box::new(ddpm::DdpmScheduler::new(c)?)),
    },
    SchedulerClass {
        name: "DDIMScheduler",
        build: |c| Ok(Box::new(ddim::DdimScheduler::new(c)?)),
    },
    SchedulerClass {
        name: "PNDMScheduler",
        build: |c| Ok(Box::new(pndm::PndmScheduler::new(c)?)),
    },
    SchedulerClass {
        name: "EulerDiscreteScheduler",
        build: |c| Ok(Box::new(euler_discrete::EulerDiscreteScheduler::new(c)?)),
    },
    SchedulerClass {
        name: "EulerAncestralDiscreteScheduler",
        build: |c| {
            Ok(Box::new(
                euler_ancestral_discrete::EulerAncestralDiscreteScheduler::new(c)?,
            ))
        },
    },
    SchedulerClass {
        name: "HeunDiscreteScheduler",
        build: |c| Ok(Box::new(heun_discrete::HeunDiscreteScheduler::new(c)?)),
    },
    SchedulerClass {
        name: "LMSDiscreteScheduler",
        build: |c| Ok(Box::new(lms_discrete::LmsDiscreteScheduler::new(c)?)),
    },
    SchedulerClass {
        name: "KDPM2DiscreteScheduler",
        build: |c| Ok(Box::new(k_dpm_2_discrete::Kdpm2DiscreteScheduler::new(c)?)),
    },
    SchedulerClass {
        name: "KDPM2AncestralDiscreteScheduler",
        build: |c| {
            Ok(Box::new(
                k_dpm_2_ancestral_discrete::Kdpm2AncestralDiscreteScheduler::new(c)?,
            ))
        },
    },
    SchedulerClass {
        name: "DPMSolverMultistepScheduler",
        build: |c| {
            Ok(Box::new(
                dpmsolver_multistep::DpmSolverMultistepScheduler::new(c)?,
            ))
        },
    },
    SchedulerClass {
        name: "DPMSolverSinglestepScheduler",
        build: |c| {
            Ok(Box::new(
                dpmsolver_singlestep::DpmSolverSinglestepScheduler::new(c)?,
            ))
        },
    },
    SchedulerClass {
        name: "DEISMultistepScheduler",
        build: |c| Ok(Box::new(deis_multistep::DeisMultistepScheduler::new(c)?)),
    },
    SchedulerClass {
        name: "UniPCMultistepScheduler",
        build: |c| {
            let mut s = unipc_multistep::UniPcMultistepScheduler::new(c)?;
            // Our extension: a `solver_p` key holds the predictor's own config.
            if let Some(p) = c.map.get("solver_p").filter(|v| !v.is_null()) {
                let map = p.as_object().cloned().ok_or_else(|| {
                    Error::config(
                        "UniPCMultistepScheduler config",
                        "solver_p",
                        "expected a scheduler config object",
                    )
                })?;
                s.set_solver_p(from_own_config(&SchedulerConfig { map })?);
            }
            Ok(Box::new(s))
        },
    },
    SchedulerClass {
        name: "LCMScheduler",
        build: |c| Ok(Box::new(lcm::LcmScheduler::new(c)?)),
    },
    SchedulerClass {
        name: "FlowMatchEulerDiscreteScheduler",
        build: |c| {
            Ok(Box::new(
                flow_match_euler_discrete::FlowMatchEulerDiscreteScheduler::new(c)?,
            ))
        },
    },
    SchedulerClass {
        name: "FlowMatchHeunDiscreteScheduler",
        build: |c| {
            Ok(Box::new(
                flow_match_heun_discrete::FlowMatchHeunDiscreteScheduler::new(c)?,
            ))
        },
    },
    SchedulerClass {
        name: "TCDScheduler",
        build: |c| Ok(Box::new(tcd::TcdScheduler::new(c)?)),
    },
    SchedulerClass {
        name: "DDIMInverseScheduler",
        build: |c| Ok(Box::new(ddim_inverse::DdimInverseScheduler::new(c)?)),
    },
    SchedulerClass {
        name: "EDMEulerScheduler",
        build: |c| Ok(Box::new(edm_euler::EdmEulerScheduler::new(c)?)),
    },
    SchedulerClass {
        name: "EDMDPMSolverMultistepScheduler",
        build: |c| {
            Ok(Box::new(
                edm_dpmsolver_multistep::EdmDpmSolverMultistepScheduler::new(c)?,
            ))
        },
    },
];

const N_CLASSES: usize = CLASSES.len();
const CLASS_NAME_ARRAY: [&str; N_CLASSES] = {
    let mut names = [""; N_CLASSES];
    let mut i = 0;
    while i < N_CLASSES {
        names[i] = CLASSES[i].name;
        i += 1;
    }
    names
};

/// The names of [`CLASSES`], in the same order.
pub const CLASS_NAMES: &[&str] = &CLASS_NAME_ARRAY;

/// A config value an A1111 name sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Override {
    Bool(bool),
    Int(u64),
    Str(&'static str),
}

impl Override {
    pub fn to_json(self) -> Value {
        match self {
            Self::Bool(b) => Value::Bool(b),
            Self::Int(i) => Value::from(i),
            Self::Str(s) => Value::String(s.into()),
        }
    }
}

/// An AUTOMATIC1111 sampler name: the diffusers class and the config overrides that make it
/// (diffusers' scheduler overview table), and other spellings users type.
pub struct A1111Name {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub class: &'static str,
    pub overrides: &'static [(&'static str, Override)],
}

const KARRAS: (&str, Override) = ("use_karras_sigmas", Override::Bool(true));
const DPMPP: (&str, Override) = ("algorithm_type", Override::Str("dpmsolver++"));
const SDE_DPMPP: (&str, Override) = ("algorithm_type", Override::Str("sde-dpmsolver++"));
const ORDER_2: (&str, Override) = ("solver_order", Override::Int(2));

/// Every A1111 sampler name with a diffusers equivalent (plus the A1111 names of the classic
/// samplers DDIM, PLMS, UniPC, LCM and DDPM).
pub const A1111_NAMES: &[A1111Name] = &[
    A1111Name {
        name: "DPM++ 2M",
        aliases: &["dpmpp_2m", "dpm++2m", "k_dpmpp_2m"],
        class: "DPMSolverMultistepScheduler",
        overrides: &[DPMPP, ORDER_2],
    },
    A1111Name {
        name: "DPM++ 2M Karras",
        aliases: &["dpmpp_2m_karras", "k_dpmpp_2m_karras"],
        class: "DPMSolverMultistepScheduler",
        overrides: &[DPMPP, ORDER_2, KARRAS],
    },
    A1111Name {
        name: "DPM++ 2M SDE",
        aliases: &["dpmpp_2m_sde", "k_dpmpp_2m_sde"],
        class: "DPMSolverMultistepScheduler",
        overrides: &[SDE_DPMPP, ORDER_2],
    },
    A1111Name {
        name: "DPM++ 2M SDE Karras",
        aliases: &["dpmpp_2m_sde_karras", "k_dpmpp_2m_sde_karras"],
        class: "DPMSolverMultistepScheduler",
        overrides: &[SDE_DPMPP, ORDER_2, KARRAS],
    },
    A1111Name {
        name: "DPM++ SDE",
        aliases: &["dpmpp_sde", "k_dpmpp_sde"],
        class: "DPMSolverSinglestepScheduler",
        overrides: &[],
    },
    A1111Name {
        name: "DPM++ SDE Karras",
        aliases: &["dpmpp_sde_karras", "k_dpmpp_sde_karras"],
        class: "DPMSolverSinglestepScheduler",
        overrides: &[KARRAS],
    },
    A1111Name {
        name: "DPM2",
        aliases: &["k_dpm_2", "dpm_2"],
        class: "KDPM2DiscreteScheduler",
        overrides: &[],
    },
    A1111Name {
        name: "DPM2 Karras",
        aliases: &["k_dpm_2_karras", "dpm_2_karras"],
        class: "KDPM2DiscreteScheduler",
        overrides: &[KARRAS],
    },
    A1111Name {
        name: "DPM2 a",
        aliases: &["k_dpm_2_a", "dpm_2_ancestral", "k_dpm_2_ancestral"],
        class: "KDPM2AncestralDiscreteScheduler",
        overrides: &[],
    },
    A1111Name {
        name: "DPM2 a Karras",
        aliases: &["k_dpm_2_a_karras", "dpm_2_ancestral_karras"],
        class: "KDPM2AncestralDiscreteScheduler",
        overrides: &[KARRAS],
    },
    A1111Name {
        name: "Euler",
        aliases: &["k_euler"],
        class: "EulerDiscreteScheduler",
        overrides: &[],
    },
    A1111Name {
        name: "Euler Karras",
        aliases: &["k_euler_karras"],
        class: "EulerDiscreteScheduler",
        overrides: &[KARRAS],
    },
    A1111Name {
        name: "Euler a",
        aliases: &[
            "euler_a",
            "euler ancestral",
            "k_euler_a",
            "k_euler_ancestral",
        ],
        class: "EulerAncestralDiscreteScheduler",
        overrides: &[],
    },
    A1111Name {
        name: "Heun",
        aliases: &["k_heun"],
        class: "HeunDiscreteScheduler",
        overrides: &[],
    },
    A1111Name {
        name: "Heun Karras",
        aliases: &["k_heun_karras"],
        class: "HeunDiscreteScheduler",
        overrides: &[KARRAS],
    },
    A1111Name {
        name: "LMS",
        aliases: &["k_lms"],
        class: "LMSDiscreteScheduler",
        overrides: &[],
    },
    A1111Name {
        name: "LMS Karras",
        aliases: &["k_lms_karras"],
        class: "LMSDiscreteScheduler",
        overrides: &[KARRAS],
    },
    A1111Name {
        name: "DEIS",
        aliases: &[],
        class: "DEISMultistepScheduler",
        overrides: &[],
    },
    A1111Name {
        name: "DDIM",
        aliases: &[],
        class: "DDIMScheduler",
        overrides: &[],
    },
    A1111Name {
        name: "PLMS",
        aliases: &["pndm"],
        class: "PNDMScheduler",
        overrides: &[],
    },
    A1111Name {
        name: "UniPC",
        aliases: &[],
        class: "UniPCMultistepScheduler",
        overrides: &[],
    },
    A1111Name {
        name: "LCM",
        aliases: &[],
        class: "LCMScheduler",
        overrides: &[],
    },
    A1111Name {
        name: "DDPM",
        aliases: &[],
        class: "DDPMScheduler",
        overrides: &[],
    },
];

/// The A1111 sampler names this crate understands, in table order.
pub fn a1111_names() -> Vec<&'static str> {
    A1111_NAMES.iter().map(|a| a.name).collect()
}

/// The A1111 names that stand for `class`.
pub fn a1111_names_of(class: &str) -> Vec<&'static str> {
    A1111_NAMES
        .iter()
        .filter(|a| a.class == class)
        .map(|a| a.name)
        .collect()
}

/// Builds the scheduler `class` from a config (of any scheduler class: unknown keys are
/// ignored and absent keys take `class`'s defaults).
pub fn from_config(class: &str, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    match CLASSES.iter().find(|c| c.name == class) {
        Some(c) => (c.build)(config),
        None => Err(Error::invalid(format!(
            "unknown scheduler class {class:?}; known: {}",
            CLASS_NAMES.join(", ")
        ))),
    }
}

/// Builds the scheduler named in the config's own `_class_name`.
pub fn from_own_config(config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    let class = config
        .class_name()
        .ok_or_else(|| Error::config("scheduler config", "_class_name", "missing"))?
        .to_string();
    from_config(&class, config)
}

/// A scheduler name as users type it: an A1111 sampler name (or one of its aliases) or a
/// diffusers class name (with or without the `Scheduler` suffix), case-insensitively. Returns
/// the class and the config overrides the name implies.
pub fn resolve_name(name: &str) -> Result<(&'static str, Vec<(&'static str, Value)>)> {
    let key = name.trim().to_ascii_lowercase();
    let a1111 = A1111_NAMES
        .iter()
        .find(|a| a.name.to_ascii_lowercase() == key || a.aliases.iter().any(|al| *al == key));
    if let Some(a) = a1111 {
        let overrides = a.overrides.iter().map(|(k, v)| (*k, v.to_json())).collect();
        return Ok((a.class, overrides));
    }
    let class = CLASS_NAMES.iter().find(|c| {
        let c = c.to_ascii_lowercase();
        c == key || c.trim_end_matches("scheduler") == key
    });
    match class {
        Some(c) => Ok((c, vec![])),
        None => Err(Error::invalid(format!(
            "unknown scheduler {name:?}; use a diffusers class ({}) or an A1111 name ({})",
            CLASS_NAMES.join(", "),
            a1111_names().join(", ")
        ))),
    }
}

/// Builds a scheduler by user-facing name on top of a base config (e.g. the pipeline's own
/// scheduler config), as `Cls.from_config(pipe.scheduler.config)` does in diffusers.
pub fn from_name(name: &str, base: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    let (class, overrides) = resolve_name(name)?;
    let mut cfg = base.clone();
    for (k, v) in overrides {
        cfg.set(k, v);
    }
    from_config(class, &cfg)
}
