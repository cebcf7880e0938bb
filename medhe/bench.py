"""Our side of benchmarks/compare_tenseal.py: the shipped model, encrypted, on the same images."""

from __future__ import annotations

import numpy as np


def run_ours(dataset: str, eval_gray01_images: np.ndarray, eval_labels: np.ndarray, limit: int, *,
             two_processes: bool = False) -> dict:
    import torch

    from medhe.compiler import compile_model
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.protocol.local import LocalSession, summarize

    model_dir = resolve_model_dir(dataset)
    model, card = load_model(model_dir)
    inputs = card.preprocessing.apply_batch(eval_gray01_images)
    with torch.no_grad():
        reference = model(torch.tensor(inputs)).double().numpy()
    labels = np.asarray(eval_labels).reshape(-1)
    plan = compile_model(model_dir)
    session = LocalSession(plan, two_processes=two_processes)
    results = session.diagnose_many(inputs[:limit])
    summary = summarize(results, reference[:limit], labels[:limit])
    summary.update({
        "system": f"medhe ({len(card.arch.conv_channels)} conv blocks, {plan.multiplicative_depth} mult in {plan.depth} rescales"
                  + (", 2 processes)" if two_processes else ")"),
        "processes": 2 if two_processes else 1,
        "plaintext_accuracy": float((reference.argmax(1) == labels).mean()),
        "n_plaintext": int(len(labels)),
        "eval_key_bytes": session.eval_key_bytes,
        "keygen_s": session.keygen_s,
        "rotations_per_image": plan.rotation_count(),
        "parameters": {**plan.params.to_dict(), "security_bits": plan.params.security_bits},
    })
    return summary
