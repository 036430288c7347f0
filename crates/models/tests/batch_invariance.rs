//! An image comes out of the CPU kernels the same, bit for bit, whatever batch it is in: the
//! convolution and linear paths are chosen by the size of one image, not of the batch, so that
//! processes sharing a batch (`mpirun -np N diffuse generate`) write the files one process
//! writes. Each layer runs on a batch and on its first image alone; the ResNet and transformer
//! blocks, which run once for the equal halves of a guided batch, on each of two samples alone.

use candle_core::{Device, Module, Tensor};
use diffuse_core::Generator;
use diffuse_models::ops::{conv::Conv2d, linear::Linear};

fn first_image(t: &Tensor) -> Vec<f32> {
    t.narrow(0, 0, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn convolutions_give_an_image_the_same_values_in_any_batch() {
    let dev = Device::Cpu;
    let mut g = Generator::manual_seed(1);
    // Maps of 1 (im2col), 4 (im2col; Winograd by the batch's 12 tiles before), 16 (Winograd
    // with kernels transformed whole; per block with many channels, by wider tasks in a
    // batch of 80 tiles) and 256 tiles (Winograd with cached kernels), 3×3 stride 1 and 2,
    // and 1×1; batches of 3, and of 9 (an image per task on two cores, as this test runs them
    // on any machine).
    let two_cores = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for (c, hw, n) in [
        (16usize, 4usize, 3usize),
        (16, 8, 3),
        (16, 8, 9),
        (16, 16, 3),
        (130, 16, 3),
        (130, 16, 5),
        (8, 64, 3),
        (8, 16, 9),
    ] {
        for (k, stride, pad) in [(3usize, 1usize, 1usize), (3, 2, 1), (1, 1, 0)] {
            let w = g.randn((c, c, k, k), &dev).unwrap();
            let b = g.randn(c, &dev).unwrap();
            let cfg = candle_nn::Conv2dConfig {
                padding: pad,
                stride,
                ..Default::default()
            };
            let conv = Conv2d::from_candle(candle_nn::Conv2d::new(w, Some(b), cfg));
            let x = g.randn((n, c, hw, hw), &dev).unwrap();
            // Twice: the cached-kernel path caches from a layer's second call.
            for _ in 0..2 {
                let (alone, batch) = two_cores.install(|| {
                    let alone = conv.forward(&x.narrow(0, 0, 1).unwrap()).unwrap();
                    (alone, conv.forward(&x).unwrap())
                });
                assert_eq!(
                    first_image(&alone),
                    first_image(&batch),
                    "{c} channels {hw}×{hw}, {k}×{k} stride {stride}, batch {n}"
                );
            }
        }
    }
}

#[test]
fn linear_layers_give_a_row_the_same_values_in_any_batch() {
    let dev = Device::Cpu;
    let mut g = Generator::manual_seed(2);
    // Row counts on both sides of the transposed (≤ 512 rows in f32) and packed-weight products.
    for (m, k, n) in [
        (1usize, 32usize, 40usize),
        (2, 32, 128),
        (150, 64, 48),
        (200, 64, 64),
    ] {
        let l = Linear::new(
            g.randn((n, k), &dev).unwrap(),
            Some(g.randn(n, &dev).unwrap()),
        );
        let x = g.randn((3 * m, k), &dev).unwrap();
        let alone = l.forward(&x.narrow(0, 0, m).unwrap()).unwrap();
        let batch = l.forward(&x).unwrap();
        assert_eq!(
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            batch
                .narrow(0, 0, m)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            "{m} of {} rows, {k} → {n}",
            3 * m
        );
    }
}

/// Plain random tensors (not variables, so that the layers take their inference paths) of
/// these names and shapes.
fn random_weights(
    specs: &[(String, Vec<usize>)],
    g: &mut Generator,
) -> candle_nn::VarBuilder<'static> {
    let dev = Device::Cpu;
    let ws = specs
        .iter()
        .map(|(name, shape)| {
            (
                name.clone(),
                (g.randn(&shape[..], &dev).unwrap() * 0.2).unwrap(),
            )
        })
        .collect();
    candle_nn::VarBuilder::from_tensors(ws, candle_core::DType::F32, &dev)
}

/// `forward` on a batch of two samples `[first, second]` (and per-sample side inputs `i`)
/// gives each sample what it gets alone, bit for bit.
fn each_sample_as_alone(
    what: &str,
    first: &Tensor,
    second: &Tensor,
    forward: impl Fn(&Tensor, Option<usize>) -> Tensor,
) {
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let got = forward(&Tensor::cat(&[first, second], 0).unwrap(), None);
    for (i, sample) in [first, second].into_iter().enumerate() {
        assert_eq!(
            values(&got.narrow(0, i, 1).unwrap()),
            values(&forward(sample, Some(i))),
            "{what}: sample {i}"
        );
    }
}

/// A guided batch repeats its latents: the transformer block then runs its self-attention on
/// one half only and gives it to both. Each sample must still get what it gets alone, bit for
/// bit, with the halves equal (the shortcut) and with them different (no shortcut), while
/// the cross-attention reads each half's own text.
#[test]
fn transformer_blocks_give_each_sample_its_own_values_with_repeated_halves() {
    use diffuse_models::attention::BasicTransformerBlock;
    let dev = Device::Cpu;
    let mut g = Generator::manual_seed(3);
    let (dim, heads, dim_head, ctx_dim) = (64, 2, 32, 24);
    let mut specs = vec![];
    for norm in ["norm1", "norm2", "norm3"] {
        specs.push((format!("{norm}.weight"), vec![dim]));
        specs.push((format!("{norm}.bias"), vec![dim]));
    }
    for (attn, kv) in [("attn1", dim), ("attn2", ctx_dim)] {
        specs.push((format!("{attn}.to_q.weight"), vec![dim, dim]));
        specs.push((format!("{attn}.to_k.weight"), vec![dim, kv]));
        specs.push((format!("{attn}.to_v.weight"), vec![dim, kv]));
        specs.push((format!("{attn}.to_out.0.weight"), vec![dim, dim]));
        specs.push((format!("{attn}.to_out.0.bias"), vec![dim]));
    }
    specs.push(("ff.net.0.proj.weight".into(), vec![8 * dim, dim]));
    specs.push(("ff.net.0.proj.bias".into(), vec![8 * dim]));
    specs.push(("ff.net.2.weight".into(), vec![dim, 4 * dim]));
    specs.push(("ff.net.2.bias".into(), vec![dim]));
    let vb = random_weights(&specs, &mut g);
    let block =
        BasicTransformerBlock::new(vb, dim, heads, dim_head, Some(ctx_dim), false, false).unwrap();
    let x = g.randn((1, 300, dim), &dev).unwrap();
    let y = g.randn((1, 300, dim), &dev).unwrap();
    let ctx = g.randn((2, 7, ctx_dim), &dev).unwrap();
    // The shortcut is taken: the self-attention over 300 keys runs on one sample's two heads.
    // (No other test of this file runs an attention, so the global profile holds only this.)
    diffuse_models::profile::enable(true);
    block
        .forward(&Tensor::cat(&[&x, &x], 0).unwrap(), Some(&ctx))
        .unwrap();
    let rows = diffuse_models::profile::take();
    diffuse_models::profile::enable(false);
    let selfs: Vec<&str> = rows
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| name.starts_with("attention") && name.ends_with("over 300 keys"))
        .collect();
    assert_eq!(selfs, ["attention 2x300x32 over 300 keys"], "{rows:?}");
    for (what, second) in [("equal halves", &x), ("different halves", &y)] {
        each_sample_as_alone(what, &x, second, |s, i| {
            let ctx = i.map_or(ctx.clone(), |i| ctx.narrow(0, i, 1).unwrap());
            block.forward(s, Some(&ctx)).unwrap()
        });
    }
}

/// The same for a ResNet block: the shortcut takes equal images with equal time embeddings
/// only (SDXL's guided halves differ in theirs, which carry the pooled text).
#[test]
fn resnet_blocks_give_each_sample_its_own_values_with_repeated_halves() {
    use diffuse_models::activations::Activation;
    use diffuse_models::resnet::{ResnetBlock2D, ResnetBlock2DConfig};
    let dev = Device::Cpu;
    let mut g = Generator::manual_seed(4);
    let (c, t) = (32, 16);
    let mut specs = vec![];
    for (name, shape) in [
        ("norm1", vec![c]),
        ("norm2", vec![c]),
        ("conv1", vec![c, c, 3, 3]),
        ("conv2", vec![c, c, 3, 3]),
        ("time_emb_proj", vec![c, t]),
    ] {
        specs.push((format!("{name}.weight"), shape));
        specs.push((format!("{name}.bias"), vec![c]));
    }
    let cfg = ResnetBlock2DConfig::new(c, c, Some(t), 8, 1e-5, Activation::Silu);
    let block = ResnetBlock2D::new(random_weights(&specs, &mut g), &cfg).unwrap();
    let x = g.randn((1, c, 12, 10), &dev).unwrap();
    let y = g.randn((1, c, 12, 10), &dev).unwrap();
    let same_t = g.randn((1, t), &dev).unwrap();
    let other_t = g.randn((1, t), &dev).unwrap();
    for (what, second, t2) in [
        ("equal halves", &x, &same_t),
        ("different images", &y, &same_t),
        ("different time embeddings", &x, &other_t),
    ] {
        let temb = Tensor::cat(&[&same_t, t2], 0).unwrap();
        each_sample_as_alone(what, &x, second, |s, i| {
            let temb = i.map_or(temb.clone(), |i| temb.narrow(0, i, 1).unwrap());
            block.forward(s, Some(&temb)).unwrap()
        });
    }
}
