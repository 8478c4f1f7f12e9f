"""Mesh construction (axes data, fsdp, tensor) and JAX's multi-process runtime."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from pmem.core import rules

log = logging.getLogger("pmem")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  """A mesh over the first prod(shape) devices (all processes' devices in a multi-host run); a
  warning when that leaves devices idle.

  Axes are Auto: the compiler propagates shardings from the annotated params and constraints."""
  devices = jax.devices() if devices is None else list(devices)
  n = int(np.prod(cfg.shape))
  if any(s < 1 for s in cfg.shape):
    raise ValueError(f"mesh sizes must be >= 1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
  if n > len(devices):
    raise ValueError(f"mesh data={cfg.data} x fsdp={cfg.fsdp} x tensor={cfg.tensor} needs {n} devices; "
                     f"{len(devices)} available (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n})")
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError(f"a multi-process mesh must use all {len(devices)} devices, got {n}")
  if n < len(devices):
    log.warning("mesh data=%d x fsdp=%d x tensor=%d uses %d of the %d devices; the other %d stay idle "
                "(set mesh.* to use them)", *cfg.shape, n, len(devices), len(devices) - n)
  return jax.make_mesh(cfg.shape, rules.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices[:n])


def sharding(mesh: Mesh, axes, ndim: int | None = None) -> NamedSharding:
  return NamedSharding(mesh, rules.logical_to_spec(axes, ndim))


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, auto: bool = False) -> None:
  """Joins JAX's distributed runtime.

  With an explicit coordinator, uses the given process count and id; with ``auto`` lets JAX
  detect the cluster (TPU pods, SLURM, ...). CPU processes talk through gloo collectives."""
  if coordinator_address is None and not auto:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is None:
    jax.distributed.initialize()
  else:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
