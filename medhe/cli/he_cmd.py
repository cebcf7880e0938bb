"""Encrypted-inference commands for the three roles.

  model owner: medhe compile --model br35h --out plan/           (plan/ + plan/client_spec.json)
               (--throughput: a batch plan for `medhe batch` and `medhe serve --batch-model`)
               medhe encrypt-model --plan plan/ --public-key keys/public.key --out enc/
  clinic:      medhe keygen --spec plan/client_spec.json --out keys/   (secret key stays in keys/)
               medhe encrypt IMAGE --spec ... --keys keys/ --out x.ct
               medhe decrypt --spec ... --keys keys/ --in x.result
  server:      medhe evaluate-ciphertext --plan plan/ --keys keys/evaluation.keys --in x.ct --out x.result
               (encrypted-model mode: --encrypted-model enc/ instead of --plan)

Clinic commands load the public client spec only, never the weights; `--model NAME` compiles a
shipped model and keeps only its spec (the shipped models are public anyway; a private model
directory is refused there). Server commands given --plan or --encrypted-model do not import the
compiler.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from medhe.errors import ConfigError, MissingKeyError

from medhe.protocol.keydir import EVAL_KEYS_FILE, PUBLIC_KEY_FILE, SECRET_KEY_FILE


# --- what each role loads -------------------------------------------------------------------------
def add_plan_arguments(parser: argparse.ArgumentParser, *, encrypted_model: bool = False) -> None:
    """Server side: the server plan (weights in clear) or, with --encrypted-model, an encrypted model
    directory (the plan without weights plus the weights as ciphertexts)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--plan", help="compiled plan directory (from `medhe compile`)")
    group.add_argument("--model", help="model directory or shipped model name; compiled on the fly")
    if encrypted_model:
        group.add_argument("--encrypted-model", metavar="ENC_MODEL_DIR",
                           help="encrypted-model mode: a directory from `medhe encrypt-model`; the server "
                                "never sees the weights")
    add_backend_argument(parser)


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """Clinic side: the public client spec only."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--spec", help="client spec file, or a directory holding client_spec.json "
                                      "(written by `medhe compile` and `medhe encrypt-model`)")
    group.add_argument("--model", help="shipped model name (br35h, pneumoniamnist, br35h-64, ...); compiled here, only its "
                                       "public client spec is kept")
    add_backend_argument(parser)


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("seal", "clear"), default="seal",
                        help="seal: real CKKS (default); clear: no encryption, for debugging")


def add_ca_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca-file", metavar="CERT.pem",
                        help="certificate (or CA bundle) to trust for an https server with its own (self-signed) "
                             "certificate (default: the system's CAs)")


def load_plan(args):
    from medhe.plan import Plan

    if getattr(args, "plan", None):
        return Plan.load(_existing(args.plan, "plan directory"))
    from medhe.compiler import compile_model
    from medhe.nn.modeldir import resolve_model_dir

    model = getattr(args, "model", None) or "br35h"
    return compile_model(resolve_model_dir(model))


def load_server_plan(args):
    """(plan, encrypted model message or None) for a server command."""
    if getattr(args, "encrypted_model", None):
        from medhe.protocol.owner import load_encrypted_model

        return load_encrypted_model(args.encrypted_model)
    return load_plan(args), None


def load_spec(args):
    from medhe.nn.modeldir import SHIPPED_MODELS
    from medhe.plan import ClientSpec

    if getattr(args, "spec", None):
        return ClientSpec.load(_existing(args.spec, "client spec"))
    model = getattr(args, "model", None) or "br35h"
    if model not in SHIPPED_MODELS:
        what = "not a model directory" if Path(model).is_dir() else f"and {model!r} is not a shipped model"
        raise ConfigError(f"a clinic loads a model's public client spec (--spec client_spec.json), {what}; --model "
                          f"takes a shipped model name ({', '.join(SHIPPED_MODELS)})")
    return load_plan(args).client_spec()


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no {what} at {path}")
    return path


def _existing_file(path: str | Path, what: str, default_name: str | None = None) -> Path:
    """A file to read; a directory is accepted when it holds `default_name`."""
    path = _existing(path, what)
    if path.is_dir() and default_name:
        path = path / default_name
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; {what} expected"
                          + (" (diagnose --batch --server takes folders)" if what == "image file" else ""))
    if not path.is_file():
        raise ConfigError(f"no {what} at {path} (expected a file)")
    return path


def _output_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file name to write")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: the directory {path.parent} does not exist")
    return path


def _client(args, spec):
    from medhe.protocol.keydir import load_key_directory

    return load_key_directory(spec, args.keys)


# --- model owner ---------------------------------------------------------------------------------
def cmd_compile(args) -> int:
    from medhe.compiler import compile_ensemble, compile_model, format_report
    from medhe.nn.modeldir import resolve_model_dir

    if args.throughput:
        return _compile_throughput(args)
    budget = {} if args.max_key_mb is None else {"max_key_mb": None if args.max_key_mb == "none" else args.max_key_mb}
    options = dict(poly_modulus_degree=args.poly_modulus_degree, log_scale_bits=args.log_scale_bits,
                   max_galois_keys=args.max_galois_keys, **budget)
    model_dirs = [resolve_model_dir(model) for model in args.model]
    plan = compile_model(model_dirs[0], **options) if len(model_dirs) == 1 else compile_ensemble(model_dirs, **options)
    out = plan.save(args.out)
    spec_path = plan.client_spec().save(out)
    print(format_report(plan.report))
    print(f"server plan {plan.digest()[:16]} written to {out} (weights: keep it on the server or encrypt it)")
    print(f"client spec {plan.client_spec().digest()[:16]} written to {spec_path} (public: give it to clinics)")
    if args.architecture:
        architecture = plan.without_weights().save(args.architecture)
        plan.client_spec().save(architecture)
        print(f"architecture (the plan without weights) written to {architecture} (for an encrypted-model server)")
    return 0


def _compile_throughput(args) -> int:
    from medhe.compiler.batch import compile_batch
    from medhe.nn.modeldir import resolve_model_dir

    if args.architecture or args.max_galois_keys is not None or args.max_key_mb is not None:
        raise ConfigError("--throughput plans have no rotation keys and no encrypted-model form: drop "
                          "--architecture, --max-galois-keys and --max-key-mb")
    if len(args.model) > 1:
        raise ConfigError("--throughput compiles one model (ensembles are latency-mode plans); give one --model")
    plan = compile_batch(resolve_model_dir(args.model[0]), poly_modulus_degree=args.poly_modulus_degree)
    out = plan.save(args.out)
    spec_path = plan.client_spec().save(out)
    r, p = plan.report, plan.params
    print(f"throughput mode: {r['batch_size']} images per batch (slots across images), "
          f"{r['multiplications']} ciphertext-plaintext products and {r['squares']} squares per batch, "
          f"{r['rescales']} rescales, no rotation keys; CKKS N={p.poly_modulus_degree}, primes "
          f"{list(p.coeff_modulus_bits)}, {'128-bit security' if p.security_bits >= 128 else 'INSECURE'}")
    print(f"batch plan {plan.digest()[:16]} written to {out} (weights: keep it on the server)")
    print(f"client spec {plan.client_spec().digest()[:16]} written to {spec_path} (public: give it to clinics)")
    return 0


def cmd_encrypt_model(args) -> int:
    from medhe.plan import Plan
    from medhe.protocol.owner import ModelOwner, save_encrypted_model

    plan = Plan.load(_existing(args.plan, "plan directory"))
    public_key = _existing_file(args.public_key, "public key", PUBLIC_KEY_FILE).read_bytes()
    owner = ModelOwner(backend=args.backend, progress=sys.stderr.isatty())  # no bar lines in a log file
    message = owner.encrypt_model(plan, public_key)
    out = save_encrypted_model(args.out, plan, message)
    report = owner.last_report
    print(f"{report.operands} weight operands encrypted in {report.encrypt_s:.1f} s: "
          f"{report.size_bytes / 2**20:.1f} MiB -> {out} (for the server; it cannot read them)")
    if args.server:
        import os

        from medhe.protocol.owner import ENCRYPTED_MODEL_FILE
        from medhe.protocol.remote import RemoteClient

        remote = RemoteClient(args.server, token=args.token or os.environ.get("MEDHE_TOKEN"), verify=args.ca_file or True)
        try:
            key_id = remote.register_encrypted_model(Path(out) / ENCRYPTED_MODEL_FILE)
        finally:
            remote.close()
        print(f"uploaded to {args.server} for key id {key_id}")
    return 0


# --- clinic ---------------------------------------------------------------------------------------
def cmd_keygen(args) -> int:
    from medhe.protocol.keydir import make_key_directory

    spec = load_spec(args)
    out = Path(args.out)
    start = time.perf_counter()
    client = make_key_directory(spec, out, backend=args.backend, force=args.force)
    size_mib = (out / EVAL_KEYS_FILE).stat().st_size / 2**20
    print(f"key id {client.key_id}: secret key -> {out / SECRET_KEY_FILE} (keep it on this machine), "
          f"evaluation keys -> {out / EVAL_KEYS_FILE} ({size_mib:.1f} MiB, for the server), "
          f"public key -> {out / PUBLIC_KEY_FILE} (for a model owner) in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_encrypt(args) -> int:
    spec = load_spec(args)
    client = _client(args, spec)
    out = _output_file(args.out)
    start = time.perf_counter()
    model_input = client.preprocess(args.image)
    _warn_if_atypical(str(args.image), client.check_input(model_input))
    data = client.encrypt_input(model_input)
    out.write_bytes(data)
    print(f"{args.image} -> {out} ({len(data) / 2**20:.2f} MiB) in {time.perf_counter() - start:.3f} s")
    return 0


def cmd_decrypt(args) -> int:
    spec = load_spec(args)
    client = _client(args, spec)
    logits = client.decrypt_logits(_existing_file(args.input, "result file").read_bytes())
    label, probs = client.diagnosis(logits)
    print(json.dumps({"label": label, "probabilities": dict(zip(spec.class_names, probs.round(6).tolist())),
                      "logits": logits.round(6).tolist()}))
    return 0


# --- server ---------------------------------------------------------------------------------------
def cmd_evaluate_ciphertext(args) -> int:
    from medhe.protocol.server import Server

    plan, encrypted = load_server_plan(args)
    server = Server(plan, backend=args.backend, key_dir=args.key_store, encrypted_model=encrypted is not None)
    key_id = server.register_keys(_existing_file(args.keys, "evaluation keys file", EVAL_KEYS_FILE).read_bytes())
    if encrypted is not None:
        server.register_encrypted_model(encrypted)
    out = _output_file(args.out)
    start = time.perf_counter()
    result = server.evaluate(_existing_file(args.input, "ciphertext file").read_bytes())
    out.write_bytes(result)
    mode = "encrypted model" if encrypted is not None else "plain weights"
    print(f"key id {key_id} ({mode}): evaluated {args.input} -> {out} in {time.perf_counter() - start:.3f} s")
    return 0


# --- all roles in one process ---------------------------------------------------------------------
def cmd_diagnose(args) -> int:
    if args.server:
        return _diagnose_remote(args)
    from medhe.protocol.local import LocalSession

    for image in args.images:  # a mistyped path is refused before keys are made; a corrupt file is skipped
        _existing_file(image, "image file")
    plan = load_plan(args)
    start = time.perf_counter()
    session = LocalSession(plan, backend=args.backend, encrypted_model=args.encrypted_model)
    print(f"keys generated and registered in {time.perf_counter() - start:.1f} s "
          f"({len(plan.galois_steps())} rotation keys)")
    if args.encrypted_model:
        print(f"model encrypted under the client's public key in {session.model_encrypt_s:.1f} s "
              f"({session.encrypted_model_bytes / 2**20:.0f} MiB); the server holds no weight in clear")
    print(f"{'image':<40}{'label':<12}{'P(label)':>9}{'encrypt s':>11}{'server s':>10}{'decrypt s':>11}")
    unreadable: list[str] = []
    for image, r in _each_readable(args.images, session.diagnose_image, unreadable):
        print(f"{str(image)[-39:]:<40}{r.label:<12}{r.probabilities.max():>9.3f}{r.encrypt_s:>11.3f}"
              f"{r.server_s:>10.3f}{r.decrypt_s:>11.3f}")
        _warn_if_atypical(str(image), r.input_check)
    return _report_unreadable(unreadable, len(args.images))


def _each_readable(images, diagnose_one, unreadable: list[str]):
    """(image, diagnose_one(image)) for each image; one that cannot be read (ImageLoadError) is listed
    in `unreadable` and on stderr, and the others are still diagnosed."""
    from medhe.errors import ImageLoadError

    for image in images:
        try:
            result = diagnose_one(image)
        except ImageLoadError as exc:
            _note_unreadable(image, exc, unreadable)
        else:
            yield image, result


def _note_unreadable(image, error: Exception, unreadable: list[str]) -> None:
    from tqdm import tqdm

    unreadable.append(str(image))
    tqdm.write(f"{str(image)[-39:]:<40}not diagnosed: {error}", file=sys.stderr)


def _report_unreadable(unreadable: list[str], total: int) -> int:
    """0 if every image was diagnosed; EXIT_SOME_SKIPPED (3) and a summary on stderr if some could
    not be read; an error (exit 2) if none could."""
    from medhe.cli.main import EXIT_SOME_SKIPPED
    from medhe.errors import ImageLoadError

    if not unreadable:
        return 0
    if len(unreadable) == total:
        raise ImageLoadError(f"none of the {total} images could be read: {', '.join(unreadable)}")
    print(f"medhe diagnose: {len(unreadable)} of {total} images could not be read and were not diagnosed: "
          f"{', '.join(unreadable)}", file=sys.stderr)
    return EXIT_SOME_SKIPPED


def _warn_if_atypical(image: str, check: dict | None) -> None:
    """A warning on stderr (the table on stdout stays one line per image) for an image the client's
    input check found unlike the model's training images."""
    from tqdm import tqdm

    if check is not None and check.get("uniform"):
        tqdm.write(f"warning: {image} is blank (every pixel the same value): there is nothing to diagnose; "
                   "check the export", file=sys.stderr)
    elif check is not None and not check["typical"]:
        tqdm.write(f"warning: {image} is unlike the model's training images (input distance "
                   f"{check['distance']:.0f} > {check['threshold']:.0f}); check modality, orientation and "
                   f"inversion: the diagnosis may not hold", file=sys.stderr)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")


def _image_files(paths: list[str]) -> list[str]:
    """Files as given; folders expanded to the image files in them (sorted, recursively)."""
    from medhe.data.images import looks_like_dicom

    files = []
    for path in map(Path, paths):
        if path.is_dir():
            # DICOM is told by its magic bytes whatever the name (IM0001, 1.2.840.113619.2.55.3.6);
            # hidden files and folders (._scan.png, .thumbs/) are skipped.
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts)
                           and (p.suffix.lower() in IMAGE_SUFFIXES or looks_like_dicom(p)))
            if not found:
                raise ConfigError(f"no image files ({', '.join(IMAGE_SUFFIXES)}, or DICOM without a suffix) in the "
                                  f"folder {path}")
            files.extend(map(str, found))
        else:
            files.append(str(path))
    return files


def _diagnose_remote(args) -> int:
    """The clinic against a diagnosis server: keys made or reused locally, ciphertexts only sent."""
    import os

    from tqdm import tqdm

    from medhe.protocol.remote import RemoteClient

    if args.plan or args.encrypted_model:
        raise ConfigError("with --server the server holds the model: name it with --model (see the server's "
                          "GET /v1/models), not --plan or --encrypted-model")
    images = _image_files(args.images) if args.batch else args.images
    unreadable: list[str] = []
    for image in images:
        _existing_file(image, "image file")
    remote = RemoteClient(args.server, token=args.token or os.environ.get("MEDHE_TOKEN"), key_home=args.keys,
                          backend=args.backend, verify=args.ca_file or True)
    try:
        model = args.model
        if model is None:
            names = [m["name"] for m in remote.models()]
            if len(names) != 1:
                raise ConfigError(f"the server hosts {', '.join(names)}: choose one with --model")
            model = names[0]
        start = time.perf_counter()
        client = remote.client(model, accept_new=args.accept_new_model, progress=lambda text: print(text, flush=True))
        card = remote.model_card(model)
        print(f"model {model} (spec {client.spec.digest()[:16]}, weights {card.get('weights')} on the server), "
              f"key id {client.key_id}, ready in {time.perf_counter() - start:.1f} s; keys in {remote.key_home}")
        # server s: the whole request (upload, queue, evaluation, download); eval s: the evaluation alone.
        print(f"{'image':<40}{'label':<12}{'P(label)':>9}{'prep s':>8}{'encrypt s':>11}{'server s':>10}{'eval s':>9}"
              f"{'decrypt s':>11}{'  (per image, amortized over the batch)' if args.batch else ''}")
        if args.batch:
            batches = (len(images) + client.spec.slot_count - 1) // client.spec.slot_count
            with tqdm(total=batches, desc="batches", unit="batch", disable=True if batches < 2 else None,
                      leave=False) as bar:
                skipped: list = []
                results = remote.diagnose_batch(images, model, accept_new=args.accept_new_model,
                                                on_batch=lambda done, total: bar.update(1), unreadable=skipped)
            for image, error in skipped:
                _note_unreadable(image, error, unreadable)
        else:
            shown = tqdm(images, desc="diagnosing", disable=True if len(images) < 2 else None, leave=False)
            results = (r for _, r in _each_readable(
                shown, lambda image: remote.diagnose(image, model, accept_new=args.accept_new_model), unreadable))
        try:
            for r in results:
                tqdm.write(f"{r.image[-39:]:<40}{r.label:<12}{r.probabilities.max():>9.3f}{r.preprocess_s:>8.3f}"
                           f"{r.encrypt_s:>11.3f}{r.server_s:>10.3f}{r.evaluate_s:>9.3f}{r.decrypt_s:>11.3f}")
                _warn_if_atypical(r.image, r.input_check)
        except MissingKeyError as exc:
            if card.get("weights") != "encrypted":
                raise
            public_key = remote.key_dir(model, client.spec) / PUBLIC_KEY_FILE
            raise MissingKeyError(f"{exc}. This model's weights are encrypted per clinic: send the model owner this "
                                  f"clinic's public key ({public_key}); it holds no secret") from None
    finally:
        remote.close()
    return _report_unreadable(unreadable, len(images))


def _key_budget(text: str) -> float | str:
    if text.lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in MB or 'none', got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"a key budget must be a positive size in MB, got {text!r}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("compile", help="model owner: compile a trained model for encrypted inference")
    p.add_argument("--model", required=True, nargs="+", action="extend", metavar="MODEL",
                   help="model directory or shipped model name; several: one ensemble plan that averages "
                        "their logits (same input, classes, levels and output slots; see README 'Ensembles')")
    p.add_argument("--out", required=True, help="plan directory to write (server plan + public client_spec.json)")
    p.add_argument("--poly-modulus-degree", type=int, default=None, help="force N (default: smallest that fits)")
    p.add_argument("--log-scale-bits", type=int, default=None, help="force the CKKS scale (default: largest that fits)")
    p.add_argument("--max-galois-keys", type=int, default=None, metavar="N",
                   help="at most N rotation keys (about 5 MB each at N=16384): smaller keys for the clinic to "
                        "upload and the server to keep, at the cost of extra rotations (default: one per step)")
    p.add_argument("--max-key-mb", type=_key_budget, default=None, metavar="MB",
                   help="as many rotation keys as fit this size of evaluation keys, relinearization key "
                        "included (MB = 2**20 bytes); 'none': one key per rotation step. Default: 150 where "
                        "that costs at most 25%% more key switching per image, else one key per step")
    p.add_argument("--architecture", metavar="DIR", help="also write the plan without its weights here (what "
                                                         "`medhe serve --encrypted-model` hosts)")
    p.add_argument("--throughput", action="store_true",
                   help="compile for throughput mode instead (slots across images, N/2 images a batch, no "
                        "rotations): what `medhe batch` and `medhe serve --batch-model` run")
    p.set_defaults(func=cmd_compile)

    p = subparsers.add_parser("encrypt-model", help="model owner: encrypt a plan's weights under a public key")
    p.add_argument("--plan", required=True, help="compiled plan directory (from `medhe compile`)")
    p.add_argument("--public-key", required=True, help="public.key from the clinic's `medhe keygen` (or your own)")
    p.add_argument("--out", required=True, help="encrypted model directory to write (for the server)")
    p.add_argument("--server", metavar="URL", help="also upload it to this diagnosis server (`medhe serve`, "
                                                   "the model hosted in encrypted-model mode)")
    p.add_argument("--token", help="the model owner's token for --server (default: $MEDHE_TOKEN)")
    add_ca_file_argument(p)
    add_backend_argument(p)
    p.set_defaults(func=cmd_encrypt_model)

    p = subparsers.add_parser("keygen", help="clinic: make a secret key, the server's evaluation keys and a public key")
    add_spec_arguments(p)
    p.add_argument("--out", required=True, help="directory for secret.key, evaluation.keys and public.key "
                                                 "(made mode 0700)")
    p.add_argument("--force", action="store_true", help="replace an existing secret key (the old one is lost)")
    p.set_defaults(func=cmd_keygen)

    p = subparsers.add_parser("encrypt", help="clinic: preprocess and encrypt one image")
    p.add_argument("image", help="PNG/JPEG/DICOM file")
    add_spec_arguments(p)
    p.add_argument("--keys", required=True, help="key directory from `medhe keygen` (or its secret.key)")
    p.add_argument("--out", required=True, help="ciphertext message file to write")
    p.set_defaults(func=cmd_encrypt)

    p = subparsers.add_parser("evaluate-ciphertext", help="server: evaluate an encrypted image")
    add_plan_arguments(p, encrypted_model=True)
    p.add_argument("--keys", required=True, help="the client's evaluation.keys file (public material)")
    p.add_argument("--in", dest="input", required=True, help="ciphertext message file")
    p.add_argument("--out", required=True, help="result message file to write")
    p.add_argument("--key-store", default=None, help="directory where the server keeps registered keys")
    p.set_defaults(func=cmd_evaluate_ciphertext)

    p = subparsers.add_parser("decrypt", help="clinic: decrypt a result and print the diagnosis")
    add_spec_arguments(p)
    p.add_argument("--keys", required=True, help="key directory from `medhe keygen` (or its secret.key)")
    p.add_argument("--in", dest="input", required=True, help="result message file")
    p.set_defaults(func=cmd_decrypt)

    p = subparsers.add_parser(
        "diagnose", help="all roles in one process: encrypt -> evaluate -> decrypt, with timings",
        description="Encrypt, evaluate and decrypt each image, with timings (--server: against a diagnosis "
                    "server). An image that cannot be read is listed on stderr and skipped. Exit code 0: all "
                    "diagnosed; 3: some images could not be read, the others were diagnosed; 2: an error (a "
                    "missing file, or a folder given as an image, is refused before keys are made; folders are "
                    "expanded only with --server --batch).")
    p.add_argument("images", nargs="+", help="PNG/JPEG/DICOM files")
    add_plan_arguments(p)
    p.add_argument("--encrypted-model", action="store_true",
                   help="the model owner encrypts the weights under the client's public key first")
    p.add_argument("--server", metavar="URL", help="diagnose with a remote diagnosis server (`medhe serve`): "
                                                   "only ciphertexts leave this machine; --model names its model")
    p.add_argument("--token", help="the clinic's access token for --server (default: $MEDHE_TOKEN)")
    add_ca_file_argument(p)
    p.add_argument("--keys", metavar="DIR", help="with --server: where this clinic's keys and model pins are kept "
                                                 "(default: ~/.medhe/servers/HOST_PORT)")
    p.add_argument("--batch", action="store_true",
                   help="with --server: throughput mode, all images (folders are expanded) in as few messages as "
                        "possible; --model names a model the server hosts in throughput mode (NAME-batch)")
    p.add_argument("--accept-new-model", action="store_true",
                   help="with --server: accept a model that changed since first use (new keys are made)")
    p.set_defaults(func=cmd_diagnose)
