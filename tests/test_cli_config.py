"""The CLI's configuration: one declaration per key gives its help, type, default and checks."""

import dataclasses
import os

import pytest
import yaml

import jaxlora
from jaxlora_cli import config as config_lib
from jaxlora_cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = [(name, f) for name, f, _ in config_lib.keys()]


def test_every_key_is_declared_with_help():
  assert len(KEYS) > 40
  for name, f in KEYS:
    assert f.metadata.get("help"), f"config key {name} has no help"
  sections = [f.name for f in dataclasses.fields(config_lib.Config)
              if dataclasses.is_dataclass(f.default_factory)]
  assert sections == ["model", "lora", "data", "train", "mesh", "distributed", "wandb",
                      "preference", "grpo", "reward"]
  assert {name.split(".")[0] for name, _ in KEYS} == {"output_dir", "report_to", *sections}
  assert config_lib.DOCS == {name: f.metadata["help"] for name, f in KEYS}


def test_help_lists_every_key_with_its_help_default_and_allowed_values(capsys):
  with pytest.raises(SystemExit):
    main(["train", "--help"])
  out = " ".join(capsys.readouterr().out.split())  # argparse may rewrap; compare words
  defaults = config_lib.Config()
  for name, f in KEYS:
    section, _, leaf = name.rpartition(".")
    default = getattr(getattr(defaults, section) if section else defaults, leaf)
    line = f"{name} [{default!r}]: {' '.join(f.metadata['help'].split())}"
    assert line in out, name
    if f.metadata["choices"]:
      assert "must be one of " + ", ".join("null" if c is None else c
                                           for c in f.metadata["choices"]) in out, name
  assert "lora.dropout [0.0]: dropout on the LoRA input during training; must be in [0, 1)" in out
  assert "train.lr [0.0002]: peak learning rate (adamw); must be positive" in out


def test_presets_load_and_round_trip(tmp_path):
  names = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml"))
  assert names
  for name in names:
    cfg = config_lib.load(os.path.join(ROOT, "configs", name))
    assert cfg.model.path and cfg.data.train_file, name
    path = tmp_path / name
    path.write_text(config_lib.dump(cfg))
    assert config_lib.load(str(path)) == cfg, name


def test_defaults_types_and_coercion():
  cfg = config_lib.load(None, ["train.lr=3e-4", "lora.alpha=8", "lora.targets=[q_proj, v_proj]",
                               "model.quantize=none", "model.remat=none", "data.eval_file=null"])
  assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
  assert cfg.lora.alpha == 8.0 and isinstance(cfg.lora.alpha, float)
  assert cfg.lora.targets == ["q_proj", "v_proj"]
  assert cfg.model.quantize is None and cfg.model.remat is None and cfg.data.eval_file is None
  assert config_lib.load(None) == config_lib.Config()
  assert yaml.safe_load(config_lib.dump(config_lib.Config()))["train"]["steps"] == 1000


@pytest.mark.parametrize("override,allowed", [
    ("data.format=csv", "one of text, prompt_completion, chat, preference, prompts"),
    ("model.dtype=int8", "one of float32, bfloat16, float16"),
    ("model.quantize=nf5", "one of null, nf4, fp4, int8"),
    ("mesh.rules=tp", "one of fsdp, fsdp_tp, ep"),
    ("lora.rank=0", "positive"),
    ("train.lr=-1", "positive"),
    ("lora.dropout=1", "in [0, 1)"),
    ("data.eval_fraction=-0.1", "in [0, 1)"),
    ("train.loss_chunk_size=-1", "positive or 0"),
    ("model.quant_block_size=63", "a multiple of 2 and at least 2"),
])
def test_a_bad_value_is_one_line_naming_the_key_and_the_allowed_values(override, allowed):
  name, _, value = override.partition("=")
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(None, [override])
  msg = str(e.value)
  assert msg.startswith(f"config key '{name}' must be {allowed}, got ") and value in msg
  assert len(msg.splitlines()) == 1


def test_a_config_built_in_code_is_checked_too():
  cfg = config_lib.Config(lora=config_lib.LoraSection(rank=4, init="uniform"))
  with pytest.raises(config_lib.ConfigError, match="'lora.init'.*'uniform'.*kaiming.*pissa"):
    config_lib.validate(cfg)
  cfg = config_lib.Config(model=config_lib.ModelSection(quantize="none"))
  config_lib.validate(cfg)
  assert cfg.model.quantize is None  # one spelling stored


def test_a_new_key_is_one_declaration():
  @dataclasses.dataclass
  class Extra:
    warmup_ratio: float = config_lib.key(0.0, "share of the steps spent warming up", ge=0, lt=1)

  @dataclasses.dataclass
  class Cfg:
    extra: Extra = dataclasses.field(default_factory=Extra)

  [(name, f, tp)] = list(config_lib.keys(Cfg))
  assert name == "extra.warmup_ratio" and tp is float
  assert config_lib.allowed(f.metadata) == "in [0, 1)"
  cfg = Cfg()
  config_lib._set(cfg, "extra.warmup_ratio", 0)  # pylint: disable=protected-access
  assert cfg.extra.warmup_ratio == 0.0 and isinstance(cfg.extra.warmup_ratio, float)
  with pytest.raises(config_lib.ConfigError, match="'extra.warmup_ratio' must be in"):
    config_lib._set(cfg, "extra.warmup_ratio", 1.5)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="needs its help"):
    config_lib.key(0)


def test_config_error_is_jaxloras():
  assert issubclass(config_lib.ConfigError, jaxlora.errors.ConfigError)
  assert issubclass(config_lib.ConfigError, jaxlora.errors.JaxloraError)
  assert issubclass(config_lib.ConfigError, ValueError)


def test_old_section_names_warn_and_still_work():
  with pytest.warns(DeprecationWarning, match="ModelConfig is deprecated; use .*ModelSection"):
    assert config_lib.ModelConfig is config_lib.ModelSection
  with pytest.warns(DeprecationWarning):
    from jaxlora_cli.config import DataConfig  # noqa: F401
  assert DataConfig is config_lib.DataSection
  with pytest.raises(AttributeError):
    config_lib.NoSuchConfig  # noqa: B018  # pylint: disable=pointless-statement


def test_check_output_dir(tmp_path):
  f = tmp_path / "file.txt"
  f.write_text("mine")
  config_lib.check_output_dir(str(tmp_path / "new" / "run"), "--out")  # may be created
  config_lib.check_output_dir(str(tmp_path), "--out")
  config_lib.check_output_dir("gs://bucket/run", "output_dir")
  with pytest.raises(config_lib.ConfigError, match=f"output_dir {f} is a file, not a directory"):
    config_lib.check_output_dir(str(f), "output_dir")
  with pytest.raises(config_lib.ConfigError, match=f"--out {f}/run: {f} is a file"):
    config_lib.check_output_dir(str(f / "run"), "--out")
  assert f.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_remat_choices_are_the_models_policies():
  field = {f.name: f for f in dataclasses.fields(config_lib.ModelSection)}["remat"]
  assert set(field.metadata["choices"]) == {None} | set(jaxlora.models.decoder.REMAT_POLICIES)
