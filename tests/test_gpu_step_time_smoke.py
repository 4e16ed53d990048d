"""Keeps benchmarks/gpu_step_time.py alive: its --smoke run (CPU, tiny Llama) in a subprocess."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_step_time.py")

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "transformers", "peft")),
    reason="needs torch, transformers and peft")


def _load_script():
  sys.path.insert(0, os.path.dirname(SCRIPT))  # for its `import machine`
  try:
    spec = importlib.util.spec_from_file_location("gpu_step_time", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
  finally:
    sys.path.remove(os.path.dirname(SCRIPT))
  return mod


@pytest.mark.slow
def test_smoke_run(tmp_path):
  out = tmp_path / "results.json"
  r = subprocess.run([sys.executable, SCRIPT, "--smoke", "--json", str(out)], cwd=ROOT,
                     capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  text = r.stdout
  assert "| jaxlora step | PEFT step | jaxlora / PEFT |" in text, text
  row = next((ln for ln in text.splitlines() if ln.startswith("| smoke-2x32")), None)
  assert row is not None, text
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert re.fullmatch(r"[\d.]+ ms", cells[2]) and re.fullmatch(r"[\d.]+ ms", cells[3]), row
  assert re.fullmatch(r"[\d.]+x", cells[4]), row
  assert cells[-1].endswith(", OK)"), row  # first-step losses agree
  assert "model FLOPs of one LoRA step" in text and "989 TFLOP/s" in text
  assert "jaxlora step <= 0.6x PEFT's" in text  # the targets are printed beside the table

  res = json.loads(out.read_text())
  rows = {r["variant"]: r for r in res["rows"]}
  assert set(rows) == {"jaxlora", "peft"}
  assert all(r["status"] == "ok" for r in rows.values()), rows
  assert rows["jaxlora"]["trainable"] == rows["peft"]["trainable"]
  assert rows["jaxlora"]["adapted_kernels"] == rows["peft"]["adapted_kernels"] == 2 * 7
  s = res["summary"]["smoke-2x32"]
  assert s["loss_ok"] and s["loss_diff"] <= 2e-2 * abs(rows["peft"]["first_loss"])
  assert not res["problems"]


def test_flops_formula_matches_a_matmul_count():
  """The closed form against an explicit list of the step's matmuls (m, k, n: 2*m*k*n FLOPs)."""
  g = _load_script()
  cfg = dict(vocab=50, hidden=12, layers=3, heads=4, kv_heads=2, head_dim=5, intermediate=20)
  b, t, r = 2, 7, 3
  d, L, n, kv, h, i, v = 12, 3, 4, 2, 5, 20, 50
  tok = b * t
  shapes = [(d, n * h), (d, kv * h), (d, kv * h), (n * h, d), (d, i), (d, i), (i, d)]
  total = 0
  for layer in range(L):
    for j, (fin, fout) in enumerate(shapes):
      need_dx = not (layer == 0 and j < 3)  # layer 0's q/k/v input feeds the frozen embedding
      total += 2 * tok * fin * fout * (2 if need_dx else 1)  # base: forward (+ input gradient)
      # adapters: x@A, z@B; dB = z^T g, dz = g B^T, dA = x^T dz (+ dx = dz A^T)
      total += 2 * tok * r * (fin + fout) + 2 * tok * r * (2 * fout + fin)
      total += 2 * tok * fin * r if need_dx else 0
    # attention, causal half: QK^T and PV forward, dQ, dK, dP, dV backward
    total += 6 * (2 * b * n * t * t * h) // 2
  total += 2 * 2 * tok * d * v  # head: forward + input gradient
  assert g.lora_step_flops(cfg, b, t, rank=r)["total"] == total
