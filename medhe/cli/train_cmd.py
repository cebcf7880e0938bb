"""`medhe train`, `medhe evaluate` and `medhe demo`: thin wrappers over medhe.train."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medhe.data.preprocess import CROP_RULES, NORMALIZATIONS, RESIZE_FILTERS
from medhe.errors import ConfigError
from medhe.train.thresholds import THRESHOLD_RULES

DATASETS = ("br35h", "pneumoniamnist")
DEMO_MODEL = "br35h"
DEMO_PER_CLASS = 3


# ---------------------------------------------------------------------------- train


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from medhe.train.datasets import DEFAULT_NORMALIZATION
    from medhe.train.run import DATASET_DEFAULTS

    def default(key: str) -> str:
        return ", ".join(f"{name} {DATASET_DEFAULTS[name][key]}" for name in DATASETS)

    p = subparsers.add_parser(
        "train", help="train a model and write a model directory with metrics and plots",
        description="Train the HE-friendly CNN. Early stopping uses a split that is never reported; "
                    "every number written is measured on held-out data (Br35H: grouped test split; "
                    "PneumoniaMNIST: val, with a 10% holdout of train for early stopping).",
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data-file", type=Path, default=None, metavar="PATH.npz",
                   help="MedMNIST npz (pneumoniamnist)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="model directory to write")
    p.add_argument("--epochs", type=int, default=None, help=f"maximum epochs (default: {default('epochs')})")
    p.add_argument("--batch-size", type=int, default=None, help=f"default: {default('batch_size')}")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default: {default('lr')})")
    p.add_argument("--patience", type=int, default=None,
                   help=f"early-stopping patience in epochs, 0 = off (default: {default('patience')})")
    p.add_argument("--no-augment", dest="augment", action="store_const", const=False, default=None,
                   help="disable flips/shifts (on by default for br35h only)")
    shift = p.add_mutually_exclusive_group()
    shift.add_argument("--shift-augment", dest="shift_augment", action="store_const", const=True, default=None,
                       help="acquisition-shift augmentations: brightness, contrast, gamma, noise, blur "
                            f"(default: {default('shift_augment')})")
    shift.add_argument("--no-shift-augment", dest="shift_augment", action="store_const", const=False,
                       help="no acquisition-shift augmentations")
    geometry = p.add_mutually_exclusive_group()
    geometry.add_argument("--geometric-augment", dest="geometric_augment", action="store_const", const=True,
                          default=None, help="random resized crops (80-100%% of the area) and rotations of up to "
                                             f"10 degrees (default: {default('geometric_augment')})")
    geometry.add_argument("--no-geometric-augment", dest="geometric_augment", action="store_const", const=False)
    balance = p.add_mutually_exclusive_group()
    balance.add_argument("--class-balanced", dest="class_balanced", action="store_const", const=True, default=None,
                         help="weight the loss so each class counts equally "
                              f"(default: {default('class_balanced')})")
    balance.add_argument("--no-class-balanced", dest="class_balanced", action="store_const", const=False)
    p.add_argument("--ema-decay", type=float, default=None, metavar="D",
                   help="keep (and early-stop on) an exponential moving average of the weights, updated "
                        f"every step with decay D in [0, 1); 0 = off (default: {default('ema_decay')})")
    p.add_argument("--mixup", dest="mixup_alpha", type=float, default=None, metavar="ALPHA",
                   help="train on mixtures of image pairs, weight ~ Beta(ALPHA, ALPHA) per batch, with the "
                        f"labels' losses mixed alike; 0 = off (default: {default('mixup_alpha')})")
    p.add_argument("--label-smoothing", type=float, default=None, metavar="EPS",
                   help="smoothed training targets (torch's label_smoothing: EPS spread over both classes, so 0.1 gives "
                        "targets 0.95 / 0.05); 0 = off "
                        f"(default: {default('label_smoothing')})")
    p.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default=None,
                   help="youden: the decision threshold maximising sensitivity + specificity on the "
                        "early-stopping split, folded into the output layer's bias so every decision "
                        "(plaintext, encrypted, clinic) uses it; argmax: 0.5 "
                        f"(default: {default('threshold_rule')})")
    p.add_argument("--conv-channels", type=_positive_ints, default=None, metavar="C1,C2,...",
                   help="channels of each conv block, one number per block (default 8,8)")
    p.add_argument("--pool-sizes", type=_positive_ints, default=None, metavar="P1,P2,...",
                   help="average-pool side of each conv block, one number per block (default 2 each)")
    p.add_argument("--hidden-units", type=int, default=None,
                   help="hidden dense units (default 16; 0: the conv features go straight to the logits)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling and augmentation (default 0)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image side in pixels, <= 64; from 46 on at most 4 channels per conv block, which one "
                        "ciphertext holds (default: br35h 32, pneumoniamnist 28)")
    p.add_argument("--crop", choices=CROP_RULES, default=None,
                   help="how a full-size image is cropped before resizing; stored with the model and applied "
                        "to every input (default: br35h foreground_square, pneumoniamnist center_square)")
    p.add_argument("--resize-filter", choices=tuple(RESIZE_FILTERS), default=None,
                   help="Pillow resize filter, stored with the model (default: bicubic)")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default=None,
                   help="dataset: (pixel - training mean) / training std; per_image: each image by its own mean "
                        "and std (undoes a linear intensity scale). Stored with the model and applied by the "
                        "client (default: "
                        + ", ".join(f"{name} {rule}" for name, rule in DEFAULT_NORMALIZATION.items()) + ")")
    p.add_argument("--activation", choices=("poly", "relu"), default="poly")
    p.add_argument("--relu-twin", action="store_true",
                   help="also train the ReLU twin and record its metrics and the accuracy gap")
    p.add_argument("--leakage-demo", action="store_true",
                   help="br35h: also train on a random (non-grouped) split to show leakage (2nd run)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return p


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 8,8,8, got {text!r}") from None
    if not channels or min(channels) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return channels


def cmd_train(args) -> int:
    from medhe.train.run import TrainOptions, run_training

    if args.dataset == "pneumoniamnist" and args.data_file is None:
        from medhe.data.medmnist import default_pneumoniamnist_path

        args.data_file = default_pneumoniamnist_path()
        if args.data_file is None:
            raise ConfigError("--dataset pneumoniamnist needs --data-file PATH.npz (MedMNIST layout)")
    options = TrainOptions(
        dataset=args.dataset, out=args.out, data_file=args.data_file, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, patience=args.patience, augment=args.augment,
        shift_augment=args.shift_augment, geometric_augment=args.geometric_augment,
        class_balanced=args.class_balanced, threshold_rule=args.threshold_rule, ema_decay=args.ema_decay,
        mixup_alpha=args.mixup_alpha, label_smoothing=args.label_smoothing,
        conv_channels=args.conv_channels, pool_sizes=args.pool_sizes, hidden_units=args.hidden_units, seed=args.seed,
        image_size=args.image_size, crop=args.crop, resize_filter=args.resize_filter,
        normalization=args.normalization, activation=args.activation,
        relu_twin=args.relu_twin, leakage_demo=args.leakage_demo, progress=args.progress,
    )
    metrics = run_training(options, log=lambda line: print(line, flush=True))
    print(f"{args.dataset} {metrics['report_split']} (held out): accuracy {metrics['accuracy']:.4f}, "
          f"AUC {metrics['auc']:.4f}, sensitivity {metrics['sensitivity']:.4f}, "
          f"specificity {metrics['specificity']:.4f}")
    return 0


# ------------------------------------------------------------------------- evaluate


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """The `evaluate` parser; extend it here (e.g. with --encrypted) and branch in cmd_evaluate."""
    p = subparsers.add_parser(
        "evaluate", help="evaluate a model on a data split and write a JSON report",
        description="Br35H models: --split train|val|test of the stored grouped split. "
                    "MedMNIST models: --data-file PATH.npz --split val (or train, or test). "
                    "Images from elsewhere: --image-dir DIR with one subfolder per class "
                    "(e.g. normal/ and pneumonia/), read and preprocessed as a diagnosis would.",
    )
    p.add_argument("--model", required=True, metavar="DIR|NAME",
                   help="model directory or shipped model name (br35h, pneumoniamnist, br35h-64, ...)")
    p.add_argument("--data-file", type=Path, default=None, metavar="PATH.npz", help="MedMNIST npz")
    p.add_argument("--split", default=None,
                   help="split to evaluate (default: the model's held-out report split)")
    p.add_argument("--image-dir", type=Path, default=None, metavar="DIR",
                   help="evaluate on the images (PNG, JPEG, TIFF, DICOM) under DIR, one subfolder per class "
                        "named as the model's classes (case-insensitive), instead of a stored split")
    p.add_argument("--class-dirs", nargs="+", default=None, metavar="NAME",
                   help="with --image-dir: the subfolder of each class, in class order (e.g. no yes); "
                        "comma-separated subfolders make one class (e.g. notumor glioma,meningioma,pituitary)")
    p.add_argument("--report", type=Path, default=None, metavar="OUT.json",
                   help="write the report here, and beside it OUT.roc.png and OUT.confusion.png "
                        "(with --corruptions: OUT.corruptions.png)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="with --report: no PNGs")
    p.add_argument("--encrypted", action="store_true",
                   help="run encrypted inference (CKKS, 128-bit) and add agreement, max_abs_logit_error "
                        "and server_latency_s_median to the report")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="with --encrypted: only N images, the classes taken in turns (the first of each "
                        "class, then the second, ...; about 1 s each); the report's per_image names them")
    p.add_argument("--backend", choices=("seal", "clear"), default="seal",
                   help="with --encrypted: seal (real CKKS, default) or clear (no encryption, debugging)")
    p.add_argument("--mode", choices=("latency", "throughput"), default="latency",
                   help="with --encrypted: latency = one image per ciphertext; throughput = up to 8192 "
                        "images per batch, slots across images (about 1.5 min per batch)")
    p.add_argument("--encrypted-model", action="store_true",
                   help="with --encrypted: the model owner encrypts the weights under the client's public key "
                        "and the server computes on ciphertext weights (encrypted-model mode)")
    p.add_argument("--corruptions", action="store_true",
                   help="accuracy, AUC and balanced error under the 13 MedMNIST-C chest X-ray corruptions at "
                        "5 severities each, next to the clean figure (plaintext)")
    p.add_argument("--compare", nargs="+", action="extend", default=[], metavar="DIR|NAME",
                   help="with --corruptions: also score these models (same data set) on the same corrupted images")
    p.add_argument("--corruption-size", type=int, default=224, metavar="PX",
                   help="with --corruptions: side the images are corrupted at (default 224, as MedMNIST-C)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)
    return p


def cmd_evaluate(args) -> int:
    from medhe.train.evaluate import evaluate_split, format_report_table

    if args.limit is not None and not args.encrypted:
        raise ConfigError("--limit goes with --encrypted")
    if args.compare and not args.corruptions:
        raise ConfigError("--compare goes with --corruptions")
    if args.class_dirs and args.image_dir is None:
        raise ConfigError("--class-dirs goes with --image-dir")
    class_dirs = tuple(args.class_dirs) if args.class_dirs else None
    if args.image_dir is not None and (args.split or args.data_file):
        raise ConfigError("--image-dir replaces --split and --data-file")
    if args.image_dir is not None and not args.corruptions:
        from medhe.train.evaluate import evaluate_folder

        if args.mode != "latency":
            raise ConfigError("--image-dir runs encrypted in latency mode only")
        report = evaluate_folder(args.model, args.image_dir, class_dirs,
                                 encrypted=args.encrypted, limit=args.limit, backend=args.backend,
                                 encrypted_model=args.encrypted_model, progress=args.progress)
        print(format_report_table(report))
        _print_skipped(report)
        _write_report(report, args.report, args.plots)
        return 0
    if args.corruptions:
        from medhe.train.robustness import evaluate_corruptions, format_corruption_table

        if args.encrypted:
            raise ConfigError("--corruptions is a plaintext evaluation; drop --encrypted")
        if not 8 <= args.corruption_size <= 4096:
            raise ConfigError(f"--corruption-size must be 8..4096 pixels, got {args.corruption_size}")
        report = evaluate_corruptions(args.model, split=args.split, data_file=args.data_file,
                                      compare=tuple(args.compare), size_px=args.corruption_size,
                                      image_dir=args.image_dir, class_dirs=class_dirs,
                                      progress=args.progress)
        print(format_corruption_table(report))
        _print_skipped(report)
        _write_report(report, args.report, args.plots)
        return 0
    report = evaluate_split(args.model, split=args.split, data_file=args.data_file,
                            encrypted=args.encrypted, limit=args.limit, backend=args.backend, mode=args.mode,
                            encrypted_model=args.encrypted_model, progress=args.progress)
    print(format_report_table(report))
    _write_report(report, args.report, args.plots)
    return 0


def _print_skipped(report: dict) -> None:
    skipped = report["dataset"].get("skipped")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s), listed in the report; first: {skipped[0]['reason']}")


def _write_report(report: dict, path: Path | None, plots: bool = False) -> None:
    """The JSON report at `path` and, with `plots`, its PNGs beside it (OUT.roc.png, ...)."""
    if path is None:
        return
    from medhe.train.metrics import data_title, save_corruption_png, save_report_plots

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
    print(f"wrote {path}")
    if not plots:
        return
    stem = path.with_suffix("")
    if "models" in report:  # a --corruptions report
        written = [save_corruption_png(stem.with_name(stem.name + ".corruptions.png"), report)]
    else:
        title = data_title(report) + (" (encrypted)" if report["encrypted"] else "")
        written = save_report_plots(report, stem, title)
    for png in written:
        print(f"wrote {png}")


# ----------------------------------------------------------------------------- demo


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="encrypted diagnosis of 6 held-out Br35H test images with the shipped model",
        description=f"The main job: loads the shipped {DEMO_MODEL} model, compiles it for CKKS at 128-bit "
                    f"security, generates client keys, and diagnoses {DEMO_PER_CLASS} held-out test images "
                    "per class through client -> bytes -> server -> bytes -> client, next to plaintext.",
    )
    p.add_argument("--model", default=DEMO_MODEL, metavar="DIR|NAME", help=f"default: {DEMO_MODEL}")
    p.add_argument("--backend", choices=("seal", "clear"), default="seal",
                   help="seal: real CKKS (default); clear: no encryption, debugging only")
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args) -> int:
    import time

    import numpy as np

    from medhe.compiler import compile_model, format_report
    from medhe.data.images import load_image
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.protocol.local import LocalSession
    from medhe.train.evaluate import demo_test_files
    from medhe.train.loop import predict_logits

    model_dir = resolve_model_dir(args.model)
    model, card = load_model(model_dir)
    if (card.dataset or {}).get("name") != "br35h":
        raise ConfigError(f"the demo uses Br35H test images; {model_dir} was trained on "
                          f"{(card.dataset or {}).get('name')!r}")
    files = demo_test_files(DEMO_PER_CLASS)
    inputs = np.stack([card.preprocessing.apply(load_image(path)) for path, _ in files])
    plain = predict_logits(model, inputs).argmax(1)
    start = time.perf_counter()
    plan = compile_model(model_dir)
    print(f"compiled {model_dir.name} in {time.perf_counter() - start:.1f} s:")
    print(format_report(plan.report))
    print("generating keys (the secret key stays in this client object)...", flush=True)
    session = LocalSession(plan, backend=args.backend)
    print(f"keys ready in {session.keygen_s:.1f} s; evaluation keys for the server: "
          f"{session.eval_key_bytes / 2**20:.0f} MiB")
    print("encrypted-model mode: a second clinic's keys, and the model owner encrypts the weights under its "
          "public key...", flush=True)
    encrypted = LocalSession(plan, backend=args.backend, encrypted_model=True)
    print(f"model encrypted in {encrypted.model_encrypt_s:.1f} s ({encrypted.encrypted_model_bytes / 2**20:.0f} MiB "
          "of ciphertexts); that server holds no weight in clear")
    names = card.class_names
    header = (f"{'image':<20} {'truth':<8} {'plaintext':<10} {'encrypted':<10} {'P(' + names[1] + ')':>9} "
              f"{'encrypt s':>9} {'server s':>9} {'decrypt s':>9} {'enc-model':<10} {'server s':>9}")
    print(header)
    print("-" * len(header))
    agree = agree_model = correct = 0
    for (path, label), x, plain_label in zip(files, inputs, plain):
        r = session.diagnose_input(x)
        m = encrypted.diagnose_input(x)
        encrypted_label, model_label = int(np.argmax(r.logits)), int(np.argmax(m.logits))
        agree += encrypted_label == plain_label
        agree_model += model_label == plain_label
        correct += encrypted_label == label
        print(f"{Path(path).parent.name + '/' + Path(path).name:<20} {names[label]:<8} {names[plain_label]:<10} "
              f"{names[encrypted_label]:<10} {r.probabilities[1]:>9.4f} {r.encrypt_s:>9.3f} {r.server_s:>9.3f} "
              f"{r.decrypt_s:>9.3f} {names[model_label]:<10} {m.server_s:>9.3f}")
    print(f"encrypted = plaintext on {agree}/{len(files)} (weights in clear on the server) and "
          f"{agree_model}/{len(files)} (encrypted model); {correct}/{len(files)} correct")
    # The clinic's input check, before encrypting: the test scans pass, an inverted copy does not.
    if card.preprocessing.input_profile is None:
        print(f"input check: {model_dir.name} has no input profile (add one with `medhe fit-input-profile`)")
    else:
        typical = sum(session.client.check_input(x)["typical"] for x in inputs)
        inverted = session.client.check_input(card.preprocessing.apply(1.0 - load_image(files[0][0])))
        print(f"input check on the clinic: {typical}/{len(files)} test scans like the training images; "
              f"{Path(files[0][0]).name} inverted: {'typical' if inverted['typical'] else 'flagged'} "
              f"(distance {inverted['distance']:.0f}, threshold {inverted['threshold']:.0f})")
    sys.stdout.flush()
    return 0


def add_ensemble_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ensemble",
        help="model owner: join trained models (e.g. one recipe, several seeds) into one ensemble model",
        description="Copy the models into one ensemble directory. Every command that takes --model takes it: "
                    "`medhe evaluate` scores the mean of the members' logits, `medhe compile` makes one plan "
                    "that computes that mean on one ciphertext (latency mode; one key set; about members x "
                    "the server time of one). The members must share the data set, preprocessing and classes.",
    )
    p.add_argument("--model", required=True, nargs="+", action="extend", metavar="MODEL",
                   help="two or more model directories or shipped model names")
    p.add_argument("--out", required=True, type=Path, help="ensemble directory to write (new or empty)")
    p.set_defaults(func=cmd_ensemble)
    return p


def cmd_ensemble(args) -> int:
    from medhe.nn.io import save_ensemble
    from medhe.nn.modeldir import resolve_model_dir

    out = save_ensemble(args.out, [resolve_model_dir(model) for model in args.model])
    print(f"ensemble of {len(args.model)} models written to {out}; score it with `medhe evaluate --model {out}` "
          f"and compile it with `medhe compile --model {out} --out PLAN_DIR`")
    return 0


def add_fit_input_profile_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fit-input-profile",
        help="add an input profile (flags inputs unlike the training images) to a trained model",
        description="Fit the statistics the clinic's client compares each input with (medhe.data.input_check) "
                    "from the training data the model's card names, under its training augmentations, and "
                    "write them into its model.json; the weights are not touched. `medhe train` does this "
                    "for every new model.",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data-file", type=Path, help="the MedMNIST npz the model was trained on (PneumoniaMNIST)")
    p.set_defaults(func=cmd_fit_input_profile)
    return p


def cmd_fit_input_profile(args) -> int:
    from medhe.nn.modeldir import resolve_model_dir
    from medhe.train.input_profile import add_profile_to_model

    add_profile_to_model(resolve_model_dir(args.model), data_file=args.data_file,
                         log=lambda line: print(line, flush=True))
    return 0


def register(subparsers) -> None:
    add_train_parser(subparsers)
    add_fit_input_profile_parser(subparsers)
    add_ensemble_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_demo_parser(subparsers)
