"""Two JAX processes x 4 CPU devices (gloo collectives) form one 8-device mesh and train
``tiny`` to the same per-step losses as one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import LOSS_TOL, ROOT, read_losses, run_launcher

ARGS = ["--config", "config:tiny", "--config", "set:train.steps=5", "--config", "set:mesh.data=2",
        "--config", "set:mesh.fsdp=2", "--config", "set:mesh.tensor=2"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # ~110 s; gloo's 30 s context timeout fails it when another xdist worker loads the machine
@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
  single = tmp_path / "single"
  r = run_launcher(*ARGS, "--workdir", str(single), env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert r.returncode == 0, r.stderr[-3000:]

  multi = tmp_path / "multi"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  addr = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, "-m", "experiments.train", *ARGS, "--workdir", str(multi),
                             "--coordinator_address", addr, "--num_processes", "2", "--process_id", str(i)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  summary = json.loads((multi / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["devices"] == 8
  np.testing.assert_allclose(read_losses(multi), read_losses(single), **LOSS_TOL)  # gloo sums in its own order
  assert "pmem:" in outs[0][0] and "pmem:" not in outs[1][0]  # process 0 alone reports
