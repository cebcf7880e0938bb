"""Test helpers: compile torch modules, run plans on a backend, CKKS tolerances."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medhe.compiler import compile_ops
from medhe.compiler.trace import trace_layers
from medhe.nn.io import describe_layers
from medhe.runtime.executor import Executor

SMALL_N = 4096  # insecure-for-tests ring: fast SEAL runs, security explicitly waived


def randomize_bn(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give batch norms non-trivial statistics so folding is really exercised."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            m.weight.data.uniform_(0.5, 1.5, generator=generator)
            m.bias.data.uniform_(-0.3, 0.3, generator=generator)
    return model.eval()


def trace_torch(seq: nn.Sequential, input_shape):
    weights = {f"layers.{k}": v.detach().numpy() for k, v in seq.state_dict().items()}
    return trace_layers(describe_layers(seq), weights, tuple(input_shape))


def compile_torch(seq: nn.Sequential, input_shape, **options):
    ops = trace_torch(seq, input_shape)
    return compile_ops(ops, tuple(input_shape), class_names=[str(i) for i in range(10)],
                       preprocessing={"image_size": input_shape[-1], "mean": 0.0, "std": 1.0},
                       digest_of_model="test", **options)


def pack(plan, x: np.ndarray) -> np.ndarray:
    n = plan.params.slot_count
    vector = np.zeros(n)
    vector[plan.input_layout.replica_slots(n)] = x.reshape(-1)[None, :]
    return vector


def run_plan(plan, backend, client_backend, x: np.ndarray, trace: list | None = None) -> np.ndarray:
    """Encrypt one input (C,H,W), evaluate, decrypt the output slots."""
    out = Executor(plan, backend).run(client_backend.encrypt(pack(plan, x)), trace=trace)
    return client_backend.decrypt(out)[plan.output_layout.slots(plan.params.slot_count)]


def torch_out(seq: nn.Sequential, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return seq(torch.tensor(x[None], dtype=torch.float64)).numpy().reshape(-1)


def ckks_tolerance(plan, magnitude: float = 1.0) -> float:
    """Error budget from the CKKS scale: each level adds rounding noise of about
    sqrt(N) * 2^-scale_bits relative to the values (with a safety factor 2^10 for weight growth
    and key-switching noise), scaled by the size of the outputs."""
    p = plan.params
    return max(1, plan.multiplicative_depth) * np.sqrt(p.poly_modulus_degree) * 2.0 ** (-p.log_scale_bits + 10) * max(1.0, magnitude)


def ckks_tolerance_encrypted_model(plan, magnitude: float = 1.0) -> float:
    """ckks_tolerance plus the noise of weights that arrive encrypted: a public-key encryption
    carries noise of about sigma * N (sigma = 3.2) in the slots, i.e. about 4 * N * 2^-scale_bits
    relative to a weight encrypted at the base scale, once per multiplication."""
    p = plan.params
    encryption = max(1, plan.multiplicative_depth) * 4 * p.poly_modulus_degree * 2.0 ** (-p.log_scale_bits)
    return ckks_tolerance(plan, magnitude) + encryption * max(1.0, magnitude)
