//! The denoising loop written out, as in diffusers' "understanding pipelines" guide: the
//! bundled Fashion-MNIST DDPM model (class-conditional, 28×28 in a 32×32 frame) loaded
//! component by component (`UNet2DModel::from_pretrained` on `unet/`, the scheduler of your
//! choice, by diffusers class or A1111 name, on `scheduler/`'s config), noise from the
//! torch-compatible generator, classifier-free guidance by hand.
//!
//! ```text
//! cargo run --release --example custom_loop -- [scheduler] [class] [steps]
//! ```
//!
//! e.g. `custom_loop DDIMScheduler 7 50` (class 7 is "Sneaker"); writes `custom_loop.png`.

use std::path::Path;

use diffuse::core::NoiseSource;
use diffuse::{DType, Device, Generator, ModelMixin, SchedulerConfig, Tensor, UNet2DModel};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scheduler_name = args.first().map_or("DDIMScheduler", String::as_str);
    let class: u32 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(7);
    let steps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(50);
    let guidance = 3.0;

    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fashion-mnist-ddpm");
    let device = &Device::Cpu;
    let unet = UNet2DModel::from_pretrained(&model.join("unet"), DType::F32, device)?;
    let config = SchedulerConfig::from_file(&model.join("scheduler/scheduler_config.json"))?;
    // A diffusers class name or an A1111 one ("DPM++ 2M Karras"), on the folder's config.
    let mut scheduler = diffuse::schedulers::from_name(scheduler_name, &config)?;
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("model_index.json"))?)?;
    let names: Vec<String> = serde_json::from_value(index["_class_names"].clone())?;

    let (h, w) = unet.config().sample_size.map_or((32, 32), |s| s.hw());
    let channels = unet.config().in_channels;
    let mut generator = Generator::manual_seed(0);
    scheduler.set_timesteps(steps)?;
    let mut sample =
        (generator.randn((1, channels, h, w), device)? * scheduler.init_noise_sigma())?;
    // Label `num_classes` is the "no class" embedding the model was trained with.
    let labels = Tensor::new(&[class, names.len() as u32], device)?;
    for &t in scheduler.timesteps().to_vec().iter() {
        let input = scheduler.scale_model_input(&sample, t)?;
        let batch = Tensor::cat(&[&input, &input], 0)?;
        let ts = Tensor::new(&[t as f32, t as f32], device)?;
        let out = unet.forward_with_class(&batch, &ts, Some(&labels))?;
        let (cond, uncond) = (out.get(0)?, out.get(1)?);
        let guided = (&uncond + ((&cond - &uncond)? * guidance)?)?.unsqueeze(0)?;
        sample = scheduler
            .step(&guided, t, &sample, &mut generator as &mut dyn NoiseSource)?
            .prev_sample;
    }
    // [-1, 1] -> 8-bit gray.
    let pixels = ((sample.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let img = image::GrayImage::from_raw(
        w as u32,
        h as u32,
        pixels.iter().map(|&v| v as u8).collect(),
    )
    .expect("size matches");
    img.save("custom_loop.png")?;
    let name = names.get(class as usize).map_or("?", String::as_str);
    println!("custom_loop.png: class {class} ({name}), {scheduler_name}, {steps} steps");
    Ok(())
}
