"""The training loop: Adam + cross-entropy, LR schedule, light augmentation, early stopping.

Inputs are already preprocessed arrays shaped (n, 1, S, S) (see medhe.data.preprocess), so the
loop knows nothing about data sets. Runs are seeded and deterministic on CPU: the same seed,
data and settings give the same weights bit for bit.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from medhe.data.preprocess import standardize_per_image, stretch_per_image
from medhe.errors import ConfigError
from medhe.nn.layers import project_curvature
from medhe.nn.model import HECNN, ArchConfig
from medhe.train.metrics import binary_report

SCHEDULES = ("cosine", "step", "constant")
STOP_METRICS = ("auc", "loss")
TORCH_THREADS = 2


@contextmanager
def _deterministic_torch(threads: int):
    """Deterministic kernels and a fixed thread count for the duration of a run."""
    previous_threads = torch.get_num_threads()
    previous_det = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_det, warn_only=previous_warn)


def _check_arrays(name: str, images, labels, arch: ArchConfig) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    expected = (arch.in_channels, arch.image_size, arch.image_size)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ConfigError(
            f"{name} images must be preprocessed to (n, {', '.join(map(str, expected))}), "
            f"got {images.shape}; use Preprocessing.apply_batch"
        )
    if images.shape[0] != labels.shape[0]:
        raise ConfigError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ConfigError(f"{name} set is empty")
    if labels.min() < 0 or labels.max() >= arch.num_classes:
        raise ConfigError(f"{name} labels must be in [0, {arch.num_classes}), got {labels.min()}..{labels.max()}")
    return images, labels


def augment_batch(images: np.ndarray, rng: np.random.Generator, max_shift: int = 2,
                  vertical_flip: bool = False) -> np.ndarray:
    """Random horizontal flips (and optionally vertical) and integer shifts of up to max_shift.

    Shifted-in pixels take each image's minimum, the (normalised) background value, so a shift
    never introduces a bright border.
    """
    out = images.copy()
    n, _, height, width = out.shape
    flip = rng.random(n) < 0.5
    out[flip] = out[flip][..., ::-1]
    if vertical_flip:
        vflip = rng.random(n) < 0.5
        out[vflip] = out[vflip][..., ::-1, :]
    if max_shift > 0:
        shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
        for i in np.nonzero(shifts.any(axis=1))[0]:
            dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
            shifted = np.full_like(out[i], out[i].min())
            src_y = slice(max(0, -dy), height - max(0, dy))
            dst_y = slice(max(0, dy), height - max(0, -dy))
            src_x = slice(max(0, -dx), width - max(0, dx))
            dst_x = slice(max(0, dx), width - max(0, -dx))
            shifted[:, dst_y, dst_x] = out[i][:, src_y, src_x]
            out[i] = shifted
    return np.ascontiguousarray(out)


# Acquisition shifts a scanner or an export produces (the families MedMNIST-C measures): ranges of
# brightness and contrast factors, gamma, gaussian noise sigma and blur sigma (pixels at model size),
# each drawn per image and applied with probability SHIFT_PROBABILITY.
SHIFT_RANGES = {"brightness": (0.5, 1.5), "contrast": (0.4, 1.6), "gamma": (0.4, 1.6),
                "noise_sigma": (0.0, 0.08), "blur_sigma": (0.0, 1.2)}
SHIFT_PROBABILITY = 0.5


def shift_augment_batch(images: np.ndarray, rng: np.random.Generator, pixel_mean: float | None = None,
                        pixel_std: float | None = None, per_image: bool = False) -> np.ndarray:
    """Random brightness, contrast, gamma, noise and blur on normalised (n, 1, H, W) inputs.

    Applied to the [0, 1] pixels the inputs came from (undoing the normalisation with the
    model's training mean and std), clipped to [0, 1] as a real image would be, then normalised.
    per_image inputs (each standardised by its own mean and std) carry no pixel scale: each is
    stretched to [0, 1] by its own minimum and maximum instead, and standardised again after,
    so they need no pixel_mean / pixel_std.
    """
    from scipy import ndimage

    if not per_image and (pixel_mean is None or pixel_std is None):
        raise ConfigError("shift augmentation of dataset-normalised inputs needs the Preprocessing's "
                          "pixel mean and std")
    if per_image:
        pixels = stretch_per_image(images)
    else:
        pixels = np.clip(images.astype(np.float64) * pixel_std + pixel_mean, 0.0, 1.0)
    for i in range(pixels.shape[0]):
        image = pixels[i]
        on = rng.random(5) < SHIFT_PROBABILITY
        low, high = SHIFT_RANGES["brightness"]
        if on[0]:
            image = image * rng.uniform(low, high)
        if on[1]:
            low, high = SHIFT_RANGES["contrast"]
            image = image.mean() + (image - image.mean()) * rng.uniform(low, high)
        image = np.clip(image, 0.0, 1.0)
        if on[2]:
            low, high = SHIFT_RANGES["gamma"]
            image = image ** rng.uniform(low, high)
        if on[3]:
            image = ndimage.gaussian_filter(image, sigma=(0, *[rng.uniform(*SHIFT_RANGES["blur_sigma"])] * 2))
        if on[4]:
            image = image + rng.normal(scale=rng.uniform(*SHIFT_RANGES["noise_sigma"]), size=image.shape)
        pixels[i] = np.clip(image, 0.0, 1.0)
    if per_image:
        return standardize_per_image(pixels)
    return ((pixels - pixel_mean) / pixel_std).astype(np.float32)


# Framing shifts between scanners and exports: a random resized crop (area fraction and aspect ratio
# of the crop) and a small rotation, one affine warp per image, applied with GEOMETRY_PROBABILITY.
GEOMETRY_RANGES = {"crop_area": (0.8, 1.0), "crop_aspect": (0.9, 1.0 / 0.9), "rotation_deg": (-10.0, 10.0)}
GEOMETRY_PROBABILITY = 0.5


def geometric_augment_batch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random resized crops and small rotations of (n, C, H, W) inputs (bilinear resampling).

    The crop covers 80-100% of the image's area at an aspect ratio within 10% of square, placed so
    that before rotation it lies inside the image, and is resized back to H x W; its corners may
    rotate past the image edge, and pixels from outside take the image's minimum (its background),
    as in augment_batch. Rotation is in normalised coordinates: a true rotation for square inputs,
    which every medhe model has.
    """
    n = images.shape[0]
    on = rng.random(n) < GEOMETRY_PROBABILITY
    if not on.any():
        return images.copy()
    chosen = np.nonzero(on)[0]
    m = chosen.size
    area = rng.uniform(*GEOMETRY_RANGES["crop_area"], size=m)
    aspect = np.exp(rng.uniform(*np.log(GEOMETRY_RANGES["crop_aspect"]), size=m))
    width = np.minimum(np.sqrt(area * aspect), 1.0)  # fractions of the image side
    height = np.minimum(np.sqrt(area / aspect), 1.0)
    centre_x = rng.uniform(-(1.0 - width), 1.0 - width)  # normalised [-1, 1] coordinates
    centre_y = rng.uniform(-(1.0 - height), 1.0 - height)
    angle = np.deg2rad(rng.uniform(*GEOMETRY_RANGES["rotation_deg"], size=m))
    cos, sin = np.cos(angle), np.sin(angle)
    # Output pixel (x, y) in [-1, 1]^2 samples the input at R(angle) @ diag(width, height) @ (x, y) + centre.
    theta = np.stack([np.stack([cos * width, -sin * height, centre_x], axis=1),
                      np.stack([sin * width, cos * height, centre_y], axis=1)], axis=1)
    batch = torch.from_numpy(np.ascontiguousarray(images[chosen], dtype=np.float32))
    background = batch.amin(dim=(1, 2, 3), keepdim=True)
    grid = nn.functional.affine_grid(torch.from_numpy(theta.astype(np.float32)), list(batch.shape),
                                     align_corners=False)
    warped = nn.functional.grid_sample(batch - background, grid, mode="bilinear", padding_mode="zeros",
                                       align_corners=False) + background
    out = images.copy()
    out[chosen] = warped.numpy()
    return out


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Loss weights n / (k * count_c): every class contributes equally to the loss, so the model's
    probabilities are those of a balanced population and no class wins by prevalence alone."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ConfigError(f"class-balanced loss needs every class in the training set; counts {counts.tolist()}")
    return labels.size / (num_classes * counts)


@torch.no_grad()
def predict_logits(model: nn.Module, images, batch_size: int = 512) -> np.ndarray:
    """Logits of a preprocessed (n, C, S, S) array, in eval mode, in batches."""
    was_training = model.training
    model.eval()
    images = np.asarray(images, dtype=np.float32)
    chunks = [model(torch.from_numpy(images[i:i + batch_size])).numpy()
              for i in range(0, images.shape[0], batch_size)]
    model.train(was_training)
    return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, 2), dtype=np.float32)


def softmax_positive(logits: np.ndarray) -> np.ndarray:
    """P(class 1) from two-class logits, computed stably."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp[:, 1] / exp.sum(axis=1)


def _evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """Stop-set loss (class-weighted like the training loss), accuracy and AUC."""
    logits = predict_logits(model, images)
    weight = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), weight=weight))
    report = binary_report(labels, softmax_positive(logits))
    return {"loss": loss, "accuracy": report["accuracy"], "auc": report["auc"]}


def _make_scheduler(optimizer, schedule: str, total_steps: int):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    if schedule == "step":
        # x0.1 at 1/2 and 3/4 of the run.
        milestones = [max(1, total_steps // 2), max(2, (3 * total_steps) // 4)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _is_better(current: dict, best: dict | None, stop_metric: str) -> bool:
    if best is None:
        return True
    if stop_metric == "loss" or current["auc"] is None or best["auc"] is None:
        return current["loss"] < best["loss"]
    # AUC first; at equal AUC (common once it saturates) the lower loss wins.
    if current["auc"] != best["auc"]:
        return current["auc"] > best["auc"]
    return current["loss"] < best["loss"]


def train_model(
    arch: ArchConfig,
    train_images,
    train_labels,
    stop_images,
    stop_labels,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int,
    seed: int,
    augment: bool,
    progress: bool = True,
    schedule: str = "cosine",
    weight_decay: float = 1e-4,
    stop_metric: str = "auc",
    max_shift: int = 2,
    vertical_flip: bool = False,
    grad_clip: float = 5.0,
    shift_augment: bool = False,
    pixel_mean_std: tuple[float, float] | None = None,
    geometric_augment: bool = False,
    class_balanced: bool = False,
    per_image: bool = False,
    ema_decay: float = 0.0,
    mixup_alpha: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[HECNN, dict]:
    """Train HECNN(arch) and return it (eval mode, best early-stopping weights) and its history.

    The early-stopping ("stop") set only picks the epoch whose weights are kept; report final
    numbers on a set that played no part in training. ``patience`` epochs without improvement of
    ``stop_metric`` end the run (0 disables early stopping but still restores the best epoch).
    ``per_image``: the inputs are standardised per image (Preprocessing normalization "per_image");
    each augmented batch is standardised again, as the client would standardise such an image.
    ``ema_decay`` > 0: an exponential moving average of the weights and batch-norm statistics,
    updated after every optimizer step (w_avg <- d * w_avg + (1 - d) * w), is what early stopping
    scores and what is returned; 0 (the default) keeps the raw weights.
    ``mixup_alpha`` > 0: each batch is trained on convex mixtures of its images with a shuffled copy,
    lam ~ Beta(alpha, alpha) per batch, and the loss mixes the two labels' losses with the same lam
    (mixup, Zhang et al. 2018). ``label_smoothing``: torch's, which spreads that much of each target's
    mass over all classes (Szegedy et al. 2016; two classes and 0.1: targets 0.95 / 0.05). Both change the training loss only; early stopping
    scores the plain (class-weighted) cross-entropy of the stop set either way.
    """
    if epochs < 1 or batch_size < 2 or lr <= 0 or patience < 0:
        raise ConfigError(
            f"need epochs >= 1, batch_size >= 2, lr > 0, patience >= 0; got epochs={epochs}, "
            f"batch_size={batch_size}, lr={lr}, patience={patience}"
        )
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if not (math.isfinite(mixup_alpha) and mixup_alpha >= 0.0):
        raise ConfigError(f"mixup_alpha must be a finite number >= 0, got {mixup_alpha}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if stop_metric not in STOP_METRICS:
        raise ConfigError(f"stop_metric must be one of {STOP_METRICS}, got {stop_metric!r}")
    if shift_augment and not per_image and pixel_mean_std is None:
        raise ConfigError("shift_augment of dataset-normalised inputs needs pixel_mean_std, the "
                          "Preprocessing's (mean, std)")
    train_images, train_labels = _check_arrays("training", train_images, train_labels, arch)
    stop_images, stop_labels = _check_arrays("early-stopping", stop_images, stop_labels, arch)

    from tqdm.auto import tqdm

    with _deterministic_torch(TORCH_THREADS):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = HECNN(arch)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        n = train_images.shape[0]
        steps_per_epoch = n // batch_size + (1 if n % batch_size >= 2 else 0)
        scheduler = _make_scheduler(optimizer, schedule, epochs * steps_per_epoch)
        weights = class_weights(train_labels, arch.num_classes) if class_balanced else None
        # The average's polynomial coefficients stay above project_curvature's floor: the feasible set
        # {a >= max(m, |b| / 2s)} is convex, so a mean of feasible points is feasible. (The averaged
        # int num_batches_tracked is truncated and meaningless; momentum BN never reads it, saving drops it.)
        averaged = (torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            if ema_decay else None)
        scored = model if averaged is None else averaged.module
        loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else torch.tensor(weights, dtype=torch.float32),
                                      label_smoothing=label_smoothing)

        history: dict = {
            "seed": seed, "epochs_max": epochs, "batch_size": batch_size, "lr": lr,
            "schedule": schedule, "weight_decay": weight_decay, "augment": bool(augment),
            "max_shift": max_shift if augment else 0, "vertical_flip": bool(augment and vertical_flip),
            "shift_augment": bool(shift_augment), "geometric_augment": bool(geometric_augment),
            "class_balanced": bool(class_balanced), "per_image": bool(per_image), "ema_decay": ema_decay,
            "mixup_alpha": mixup_alpha, "label_smoothing": label_smoothing,
            "class_weights": None if weights is None else [round(float(w), 6) for w in weights],
            "patience": patience, "stop_metric": stop_metric, "activation": arch.activation,
            "n_train": int(n), "n_stop": int(stop_images.shape[0]), "epochs": [],
        }
        best: dict | None = None
        best_state = None
        best_epoch = 0
        since_best = 0
        start = time.perf_counter()
        show = progress and sys.stderr.isatty()
        bar = tqdm(range(1, epochs + 1), desc=f"train {arch.activation}", unit="epoch",
                   disable=not show, leave=False, file=sys.stderr)
        for epoch in bar:
            epoch_start = time.perf_counter()
            model.train()
            order = rng.permutation(n)
            total_loss, total_correct, seen = 0.0, 0, 0
            for begin in range(0, n, batch_size):
                idx = order[begin:begin + batch_size]
                if idx.size < 2:  # batch norm cannot train on a single example
                    continue
                x = train_images[idx]
                if augment:
                    x = augment_batch(x, rng, max_shift=max_shift, vertical_flip=vertical_flip)
                if geometric_augment:
                    x = geometric_augment_batch(x, rng)
                if shift_augment:
                    x = shift_augment_batch(x, rng, *(pixel_mean_std or (None, None)), per_image=per_image)
                if mixup_alpha:  # drawn only when on, so runs without it keep their random stream
                    mix_lam = float(rng.beta(mixup_alpha, mixup_alpha))
                    mix_partner = rng.permutation(idx.size)
                    x = (mix_lam * x + (1.0 - mix_lam) * x[mix_partner]).astype(x.dtype, copy=False)
                # Flips' and shifts' fill and the geometric warp move each image's mean and std. After
                # shift augmentation this repeats its last step; kept so that the shipped weights
                # stay reproducible bit for bit.
                if per_image:
                    x = standardize_per_image(x)
                xb = torch.from_numpy(x)
                yb = torch.from_numpy(train_labels[idx])
                optimizer.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = loss_fn(logits, yb)
                if mixup_alpha:
                    loss = mix_lam * loss + (1.0 - mix_lam) * loss_fn(logits, yb[torch.from_numpy(mix_partner)])
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"training diverged at epoch {epoch} (loss {loss.item()}); lower --lr "
                        f"(now {lr}) or use --activation relu to compare"
                    )
                loss.backward()
                if grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                project_curvature(model)
                if averaged is not None:
                    averaged.update_parameters(model)
                scheduler.step()
                total_loss += loss.item() * idx.size
                total_correct += int((logits.argmax(1) == yb).sum())
                seen += idx.size
            stop = _evaluate(scored, stop_images, stop_labels, weights)
            record = {
                "epoch": epoch,
                "lr_end": float(optimizer.param_groups[0]["lr"]),
                "train_loss": total_loss / seen,
                "train_accuracy": total_correct / seen,
                "stop_loss": stop["loss"],
                "stop_accuracy": stop["accuracy"],
                "stop_auc": stop["auc"],
                "seconds": time.perf_counter() - epoch_start,
            }
            history["epochs"].append(record)
            if _is_better(stop, best, stop_metric):
                best, best_epoch, since_best = stop, epoch, 0
                best_state = copy.deepcopy(scored.state_dict())
            else:
                since_best += 1
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", stop_auc=f"{stop['auc'] or 0:.4f}",
                            stop_acc=f"{stop['accuracy']:.3f}", best=best_epoch)
            if patience and since_best >= patience:
                history["stopped_early"] = True
                break
        else:
            history["stopped_early"] = False
        bar.close()
        model.load_state_dict(best_state)
        model.eval()
        history["best_epoch"] = best_epoch
        history["best_stop"] = best
        history["epochs_run"] = len(history["epochs"])
        history["train_seconds"] = time.perf_counter() - start
    return model, history
