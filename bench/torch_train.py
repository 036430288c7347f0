#!/usr/bin/env python3
"""PyTorch / diffusers training speed for the same model and step as `diffuse train`.

Builds diffusers' UNet2DModel from a config.json (default: the bundled Fashion-MNIST model) and
times the training step `diffuse train` runs with its defaults: DDPM linear-beta noise at a
uniform random timestep, epsilon target, MSE, class labels with 10% dropout to the null class,
random horizontal flips, AdamW (betas 0.95/0.999, eps 1e-8, weight decay 1e-6), gradient
clipping at norm 1, and diffusers' EMAModel (decay 0.999, power 2/3). Prints images/s over the
timed steps after a warm-up, as JSON. A benchmark, not a test; needs torch and diffusers.
"""
import argparse
import gzip
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def load_images(data, n, resolution):
    """Fashion-MNIST IDX images padded to `resolution` in [-1, 1] and labels; random if absent."""
    img = Path(data) / "train-images-idx3-ubyte.gz"
    lab = Path(data) / "train-labels-idx1-ubyte.gz"
    if img.is_file() and lab.is_file():
        x = np.frombuffer(gzip.open(img).read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
        y = np.frombuffer(gzip.open(lab).read(), np.uint8, offset=8)[:n]
        pad = (resolution - 28) // 2
        x = np.pad(x, ((0, 0), (pad, resolution - 28 - pad), (pad, resolution - 28 - pad)))
        x = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0)[:, None]
        return x, torch.from_numpy(y.astype(np.int64)), "fashion-mnist"
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 1, resolution, resolution, generator=g) * 2 - 1,
            torch.randint(0, 10, (n,), generator=g), "random")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="models/fashion-mnist-ddpm/unet/config.json")
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                    help="bf16: the forward under torch.autocast(bfloat16), as accelerate does")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    cfg = {k: v for k, v in json.load(open(args.config)).items() if not k.startswith("_")}
    dev = torch.device(args.device)
    model = UNet2DModel(**cfg).to(dev).train()
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.95, 0.999), eps=1e-8,
                            weight_decay=1e-6)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    res = cfg.get("sample_size", 32)
    total = args.batch_size * (args.warmup + args.steps)
    x_all, y_all, source = load_images(args.data, max(total, args.batch_size), res)
    x_all, y_all = x_all.to(dev), y_all.to(dev)
    null_class = cfg["num_class_embeds"] - 1 if cfg.get("num_class_embeds") else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(i):
        idx = torch.randint(0, x_all.shape[0], (args.batch_size,), device=dev)
        x0, y = x_all[idx], y_all[idx]
        flip = torch.rand(args.batch_size, device=dev) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (args.batch_size,), device=dev)
        noisy = sched.add_noise(x0, noise, t)
        labels = None
        if null_class is not None:
            drop = torch.rand(args.batch_size, device=dev) < 0.1
            labels = torch.where(drop, torch.full_like(y, null_class), y)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            pred = model(noisy, t, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        return loss

    for i in range(args.warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    loss.item()
    sync()
    secs = time.perf_counter() - t0
    print(json.dumps({
        "images_per_s": args.batch_size * args.steps / secs,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "seconds": secs,
        "threads": args.threads,
        "device": args.device,
        "mixed_precision": args.mixed_precision,
        "data": source,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
