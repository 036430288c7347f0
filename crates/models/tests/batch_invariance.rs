//! An image comes out of the CPU kernels the same, bit for bit, whatever batch it is in: the
//! convolution and linear paths are chosen by the size of one image, not of the batch, so that
//! processes sharing a batch (`mpirun -np N diffuse generate`) write the files one process
//! writes. Each layer runs on a batch and on its first image alone.

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
    // with kernels transformed whole; per block with many channels) and 256 tiles (Winograd
    // with cached kernels), 3×3 stride 1 and 2, and 1×1; batches of 3, and of 9 (an image per
    // task on two cores, as this test runs them on any machine).
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

/// A guided batch repeats its latents: the transformer block then runs its self-attention on
/// one half only and gives it to both. Each sample must still get what it gets alone, bit for
/// bit, with the halves equal (the shortcut) and with them different (no shortcut), while
/// the cross-attention reads each half's own text.
#[test]
fn transformer_blocks_give_each_sample_its_own_values_with_repeated_halves() {
    use candle_nn::VarBuilder;
    use diffuse_models::attention::BasicTransformerBlock;
    let dev = Device::Cpu;
    let mut g = Generator::manual_seed(3);
    let (dim, heads, dim_head, ctx_dim) = (64, 2, 32, 24);
    let mut ws = std::collections::HashMap::new();
    let mut add = |name: &str, shape: &[usize], g: &mut Generator| {
        let t = (g.randn(shape, &dev).unwrap() * 0.2).unwrap();
        ws.insert(name.to_string(), t);
    };
    for norm in ["norm1", "norm2", "norm3"] {
        add(&format!("{norm}.weight"), &[dim], &mut g);
        add(&format!("{norm}.bias"), &[dim], &mut g);
    }
    for (attn, kv) in [("attn1", dim), ("attn2", ctx_dim)] {
        add(&format!("{attn}.to_q.weight"), &[dim, dim], &mut g);
        add(&format!("{attn}.to_k.weight"), &[dim, kv], &mut g);
        add(&format!("{attn}.to_v.weight"), &[dim, kv], &mut g);
        add(&format!("{attn}.to_out.0.weight"), &[dim, dim], &mut g);
        add(&format!("{attn}.to_out.0.bias"), &[dim], &mut g);
    }
    add("ff.net.0.proj.weight", &[8 * dim, dim], &mut g);
    add("ff.net.0.proj.bias", &[8 * dim], &mut g);
    add("ff.net.2.weight", &[dim, 4 * dim], &mut g);
    add("ff.net.2.bias", &[dim], &mut g);
    let vb = VarBuilder::from_tensors(ws, candle_core::DType::F32, &dev);
    let block =
        BasicTransformerBlock::new(vb, dim, heads, dim_head, Some(ctx_dim), false, false).unwrap();
    let tokens = 300;
    let (x, y) = (
        g.randn((1, tokens, dim), &dev).unwrap(),
        g.randn((1, tokens, dim), &dev).unwrap(),
    );
    let ctx = g.randn((2, 7, ctx_dim), &dev).unwrap();
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let alone = |s: &Tensor, i: usize| {
        values(
            &block
                .forward(s, Some(&ctx.narrow(0, i, 1).unwrap()))
                .unwrap(),
        )
    };
    for (name, second) in [("equal", &x), ("different", &y)] {
        let batch = Tensor::cat(&[&x, second], 0).unwrap();
        let got = block.forward(&batch, Some(&ctx)).unwrap();
        assert_eq!(
            values(&got.narrow(0, 0, 1).unwrap()),
            alone(&x, 0),
            "{name} halves: first sample"
        );
        assert_eq!(
            values(&got.narrow(0, 1, 1).unwrap()),
            alone(second, 1),
            "{name} halves: second sample"
        );
    }
}
