"""The mixture of a finite mixture's tasks in the packing plan: each task cycles through all its examples,
a fresh order each pass, while the tasks are drawn at their rates; none is cut short (seqio's sampler
stops at the first exhausted task). Read back through the reader: which example each training row
holds is decoded from its answer."""

import json

import numpy as np
import pytest

from famjax import data
from famjax.data import plan as plan_lib, store

# Mixture rates of the packing plan: the full suite only (make test).
pytestmark = pytest.mark.slow

SIZES = (5, 11, 23, 41)  # 80 examples


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  directory = tmp_path_factory.mktemp("mixture")
  out = []
  for t, n in enumerate(SIZES):
    path = directory / f"t{t}.jsonl"
    path.write_text("".join(json.dumps({"inputs": f"Q{t}.{i}", "targets": f"A{t}.{i}"}) + "\n"
                            for i in range(n)))
    out.append((f"t{t}", str(path)))
  return directory, out


def config(sources, rates, **changes):
  directory, paths = sources
  return data.DataConfig(mixture="mixture_qa", seq_len=32, repeat_segment_len=0,
                         sources=tuple((name, path, float(r)) for (name, path), r in zip(paths, rates)),
                         store=str(directory / "stores"), **changes)


def reads(cfg, rows):
  """How often training read each example ("t.i" -> count) in the first `rows` rows."""
  store_rows = store.open_or_build(cfg, rows=rows, say=lambda _: None)
  vocab = data.get_vocabulary(cfg)
  counts = {f"{t}.{i}": 0 for t, n in enumerate(SIZES) for i in range(n)}
  with data.get_global_batches(store_rows, 8) as it:
    for _ in range(rows // 8):
      batch = next(it)
      for targets, weights in zip(batch["targets"], batch["weights"]):
        ids = targets[weights == 1]  # the answers, each "A<t>.<i>" + EOS
        for answer in np.split(ids, np.flatnonzero(ids == vocab.eos_id) + 1)[:-1]:
          counts[vocab.decode(answer.tolist())[1:]] += 1
  return counts


def test_rates_proportional_to_size_read_every_example_exactly_twice_in_two_passes(sources):
  counts = reads(config(sources, SIZES, pack=False), rows=2 * sum(SIZES))  # one example per row
  assert set(counts.values()) == {2}


def test_at_other_rates_no_task_is_cut_short(sources):
  rates = (1, 1, 1, 1)  # the small tasks are read many times, the large ones fewer, none cut short
  counts = reads(config(sources, rates, pack=False), rows=160)
  per_task = [[counts[f"{t}.{i}"] for i in range(n)] for t, n in enumerate(SIZES)]
  for t, task in enumerate(per_task):
    assert max(task) - min(task) <= 1, f"t{t}: {sorted(set(task))}"  # whole passes, within one
    assert abs(sum(task) - 160 / 4) <= 1  # the task's rate
  assert min(per_task[0]) >= 7 and max(per_task[3]) <= 1  # 40 reads of 5 examples, 40 of 41


def test_packed_rows_keep_the_mixture(sources):
  rates = (1, 2, 3, 4)
  cfg = config(sources, rates)
  rows = store.open_or_build(cfg, rows=96, say=lambda _: None)
  pieces = rows.plan.pieces(np.arange(len(rows)))
  for t, n in enumerate(SIZES):
    examples = pieces["example"][pieces["task"] == t]
    counts = np.bincount(examples, minlength=n)
    assert counts.max() - counts.min() <= 1
  draws = np.bincount(pieces["task"], minlength=4)
  np.testing.assert_allclose(draws / draws.sum(), np.array(rates) / sum(rates), atol=2 / draws.sum())
  assert reads(cfg, 96) == {f"{t}.{i}": int(c) for t, n in enumerate(SIZES)
                            for i, c in enumerate(np.bincount(pieces["example"][pieces["task"] == t],
                                                              minlength=n))}


def test_after_any_number_of_slots_each_task_had_its_share_within_one():
  tasks = [plan_lib.TaskLengths(f"t{t}", np.ones(n, np.int32), np.zeros(n, np.int32), rate)
           for t, (n, rate) in enumerate(zip(SIZES, (0.5, 3.0, 1.0, 7.25)))]
  shares = np.array([t.rate for t in tasks]) / sum(t.rate for t in tasks)
  sequence = np.array([t for t, _ in plan_lib.slot_sequence(tasks, seed=7, slots=20_000)])
  counts = np.cumsum(np.eye(4, dtype=np.int64)[sequence], axis=0)
  expected = np.arange(1, len(sequence) + 1)[:, None] * shares
  assert np.abs(counts - expected).max() < 2
  again = np.array([t for t, _ in plan_lib.slot_sequence(tasks, seed=7, slots=5_000)])
  np.testing.assert_array_equal(again, sequence[:5_000])  # a pure function of the seed, prefix-stable
  other = np.array([t for t, _ in plan_lib.slot_sequence(tasks, seed=8, slots=5_000)])
  assert not np.array_equal(other, again)
