//! Single files of the real SD 1.5 and SD 2.1 architectures (`fixtures_configs/`): every
//! diffusers parameter is written in the original layout by our converter, into a sparse
//! safetensors file (a real header, data that is never read), and the loader must recognise the
//! family and map every tensor back to the model with its exact shape.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use diffuse_loaders::single_file::{
    to_original_layout, Family, OriginalLayout, SingleFile, TextEncoderLayout,
};
use diffuse_loaders::RecordingBackend;
use diffuse_models::clip_text::{ClipTextConfig, ClipTextModel};
use diffuse_models::{
    AutoencoderKL, AutoencoderKLConfig, UNet2DConditionConfig, UNet2DConditionModel,
};

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures_configs")
}

/// The (name, shape) of every parameter a model built from `cfg` asks for.
fn params<C>(
    cfg: &C,
    build: impl FnOnce(candle_nn::VarBuilder, &C) -> candle_core::Result<()>,
) -> Result<Vec<(String, Vec<usize>)>> {
    let rec = RecordingBackend::shapes_only();
    build(rec.var_builder(DType::F32, &Device::Cpu), cfg)?;
    Ok(rec.parameters())
}

/// Zero tensors of these shapes that take no memory (broadcast scalars).
fn placeholders(params: &[(String, Vec<usize>)]) -> Result<BTreeMap<String, Tensor>> {
    params
        .iter()
        .map(|(n, s)| {
            Ok((
                n.clone(),
                Tensor::zeros((), DType::F16, &Device::Cpu)?.broadcast_as(s.as_slice())?,
            ))
        })
        .collect()
}

/// A safetensors file with this header and zero data, written sparsely.
fn sparse_safetensors(path: &Path, shapes: &BTreeMap<String, Vec<usize>>) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in shapes {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut f = std::fs::File::create(path)?;
    f.write_all(&(text.len() as u64).to_le_bytes())?;
    f.write_all(text.as_bytes())?;
    f.set_len((8 + text.len() + offset) as u64)?;
    Ok(())
}

fn check(folder: &str, family: Family, open_clip: bool) -> Result<()> {
    let dir = configs().join(folder);
    let unet_cfg: UNet2DConditionConfig =
        diffuse_loaders::read_config(&dir.join("unet/config.json"))?;
    let vae_cfg: AutoencoderKLConfig = diffuse_loaders::read_config(&dir.join("vae/config.json"))?;
    let te_cfg: ClipTextConfig =
        diffuse_loaders::read_config(&dir.join("text_encoder/config.json"))?;
    let unet_p = params(&unet_cfg, |vb, c| {
        UNet2DConditionModel::new(vb, c).map(drop)
    })?;
    let vae_p = params(&vae_cfg, |vb, c| AutoencoderKL::new(vb, c).map(drop))?;
    let te_p = params(&te_cfg, |vb, c| ClipTextModel::new(vb, c).map(drop))?;
    let unet_l = (
        unet_cfg.block_out_channels.len(),
        unet_cfg.layers_per_block.get(0),
    );
    let vae_l = (vae_cfg.block_out_channels.len(), vae_cfg.layers_per_block);
    let layout = if open_clip {
        TextEncoderLayout::OpenClip {
            prefix: "cond_stage_model.model.".into(),
            layers: te_cfg.num_hidden_layers,
            projection: false,
        }
    } else {
        TextEncoderLayout::Clip {
            prefix: "cond_stage_model.transformer.".into(),
        }
    };
    let (unet, vae, te) = (
        placeholders(&unet_p)?,
        placeholders(&vae_p)?,
        placeholders(&te_p)?,
    );
    let original = to_original_layout(&OriginalLayout {
        unet: &unet,
        unet_blocks: unet_l.0,
        unet_layers_per_block: unet_l.1,
        vae: &vae,
        vae_blocks: vae_l.0,
        vae_layers_per_block: vae_l.1,
        text_encoders: vec![(&te, layout.clone())],
    })?;
    let shapes: BTreeMap<String, Vec<usize>> = original
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let path = std::env::temp_dir().join(format!(
        "diffuse-real-{folder}-{}.safetensors",
        std::process::id()
    ));
    sparse_safetensors(&path, &shapes)?;
    let result = (|| -> Result<()> {
        let file = SingleFile::open(&path)?;
        ensure!(
            file.family()? == family,
            "recognised as {:?}",
            file.family()?
        );
        file.unet(unet_l.0, unet_l.1)?
            .check_shapes(&unet_p)
            .context("unet")?;
        file.vae(vae_l.0, vae_l.1)?
            .check_shapes(&vae_p)
            .context("vae")?;
        let layouts = file.text_encoders(family);
        let mut te_layout = layouts[0].clone();
        if let TextEncoderLayout::OpenClip { layers, .. } = &mut te_layout {
            *layers = te_cfg.num_hidden_layers;
        }
        ensure!(te_layout == layout);
        file.text_encoder(&te_layout)?
            .check_shapes(&te_p)
            .context("text encoder")?;
        ensure!(file
            .unclaimed(&[
                "model.diffusion_model.",
                "first_stage_model.",
                "cond_stage_model."
            ])
            .is_empty());
        eprintln!(
            "{folder}: {} tensors in the original layout, all mapped ({} UNet, {} VAE, {} text encoder)",
            shapes.len(),
            unet_p.len(),
            vae_p.len(),
            te_p.len()
        );
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result
}

#[test]
fn sd15_single_file_maps_every_tensor() -> Result<()> {
    check("runwayml_stable_diffusion_v1_5", Family::Sd1, false)
}

#[test]
fn sd15_inpainting_single_file_is_recognised() -> Result<()> {
    check(
        "runwayml_stable_diffusion_inpainting",
        Family::Sd1Inpaint,
        false,
    )
}

#[test]
fn sd21_single_file_maps_every_tensor() -> Result<()> {
    check("stabilityai_stable_diffusion_2_1", Family::Sd2, true)
}
