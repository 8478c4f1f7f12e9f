"""PEFT (0.21.2) DoRA linear layer as a float64 oracle for ``kernels/dora``; runs under the Python 3.11 oracle
venv (torch CPU).

  peft_dora.py IN.npz OUT.npz   IN: per case ``CASE/x [N, d_in]``, ``CASE/w [d_in, d_out]`` (pmem's [in, out]
                                layout), ``CASE/a [d_in, r]``, ``CASE/b [r, d_out]``, ``CASE/m [d_out]``,
                                ``CASE/s`` (the LoRA scale alpha / r) and ``CASE/dout [N, d_out]``;
                                OUT: ``CASE/y`` (the layer's output), the gradients ``CASE/dx``, ``CASE/da``,
                                ``CASE/db``, ``CASE/dm`` of ``Σ y·dout`` and ``CASE/merged [d_in, d_out]`` (the
                                layer's weight after PEFT's ``merge``).

The layer is ``get_peft_model`` of a bias-free ``nn.Linear`` with ``LoraConfig(use_dora=True)``, no dropout:
``y = x Wᵀ + (g − 1)·x Wᵀ + g·s·B(A x)`` with ``g = m / ‖W + s·BA‖`` per output row of torch's
[out, in] weight, the norm detached (``DoraLinearLayer.forward``, DoRA §4.3). The given factors and
magnitude replace PEFT's initial ones (``lora_A.weight = aᵀ``, ``lora_B.weight = bᵀ``, magnitude ``m``)
and the scale is set to ``s`` exactly.
"""

import sys

import numpy as np
import torch
from peft import LoraConfig, get_peft_model


class One(torch.nn.Module):
  def __init__(self, d_in: int, d_out: int):
    super().__init__()
    self.proj = torch.nn.Linear(d_in, d_out, bias=False)

  def forward(self, x):
    return self.proj(x)


def run(c: dict) -> dict:
  (d_in, d_out), r, s = c["w"].shape, c["a"].shape[1], float(c["s"])
  base = One(d_in, d_out)
  base.proj.weight.data = c["w"].T.contiguous()
  model = get_peft_model(base, LoraConfig(r=r, lora_alpha=s * r, target_modules=["proj"], use_dora=True,
                                          lora_dropout=0.0))
  layer = model.base_model.model.proj
  layer.lora_A["default"].weight.data = c["a"].T.contiguous()
  layer.lora_B["default"].weight.data = c["b"].T.contiguous()
  layer.lora_magnitude_vector["default"].weight.data = c["m"].clone()
  layer.scaling["default"] = s
  x = c["x"].clone().requires_grad_(True)
  y = model(x)
  (y * c["dout"]).sum().backward()
  params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"].weight)
  out = {"y": y.detach(), "dx": x.grad, "da": params[0].grad.T, "db": params[1].grad.T, "dm": params[2].grad}
  layer.merge()
  out["merged"] = layer.get_base_layer().weight.data.T
  return out


def main(inp: str, out: str) -> None:
  torch.set_default_dtype(torch.float64)
  data = np.load(inp)
  cases: dict[str, dict] = {}
  for key in data.files:
    case, name = key.split("/")
    cases.setdefault(case, {})[name] = torch.from_numpy(data[key].astype(np.float64))
  res = {f"{case}/{n}": t.numpy() for case, c in cases.items() for n, t in run(c).items()}
  np.savez(out, **res)


if __name__ == "__main__":
  main(*sys.argv[1:])
