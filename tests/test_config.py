"""Configs, fiddlers, set: paths, --list, and one-line errors that suggest close matches."""

import json
import subprocess
import sys

import fiddle as fdl
import pytest
from flax import nnx

import configs
from configs import cli
from pmem.core.registry import CHANNEL_MIXERS, SEQUENCE_MIXERS
from tests.conftest import ROOT, run_launcher
from pmem.models import Decoder


def test_every_config_builds_and_inits_abstractly():
  configs.load_all()
  assert {"tiny", "demo"} <= set(configs.CONFIGS)
  for name in configs.CONFIGS:
    exp = fdl.build(cli.build_config([f"config:{name}"]))
    model = nnx.eval_shape(lambda: Decoder(exp.model, rngs=nnx.Rngs(0)))
    assert model.cost(exp.train.seq_len).params > 0


def test_stable_set_paths():
  cfg = cli.build_config(["config:tiny", "set:train.steps=7", "set:train.batch_size=8", "set:train.seq_len=32",
                          "set:seed=3", "set:mesh.data=2", "set:mesh.fsdp=2", "set:mesh.tensor=2"])
  exp = fdl.build(cfg)
  assert (exp.train.steps, exp.train.batch_size, exp.train.seq_len, exp.seed) == (7, 8, 32, 3)
  assert exp.mesh.shape == (2, 2, 2)
  exp = fdl.build(cli.build_config(["config:tiny", "set:checkpoint.every=5", "set:checkpoint.keep=2",
                                    "set:data.corpus='kjv'", "set:data.tokenizer.kind='bpe'",
                                    "set:data.tokenizer.vocab_size=4096", "set:eval.every=10",
                                    "set:eval.valid_batches=3"]))
  assert (exp.checkpoint.every, exp.checkpoint.keep, exp.data.corpus) == (5, 2, "kjv")
  assert (exp.data.tokenizer.kind, exp.data.tokenizer.vocab_size) == ("bpe", 4096)
  assert (exp.eval.every, exp.eval.valid_batches) == (10, 3)


def test_fiddlers_apply_in_order_with_arguments():
  exp = fdl.build(cli.build_config(["config:tiny", "fiddler:tied", "fiddler:remat(policy='dots')",
                                    "set:model.remat='full'", "fiddler:z_loss(weight=0.5)"]))
  assert exp.model.tie_embeddings and exp.model.remat == "full" and exp.train.z_loss == 0.5


def test_nested_dataclass_defaults_are_settable():
  assert "train.optim.tables.lr_mult" in cli.paths(cli.build_config(["config:tiny"]))
  exp = fdl.build(cli.build_config(["config:tiny", "set:train.optim.tables.lr_mult=5.0"]))
  assert exp.train.optim.tables.lr_mult == 5.0


@pytest.mark.parametrize("commands,message", [
    (["config:tinny"], "unknown config 'tinny'; did you mean 'tiny'?"),
    (["config:tiny", "fiddler:tide"], "unknown fiddler 'tide'; did you mean 'tied'?"),
    (["config:tiny", "set:train.step=3"], "unknown config path 'train.step'; did you mean 'train.steps'"),
    (["config:tiny", "set:mesh.dta=2"], "did you mean 'mesh.data'"),
    (["config:tiny", "set:train.steps=many"], "set:train.steps: expected int, got 'many'"),
    (["config:tiny", "fiddler:remat(polcy='full')"], "fiddler 'remat' takes no argument 'polcy'"),
    (["set:seed=1"], "comes before config:NAME"),
    (["tiny"], "bad --config 'tiny'"),
])
def test_bad_commands_fail_with_one_clear_line(commands, message):
  with pytest.raises(cli.ConfigError) as e:
    cli.build_config(commands)
  assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("registry, bad, message", [
    (SEQUENCE_MIXERS, "gdnn", "unknown sequence mixer 'gdnn'; did you mean 'gdn'?"),
    (CHANNEL_MIXERS, "engrm", "unknown channel mixer 'engrm'; did you mean 'engram'?"),
    (configs.CONFIGS, "tinyy", "unknown config 'tinyy'; did you mean 'tiny'?"),
    (configs.FIDDLERS, "tide", "unknown fiddler 'tide'; did you mean 'tied'?"),
])
def test_every_registry_names_the_kind_and_the_close_matches(registry, bad, message):
  """One mechanism (pmem.core.registry.Registry) behind every name: the same one-line error."""
  with pytest.raises(KeyError) as e:
    registry[bad]
  assert str(e.value).startswith(message) and "\n" not in str(e.value)
  with pytest.raises(KeyError, match="did you mean 'gdn'"):  # a mixer named in a fiddler's argument
    cli.build_config(["config:tiny", "fiddler:mixer(name='gdnn')"])


def test_registries_load_what_registers():
  """A fresh process that imports only the registries finds every built-in mixer and config: registration does
  not depend on which module happened to be imported first."""
  code = ("import json; from pmem.core.registry import SEQUENCE_MIXERS, CHANNEL_MIXERS; import configs; "
          "print(json.dumps([sorted(SEQUENCE_MIXERS), sorted(CHANNEL_MIXERS), sorted(configs.CONFIGS)]))")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  test_only = {"retnet", "retnet_tiny", "hybrid_periodic"}  # tests/registered.py, registered in this process by conftest
  assert json.loads(r.stdout) == [sorted(set(r_) - test_only) for r_ in (SEQUENCE_MIXERS, CHANNEL_MIXERS, configs.CONFIGS)]


def test_config_txt_names_the_classes_built(tmp_path):
  """Two configs whose values print alike (gdn_tiny, the test-only retnet_tiny) differ in config.txt's classes."""
  from experiments.train import write_config
  texts = {}
  for name in ("gdn_tiny", "retnet_tiny"):
    write_config(cli.build_config([f"config:{name}"]), str(tmp_path / name))
    texts[name] = (tmp_path / name / "config.txt").read_text()
  assert "# model.sequence_mixer: pmem.layers.deltanet.GatedDeltaNet (Partial)" in texts["gdn_tiny"]
  assert "# model.sequence_mixer: tests.registered.Retention (Partial)" in texts["retnet_tiny"]
  assert "# <root>: pmem.train.loop.Experiment" in texts["gdn_tiny"]


def test_launcher_list_and_bad_name_leave_workdir_untouched(tmp_path):
  r = run_launcher("--list")
  assert r.returncode == 0
  for name in ("config:tiny", "config:demo", "fiddler:tied", "fiddler:remat"):
    assert name in r.stdout
  work = tmp_path / "w"
  work.mkdir()
  (work / "keep.txt").write_text("x")
  r = run_launcher("--config", "config:tiny", "--config", "set:train.stpes=2", "--workdir", str(work))
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: unknown config path 'train.stpes'; did you mean 'train.steps'"), r.stderr
  assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]
  # a validation error past config parsing (mesh larger than the devices) also writes nothing
  r = run_launcher("--config", "config:tiny", "--config", "set:mesh.data=64", "--workdir", str(work))
  assert r.returncode != 0 and "needs 64 devices" in r.stderr.strip().splitlines()[-1]
  assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]


def test_launcher_writes_run_files(tmp_path):
  r = run_launcher("--config", "config:tiny", "--config", "set:train.steps=3", "--workdir", str(tmp_path))
  assert r.returncode == 0, r.stderr
  assert "train.steps: int = 3" in (tmp_path / "config.txt").read_text()
  assert json.loads((tmp_path / "config.json").read_text())["root"]
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 3]  # the last row is the final evaluation
  assert {"step", "loss", "learning_rate", "tokens_per_s"} <= set(rows[0])
  assert {"valid/loss", "valid/bpb"} <= set(rows[-1])
  s = json.loads((tmp_path / "summary.json").read_text())
  assert {"params_total", "params_active_per_token", "flops_per_token", "final_loss", "eval"} <= set(s)
  assert s["final_loss"] == rows[-2]["loss"] and s["eval"]["valid/bpb"] == rows[-1]["valid/bpb"]
  assert "step 3/3 loss=" in r.stderr and "eta=" in r.stderr  # progress as plain lines when not a TTY
