"""Training the SD + ControlNet set: the quick mode makes a set that loads through the real
``from_pretrained`` path, and a resumed run ends exactly where an uninterrupted one does."""


import pytest
import torch
from diffusers import ControlNetModel

from al.config import ConfigError, load_config
from guidedgen.components import ComponentsConfig, load_components
from guidedgen.training import TrainControlNetConfig, train_controlnet
from scripts.train_controlnet import main as cli_main

QUICK = ["data.num_train_images=8", "data.num_val_images=2", "data.size=32", "architecture.unet_channels=[8,16]",
         "architecture.vae_channels=[8,16]", "architecture.conditioning_embedding_out_channels=[8,16]",
         "architecture.text_max_length=24", "vae_steps=2", "vae_decoder_steps=2", "vae_batch_size=4", "train_batch_size=4",
         "max_train_steps=4", "checkpointing_steps=2", "validation_steps=0", "lr_warmup_steps=1", "progress=false"]


def quick_config(output_dir, *extra):
    return load_config(TrainControlNetConfig, "configs/controlnet_digits.yaml",
                       [f"output_dir={output_dir}", "max_train_minutes=null", *QUICK, *extra])


def unet_weights(folder):
    components = load_components(ComponentsConfig(pretrained_model_name_or_path=str(folder),
                                                  controlnet_model_name_or_path=[str(folder / "controlnet")],
                                                  local_files_only=True))
    return components, torch.cat([p.flatten() for m in (components.unet, components.controlnets[0])
                                  for p in m.parameters()])


@pytest.mark.slow
def test_quick_training_writes_a_loadable_set_with_card_and_curve(tmp_path):
    output = train_controlnet(quick_config(tmp_path / "set"), "pytest")
    components, weights = unet_weights(output)
    assert components.unet.dtype == torch.float32 and torch.isfinite(weights).all()
    assert components.tokenizer.model_max_length == 24
    assert components.vae.config.scaling_factor != pytest.approx(0.18215)  # measured on the data
    assert components.scheduler.config.clip_sample is False
    assert (output / "loss_curve.png").stat().st_size > 5000
    assert "Command:** `pytest`" in (output / "README.md").read_text()
    steps = [int(line.split(",")[0]) for line in (output / "losses.csv").read_text().splitlines()[1:]]
    assert steps == [0, 1, 2, 3]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_a_resumed_run_matches_an_uninterrupted_one(tmp_path):
    straight = train_controlnet(quick_config(tmp_path / "straight"))
    # the "killed" run: the time cap stops it after its first step (checkpointing it), then it resumes
    stopped = train_controlnet(quick_config(tmp_path / "resumed", "max_train_minutes=0"))
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["checkpoint-1"]
    resumed = train_controlnet(quick_config(stopped))
    assert torch.equal(unet_weights(straight)[1], unet_weights(resumed)[1])
    steps = [int(line.split(",")[0]) for line in (resumed / "losses.csv").read_text().splitlines()[1:]]
    assert steps == [0, 1, 2, 3]  # no step logged twice


@pytest.mark.slow
def test_a_folder_of_another_run_is_refused(tmp_path, capsys):
    train_controlnet(quick_config(tmp_path / "set"))
    assert cli_main(["--config", "configs/controlnet_digits.yaml", f"output_dir={tmp_path / 'set'}",
                     "max_train_minutes=null", *QUICK, "learning_rate=0.1"]) == 2
    error = capsys.readouterr().err
    assert "holds work made with other settings (learning_rate: " in error and "0.1 now" in error


@pytest.mark.slow
def test_unconditional_samples_see_neither_prompt_nor_mask(tmp_path, monkeypatch):
    """The share ``proportion_unconditional`` trains CFG's negative branch: empty prompt, all-ignore control."""
    seen = []
    forward = ControlNetModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, controlnet_cond, *args, **kwargs):
        seen.append((encoder_hidden_states.detach().clone(), controlnet_cond.detach().clone()))
        return forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", spy)
    output = train_controlnet(quick_config(tmp_path / "set", "proportion_unconditional=0.5", "proportion_empty_prompts=0",
                                           "max_train_steps=8", "validation_steps=8"))
    assert (output / "samples" / "step-000008.png").is_file()  # sampled with CFG against the no-label mask
    text, control = (torch.cat(parts) for parts in zip(*seen[:8]))  # the 8 training steps, not the sheet's
    null = (control == 0).flatten(1).all(1)  # black: the void colour of a mask with no label
    assert len(null) == 32 and 0.25 < null.float().mean() < 0.75
    empty = text[null][0]
    assert all(torch.equal(t, empty) for t in text[null])  # the empty prompt, exactly when the mask is gone
    assert not any(torch.equal(t, empty) for t in text[~null])


@pytest.mark.parametrize("override,message", [
    ("architecture.conditioning_embedding_out_channels=[8]", "conditioning_embedding_out_channels"),
    ("data.size=34", "'data.size'"),
    ("proportion_empty_prompts=1.5", "proportion_empty_prompts"),
    ("save_dtype=fp8", "save_dtype"),
    ("foreground_loss_weight=0", "foreground_loss_weight"),
    ("proportion_unconditional=1", "proportion_unconditional"),
])
def test_bad_training_configs_are_explained(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        quick_config(tmp_path, override).validate()


@pytest.mark.slow
def test_decoder_finetuning_keeps_the_latent_space():
    from guidedgen.components import tiny_components
    from guidedgen.training import finetune_vae_decoder

    vae = tiny_components(0, vae_channels=(8, 16), image_size=32).vae
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents_before = vae.encode(images).latent_dist.mean
        decoded_before = vae.decode(latents_before).sample
    losses = finetune_vae_decoder(vae, images, steps=5, batch_size=4, learning_rate=1e-2, seed=0,
                                  device=torch.device("cpu"), progress=False)
    with torch.no_grad():
        assert torch.equal(vae.encode(images).latent_dist.mean, latents_before)  # the UNet's space
        assert not torch.allclose(vae.decode(latents_before).sample, decoded_before)
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert not any(p.requires_grad for p in vae.parameters())


def test_foreground_weights_mark_every_latent_pixel_an_object_touches():
    from guidedgen.training import foreground_weights

    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[0, 1, 6] = 3  # one pixel of a thin stroke
    masks[1, 4:, :4] = 255  # ignored, not an object
    masks[1, 0, 0] = 7
    weights = foreground_weights(masks, 4, 5.0, background_index=0, ignore_index=255)
    expected = torch.ones(2, 1, 4, 4)
    for n, row, col in ((0, 1, 6), (1, 0, 0)):  # each object pixel lies in latent cell (row // 2, col // 2)
        expected[n, 0, row // 2, col // 2] = 5.0
    assert torch.equal(weights, expected)
    assert torch.equal(foreground_weights(masks, 4, 1.0, 0, 255), torch.ones(2, 1, 4, 4))


def test_weighted_denoising_error_is_a_weighted_mean_per_sample():
    import numpy as np

    from guidedgen.training import weighted_denoising_error

    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 4, 6, 6, generator=generator), torch.randn(3, 4, 6, 6, generator=generator)
    weights = 1 + 4 * (torch.rand(3, 1, 6, 6, generator=generator) > 0.7).float()
    squared = ((prediction - target) ** 2).numpy()
    expected = [np.average(squared[i], weights=np.broadcast_to(weights[i].numpy(), squared[i].shape)) for i in range(3)]
    # two float32 sums of 144 positive terms, both pairwise/cascaded: ~log2(144) eps32 = 1e-6 relative each
    assert weighted_denoising_error(prediction, target, weights) == pytest.approx(expected, rel=1e-5)
    uniform = weighted_denoising_error(prediction, target, torch.ones(3, 1, 6, 6))
    assert torch.allclose(uniform, torch.nn.functional.mse_loss(prediction, target, reduction="none").mean((1, 2, 3)))
