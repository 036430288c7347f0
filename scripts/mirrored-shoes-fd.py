#!/usr/bin/env python3
"""What mirrored shoes cost in Fréchet distance on real Fashion-MNIST images.

Fashion-MNIST's shoes point left; a model trained with random horizontal flips draws them both
ways. This scores 1,000 real training images against the 10,000 test images in the bundled
classifier's 128 features (the same network and FD as `diffuse eval`, rebuilt in PyTorch), as
they are and with half of them (or half of the shoes only) mirrored, and also prints which way
the shoes of the training set face.

    scripts/fetch-data.sh
    python scripts/mirrored-shoes-fd.py     # needs numpy, torch, safetensors (fixtures/generate/requirements.txt)
"""
import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "fashion-mnist"
FOOTWEAR = [5, 7, 9]  # sandal, sneaker, ankle boot


def idx(name):
    return np.frombuffer(gzip.open(DATA / name).read(), np.uint8)


def images(name):
    x = idx(name)[16:].reshape(-1, 1, 28, 28).astype(np.float32) / 127.5 - 1.0
    return F.pad(torch.tensor(x), (2, 2, 2, 2), value=-1.0)  # 32×32 in [-1, 1], as diffuse pads


def features(w, x):
    out = []
    for i in range(0, len(x), 1000):
        h = x[i : i + 1000]
        for j in range(2):
            h = F.conv2d(h, w[f"convs.{j}.weight"], w[f"convs.{j}.bias"], padding=1)
            h = F.max_pool2d(F.relu(h), 2)
        out.append(F.relu(F.linear(h.flatten(1), w["fc.weight"], w["fc.bias"])))
    return torch.cat(out).double().numpy()


def frechet(a, b):
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(s1 s2) from the eigenvalues of s1 s2 (real and non-negative up to rounding).
    ev = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def main():
    x_train, y_train = images("train-images-idx3-ubyte.gz"), idx("train-labels-idx1-ubyte.gz")[8:]
    w = load_file(ROOT / "models" / "fashion-mnist-classifier" / "model.safetensors")
    test = features(w, images("t10k-images-idx3-ubyte.gz"))

    xs = torch.arange(32, dtype=torch.float32)
    for c, name in zip(FOOTWEAR, ["sandals", "sneakers", "ankle boots"]):
        upper = (x_train[torch.tensor(y_train == c), 0, :16, :] + 1).sum(1)  # columns' mass in the upper half
        cx = (upper * xs).sum(1) / upper.sum(1)
        print(f"{name}: {(cx > 15.5).float().mean():.1%} have their upper half's mass right of centre (toe left)")

    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(x_train), generator=g)[:1000]
    x, y = x_train[pick], y_train[pick.numpy()]
    coin = torch.rand(len(x), generator=g) < 0.5
    shoe = torch.tensor(np.isin(y, FOOTWEAR))
    for label, mask in [("as they are", None), ("half of them mirrored", coin), ("half of the shoes mirrored", coin & shoe)]:
        m = x.clone()
        if mask is not None:
            m[mask] = m[mask].flip(-1)
        print(f"FD of 1,000 training images, {label}: {frechet(features(w, m), test):.2f}")


if __name__ == "__main__":
    main()
