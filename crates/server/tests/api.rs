//! Every endpoint over real HTTP on loopback, with the tiny fixture models: answers, error
//! codes, auth, the queue bound, cancelling, the order of Server-Sent Events, failures and
//! shutdown.

mod common;

use std::time::Duration;

use common::*;
use diffuse_server::{Limits, ServerConfig};
use serde_json::{json, Value};

fn config(models: Vec<String>) -> ServerConfig {
    ServerConfig {
        models,
        ..ServerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a1111_txt2img_returns_png_with_infotext_and_seeds() {
    let s = TestServer::start(config(vec![tiny_sd()])).await;
    let body = json!({
        "prompt": "a red cube", "negative_prompt": "blurry", "steps": 2, "seed": 42,
        "sampler_name": "Euler a", "cfg_scale": 7, "width": 64, "height": 48,
        "batch_size": 2, "n_iter": 2,
        // The A1111 switches clients send off by default are accepted off.
        "restore_faces": false, "enable_hr": false, "tiling": false, "subseed": -1,
        "subseed_strength": 0, "refiner_checkpoint": ""
    });
    let r = s.post("/sdapi/v1/txt2img", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 4);
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([42, 42, 44, 44]));
    assert_eq!(info["seed"], 42);
    assert_eq!(info["sampler_name"], "Euler a");
    assert_eq!(v["parameters"]["prompt"], "a red cube");
    let infotexts = info["infotexts"].as_array().unwrap();
    for (k, img) in images.iter().enumerate() {
        let (w, h, text) = png_info(&unb64(img.as_str().unwrap()));
        assert_eq!((w, h), (64, 48));
        let text = text.expect("PNG has a parameters chunk");
        assert_eq!(text, infotexts[k].as_str().unwrap());
        // Each iteration is one batch of 2 from its seed; the image's place in it is named.
        let (seed, pos) = ([42, 42, 44, 44][k], k % 2);
        assert_eq!(
            text,
            format!(
                "a red cube\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 7, \
                 Seed: {seed}, Size: 64x48, Model: tiny_sd, Batch size: 2, Batch pos: {pos}"
            )
        );
    }
    // Two images of one batch differ; the same request gives the same bytes again.
    assert_ne!(images[0], images[1]);
    let again: Value = s.post_json("/sdapi/v1/txt2img", &body).await;
    assert_eq!(again["images"], v["images"]);
    // A1111 1.9+ names the sigma schedule apart from the sampler.
    let v = s
        .post_json(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "x", "steps": 2, "seed": 1, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}),
        )
        .await;
    let (_, _, text) = png_info(&unb64(v["images"][0].as_str().unwrap()));
    assert!(text.unwrap().contains("Sampler: DPM++ 2M Karras,"));
    // A1111's clip skip comes in override_settings: 2 reads the layer before the last.
    let ask = |clip: Value| {
        json!({"prompt": "a red cube", "steps": 2, "seed": 9,
               "override_settings": {"CLIP_stop_at_last_layers": clip}})
    };
    let skipped = s.post_json("/sdapi/v1/txt2img", &ask(json!(2))).await;
    let (_, _, text) = png_info(&unb64(skipped["images"][0].as_str().unwrap()));
    assert!(text.unwrap().ends_with(", Clip skip: 2"));
    let last = s.post_json("/sdapi/v1/txt2img", &ask(json!(1))).await;
    let (_, _, text) = png_info(&unb64(last["images"][0].as_str().unwrap()));
    assert!(!text.unwrap().contains("Clip skip"));
    assert_ne!(skipped["images"], last["images"]);
    // The hires fix: a second pass at twice the size, named in the infotext as A1111 does.
    let v = s
        .post_json(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "a red cube", "steps": 3, "seed": 9, "width": 64, "height": 48,
                    "enable_hr": true, "hr_scale": 2, "hr_second_pass_steps": 2,
                    "denoising_strength": 0.6, "hr_upscaler": "Lanczos"}),
        )
        .await;
    let (w, h, text) = png_info(&unb64(v["images"][0].as_str().unwrap()));
    assert_eq!((w, h), (128, 96));
    assert!(
        text.unwrap().ends_with(
            "Size: 64x48, Model: tiny_sd, Denoising strength: 0.6, Hires upscale: 2, \
             Hires steps: 2, Hires upscaler: Lanczos"
        ),
        "hires infotext"
    );
    // seed -1 draws a seed, reported in info.
    let r: Value = s
        .post_json(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "x", "steps": 1, "seed": -1}),
        )
        .await;
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert!(info["seed"].as_u64().is_some(), "{info}");
    assert_eq!(info["sampler_name"], "PNDMScheduler", "the model's own");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a1111_img2img_and_inpainting() {
    let s = TestServer::start(config(vec![tiny_sd()])).await;
    let init = b64(&test_png(64, 64, false));
    let body = json!({"prompt": "p", "steps": 4, "seed": 1, "denoising_strength": 0.5,
                      "init_images": [format!("data:image/png;base64,{init}")]});
    let v: Value = s.post_json("/sdapi/v1/img2img", &body).await;
    let (w, h, text) = png_info(&unb64(v["images"][0].as_str().unwrap()));
    assert_eq!((w, h), (64, 64));
    assert!(text.unwrap().ends_with("Denoising strength: 0.5"));
    // The init image changes the result.
    let other = json!({"prompt": "p", "steps": 4, "seed": 1, "denoising_strength": 0.5,
                       "init_images": [b64(&test_png(64, 64, true))]});
    let v2: Value = s.post_json("/sdapi/v1/img2img", &other).await;
    assert_ne!(v["images"][0], v2["images"][0]);
    // Inpainting with a mask; a width resizes the init image.
    let inpaint = json!({"prompt": "p", "steps": 2, "seed": 1, "denoising_strength": 1.0,
                         "width": 32, "height": 32,
                         "init_images": [init], "mask": b64(&test_png(64, 64, true))});
    let r = s.post("/sdapi/v1/img2img", &inpaint).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let (w, h, _) = png_info(&unb64(v["images"][0].as_str().unwrap()));
    assert_eq!((w, h), (32, 32));
    // inpainting_mask_invert 1 repaints the black part: as the inverted mask does.
    let mask = image::load_from_memory(&test_png(64, 64, true))
        .unwrap()
        .to_luma8();
    let mut inverted = mask.clone();
    image::imageops::invert(&mut inverted);
    let mut inverted_png = Vec::new();
    image::DynamicImage::ImageLuma8(inverted)
        .write_to(
            &mut std::io::Cursor::new(&mut inverted_png),
            image::ImageFormat::Png,
        )
        .unwrap();
    let ask = |mask: &[u8], invert: i64| {
        json!({"prompt": "p", "steps": 2, "seed": 1, "denoising_strength": 1.0,
               "init_images": [init], "mask": b64(mask), "inpainting_mask_invert": invert})
    };
    let flipped = s
        .post_json("/sdapi/v1/img2img", &ask(&test_png(64, 64, true), 1))
        .await;
    let given = s
        .post_json("/sdapi/v1/img2img", &ask(&inverted_png, 0))
        .await;
    assert_eq!(flipped["images"], given["images"]);
    assert_ne!(
        flipped["images"],
        s.post_json("/sdapi/v1/img2img", &ask(&test_png(64, 64, true), 0))
            .await["images"]
    );
    for (field, value) in [
        ("inpainting_mask_invert", json!(2)),
        ("inpaint_full_res", json!(true)),
        ("resize_mode", json!(1)),
    ] {
        let mut body = ask(&test_png(64, 64, true), 0);
        body[field] = value;
        let r = s.post("/sdapi/v1/img2img", &body).await;
        assert_error(r, 422, Some(field)).await;
    }

    let r = s.post("/sdapi/v1/img2img", &json!({"prompt": "p"})).await;
    assert_error(r, 422, Some("init_images")).await;
    let r = s
        .post(
            "/sdapi/v1/img2img",
            &json!({"init_images": ["%%%not base64"]}),
        )
        .await;
    assert_error(r, 422, Some("init_images")).await;
    let r = s
        .post(
            "/sdapi/v1/img2img",
            &json!({"init_images": [b64(b"not an image")]}),
        )
        .await;
    assert_error(r, 422, Some("init_images")).await;
    let r = s
        .post(
            "/sdapi/v1/img2img",
            &json!({"init_images": [init], "mask": "???"}),
        )
        .await;
    assert_error(r, 422, Some("mask")).await;
    let r = s
        .post(
            "/sdapi/v1/img2img",
            &json!({"init_images": [init], "denoising_strength": 0.01, "steps": 10}),
        )
        .await;
    assert_error(r, 422, Some("denoising_strength")).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_options_and_model_switch() {
    let s = TestServer::start(config(vec![tiny_sd(), fashion()])).await;
    let samplers = s.get_json("/sdapi/v1/samplers").await;
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for want in ["Euler a", "Euler", "DPM++ 2M Karras", "DDIM", "UniPC"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for n in &names {
        assert!(
            diffuse_schedulers::resolve_name(n).is_ok(),
            "{n} listed but unknown"
        );
    }
    // Every listed sigma schedule, by name or label, goes with a sampler that has it.
    let schedules = s.get_json("/sdapi/v1/schedulers").await;
    let schedules = schedules.as_array().unwrap();
    assert_eq!(schedules.len(), 2);
    for sch in schedules {
        for key in ["name", "label"] {
            let body = json!({"prompt": "x", "steps": 1, "seed": 1, "sampler_name": "DPM++ 2M",
                              "scheduler": sch[key]});
            let r = s.post("/sdapi/v1/txt2img", &body).await;
            assert_eq!(r.status(), 200, "{body}");
        }
    }
    assert_eq!(s.get_json("/sdapi/v1/upscalers").await[0]["name"], "None");
    assert_eq!(s.get_json("/sdapi/v1/sd-vae").await, json!([]));
    let models = s.get_json("/sdapi/v1/sd-models").await;
    let titles: Vec<&str> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["tiny_sd", "fashion-mnist-ddpm"]);
    assert_eq!(models[1]["diffuse"]["classes"][7], "Sneaker");
    assert_eq!(models[1]["diffuse"]["width"], 32);
    let oai = s.get_json("/v1/models").await;
    assert_eq!(oai["object"], "list");
    assert_eq!(oai["data"][1]["id"], "fashion-mnist-ddpm");

    assert_eq!(
        s.get_json("/sdapi/v1/options").await["sd_model_checkpoint"],
        "tiny_sd"
    );
    let r = s
        .post(
            "/sdapi/v1/options",
            &json!({"sd_model_checkpoint": "fashion-mnist-ddpm"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.get_json("/sdapi/v1/options").await["sd_model_checkpoint"],
        "fashion-mnist-ddpm"
    );
    // The default model now makes 32x32 grayscale class images.
    let v: Value = s
        .post_json(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "trouser", "steps": 2, "seed": 3}),
        )
        .await;
    let (w, h, text) = png_info(&unb64(v["images"][0].as_str().unwrap()));
    assert_eq!((w, h), (32, 32));
    // (With the class-conditional defaults: guidance 5 at timesteps 100 to 550.)
    let text = text.unwrap();
    assert!(
        text.ends_with("Model: fashion-mnist-ddpm, Class: Trouser, Guidance interval: 100-550")
            && text.contains("CFG scale: 5,"),
        "{text}"
    );
    // A request's own interval, and one out of order (refused by field).
    let v: Value = s
        .post_json(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "trouser", "steps": 2, "seed": 3, "guidance_interval": [0, 1000]}),
        )
        .await;
    let text = png_info(&unb64(v["images"][0].as_str().unwrap()))
        .2
        .unwrap();
    assert!(text.ends_with("Guidance interval: 0-1000"), "{text}");
    let r = s
        .post(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "trouser", "steps": 2, "guidance_interval": [600, 100]}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("guidance_interval") && body.contains("the lower first"),
        "{body}"
    );
    // A request may still name another model.
    let v: Value = s.post_json("/sdapi/v1/txt2img", &json!({"prompt": "x", "steps": 1, "override_settings": {"sd_model_checkpoint": "tiny_sd"}})).await;
    assert_eq!(png_info(&unb64(v["images"][0].as_str().unwrap())).0, 64);

    // Only configured names: no paths.
    for bad in [
        json!("nope"),
        json!("../../models/fashion-mnist-ddpm"),
        json!(tiny_sd()),
        json!(3),
    ] {
        let r = s
            .post("/sdapi/v1/options", &json!({"sd_model_checkpoint": bad}))
            .await;
        assert_error(r, 422, Some("sd_model_checkpoint")).await;
    }
    let r = s
        .post(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "x", "model": "/etc"}),
        )
        .await;
    assert_error(r, 422, Some("model")).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_image_generations() {
    let s = TestServer::start(config(vec![tiny_sd()])).await;
    let r = s
        .post(
            "/v1/images/generations",
            &json!({"prompt": "a cat", "n": 2, "size": "64x32", "response_format": "b64_json", "seed": 5, "steps": 2}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for d in data {
        let (w, h, _) = png_info(&unb64(d["b64_json"].as_str().unwrap()));
        assert_eq!((w, h), (64, 32));
    }
    let v: Value = s.post_json(
            "/v1/images/generations",
            &json!({"prompt": "a cat", "size": "64x32", "response_format": "url", "seed": 5, "steps": 2}),
        ).await;
    let url = v["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&s.base), "{url}");
    let png = s
        .client
        .get(url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    // The first image of a batch of 2 is the one image of a batch of 1 from the same seed
    // (the noise of a batch is drawn in one go); only the infotext says it was in a batch.
    let first = unb64(data[0]["b64_json"].as_str().unwrap());
    let pixels = |png: &[u8]| image::load_from_memory(png).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&png), pixels(&first), "same seed, same first image");
    let (_, _, alone) = png_info(&png);
    let (_, _, in_batch) = png_info(&first);
    assert_eq!(
        format!("{}, Batch size: 2, Batch pos: 0", alone.unwrap()),
        in_batch.unwrap()
    );

    let cases = [
        (json!({"n": 1}), "prompt"),
        (json!({"prompt": "x", "size": "64by64"}), "size"),
        (json!({"prompt": "x", "size": "60x64"}), "size"),
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"prompt": "x", "n": 99}), "n"),
        (
            json!({"prompt": "x", "response_format": "jpeg"}),
            "response_format",
        ),
        (json!({"prompt": "x", "model": "dall-e-3"}), "model"),
        (json!({"prompt": "x", "n": "two"}), "n"),
    ];
    for (body, field) in cases {
        let r = s.post("/v1/images/generations", &body).await;
        assert_error(r, 422, Some(field)).await;
    }
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_error_codes() {
    let s = TestServer::start(ServerConfig {
        models: vec![tiny_sd(), fashion()],
        limits: Limits {
            max_body_bytes: 64 << 10,
            ..Limits::default()
        },
        ..ServerConfig::default()
    })
    .await;
    // Malformed JSON: 400.
    for raw in [
        "{\"prompt\": ",
        "not json",
        "{\"prompt\": \"x\"} trailing",
        "",
    ] {
        let r = s
            .client
            .post(s.url("/sdapi/v1/txt2img"))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_error(r, 400, None).await;
    }
    // Well-formed JSON that is no object: 422 saying what it is (serde alone would read the
    // request from an array of its fields in order), on every endpoint family.
    for (path, raw, kind) in [
        ("/sdapi/v1/txt2img", "[\"a cat\"]", "an array"),
        ("/v1/images/generations", " \"a cat\"", "a string"),
        ("/v1/jobs", "null", "null"),
    ] {
        let r = s
            .client
            .post(s.url(path))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        let msg = assert_error(r, 422, None).await;
        assert!(
            msg.contains(&format!("must be a JSON object, got {kind}")),
            "{path}: {msg}"
        );
    }
    // Well-formed JSON with a bad field: 422 naming it.
    let cases = [
        (json!({"steps": "ten"}), "steps"),
        (json!({"steps": 0}), "steps"),
        (json!({"steps": 151}), "steps"),
        (json!({"width": 60}), "width"),
        (json!({"height": 100000}), "height"),
        (json!({"width": -8}), "width"),
        (json!({"batch_size": 9}), "batch_size"),
        (json!({"batch_size": 8, "n_iter": 3}), "n_iter"),
        (json!({"cfg_scale": -1.0}), "cfg_scale"),
        (json!({"sampler_name": "Warp drive"}), "sampler_name"),
        (
            json!({"sampler_name": "Euler a", "scheduler": "Karras"}),
            "scheduler",
        ),
        (json!({"seed": -7}), "seed"),
        (json!({"model": "nope"}), "model"),
        (json!({"prompt": ["a", "b"]}), "prompt"),
        (
            json!({"override_settings": {"sd_model_checkpoint": 5}}),
            "override_settings.sd_model_checkpoint",
        ),
        (
            json!({"override_settings": {"CLIP_stop_at_last_layers": 13}}),
            "override_settings.CLIP_stop_at_last_layers",
        ),
        (
            json!({"model": "fashion-mnist-ddpm", "prompt": "bag",
                   "override_settings": {"CLIP_stop_at_last_layers": 2}}),
            "override_settings.CLIP_stop_at_last_layers",
        ),
        // A1111 features this server does not have, turned on.
        (
            json!({"enable_hr": true, "hr_upscaler": "Latent"}),
            "hr_upscaler",
        ),
        (json!({"enable_hr": true, "hr_scale": 40}), "hr_scale"),
        (
            json!({"enable_hr": true, "hr_resize_x": 1024}),
            "hr_resize_x",
        ),
        (
            json!({"enable_hr": true, "steps": 2, "denoising_strength": 0.3}),
            "denoising_strength",
        ),
        (
            json!({"model": "fashion-mnist-ddpm", "prompt": "bag", "enable_hr": true}),
            "enable_hr",
        ),
        (json!({"restore_faces": true}), "restore_faces"),
        (json!({"tiling": true}), "tiling"),
        (
            json!({"subseed": 3, "subseed_strength": 0.5}),
            "subseed_strength",
        ),
        (
            json!({"refiner_checkpoint": "sdxl_refiner"}),
            "refiner_checkpoint",
        ),
        (json!({"model": "fashion-mnist-ddpm"}), "prompt"),
        (
            json!({"model": "fashion-mnist-ddpm", "prompt": "spaceship"}),
            "prompt",
        ),
        (
            json!({"model": "fashion-mnist-ddpm", "prompt": "bag", "width": 64}),
            "width",
        ),
    ];
    for (body, field) in cases {
        let r = s.post("/sdapi/v1/txt2img", &body).await;
        let msg = assert_error(r, 422, Some(field)).await;
        assert!(
            msg.contains(field.rsplit('.').next().unwrap()) || field == "prompt",
            "{msg}"
        );
    }
    let msg = assert_error(
        s.post(
            "/sdapi/v1/txt2img",
            &json!({"model": "fashion-mnist-ddpm", "prompt": "spaceship"}),
        )
        .await,
        422,
        Some("prompt"),
    )
    .await;
    assert!(msg.contains("7 Sneaker"), "{msg}");
    // img2img needs a Stable Diffusion model.
    let r = s
        .post(
            "/v1/jobs",
            &json!({"model": "fashion-mnist-ddpm", "prompt": "bag", "init_images": [b64(&test_png(32, 32, true))]}),
        )
        .await;
    assert_error(r, 422, Some("init_images")).await;
    // Too large a body: 413.
    let big = json!({ "prompt": "x".repeat(100 << 10) });
    let r = s.post("/sdapi/v1/txt2img", &big).await;
    assert_eq!(r.status(), 413);
    // Unknown endpoint: 404 with a JSON error.
    assert_error(s.get("/sdapi/v1/nothing").await, 404, None).await;
    assert_error(s.get("/v1/jobs/0123").await, 404, None).await;
    // Nothing was queued by any of these.
    assert_eq!(s.get_json("/v1/queue").await["submitted"], 0);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_set() {
    let s = TestServer::start(ServerConfig {
        models: vec![tiny_sd()],
        api_key: Some("s3cret".into()),
        ..ServerConfig::default()
    })
    .await;
    let endpoints = [
        ("GET", "/sdapi/v1/sd-models"),
        ("GET", "/sdapi/v1/options"),
        ("GET", "/sdapi/v1/progress"),
        ("GET", "/sdapi/v1/samplers"),
        ("POST", "/sdapi/v1/txt2img"),
        ("POST", "/sdapi/v1/interrupt"),
        ("POST", "/v1/images/generations"),
        ("GET", "/v1/models"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/queue"),
    ];
    for (method, path) in endpoints {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("s3cret"),
            Some("Bearer s3cre"),
        ] {
            let mut req = s.client.request(method.parse().unwrap(), s.url(path));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req
                .json(&json!({"prompt": "x", "steps": 1}))
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap()),
                Some("Bearer"),
                "{method} {path} {auth:?}"
            );
            assert_error(r, 401, None).await;
        }
    }
    let r = s
        .client
        .get(s.url("/sdapi/v1/options"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .post(s.url("/sdapi/v1/txt2img"))
        .bearer_auth("s3cret")
        .json(&json!({"prompt": "x", "steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The page is static and public; it asks for the key.
    let page = s.get("/").await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("<title>diffuse</title>") && html.contains("id=\"apikey\""));
    s.stop().await.unwrap();
}

/// Event names in order, and the step numbers.
fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_events_arrive_in_order() {
    let s = TestServer::start(config(vec![tiny_sd()])).await;
    let r = s
        .post(
            "/v1/jobs",
            &json!({"prompt": "p", "steps": 3, "seed": 9, "sampler_name": "Euler", "batch_size": 1, "n_iter": 2}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let job: Value = r.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/v1/jobs/{id}"));
    let events = s.events(&id).await;
    let n = names(&events);
    assert_eq!(n[..2], ["queued", "started"], "{n:?}");
    assert_eq!(*n.last().unwrap(), "done", "{n:?}");
    let steps: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "step")
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6], "two batches of 3 steps");
    for (name, d) in &events {
        if name == "step" {
            assert_eq!(d["steps"], 6);
            assert!(d["it_per_s"].as_f64().unwrap() > 0.0);
        }
    }
    let done = &events.last().unwrap().1;
    assert_eq!(done["seeds"], json!([9, 10]));
    let urls = done["images"].as_array().unwrap();
    assert_eq!(urls.len(), 2);
    for (k, u) in urls.iter().enumerate() {
        let r = s.get(u.as_str().unwrap()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "image/png");
        let (w, _, text) = png_info(&r.bytes().await.unwrap());
        assert_eq!(w, 64);
        assert_eq!(text.as_deref(), done["infotexts"][k].as_str());
    }
    let job = s.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "done");
    assert_eq!(job["progress"], 1.0);
    // A late subscriber gets the whole story again.
    let again = s.events(&id).await;
    assert_eq!(names(&again), n);
    // A finished job keeps its images, not its step previews.
    assert!(again.iter().all(|(_, d)| d.get("preview").is_none()));
    let listed = s.get_json("/v1/jobs").await;
    assert_eq!(listed["jobs"][0]["id"], id.as_str());
    assert_error(
        s.get(&format!("/v1/jobs/{id}/images/7.png")).await,
        404,
        None,
    )
    .await;
    // A hires fix's second passes (3 × 0.5 steps each, for 2 images) count on after the
    // first: progress never goes back, and ends at the exact total.
    let r = s
        .post(
            "/v1/jobs",
            &json!({"prompt": "p", "steps": 4, "seed": 9, "sampler_name": "Euler", "batch_size": 2,
                    "enable_hr": true, "hr_scale": 1.5, "hr_second_pass_steps": 3,
                    "denoising_strength": 0.5}),
        )
        .await;
    let hires: Value = r.json().await.unwrap();
    let hires_events = s.events(hires["id"].as_str().unwrap()).await;
    let progress: Vec<(u64, u64)> = hires_events
        .iter()
        .filter(|(n, _)| n == "step")
        .map(|(_, d)| (d["step"].as_u64().unwrap(), d["steps"].as_u64().unwrap()))
        .collect();
    let done_steps: Vec<u64> = progress.iter().map(|p| p.0).collect();
    assert_eq!(done_steps, (1..=6).collect::<Vec<u64>>(), "4 + 2 × 1 steps");
    assert_eq!(progress.last().unwrap().1, 6, "{progress:?}");
    assert!(progress.iter().all(|(d, t)| d <= t), "{progress:?}");
    s.stop().await.unwrap();
}

/// A job that runs long enough to be caught running (tiny SD at 256x256).
fn slow_job() -> Value {
    json!({"prompt": "slow", "steps": 150, "sampler_name": "Euler", "width": 256, "height": 256, "seed": 1})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_cancel_and_interrupt() {
    let s = TestServer::start(ServerConfig {
        models: vec![tiny_sd()],
        max_queue: 1,
        ..ServerConfig::default()
    })
    .await;
    let a: Value = s.post_json("/v1/jobs", &slow_job()).await;
    let a_id = a["id"].as_str().unwrap().to_string();
    wait_job(&s, &a_id, |j| {
        j["status"] == "running" && j["step"].as_u64() > Some(0)
    })
    .await;
    // A live event stream carries step previews.
    let live = read_events_until(&s.client, &s.url(&format!("/v1/jobs/{a_id}/events")), |n| {
        n == "step"
    })
    .await;
    assert_eq!(names(&live), ["queued", "started", "step"]);
    let preview = live[2].1["preview"].as_str().expect("a step preview");
    let preview = unb64(preview.strip_prefix("data:image/png;base64,").unwrap());
    assert!(
        png_info(&preview).0 >= 64,
        "previews are at least 64 pixels wide"
    );
    // The progress endpoint sees the running job, with a preview.
    let p = s.get_json("/sdapi/v1/progress").await;
    assert_eq!(p["state"]["job"], a_id.as_str());
    assert!(p["progress"].as_f64().unwrap() > 0.0 && p["progress"].as_f64().unwrap() < 1.0);
    assert_eq!(p["state"]["sampling_steps"], 150);
    let (w, _, _) = png_info(&unb64(p["current_image"].as_str().unwrap()));
    assert!(w >= 64);
    assert!(s
        .get_json("/sdapi/v1/progress?skip_current_image=true")
        .await["current_image"]
        .is_null());

    // One job may wait; the next is refused with 429 and Retry-After, by every endpoint.
    let r = s
        .post("/v1/jobs", &json!({"prompt": "b", "steps": 2}))
        .await;
    assert_eq!(r.status(), 202);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["status"], "queued");
    assert_eq!(b["queue_position"], 0);
    let b_id = b["id"].as_str().unwrap().to_string();
    for path in ["/v1/jobs", "/sdapi/v1/txt2img", "/v1/images/generations"] {
        let r = s.post(path, &json!({"prompt": "c", "steps": 2})).await;
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry >= 1);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["type"], "queue_full", "{path}");
    }
    let q = s.get_json("/v1/queue").await;
    assert_eq!(
        (q["queued"].as_u64(), q["running"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(q["rejected"], 3);

    // Cancel the waiting job: it leaves at once.
    let r = s.delete(&format!("/v1/jobs/{b_id}")).await;
    assert_eq!(r.status(), 200);
    let ev = s.events(&b_id).await;
    assert_eq!(names(&ev), ["queued", "cancelled"]);
    // Cancel the running one: it stops at its next step.
    let r = s.delete(&format!("/v1/jobs/{a_id}")).await;
    assert_eq!(r.status(), 200);
    let ev = s.events(&a_id).await;
    let n = names(&ev);
    assert_eq!(n[..2], ["queued", "started"]);
    assert_eq!(*n.last().unwrap(), "cancelled");
    assert!(
        n.len() < 150,
        "cancelled long before its 150 steps: {}",
        n.len()
    );
    let r = s.delete(&format!("/v1/jobs/{a_id}")).await;
    assert_error(r, 409, None).await;

    // A1111 interrupt stops a synchronous txt2img, which answers 409.
    let client = s.client.clone();
    let url = s.url("/sdapi/v1/txt2img");
    let sync =
        tokio::spawn(async move { client.post(url).json(&slow_job()).send().await.unwrap() });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // Wait for the new job's first step (the cancelled one may still be winding down).
        let p = s.get_json("/sdapi/v1/progress").await;
        if p["state"]["job"] != a_id.as_str() && p["state"]["sampling_step"].as_u64() > Some(0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r: Value = s.post_json("/sdapi/v1/interrupt", &json!({})).await;
    assert!(r["interrupted"].is_string());
    let resp = sync.await.unwrap();
    assert_error(resp, 409, None).await;
    let q = s.get_json("/v1/queue").await;
    assert!(q["high_water"].as_u64().unwrap() <= 1, "{q}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_generation_fails_its_job_only() {
    // A model whose configs read but whose weights are missing: it fails when loaded.
    let broken = tempfile::tempdir().unwrap();
    let dir = broken.path().join("broken_sd");
    let tiny = std::path::PathBuf::from(tiny_sd());
    for f in ["model_index.json", "unet/config.json", "vae/config.json"] {
        let to = dir.join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(tiny.join(f), &to).unwrap();
    }
    let s = TestServer::start(config(vec![tiny_sd(), dir.display().to_string()])).await;
    let r = s
        .post(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "x", "steps": 1, "model": "broken_sd"}),
        )
        .await;
    let msg = assert_error(r, 500, None).await;
    assert!(msg.contains("broken_sd"), "{msg}");
    let r: Value = s
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "x", "steps": 1, "model": "broken_sd"}),
        )
        .await;
    let ev = s.events(r["id"].as_str().unwrap()).await;
    assert_eq!(names(&ev), ["queued", "started", "failed"]);
    assert!(ev[2].1["error"].as_str().unwrap().contains("broken_sd"));
    // The server and the other model still work.
    let r = s
        .post("/sdapi/v1/txt2img", &json!({"prompt": "x", "steps": 1}))
        .await;
    assert_eq!(r.status(), 200);
    // A model that cannot load cannot become the default.
    let r = s
        .post(
            "/sdapi/v1/options",
            &json!({"sd_model_checkpoint": "broken_sd"}),
        )
        .await;
    assert_error(r, 500, None).await;
    assert_eq!(
        s.get_json("/sdapi/v1/options").await["sd_model_checkpoint"],
        "tiny_sd"
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_running_job_and_cancels_queued_ones() {
    let s = TestServer::start(config(vec![tiny_sd()])).await;
    let running: Value = s.post_json("/v1/jobs", &json!({"prompt": "a", "steps": 40, "sampler_name": "Euler", "width": 128, "height": 128})).await;
    let queued: Value = s
        .post_json("/v1/jobs", &json!({"prompt": "b", "steps": 2}))
        .await;
    let (a, b) = (
        running["id"].as_str().unwrap().to_string(),
        queued["id"].as_str().unwrap().to_string(),
    );
    wait_job(&s, &a, |j| j["status"] == "running").await;
    // Follow both jobs while the server shuts down.
    let follow = |id: String| {
        let (client, url) = (s.client.clone(), s.url(&format!("/v1/jobs/{id}/events")));
        tokio::spawn(async move { read_events(&client, &url).await })
    };
    let (fa, fb) = (follow(a), follow(b));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let base = s.base.clone();
    s.stop().await.unwrap();
    let ea = fa.await.unwrap();
    let eb = fb.await.unwrap();
    assert_eq!(ea.last().unwrap().0, "done", "the running job finished");
    assert_eq!(names(&eb), ["queued", "cancelled"]);
    assert!(eb[1].1["reason"]
        .as_str()
        .unwrap()
        .contains("shutting down"));
    // Nobody listens any more.
    assert!(reqwest::get(format!("{base}/v1/queue")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_cancels_its_synchronous_job() {
    let s = TestServer::start(config(vec![tiny_sd()])).await;
    let client = reqwest::Client::new();
    let url = s.url("/sdapi/v1/txt2img");
    let call = tokio::spawn(async move { client.post(url).json(&slow_job()).send().await });
    let job = loop {
        let jobs = s.get_json("/v1/jobs").await;
        if let Some(j) = jobs["jobs"].as_array().unwrap().first() {
            if j["step"].as_u64() > Some(0) {
                break j["id"].as_str().unwrap().to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Dropping the request closes its connection.
    call.abort();
    let j = wait_job(&s, &job, |j| j["status"] != "running").await;
    assert_eq!(j["status"], "cancelled", "{j}");
    assert!(j["step"].as_u64().unwrap() < 150);
    s.stop().await.unwrap();
}

/// The diffusion transformers behind the A1111 API: an SD3 and a Flux text-to-image, and a DiT
/// whose classes the prompt names, give the PNGs `diffuse generate` would write (the DiT ones
/// the images of its reference case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transformer_models_over_a1111() {
    let model = |name: &str| {
        fixtures()
            .join("cases/_models")
            .join(name)
            .display()
            .to_string()
    };
    let s = TestServer::start(config(vec![
        model("tiny_dit"),
        model("tiny_sd3"),
        model("tiny_flux"),
    ]))
    .await;
    let models = s.get_json("/sdapi/v1/sd-models").await;
    let kinds: Vec<&str> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["diffuse"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["dit", "stable_diffusion_3", "flux"]);

    let v = s
        .post_json(
            "/sdapi/v1/txt2img",
            &json!({"model": "tiny_dit", "prompt": "1, 7", "steps": 8, "cfg_scale": 4, "seed": 810}),
        )
        .await;
    let images = v["images"].as_array().expect("DiT images");
    assert_eq!(images.len(), 2);
    let expected = diffuse_core::testing::load_tensors(
        &fixtures().join("cases/dit_class2img/expected.safetensors"),
    )
    .unwrap();
    for (i, img) in images.iter().enumerate() {
        let png = image::load_from_memory(&unb64(img.as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let want: Vec<f32> = expected["image"]
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let worst = png
            .as_raw()
            .iter()
            .zip(&want)
            .map(|(&p, &w)| (p as f32 / 255.0 - w).abs())
            .fold(0.0, f32::max);
        assert!(worst <= 0.002 + 0.5 / 255.0, "DiT image {i} off by {worst}");
    }
    let (_, _, text) = png_info(&unb64(images[0].as_str().unwrap()));
    assert!(text.unwrap().contains("Class: 1,7"));

    for (name, cfg) in [
        ("tiny_sd3", "CFG scale: 7"),
        ("tiny_flux", "CFG scale: 3.5"),
    ] {
        let v = s
            .post_json(
                "/sdapi/v1/txt2img",
                &json!({"model": name, "prompt": "a lighthouse", "steps": 2, "seed": 3, "width": 32, "height": 32}),
            )
            .await;
        let (w, h, text) = png_info(&unb64(v["images"][0].as_str().expect("an image")));
        assert_eq!((w, h), (32, 32));
        assert!(text.unwrap().contains(cfg), "{name}");
    }
    s.stop().await.unwrap();
}

/// `/sdapi/v1/png-info` reads back what txt2img wrote: the infotext and A1111's split of it;
/// an image without one gives an empty `info`, bytes that are no image a 422 on `image`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a1111_png_info_reads_the_infotext_back() {
    let s = TestServer::start(config(vec![tiny_sd()])).await;
    let body = json!({"prompt": "a red cube", "negative_prompt": "blurry", "steps": 2,
                      "seed": 7, "width": 64, "height": 48});
    let v = s.post_json("/sdapi/v1/txt2img", &body).await;
    let image = v["images"][0].as_str().unwrap();
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    let r = s
        .post_json(
            "/sdapi/v1/png-info",
            &json!({ "image": format!("data:image/png;base64,{image}") }),
        )
        .await;
    assert_eq!(r["info"], info["infotexts"][0]);
    let p = &r["parameters"];
    for (k, want) in [
        ("Prompt", "a red cube"),
        ("Negative prompt", "blurry"),
        ("Steps", "2"),
        ("Seed", "7"),
        ("Size-1", "64"),
        ("Size-2", "48"),
        ("Model", "tiny_sd"),
    ] {
        assert_eq!(p[k], want, "{k} in {r}");
    }
    let plain = s
        .post_json(
            "/sdapi/v1/png-info",
            &json!({ "image": b64(&test_png(4, 4, false)) }),
        )
        .await;
    assert_eq!(
        (plain["info"].as_str(), &plain["parameters"]),
        (Some(""), &json!({}))
    );
    let r = s
        .post(
            "/sdapi/v1/png-info",
            &json!({ "image": b64(b"GIF89a....") }),
        )
        .await;
    assert_error(r, 422, Some("image")).await;
    s.stop().await.unwrap();
}

/// A 64×64 txt2img request of `prompt` (CFG 7, seed 5, 3 steps) on the tiny SD model.
fn small_txt2img(prompt: &str) -> Value {
    json!({"prompt": prompt, "steps": 3, "seed": 5, "cfg_scale": 7, "width": 64, "height": 64})
}

/// The first image of an A1111 answer.
fn first_image(answer: &Value) -> image::RgbImage {
    let bytes = unb64(answer["images"][0].as_str().unwrap());
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

/// What [`small_txt2img`] of `prompt` gives through the library on the tiny SD model loaded
/// with `opts` (the server reads prompts with A1111's syntax).
fn library_image(opts: &diffuse_pipelines::LoadOptions, prompt: &str) -> image::RgbImage {
    use diffuse_pipelines::prompt_weighting::PromptSyntax;
    use diffuse_pipelines::task::{run_task, TaskSettings};
    let pipeline =
        diffuse_pipelines::load_pipeline(std::path::Path::new(&tiny_sd()), opts).unwrap();
    let settings = TaskSettings {
        prompt: prompt.into(),
        steps: Some(3),
        guidance_scale: Some(7.0),
        seed: 5,
        width: Some(64),
        height: Some(64),
        prompt_syntax: PromptSyntax::A1111,
        ..TaskSettings::default()
    };
    run_task(&pipeline, "tiny_sd", &settings, None)
        .unwrap()
        .images[0]
        .to_rgb8()
}

/// `<lora:name:weight>` tags in a Stable Diffusion prompt load `name.safetensors` from the LoRA
/// folder: the image is the library's with that LoRA fused in (and not the plain one), the
/// infotext keeps the tag, `/sdapi/v1/loras` lists the folder; an unknown LoRA, or a tag on a
/// server without a folder, is a 422 on `prompt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_tags_in_the_prompt_load_the_lora() {
    use diffuse_pipelines::{LoadOptions, LoraSpec};
    let dir = tempfile::tempdir().unwrap();
    let ink = dir.path().join("ink.safetensors");
    std::fs::copy(
        fixtures().join("cases/_adapters/lora_kohya.safetensors"),
        &ink,
    )
    .unwrap();
    let s = TestServer::start(ServerConfig {
        lora_dir: Some(dir.path().to_path_buf()),
        ..config(vec![tiny_sd()])
    })
    .await;
    assert_eq!(
        s.get_json("/sdapi/v1/loras").await,
        json!([{"name": "ink", "alias": "ink", "path": "ink.safetensors", "metadata": {}}])
    );
    let tagged = s
        .post_json(
            "/sdapi/v1/txt2img",
            &small_txt2img("a lighthouse <lora:ink:0.8>"),
        )
        .await;
    let plain = s
        .post_json("/sdapi/v1/txt2img", &small_txt2img("a lighthouse "))
        .await;
    assert_ne!(
        first_image(&tagged),
        first_image(&plain),
        "the LoRA changed nothing"
    );
    let (_, _, text) = png_info(&unb64(tagged["images"][0].as_str().unwrap()));
    assert!(
        text.unwrap().starts_with("a lighthouse <lora:ink:0.8>\n"),
        "the infotext keeps the tag"
    );
    let info: Value = serde_json::from_str(tagged["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["prompt"], "a lighthouse <lora:ink:0.8>");

    let opts = LoadOptions {
        loras: vec![LoraSpec {
            path: ink.clone(),
            scale: 0.8,
        }],
        ..LoadOptions::default()
    };
    assert_eq!(
        first_image(&tagged),
        library_image(&opts, "a lighthouse "),
        "not the library's LoRA image"
    );

    let r = s
        .post(
            "/sdapi/v1/txt2img",
            &small_txt2img("a lighthouse <lora:nope>"),
        )
        .await;
    let msg = assert_error(r, 422, Some("prompt")).await;
    assert!(msg.contains("<lora:nope>: no such LoRA"), "{msg}");
    s.stop().await.unwrap();

    let s = TestServer::start(config(vec![tiny_sd()])).await;
    assert_eq!(s.get_json("/sdapi/v1/loras").await, json!([]));
    let r = s
        .post("/sdapi/v1/txt2img", &small_txt2img("a <lora:ink>"))
        .await;
    let msg = assert_error(r, 422, Some("prompt")).await;
    assert!(msg.contains("no LoRA folder"), "{msg}");
    s.stop().await.unwrap();
}

/// `--embedding-dir`: every embedding of the folder is added to the Stable Diffusion model as
/// it loads (the image of a prompt with its token is the library's with that embedding), a
/// file that is no embedding for this model is skipped, and `/sdapi/v1/embeddings` says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_folder_adds_its_tokens() {
    use diffuse_pipelines::{EmbeddingSpec, LoadOptions};
    let dir = tempfile::tempdir().unwrap();
    let style = dir.path().join("my-style.safetensors");
    std::fs::copy(
        fixtures().join("cases/_adapters/embedding_a1111.safetensors"),
        &style,
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("cases/_adapters/lora_kohya.safetensors"),
        dir.path().join("not-an-embedding.safetensors"),
    )
    .unwrap();
    let s = TestServer::start(ServerConfig {
        embedding_dir: Some(dir.path().to_path_buf()),
        ..config(vec![tiny_sd()])
    })
    .await;
    let report = s.get_json("/sdapi/v1/embeddings").await;
    let loaded = report["loaded"].as_object().unwrap();
    assert_eq!(loaded.keys().collect::<Vec<_>>(), ["my-style"], "{report}");
    assert!(loaded["my-style"]["vectors"].as_u64().is_some(), "{report}");
    let skipped = report["skipped"].as_object().unwrap();
    assert_eq!(skipped.keys().collect::<Vec<_>>(), ["not-an-embedding"]);

    let prompt = "a lighthouse in my-style";
    let served = first_image(
        &s.post_json("/sdapi/v1/txt2img", &small_txt2img(prompt))
            .await,
    );
    let with = LoadOptions {
        textual_inversions: vec![EmbeddingSpec {
            path: style,
            token: None,
        }],
        ..LoadOptions::default()
    };
    assert_eq!(
        served,
        library_image(&with, prompt),
        "not the library's image with the embedding"
    );
    assert_ne!(
        served,
        library_image(&LoadOptions::default(), prompt),
        "the embedding changed nothing"
    );
    s.stop().await.unwrap();
}
