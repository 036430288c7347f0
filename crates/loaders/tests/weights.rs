//! Loading checks on small safetensors files written by the tests.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use diffuse_core::Error;
use diffuse_loaders::{component_weight_files, load_model, read_config, save_safetensors};

/// A fresh, empty folder under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let d = std::env::temp_dir().join(format!(
        "diffuse-loaders-{tag}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn save(dir: &std::path::Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let p = dir.join(name);
    save_safetensors(&map, &p).unwrap();
    p
}

fn arange(n: usize, shape: &[usize]) -> Tensor {
    Tensor::arange(0f32, n as f32, &Device::Cpu)
        .unwrap()
        .reshape(shape)
        .unwrap()
}

/// A toy model: a (3, 2) weight, a (3,) bias and a (4,) scale.
struct Toy {
    w: Tensor,
    b: Tensor,
    scale: Tensor,
}

fn build_toy(vb: VarBuilder) -> candle_core::Result<Toy> {
    Ok(Toy {
        w: vb.get((3, 2), "layer.weight")?,
        b: vb.get(3, "layer.bias")?,
        scale: vb.get(4, "norm.scale")?,
    })
}

#[test]
fn exact_weights_load_and_match() -> Result<()> {
    let dir = temp_dir("exact");
    let f = save(
        &dir,
        "model.safetensors",
        &[
            ("layer.weight", arange(6, &[3, 2])),
            ("layer.bias", arange(3, &[3])),
            ("norm.scale", arange(4, &[4])),
            // A buffer transformers stores: never reported as unexpected.
            (
                "embeddings.position_ids",
                arange(4, &[1, 4]).to_dtype(DType::I64)?,
            ),
        ],
    );
    let toy = load_model(&[f], DType::F32, &Device::Cpu, build_toy)?;
    assert_eq!(
        toy.w.to_vec2::<f32>()?,
        vec![vec![0., 1.], vec![2., 3.], vec![4., 5.]]
    );
    assert_eq!(toy.b.to_vec1::<f32>()?, vec![0., 1., 2.]);
    assert_eq!(toy.scale.to_vec1::<f32>()?, vec![0., 1., 2., 3.]);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn missing_misshaped_and_unexpected_in_one_error() -> Result<()> {
    let dir = temp_dir("mismatch");
    let f = save(
        &dir,
        "model.safetensors",
        &[
            // norm.scale missing
            ("layer.weight", arange(6, &[2, 3])), // mis-shaped
            ("layer.bias", arange(3, &[3])),
            ("extra.thing", arange(5, &[5])), // unexpected
        ],
    );
    let err = match load_model(
        std::slice::from_ref(&f),
        DType::F32,
        &Device::Cpu,
        build_toy,
    ) {
        Err(Error::Weights(m)) => m,
        Err(e) => panic!("expected Error::Weights, got {e}"),
        Ok(_) => panic!("mismatching weights were accepted"),
    };
    assert!(err.contains("missing: `norm.scale`"), "{err}");
    assert!(err.contains("[4]"), "{err}");
    assert!(err.contains("mis-shaped: `layer.weight`"), "{err}");
    assert!(
        err.contains("model expects [3, 2], file has [2, 3]"),
        "{err}"
    );
    assert!(err.contains("unexpected: `extra.thing`"), "{err}");
    assert!(!err.contains("layer.bias"), "{err}");
    assert!(err.contains(&f.display().to_string()), "{err}");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn truncated_and_corrupt_files_are_refused() -> Result<()> {
    let dir = temp_dir("truncated");
    let f = save(
        &dir,
        "model.safetensors",
        &[
            ("layer.weight", arange(6, &[3, 2])),
            ("layer.bias", arange(3, &[3])),
            ("norm.scale", arange(4, &[4])),
        ],
    );
    let bytes = std::fs::read(&f)?;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("cut.safetensors", bytes[..bytes.len() - 5].to_vec()),
        ("header_only.safetensors", bytes[..20].to_vec()),
        ("empty.safetensors", vec![]),
        (
            "garbage.safetensors",
            b"this is not a safetensors file at all".to_vec(),
        ),
        ("huge_header.safetensors", {
            let mut v = u64::MAX.to_le_bytes().to_vec();
            v.extend_from_slice(b"{}");
            v
        }),
    ];
    for (name, data) in cases {
        let p = dir.join(name);
        std::fs::write(&p, data)?;
        match load_model(
            std::slice::from_ref(&p),
            DType::F32,
            &Device::Cpu,
            build_toy,
        ) {
            Err(Error::Weights(m)) => assert!(m.contains(name), "{name}: {m}"),
            Err(e) => panic!("{name}: expected Error::Weights, got {e}"),
            Ok(_) => panic!("{name}: a corrupt file was accepted"),
        }
    }
    match load_model(
        &[dir.join("absent.safetensors")],
        DType::F32,
        &Device::Cpu,
        build_toy,
    ) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("absent.safetensors")),
        Err(e) => panic!("expected Error::Io, got {e}"),
        Ok(_) => panic!("a missing file was accepted"),
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn f16_file_loads_into_f32_and_back() -> Result<()> {
    let dir = temp_dir("f16");
    let w = Tensor::new(
        &[[0.5f32, -1.25], [3.0, 1e-3], [65504.0, -0.0]],
        &Device::Cpu,
    )?;
    let f = save(
        &dir,
        "model.fp16.safetensors",
        &[
            ("layer.weight", w.to_dtype(DType::F16)?),
            ("layer.bias", arange(3, &[3]).to_dtype(DType::BF16)?),
            ("norm.scale", arange(4, &[4]).to_dtype(DType::F16)?),
        ],
    );
    let toy = load_model(
        std::slice::from_ref(&f),
        DType::F32,
        &Device::Cpu,
        build_toy,
    )?;
    assert_eq!(toy.w.dtype(), DType::F32);
    assert_eq!(toy.b.dtype(), DType::F32);
    let expect = w.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
    assert_eq!(toy.w.to_vec2::<f32>()?, expect.to_vec2::<f32>()?);
    assert_eq!(toy.b.to_vec1::<f32>()?, vec![0., 1., 2.]);
    // And an f32 file into f16 compute.
    let f32_file = save(
        &dir,
        "model.safetensors",
        &[
            ("layer.weight", w.clone()),
            ("layer.bias", arange(3, &[3])),
            ("norm.scale", arange(4, &[4])),
        ],
    );
    let toy16 = load_model(&[f32_file], DType::F16, &Device::Cpu, build_toy)?;
    assert_eq!(toy16.w.dtype(), DType::F16);
    assert_eq!(
        toy16.w.to_dtype(DType::F32)?.to_vec2::<f32>()?,
        expect.to_vec2::<f32>()?
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn legacy_vae_attention_names_and_conv_shapes() -> Result<()> {
    let dir = temp_dir("legacy");
    let c = 3;
    let f = save(
        &dir,
        "diffusion_pytorch_model.safetensors",
        &[
            ("mid.attentions.0.query.weight", arange(9, &[c, c, 1, 1])),
            ("mid.attentions.0.query.bias", arange(3, &[c])),
            ("mid.attentions.0.key.weight", arange(9, &[c, c])),
            ("mid.attentions.0.value.weight", arange(9, &[c, c])),
            (
                "mid.attentions.0.proj_attn.weight",
                arange(9, &[c, c, 1, 1]),
            ),
        ],
    );
    let build = |vb: VarBuilder| -> candle_core::Result<Vec<Tensor>> {
        let a = vb.pp("mid.attentions.0");
        Ok(vec![
            a.get((c, c), "to_q.weight")?,
            a.get(c, "to_q.bias")?,
            a.get((c, c), "to_k.weight")?,
            a.get((c, c), "to_v.weight")?,
            a.get((c, c), "to_out.0.weight")?,
        ])
    };
    let ts = load_model(&[f], DType::F32, &Device::Cpu, build)?;
    assert_eq!(ts[0].dims(), &[c, c]);
    assert_eq!(ts[0].to_vec2::<f32>()?[1], vec![3., 4., 5.]);
    assert_eq!(ts[4].dims(), &[c, c]);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn clip_prefix_either_way() -> Result<()> {
    let dir = temp_dir("clip");
    let without = save(
        &dir,
        "a.safetensors",
        &[("encoder.layers.0.mlp.fc1.bias", arange(3, &[3]))],
    );
    let with = save(
        &dir,
        "b.safetensors",
        &[("text_model.encoder.layers.0.mlp.fc1.bias", arange(3, &[3]))],
    );
    for f in [without, with] {
        let t = load_model(&[f], DType::F32, &Device::Cpu, |vb| {
            vb.get(3, "text_model.encoder.layers.0.mlp.fc1.bias")
        })?;
        assert_eq!(t.to_vec1::<f32>()?, vec![0., 1., 2.]);
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// T5's token embedding is read from `shared.weight`, from its tied copy
/// `encoder.embed_tokens.weight` when a file has only that, and a file with both does not
/// report the copy as unexpected.
#[test]
fn t5_tied_embedding_either_name_or_both() -> Result<()> {
    let dir = temp_dir("t5");
    let shared = ("shared.weight", arange(6, &[3, 2]));
    let copy = ("encoder.embed_tokens.weight", arange(6, &[3, 2]));
    let files = [
        save(&dir, "shared.safetensors", std::slice::from_ref(&shared)),
        save(&dir, "copy.safetensors", std::slice::from_ref(&copy)),
        save(&dir, "both.safetensors", &[shared, copy]),
    ];
    for f in files {
        let t = load_model(std::slice::from_ref(&f), DType::F32, &Device::Cpu, |vb| {
            vb.get((3, 2), "shared.weight")
        })
        .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        assert_eq!(
            t.flatten_all()?.to_vec1::<f32>()?,
            vec![0., 1., 2., 3., 4., 5.]
        );
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn finds_component_weight_files() -> Result<()> {
    let dir = temp_dir("component");
    let t = [("x", arange(2, &[2]))];
    // Nothing there yet: the error names the folder.
    match component_weight_files(&dir, None) {
        Err(Error::Weights(m)) => assert!(m.contains(&dir.display().to_string()), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
    std::fs::write(dir.join("pytorch_model.bin"), b"x")?;
    match component_weight_files(&dir, None) {
        Err(Error::Weights(m)) => assert!(m.contains("pytorch_model.bin"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
    save(&dir, "diffusion_pytorch_model.safetensors", &t);
    save(&dir, "diffusion_pytorch_model.fp16.safetensors", &t);
    assert_eq!(
        component_weight_files(&dir, None)?,
        vec![dir.join("diffusion_pytorch_model.safetensors")]
    );
    assert_eq!(
        component_weight_files(&dir, Some("fp16"))?,
        vec![dir.join("diffusion_pytorch_model.fp16.safetensors")]
    );
    assert!(component_weight_files(&dir, Some("bf16")).is_err());

    // Sharded checkpoint.
    let sharded = temp_dir("sharded");
    save(
        &sharded,
        "model-00001-of-00002.safetensors",
        &[("a", arange(2, &[2]))],
    );
    save(
        &sharded,
        "model-00002-of-00002.safetensors",
        &[("b", arange(3, &[3]))],
    );
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        r#"{"metadata": {"total_size": 20}, "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
            "c": "model-00001-of-00002.safetensors"}}"#,
    )?;
    let files = component_weight_files(&sharded, None)?;
    assert_eq!(
        files,
        vec![
            sharded.join("model-00001-of-00002.safetensors"),
            sharded.join("model-00002-of-00002.safetensors")
        ]
    );
    let (a, b) = load_model(&files, DType::F32, &Device::Cpu, |vb| {
        Ok((vb.get(2, "a")?, vb.get(3, "b")?))
    })?;
    assert_eq!(a.to_vec1::<f32>()?, vec![0., 1.]);
    assert_eq!(b.to_vec1::<f32>()?, vec![0., 1., 2.]);

    // An index naming a shard that is not there.
    std::fs::remove_file(sharded.join("model-00002-of-00002.safetensors"))?;
    match component_weight_files(&sharded, None) {
        Err(Error::Weights(m)) => assert!(m.contains("model-00002-of-00002.safetensors"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
    std::fs::remove_dir_all(dir)?;
    std::fs::remove_dir_all(sharded)?;
    Ok(())
}

#[test]
fn save_is_atomic_and_round_trips() -> Result<()> {
    let dir = temp_dir("save");
    let p = save(&dir, "w.safetensors", &[("x", arange(4, &[2, 2]))]);
    // Overwrite in place.
    let p2 = save(&dir, "w.safetensors", &[("x", arange(6, &[3, 2]))]);
    assert_eq!(p, p2);
    let names: Vec<String> = std::fs::read_dir(&dir)?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["w.safetensors".to_string()],
        "temp files left behind"
    );
    let back = candle_core::safetensors::load(&p, &Device::Cpu)?;
    assert_eq!(back["x"].dims(), &[3, 2]);
    // A folder that does not exist: an Io error, no panic.
    let bad = dir.join("no/such/dir/w.safetensors");
    let map: HashMap<String, Tensor> = [("x".to_string(), arange(2, &[2]))].into();
    assert!(save_safetensors(&map, &bad).is_err());
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct UnetLike {
    in_channels: usize,
    block_out_channels: Vec<usize>,
    act_fn: String,
}

#[test]
fn config_errors_name_the_field() -> Result<()> {
    let dir = temp_dir("config");
    let p = dir.join("config.json");
    std::fs::write(
        &p,
        r#"{"_class_name": "UNet2DModel", "in_channels": 3,
            "block_out_channels": [32, 64, "128"], "act_fn": "silu"}"#,
    )?;
    match read_config::<UnetLike>(&p) {
        Err(Error::Config {
            context,
            field,
            message,
        }) => {
            assert_eq!(context, p.display().to_string());
            assert_eq!(field, "block_out_channels[2]");
            assert!(message.contains("string"), "{message}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    std::fs::write(
        &p,
        r#"{"in_channels": 3, "block_out_channels": [32], "act_fn": "silu", "new_key": 1}"#,
    )?;
    let cfg: UnetLike = read_config(&p)?;
    assert_eq!(cfg.block_out_channels, vec![32]);
    std::fs::write(&p, r#"{"in_channels": 3, "act_fn": "silu"}"#)?;
    match read_config::<UnetLike>(&p) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "block_out_channels"),
        other => panic!("expected a config error, got {other:?}"),
    }
    match read_config::<UnetLike>(&dir.join("absent.json")) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("absent.json")),
        other => panic!("expected an Io error, got {other:?}"),
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
