#!/usr/bin/env python3
"""PyTorch / diffusers CPU baseline for `diffuse bench --compare-torch`.

Times the same models and ops as `diffuse bench` (random weights in --dtype, the same thread
count) and prints one JSON object {name: median_ms}. The names match diffuse's bench lines. On
a GPU each line also gets "<name> peak_gpu_mib": the most device memory in use while it ran
(sampled every millisecond, as diffuse samples its own), less what was in use at the start.
Needs `pip install torch diffusers transformers`. A benchmark, not a test.
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time


def median_ms(fn, runs, warmup, sync):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


class GpuMemory:
    """The device's used memory (cudaMemGetInfo), sampled every millisecond by a thread; a
    line's peak is the most seen since its reset, less what was in use at the start."""

    def __init__(self, torch):
        self.torch = torch
        torch.cuda.init()
        self.idle = self.used()
        self.peak = self.idle
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def used(self):
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.used())
            time.sleep(0.001)

    def stop(self):
        # A CUDA call from the thread during interpreter shutdown aborts the process.
        self.running = False
        self.thread.join()

    def reset(self):
        # Blocks cached by earlier lines would count as this line's.
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()
        self.peak = self.used()

    def peak_mib(self):
        return (self.peak - self.idle) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", required=True, help="fixtures_configs folder")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated name prefixes to run")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="weights and inputs (attention is diffusers' default, SDPA)")
    ap.add_argument("--pipeline", action="store_true", help="also a 512x512 SD 1.5 text-to-image run")
    ap.add_argument("--pipeline-steps", type=int, default=20, help="denoising steps of the --pipeline run")
    ap.add_argument("--fixtures", default=None, help="the repo's fixtures folder (tokenizer, scheduler config)")
    ap.add_argument("--transformers", action="store_true",
                    help="also an SD3-medium step and a FLUX.1-dev double and single block at --transformer-size")
    ap.add_argument("--transformer-size", type=int, default=1024)
    ap.add_argument("--large", action="store_true", help="also the SDXL / 2048x2048 lines (10+ GiB each)")
    ap.add_argument("--lora-train", action="store_true",
                    help="also one LoRA training step of the SD 1.5 UNet (peft, rank 4, batch 1) at 256 and 512")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    dt = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    randn = lambda *shape: torch.randn(*shape, device=dev, dtype=dt)
    gpu = GpuMemory(torch) if dev.type == "cuda" else None
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    want = lambda name: not only or any(name.startswith(o) for o in only)
    out = {}
    sd = os.path.join(args.configs, "runwayml_stable_diffusion_v1_5")

    def peak_rss(name):
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
        out[name + " peak_rss_mib"] = int(hwm[0].split()[1]) / 1024.0 if hwm else float("nan")

    def run(name, fn, runs=args.runs, warmup=args.warmup):
        if want(name):
            if gpu:
                gpu.reset()
            with torch.inference_mode():
                out[name] = median_ms(fn, runs, warmup, sync)
            mem = ""
            if gpu:
                out[name + " peak_gpu_mib"] = gpu.peak_mib()
                mem = f", peak GPU {out[name + ' peak_gpu_mib']:.0f} MiB"
            print(f"{name}: {out[name]:.1f} ms{mem}", file=sys.stderr)

    # Ops.
    x = randn(2, 320, 64, 64)
    w = randn(320, 320, 3, 3) * 0.02
    run("op conv3x3 2x320x64x64", lambda: F.conv2d(x, w, padding=1))
    x2 = randn(1, 128, 256, 256)
    w2 = randn(128, 128, 3, 3) * 0.02
    run("op conv3x3 1x128x256x256", lambda: F.conv2d(x2, w2, padding=1))
    for c, h in [(640, 32), (1280, 16), (1280, 8)]:
        xs, ws = randn(2, c, h, h), randn(c, c, 3, 3) * 0.02
        run(f"op conv3x3 2x{c}x{h}x{h}", lambda xs=xs, ws=ws: F.conv2d(xs, ws, padding=1))
    xd, wd = randn(2, 640, 32, 32), randn(640, 640, 3, 3) * 0.02
    run("op conv3x3/2 2x640x32x32", lambda: F.conv2d(xd, wd, stride=2, padding=1))
    xe, we = randn(1, 128, 512, 512), randn(128, 128, 3, 3) * 0.02
    run("op conv3x3/2 1x128x512x512", lambda: F.conv2d(xe, we, stride=2, padding=1))
    for tokens, heads, d in [(4096, 16, 40), (1024, 16, 80)]:
        q, k, v = (randn(1, heads, tokens, d) for _ in range(3))
        run(f"op attention {heads}x{tokens}x{d}", lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
    gn = torch.nn.GroupNorm(32, 320).to(dev, dt)
    run("op groupnorm+silu 2x320x64x64", lambda: F.silu(gn(x)))
    for rows, k, n in [(8192, 320, 2560), (512, 1280, 10240), (154, 768, 3072)]:
        lin, xl = torch.nn.Linear(k, n).to(dev, dt), randn(rows, k)
        run(f"op linear {rows}x{k}x{n}", lambda lin=lin, xl=xl: lin(xl))
    a, b = randn(8192, 320), randn(320, 1280)
    run("op matmul 8192x320x1280", lambda: a @ b)

    # Models.
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

    if want("unet sd15 step") or want("unet sd15 guided step"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(sd, "unet"))).eval().to(dev, dt)
        lat = randn(2, 4, 64, 64)
        ctx = randn(2, 77, 768)
        t = torch.tensor([999.0, 999.0], device=dev)
        run("unet sd15 step", lambda: unet(lat, t, encoder_hidden_states=ctx).sample)
        # The process's peak so far: the step's own with `--only "unet sd15 step"`.
        if want("unet sd15 step"):
            peak_rss("unet sd15 step")
        # The batch a guided pipeline runs: one latent twice, two texts.
        lat_guided = torch.cat([lat[:1], lat[:1]])
        run("unet sd15 guided step", lambda: unet(lat_guided, t, encoder_hidden_states=ctx).sample)
        # The tuned configuration a PyTorch CPU user would try: NHWC weights and input.
        unet = unet.to(memory_format=torch.channels_last)
        lat_cl = lat.contiguous(memory_format=torch.channels_last)
        run("unet sd15 step channels_last", lambda: unet(lat_cl, t, encoder_hidden_states=ctx).sample)
        lat_guided_cl = lat_guided.contiguous(memory_format=torch.channels_last)
        run("unet sd15 guided step channels_last", lambda: unet(lat_guided_cl, t, encoder_hidden_states=ctx).sample)
        del unet
    if want("vae sd15 decode"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(sd, "vae"))).eval().to(dev, dt)
        z = randn(1, 4, 64, 64)
        run("vae sd15 decode", lambda: vae.decode(z).sample)
        del vae
    if want("clip sd15 encode"):
        from transformers import CLIPTextConfig, CLIPTextModel

        clip = CLIPTextModel(CLIPTextConfig.from_json_file(os.path.join(sd, "text_encoder", "config.json"))).eval().to(dev, dt)
        ids = torch.randint(0, 49408, (2, 77), device=dev)
        run("clip sd15 encode", lambda: clip(ids).last_hidden_state)
        del clip
    if want("unet ddpm-cat-256 step"):
        cat = os.path.join(args.configs, "google_ddpm_cat_256", "unet")
        unet = UNet2DModel.from_config(UNet2DModel.load_config(cat)).eval().to(dev, dt)
        img = randn(1, 3, 256, 256)
        run("unet ddpm-cat-256 step", lambda: unet(img, torch.tensor([500.0], device=dev)).sample)
    if args.transformers:
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        size = args.transformer_size
        lat = size // 8
        name = f"sd3-medium transformer step {size}"
        if want(name):
            path = os.path.join(args.configs, "stabilityai_stable_diffusion_3_medium_diffusers", "transformer")
            cfg = SD3Transformer2DModel.load_config(path)
            model = SD3Transformer2DModel.from_config(cfg).eval().to(dev)
            x = randn(2, cfg["in_channels"], lat, lat)
            ctx = randn(2, 77 + 256, cfg["joint_attention_dim"])
            pooled = randn(2, cfg["pooled_projection_dim"])
            t = torch.tensor([500.0, 500.0], device=dev)
            run(name, lambda: model(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample)
            del model
        path = os.path.join(args.configs, "black_forest_labs_flux_1_dev", "transformer")
        fcfg = dict(FluxTransformer2DModel.load_config(path))
        side = size // 16
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(dev)
        for kind, (double, single) in [("double", (1, 0)), ("single", (0, 1))]:
            name = f"flux-dev {kind} block {size}"
            if want(name):
                model = FluxTransformer2DModel.from_config({**fcfg, "num_layers": double, "num_single_layers": single}).eval().to(dev)
                x = randn(1, side * side, fcfg["in_channels"])
                ctx = randn(1, 512, fcfg["joint_attention_dim"])
                pooled = randn(1, fcfg["pooled_projection_dim"])
                txt_ids = torch.zeros(512, 3, device=dev)
                t, g = torch.tensor([0.5], device=dev), torch.tensor([3.5], device=dev)
                run(name, lambda: model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                                        img_ids=img_ids, txt_ids=txt_ids, guidance=g).sample)
                del model
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
        out["transformers peak_rss_mib"] = int(hwm[0].split()[1]) / 1024.0 if hwm else float("nan")
    xl = os.path.join(args.configs, "stabilityai_stable_diffusion_xl_base_1_0")
    fixtures = args.fixtures or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
    if args.large and want("unet sdxl step"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(xl, "unet"))).eval().to(dev, dt)
        lat, ctx, pooled = randn(2, 4, 128, 128), randn(2, 77, 2048), randn(2, 1280)
        ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2, device=dev, dtype=dt)
        t = torch.tensor([999.0, 999.0], device=dev)
        cond = {"text_embeds": pooled, "time_ids": ids}
        run("unet sdxl step", lambda: unet(lat, t, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample)
        peak_rss("unet sdxl step")
        del unet
    for name, folder, side, tiled in [("vae sdxl decode 1024", xl, 1024, False),
                                      ("vae sd15 tiled decode 2048", sd, 2048, True)]:
        if args.large and want(name):
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(folder, "vae"))).eval().to(dev, dt)
            if tiled:
                vae.enable_tiling()
            z = randn(1, 4, side // 8, side // 8)
            run(name, lambda: vae.decode(z).sample)
            peak_rss(name)
            del vae
    def sdxl_pipeline(name, sched, side, steps, guidance):
        # SDXL on random weights, both text encoders and the decode included; diffusers runs the
        # VAE in f32 when its config says force_upcast (SDXL's does), as diffuse does.
        from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
        from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                                  CLIPTokenizer)

        models = os.path.join(fixtures, "cases", "_models")
        classes = {"EulerDiscreteScheduler": EulerDiscreteScheduler,
                   "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler}
        sched_dir = os.path.join(models, sched, "scheduler")
        sched_cls = classes[json.load(open(os.path.join(sched_dir, "scheduler_config.json")))["_class_name"]]
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(xl, "vae"))),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_json_file(os.path.join(xl, "text_encoder", "config.json"))),
            text_encoder_2=CLIPTextModelWithProjection(
                CLIPTextConfig.from_json_file(os.path.join(xl, "text_encoder_2", "config.json"))),
            tokenizer=CLIPTokenizer.from_pretrained(os.path.join(models, "tiny_sdxl", "tokenizer")),
            tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(models, "tiny_sdxl", "tokenizer_2")),
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(xl, "unet"))),
            scheduler=sched_cls.from_pretrained(sched_dir),
        ).to(dev, dt)
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator("cpu").manual_seed(0)
        run(name, lambda: pipe("a photograph of an astronaut riding a horse", num_inference_steps=steps,
                               guidance_scale=guidance, height=side, width=side, generator=gen, output_type="np"),
            runs=1 if steps > 1 else args.runs, warmup=0 if steps > 1 else args.warmup)
        peak_rss(name)
        del pipe

    if args.large and want("pipeline sdxl-turbo 512 1 step"):
        sdxl_pipeline("pipeline sdxl-turbo 512 1 step", "tiny_sdxl_turbo", 512, 1, 0.0)
    if args.large and want("pipeline sdxl txt2img 1024 20 steps"):
        sdxl_pipeline("pipeline sdxl txt2img 1024 20 steps", "tiny_sdxl", 1024, 20, 5.0)
    for px in [256, 512]:
        name = f"lora sd15 train step {px}"
        if not (args.lora_train and want(name)):
            continue
        # As diffusers' train_text_to_image_lora.py: the UNet frozen, a PEFT adapter of rank 4
        # (gaussian init) on the attention projections, AdamW (lr 1e-4, weight decay 1e-2),
        # gradients clipped at 1; one step on one image's latents. The model stays f32; with
        # --dtype bfloat16 the passes run under torch.autocast, as accelerate's
        # --mixed_precision bf16 runs them on a CPU (and `diffuse train-lora --mixed-precision bf16`).
        from peft import LoraConfig

        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(sd, "unet"))).to(dev)
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        f32 = lambda *shape: torch.randn(*shape, device=dev)
        lat, ctx = f32(1, 4, px // 8, px // 8), f32(1, 77, 768)
        autocast = args.dtype == "bfloat16"

        def step():
            noise = torch.randn_like(lat)
            t = torch.randint(0, 1000, (1,), device=dev)
            noisy = 0.7 * lat + 0.7 * noise
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                pred = unet(noisy, t, encoder_hidden_states=ctx).sample
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            return loss

        out[name] = median_ms(step, args.runs, args.warmup, sync)
        peak_rss(name)
        print(f"{name}: {out[name]:.1f} ms, peak RSS {out[name + ' peak_rss_mib']:.0f} MiB", file=sys.stderr)
        del unet, opt, params
    if args.pipeline:
        from diffusers import PNDMScheduler, StableDiffusionPipeline
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        fx = args.fixtures
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(sd, "vae"))),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_json_file(os.path.join(sd, "text_encoder", "config.json"))),
            tokenizer=CLIPTokenizer.from_pretrained(os.path.join(fx, "tokenizer")),
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(sd, "unet"))),
            scheduler=PNDMScheduler.from_pretrained(os.path.join(fx, "pipelines", "tiny_sd", "scheduler")),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).to(dev, dt)
        pipe.set_progress_bar_config(disable=True)
        name = f"pipeline sd15 txt2img 512 {args.pipeline_steps} steps"
        gen = torch.Generator("cpu").manual_seed(0)
        run_once = lambda: pipe("a photograph of an astronaut riding a horse", num_inference_steps=args.pipeline_steps, height=512,
                                width=512, guidance_scale=7.5, generator=gen, output_type="np")
        run(name, run_once, runs=1, warmup=0)
        peak_rss(name)
    if gpu:
        gpu.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
