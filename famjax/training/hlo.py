"""What a compiled step does per step, read from its optimised HLO text (`compiled.as_text()`).

XLA's own `compiled.cost_analysis()` visits the body of a loop once, so for famjax's step, whose work sits
in scans over layers, blocks, token chunks and vocabulary tiles, it reports a fraction of what one step
runs (the 1B step on a TPU: 3.4e12 flops per chip against about 100 times that). This module reads the
program itself and counts every instruction as often as it runs:

* `computations(text)`: the module's computations and instructions (name, shape, opcode, operands,
  attributes): enough of the HLO text grammar for what follows;
* `multiplicities(module)`: how many times each computation runs per step: 1 for the entry; a while
  body's caller's count times the loop's trip count; a fused, called or branch computation its caller's;
* `trip_count(...)`: a while loop's trips: XLA:CPU's `known_trip_count`, else read from the loop itself
  (the induction variable's start, step and bound; the TPU compiler prints no hint);
* `collectives(text, devices)`: per collective kind, how many run per step and the bytes they carry and
  put on the interconnect;
* `hbm_bytes(text)`: the bytes the step's instructions read and write in device memory (HBM on a TPU),
  every loop counted per trip.

Everything here is per device: an SPMD-partitioned module is one device's program.
"""

from __future__ import annotations

import dataclasses
import math
import re

# Bytes per element of each HLO element type (sub-byte types: half a byte).
ELEMENT_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
                 "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
                 "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
                 "f8e3m4": 1, "f8e4m3": 1, "f4e2m1fn": 0.5, "f8e8m0fnu": 1, "token": 0}
# One array of a shape text: element type, dimensions, layout. A layout's S(n), n > 0, places the array
# outside device memory: the TPU compiler keeps small arrays in its on-chip memory, S(1).
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")

# The collectives, by the kind they are reported as. The "-start" forms are the asynchronous halves that
# carry the data; their "-done" halves move nothing more.
COLLECTIVES = {
    "all-gather": "all-gather", "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
    "all-to-all": "all-to-all", "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute", "collective-permute-start": "collective-permute",
    "collective-broadcast": "collective-permute",
}
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Bytes a device receives over the interconnect per byte of a collective's data (the gathered or reduced
# array; what a permute sends), in a group of n devices, with the bandwidth-optimal algorithms: a ring
# all-gather or reduce-scatter brings (n-1)/n of the array into each device, an all-reduce twice that (a
# reduce-scatter, then an all-gather), an all-to-all (n-1)/n, a permute all of it.
WIRE_FACTOR = {
    "all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
    "all-reduce": lambda n: 2 * (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}
# Instructions that move no data of their own in device memory: bookkeeping, control flow (its bodies are
# counted), the second halves of asynchronous pairs.
NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "conditional",
              "call", "after-all", "partition-id", "replica-id", "add-dependency", "opt-barrier",
              "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done", "async-done",
              "async-update", "send-done", "recv-done", "slice-done"}


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result's shape text: one array, or a tuple of them in parentheses
  opcode: str
  args: str  # the text inside the operand parentheses (operand names; a constant's literal)
  attributes: str  # the text after them
  root: bool = False

  @property
  def operands(self) -> list[str]:
    return re.findall(r"%([\w.\-]+)", self.args)

  def called(self, key: str) -> list[str]:
    """Names of the computations this instruction calls through attribute `key` (calls, body, ...)."""
    m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", self.attributes)
    return [] if not m else [name.lstrip("%") for name in re.findall(r"%?[\w.\-]+", m.group(1))]


@dataclasses.dataclass
class Computation:
  name: str
  instructions: list[Instruction]
  entry: bool = False

  def __post_init__(self):
    self.by_name = {i.name: i for i in self.instructions}

  @property
  def root(self) -> Instruction:
    return next(i for i in self.instructions if i.root)


# -- parsing -------------------------------------------------------------------------------------------------

def _group_end(text: str, start: int) -> int:
  """Index just past the bracket group that opens at text[start]; strings ("...") are skipped whole."""
  closing = {"(": ")", "{": "}", "[": "]"}
  stack, i = [], start
  while i < len(text):
    c = text[i]
    if c == '"':
      i = text.index('"', i + 1)
    elif c in closing:
      stack.append(closing[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
    i += 1
  raise ValueError(f"unbalanced brackets in {text[start:start + 80]!r}")


_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_DEFINITION = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = ")


def _instruction(line: str) -> Instruction | None:
  m = _DEFINITION.match(line)
  if not m:
    return None
  rest = line[m.end():]
  end = _group_end(rest, 0) if rest.startswith("(") else rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  opening = rest.index("(")
  closing = _group_end(rest, opening)
  return Instruction(m.group(2), shape, rest[:opening], rest[opening + 1:closing - 1], rest[closing:],
                     bool(m.group(1)))


def computations(text: str) -> dict[str, Computation]:
  """The computations of an HLO module's text, by name."""
  out, current, lines, entry = {}, None, [], False
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current, lines, entry = m.group(2), [], bool(m.group(1))
      continue
    if line.rstrip() == "}":
      out[current] = Computation(current, [i for i in map(_instruction, lines) if i is not None], entry)
      current = None
    else:
      lines.append(line)
  if not any(c.entry for c in out.values()):
    raise ValueError("no ENTRY computation in the HLO text")
  return out


# -- shapes ----------------------------------------------------------------------------------------------------

def arrays(shape: str) -> list[tuple[str, tuple[int, ...], int]]:
  """(element type, dimensions, memory space) of each array in a shape text (one, or a tuple's)."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype in ELEMENT_BYTES:
      space = _MEMORY_SPACE.search(layout or "")
      out.append((dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
  return out


def shape_bytes(shape: str, device_memory_only: bool = False) -> int:
  """Bytes of every array in a shape text; with `device_memory_only`, of those in memory space 0."""
  return int(sum(math.prod(dims) * ELEMENT_BYTES[dtype] for dtype, dims, space in arrays(shape)
                 if not (device_memory_only and space)))


def tuple_elements(shape: str) -> list[str]:
  """The top-level element shapes of a tuple shape text ([shape] when it is not a tuple)."""
  if not shape.startswith("("):
    return [shape]
  inner = re.sub(r"/\*.*?\*/", "", shape[1:-1])
  out, depth, start = [], 0, 0
  for i, c in enumerate(inner):
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "," and depth == 0:
      out.append(inner[start:i].strip())
      start = i + 1
  out.append(inner[start:].strip())
  return [s for s in out if s]


# -- how often each computation runs ---------------------------------------------------------------------------

def literal(comp: Computation, name: str) -> int | None:
  """The value of `name` in `comp` when it is an integer scalar constant (through copies and converts)."""
  for _ in range(16):
    inst = comp.by_name.get(name)
    if inst is None:
      return None
    if inst.opcode == "constant":
      return int(inst.args) if re.fullmatch(r"-?\d+", inst.args.strip()) else None
    if inst.opcode not in ("copy", "convert", "bitcast", "reshape") or not inst.operands:
      return None
    name = inst.operands[0]
  return None


def _tuple_index(inst: Instruction) -> int:
  return int(re.search(r"index=(\d+)", inst.attributes).group(1))


def trip_count(module: dict[str, Computation], caller: Computation, loop: Instruction) -> int | None:
  """How many times the while instruction `loop` of `caller` runs its body, or None if it cannot tell.

  XLA:CPU writes the count into the loop's backend_config (known_trip_count). The TPU compiler does not;
  there the condition compares the induction variable (an element of the loop's tuple) with a constant,
  and the count follows from its start (that element of the initial tuple) and step (the body's update
  of it)."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attributes)
  if m:
    return int(m.group(1))
  condition, body = module[loop.called("condition")[0]], module[loop.called("body")[0]]
  compare = condition.root
  direction = re.search(r"direction=(\w+)", compare.attributes)
  if compare.opcode != "compare" or direction is None or len(compare.operands) != 2:
    return None
  lhs, rhs = (condition.by_name.get(o) for o in compare.operands)
  direction = direction.group(1)
  if rhs is not None and rhs.opcode == "get-tuple-element":  # bound < i: flip it to i > bound
    lhs, rhs = rhs, lhs
    direction = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(direction, direction)
  if lhs is None or rhs is None or lhs.opcode != "get-tuple-element" or direction not in ("LT", "LE"):
    return None
  index, bound = _tuple_index(lhs), literal(condition, rhs.name)
  if bound is None:
    return None
  start, init = 0, caller.by_name.get(loop.operands[0]) if loop.operands else None
  if init is not None and init.opcode == "tuple" and index < len(init.operands):
    start = literal(caller, init.operands[index])
    if start is None:
      return None
  step, update = None, body.root
  if update.opcode == "tuple" and index < len(update.operands):
    inst = body.by_name.get(update.operands[index])
    while inst is not None and inst.opcode in ("copy", "bitcast") and inst.operands:
      inst = body.by_name.get(inst.operands[0])
    if inst is not None and inst.opcode == "add":
      steps = [s for s in (literal(body, o) for o in inst.operands) if s is not None]
      step = steps[0] if steps else None
  if not step or step < 0:
    return None
  span = bound - start + (1 if direction == "LE" else 0)
  return max(0, -(-span // step))


def multiplicities(module: dict[str, Computation]) -> tuple[dict[str, int], list[str]]:
  """({computation: how many times it runs per step}, the while loops whose trip count is unknown, each
  then counted once). Reducers (to_apply) are left out: they are per-element arithmetic of their caller."""
  counts: dict[str, int] = {}
  unknown: list[str] = []

  def visit(name: str, times: int) -> None:
    counts[name] = counts.get(name, 0) + times
    comp = module[name]
    for inst in comp.instructions:
      if inst.opcode == "while":
        trips = trip_count(module, comp, inst)
        if trips is None:
          unknown.append(inst.name)
          trips = 1
        visit(inst.called("body")[0], times * trips)
        visit(inst.called("condition")[0], times * (trips + 1))
        continue
      for key in ("calls", "branch_computations", "true_computation", "false_computation"):
        if inst.opcode in ("async-done", "async-update") and key == "calls":
          continue  # the async-start's computation, counted once through it
        for callee in inst.called(key):
          if callee in module:
            visit(callee, times)

  entry = next(c.name for c in module.values() if c.entry)
  visit(entry, 1)
  return counts, unknown


def _fused(module: dict[str, Computation]) -> set[str]:
  """The computations that are bodies of fusions (their instructions never touch device memory alone)."""
  out = set()
  for comp in module.values():
    for inst in comp.instructions:
      if inst.opcode == "fusion":
        out.update(inst.called("calls"))
  return out


# -- what is counted ---------------------------------------------------------------------------------------------

def group_size(inst: Instruction, devices: int) -> int:
  """The number of devices in each group of a collective: replica_groups in any of XLA's forms, explicit
  ({{0,1},{2,3}}), iota ([groups,size]<=[...]) or mesh axes (mesh['x'=2,'y'=4] {'y'}); empty: all."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", inst.attributes)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"('[^']*')=(\d+)", m.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'[^']*'", m.group(2)))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", inst.attributes)
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=\{\{([\d,\s]*)\}", inst.attributes)
  if m:
    return len([x for x in m.group(1).split(",") if x.strip()])
  return devices


def _collective_data(inst: Instruction, comp: Computation, kind: str) -> int:
  """Bytes of a collective's data: the gathered array (all-gather), the array reduced or exchanged
  (reduce-scatter, all-reduce, all-to-all), what is sent (collective-permute)."""
  if inst.opcode in ("all-gather-start", "collective-permute-start"):
    elements = tuple_elements(inst.shape)
    return shape_bytes(elements[1] if kind == "all-gather" else elements[0])
  if kind in ("reduce-scatter", "collective-permute"):
    return sum(shape_bytes(comp.by_name[o].shape) for o in inst.operands if o in comp.by_name)
  return shape_bytes(inst.shape)


def collectives(text: str, devices: int) -> dict:
  """Per collective kind (KINDS): "count" (executions per step), "bytes" (their data, WIRE_FACTOR's
  sense) and "wire_bytes" (what each device receives over the interconnect), per device; plus
  "unknown_loops": while loops whose trip count could not be read (counted once)."""
  module = computations(text)
  counts, unknown = multiplicities(module)
  out = {kind: {"count": 0, "bytes": 0, "wire_bytes": 0} for kind in KINDS}
  for name, times in counts.items():
    comp = module[name]
    for inst in comp.instructions:
      kind = COLLECTIVES.get(inst.opcode)
      if kind is None:
        continue
      data = _collective_data(inst, comp, kind)
      n = 2 if kind == "collective-permute" else group_size(inst, devices)
      out[kind]["count"] += times
      out[kind]["bytes"] += times * data
      out[kind]["wire_bytes"] += int(times * data * WIRE_FACTOR[kind](max(n, 1)))
  return {**out, "unknown_loops": unknown}


SLICING = ("dynamic-slice", "slice", "gather")  # read only what they output of their first operand


def _in_device_memory(shape: str) -> int:
  return shape_bytes(shape, device_memory_only=True)


def _traffic(inst: Instruction, comp: Computation, module: dict[str, Computation]) -> int:
  """Bytes one instruction (outside fusions) reads and writes in device memory. A slice reads what it
  outputs; a dynamic-update-slice writes its update in place; a fusion counts, per operand, only what
  its body slices out of it (an operand it only slices), nothing of the buffer it updates in place, and of
  its result only the updates written in place (XLA's cost analysis does the same)."""
  operand = lambda name: comp.by_name[name].shape if name in comp.by_name else ""  # noqa: E731
  operands = inst.operands
  if inst.opcode in SLICING:
    return 2 * _in_device_memory(inst.shape)
  if inst.opcode == "dynamic-update-slice":
    return 2 * _in_device_memory(operand(operands[1])) if len(operands) > 1 else 0
  if inst.opcode != "fusion":
    return _in_device_memory(inst.shape) + sum(_in_device_memory(operand(o)) for o in operands)
  body = module[inst.called("calls")[0]]
  users: dict[str, list[Instruction]] = {}
  for i in body.instructions:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  params = {int(i.args): i for i in body.instructions if i.opcode == "parameter" and i.args.strip().isdigit()}
  moved = 0
  for index, name in enumerate(operands):
    param, full = params.get(index), _in_device_memory(operand(name))
    uses = users.get(param.name, []) if param is not None else []
    if full and uses and all(u.opcode in SLICING and u.operands[0] == param.name for u in uses):
      moved += min(full, sum(shape_bytes(u.shape) for u in uses))
    elif full and uses and all(u.opcode == "dynamic-update-slice" and u.operands[0] == param.name for u in uses):
      continue  # the buffer updated in place: read nothing of it
    else:
      moved += full
  if body.root.opcode == "tuple":
    roots, outputs = [body.by_name.get(o) for o in body.root.operands], tuple_elements(inst.shape)
  else:
    roots, outputs = [body.root], [inst.shape]
  for index, root in enumerate(roots):
    shape = outputs[index] if index < len(outputs) else ""
    if root is not None and root.opcode == "dynamic-update-slice" and _in_device_memory(shape):
      moved += shape_bytes(body.by_name[root.operands[1]].shape) if root.operands[1] in body.by_name else 0
    else:
      moved += _in_device_memory(shape)
  return moved


def hbm_bytes(text: str, trips: bool = True) -> int:
  """Bytes that the step's instructions read and write in device memory per step: every instruction
  outside fusions (a fusion counts as one) by `_traffic`, arrays the compiler placed outside device memory
  (S(1): on chip) left out, each instruction as often as it runs (`trips=False`: once, the way XLA's cost
  analysis counts)."""
  module = computations(text)
  counts = multiplicities(module)[0]
  if not trips:
    counts = dict.fromkeys(counts, 1)
  fused = _fused(module)
  total = 0
  for name, times in counts.items():
    if name in fused:
      continue
    comp = module[name]
    total += times * sum(_traffic(inst, comp, module) for inst in comp.instructions if inst.opcode not in NO_TRAFFIC)
  return int(total)
