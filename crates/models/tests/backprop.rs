//! The gradient accumulation of the patched candle-core (vendor/README.md): a tensor's first
//! gradient contribution is stored as is, later ones are added, and stored gradients are
//! contiguous even when the contribution was a view.

use anyhow::Result;
use candle_core::{Device, Tensor, Var};

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// `x` reaches the loss through nearest upsampling (each pixel counted 4 times) and through
/// `3 x`; its gradient is 7 whichever branch the backward pass visits last. Upstream's
/// upsampling backward overwrote the gradient, so one order gave 4.
#[test]
fn every_consumer_contributes_to_the_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::new(&[[[[1f32, 2.], [3., 4.]]]], &dev)?;
    let up = || -> Result<Tensor> { Ok(x.upsample_nearest2d(4, 4)?.sum_all()?) };
    let lin = || -> Result<Tensor> { Ok((x.as_tensor() * 3.0)?.sum_all()?) };
    for (name, loss) in [
        ("up + lin", (up()? + lin()?)?),
        ("lin + up", (lin()? + up()?)?),
    ] {
        let grads = loss.backward()?;
        let g = grads.get(&x).expect("x has a gradient");
        assert_eq!(values(g)?, vec![7.0; 4], "{name}");
    }
    Ok(())
}

/// A gradient that arrives as a view (the transpose's backward transposes the incoming
/// gradient back) is stored contiguous, and one reached twice is the sum of both.
#[test]
fn stored_gradients_are_contiguous_sums() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev)?;
    let w = Tensor::new(&[[1f32, 10.], [100., 1000.], [1e4, 1e5]], &dev)?;
    // d/dx sum(xᵀ ⊙ w) = wᵀ
    let loss = (x.t()? * &w)?.sum_all()?;
    let grads = loss.backward()?;
    let g = grads.get(&x).expect("x has a gradient");
    assert!(g.is_contiguous() && g.layout().start_offset() == 0);
    assert_eq!(values(g)?, values(&w.t()?.contiguous()?)?);

    // x used twice: 2 x² summed has gradient 4 x.
    let loss = ((x.as_tensor() * x.as_tensor())? + x.as_tensor().sqr()?)?.sum_all()?;
    let g = loss.backward()?.get(&x).expect("x has a gradient").clone();
    let want: Vec<f32> = values(x.as_tensor())?.iter().map(|v| 4.0 * v).collect();
    assert_eq!(values(&g)?, want);
    Ok(())
}
