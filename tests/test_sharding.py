"""One rules table drives sharding; the same config gives the same losses on 1 and 8 devices."""

import json

import fiddle as fdl
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import cli
from tests.conftest import LOSS_TOL, needs_devices, read_losses, run_launcher
from pmem.core import rules
from pmem.train.loop import Trainer

STEPS = 6


def tiny_losses(tmp_path, data=1, fsdp=1, tensor=1, *extra, config="tiny") -> list[float]:
  cfg = cli.build_config([f"config:{config}", f"set:train.steps={STEPS}", "set:train.progress=False",
                          f"set:mesh.data={data}", f"set:mesh.fsdp={fsdp}", f"set:mesh.tensor={tensor}", *extra])
  work = tmp_path / f"{data}{fsdp}{tensor}"
  Trainer(fdl.build(cfg), str(work)).run()
  return read_losses(work)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  return tiny_losses(tmp_path_factory.mktemp("one"))


def test_rules_resolve_with_fallback():
  assert rules.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
  assert rules.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert rules.logical_to_spec(("table_rows", "embed")) == P(("fsdp", "tensor"), None)
  assert rules.logical_to_spec(("heads", "head_dim"), ndim=3) == P(None, "tensor", None)  # stacked layers
  assert rules.logical_to_spec(("unknown_name",)) == P(None)


@needs_devices(8)
@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 4, 2)])
def test_mesh_losses_equal_one_device(tmp_path, one_device, mesh):
  losses = tiny_losses(tmp_path, *mesh)
  np.testing.assert_allclose(losses, one_device, **LOSS_TOL)
  assert losses[-1] < losses[0] - 0.5  # it trains


@needs_devices(8)
def test_params_are_sharded_by_the_rules(tmp_path):
  cfg = cli.build_config(["config:tiny", "set:mesh.data=2", "set:mesh.fsdp=2", "set:mesh.tensor=2"])
  t = Trainer(fdl.build(cfg), None)
  stage = t.train_state["params"]["stages"][0]["blocks"]
  wq = stage["seq"]["wq"][...]  # [layers, embed, heads, head_dim]
  assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
  shard = wq.addressable_shards[0].data.shape
  assert shard == (wq.shape[0], wq.shape[1] // 2, wq.shape[2] // 2, wq.shape[3])
  mu = jax.tree.leaves(t.train_state["opt"])  # Adam moments follow the parameter shardings
  assert any(getattr(m, "sharding", None) == wq.sharding and m.shape == wq.shape for m in mu)


def test_launcher_2x2x2_equals_one_device(tmp_path, one_device):
  r = run_launcher("--config", "config:tiny", "--config", f"set:train.steps={STEPS}", "--config", "set:mesh.data=2",
                   "--config", "set:mesh.fsdp=2", "--config", "set:mesh.tensor=2", "--workdir", str(tmp_path),
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((tmp_path / "summary.json").read_text())["devices"] == 8
  np.testing.assert_allclose(read_losses(tmp_path), one_device, **LOSS_TOL)


def test_batch_not_divisible_by_data_axes_is_an_error():
  cfg = cli.build_config(["config:tiny", "set:train.batch_size=6", "set:mesh.data=4"])
  with pytest.raises(ValueError, match="divisible by mesh.data"):
    Trainer(fdl.build(cfg), None)


@pytest.mark.slow
@needs_devices(8)
def test_pkm_on_a_mesh_equals_one_device(tmp_path):
  """PKM with the native CPU top-k and bag (XLA FFI calls inside the partitioned step) trains the same
  on a 2x2x2 mesh as on one device."""
  one = tiny_losses(tmp_path, 1, 1, 1, "set:eval.valid_batches=0", config="pkm_tiny")
  mesh = tiny_losses(tmp_path, 2, 2, 2, "set:eval.valid_batches=0", config="pkm_tiny")
  np.testing.assert_allclose(mesh, one, **LOSS_TOL)
