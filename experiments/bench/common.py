"""Pieces the benchmarks share: a torch oracle stepping on request, and free memory."""

from __future__ import annotations

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]


class TorchWorker:
  """An oracle script's ``bench`` mode in the oracle venv: after ``ready``, each ``step`` line on
  stdin runs one train step and prints its seconds; ``quit`` exits."""

  def __init__(self, python: str, script: str, *args: str):
    self.p = subprocess.Popen([python, str(ROOT / "experiments/oracles" / script), "bench", *args],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if self.p.stdout.readline().strip() != "ready":
      raise RuntimeError(f"the torch worker {script} did not start")

  def step(self) -> float:
    self.p.stdin.write("step\n")
    self.p.stdin.flush()
    return float(self.p.stdout.readline().split()[0])

  def close(self) -> None:
    self.p.stdin.write("quit\n")
    self.p.stdin.flush()
    self.p.wait(timeout=60)


def available_bytes() -> int:
  with open("/proc/meminfo") as f:
    info = dict(line.split(":", 1) for line in f)
  return int(info["MemAvailable"].split()[0]) * 1024
