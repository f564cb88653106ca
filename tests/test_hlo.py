"""What famjax reads from a compiled step (famjax.training.hlo, flops.executed_matmul_flops), what it predicts
from it (famjax.training.roofline) and the TPU slices it names (famjax.parallel.topology), without a TPU
compile: a small HLO module written in the TPU compiler's style (no trip-count hints, asynchronous
collectives, collectives inside fusions, replica groups in all three notations), XLA:CPU's own output,
and small traced programs. tests/test_tpu_compile.py compiles for a TPU topology."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from famjax.parallel import topology
from famjax.training import hlo, memory, roofline
from famjax.training.flops import executed_matmul_flops

# A loop of TRIPS trips (0 .. TRIPS-1; the bound and the start are separate constants) whose body gathers a
# bf16[4,8] weight over groups of 4 (inside an asynchronous collective fusion, as the TPU compiler
# writes it), all-reduces f32[32] over pairs and sends it around a ring; after the loop, one
# reduce-scatter of f32[32] over groups of 4.
MODULE = """HloModule jit_step, is_scheduled=true

%fused_gather (param_0: bf16[4,8]) -> (bf16[4,8], bf16[16,8]) {
  %param_0 = bf16[4,8]{1,0:T(8,128)(2,1)} parameter(0)
  %all-gather.1 = bf16[16,8]{1,0:T(8,128)(2,1)} all-gather(%param_0), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}
  ROOT %custom-call.1 = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (p: (s32[], bf16[4,8], f32[32])) -> (s32[], bf16[4,8], f32[32]) {
  %p = (s32[]{:T(128)}, bf16[4,8]{1,0}, /*index=2*/f32[32]{0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %one = s32[]{:T(128)} constant(STEP)
  %next = s32[]{:T(128)} add(%i, %one)
  %copy.1 = s32[]{:T(128)} copy(%next)
  %w = bf16[4,8]{1,0} get-tuple-element(%p), index=1
  %start = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) fusion(%w), kind=kCustom, calls=%fused_gather
  %x = f32[32]{0} get-tuple-element(%p), index=2
  %ar = f32[32]{0} all-reduce(%x), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %cp = (f32[32]{0}, f32[32]{0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%ar), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[32]{0} collective-permute-done(%cp)
  ROOT %t = (s32[]{:T(128)}, bf16[4,8]{1,0}, f32[32]{0}) tuple(%copy.1, %w, %cpd)
}

%cond (p: (s32[], bf16[4,8], f32[32])) -> pred[] {
  %p = (s32[]{:T(128)}, bf16[4,8]{1,0}, f32[32]{0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(TRIPS)
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT, metadata={op_name="cond/lt"}
}

ENTRY %main (w: bf16[4,8], x: f32[32]) -> f32[32] {
  %w = bf16[4,8]{1,0} parameter(0)
  %x = f32[32]{0} parameter(1)
  %zero = s32[]{:T(128)} constant(START)
  %copy.2 = s32[]{:T(128)} copy(%zero)
  %init = (s32[]{:T(128)}, bf16[4,8]{1,0}, f32[32]{0}) tuple(%copy.2, %w, %x)
  %loop = (s32[]{:T(128)}, bf16[4,8]{1,0}, f32[32]{0}) while(%init), condition=%cond, body=%body
  %rs = f32[4]{0} reduce-scatter(%x), channel_id=4, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  ROOT %out = f32[32]{0} get-tuple-element(%loop), index=2
}
"""


def module(trips=5, start=0, step=1) -> str:
  return MODULE.replace("TRIPS", str(trips)).replace("START", str(start)).replace("STEP", str(step))


@pytest.mark.parametrize("trips,start,step,expected", [(5, 0, 1, 5), (5, 1, 1, 4), (5, 0, 2, 3), (18, 0, 1, 18)])
def test_trip_count_read_from_the_loop(trips, start, step, expected):
  """The TPU compiler writes no trip count: it comes from the induction variable's start, step and bound."""
  comps = hlo.computations(module(trips, start, step))
  entry = next(c for c in comps.values() if c.entry)
  assert hlo.trip_count(comps, entry, entry.by_name["loop"]) == expected
  counts, unknown = hlo.multiplicities(comps)
  assert counts["body"] == expected and counts["fused_gather"] == expected and not unknown


def test_collectives_are_counted_per_trip_with_their_bytes():
  got = hlo.collectives(module(trips=5), devices=8)
  # every trip: a bf16[16,8] gather over 4 (3/4 of it arrives), an f32[32] all-reduce over 2 (twice half),
  # an f32[32] permute (all of it); once: an f32[32] reduce-scatter over 4 ([2,4]<=[8]: groups of 4)
  assert got["all-gather"] == {"count": 5, "bytes": 5 * 256, "wire_bytes": 5 * 192}
  assert got["all-reduce"] == {"count": 5, "bytes": 5 * 128, "wire_bytes": 5 * 128}
  assert got["collective-permute"] == {"count": 5, "bytes": 5 * 128, "wire_bytes": 5 * 128}
  assert got["reduce-scatter"] == {"count": 1, "bytes": 128, "wire_bytes": 96}
  assert got["all-to-all"]["count"] == 0 and got["unknown_loops"] == []


def test_hbm_bytes_count_every_trip_and_leave_on_chip_memory_out():
  """Operands + result of every instruction outside fusions (a fusion once), per trip; the permute's
  u32 flags live in memory space S(2) and do not count; bookkeeping (tuples, parameters) moves nothing."""
  per_trip = (4 + 4 + 4) + (4 + 4) + (64 + 64 + 256) + (128 + 128) + (128 + 128 + 128)
  condition = 1 + 4 + 4  # runs trips + 1 times
  once = (4 + 4) + (16 + 128)  # the start's copy, the reduce-scatter
  assert hlo.hbm_bytes(module(trips=5)) == 5 * per_trip + 6 * condition + once
  assert hlo.hbm_bytes(module(trips=5), trips=False) == per_trip + condition + once


SLICED = """HloModule sliced

%take_layer (param_0: bf16[18,64,128], param_1: s32[]) -> bf16[64,128] {
  %param_0 = bf16[18,64,128]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %slice = bf16[1,64,128]{2,1,0} dynamic-slice(%param_0, %param_1, %zero, %zero), dynamic_slice_sizes={1,64,128}
  ROOT %layer = bf16[64,128]{1,0} bitcast(%slice)
}

%put_layer (param_0: f32[18,64,128], param_1: f32[1,64,128], param_2: s32[]) -> f32[18,64,128] {
  %param_0 = f32[18,64,128]{2,1,0} parameter(0)
  %param_1 = f32[1,64,128]{2,1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %put = f32[18,64,128]{2,1,0} dynamic-update-slice(%param_0, %param_1, %param_2, %zero, %zero)
}

ENTRY %main (stack: bf16[18,64,128], grads: f32[18,64,128], g: f32[1,64,128], i: s32[]) -> (bf16[64,128], f32[18,64,128]) {
  %stack = bf16[18,64,128]{2,1,0} parameter(0)
  %grads = f32[18,64,128]{2,1,0} parameter(1)
  %g = f32[1,64,128]{2,1,0} parameter(2)
  %i = s32[] parameter(3)
  %layer = bf16[64,128]{1,0} fusion(%stack, %i), kind=kLoop, calls=%take_layer
  %put = f32[18,64,128]{2,1,0} fusion(%grads, %g, %i), kind=kLoop, calls=%put_layer
  ROOT %out = (bf16[64,128]{1,0}, f32[18,64,128]{2,1,0}) tuple(%layer, %put)
}
"""


def test_hbm_bytes_of_a_slice_or_an_update_in_place_are_the_slice():
  """A fusion that takes one layer of a stacked [18, ...] array reads that layer, not the stack; one that
  writes a layer of a stacked gradient in place reads and writes that layer."""
  layer = 64 * 128
  taken = 2 * layer + 2 * layer + 4  # read one bf16 layer, write it; the index
  put = 4 * layer + 4 * layer + 4  # read the f32 update, write it in place; the index
  assert hlo.hbm_bytes(SLICED) == taken + put


def test_xla_cpu_trip_count_hint_agrees_with_the_loop():
  """XLA:CPU writes known_trip_count; without it, the reading of the loop gives the same count."""
  def f(x, w):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=7)[0]
  text = jax.jit(f).lower(jnp.ones((4, 4)), jnp.ones((4, 4))).compile().as_text()
  assert '"known_trip_count":{"n":"7"}' in text
  stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
  for source in (text, stripped):
    comps = hlo.computations(source)
    loops = [(c, i) for c in comps.values() for i in c.instructions if i.opcode == "while"]
    assert [hlo.trip_count(comps, c, i) for c, i in loops] == [7]


def test_executed_matmul_flops_count_loops_branches_and_kernels():
  w = jnp.ones((5, 6))

  def kernel(x_ref, w_ref, o_ref):
    o_ref[...] = x_ref[...] @ w_ref[...]

  def f(x):
    y = jax.lax.scan(lambda c, _: (c, jax.checkpoint(lambda c: c @ w)(c)), x, None, length=3)[1]  # 3 x 4x5x6
    z = jax.lax.cond(x[0, 0] > 0, lambda: x @ w, lambda: (x @ w) @ jnp.ones((6, 6)))  # max: 4x5x6 + 4x6x6
    k = pl.pallas_call(kernel, grid=(2,), in_specs=[pl.BlockSpec((2, 5), lambda i: (i, 0)),
                                                   pl.BlockSpec((5, 6), lambda i: (0, 0))],
                       out_specs=pl.BlockSpec((2, 6), lambda i: (i, 0)),
                       out_shape=jax.ShapeDtypeStruct((4, 6), jnp.float32), interpret=True)(x, w)  # 2 x 2x5x6
    return y, z, k
  flops = executed_matmul_flops(jax.make_jaxpr(f)(jnp.ones((4, 5))))
  assert flops == 2 * (3 * 4 * 5 * 6 + 4 * 5 * 6 + 4 * 6 * 6 + 2 * 2 * 5 * 6)


def test_roofline_adds_or_overlaps_the_collectives():
  chip = topology.CHIPS["v5e"]
  p = roofline.predict(chip, executed_flops=4 * chip.peak_flops, model_flops=3 * chip.peak_flops,
                       hbm_bytes=2 * chip.hbm_bandwidth, wire_bytes=chip.ici_bandwidth / 2)
  assert (p["compute_s"], p["memory_s"], p["collectives_s"]) == pytest.approx((4, 2, 1))
  assert p["step_s_serialised"] == pytest.approx(5) and p["step_s_overlapped"] == pytest.approx(4)
  assert p["mfu_serialised"] == pytest.approx(0.6) and p["mfu_overlapped"] == pytest.approx(0.75)
  assert p["limited_by"] == "compute" and "1.33x the model FLOPs" in roofline.limits(p)


@pytest.mark.parametrize("name,chips,hosts,per_host", [("v5e:4x8", 32, 8, (2, 2, 1)), ("v5e:2x4", 8, 1, (2, 4, 1)),
                                                       ("v5p:4x4x4", 64, 16, (2, 2, 1)), ("v6e:8x8", 64, 16, (2, 2, 1))])
def test_slices_by_name(name, chips, hosts, per_host):
  s = topology.parse(name)
  assert (s.chips, s.hosts, s.chips_per_host_bounds) == (chips, hosts, per_host)
  assert topology.slice_for(s.chip.generation, chips) == name


@pytest.mark.parametrize("bad", ["v5e:4x4x4", "v4:2x2", "v5e-32", "v5p:4x4"])
def test_a_slice_name_that_means_nothing_is_refused(bad):
  with pytest.raises(ValueError, match="TPU topology"):
    topology.parse(bad)
  with pytest.raises(ValueError, match="no slice of 48 chips"):
    topology.slice_for("v5e", 48)


def fake_tpus(grid=(2, 2)):
  return [types.SimpleNamespace(device_kind="TPU v5 lite", platform="tpu", coords=(x, y, 0))
          for x in range(grid[0]) for y in range(grid[1])]


def test_a_step_that_does_not_fit_says_what_it_needs_and_what_to_run():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
             "(67.42G) exceeds available HBM (15.75G).")
  assert memory.out_of_memory(message) == (int(67.42 * 2 ** 30), int(15.75 * 2 ** 30))
  assert memory.out_of_memory("RESOURCE_EXHAUSTED: something else") is None
  e = memory.StepDoesNotFit(int(70 * 2 ** 30), int(15.75 * 2 ** 30), fake_tpus((2, 4)), "the compiler's")
  text = e.describe("/runs/a/config.json")
  assert "needs 70.00 GiB per device" in text and "has 15.75 GiB" in text and "\n" not in text
  assert "python benchmarks/memory_fit.py --platform=tpu --topology=v5e:2x4 --job=/runs/a/config.json" in text
