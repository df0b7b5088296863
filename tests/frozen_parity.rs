//! The frozen parts against open_clip and diffusers: every `clip-text-*` and `vae-*` set.

mod common;

use burn::prelude::*;
use common::{assert_close, fixture_sets, to_vec, Cases};
use microdit::backend::{test_device, TestBackend};
use microdit::hub::Hub;
use microdit::text::{ClipTextEncoder, ClipTokenizer};

type B = TestBackend;
const TOL: f64 = 1e-4;

#[test]
fn clip_text_embeddings_match_open_clip() {
    let dev = test_device();
    for dir in fixture_sets("clip-text") {
        let hub = Hub::new(dir.join("no-cache"), true);
        let (encoder, _) =
            ClipTextEncoder::<B>::from_source(dir.to_str().unwrap(), &hub, &dev).unwrap();
        let cases = Cases::open(&dir.join("cases.safetensors"));
        let tokens: Tensor<B, 2, Int> = cases.tensor::<B, 2>("encode.tokens", &dev).int();
        if let Ok(prompts) = std::fs::read_to_string(dir.join("prompts.json")) {
            // The tokens are open_clip's tokenisation of the prompts: ours must agree.
            let prompts: Vec<String> = serde_json::from_str(&prompts).unwrap();
            let tokenizer = ClipTokenizer::new();
            let ours: Vec<f32> = prompts
                .iter()
                .flat_map(|p| tokenizer.tokenize(p).0)
                .map(|t| t as f32)
                .collect();
            assert_eq!(
                ours,
                cases.values("encode.tokens"),
                "{}: tokens of prompts.json",
                dir.display()
            );
        }
        let out = encoder.forward(tokens);
        assert_close(
            &format!("{}: text embedding", dir.display()),
            &to_vec(out),
            &cases.values("encode.out"),
            TOL,
        );
    }
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    use microdit::vae::AutoencoderKl;
    let dev = test_device();
    for dir in fixture_sets("vae") {
        let hub = Hub::new(dir.join("no-cache"), true);
        let (vae, _) =
            AutoencoderKl::<B>::from_source(dir.to_str().unwrap(), None, &hub, &dev).unwrap();
        let cases = Cases::open(&dir.join("cases.safetensors"));
        let name = dir.display();
        let dist = vae.encode(cases.tensor("encode.image", &dev));
        assert_close(
            &format!("{name}: mean"),
            &to_vec(dist.mean.clone()),
            &cases.values("encode.mean"),
            TOL,
        );
        assert_close(
            &format!("{name}: logvar"),
            &to_vec(dist.logvar.clone()),
            &cases.values("encode.logvar"),
            TOL,
        );
        assert_close(
            &format!("{name}: std"),
            &to_vec(dist.std()),
            &cases.values("encode.std"),
            TOL,
        );
        let image = vae.decode(cases.tensor("decode.latents", &dev));
        assert_close(
            &format!("{name}: decode"),
            &to_vec(image),
            &cases.values("decode.image"),
            TOL,
        );
    }
}
