"""Test helpers: compile torch modules, run plans on a backend, CKKS tolerances."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medhe.compiler import compile_ops
from medhe.compiler.trace import trace_layers
from medhe.nn.io import describe_layers
from medhe.nn.layers import PolyAct
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
    preprocessing = options.pop("preprocessing", {"image_size": input_shape[-1], "mean": 0.0, "std": 1.0})
    return compile_ops(ops, tuple(input_shape), class_names=[str(i) for i in range(10)],
                       preprocessing=preprocessing, digest_of_model="test", **options)


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
    """Error budget from the CKKS parameters, per multiplication: the rescale's rounding noise,
    about N * 2^-scale_bits in absolute terms (r0 + r1*s with a ternary s, at its maximum over the
    slots), plus key-switching and encoding noise of about sqrt(N) * 2^-scale_bits relative to
    the values, times 2^4 for weight growth. Tight enough that a 10x loss of precision fails the
    slow tier (its measured errors sit 5-8x below this at 128-bit parameters)."""
    p = plan.params
    n, scale = p.poly_modulus_degree, 2.0 ** p.log_scale_bits
    per_multiplication = n / scale + np.sqrt(n) * 2.0 ** 4 / scale * max(1.0, magnitude)
    return max(1, plan.multiplicative_depth) * per_multiplication


def ckks_tolerance_encrypted_model(plan, magnitude: float = 1.0) -> float:
    """ckks_tolerance plus the noise of weights that arrive encrypted under a public key: about
    3.2 * N in the slots (u*e + s*e'), 2^4 * N for its maximum over the slots and the fan-in,
    relative to a weight at the base scale, once per multiplication. (Rescaling a weight from the
    level above leaves rounding noise of about the same size, so the bound holds for both.) The
    slow tier's maximum over 100 images varies 2-5x between runs (fresh noise each time): its
    errors sit 3-15x below this bound."""
    p = plan.params
    encryption = max(1, plan.multiplicative_depth) * 2.0 ** 4 * p.poly_modulus_degree * 2.0 ** (-p.log_scale_bits)
    return ckks_tolerance(plan, magnitude) + encryption * max(1.0, magnitude)


def assert_layers_match_oracle(seq, plan, x: np.ndarray, trace: list, decrypt, tolerance=ckks_tolerance) -> None:
    """Per layer: each checkpoint's ciphertext, decrypted and read through the op's layout, equals
    the optimised IR evaluated in plaintext within `tolerance(plan, magnitude)`."""
    from medhe.compiler.ir import run_ops
    from medhe.compiler.passes import optimize
    from medhe.plan import Layout

    _, intermediates = run_ops(optimize(trace_torch(seq, x.shape)), x[None], collect=True)
    n = plan.params.slot_count
    for point in plan.report["checkpoints"]:
        expected = intermediates[point["op"]][0].reshape(-1)
        got = decrypt(trace[point["instruction"]])[Layout.from_dict(point["layout"]).slots(n)]
        np.testing.assert_allclose(got, expected, atol=tolerance(plan, np.abs(expected).max()),
                                   err_msg=f"op {point['op']}")


def two_block_model() -> nn.Sequential:
    """A 16x16 two-block network with every layer kind the default model has."""
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(4), PolyAct(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(2), nn.BatchNorm2d(4), PolyAct(),
                        nn.Flatten(), nn.Linear(4 * 16, 8), nn.BatchNorm1d(8), PolyAct(), nn.Linear(8, 2)).double()
    return randomize_bn(seq)


def reachable(root) -> list:
    """Every object reachable from `root` through attributes, dict keys and values, and
    sequences (to check what a server object holds)."""
    seen, stack, found = set(), [root], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, np.ndarray):
            stack.extend(vars(obj).values())
    return found


def small_pneumoniamnist_npz(source, path, n_train: int, n_val: int):
    """The first n_train / n_val images of a PneumoniaMNIST npz, saved in the same layout at `path`
    (for short `medhe train` runs in tests)."""
    from medhe.data.medmnist import load_medmnist_npz

    x, y = load_medmnist_npz(source, "train")
    xv, yv = load_medmnist_npz(source, "val")
    np.savez(path, train_images=x[:n_train], train_labels=y[:n_train, None], val_images=xv[:n_val],
             val_labels=yv[:n_val])
    return path


def shipped_model_logits(name: str, model_inputs: np.ndarray) -> np.ndarray:
    """The plaintext oracle: a shipped model's logits (float64) for preprocessed inputs (B, C, H, W)."""
    from medhe.nn.io import load_model
    from medhe.nn.modeldir import resolve_model_dir

    model, _ = load_model(resolve_model_dir(name))
    with torch.no_grad():
        return model.double().eval()(torch.tensor(np.asarray(model_inputs), dtype=torch.float64)).numpy()


def client_and_both_servers(plan, backend: str):
    """A client with its keys registered at two servers of `plan`: weights in clear, and weights
    encrypted by the model owner under the client's public key. (client, plain, encrypted)."""
    from medhe.protocol.client import Client
    from medhe.protocol.owner import ModelOwner
    from medhe.protocol.server import Server

    client = Client(plan.client_spec(), backend=backend)
    keys = client.evaluation_keys()
    plain = Server(plan, backend=backend)
    plain.register_keys(keys)
    encrypted = Server(plan, backend=backend, encrypted_model=True)
    encrypted.register_keys(keys)
    encrypted.register_encrypted_model(ModelOwner(backend=backend).encrypt_model(plan, client.public_key()))
    return client, plain, encrypted
