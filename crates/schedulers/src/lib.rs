//! Diffusion schedulers at parity with Hugging Face diffusers.
//!
//! One file per scheduler, all behind the [`Scheduler`] trait, so any scheduler plugs into any
//! pipeline. Each is built from a diffusers `scheduler_config.json` (also one saved by another
//! scheduler class, as `from_config` allows) with [`from_config`], or by name — diffusers class
//! names and the usual AUTOMATIC1111 names ("Euler a", "DPM++ 2M Karras", ...) — with
//! [`from_name`]:
//!
//! ```
//! use diffuse_schedulers::{from_name, from_own_config, SchedulerConfig};
//!
//! let cfg = SchedulerConfig::from_json_str(
//!     r#"{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
//!         "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}"#,
//! )?;
//! let mut ddim = from_own_config(&cfg)?;
//! ddim.set_timesteps(10)?;
//! assert_eq!(ddim.timesteps()[..3], [901.0, 801.0, 701.0]); // diffusers' "leading" spacing
//! let euler_a = from_name("Euler a", &cfg)?; // an A1111 name, on the same config
//! assert_eq!(euler_a.class_name(), "EulerAncestralDiscreteScheduler");
//! # Ok::<(), diffuse_core::Error>(())
//! ```
//!
//! The modules form layers, each using only those above it (`tests/module_layers.rs` checks):
//! `config`; `scheduler` (the trait); `common` (schedules and maths); `sigma_schedule`
//! (sigma-parameterised state and the k-diffusion schedules); the shared pieces of the VP
//! multistep solvers (`multistep`), flow matching (`flow_schedule`), EDM (`edm`) and the
//! consistency samplers (`consistency`); one file per scheduler; `registry` (the tables of class
//! and A1111 names).

pub mod common;
pub mod config;
mod consistency;
pub mod ddim;
pub mod ddim_inverse;
pub mod ddpm;
pub mod deis_multistep;
pub mod dpmsolver_multistep;
pub mod dpmsolver_singlestep;
mod edm;
pub mod edm_dpmsolver_multistep;
pub mod edm_euler;
pub mod euler_ancestral_discrete;
pub mod euler_discrete;
pub mod flow_match_euler_discrete;
pub mod flow_match_heun_discrete;
mod flow_schedule;
pub mod heun_discrete;
pub mod k_dpm_2_ancestral_discrete;
pub mod k_dpm_2_discrete;
pub mod lcm;
pub mod lms_discrete;
mod multistep;
pub mod pndm;
pub mod registry;
pub mod scheduler;
mod sigma_schedule;
pub mod tcd;
pub mod unipc_multistep;

pub use config::SchedulerConfig;
pub use registry::{
    a1111_names, from_config, from_name, from_own_config, resolve_name, A1111_NAMES, CLASSES,
    CLASS_NAMES,
};
pub use scheduler::{Scheduler, StepOutput, TimestepsSpec};
