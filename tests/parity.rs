//! The denoiser, the EDM loss and samplers, and the optimiser step against golden outputs
//! of the reference PyTorch code, for every `dit-*` set under `MICRODIT_FIXTURES`.

mod common;

use std::path::Path;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use common::{assert_close, fixture_sets, to_vec, Cases};
use microdit::backend::{test_device, MicroditBackend, TestBackend, Trainable};
use microdit::edm::{
    denoise, edm_loss, karras_sigmas, sample, Churn, EdmConfig, Guidance, LossNoise, Sampler,
};
use microdit::model::masking::kept_tokens;
use microdit::model::routing::RouteSpan;
use microdit::model::weights::{load_state_dict, load_weights, ToGradients};
use microdit::model::{DitConfig, Init, MicroDit, PatchMask, Routing, TokenRoute, TrainingTokens};
use microdit::state_dict::{read_state_dict, reference_tensors, DIT_KEYS};
use microdit::train::optim::{clip_grad_norm, AdamWSettings};
use std::collections::BTreeMap;

type B = TestBackend;
type AB = Trainable<TestBackend>;

const FORWARD_TOL: f64 = 1e-4;
const SAMPLER_TOL: f64 = 1e-3;

struct Set {
    name: String,
    cfg: DitConfig,
    edm: EdmConfig,
    cases: Cases,
    /// A `dit-routed` set's span (its config's `routing`).
    route: Option<RouteSpan>,
}

fn sets_of(kind: &str) -> Vec<(Set, std::path::PathBuf)> {
    fixture_sets(kind)
        .into_iter()
        .map(|dir| {
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                    .unwrap();
            let cfg = DitConfig::from_file(&dir.join("config.json")).unwrap();
            let route = json.get("routing").map(|r| {
                let routing: Routing = serde_json::from_value(r.clone()).unwrap();
                routing.span(cfg.depth).unwrap()
            });
            let set = Set {
                name: dir.file_name().unwrap().to_string_lossy().into_owned(),
                cfg,
                edm: serde_json::from_value(json["edm"].clone()).unwrap(),
                cases: Cases::open(&dir.join("cases.safetensors")),
                route,
            };
            (set, dir)
        })
        .collect()
}

fn load<Bk: MicroditBackend>(cfg: &DitConfig, path: &Path, device: &Bk::Device) -> MicroDit<Bk> {
    load_weights(MicroDit::new(cfg, &mut Init::empty(device)), path).unwrap()
}

/// The mask the set's `noise` draws chose, at its `ratio`.
fn mask_from<Bk: MicroditBackend>(
    cases: &Cases,
    noise: &str,
    ratio: &str,
    device: &Bk::Device,
) -> PatchMask<Bk> {
    let [b, t] = <[usize; 2]>::try_from(cases.shape(noise)).unwrap();
    let keep = kept_tokens(t, cases.scalar(ratio));
    PatchMask::from_noise(&cases.values(noise), b, t, keep, device)
}

/// The route a routed set's `{prefix}.route_noise` chose.
fn route_from<Bk: MicroditBackend>(s: &Set, prefix: &str, device: &Bk::Device) -> TokenRoute<Bk> {
    let noise = format!("{prefix}.route_noise");
    let shape = <[usize; 2]>::try_from(s.cases.shape(&noise)).unwrap();
    let span = s.route.expect("a dit-routed set");
    TokenRoute::from_noise(&s.cases.values(&noise), shape, span, device)
}

/// The unmasked network output on the set's `forward.*` inputs.
fn forward_case(model: &MicroDit<B>, c: &Cases) -> Tensor<B, 4> {
    let dev = test_device();
    model.forward(
        c.tensor("forward.x", &dev),
        c.tensor("forward.t", &dev),
        c.captions("forward.y", &dev),
        &TrainingTokens::all(),
    )
}

#[test]
fn forward_masked_and_guided_outputs_match_reference() {
    let dev = test_device();
    for (s, dir) in sets_of("dit") {
        let model: MicroDit<B> = load(&s.cfg, &dir.join("weights.safetensors"), &test_device());
        let c = &s.cases;

        let out = forward_case(&model, c);
        assert_close(
            &format!("{}: forward", s.name),
            &to_vec(out),
            &c.values("forward.out"),
            FORWARD_TOL,
        );

        let mask = mask_from::<B>(c, "masked.noise", "masked.mask_ratio", &dev);
        assert_eq!(
            to_vec(mask.mask.clone()),
            c.values("masked.mask"),
            "{}: mask",
            s.name
        );
        let tokens = TrainingTokens {
            mask: Some(mask),
            route: None,
        };
        let out = model.forward(
            c.tensor("masked.x", &dev),
            c.tensor("masked.t", &dev),
            c.captions("masked.y", &dev),
            &tokens,
        );
        assert_close(
            &format!("{}: masked forward", s.name),
            &to_vec(out),
            &c.values("masked.out"),
            FORWARD_TOL,
        );

        let out = model.forward_cfg(
            c.tensor("cfg.x", &dev),
            c.tensor("cfg.t", &dev),
            c.captions("cfg.y", &dev),
            c.scalar("cfg.scale"),
        );
        assert_close(
            &format!("{}: cfg forward", s.name),
            &to_vec(out),
            &c.values("cfg.out"),
            FORWARD_TOL,
        );
    }
}

#[test]
fn loss_gradients_clipping_and_adamw_match_reference() {
    let dev = test_device();
    for (s, dir) in sets_of("dit") {
        let c = &s.cases;
        let model: MicroDit<AB> = load(&s.cfg, &dir.join("weights.safetensors"), &test_device());
        let draws = LossNoise {
            rnd_normal: c.tensor::<AB, 4>("loss.rnd_normal", &dev).flatten(0, 3),
            noise: c.tensor("loss.noise", &dev),
            tokens: TrainingTokens {
                mask: (c.scalar("loss.mask_ratio") > 0.0)
                    .then(|| mask_from::<AB>(c, "loss.mask_noise", "loss.mask_ratio", &dev)),
                route: None,
            },
        };
        let loss = edm_loss(
            &model,
            &s.edm,
            c.tensor("loss.x0", &dev),
            c.captions("loss.y", &dev),
            &draws,
            s.cfg.patch_size,
        );
        assert_close(
            &format!("{}: loss", s.name),
            &to_vec(loss.clone()),
            &[c.scalar("loss.value") as f32],
            FORWARD_TOL,
        );

        assert_gradients_match(&s, &model, loss);

        // Clipping and AdamW from the reference's own gradients, so that what is compared is
        // the update alone (ours differ from them by float noise, which AdamW's epsilon can
        // amplify for near-zero gradients).
        let mut grads = reference_gradients(&s.cfg, &dir, &model);
        let norm = clip_grad_norm(&model, &mut grads, 0.25);
        assert_close(
            &format!("{}: clip.total_norm", s.name),
            &[norm as f32],
            &[c.scalar("clip.total_norm") as f32],
            FORWARD_TOL,
        );

        let mut optim = AdamWSettings {
            weight_decay: 0.1,
            ..Default::default()
        }
        .init::<AB, MicroDit<AB>>();
        let stepped = optim.step(1e-2, model, grads);
        let ours = reference_tensors(&stepped.valid(), &DIT_KEYS).unwrap();
        for name in c.names_under("adamw") {
            let w = ours[&name]
                .clone()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap();
            assert_close(
                &format!("{}: adamw.{name}", s.name),
                &w,
                &c.values(&format!("adamw.{name}")),
                FORWARD_TOL,
            );
        }
    }
}

/// `loss`'s gradients for `model` equal the set's `grad.*`, by reference names.
fn assert_gradients_match(s: &Set, model: &MicroDit<AB>, loss: Tensor<AB, 1>) {
    let grads = GradientsParams::from_grads(loss.backward(), model);
    let grad_model = model.valid().map(&mut ToGradients { grads: &grads });
    let ours = reference_tensors(&grad_model, &DIT_KEYS).unwrap();
    let names = s.cases.names_under("grad");
    assert_eq!(
        ours.keys().cloned().collect::<Vec<_>>(),
        names,
        "{}: gradient names",
        s.name
    );
    for name in &names {
        let g = ours[name].clone().convert::<f32>().to_vec::<f32>().unwrap();
        assert_close(
            &format!("{}: grad.{name}", s.name),
            &g,
            &s.cases.values(&format!("grad.{name}")),
            FORWARD_TOL,
        );
    }
}

/// TREAD's router around the reference DiT (`tests/fixtures/routing/make.py`): the routed
/// forward without and with masking, and the masked, routed loss and its gradients.
#[test]
fn routed_forward_and_gradients_match_tread_around_the_reference() {
    let dev = test_device();
    for (s, dir) in sets_of("dit-routed") {
        let c = &s.cases;
        let model: MicroDit<B> = load(&s.cfg, &dir.join("weights.safetensors"), &dev);
        let tokens = TrainingTokens {
            mask: None,
            route: Some(route_from(&s, "routed", &dev)),
        };
        let out = model.forward(
            c.tensor("routed.x", &dev),
            c.tensor("routed.t", &dev),
            c.captions("routed.y", &dev),
            &tokens,
        );
        let name = format!("{}: routed forward", s.name);
        assert_close(&name, &to_vec(out), &c.values("routed.out"), FORWARD_TOL);

        let (noise, ratio) = ("masked_routed.mask_noise", "masked_routed.mask_ratio");
        let tokens = TrainingTokens {
            mask: Some(mask_from(c, noise, ratio, &dev)),
            route: Some(route_from(&s, "masked_routed", &dev)),
        };
        let out = model.forward(
            c.tensor("masked_routed.x", &dev),
            c.tensor("masked_routed.t", &dev),
            c.captions("masked_routed.y", &dev),
            &tokens,
        );
        let name = format!("{}: masked, routed forward", s.name);
        assert_close(
            &name,
            &to_vec(out),
            &c.values("masked_routed.out"),
            FORWARD_TOL,
        );

        let model: MicroDit<AB> = load(&s.cfg, &dir.join("weights.safetensors"), &dev);
        let draws = LossNoise {
            rnd_normal: c.tensor::<AB, 4>("loss.rnd_normal", &dev).flatten(0, 3),
            noise: c.tensor("loss.noise", &dev),
            tokens: TrainingTokens {
                mask: Some(mask_from(c, "loss.mask_noise", "loss.mask_ratio", &dev)),
                route: Some(route_from(&s, "loss", &dev)),
            },
        };
        let x0 = c.tensor("loss.x0", &dev);
        let loss = edm_loss(
            &model,
            &s.edm,
            x0,
            c.captions("loss.y", &dev),
            &draws,
            s.cfg.patch_size,
        );
        let name = format!("{}: masked, routed loss", s.name);
        assert_close(
            &name,
            &to_vec(loss.clone()),
            &[c.scalar("loss.value") as f32],
            FORWARD_TOL,
        );
        assert_gradients_match(&s, &model, loss);
    }
}

/// The fixture's `grad.*` as gradients of `model`'s parameters: loaded into a model of the
/// same architecture by reference names, then matched to `model`'s parameters in order.
fn reference_gradients(cfg: &DitConfig, dir: &Path, model: &MicroDit<AB>) -> GradientsParams {
    struct Ids(Vec<ParamId>);
    impl<Bk: burn::tensor::backend::Backend> ModuleVisitor<Bk> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Bk, D>>) {
            self.0.push(param.id);
        }
    }
    struct Register(std::vec::IntoIter<ParamId>, GradientsParams);
    impl<Bk: burn::tensor::backend::Backend> ModuleVisitor<Bk> for Register {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Bk, D>>) {
            let id = self.0.next().expect("as many gradients as parameters");
            self.1.register(id, param.val());
        }
    }
    let grads: BTreeMap<_, _> = read_state_dict(&dir.join("cases.safetensors"))
        .unwrap()
        .into_iter()
        .filter_map(|(k, mut t)| {
            let name = k.strip_prefix("grad.")?.to_string();
            t.path_stack = Some(name.split('.').map(str::to_string).collect());
            Some((name, t))
        })
        .collect();
    let device = test_device();
    let as_model: MicroDit<B> =
        load_state_dict(MicroDit::new(cfg, &mut Init::empty(&device)), grads).unwrap();
    let mut ids = Ids(Vec::new());
    model.visit(&mut ids);
    let mut register = Register(ids.0.into_iter(), GradientsParams::new());
    as_model.visit(&mut register);
    register.1
}

fn run_sampler(s: &Set, model: &MicroDit<B>, prefix: &str, churn: Churn) -> Vec<f32> {
    let dev = test_device();
    let c = &s.cases;
    let steps = c.scalar(&format!("{prefix}.steps")) as usize;
    let guidance = if c.has(&format!("{prefix}.cfg")) {
        Guidance::from_scale(c.scalar(&format!("{prefix}.cfg")))
    } else {
        Guidance::None
    };
    let y = c.captions::<B>(&format!("{prefix}.y"), &dev);
    let noise = c
        .has(&format!("{prefix}.noise"))
        .then(|| c.tensor::<B, 5>(&format!("{prefix}.noise"), &dev));
    let out = sample(
        c.tensor(&format!("{prefix}.latents"), &dev),
        &karras_sigmas(&s.edm, steps),
        Sampler::Heun,
        churn,
        |x, sigma| {
            denoise(
                model,
                &s.edm,
                x,
                Tensor::from_floats([sigma as f32], &dev),
                y.clone(),
                &TrainingTokens::all(),
                guidance,
            )
        },
        |i| {
            let n = noise.clone().expect("churn noise");
            let [_, b, ch, h, w] = n.dims();
            n.narrow(0, i, 1).reshape([b, ch, h, w])
        },
        |_| true,
    );
    to_vec(out)
}

#[test]
fn samplers_match_reference() {
    for (s, dir) in sets_of("dit") {
        let model: MicroDit<B> = load(&s.cfg, &dir.join("weights.safetensors"), &test_device());
        let c = &s.cases;
        for prefix in ["sample", "sample_cfg"] {
            let out = run_sampler(&s, &model, prefix, Churn::default());
            assert_close(
                &format!("{}: {prefix}", s.name),
                &out,
                &c.values(&format!("{prefix}.out")),
                SAMPLER_TOL,
            );
        }
        let churn = Churn {
            s_churn: c.scalar("churn.S_churn"),
            s_min: c.scalar("churn.S_min"),
            s_max: c.scalar("churn.S_max"),
            s_noise: c.scalar("churn.S_noise"),
        };
        let out = run_sampler(&s, &model, "churn", churn);
        assert_close(
            &format!("{}: churn", s.name),
            &out,
            &c.values("churn.out"),
            SAMPLER_TOL,
        );
    }
}

#[test]
fn torch_save_checkpoints_load_like_safetensors() {
    let mut checked = 0;
    for (s, dir) in sets_of("dit") {
        let pt = dir.join("weights.pt");
        if !pt.exists() {
            continue;
        }
        let a: MicroDit<B> = load(&s.cfg, &pt, &test_device());
        let b: MicroDit<B> = load(&s.cfg, &dir.join("weights.safetensors"), &test_device());
        assert_eq!(
            reference_tensors(&a, &DIT_KEYS).unwrap(),
            reference_tensors(&b, &DIT_KEYS).unwrap(),
            "{}: .pt and .safetensors differ",
            s.name
        );
        let c = &s.cases;
        let out = forward_case(&a, c);
        assert_close(
            &format!("{}: forward from .pt", s.name),
            &to_vec(out),
            &c.values("forward.out"),
            FORWARD_TOL,
        );
        checked += 1;
    }
    assert!(checked > 0, "no fixture set has a weights.pt");
}

#[test]
fn half_precision_forward_stays_close_to_reference() {
    use burn::tensor::FloatDType;
    for (s, dir) in sets_of("dit") {
        let c = &s.cases;
        // bf16 keeps 8 mantissa bits (ε ≈ 4e-3), f16 11 (ε ≈ 5e-4); a few layers deep the
        // output error is a few ε.
        for (dtype, tol) in [(FloatDType::BF16, 5e-2), (FloatDType::F16, 1e-2)] {
            let model: MicroDit<B> =
                load::<B>(&s.cfg, &dir.join("weights.safetensors"), &test_device()).cast(dtype);
            let out = forward_case(&model, c);
            assert_eq!(
                out.dtype(),
                burn::tensor::DType::F32,
                "outputs keep the inputs' dtype"
            );
            assert_close(
                &format!("{}: forward in {dtype:?}", s.name),
                &to_vec(out),
                &c.values("forward.out"),
                tol,
            );
        }
    }
}

/// Every kernel the binary embeds loads on this GPU (the model's tests above run only the
/// variants their shapes pick).
#[cfg(feature = "cuda-tests")]
#[test]
fn every_compiled_kernel_loads_on_this_gpu() {
    assert_eq!(
        microdit::backend::unloadable_kernels(0),
        Vec::<&str>::new(),
        "kernels this GPU did not load"
    );
}
