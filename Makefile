# Two entry points: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned: these releases are the ones whose torchvision imports on this CPU machine.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# OpenMP threads wait passively: on a busy machine spinning threads multiply the suite's CPU time
# (17 min instead of ~2 seen under load); two threads, the machine's cores.
TEST_ENV := OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2

.PHONY: demo augment-demo augment-benchmark al-demo al-benchmark balent-study mc-resolution-study al-digits pipeline-digits pipeline-benchmark \
	few-labels-benchmark controlnet-train tiny-decoder benchmarks test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job on the embedded default: a segmenter trained briefly on DigitScenes guides
# generation from DigitScenes masks; writes outputs/demo/generated/ and its contact_sheet.png.
demo: $(STAMP)
	$(PY) scripts/train_segmenter.py --config configs/segmenter_digits.yaml
	$(PY) scripts/generate.py --config configs/demo.yaml overwrite=true

# Instance-level augmentation: real scenes with one digit regenerated (unguided and guided, side by
# side in sheet.png); writes outputs/augment_demo/. Trains the demo's segmenter first if missing.
augment-demo: $(STAMP)
	test -f outputs/demo/segmenter/config.json || $(PY) scripts/train_segmenter.py --config configs/segmenter_digits.yaml
	$(PY) scripts/generate.py --config configs/augment_demo.yaml overwrite=true

# Does augmentation beat real data alone? (issue 25; docs/results/augment_digits3.md) DigitScenes-3
# at 25 real scenes, then at 100 (as many optimizer steps: 37 epochs of 13 batches), 5 seeds each;
# whole-image and instance-level sets, unguided and committee-guided, each also re-sampled by
# hardness. Resumable: re-run to continue. Stage time measured on 2 CPU cores beside other work:
# 2.1 h at 25 scenes, 3.0 h at 100 (generation 1.8 h of it), over the 4 h aimed at; the 100-scene
# half already retrains with the fine-tune recipe only.
augment-benchmark: $(STAMP)
	$(PY) scripts/pipeline.py --config configs/augment_digits3.yaml
	$(PY) scripts/pipeline.py --config configs/augment_digits3.yaml data.num_train_images=100 train.epochs=37 \
		'recipes=[finetune]' output_dir=outputs/augment_digits3_100

# Sparse-pixel active learning on DigitScenes (BalEnt vs random); writes outputs/al_demo/.
al-demo: $(STAMP)
	$(PY) scripts/active_learning.py --config configs/al_demo.yaml

# The AL benchmark (issue 16): 8 acquisitions x 3 seeds x 5 cycles on DigitScenes-3, with the
# dense ceiling; resumable (re-run to continue). About 80 minutes on 2 CPU cores.
al-benchmark: $(STAMP)
	$(PY) scripts/active_learning.py --config configs/al_digits3.yaml

# docs/results/balent_study.md (issue 30.3): where BalEnt stands against margin, entropy and random
# when one AL setting of the benchmark changes (3 seeds each): the paper's budget (5 px/image/cycle,
# 10 cycles), the PixelPick selection rule, K = 50 MC samples, dropout 0.5. The benchmark's own run
# (docs/results/al_digits3_curve.csv) is the reference. Resumable; its four runs took 59, 23, 25 and
# 32 min at one thread each (two side by side on 2 cores: 1.5 h).
STUDY := outputs/balent_study
AL3 := $(PY) scripts/active_learning.py --config configs/al_digits3.yaml supervised_reference=false
balent-study: $(STAMP)
	$(AL3) output_dir=$(STUDY)/n5_c10 'acquisitions=[balent,margin,entropy,random]' loop.pixels_per_image=5 loop.cycles=10
	$(AL3) output_dir=$(STUDY)/pixelpick 'acquisitions=[balent,margin,entropy]' loop.selection=pixelpick
	$(AL3) output_dir=$(STUDY)/k50 'acquisitions=[balent,margin,entropy]' loop.mc_samples=50
	$(AL3) output_dir=$(STUDY)/dropout05 'acquisitions=[balent,margin,entropy,random]' loop.model.dropout=0.5
	$(PY) scripts/compare_settings.py benchmark=docs/results/al_digits3_curve.csv n5_c10=$(STUDY)/n5_c10/curve.csv \
		pixelpick=$(STUDY)/pixelpick/curve.csv k50=$(STUDY)/k50/curve.csv dropout05=$(STUDY)/dropout05/curve.csv \
		--random-from pixelpick=benchmark k50=benchmark --plot docs/results/balent_study.png

# docs/results/mc_resolution.md (issue 29.1): does MC dropout at the decoder's resolution keep the AL
# result? The benchmark's Unet decodes at full resolution (the flag is a no-op there), so both runs use
# DeepLabV3+ on the benchmark's encoder (depth 4: decoder output at 1/4 of the input); 3 seeds each,
# random and the dense ceiling once (neither uses MC). Resumable; two workers share the cores.
MCRES := outputs/mc_resolution
AL3D := $(AL3) workers=2 loop.model.arch=deeplabv3plus loop.model.encoder_depth=4 loop.model.decoder_channels=null
mc-resolution-study: $(STAMP)
	$(AL3D) output_dir=$(MCRES)/full supervised_reference=true 'acquisitions=[random,balent,entropy,margin,bald]'
	$(AL3D) output_dir=$(MCRES)/decoder 'acquisitions=[balent,entropy,margin,bald]' loop.mc_at_decoder_resolution=true
	$(PY) scripts/compare_settings.py full=$(MCRES)/full/curve.csv decoder=$(MCRES)/decoder/curve.csv \
		--random-from decoder=full --paired-with decoder=full --plot docs/results/mc_resolution.png

# docs/results/al_digits.md, the older ten-class AL experiment: 7 acquisitions x 3 seeds, then BalEnt on the diffusion-feature ensemble.
al-digits: $(STAMP)
	$(PY) scripts/active_learning.py --config configs/al_digits.yaml
	$(PY) scripts/active_learning.py --config configs/al_digits_diffusion_features.yaml

# docs/results/pipeline_digits.md: train -> generate -> retrain on ten classes (39 min of stages), then BalEnt AL with synthetic pairs.
pipeline-digits: $(STAMP)
	$(PY) scripts/pipeline.py --config configs/pipeline_digits.yaml
	$(PY) scripts/generate.py --config configs/synthetic_digits_test.yaml
	$(PY) scripts/active_learning.py --config configs/al_digits_synthetic.yaml
	$(PY) scripts/compare_curves.py docs/results/curve.csv:balent outputs/al_digits_synthetic/curve.csv:balent

# docs/results/pipeline_digits3.md (issue 17): 3 seeds x 9 conditions on DigitScenes-3, each also label-filtered; resumable.
pipeline-benchmark: $(STAMP)
	$(PY) scripts/pipeline.py --config configs/pipeline_digits3.yaml

# docs/results/few_labels_digits3.md (issue 30): 5/10/20 labelled DigitScenes-3 scenes x 3 seeds, diffusion features vs smp, with the dense ceiling; resumable.
few-labels-benchmark: $(STAMP)
	$(PY) scripts/few_labels.py --config configs/few_labels_digits3.yaml

# docs/results/controlnet_digits.md: retrain the DigitScenes SD + ControlNet into outputs/controlnet_digits/ (about 86 min; resumes).
controlnet-train: $(STAMP)
	$(PY) scripts/train_controlnet.py --config configs/controlnet_digits.yaml

# models/digitscenes-controlnet/tiny_decoder (its README.md): a tiny decoder distilled from the committed
# VAE for guidance to decode the x0 estimate with (guidance.decoder); about 15 minutes at one thread.
# Refuses to replace the committed one: add overwrite=true to the command to retrain it.
tiny-decoder: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) scripts/distill_tiny_decoder.py --config configs/tiny_decoder_digits.yaml

# docs/results/benchmarks.md: its five benchmarks in sequence (mask_fidelity.py rewrites docs/results/mask_fidelity.png).
benchmarks: $(STAMP)
	$(PY) benchmarks/balent_speed.py
	$(PY) benchmarks/mc_cost.py
	$(PY) benchmarks/guidance_overhead.py
	$(PY) benchmarks/mask_fidelity.py
	$(PY) benchmarks/diffusion_features_memory.py

test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || echo "note: no chromium, so the browser test of the annotation page is skipped; get it with: sudo apt-get install -y chromium"
	$(TEST_ENV) $(PY) -m pytest -q

# The suite minus the tests marked slow (training, subprocesses, full sampling runs): under a minute.
test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) outputs .pytest_cache
