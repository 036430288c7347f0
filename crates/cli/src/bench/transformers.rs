//! The `--transformers` lines: a real SD3-medium step and FLUX.1-dev blocks (random weights),
//! and `--flux-bf16-step`.

use super::*;

impl Bench<'_> {
    /// One step of the real SD3-medium transformer and one FLUX.1-dev block of each kind
    /// (`--transformers`).
    pub(super) fn transformers(&mut self) -> Result<()> {
        use diffuse_models::transformer_sd3::{SD3Transformer2DConfig, SD3Transformer2DModel};
        let dev = self.device.clone();
        let size = self.args.transformer_size;
        let lat = size / 8;
        let name = format!("sd3-medium transformer step {size}");
        if self.wanted(&name) {
            let dir = self
                .args
                .configs
                .join("stabilityai_stable_diffusion_3_medium_diffusers/transformer");
            let cfg: SD3Transformer2DConfig = read_config(&dir.join("config.json"))?;
            let model = SD3Transformer2DModel::new(random_vb(&dev), &cfg)?;
            let x = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, lat, lat), &dev)?;
            let ctx = Tensor::randn(0f32, 1.0, (2, 77 + 256, cfg.joint_attention_dim), &dev)?;
            let pooled = Tensor::randn(0f32, 1.0, (2, cfg.pooled_projection_dim), &dev)?;
            let t = Tensor::new(&[500f32, 500.0], &dev)?;
            self.time(&name, None, || Ok(model.forward(&x, &ctx, &pooled, &t)?))?;
        }
        for (kind, blocks) in [("double", (1, 0)), ("single", (0, 1))] {
            let name = format!("flux-dev {kind} block {size}");
            if self.wanted(&name) {
                let (model, inputs) = self.flux(blocks, DType::F32)?;
                self.time(&name, None, || inputs.run(&model))?;
            }
        }
        Ok(())
    }

    /// FLUX.1-dev with `(double, single)` blocks and random weights of `dtype`, and the inputs
    /// of one step at `--transformer-size` (512 text tokens, guidance 3.5).
    fn flux(
        &self,
        (double, single): (usize, usize),
        dtype: DType,
    ) -> Result<(
        diffuse_models::transformer_flux::FluxTransformer2DModel,
        FluxInputs,
    )> {
        use diffuse_models::transformer_flux::{FluxTransformer2DConfig, FluxTransformer2DModel};
        let dev = self.device.clone();
        let dir = self
            .args
            .configs
            .join("black_forest_labs_flux_1_dev/transformer");
        let cfg = FluxTransformer2DConfig {
            num_layers: double,
            num_single_layers: single,
            ..read_config(&dir.join("config.json"))?
        };
        let model = FluxTransformer2DModel::new(random_vb_dtype(&dev, dtype), &cfg)?;
        let side = self.args.transformer_size / 16;
        let ids: Vec<f32> = (0..side)
            .flat_map(|r| (0..side).flat_map(move |c| [0.0, r as f32, c as f32]))
            .collect();
        let inputs = FluxInputs {
            x: Tensor::randn(0f32, 1.0, (1, side * side, cfg.in_channels), &dev)?,
            ctx: Tensor::randn(0f32, 1.0, (1, 512, cfg.joint_attention_dim), &dev)?,
            pooled: Tensor::randn(0f32, 1.0, (1, cfg.pooled_projection_dim), &dev)?,
            img_ids: Tensor::from_vec(ids, (side * side, 3), &dev)?,
            txt_ids: Tensor::zeros((512, 3), DType::F32, &dev)?,
            t: Tensor::new(&[0.5f32], &dev)?,
            guidance: Tensor::new(&[3.5f32], &dev)?,
        };
        Ok((model, inputs))
    }

    /// One step of FLUX.1-dev with bf16 weights (`--flux-bf16-step D,S`) and its peak RSS.
    pub(super) fn flux_bf16_step(&mut self, spec: &str) -> Result<()> {
        let (d, s) = spec
            .split_once(',')
            .and_then(|(d, s)| Some((d.trim().parse().ok()?, s.trim().parse().ok()?)))
            .context("--flux-bf16-step takes D,S (double and single block counts)")?;
        let size = self.args.transformer_size;
        let name = format!("flux-bf16 step {size} ({d}+{s} blocks)");
        if !self.wanted(&name) {
            return Ok(());
        }
        let (model, inputs) = self.flux((d, s), DType::BF16)?;
        let built = peak_rss_mib();
        self.time(&name, None, || inputs.run(&model))?;
        if let Some(mib) = built {
            println!("{:<34} {mib:>10.0} MiB after building the model", "");
        }
        Ok(())
    }
}

/// The inputs of one Flux step.
struct FluxInputs {
    x: Tensor,
    ctx: Tensor,
    pooled: Tensor,
    img_ids: Tensor,
    txt_ids: Tensor,
    t: Tensor,
    guidance: Tensor,
}

impl FluxInputs {
    fn run(
        &self,
        model: &diffuse_models::transformer_flux::FluxTransformer2DModel,
    ) -> Result<Tensor> {
        let cond = diffuse_models::transformer_flux::FluxConditioning {
            encoder_hidden_states: &self.ctx,
            pooled_projections: &self.pooled,
            txt_ids: &self.txt_ids,
            img_ids: &self.img_ids,
            guidance: Some(&self.guidance),
        };
        Ok(model.forward(&self.x, &self.t, &cond)?)
    }
}
