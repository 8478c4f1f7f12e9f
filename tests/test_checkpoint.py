"""Checkpoints: SIGKILL + resume is bitwise, corrupted checkpoints fall back, incompatible
configs refuse, NaN keeps the last good checkpoint, restore onto another mesh."""

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import fiddle as fdl
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import cli
from tests.conftest import LOSS_TOL, NO_CACHE, ROOT, needs_devices, read_losses, run_launcher
from pmem.train.checkpoint import CheckpointError
from pmem.train.loop import Trainer

STEPS = 30


def final_state(work, step=STEPS):
  with ocp.CheckpointManager(os.path.join(work, "checkpoints"), item_names=("state", "meta")) as m:
    return m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


# the one-device case runs in `make test-slow` (CI time); the 2x2x2 mesh resumes sharded state
@pytest.mark.parametrize("mesh", [pytest.param((1, 1, 1), marks=pytest.mark.slow), (2, 2, 2)])
def test_sigkill_and_resume_is_bitwise(tmp_path, mesh):
  args = ["-m", "experiments.train", "--config", "config:tiny", "--config", f"set:train.steps={STEPS}",
          "--config", "set:checkpoint.every=4", "--config", "set:eval.valid_batches=0"]
  args += [f"--config=set:mesh.{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), mesh)]
  # each process compiles its own steps (no cached executables): as a resumed run would
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", **NO_CACHE}
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  r = subprocess.run([sys.executable, *args, "--workdir", str(whole)], cwd=ROOT, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]

  p = subprocess.Popen([sys.executable, *args, "--workdir", str(killed)], cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics, saved, deadline = killed / "metrics.jsonl", killed / "checkpoints" / "4", time.time() + 300
  while time.time() < deadline and not (saved.is_dir() and len(metrics.read_text().splitlines()) >= 6):
    time.sleep(0.01)  # kill at an arbitrary step after the step-4 checkpoint is committed
  p.send_signal(signal.SIGKILL)
  p.wait()
  done = len(metrics.read_text().splitlines())
  assert 6 <= done < STEPS, f"killed after {done} steps"

  r = subprocess.run([sys.executable, *args, "--workdir", str(killed)], cwd=ROOT, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from the step-" in r.stdout
  a, b = final_state(whole), final_state(killed)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
  assert read_losses(killed) == read_losses(whole)


def trainer(work, *sets) -> Trainer:
  cfg = cli.build_config(["config:tiny", "set:train.progress=False", "set:eval.valid_batches=0", *sets])
  return Trainer(fdl.build(cfg), str(work))


def test_corrupted_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
  trainer(tmp_path, "set:train.steps=6", "set:checkpoint.every=2", "set:checkpoint.async_save=False").run()
  newest = tmp_path / "checkpoints" / "6" / "state"
  files = [f for f in newest.rglob("*") if f.is_file() and f.stat().st_size > 0]
  assert files
  for f in files:  # truncate every data file of the newest checkpoint
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  with caplog.at_level(logging.WARNING, logger="pmem"):
    t = trainer(tmp_path, "set:train.steps=6", "set:checkpoint.every=2")
  assert t.start_step == 4
  assert "checkpoint 6" in caplog.text and "falling back to step 4" in caplog.text


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  sets = ("set:train.steps=6", "set:checkpoint.every=2", "set:checkpoint.async_save=False")
  t = trainer(tmp_path, *sets)
  save = t.ckpt.manager.save

  def disk_full(step, *a, **k):
    if step == 4:  # a half-written temporary directory, then the device fills up
      partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1"
      (partial / "state").mkdir(parents=True)
      (partial / "state" / "junk").write_bytes(b"\0" * 100)
      raise OSError(errno.ENOSPC, "No space left on device")
    return save(step, *a, **k)

  monkeypatch.setattr(t.ckpt.manager, "save", disk_full)
  with pytest.raises(CheckpointError, match=r"saving step 4 .* No space left on device.* checkpoints \[2\] are kept"):
    t.run()
  resumed = trainer(tmp_path, *sets)
  assert resumed.start_step == 2
  resumed.run()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4", "6"]


def test_incompatible_config_refuses_to_resume(tmp_path):
  trainer(tmp_path, "set:train.steps=2").run()
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  r = run_launcher("--config", "config:tiny", "--config", "set:model.d_model=32", "--workdir", str(tmp_path))
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert "holds checkpoints of another config" in last and "model.d_model: checkpoint has 64, this run has 32" in last
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_nan_keeps_the_last_good_checkpoint(tmp_path):
  # warmup starts at lr 0, so step 1 is finite; the huge peak lr then blows the parameters up
  sets = ("set:train.steps=8", "set:checkpoint.every=1", "set:train.optim.lr=1e30", "set:train.optim.clip_norm=None",
          "set:train.optim.warmup_steps=4")
  with pytest.raises(FloatingPointError, match=r"(loss|param_norm) is (nan|inf) at step (\d)") as e:
    trainer(tmp_path, *sets).run()
  bad_step = int(str(e.value).split(" at step ")[1].split(";")[0])
  good = trainer(tmp_path, *sets)
  assert good.start_step == bad_step - 1 and good.start_step >= 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good.train_state["params"]))


@needs_devices(8)
def test_restore_onto_another_mesh(tmp_path):
  sets = ("set:train.steps=8", "set:checkpoint.every=4", "set:checkpoint.async_save=False")
  trainer(tmp_path / "whole", *sets).run()
  shutil.copytree(tmp_path / "whole", tmp_path / "moved")
  shutil.rmtree(tmp_path / "moved" / "checkpoints" / "8")  # as if stopped after step 4
  resumed = trainer(tmp_path / "moved", *sets, "set:mesh.data=2", "set:mesh.fsdp=2", "set:mesh.tensor=2")
  assert resumed.start_step == 4
  wq = resumed.train_state["params"]["stages"][0]["blocks"]["seq"]["wq"][...]
  assert len(wq.sharding.device_set) == 8
  resumed.run()
  np.testing.assert_allclose(read_losses(tmp_path / "moved"), read_losses(tmp_path / "whole"), **LOSS_TOL)
