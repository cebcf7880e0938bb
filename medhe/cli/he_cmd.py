"""Encrypted-inference commands: compile, keygen, encrypt, evaluate-ciphertext, decrypt, diagnose.

The three roles can run in separate processes with only files between them:
  clinic:  medhe keygen --model br35h --out keys/          (secret key stays in keys/)
  server:  medhe evaluate-ciphertext --model br35h --keys keys/evaluation.keys --in x.ct --out x.result
  clinic:  medhe encrypt IMAGE --keys keys/ --out x.ct ;  medhe decrypt --keys keys/ --in x.result
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medhe.errors import ConfigError

SECRET_KEY_FILE = "secret.key"
EVAL_KEYS_FILE = "evaluation.keys"


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--plan", help="compiled plan directory (from `medhe compile`)")
    group.add_argument("--model", help="model directory or shipped model name; compiled on the fly")
    parser.add_argument("--backend", choices=("seal", "clear"), default="seal",
                        help="seal: real CKKS (default); clear: no encryption, for debugging")


def load_plan(args):
    from medhe.compiler import Plan, compile_model
    from medhe.nn.io import resolve_model_dir

    if getattr(args, "plan", None):
        return Plan.load(args.plan)
    model = getattr(args, "model", None) or "br35h"
    return compile_model(resolve_model_dir(model))


def _client(args, plan):
    from medhe.protocol.client import Client

    keys = Path(args.keys)
    path = keys / SECRET_KEY_FILE if keys.is_dir() else keys
    if not path.is_file():
        raise ConfigError(f"no secret key at {path}; run `medhe keygen --out {keys}` first")
    return Client.load(plan, path)


def cmd_compile(args) -> int:
    from medhe.compiler import compile_model, format_report
    from medhe.nn.io import resolve_model_dir

    plan = compile_model(resolve_model_dir(args.model), poly_modulus_degree=args.poly_modulus_degree,
                         log_scale_bits=args.log_scale_bits)
    out = plan.save(args.out)
    print(format_report(plan.report))
    print(f"plan {plan.digest()[:16]} written to {out}")
    return 0


def cmd_keygen(args) -> int:
    from medhe.protocol.client import Client

    plan = load_plan(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    client = Client(plan, backend=args.backend)
    eval_keys = client.evaluation_keys()
    (out / EVAL_KEYS_FILE).write_bytes(eval_keys)
    client.save_secret_key(out / SECRET_KEY_FILE)
    print(f"key id {client.key_id}: secret key -> {out / SECRET_KEY_FILE} (keep it on this machine), "
          f"evaluation keys -> {out / EVAL_KEYS_FILE} ({len(eval_keys) / 2**20:.1f} MiB, for the server) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_encrypt(args) -> int:
    plan = load_plan(args)
    client = _client(args, plan)
    start = time.perf_counter()
    data = client.encrypt_image(args.image)
    Path(args.out).write_bytes(data)
    print(f"{args.image} -> {args.out} ({len(data) / 2**20:.2f} MiB) in {time.perf_counter() - start:.3f} s")
    return 0


def cmd_evaluate_ciphertext(args) -> int:
    from medhe.protocol.server import Server

    plan = load_plan(args)
    server = Server(plan, backend=args.backend, key_dir=args.key_store)
    key_id = server.register_keys(Path(args.keys).read_bytes())
    start = time.perf_counter()
    result = server.evaluate(Path(args.input).read_bytes())
    Path(args.out).write_bytes(result)
    print(f"key id {key_id}: evaluated {args.input} -> {args.out} in {time.perf_counter() - start:.3f} s")
    return 0


def cmd_decrypt(args) -> int:
    plan = load_plan(args)
    client = _client(args, plan)
    logits = client.decrypt_logits(Path(args.input).read_bytes())
    label, probs = client.diagnosis(logits)
    print(json.dumps({"label": label, "probabilities": dict(zip(plan.class_names, probs.round(6).tolist())),
                      "logits": logits.round(6).tolist()}))
    return 0


def cmd_diagnose(args) -> int:
    from medhe.protocol.client import Client
    from medhe.protocol.server import Server

    plan = load_plan(args)
    start = time.perf_counter()
    client = Client(plan, backend=args.backend)
    server = Server(plan, backend=args.backend)
    server.register_keys(client.evaluation_keys())
    print(f"keys generated and registered in {time.perf_counter() - start:.1f} s "
          f"({len(plan.rotation_steps())} rotation keys)")
    print(f"{'image':<40}{'label':<12}{'prob':>7}{'encrypt s':>11}{'server s':>10}{'decrypt s':>11}")
    for image in args.images:
        t0 = time.perf_counter()
        message = client.encrypt_image(image)
        t1 = time.perf_counter()
        result = server.evaluate(message)
        t2 = time.perf_counter()
        label, probs = client.diagnosis(client.decrypt_logits(result))
        t3 = time.perf_counter()
        print(f"{str(image)[-39:]:<40}{label:<12}{probs.max():>7.3f}{t1 - t0:>11.3f}{t2 - t1:>10.3f}{t3 - t2:>11.3f}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("compile", help="compile a trained model for encrypted inference")
    p.add_argument("--model", required=True, help="model directory or shipped model name")
    p.add_argument("--out", required=True, help="plan directory to write")
    p.add_argument("--poly-modulus-degree", type=int, default=None, help="force N (default: smallest that fits)")
    p.add_argument("--log-scale-bits", type=int, default=None, help="force the CKKS scale (default: largest that fits)")
    p.set_defaults(func=cmd_compile)

    p = subparsers.add_parser("keygen", help="clinic: make a secret key and the server's evaluation keys")
    add_plan_arguments(p)
    p.add_argument("--out", required=True, help="directory for secret.key and evaluation.keys")
    p.set_defaults(func=cmd_keygen)

    p = subparsers.add_parser("encrypt", help="clinic: preprocess and encrypt one image")
    p.add_argument("image", help="PNG/JPEG/DICOM file")
    add_plan_arguments(p)
    p.add_argument("--keys", required=True, help="key directory from `medhe keygen` (or its secret.key)")
    p.add_argument("--out", required=True, help="ciphertext message file to write")
    p.set_defaults(func=cmd_encrypt)

    p = subparsers.add_parser("evaluate-ciphertext", help="server: evaluate an encrypted image")
    add_plan_arguments(p)
    p.add_argument("--keys", required=True, help="the client's evaluation.keys file (public material)")
    p.add_argument("--in", dest="input", required=True, help="ciphertext message file")
    p.add_argument("--out", required=True, help="result message file to write")
    p.add_argument("--key-store", default=None, help="directory where the server keeps registered keys")
    p.set_defaults(func=cmd_evaluate_ciphertext)

    p = subparsers.add_parser("decrypt", help="clinic: decrypt a result and print the diagnosis")
    add_plan_arguments(p)
    p.add_argument("--keys", required=True, help="key directory from `medhe keygen` (or its secret.key)")
    p.add_argument("--in", dest="input", required=True, help="result message file")
    p.set_defaults(func=cmd_decrypt)

    p = subparsers.add_parser("diagnose", help="encrypt -> evaluate -> decrypt locally, with timings")
    p.add_argument("images", nargs="+", help="PNG/JPEG/DICOM files")
    add_plan_arguments(p)
    p.set_defaults(func=cmd_diagnose)
