//! `diffuse bench --train --profile`: the training line and its profile, with rows for the
//! forward layers and for the backward passes (each convolution's `dx` and `dw` apart).

mod common;
use common::diffuse;

#[test]
fn train_line_profiles_forward_and_backward_passes() {
    let (ok, out, err) = diffuse(&[
        "bench",
        "--train",
        "--only",
        "train",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--profile",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("train fmnist step 64"), "{out}");
    for row in [
        "conv3x3/1 winograd 32->32 32x32",
        "conv3x3/1 dx winograd 32->32 32x32",
        "conv3x3/1 dw 32->32 32x32",
        "group-norm backward",
        "flash-attention backward",
        "other",
    ] {
        assert!(out.contains(row), "no {row:?} row in\n{out}");
    }
    // The timed rows fit in the step: "other", the time no row took, is not negative.
    let listed: f64 = out
        .lines()
        .filter(|l| l.starts_with("    ") && !l.trim_start().starts_with("other"))
        .filter_map(|l| l.split_whitespace().find(|w| w.ends_with('%')))
        .map(|w| w.trim_end_matches('%').parse::<f64>().unwrap())
        .sum();
    assert!(
        listed > 50.0 && listed <= 100.5,
        "the rows take {listed}% of the step:\n{out}"
    );
}
