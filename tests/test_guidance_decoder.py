"""guidance.decoder: a tiny AutoencoderTiny decodes the x0 estimate for guidance, the full VAE the
final images; its distillation script (scripts/distill_tiny_decoder.py)."""

import json

import pytest
import torch
from diffusers import AutoencoderTiny

from al.config import ConfigError
from al.data import DIGIT_CLASSES
from al.folder_lock import FolderLock
from guidedgen.components import tiny_components
from guidedgen.generate import GenerateConfig, GuidanceConfig
from guidedgen.guidance_decoder import load_guidance_decoder
from guidedgen.palette import Palette, distinct_ade20k_colours
from guidedgen.sampler import GRADIENT_PATHS, GuidedControlNetSampler
from guidedgen.schedule import GuidanceSchedule
from scripts.distill_tiny_decoder import main as distill_main

PALETTE = Palette(tuple(DIGIT_CLASSES), distinct_ade20k_colours(11))
PROMPTS, SEEDS = ["three, seven", "one"], [11, 12]


@pytest.fixture(scope="module")
def components():
    return tiny_components(seed=0)  # its VAE upsamples 4x: three levels


def tiny_decoder(stages: int = 3, latent_channels: int = 4, seed: int = 0) -> AutoencoderTiny:
    torch.manual_seed(seed)
    return AutoencoderTiny(latent_channels=latent_channels, decoder_block_out_channels=(8,) * stages,
                           num_decoder_blocks=(1,) * stages, encoder_block_out_channels=(8,) * stages,
                           num_encoder_blocks=(0,) * stages).requires_grad_(False).eval()


def objective(images, masks):
    """Differentiable and per image; depends on where the image is bright, like a segmenter's score."""
    return (images * torch.linspace(0, 3, images.shape[-1])).sin().mean((1, 2, 3))


def sampler(components, decoder=None, path="through_unet", strength=0.5):
    return GuidedControlNetSampler(components, PALETTE, objective, GuidanceSchedule(strength=strength), path,
                                   num_inference_steps=4, guidance_scale=2.0, guidance_decoder=decoder)


def count_calls(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("path", GRADIENT_PATHS)
def test_guidance_decodes_with_the_tiny_decoder_and_final_images_with_the_vae(components, digit_masks_32, path):
    masks = digit_masks_32[0][:2]
    decoder = tiny_decoder()
    tiny_calls, vae_calls = [], []
    hooks = [count_calls(decoder.decoder, tiny_calls), count_calls(components.vae.decoder, vae_calls)]
    try:
        guided = sampler(components, decoder, path)(masks, PROMPTS, SEEDS)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(tiny_calls) == len(guided.traces[0].steps) == 3  # steps 0..2 of 4 (window [0, 0.8))
    assert len(vae_calls) == 1  # the final images only
    with torch.no_grad():
        assert torch.equal(guided.images, sampler(components).decode(guided.latents))
    # unguided, the decoder changes nothing
    plain = [sampler(components, d, path, strength=0.0)(masks, PROMPTS, SEEDS).images for d in (None, decoder)]
    assert torch.equal(*plain)


@pytest.mark.parametrize("path", GRADIENT_PATHS)
def test_guidance_gradient_is_the_one_through_the_tiny_decoder(components, digit_masks_32, path):
    masks = digit_masks_32[0][:2]
    decoder = tiny_decoder()
    guided = sampler(components, decoder, path)
    run = guided.prepare(masks, PROMPTS, SEEDS)
    output, gradient, value = guided._guidance_gradient(run, 0)

    # independently: x0 by the DDIM formula, decoded by the tiny decoder as diffusers' pipelines call it
    t = run.timesteps[0]
    alpha_bar = components.scheduler.alphas_cumprod[int(t)]
    with torch.enable_grad():
        z = run.latents.detach().clone().requires_grad_(True)
        if path == "through_unet":  # the gradient passes the UNet (and the ControlNet)
            x0 = (z - (1 - alpha_bar).sqrt() * guided.predict_noise(z, t, run.embeddings, run.controls)) / alpha_bar.sqrt()
        else:  # the gradient is taken w.r.t. the x0 estimate itself
            with torch.no_grad():
                x0 = (z - (1 - alpha_bar).sqrt() * guided.predict_noise(z, t, run.embeddings, run.controls)) / alpha_bar.sqrt()
            x0 = x0.requires_grad_(True)
        images = (decoder.decode(x0 / decoder.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        expected_value = objective(images, masks)
        (expected,) = torch.autograd.grad(expected_value.sum(), z if path == "through_unet" else x0)
    torch.testing.assert_close(value, expected_value.detach())
    torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-7)
    vae_gradient = sampler(components, None, path)._guidance_gradient(run, 0)[1]
    assert not torch.allclose(gradient, vae_gradient)  # not the VAE's gradient under another name


def test_decoder_image_vae_reads_the_full_image_and_carries_its_gradient_through_the_tiny_decoder(components,
                                                                                                digit_masks_32):
    """decoder_image="vae": the objective's value is the exact path's (the VAE's image), and the
    gradient is the objective's image gradient there, carried back through the tiny decoder."""
    masks = digit_masks_32[0][:2]
    decoder = tiny_decoder()
    straight = GuidedControlNetSampler(components, PALETTE, objective, GuidanceSchedule(strength=0.5), "x0_shortcut",
                                       num_inference_steps=4, guidance_scale=2.0, guidance_decoder=decoder,
                                       decoder_image="vae")
    run = straight.prepare(masks, PROMPTS, SEEDS)
    _, gradient, value = straight._guidance_gradient(run, 0)
    exact_value = sampler(components, None, "x0_shortcut")._guidance_gradient(run, 0)[2]
    torch.testing.assert_close(value, exact_value)

    t = run.timesteps[0]
    alpha_bar = components.scheduler.alphas_cumprod[int(t)]
    with torch.no_grad():
        x0 = (run.latents - (1 - alpha_bar).sqrt() * straight.predict_noise(run.latents, t, run.embeddings, run.controls)
              ) / alpha_bar.sqrt()
        full = (components.vae.decode(x0 / components.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    with torch.enable_grad():
        full.requires_grad_(True)
        (probe,) = torch.autograd.grad(objective(full, masks).sum(), full)
        x0.requires_grad_(True)
        tiny = (decoder.decode(x0 / decoder.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        (expected,) = torch.autograd.grad((tiny * probe).sum(), x0)
    torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"decoder_image='full'; choose one of \('tiny', 'vae'\)"):
        GuidedControlNetSampler(components, PALETTE, objective, guidance_decoder=decoder, decoder_image="full")
    with pytest.raises(ConfigError, match="guidance.decoder_image"):
        GenerateConfig(guidance=GuidanceConfig(decoder_image="full")).validate()


def test_bad_decoder_values_are_explained(tmp_path, components):
    vae = components.vae
    with pytest.raises(ConfigError, match="'guidance.decoder' = .*: no such folder; set guidance.decoder to 'vae'"):
        load_guidance_decoder(str(tmp_path / "missing"), vae)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot read its config.json"):
        load_guidance_decoder(str(tmp_path / "empty"), vae)
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(ConfigError, match="holds a 'AutoencoderKL', not an AutoencoderTiny"):
        load_guidance_decoder(str(tmp_path / "vae"), vae)
    tiny_decoder(latent_channels=8).save_pretrained(tmp_path / "wide")
    with pytest.raises(ConfigError, match=r"latent channels 8 vs the VAE's 4\); use a tiny decoder distilled for this VAE"):
        load_guidance_decoder(str(tmp_path / "wide"), vae)
    with pytest.raises(ConfigError, match="upsampling factor 2 vs the VAE's 4"):
        sampler(components, tiny_decoder(stages=2))
    with pytest.raises(ConfigError, match="guidance.decoder"):  # refused at config validation, before any model loads
        GenerateConfig(guidance=GuidanceConfig(decoder=str(tmp_path / "missing"))).validate()


def test_the_decoder_follows_the_vae_dtype_and_enters_the_identity_of_a_set(tmp_path, components):
    tiny_decoder().save_pretrained(tmp_path / "tiny")
    assert load_guidance_decoder("vae", components.vae) is None
    loaded = load_guidance_decoder(str(tmp_path / "tiny"), components.vae)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    half = tiny_components(seed=0)
    half.vae.to(torch.bfloat16)  # as fp16 on CUDA: guidance decodes in the VAE's dtype
    sampler(half, loaded)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert "decoder" not in GenerateConfig().defining_config()["guidance"]  # earlier sets keep their identity
    assert GenerateConfig(guidance=GuidanceConfig(decoder="x/y")).defining_config()["guidance"]["decoder"] == "x/y"
    identity = lambda **keys: GenerateConfig(guidance=GuidanceConfig(**keys)).defining_config()["guidance"]
    assert "decoder_image" not in identity(decoder="x/y") and "decoder_image" not in identity(decoder_image="vae")
    assert identity(decoder="x/y", decoder_image="vae")["decoder_image"] == "vae"


# -- distillation ----------------------------------------------------------------------------
def distill_args(model, output, *extra):
    return ["--config", "configs/tiny_decoder_digits.yaml", f"model={model}", f"output_dir={output}", "progress=false",
            "data.num_train_images=8", "data.num_val_images=4", "data.size=32", "steps=2", "batch_size=4",
            "channels=8", "decoder_blocks=[1,1,0]", *extra]


def test_distillation_writes_a_loadable_decoder_and_refuses_to_replace_one(tmp_path, tiny_diffusion_folder, capsys,
                                                                          components):
    out = tmp_path / "tiny"
    assert distill_main(distill_args(tiny_diffusion_folder, out)) == 0
    decoder = load_guidance_decoder(str(out), components.vae)
    assert decoder.decode(torch.zeros(1, 4, 8, 8)).sample.shape == (1, 3, 32, 32)
    record = json.loads((out / "distillation.json").read_text())
    assert len(record["losses"]) == 2 and set(record["errors"]) >= {"tiny_vs_full", "tiny_vs_real", "full_vs_real"}
    assert "tiny vs full decoder" in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no staging folder left behind
    weights = (out / "diffusion_pytorch_model.safetensors").read_bytes()

    assert distill_main(distill_args(tiny_diffusion_folder, out, "seed=5")) == 2
    err = capsys.readouterr().err
    assert "'output_dir'" in err and "is not empty" in err and "overwrite=true" in err
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == weights  # untouched
    with FolderLock(tmp_path / ".tiny.partial"):  # another run is writing it
        assert distill_main(distill_args(tiny_diffusion_folder, out, "overwrite=true")) == 2
    assert "being written by another process" in capsys.readouterr().err
    assert distill_main(distill_args(tiny_diffusion_folder, out, "overwrite=true")) == 0
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == weights  # same seed, same decoder
    assert distill_main(distill_args(tiny_diffusion_folder, tmp_path / "other", "decoder_blocks=[1,1]")) == 2
    assert "decoder_blocks needs one entry per VAE level" in capsys.readouterr().err


def test_latent_gradient_matches_finite_differences():
    """latent_gradient (guidance's gradient on the latents through a decoder, for an image probe)
    against central differences of <decode(z), v> along random directions, in float64."""
    from guidedgen.guidance_decoder import decode_latents
    from guidedgen.training.tiny_decoder import latent_gradient

    decoder = tiny_decoder().double()
    latents = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probes = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z = latents.clone().requires_grad_(True)
    gradient = latent_gradient(decode_latents(decoder, z), z, probes)
    with torch.no_grad():
        for seed in range(3):
            direction = torch.randn(latents.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + seed))
            value = lambda t: float((decode_latents(decoder, latents + t * direction) * probes).sum())
            numeric = (value(1e-6) - value(-1e-6)) / 2e-6
            assert float((gradient * direction).sum()) == pytest.approx(numeric, rel=1e-6)


def test_gradient_matching_brings_the_latent_gradients_closer_to_the_full_decoders(components):
    """With gradient_weight > 0 the student's latent gradients for Gaussian image probes end up
    nearer the full VAE's than after the same steps on images only (measured on the training
    latents with probes the training never drew)."""
    import dataclasses

    from guidedgen.training.tiny_decoder import (DistillTinyDecoderConfig, build_tiny_decoder, distill,
                                                 gradient_cosine)

    vae = components.vae.requires_grad_(False).eval()
    config = DistillTinyDecoderConfig(channels=8, decoder_blocks=[1, 1, 0], batch_size=8, steps=30,
                                      learning_rate=1e-2, progress=False)
    latents = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cosines = {}
    for weight in (0.0, 10.0):
        decoder = build_tiny_decoder(dataclasses.replace(config, gradient_weight=weight), vae)
        distill(decoder, vae, latents, dataclasses.replace(config, gradient_weight=weight))
        cosines[weight] = gradient_cosine(decoder, vae, latents, seed=12345)
    assert cosines[10.0] > cosines[0.0] + 0.1, cosines


def test_distillation_fine_tunes_from_init_from_and_records_the_gradient_cosine(tmp_path, tiny_diffusion_folder,
                                                                                capsys):
    """init_from starts from a distilled decoder (a run of 0 learning rate keeps its weights); the
    record and the card give the gradient term and the latent-gradient cosine; a decoder of another
    architecture is refused with the keys to fix."""
    first = tmp_path / "first"
    assert distill_main(distill_args(tiny_diffusion_folder, first)) == 0
    tuned = tmp_path / "tuned"
    assert distill_main(distill_args(tiny_diffusion_folder, tuned, f"init_from={first}", "gradient_weight=1.0",
                                     "learning_rate=0.0")) == 0
    name = "diffusion_pytorch_model.safetensors"
    assert (tuned / name).read_bytes() == (first / name).read_bytes()
    cosine = json.loads((tuned / "distillation.json").read_text())["errors"]["gradient_cosine"]
    card = (tuned / "README.md").read_text()
    assert "gradient matching" in card and f"starting from `{first}`" in card and f"{cosine['clean']:.3f}" in card
    assert distill_main(distill_args(tiny_diffusion_folder, tmp_path / "wide", f"init_from={first}", "channels=16")) == 2
    assert "its architecture is not channels=16" in capsys.readouterr().err
