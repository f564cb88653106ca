"""The training loop in-process: checkpoints and exact resume, a damaged checkpoint, refusing another
run's workdir, NaN, metrics and TensorBoard files, evaluation, export and init_from."""

import json
import os
import shutil
import struct
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `configs`

from configs import demo  # noqa: E402
from famjax import Transformer, from_hf  # noqa: E402
from famjax.training import evaluate, export, init_from, loop, tensorboard  # noqa: E402
from famjax.training.config import ConfigError, job_config  # noqa: E402
from famjax.training.metrics import read_history  # noqa: E402
from famjax.training.synthetic import SyntheticBatches  # noqa: E402

TINY_MODEL = dict(vocab_size=320, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64,
                  block_size=8, mem_segments=1, fam_len=0, attention="bswa", remat="none",
                  dtype="float32")


def tiny_job(**overrides):
  """A LoRA-adapted bswa model on the synthetic stream; `overrides`: dotted config keys."""
  c = demo.get_config("bswa").to_dict()
  c["model"].update(TINY_MODEL)
  c["data"]["mixture"] = "synthetic"
  c.update(seq_len=32, batch_size=2, steps=6, checkpoint_every=2, log_every=1, keep_checkpoints=5)
  c["lora"].update(rank=2, alpha=4.0)
  c["optimizer"].update(name="adafactor", learning_rate=1e-2, schedule="constant", warmup_steps=0)
  for key, value in overrides.items():
    *path, last = key.split(".")
    section = c
    for p in path:
      section = section[p]
    section[last] = value
  return job_config(c, vocab_size=256)


def batches_for(job, transform=None):
  def make(position):
    it = SyntheticBatches(job.train.batch_size, job.train.seq_len, job.train.seed, state=position)
    return it if transform is None else transform(it)
  return make


def run(job, workdir, **kw):
  messages = []
  result = loop.run(job, workdir, kw.pop("make_batches", batches_for(job)), say=messages.append, **kw)
  return result, messages


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_history(workdir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """6 uninterrupted steps, checkpoints at 2, 4, 6."""
  workdir = tmp_path_factory.mktemp("straight")
  result, _ = run(tiny_job(), workdir)
  assert result.status == "done" and result.step == 6
  return workdir


@pytest.mark.slow
def test_outputs(straight):
  records = read_history(straight / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu", "step_time"):
    assert all(np.isfinite(r[key]) for r in records), key
  assert sorted(int(p.name) for p in (straight / "checkpoints").iterdir()) == [2, 4, 6]
  assert json.loads((straight / "config.json").read_text())["lora"]["rank"] == 2
  # TensorBoard: a valid TFRecord stream of Event protos, one scalar summary per logged step.
  events = list((straight / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1
  data, payloads = events[0].read_bytes(), []
  while data:
    (length,) = struct.unpack("<Q", data[:8])
    assert struct.unpack("<I", data[8:12])[0] == tensorboard._masked_crc(data[:8])
    payload = data[12:12 + length]
    assert struct.unpack("<I", data[12 + length:16 + length])[0] == tensorboard._masked_crc(payload)
    payloads.append(payload)
    data = data[16 + length:]
  assert len(payloads) == 7 and b"brain.Event:2" in payloads[0] and b"loss" in payloads[1]


def test_crc32c_known_answer():
  assert tensorboard.crc32c(b"123456789") == 0xE3069283


class CrashAt:
  """The batch stream of a job whose process dies when it asks for batch `n` (after step n - 1 ran)."""

  def __init__(self, it, n):
    self.it, self.n, self.taken = it, n, int(it.state().get("index", it.state().get("batches", 0)))

  def __iter__(self):
    return self

  def __next__(self):
    if self.taken + 1 == self.n:
      raise KeyboardInterrupt("crash")
    self.taken += 1
    return next(self.it)

  def state(self):
    return self.it.state()

  def close(self):
    getattr(self.it, "close", lambda: None)()


@pytest.mark.slow
def test_resume_after_a_crash_reaches_the_same_losses(straight, tmp_path):
  job = tiny_job()
  with pytest.raises(KeyboardInterrupt):  # dies after step 3 ran, before it was logged or saved
    run(job, tmp_path, make_batches=batches_for(job, lambda it: CrashAt(it, 4)))
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2]
  result, messages = run(job, tmp_path)
  assert any("resumed from checkpoint 2" in m for m in messages)
  assert result.status == "done" and losses(tmp_path) == losses(straight)


@pytest.mark.slow
def test_damaged_latest_checkpoint_is_skipped(straight, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  for f in (workdir / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")  # a checkpoint that was cut mid-write
  records = [r for r in read_history(workdir / "metrics.jsonl")]
  with pytest.warns(RuntimeWarning, match="checkpoints/6 could not be restored"):
    result, messages = run(tiny_job(), workdir)
  assert any("resumed from checkpoint 4" in m for m in messages)
  assert result.status == "done" and result.step == 6
  assert losses(workdir) == {r["step"]: r["loss"] for r in records}
  assert len(list((workdir / "checkpoints_corrupt").iterdir())) == 1


@pytest.mark.slow
def test_workdir_of_another_config_is_refused(straight, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  with pytest.raises(ConfigError, match=r"model\.d_model \(32 -> 64\).*--restart"):
    run(tiny_job(**{"model.d_model": 64}), workdir)
  other = tiny_job(seed=1)  # another data stream: as incompatible, and nothing new to compile
  with pytest.raises(ConfigError, match=r"seed \(0 -> 1\)"):
    run(other, workdir)
  result, messages = run(other, workdir, restart=True)
  assert result.step == 6 and any("moved the previous run" in m for m in messages)
  previous = [p for p in workdir.iterdir() if p.name.startswith("previous_")]
  assert len(previous) == 1 and (previous[0] / "checkpoints" / "6").is_dir()
  assert losses(workdir) != losses(straight)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  class PoisonAtThirdBatch:
    def __init__(self, it):
      self.it = it

    def __iter__(self):
      return self

    def __next__(self):
      batch = next(self.it)
      if self.it.index == 3:
        batch["weights"] = np.full_like(batch["weights"], np.nan)
      return batch

    def state(self):
      return self.it.state()

  job = tiny_job()
  result, _ = run(job, tmp_path, make_batches=batches_for(job, PoisonAtThirdBatch))
  assert result.status == "nan" and "at step 3" in result.message and "checkpoints/2" in result.message
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2]
  step, params = export.restore_params(job, tmp_path)
  assert step == 2 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_evaluate_and_export(straight, tmp_path):
  job = tiny_job()
  result = evaluate.evaluate(job, straight, lambda: SyntheticBatches(2, 32, seed=99), num_batches=3)
  assert result["step"] == 6 and result["batches"] == 3 and np.isfinite(result["loss"])
  assert "checkpoint 6: loss" in evaluate.report(result)
  hf_dir = export.export_hf(job, straight, tmp_path / "hf")
  tokens = np.asarray(next(SyntheticBatches(2, 32, seed=5))["inputs"])
  merged = export.restore_params(job, straight)[1]
  reloaded = from_hf(hf_dir)
  np.testing.assert_allclose(reloaded(tokens), Transformer(job.model, params=merged)(tokens), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.slow
def test_init_from_a_famjax_run_and_an_hf_directory(straight, tmp_path):
  trained = export.restore_params(tiny_job(), straight)[1]  # LoRA merged
  fam_job = tiny_job(**{"model.attention": "fam", "model.fam_len": 2, "lora.rank": 0,
                        "init_from": str(straight)})
  cfg = init_from.source_model_config(straight, fam_job.model)
  assert cfg.attention == "fam" and cfg.d_model == 32
  params = init_from.load_params(straight, cfg)
  np.testing.assert_array_equal(params["layers"]["q"], trained["layers"]["q"])
  assert params["fam_prompt"].shape == (2, 32)  # the only new weight
  hf_dir = export.export_hf(tiny_job(), straight, tmp_path / "hf")
  cfg_hf = init_from.source_model_config(hf_dir, fam_job.model)
  assert cfg_hf == cfg
  np.testing.assert_array_equal(init_from.load_params(hf_dir, cfg_hf)["layers"]["down"],
                                trained["layers"]["down"])
  with pytest.raises(ConfigError, match="config.init_from"):
    init_from.source_model_config(tmp_path / "nothing", fam_job.model)


@pytest.mark.slow
def test_the_data_pipeline_resumes_exactly(tmp_path):
  from famjax.train_data import TrainData  # famjax.data (TensorFlow): only here
  job = tiny_job(**{"data.mixture": "famjax_demo_short", "data.repeat_segment_len": 0})
  source = TrainData(job.data, job.train)
  straight = tmp_path / "straight"
  result, _ = run(job, straight, make_batches=source.batches)
  assert result.status == "done"
  with pytest.raises(KeyboardInterrupt):
    run(job, tmp_path / "run", make_batches=lambda pos: CrashAt(source.batches(pos), 5))
  run(job, tmp_path / "run", make_batches=source.batches)
  assert losses(tmp_path / "run") == losses(straight)


@pytest.mark.slow
def test_evaluation_during_training_leaves_the_training_alone(straight, tmp_path):
  job = tiny_job(eval_every=2, eval_steps=2)
  eval_batches = lambda: SyntheticBatches(2, 32, seed=99)  # noqa: E731
  result, _ = run(job, tmp_path, make_eval_batches=eval_batches)
  assert result.status == "done"
  assert losses(tmp_path) == losses(straight)  # same training stream and RNG
  records = {r["step"]: r for r in read_history(tmp_path / "metrics.jsonl")}
  assert [s for s, r in records.items() if "eval_loss" in r] == [2, 4, 6]
  # The step's forward on the state equals --mode=eval's on the checkpoint of the same step.
  offline = evaluate.evaluate(job, tmp_path, eval_batches, num_batches=2)
  np.testing.assert_allclose(records[6]["eval_loss"], offline["loss"], rtol=1e-5)
  np.testing.assert_allclose(records[6]["eval_accuracy"], offline["accuracy"], rtol=1e-5)


@pytest.mark.slow
def test_profile_steps_write_a_trace_tensorboard_lists(tmp_path):
  import argparse
  from tensorboard.plugins import base_plugin
  from xprof.profile_plugin import ProfilePlugin
  result, messages = run(tiny_job(profile_steps="2,3", steps=4), tmp_path)
  assert result.status == "done" and any(m.startswith("step memory per device (XLA)") for m in messages)
  traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1
  context = base_plugin.TBContext(logdir=str(tmp_path / "tensorboard"), data_provider=None,
                                  flags=argparse.Namespace(master_tpu_unsecure_channel=""))
  assert list(ProfilePlugin(context).generate_runs()) == [traces[0].parent.name]


@pytest.mark.slow
def test_evaluation_on_the_real_validation_split_leaves_the_training_alone(tmp_path):
  from famjax.train_data import TrainData  # famjax.data (TensorFlow): only here
  real = {"data.mixture": "famjax_demo_short", "data.repeat_segment_len": 0, "steps": 4}
  job_off = tiny_job(**real)
  job_on = tiny_job(**real, eval_every=2, eval_steps=2)
  off = TrainData(job_off.data, job_off.train)
  on = TrainData(job_on.data, job_on.train)
  run(job_off, tmp_path / "off", make_batches=off.batches)
  run(job_on, tmp_path / "on", make_batches=on.batches, make_eval_batches=on.eval_batches)
  assert losses(tmp_path / "on") == losses(tmp_path / "off")
  records = read_history(tmp_path / "on" / "metrics.jsonl")
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [2, 4] and all(np.isfinite(r["eval_loss"]) for r in evals)
  offline = evaluate.evaluate(job_on, tmp_path / "on", on.eval_batches, num_batches=2)  # --mode=eval
  np.testing.assert_allclose(evals[1]["eval_loss"], offline["loss"], rtol=1e-5)


@pytest.mark.slow
def test_the_passkey_check_during_training_streams_famjax_evals_passkey(tmp_path, monkeypatch):
  """The PassKey values logged during training are famjax.eval's on the checkpoint of the same step:
  the same examples, model and decoding, answer for answer (an untrained model's answers are arbitrary
  strings, so they differ as soon as any of those does)."""
  from famjax.evaluation import passkey as passkey_lib, runner
  from famjax.evaluation.load import describe
  from famjax.train_data import TrainData  # famjax.data (TensorFlow): only here
  from famjax.train_eval import passkey_eval
  job = tiny_job(**{"data.mixture": "famjax_demo_short", "data.repeat_segment_len": 0, "steps": 2,
                    "model.attention": "fam", "model.fam_len": 2, "eval_every": 2, "eval_steps": 0,
                    "eval_passkey_lengths": "128,256", "eval_passkey_examples": 2,
                    "eval_passkey_format": "short"})
  during = []  # the full results of the check during training (the loop logs only exact match)
  evaluate = passkey_lib.evaluate_passkey
  monkeypatch.setattr(passkey_lib, "evaluate_passkey", lambda *a, **k: during.append(evaluate(*a, **k))
                      or during[-1])
  data = TrainData(job.data, job.train)
  result, _ = run(job, tmp_path, make_batches=data.batches, passkey_eval=passkey_eval(job, data))
  monkeypatch.undo()
  assert result.status == "done"
  record = read_history(tmp_path / "metrics.jsonl")[-1]
  assert record["step"] == 2 and "eval_loss" not in record  # eval_steps=0: PassKey only
  assert {k for k in record if k.startswith("eval_passkey_")} == {"eval_passkey_128", "eval_passkey_256"}

  settings = runner.Settings(passkey_lengths=(128, 256), passkey_examples=2, passkey_format="short")
  offline = runner.run(runner.prepare([describe(tmp_path, "run")], settings), tmp_path / "eval",
                       log=lambda _: None)["models"]["run"]
  assert offline["info"]["step"] == 2
  for logged, online, r in zip(("eval_passkey_128", "eval_passkey_256"), during, offline["passkey"]):
    assert record[logged] == r["exact_match"] / 100
    assert [p["output"] for p in online["predictions"]] == [p["output"] for p in r["predictions"]]
  assert any(p["output"] for r in offline["passkey"] for p in r["predictions"])  # answers to compare
