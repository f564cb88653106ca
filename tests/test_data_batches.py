"""famjax.data batches: shapes and loss weights, packing with and without boundary masks, and the
iterator state (save, restore, same next batches)."""

import json

import numpy as np
import pytest

from famjax import data
from famjax.data import packing

BATCH_KEYS = {"inputs": np.int32, "targets": np.int32, "weights": np.float32, "segment_ids": np.int32}


def write_jsonl(path, n, prefix="Q"):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"inputs": f"{prefix}{i}", "targets": f"A{i}"}) + "\n")
  return str(path)


def segments(row):
  """[(segment id, slice)] of a row's non-padding segments."""
  ids = row["segment_ids"]
  return [(s, np.flatnonzero(ids == s)) for s in np.unique(ids) if s]


@pytest.mark.parametrize("mixture", ["famjax_demo_short", pytest.param("famjax_demo", marks=pytest.mark.slow)])
def test_demo_batches_have_the_contract_shapes_and_weights(mixture):
  cfg = data.DataConfig(mixture=mixture, seq_len=512, repeat_segment_len=32)
  with data.get_batches(cfg, batch_size=4) as it:
    batch = next(it)
  assert set(batch) == set(BATCH_KEYS)
  for key, dtype in BATCH_KEYS.items():
    assert batch[key].shape == (4, 512) and batch[key].dtype == dtype, key
  w, seg = batch["weights"], batch["segment_ids"]
  assert set(np.unique(w).tolist()) <= {0.0, np.float32(0.1).item(), 1.0}
  assert np.all(w[seg == 0] == 0) and np.all(batch["targets"][seg == 0] == 0)
  assert np.all((w == 1).sum(axis=1) > 0)  # every row holds answers
  assert np.all(np.isclose(w, 0.1).sum(axis=1) == 32)  # and one repeated segment
  assert data.get_vocabulary(cfg).vocab_size == data.BYTE_VOCAB_SIZE == 259


def test_weights_follow_prompt_answer_repeat_and_padding(tmp_path):
  """Instructions 0, answers (and EOS) 1, marker 0, repeated tokens 0.1, padding 0; inputs are the
  targets shifted right within each example."""
  path = write_jsonl(tmp_path / "qa.jsonl", 40)
  cfg = data.DataConfig(mixture="weights_test", sources=(("qa", path, 1.0),), seq_len=96,
                        repeat_segment_len=8, prefetch=0)
  vocab = data.get_vocabulary(cfg)
  marker = vocab.encode(cfg.repeat_segment_marker)
  with data.get_batches(cfg, batch_size=2, num_epochs=1) as it:
    batch = next(it)
  for b in range(2):
    row = {k: v[b] for k, v in batch.items()}
    segs = segments(row)
    assert len(segs) >= 2  # packed
    for n, (s, idx) in enumerate(segs):
      assert np.all(np.diff(idx) == 1)  # contiguous
      targets, weights = row["targets"][idx], row["weights"][idx]
      if n == len(segs) - 1:  # the last example carries the marker and the repeated tokens
        example_len = len(idx) - len(marker) - 8
        assert list(targets[example_len:example_len + len(marker)]) == marker
        assert np.all(weights[example_len:example_len + len(marker)] == 0)
        assert np.allclose(weights[-8:], 0.1)
        repeated = targets[-8:]
        content = row["targets"][:idx[0] + example_len]
        assert any(np.array_equal(content[i:i + 8], repeated) for i in range(len(content) - 7))
        targets, weights = targets[:example_len], weights[:example_len]
      text = vocab.decode(targets.tolist())
      prompt, answer = text.split("\n")
      assert prompt.startswith("Q") and answer == "A" + prompt[1:]
      expected = [0.0] * (len(prompt) + 1) + [1.0] * (len(answer) + 1)  # "\n" is prompt, EOS answer
      assert weights.tolist() == expected
      assert targets[-1] == vocab.eos_id
      inputs = row["inputs"][idx]
      assert inputs[0] == 0 and np.array_equal(inputs[1:], row["targets"][idx][:-1])
    pad = row["segment_ids"] == 0
    assert np.all(row["weights"][pad] == 0) and np.all(row["inputs"][pad] == 0)


def _packer(mask, repeat_len=4, seq_len=40, seed=0):
  spec = packing.PackingSpec(seq_len=seq_len, mask_between_examples=mask, repeat_len=repeat_len,
                             repeat_weight=0.1, marker=(250, 251))
  return packing.Packer(spec, np.random.default_rng(seed))


def _three_examples():
  """Token ranges that tell the examples apart: 10.., 30.., 50..; prompts of 3 tokens."""
  return [np.arange(start, start + 9, dtype=np.int32) for start in (10, 30, 50)]


@pytest.mark.parametrize("mask", [False, True])
def test_packing_with_and_without_boundary_masks(mask):
  packer = _packer(mask)
  rows = []
  for tokens in _three_examples() + [np.arange(70, 90, dtype=np.int32)]:  # the last one overflows
    rows += packer.add(tokens, 3, "t")
  assert len(rows) == 1
  row = rows[0]
  # three examples of 9, then the marker and 4 repeated tokens in the last example's segment
  assert row["segment_ids"].tolist() == [1] * 9 + [2] * 9 + [3] * 9 + [3] * 6 + [0] * 7
  assert row["targets"][27:29].tolist() == [250, 251]
  assert row["weights"].tolist() == ([0.0] * 3 + [1.0] * 6) * 3 + [0.0] * 2 + [pytest.approx(0.1)] * 4 \
      + [0.0] * 7
  starts = [0, 9, 18]
  assert all(row["inputs"][s] == 0 for s in starts)
  assert row["inputs"][29] == row["targets"][28]  # the repeated tokens follow on in their segment
  # where the repeated tokens come from: under masks only the last (visible) example
  sources = set()
  for seed in range(40):
    p = _packer(mask, seed=seed)
    for tokens in _three_examples():
      p.add(tokens, 3, "t")
    row = p.flush()[0]
    repeated, content = row["targets"][29:33], row["targets"][:27]
    start = [i for i in range(24) if np.array_equal(content[i:i + 4], repeated)]
    assert start, "the repeated tokens are consecutive tokens of the row"
    sources.add(start[0] // 9)  # the example the copy starts in
  assert sources == ({2} if mask else {0, 1, 2})


def test_pack_false_gives_one_example_per_row_and_truncation_keeps_the_question():
  spec = packing.PackingSpec(seq_len=16, pack=False)
  packer = packing.Packer(spec, np.random.default_rng(0))
  rows = packer.add(np.arange(1, 6, dtype=np.int32), 2, "t")
  rows += packer.add(np.arange(100, 130, dtype=np.int32), 26, "t")  # 30 tokens: truncated
  rows += packer.flush()
  assert len(rows) == 2
  assert rows[0]["segment_ids"].tolist() == [1] * 5 + [0] * 11
  assert rows[1]["targets"].tolist() == list(range(114, 130))  # prompt end + answer kept
  assert rows[1]["weights"].tolist() == [0.0] * 12 + [1.0] * 4


@pytest.mark.slow
def test_iterator_state_restores_the_identical_next_batches():
  cfg = data.DataConfig(mixture="famjax_demo_short", seq_len=256, repeat_segment_len=16, seed=3)
  with data.get_batches(cfg, batch_size=4) as it:
    for _ in range(3):
      next(it)
    state = json.loads(json.dumps(it.state()))
    expected = [next(it) for _ in range(2)]
  assert state["batches"] == 3 and state["seed"] == 3
  for prefetch in (0, 2):
    with data.get_batches(cfg.replace(prefetch=prefetch), batch_size=4, state=state) as it2:
      for want in expected:
        got = next(it2)
        for key in BATCH_KEYS:
          np.testing.assert_array_equal(got[key], want[key], err_msg=key)
      assert it2.state()["batches"] == 5
  with pytest.raises(ValueError, match="batch_size"):
    data.get_batches(cfg, batch_size=8, state=state)
  # resume="reseed": no replay; another stream, itself reproducible from its own states
  with data.get_batches(cfg, batch_size=4, state=state, resume="reseed") as r1:
    first = next(r1)
    later_state = r1.state()
    later = next(r1)
  assert later_state["origin"] == 3 and later_state["batches"] == 4
  assert not np.array_equal(first["targets"], expected[0]["targets"])
  with data.get_batches(cfg, batch_size=4, state=state, resume="reseed") as r2:
    np.testing.assert_array_equal(next(r2)["targets"], first["targets"])
  with data.get_batches(cfg, batch_size=4, state=later_state) as r3:
    np.testing.assert_array_equal(next(r3)["targets"], later["targets"])
  with pytest.raises(ValueError, match="config"):
    data.get_batches(cfg.replace(instruction_weight=0.5), batch_size=4, state=state)


@pytest.mark.slow
def test_other_seeds_give_other_batches():
  cfg = data.DataConfig(mixture="famjax_demo_short", seq_len=256, repeat_segment_len=16, prefetch=0)
  with data.get_batches(cfg, 2, seed=1) as a, data.get_batches(cfg, 2, seed=2) as b:
    assert not np.array_equal(next(a)["targets"], next(b)["targets"])


def test_packing_aligns_examples_to_blocks():
  """pack_align: every example starts at a multiple of it; the gaps are padding (segment 0, weight 0)."""
  spec = packing.PackingSpec(seq_len=32, align=8)
  packer = packing.Packer(spec, np.random.default_rng(0))
  rows = []
  for n in (5, 8, 3, 10, 9):
    rows += packer.add(np.arange(100, 100 + n, dtype=np.int32), 2, "t")
  rows += packer.flush()
  assert [[idx[0] for _, idx in segments(r)] for r in rows] == [[0, 8, 16], [0, 16]]
  assert [[len(idx) for _, idx in segments(r)] for r in rows] == [[5, 8, 3], [10, 9]]
  first = rows[0]
  assert np.all(first["segment_ids"][5:8] == 0) and np.all(first["weights"][5:8] == 0)
  assert first["inputs"][8] == 0 and first["inputs"][9] == 100  # BOS at every example's start
  assert packer.counts["tokens"] == 5 + 8 + 3 + 10 + 9
  with pytest.raises(ValueError, match="pack_align"):
    data.DataConfig(seq_len=100, pack_align=32, repeat_segment_len=0)
