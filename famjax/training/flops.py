"""Model FLOPs of a training step and the peak they are measured against (MFU).

Model FLOPs count the matmuls the architecture needs, not what an implementation happens to execute
(masked halves of score matrices and activation recomputation are excluded), the usual convention:
training = 3 x forward (the backward pass costs twice the forward). Per token and layer:

  projections   2 * D * (N + 2K) * H + 2 * N * H * D      (q, k, v, o)
  MLP           2 * 3 * D * M                              (gate, up, down)
  attention     2 * 2 * N * H * keys(position)             (q.k and p.v over the keys the token sees)

plus 2 * D * V per token for the logits. keys(position) follows the attention pattern (spec §2):
full: every earlier token and itself; bswa: its own block causally plus min(block index, m) whole blocks;
fam: bswa plus the F FAM rows. FAM also runs, per complete block and layer, an F-row attention over
F + B keys with projections and MLP (spec §3), and once per step the prompt pass (spec §4).

The peak is per device kind from the vendor's dense bf16 figures (PEAK_FLOPS below); on CPU it is the
measured float32 matmul throughput of this machine (`measured_cpu_peak`), since CPUs have no data
sheet number that XLA reaches.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from famjax.model import ModelConfig

# Dense bf16 peak FLOP/s per chip, matched by substring of jax.Device.device_kind (first match wins).
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),   # Trillium (v6e)
    ("TPU v5 lite", 197e12),   # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),        # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("H200", 989e12),
    ("H100", 989e12),          # SXM; the PCIe card is lower (756e12)
    ("A100", 312e12),
    ("B200", 2250e12),
    ("L4", 121e12),
)


def _keys_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Sum over the positions of one sequence of the keys each position attends to."""
  i = np.arange(seq_len)
  if not cfg.uses_blocks:
    return float(np.sum(i + 1))
  if cfg.attention == "swa":  # the token-level window (a famjax ablation)
    return float(np.sum(np.minimum(i + 1, cfg.window)))
  S = cfg.block_size
  keys = i % S + 1 + np.minimum(i // S, cfg.mem_segments) * S
  if cfg.has_fam:
    keys = keys + cfg.fam_len * cfg.fam_history  # the last fam_history states (1: the spec)
  return float(np.sum(keys))


def forward_flops_per_sequence(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of the forward pass over one sequence of `seq_len` tokens."""
  D, N, K, H, M, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.n_layers
  per_row = 2 * D * (N + 2 * K) * H + 2 * N * H * D + 6 * D * M  # one token (or FAM row), one layer
  flops = L * (seq_len * per_row + 4 * N * H * _keys_per_token(cfg, seq_len))
  flops += 2 * D * cfg.vocab_size * seq_len
  if cfg.has_fam:
    F, S = cfg.fam_len, cfg.block_size
    flops += L * (seq_len // S) * (F * per_row + 4 * N * H * F * (F + S))
  return float(flops)


def prompt_flops(cfg: ModelConfig) -> float:
  """The FAM prompt pass (spec §4), once per step whatever the batch."""
  if not cfg.has_fam:
    return 0.0
  D, N, K, H, M, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.fam_len
  per_row = 2 * D * (N + 2 * K) * H + 2 * N * H * D + 6 * D * M
  return float(cfg.n_layers * (F * per_row + 4 * N * H * F * F))


def train_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int) -> float:
  """Model FLOPs of one training step (forward + backward = 3 x forward)."""
  return 3.0 * (batch_size * forward_flops_per_sequence(cfg, seq_len) + prompt_flops(cfg))


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """The table's figure for this device kind, or None when it is not listed (CPUs included)."""
  device = device or jax.devices()[0]
  for kind, peak in PEAK_FLOPS:
    if kind.lower() in device.device_kind.lower():
      return peak
  return None


_matmul = jax.jit(lambda a, b: a @ b)


def measure_cpu_peak(n: int = 1024, dtype: str = "float32", repeats: int = 8) -> float:
  """FLOP/s of the best of `repeats` jitted [n, n] @ [n, n] matmuls on this machine (all its cores)."""
  x = jnp.ones((n, n), dtype)
  matmul = _matmul
  matmul(x, x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(x, x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


measured_cpu_peak = functools.cache(measure_cpu_peak)


class Peak:
  """The peak FLOP/s of a job's devices: the table's figure, or on CPU the best matmul measured so far.

  A single CPU measurement can land on a moment when something else runs and come out low (making MFU
  look high), so `refresh()` measures again and keeps the best; the loop calls it at log steps, at most
  `refreshes` times and at least `REFRESH_INTERVAL_S` apart, so a short run pays for one measurement.
  """

  REFRESH_INTERVAL_S = 60.0

  def __init__(self, devices=None):
    devices = list(jax.devices() if devices is None else devices)  # (a mesh's numpy array of devices too)
    per_device = peak_flops_per_device(devices[0])
    self.measured = per_device is None and devices[0].platform == "cpu"
    self.refreshes, self._last = (3 if self.measured else 0), time.monotonic()
    if per_device is not None:
      self.value = per_device * len(devices)
      self.source = f"{len(devices)} x {devices[0].device_kind} (table)"
    elif self.measured:  # simulated CPU devices share the same cores: one machine peak
      self.value, self.source = 0.0, "this CPU's measured float32 matmul peak"
      self.refresh()
    else:
      self.value = 0.0
      self.source = (f"unknown device kind {devices[0].device_kind!r}: add it to "
                     "famjax.training.flops.PEAK_FLOPS (MFU reported as 0)")

  def refresh(self) -> float:
    """Measure again (CPU only) and keep the best."""
    if self.measured:
      self.value = max([self.value] + [measure_cpu_peak(n, "float32", 4) for n in (1024, 2048)])
      self._last = time.monotonic()
    return self.value

  def maybe_refresh(self) -> bool:
    """refresh() if refreshes are left and the last measurement is old enough; True if it measured."""
    if self.refreshes <= 0 or time.monotonic() - self._last < self.REFRESH_INTERVAL_S:
      return False
    self.refreshes -= 1
    self.refresh()
    return True


def machine_peak(devices=None) -> tuple[float, str]:
  """(peak FLOP/s of the devices a job runs on, how it was obtained)."""
  peak = Peak(devices)
  return peak.value, peak.source


def mfu(flops_per_step: float, step_seconds: float, peak: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
  return flops_per_step / step_seconds / peak if step_seconds > 0 and peak > 0 else 0.0


# -- the FLOPs a program runs ----------------------------------------------------------------------------
#
# Model FLOPs (above) are what the architecture needs; a training step runs more: remat recomputes the
# forward, attention_chunk's groups and mlp_chunk's backward recompute their scores and activations, the
# tiled loss recomputes its logits. `executed_matmul_flops` counts them from the traced program, each loop
# body times its trip count (XLA's cost_analysis counts a loop body once).

def _dot_flops(eqn) -> float:
  """2 x batch x free(lhs) x free(rhs) x contracted of a dot_general: 2 x |lhs| x free(rhs)."""
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
  rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
  return 2.0 * float(np.prod(lhs)) * float(np.prod(rhs_free))


def _sub_jaxprs(params: dict):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(item, "jaxpr", item)
      if hasattr(inner, "eqns"):
        yield inner


def executed_matmul_flops(jaxpr) -> float:
  """FLOPs of every matrix product (dot_general) a jaxpr runs, as often as it runs it: a scan's body
  `length` times, a cond's most expensive branch, a shard_map's body once per device of its manual axes,
  a Pallas kernel once per program of its grid (a kernel that skips blocks at run time is counted in
  full), a while loop's body once (its trip count is not in the jaxpr; famjax's step has none)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * executed_matmul_flops(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(executed_matmul_flops(branch) for branch in eqn.params["branches"])
    elif name == "pallas_call":
      grid = eqn.params["grid_mapping"].grid
      total += float(np.prod([g for g in grid if isinstance(g, int)])) * executed_matmul_flops(
          eqn.params["jaxpr"])
    elif name == "shard_map":
      mesh = eqn.params["mesh"]
      devices = np.prod([mesh.shape[a] for a in eqn.params.get("manual_axes", mesh.axis_names)])
      total += float(devices) * sum(executed_matmul_flops(j) for j in _sub_jaxprs(eqn.params))
    else:
      total += sum(executed_matmul_flops(j) for j in _sub_jaxprs(eqn.params))
  return total
