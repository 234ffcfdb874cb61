"""The main job: masks -> guided synthetic image/mask pairs written as a dataset.

Runs under ``accelerate launch`` with any number of processes: indices are split without padding,
each process writes only its own finished samples, and a re-run resumes.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import diffusers
import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from al.config import ConfigError, require
from al.data.base import DatasetError, Sample, SegmentationDataset, read_index_mask
from al.data.config import DataConfig
from al.data.folder import load_folder, read_metadata
from al.data.transforms import centre_crop_or_pad, resize_image, resize_labels, round_to_multiple, short_side_size
from al.diffusion_features import ENSEMBLE_RECORD
from al.folder_lock import FolderLock
from al.inference import View, input_multiple, size_groups
from al.models import Segmenter, load_model
from al.scores import entropy
from guidedgen.components import (
    SCHEDULERS,
    TORCH_DTYPES,
    Components,
    ComponentsConfig,
    load_components,
    tiny_components,
    weights_dtype,
)
from guidedgen.controls import CONTROL_DETECTORS
from guidedgen.guidance import OBJECTIVES, LastLayerGuide, build_objective
from guidedgen.guidance_decoder import FULL_VAE, decoder_location, load_guidance_decoder
from guidedgen.instances import Instance, InstanceConfig, find_instances, instance_mask, make_crop, paste
from guidedgen.palette import (
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_PROMPT_TEMPLATE,
    Palette,
    PaletteConfig,
    build_palette,
    prompt_for,
)
from guidedgen.quality import assess
from guidedgen.sampler import DECODER_IMAGES, GRADIENT_PATHS, GuidedControlNetSampler, KnownRegion, SamplerOutput
from guidedgen.schedule import NORMALISATIONS, GuidanceSchedule
from guidedgen.sheet import contact_sheet
from guidedgen.writer import GenerationWriter, sample_seed, shard


MASK_FITS = ("crop", "pad")


@dataclass
class GuidanceConfig:
    objective: Optional[str] = "entropy"
    strength: float = 0.0  # 0 = unguided
    start: float = 0.0
    end: float = 0.8
    every: int = 1
    normalize: str = "rms"
    clip: Optional[float] = None
    decay: str = "constant"
    gradient_path: str = "through_unet"
    # The objective sees the x0 estimate decoded at 1/n resolution (guidedgen.resolution): about
    # n^2 less decoder and segmenter work per guided step; 1 = full resolution, the exact path
    decode_downsample: int = 1
    # What decodes the x0 estimate for the objective: "vae" (the full VAE, exact), or an
    # AutoencoderTiny folder or hub id (guidedgen.guidance_decoder): cheaper per guided step.
    # Final images are always decoded by the full VAE
    decoder: str = FULL_VAE
    # With a tiny decoder: whose image the objective reads, "tiny" or "vae" (the full VAE's image,
    # decoded without a graph, while the gradient flows through the tiny decoder: one more VAE
    # forward per guided step, and the objective's image gradient is the exact path's)
    decoder_image: str = "tiny"
    segmenters: list[str] = field(default_factory=list)  # saved models (al.models.load_model): segmenters or a pixel ensemble
    # the objective's own keyword arguments, e.g. {kind: vote_entropy} for committee, {labels:
    # sampled} for expected_model_change, {k: 16} for mc_dropout_std; unset = its defaults
    options: dict[str, Any] = field(default_factory=dict)

    def schedule(self) -> GuidanceSchedule:
        return GuidanceSchedule(self.strength, self.start, self.end, self.every, self.normalize, self.clip, self.decay)

    def validate_options(self, prefix: str = "guidance") -> None:
        """Every option is a keyword argument of the objective (not the guides, not the generator)."""
        if self.objective not in OBJECTIVES:
            return
        accepted = sorted(set(inspect.signature(OBJECTIVES[self.objective]).parameters)
                          - {"segmenters", "ignore_index", "generator"})
        for key in self.options:
            require(key in accepted, f"{prefix}.options", key, f"an option of objective {self.objective!r}: {accepted}")


@dataclass
class GenerateConfig:
    output_dir: str = "outputs/generated"
    num_samples: int = 8
    seed: int = 0
    batch_size: int = 4
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    controlnet_conditioning_scale: list[float] = field(default_factory=lambda: [1.0])
    overwrite: bool = False
    tiny_components: bool = False  # random tiny SD + ControlNet(s) built in code (tests, CPU demo)
    tiny_seed: int = 0
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    masks: DataConfig = field(default_factory=DataConfig)  # masks.transforms are training's: not used here
    masks_split: str = "train"
    # Masks of any size (VOC, ADE20K, CamVid): resized (nearest) so the short side is `resolution`
    # pixels (512 for SD-1.5; null: as read), then each side centre-cropped ("crop") or padded with
    # the ignore value ("pad") to a multiple the components take (64 for SD-1.5). A sample is
    # written with the mask it was generated from, at its image's size. Whole-image mode only:
    # instance mode resizes its crops to instances.size.
    resolution: Optional[int] = None
    fit: str = "crop"
    # Instance mode (guidedgen.instances): each sample is a real image with one of its instances
    # regenerated; sample i is instance i mod (number of instances), variant i // (that number).
    # null: whole images generated from the masks (sample i from mask i mod the number of masks)
    instances: Optional[InstanceConfig] = None
    # controls for ControlNets after the seg one, computed from the image behind each mask
    extra_controls: list[str] = field(default_factory=list)
    palette: PaletteConfig = field(default_factory=PaletteConfig)
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    # The mask the classifier-free-guidance negative branch sees: null = the mask itself (diffusers'
    # default; CFG then amplifies only the prompt), "ignore" = no label anywhere (for a model trained
    # with ``proportion_unconditional``), or a class name (e.g. "background": CFG pushes away from a
    # scene of only that class, which brings out the mask's objects).
    negative_mask: Optional[str] = None
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    quality_segmenter: Optional[str] = None  # default: the first guidance segmenter
    ignore_disagreement: bool = False  # write ignore maps where the segmenter disagrees with the mask
    drop_degenerate: bool = True
    min_image_std: float = 0.02
    vae_gradient_checkpointing: bool = False
    vae_slicing: bool = False
    contact_sheet_samples: int = 4
    contact_sheet_file: str = "contact_sheet.png"  # written beside the dataset by scripts/generate.py
    progress: bool = True

    def validate(self) -> None:
        require(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(self.num_inference_steps >= 1, "num_inference_steps", self.num_inference_steps, "an integer >= 1")
        require(self.guidance.objective is None or self.guidance.objective in OBJECTIVES, "guidance.objective",
                self.guidance.objective, f"null or one of {sorted(OBJECTIVES)}")
        self.guidance.validate_options()
        try:  # the schedule checks its own strength, window, step, normalisation and clip
            self.guidance.schedule()
        except ValueError as error:
            raise ConfigError(f"config key 'guidance': {error}") from None
        require(self.guidance.gradient_path in GRADIENT_PATHS, "guidance.gradient_path", self.guidance.gradient_path,
                f"one of {GRADIENT_PATHS}")
        require(isinstance(self.guidance.decode_downsample, int) and self.guidance.decode_downsample >= 1,
                "guidance.decode_downsample", self.guidance.decode_downsample, "an integer >= 1 (1 = full resolution)")
        if self.guidance.decoder != FULL_VAE:
            decoder_location(self.guidance.decoder)
        require(self.guidance.decoder_image in DECODER_IMAGES, "guidance.decoder_image", self.guidance.decoder_image,
                f"one of {DECODER_IMAGES} (whose image the objective reads when guidance.decoder is a tiny decoder)")
        require(self.guidance.normalize in NORMALISATIONS, "guidance.normalize", self.guidance.normalize, f"one of {NORMALISATIONS}")
        require(self.guidance.strength == 0 or self.guidance.objective is None or len(self.guidance.segmenters) > 0,
                "guidance.segmenters", self.guidance.segmenters, "at least one segmenter folder when strength > 0")
        last_layer = self.guidance.objective in OBJECTIVES and OBJECTIVES[self.guidance.objective].guide is LastLayerGuide
        for path in self.guidance.segmenters:  # a pixel ensemble has no separate last layer
            require(not last_layer or not Path(path, ENSEMBLE_RECORD).is_file(), "guidance.segmenters", path,
                    f"a Segmenter folder: objective {self.guidance.objective!r} reads the last layer, which a "
                    f"diffusion-feature ensemble has not (guide it with entropy or committee)")
        for path in self.guidance.segmenters + ([self.quality_segmenter] if self.quality_segmenter else []):
            require(Path(path, "config.json").is_file(), "guidance.segmenters", path, "a folder written by Segmenter.save_pretrained (or a diffusion-feature ensemble)")
        require(self.components.scheduler in SCHEDULERS, "components.scheduler", self.components.scheduler, f"one of {sorted(SCHEDULERS)}")
        require(self.components.mixed_precision in TORCH_DTYPES, "components.mixed_precision",
                self.components.mixed_precision, f"one of {sorted(TORCH_DTYPES)}")
        self.masks.validate("masks")
        require(self.resolution is None or self.resolution >= 1, "resolution", self.resolution,
                "null (masks as read) or the generator's resolution in pixels, e.g. 512")
        require(self.fit in MASK_FITS, "fit", self.fit, f"one of {MASK_FITS}")
        if self.instances is not None:
            self.instances.validate()
            require(self.resolution is None, "resolution", self.resolution,
                    "null in instance mode (instances.size is the resolution of its crops)")
            require(self.masks.kind != "masks", "instances", "set", "null with masks.kind=masks: instance mode "
                    "regenerates objects inside the images behind the masks")
        for name in self.extra_controls:
            require(name in CONTROL_DETECTORS, "extra_controls", name, f"one of {sorted(CONTROL_DETECTORS)}")
        require(not (self.extra_controls and self.masks.kind == "masks"), "extra_controls", self.extra_controls,
                "none with masks.kind=masks: extra controls are computed from the images behind the masks")
        controlnets = 1 + len(self.extra_controls)
        require(len(self.controlnet_conditioning_scale) == controlnets, "controlnet_conditioning_scale",
                self.controlnet_conditioning_scale, f"{controlnets} values (one per ControlNet)")
        require(self.tiny_components or len(self.components.controlnet_model_name_or_path) == controlnets,
                "components.controlnet_model_name_or_path", self.components.controlnet_model_name_or_path,
                f"{controlnets} ControlNets: the seg one, then one per extra control")

    def defining_config(self) -> dict:
        """What defines the samples: everything but where they go, how many, and how fast."""
        values = dataclasses.asdict(self)
        for key in ("output_dir", "num_samples", "overwrite", "batch_size", "progress", "contact_sheet_samples",
                    "contact_sheet_file", "vae_gradient_checkpointing", "vae_slicing"):
            values.pop(key)
        values["masks"].pop("transforms")  # training's, not generation's
        # Sets written before masks were fitted keep their identity while the defaults leave masks as read
        if self.resolution is None:
            values.pop("resolution")
        if self.fit == "crop":
            values.pop("fit")
        # Sets written before guidance.options recorded the options' defaults as flat keys: a set
        # with no options keeps that identity, so those folders still resume.
        options = values["guidance"].pop("options")
        values["guidance"].update(committee_kind="kl", emc_labels="mask", mc_samples=8)
        if options:
            values["guidance"]["options"] = options
        if self.guidance.decoder == FULL_VAE:  # sets written before the key existed keep their identity
            values["guidance"].pop("decoder")
        if self.guidance.decoder == FULL_VAE or self.guidance.decoder_image == "tiny":  # likewise; no effect with the VAE
            values["guidance"].pop("decoder_image")
        return values


def build_components(config: GenerateConfig, device: torch.device) -> Components:
    dtype = weights_dtype(config.components.mixed_precision, device)
    if config.tiny_components:
        components = tiny_components(config.tiny_seed, 1 + len(config.extra_controls), config.components.scheduler)
    else:
        components = load_components(config.components, dtype)
    return components.to(device, None if dtype == torch.float32 else dtype)


def build_sampler(config: GenerateConfig, components: Components, palette: Palette, segmenters: list[Segmenter],
                  ignore_index: int, strength: Optional[float] = None) -> GuidedControlNetSampler:
    guidance = config.guidance
    schedule = guidance.schedule()
    if strength is not None:
        schedule = dataclasses.replace(schedule, strength=strength)
    objective = None
    if guidance.objective is not None and segmenters:
        objective = build_objective(guidance.objective, segmenters, ignore_index, **guidance.options)
    return GuidedControlNetSampler(
        components, palette, objective, schedule, guidance.gradient_path, config.num_inference_steps,
        config.guidance_scale, config.controlnet_conditioning_scale, config.negative_prompt,
        negative_mask_fill=negative_mask_fill(config.negative_mask, list(palette.classes), ignore_index),
        decode_downsample=guidance.decode_downsample, vae_gradient_checkpointing=config.vae_gradient_checkpointing, vae_slicing=config.vae_slicing,
        guidance_decoder=load_guidance_decoder(guidance.decoder, components.vae, config.components.local_files_only),
        decoder_image=guidance.decoder_image,
        progress=config.progress,  # a per-step bar inside each batch's bar (cleared when the batch ends)
    )


def negative_mask_fill(negative_mask: Optional[str], classes: list[str], ignore_index: int) -> Optional[int]:
    """The mask value that ``GenerateConfig.negative_mask`` names (None: the negative branch sees the mask)."""
    if negative_mask is None:
        return None
    if negative_mask == "ignore":
        return ignore_index
    require(negative_mask in classes, "negative_mask", negative_mask, f"null, \"ignore\" or one of the classes {classes}")
    return classes.index(negative_mask)


def _model_names(config: GenerateConfig) -> dict:
    if config.tiny_components:
        return {"components": f"tiny_components(seed={config.tiny_seed})"}
    return {"pretrained_model_name_or_path": config.components.pretrained_model_name_or_path,
            "controlnet_model_name_or_path": config.components.controlnet_model_name_or_path,
            "revision": config.components.revision}


def extra_controls(config: GenerateConfig, references: list[torch.Tensor]) -> list[torch.Tensor]:
    """Control images for the ControlNets after the seg one, from the images behind the masks."""
    if not config.extra_controls:
        return []
    stacked = torch.stack(references)
    return [CONTROL_DETECTORS[name](stacked) for name in config.extra_controls]


def run_generation(config: GenerateConfig, state: Optional[PartialState] = None) -> Path:
    """Generate (or resume) ``config.num_samples`` samples into ``config.output_dir``."""
    config.validate()
    state = state or PartialState(cpu=not torch.cuda.is_available())
    masks_dataset: SegmentationDataset = config.masks.build(config.masks_split)
    classes, ignore_index = list(masks_dataset.classes), masks_dataset.ignore_index
    units = instance_units(config, masks_dataset)  # before anything is written: an empty selection is an error
    palette = build_palette(config.palette, classes, ignore_index)
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    segmenters = [load_model(p, state.device) for p in config.guidance.segmenters]
    quality_path = config.quality_segmenter or (config.guidance.segmenters[0] if config.guidance.segmenters else None)
    quality_model = load_model(quality_path, state.device) if quality_path else None
    for path, model in zip([*config.guidance.segmenters, quality_path], [*segmenters, quality_model]):
        require(model is None or model.num_classes == len(classes),
                "quality_segmenter" if path == config.quality_segmenter else "guidance.segmenters", path,
                f"a segmenter of the masks' {len(classes)} classes {classes} (it predicts {getattr(model, 'num_classes', '?')})")
    # One launch writes a folder: its main process holds the folder's lock for the whole run (the others
    # of the launch write only their own shard); only the lock holder may clear or tidy the folder
    lock = FolderLock(config.output_dir, "generated dataset")
    try:
        with state.main_process_first():
            if state.is_main_process:
                lock.acquire()
            writer = GenerationWriter(config.output_dir, classes, palette.colours.tolist(), config.defining_config(),
                                      ignore_index, overwrite=config.overwrite and state.is_main_process,
                                      versions=versions, owner=state.is_main_process, own_files=[config.contact_sheet_file])
        _write_pending(config, state, writer, masks_dataset, units, palette, segmenters, quality_model)
        state.wait_for_everyone()
    finally:
        lock.release()
    return Path(config.output_dir)


def _write_pending(config: GenerateConfig, state: PartialState, writer: GenerationWriter,
                   masks_dataset: SegmentationDataset, units: Optional[list[Instance]], palette: Palette,
                   segmenters: list, quality_model) -> None:
    """Generate and write this process's shard of the samples not yet written."""
    device, classes, ignore_index = state.device, list(masks_dataset.classes), masks_dataset.ignore_index
    mine = writer.pending(shard(range(config.num_samples), state.process_index, state.num_processes))
    sampler = build_sampler(config, build_components(config, device), palette, segmenters, ignore_index)
    fitted = MaskFit(config.resolution, config.fit, sampler.size_multiple, ignore_index)
    batches = size_batches(config, masks_dataset, units, fitted, mine)
    for batch in tqdm(batches, desc=f"generate (process {state.process_index})", disable=not config.progress):
        seeds = [sample_seed(config.seed, i) for i in batch]
        if units is None:
            read = [masks_dataset[i % len(masks_dataset)] for i in batch]
            sources = [fitted(s) for s in read]
            masks = torch.stack([s.mask for s in sources])
            prompts = [prompt_for(m, classes, config.prompt_template) for m in masks]
            output = sampler(masks.to(device), prompts, seeds, extra_controls(config, [s.image for s in sources]))
            images, placed = output.images, [{} for _ in batch]
        else:
            chosen = [units[i % len(units)] for i in batch]
            sources = [masks_dataset[u.source_index] for u in chosen]
            masks = torch.stack([s.mask for s in sources])  # the real masks label the augmented images
            images, prompts, output, placed = regenerate_instances(config, sampler, sources, chosen, seeds, classes, device)
            for j, index in enumerate(batch):
                placed[j]["variant"] = index // len(units)
        if quality_model is not None:
            qualities, disagree = assess(quality_model, images, masks.to(device), ignore_index, config.min_image_std)
        else:
            qualities, disagree = [None] * len(batch), None
        for j, index in enumerate(batch):
            quality = qualities[j]
            metadata = {
                "source_id": sources[j].id, "prompt": prompts[j], "seed": seeds[j],
                "written_by_process": f"{state.process_index}/{state.num_processes}",
                "models": _model_names(config), "objective": config.guidance.objective,
                "strength": config.guidance.strength, "trace": output.traces[j].summary(),
                "quality": dataclasses.asdict(quality) if quality else None,
                **({"instance": placed[j]} if units is not None else {}),
                **({"source_size": list(read[j].mask.shape)} if units is None and read[j] is not sources[j] else {}),
            }
            image = (images[j].permute(1, 2, 0).float().cpu().numpy() * 255 + 0.5).astype(np.uint8)
            if config.drop_degenerate and float(images[j].float().std()) < config.min_image_std:
                writer.drop(index, "degenerate", metadata)
                continue
            ignore = disagree[j].cpu().numpy() if (config.ignore_disagreement and disagree is not None) else None
            writer.write(index, image, masks[j].numpy().astype(np.uint8), ignore, metadata)


@dataclass(frozen=True)
class MaskFit:
    """Whole-image mode's masks brought to a size the components take (``GenerateConfig.resolution``
    and ``fit``), with the images behind them (the extra controls' input) alike."""

    resolution: Optional[int]
    fit: str
    multiple: int
    ignore_index: int

    def scaled(self, height: int, width: int) -> tuple[int, int]:
        return (height, width) if self.resolution is None else short_side_size(height, width, self.resolution)

    def size(self, height: int, width: int) -> tuple[int, int]:
        """The size a mask of ``(height, width)`` is generated at."""
        return round_to_multiple(self.scaled(height, width), self.multiple, down=self.fit == "crop")

    def __call__(self, sample: Sample) -> Sample:
        """``sample`` at :meth:`size` (itself when it is that size already)."""
        size = self.size(*sample.mask.shape)
        if size == tuple(sample.mask.shape):
            return sample
        scaled = self.scaled(*sample.mask.shape)
        return Sample(sample.id, centre_crop_or_pad(resize_image(sample.image, scaled), size, 0.0),
                      centre_crop_or_pad(resize_labels(sample.mask, scaled), size, self.ignore_index))


def size_batches(config: GenerateConfig, dataset: SegmentationDataset, units: Optional[list[Instance]],
                 fitted: MaskFit, indices: list[int]) -> list[list[int]]:
    """``indices`` in batches of at most ``config.batch_size`` samples of one size (the size they are
    generated at; in instance mode their source image's), in order within each size."""
    shapes = dataset.image_shapes()
    if units is None:
        sizes = [fitted.size(*shapes[dataset.ids[i % len(dataset)]]) for i in indices]
    else:
        sizes = [shapes[dataset.ids[units[i % len(units)].source_index]] for i in indices]
    groups = [[indices[p] for p in group] for group in size_groups(sizes)]
    return [group[i:i + config.batch_size] for group in groups for i in range(0, len(group), config.batch_size)]


def instance_units(config: GenerateConfig, dataset: SegmentationDataset) -> Optional[list[Instance]]:
    """The instances of instance mode (None in whole-image mode); an error when there are none."""
    if config.instances is None:
        return None
    units = find_instances(dataset, config.instances, config.seed)
    if not units:
        names = [dataset.classes[i] for i in config.instances.class_ids(list(dataset.classes))]
        where = config.masks.kind + (f" at {config.masks.root}" if config.masks.root else "")
        raise DatasetError(f"masks ({where}, split {config.masks_split!r}): no instance of the classes {names} has "
                           f"instances.min_area={config.instances.min_area} pixels; lower it or choose other classes")
    return units


def regenerate_instances(config: GenerateConfig, sampler: GuidedControlNetSampler, sources: list, chosen: list[Instance],
                         seeds: list[int], classes: list[str], device: torch.device
                         ) -> tuple[torch.Tensor, list[str], SamplerOutput, list[dict]]:
    """One batch of instance mode: the real images with the chosen instances regenerated (in [0, 1],
    float32 on ``device``), the crops' prompts, the sampler's output on the crops, and where each was placed."""
    settings = config.instances
    class_ids = settings.class_ids(classes)
    pixels = [instance_mask(s.mask.numpy(), u, settings, class_ids) for s, u in zip(sources, chosen)]
    crops = [make_crop(s.image, s.mask, p, settings) for s, p in zip(sources, pixels)]
    masks = torch.stack([c.mask for c in crops])
    prompts = [prompt_for(m, classes, config.prompt_template) for m in masks]
    known = KnownRegion(torch.stack([c.image for c in crops]).to(device), torch.stack([c.regenerate for c in crops]),
                        settings.strength)
    output = sampler(masks.to(device), prompts, seeds, extra_controls(config, [c.image for c in crops]), known=known)
    images = torch.stack([paste(s.image, generated.float().cpu(), p, c.box, settings)
                          for s, generated, p, c in zip(sources, output.images, pixels, crops)]).to(device)
    placed = [{"rank": u.rank, "class": classes[u.class_id], "area": u.area, "box": list(c.box)} for u, c in zip(chosen, crops)]
    return images, prompts, output, placed


def write_contact_sheet(config: GenerateConfig, path: Path) -> Optional[Path]:
    """Contact sheet of the first finished samples of the first one's size: their control image (in
    instance mode: the real image and its mask), the unguided sample of the same seed, the guided
    sample as written, and the guiding segmenter's entropy on it."""
    dataset = load_folder(config.output_dir)
    if min(config.contact_sheet_samples, len(dataset)) == 0 or not config.guidance.segmenters:
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = dataset.image_shapes()  # one size: the unguided samples are generated as one batch
    same_size = [i for i, sample_id in enumerate(dataset.ids) if shapes[sample_id] == shapes[dataset.ids[0]]]
    samples = [dataset[i] for i in same_size[:config.contact_sheet_samples]]
    records = [{r["id"]: r for r in read_metadata(Path(config.output_dir))}[s.id] for s in samples]
    # the conditioning masks as written, without the quality check's ignore map
    masks = torch.stack([torch.from_numpy(read_index_mask(Path(config.output_dir, r["mask"])).astype(np.int64))
                         for r in records]).to(device)
    classes = list(dataset.classes)
    palette = build_palette(config.palette, classes, dataset.ignore_index)
    segmenter = load_model(config.guidance.segmenters[0], device)
    unguided = build_sampler(config, build_components(config, device), palette, [], dataset.ignore_index, strength=0.0)
    seeds = [r["seed"] for r in records]
    source_set = config.masks.build(config.masks_split) if config.extra_controls or config.instances else None
    sources = [source_set[source_set.index_of(r["source_id"])] for r in records] if source_set else []
    if config.instances is None:  # the images behind the masks, fitted as the masks were
        fitted = MaskFit(config.resolution, config.fit, unguided.size_multiple, dataset.ignore_index)
        sources = [fitted(s) for s in sources]
        plain = unguided(masks, [r["prompt"] for r in records], seeds, extra_controls(config, [s.image for s in sources])).images
    else:  # the same instances regenerated unguided
        chosen = [Instance(source_set.index_of(r["source_id"]), r["instance"]["rank"], classes.index(r["instance"]["class"]),
                           r["instance"]["area"]) for r in records]
        plain = regenerate_instances(config, unguided, sources, chosen, seeds, classes, device)[0]
    guided = torch.stack([s.image for s in samples]).to(device)
    view = View.of(guided.shape[-2:], multiple=input_multiple(segmenter))
    with torch.no_grad():
        uncertainty = entropy(view.maps(segmenter(view.images(guided)).softmax(1))[None])
    to_uint8 = lambda x: (x.permute(0, 2, 3, 1).float().cpu().numpy() * 255 + 0.5).astype(np.uint8)
    captions = [f"{s.id}: {r['objective']} x{r['strength']}" for s, r in zip(samples, records)]
    if config.instances is None:
        panels = {"mask (control image)": palette.colourise(masks), "unguided": plain, "guided": guided}
    else:
        panels = {"real image": torch.stack([s.image for s in sources]), "mask": palette.colourise(masks),
                  "regenerated unguided": plain, "regenerated guided": guided}
    contact_sheet({title: to_uint8(images) for title, images in panels.items()}, uncertainty.cpu().numpy(), captions, path)
    return path
