//! Loading diffusers/transformers configs, safetensors weights and Hugging Face hub folders.

pub mod config;
pub mod hub;
pub mod lora;
pub mod pickle;
pub mod single_file;
pub mod textual_inversion;
pub mod weights;

pub use config::{parse_config, read_config};
pub use hub::{hub_cache_dir, resolve_model, resolve_model_in};
pub use weights::{
    component_weight_files, load_model, load_with, save_safetensors,
    save_safetensors_with_metadata, CheckedBackend, MappedTensor, RecordingBackend, TensorFile,
    WeightDelta,
};
