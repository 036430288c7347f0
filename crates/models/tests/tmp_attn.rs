use candle_core::{Device, Tensor, Var};
#[test]
#[ignore]
fn time_attention() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1., (512, 64, 8), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1., (512, 64, 8), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1., (512, 64, 8), &dev)?)?;
    let w = Tensor::randn(0f32, 1., (512, 64, 8), &dev)?;
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        let mut s = 0.0;
        for _ in 0..10 {
            let o = diffuse_models::attention::scaled_dot_product_attention(&q, &k, &v, 0.35)?;
            let t1 = std::time::Instant::now();
            let g = (o * &w)?.sum_all()?.backward()?;
            s += t1.elapsed().as_secs_f64();
            let _ = g.get(&q).unwrap();
        }
        eprintln!(
            "fwd+bwd {:.2} ms, bwd {:.2} ms",
            t0.elapsed().as_secs_f64() * 100.0,
            s * 100.0
        );
    }
    Ok(())
}
