//! Times the forward and backward passes of the UNet's CPU ops at Fashion-MNIST training sizes
//! (batch 64, 32×32), to see where a training step goes.

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use diffuse_models::activations::Activation;
use diffuse_models::normalization::GroupNorm;
use diffuse_models::ops::conv::Conv2d;

fn time(what: &str, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<()> {
    f()?; // warm-up
    let reps = 3;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    println!(
        "{what:40} {:8.1} ms",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
    Ok(())
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let n = 64;
    for (c, hw) in [(32, 32), (64, 16), (64, 8)] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = Conv2d::new(c, c, 3, cfg, vb.pp("conv"))?;
        let gn = GroupNorm::new(vb.pp("gn"), 32, c, 1e-5)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev)?)?;
        let tag = format!("{c}ch {hw}x{hw}");
        time(&format!("conv fwd {tag}"), || conv.forward(&x).map(|_| ()))?;
        time(&format!("conv fwd+bwd {tag}"), || {
            conv.forward(&x)?.sqr()?.sum_all()?.backward().map(|_| ())
        })?;
        time(&format!("candle conv fwd+bwd {tag}"), || {
            conv.forward_reference(&x)?
                .sqr()?
                .sum_all()?
                .backward()
                .map(|_| ())
        })?;
        time(&format!("groupnorm+silu fwd {tag}"), || {
            gn.forward_act(&x, Activation::Silu).map(|_| ())
        })?;
        time(&format!("groupnorm+silu fwd+bwd {tag}"), || {
            gn.forward_act(&x, Activation::Silu)?
                .sqr()?
                .sum_all()?
                .backward()
                .map(|_| ())
        })?;
        time(&format!("sum over (0, 2, 3) {tag}"), || {
            x.sum((0, 2, 3)).map(|_| ())
        })?;
        time(&format!("add {tag}"), || {
            (x.as_tensor() + x.as_tensor()).map(|_| ())
        })?;
        time(&format!("sqr+sum fwd+bwd {tag}"), || {
            x.sqr()?.sum_all()?.backward().map(|_| ())
        })?;
    }
    Ok(())
}
