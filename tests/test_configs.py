"""Every committed config loads and validates with the schema of the script that reads it; the
``base:`` includes of al.config.load_config; the scripts' one error policy (al.cli)."""

import dataclasses
import itertools
import re
from pathlib import Path

import pytest

from al.cli import cli_entry
from al.config import ConfigError, load_config
from al.data.base import DatasetError
from al.experiment import ExperimentConfig
from al.few_labels import FewLabelsConfig
from al.folder_lock import FolderLockedError
from al.loop_config import LoopConfig
from guidedgen.generate import GenerateConfig
from guidedgen.pipeline import PipelineConfig
from guidedgen.training import TrainControlNetConfig
from guidedgen.training.tiny_decoder import DistillTinyDecoderConfig
from scripts.train_segmenter import TrainSegmenterConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # configs/base/ holds blocks that configs include, not configs
# The schema each script loads its --config with; test_every_config_script_is_known checks it against the scripts.
SCRIPT_SCHEMAS = {
    "active_learning": ExperimentConfig,
    "distill_tiny_decoder": DistillTinyDecoderConfig,
    "few_labels": FewLabelsConfig,
    "generate": GenerateConfig,
    "pipeline": PipelineConfig,
    "train_controlnet": TrainControlNetConfig,
    "train_segmenter": TrainSegmenterConfig,
}


def script_of(path: Path) -> str:
    """The one script a config's header comment names (``# Run: python scripts/<script>.py ...``)."""
    header = itertools.takewhile(lambda line: line.startswith("#"), path.read_text().splitlines())
    scripts = set(re.findall(r"\bscripts/(\w+)\.py", "\n".join(header)))
    assert len(scripts) == 1, (f"{path.name}: the header comment must name the one script that reads it, as "
                               f"`# Run: python scripts/<script>.py --config configs/{path.name}`; it names {sorted(scripts)}")
    return scripts.pop()


def with_stand_ins(config, folder: Path):
    """``config`` reading stand-ins in ``folder`` for what other commands write first (validate() checks
    that those exist): the guiding segmenters (make demo, the pipeline's stage 1), a synthetic set (an AL
    loop's, a retraining's)."""
    if isinstance(config, GenerateConfig):
        segmenter = folder / "segmenter"
        segmenter.mkdir(exist_ok=True)
        (segmenter / "config.json").write_text("{}")
        guidance = dataclasses.replace(config.guidance, segmenters=[str(segmenter)] * max(1, len(config.guidance.segmenters)))
        return dataclasses.replace(config, guidance=guidance,
                                   quality_segmenter=str(segmenter) if config.quality_segmenter else None)
    if isinstance(config, ExperimentConfig) and config.loop.synthetic.root is not None:
        return dataclasses.replace(config, loop=with_stand_ins(config.loop, folder))
    if isinstance(config, (LoopConfig, TrainSegmenterConfig)) and config.synthetic.root is not None:
        synthetic = folder / "synthetic"
        synthetic.mkdir(exist_ok=True)
        (synthetic / "dataset.json").write_text("{}")
        return dataclasses.replace(config, synthetic=dataclasses.replace(config.synthetic, root=str(synthetic)))
    return config


def committed_paths(value) -> list[str]:
    """Every string under models/ in a config: the committed models it reads."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in committed_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in committed_paths(v)]
    return [value] if isinstance(value, str) and value.startswith("models/") else []


def test_all_sixteen_configs_are_found():
    assert len(CONFIGS) >= 16


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_validates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs' paths are relative to the repository, as the scripts run
    script = script_of(path)
    assert script in SCRIPT_SCHEMAS, f"{path.name} names scripts/{script}.py, which reads no config (or add it here)"
    config = load_config(SCRIPT_SCHEMAS[script], path)
    if isinstance(config, PipelineConfig):  # its generation block is checked only when stage 2 starts
        with_stand_ins(config.generation, tmp_path).validate()
    config = with_stand_ins(config, tmp_path)
    config.validate()  # what the script checks first; no model is loaded, nothing is downloaded (sd15_seg: hub ids)
    missing = [p for p in committed_paths(dataclasses.asdict(config)) if not Path(p).exists()]
    assert not missing, f"{path.name} names committed models that are not there: {missing}"


def test_every_config_script_is_known():
    """Both ways: each script that loads a config is in SCRIPT_SCHEMAS, with the schema it loads."""
    loaders = {p.stem: p.read_text() for p in (ROOT / "scripts").glob("*.py") if "load_config(" in p.read_text()}
    assert set(loaders) == set(SCRIPT_SCHEMAS)
    for script, source in loaders.items():
        assert f"load_config({SCRIPT_SCHEMAS[script].__name__}," in source, script


def test_every_base_file_is_included():
    texts = "\n".join(p.read_text() for p in CONFIGS)
    bases = sorted((ROOT / "configs" / "base").glob("*.yaml"))
    assert bases and all(f"base/{p.name}" in texts for p in bases)


# --- base: includes ------------------------------------------------------------------------------


@dataclasses.dataclass
class Inner:
    a: int = 0
    b: int = 0
    items: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Outer:
    name: str = "default"
    x: int = 0
    inner: Inner = dataclasses.field(default_factory=Inner)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_base_merges_beneath_the_file_nested_keys_by_key(tmp_path):
    write(tmp_path / "base" / "common.yaml", "name: common\ninner: {a: 1, b: 2, items: [1, 2]}\n")
    path = write(tmp_path / "run.yaml", "base: base/common.yaml\ninner: {b: 3, items: [9]}\n")
    # a key the file sets wins, a key it leaves keeps the base's, a list is replaced whole
    assert load_config(Outer, path) == Outer(name="common", inner=Inner(a=1, b=3, items=[9]))


def test_a_base_inside_a_block_merges_beneath_that_block(tmp_path):
    write(tmp_path / "inner.yaml", "a: 1\nb: 2\n")
    path = write(tmp_path / "run.yaml", "x: 5\ninner: {base: inner.yaml, b: 7}\n")
    assert load_config(Outer, path) == Outer(x=5, inner=Inner(a=1, b=7))


def test_a_list_of_bases_merges_in_order_and_recursively(tmp_path):
    write(tmp_path / "first.yaml", "name: first\nx: 1\ninner: {a: 1}\n")
    write(tmp_path / "deeper.yaml", "inner: {b: 4}\n")
    write(tmp_path / "sub" / "second.yaml", "base: ../deeper.yaml\nx: 2\n")  # relative to second.yaml
    path = write(tmp_path / "run.yaml", "base: [first.yaml, sub/second.yaml]\n")
    assert load_config(Outer, path) == Outer(name="first", x=2, inner=Inner(a=1, b=4))


def test_overrides_order_base_then_file_then_command_line(tmp_path):
    write(tmp_path / "common.yaml", "name: base\nx: 1\ninner: {a: 1}\n")
    path = write(tmp_path / "run.yaml", "base: common.yaml\nx: 2\n")
    assert load_config(Outer, path, ["x=3"]) == Outer(name="base", x=3, inner=Inner(a=1))
    assert load_config(Outer, path) == Outer(name="base", x=2, inner=Inner(a=1))


def test_a_missing_base_file_is_named(tmp_path):
    path = write(tmp_path / "run.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: base file .*nowhere\.yaml not found"):
        load_config(Outer, path)


def test_a_cycle_of_bases_is_refused_naming_the_files(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "inner: {base: a.yaml}\n")
    with pytest.raises(ConfigError, match=r"a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(Outer, tmp_path / "a.yaml")


def test_a_key_a_base_misspells_fails_like_one_in_the_file(tmp_path):
    write(tmp_path / "common.yaml", "inner: {c: 1}\n")
    with pytest.raises(ConfigError, match="inner.c"):
        load_config(Outer, write(tmp_path / "run.yaml", "base: common.yaml\n"))
    with pytest.raises(ConfigError, match="'base' must be a path or a list of paths"):
        load_config(Outer, write(tmp_path / "bad.yaml", "base: {a: 1}\n"))


# --- the scripts' error policy ------------------------------------------------------------------


@pytest.mark.parametrize("error", [ConfigError("config key 'x' = 1 is not allowed"), DatasetError("bad mask m0.png"),
                                   FolderLockedError("held by pid 1"), FileNotFoundError("no such file: a.yaml")])
def test_a_user_error_is_one_line_and_exit_code_2(error, capsys):
    @cli_entry()
    def main(argv=None):
        raise error

    assert main([]) == 2
    assert capsys.readouterr().err == f"error: {error}\n"


def test_a_bug_raises_with_its_traceback(monkeypatch):
    import scripts.pipeline

    def broken(config):
        raise KeyError("a bug, not the user's mistake")

    monkeypatch.setattr(scripts.pipeline, "run_pipeline", broken)
    with pytest.raises(KeyError, match="a bug"):
        scripts.pipeline.main(["--config", str(ROOT / "configs" / "pipeline_digits.yaml")])


def test_generate_no_longer_hides_a_value_error(monkeypatch):
    import scripts.generate

    def broken(config, state):
        raise ValueError("a bug deep inside sampling")

    monkeypatch.setattr(scripts.generate, "run_generation", broken)
    with pytest.raises(ValueError, match="a bug deep inside"):
        scripts.generate.main(["--config", str(ROOT / "configs" / "demo.yaml")])
