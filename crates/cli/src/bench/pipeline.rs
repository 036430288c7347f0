//! The `--pipeline` line: one whole SD 1.5 text-to-image run, timed per phase.

use super::*;

impl Bench<'_> {
    /// One full text-to-image run, timed per phase by the pipeline itself.
    pub(super) fn pipeline(&mut self) -> Result<()> {
        use diffuse_pipelines::stable_diffusion::{
            GenerationParams, StableDiffusionPipeline, Text2ImageRequest,
        };
        let dev = self.device.clone();
        let sd = self.args.configs.join("runwayml_stable_diffusion_v1_5");
        let fixtures = repo_path("fixtures");
        let tokenizer =
            diffuse_models::clip_tokenizer::ClipTokenizer::from_dir(&fixtures.join("tokenizer"))?;
        // SD 1.5's own scheduler config (the tiny pipeline carries an exact copy of its keys).
        let sched_cfg = diffuse_schedulers::SchedulerConfig::from_file(
            &fixtures.join("pipelines/tiny_sd/scheduler/scheduler_config.json"),
        )?;
        let vae_cfg: AutoencoderKLConfig = read_config(&sd.join("vae/config.json"))?;
        // In the pipeline's dtype, as diffusers' SD pipeline decodes (only SDXL's upcasts).
        let vae_dtype = self.dtype;
        let pipe = StableDiffusionPipeline {
            class_name: "StableDiffusionPipeline".into(),
            unet: UNet2DConditionModel::new(
                self.vb(),
                &read_config(&sd.join("unet/config.json"))?,
            )?,
            vae: AutoencoderKL::new(random_vb_dtype(&dev, vae_dtype), &vae_cfg)?,
            text_encoder: ClipTextModel::new(
                self.vb(),
                &read_config(&sd.join("text_encoder/config.json"))?,
            )?,
            tokenizer,
            scheduler: diffuse_schedulers::from_own_config(&sched_cfg)?,
            device: dev.clone(),
            dtype: self.dtype,
            vae_dtype,
            multi_vector_tokens: Vec::new(),
        };
        let steps = self.args.pipeline_steps;
        let params = GenerationParams {
            prompts: vec!["a photograph of an astronaut riding a horse".into()],
            steps,
            guidance_scale: 7.5,
            seed: 0,
            ..Default::default()
        };
        let req = Text2ImageRequest {
            params,
            height: Some(512),
            width: Some(512),
            latents: None,
        };
        if let Some(m) = &self.gpu_memory {
            m.reset();
        }
        let t0 = Instant::now();
        let out = pipe.text_to_image(&req, None)?;
        self.device.synchronize()?;
        let total = t0.elapsed().as_secs_f64() * 1000.0;
        let t = &out.timings;
        let rss = self.peak_memory_text();
        let name = pipeline_name(steps);
        println!(
            "{name} {total:>10.1} ms   text encode {:.1} s, denoise {:.1} s, decode {:.1} s   {rss}",
            t.text_encode.as_secs_f64(),
            t.denoise.as_secs_f64(),
            t.decode.as_secs_f64()
        );
        self.lines.push(Line {
            name,
            ms: total,
            gflop: None,
            peak_mib: self.peak_memory_mib(),
        });
        Ok(())
    }
}
