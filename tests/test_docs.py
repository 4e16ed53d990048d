"""The guides in docs/ run: each guide's ```python blocks, in order, in one namespace.

Blocks fenced as ```bash, ```yaml, ... are illustrative and not run. Each guide runs in a fresh
temporary working directory, so the files its snippets write go there.
"""

import os
import re

import jax
import pytest

import jaxlora  # noqa: F401  (this checkout's copy, imported before the working directory moves)

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(name: str) -> list[str]:
  with open(os.path.join(DOCS, name)) as f:
    return BLOCK.findall(f.read())


def run_guide(name: str, tmp_path, monkeypatch) -> dict:
  blocks = python_blocks(name)
  assert blocks, f"docs/{name} has no python block"
  monkeypatch.chdir(tmp_path)
  namespace: dict = {"__name__": f"docs_{name[:-3]}"}
  for i, source in enumerate(blocks):
    exec(compile(source, f"docs/{name} [python block {i + 1}]", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_every_guide_is_tested():
  guides = sorted(f for f in os.listdir(DOCS) if f.startswith("guide_") and f.endswith(".md"))
  assert guides == ["guide_cli.md", "guide_linen.md", "guide_nnx.md", "guide_tpu_pod.md"]


@pytest.mark.slow  # 10-25 s on 2 shared cores (Orbax, PEFT files, a handful of compiles)
def test_guide_linen(tmp_path, monkeypatch):
  ns = run_guide("guide_linen.md", tmp_path, monkeypatch)
  assert ns["losses"][-1] < ns["losses"][0]


def test_guide_nnx(tmp_path, monkeypatch):
  ns = run_guide("guide_nnx.md", tmp_path, monkeypatch)
  assert ns["losses"][-1] < ns["losses"][0]


@pytest.mark.slow
def test_guide_cli(tmp_path, monkeypatch):
  run_guide("guide_cli.md", tmp_path, monkeypatch)
  assert os.path.isfile(tmp_path / "exported" / "peft" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < 8, reason="the sharding guide needs 8 devices; run with "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_guide_tpu_pod(tmp_path, monkeypatch):
  ns = run_guide("guide_tpu_pod.md", tmp_path, monkeypatch)
  assert bool(jax.numpy.isfinite(ns["loss"]))
