//! The `--large` lines: SDXL's UNet and VAE, a tiled 2048² SD 1.5 decode, a 1-step SDXL run
//! and a whole 20-step SDXL image at 1024².

use super::*;

impl Bench<'_> {
    /// A `--large` line this run wants.
    fn wanted_large(&self, name: &str) -> bool {
        self.args.large && self.wanted(name)
    }

    /// The `--large` lines: SDXL's UNet and VAE, a tiled 2048² SD 1.5 decode, a 1-step SDXL run,
    /// a 20-step SDXL run at 1024².
    pub(super) fn large(&mut self) -> Result<()> {
        use diffuse_models::embeddings::TimeConditioning;
        use diffuse_models::UNetConditioning;
        let dev = self.device.clone();
        let xl = self
            .args
            .configs
            .join("stabilityai_stable_diffusion_xl_base_1_0");
        if self.wanted_large("unet sdxl step") {
            let cfg: UNet2DConditionConfig = read_config(&xl.join("unet/config.json"))?;
            let unet = UNet2DConditionModel::new(self.vb(), &cfg)?;
            let lat = self.randn((2, 4, 128, 128))?;
            let ctx = self.randn((2, 77, 2048))?;
            let pooled = self.randn((2, 1280))?;
            let ids = [1024f32, 1024., 0., 0., 1024., 1024.];
            let time_ids =
                Tensor::from_vec([ids, ids].concat(), (2, 6), &dev)?.to_dtype(self.dtype)?;
            let t = Tensor::new(&[999f32, 999.0], &dev)?;
            let cond = UNetConditioning {
                time: TimeConditioning {
                    text_time: Some((&pooled, &time_ids)),
                    ..Default::default()
                },
                control: None,
            };
            self.time("unet sdxl step", None, || {
                Ok(unet.forward_with(&lat, &t, &ctx, &cond)?)
            })?;
        }
        let decode =
            |b: &mut Self, name: &str, dir: &Path, side: usize, tiled: bool| -> Result<()> {
                let cfg: AutoencoderKLConfig = read_config(&dir.join("vae/config.json"))?;
                let mut vae = AutoencoderKL::new(b.vb(), &cfg)?;
                if tiled {
                    vae.enable_tiling();
                }
                let z = b.randn((1, 4, side / 8, side / 8))?;
                b.time(name, None, || Ok(vae.decode(&z)?))
            };
        if self.wanted_large("vae sdxl decode 1024") {
            decode(self, "vae sdxl decode 1024", &xl, 1024, false)?;
        }
        if self.wanted_large("vae sd15 tiled decode 2048") {
            let sd = self.args.configs.join("runwayml_stable_diffusion_v1_5");
            decode(self, "vae sd15 tiled decode 2048", &sd, 2048, true)?;
        }
        if self.wanted_large(TURBO) {
            // SDXL-Turbo's use: one step of EulerAncestral with trailing spacing, no guidance.
            self.sdxl_pipeline(&xl, TURBO, "tiny_sdxl_turbo", 512, 1, 0.0)?;
        }
        if self.wanted_large(SDXL_1024) {
            // SDXL base's defaults: EulerDiscrete, guidance 5.
            self.sdxl_pipeline(&xl, SDXL_1024, "tiny_sdxl", 1024, 20, 5.0)?;
        }
        Ok(())
    }

    /// A whole text-to-image run on the real SDXL architecture with random weights, both text
    /// encoders and the decode included, with the scheduler of the fixture pipeline `sched`.
    fn sdxl_pipeline(
        &mut self,
        xl: &Path,
        name: &str,
        sched: &str,
        side: usize,
        steps: usize,
        guidance_scale: f64,
    ) -> Result<()> {
        use diffuse_models::clip_text::ClipTextModelWithProjection;
        use diffuse_models::clip_tokenizer::ClipTokenizer;
        use diffuse_pipelines::{
            GenerationParams, SdxlOptions, StableDiffusionXLPipeline, Text2ImageRequest,
        };
        let dev = self.device.clone();
        let tiny = repo_path("fixtures/cases/_models");
        let sched = diffuse_schedulers::SchedulerConfig::from_file(
            &tiny.join(sched).join("scheduler/scheduler_config.json"),
        )?;
        let clip = |name: &str| -> Result<ClipTextConfig> {
            Ok(read_config(&xl.join(name).join("config.json"))?)
        };
        let vae_cfg: AutoencoderKLConfig = read_config(&xl.join("vae/config.json"))?;
        let vae_dtype = vae_dtype(self.dtype, &vae_cfg);
        let pipe = StableDiffusionXLPipeline {
            class_name: "StableDiffusionXLPipeline".into(),
            unet: UNet2DConditionModel::new(
                self.vb(),
                &read_config(&xl.join("unet/config.json"))?,
            )?,
            vae: AutoencoderKL::new(random_vb_dtype(&dev, vae_dtype), &vae_cfg)?,
            text_encoder: Some(ClipTextModel::new(self.vb(), &clip("text_encoder")?)?),
            tokenizer: Some(ClipTokenizer::from_dir(&tiny.join("tiny_sdxl/tokenizer"))?),
            text_encoder_2: ClipTextModelWithProjection::new(self.vb(), &clip("text_encoder_2")?)?,
            tokenizer_2: ClipTokenizer::from_dir(&tiny.join("tiny_sdxl/tokenizer_2"))?,
            scheduler: diffuse_schedulers::from_own_config(&sched)?,
            device: dev.clone(),
            dtype: self.dtype,
            vae_dtype,
            force_zeros_for_empty_prompt: true,
            requires_aesthetics_score: false,
            multi_vector_tokens: Vec::new(),
        };
        let req = Text2ImageRequest {
            params: GenerationParams {
                prompts: vec!["a photograph of an astronaut riding a horse".into()],
                steps,
                guidance_scale,
                seed: 0,
                ..Default::default()
            },
            height: Some(side),
            width: Some(side),
            latents: None,
        };
        let opts = SdxlOptions::default();
        self.time(name, None, || {
            let out = pipe.text_to_image(&req, &opts, None)?;
            let t = &out.timings;
            println!(
                "    text encode {:.1} s, denoise {:.1} s, decode {:.1} s",
                t.text_encode.as_secs_f64(),
                t.denoise.as_secs_f64(),
                t.decode.as_secs_f64()
            );
            Ok(out.images)
        })
    }
}
