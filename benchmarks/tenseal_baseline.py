"""Reference baseline: the TenSEAL tutorial's encrypted CNN, run with TenSEAL's high-level API.

This reproduces the network and the encrypted evaluation of TenSEAL's tutorial
"Encrypted evaluation of a CNN" (MNIST), so that we can measure ourselves against it
on the same images in the same run:

    conv 7x7 stride 3, 1 -> 4 channels (no padding)   -> ts.im2col_encoding + conv2d_im2col
    x * x                                             -> square_()
    flatten, linear -> 64                             -> mm() + bias
    x * x                                             -> square_()
    linear -> num_classes                             -> mm() + bias

CKKS parameters are the tutorial's: poly_modulus_degree 8192,
coeff_mod_bit_sizes [31, 26, 26, 26, 26, 26, 26, 31], global scale 2**26, Galois keys.

One unavoidable deviation: with 32x32 inputs the im2col matrix (49 kernel cells padded
to 64 rows x 81 windows = 5184 slots) does not fit the 4096 slots of N = 8192, and
TenSEAL then refuses conv2d_im2col ("can't execute conv2d_im2col on chunked vectors").
By default (poly_modulus_degree=None) the runner therefore takes the smallest power of
two N >= 8192 whose N/2 slots hold the encoding -- N = 16384 for 32x32, same modulus
chain and scale -- and says so in `parameters` (`deviates_from_tutorial`). 28x28 inputs
run at exactly the tutorial's parameters.

Client/server split (simulated in one process, with real serialisation):
the client owns a secret-key context made with `ts.context`; the server only ever sees
`context.serialize(save_secret_key=False)` (public + relinearisation + Galois keys) and
the serialized encrypted input, and returns a serialized encrypted result.

This file is a benchmark, not part of the `medhe` package; import it by path.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tenseal as ts
import torch
from torch import nn
from tqdm.auto import tqdm

SYSTEM_NAME = "tenseal-tutorial"

# The tutorial's parameters.
TUTORIAL_POLY_MODULUS_DEGREE = 8192
TUTORIAL_COEFF_MOD_BIT_SIZES = (31, 26, 26, 26, 26, 26, 26, 31)
TUTORIAL_SCALE_BITS = 26

# The tutorial's network shape.
CONV_CHANNELS = 4
KERNEL_SIZE = 7
STRIDE = 3
HIDDEN = 64

# Keys of the result dict of run_baseline (medhe.bench.OursRun.summary returns the same ones),
# read by benchmarks/compare_tenseal.py.
RESULT_KEYS = (
    "system",
    "plaintext_accuracy",
    "n_plaintext",
    "encrypted_accuracy",
    "agreement",
    "n_encrypted",
    "server_latency_median_s",
    "server_latency_p90_s",
    "client_encrypt_median_s",
    "client_decrypt_median_s",
    "max_abs_logit_error",
    "upload_bytes",
    "download_bytes",
    "eval_key_bytes",
    "parameters",
)


def conv_output_side(image_size: int) -> int:
    """Side of the conv output (= windows per row/column of the im2col encoding)."""
    if image_size < KERNEL_SIZE:
        raise ValueError(f"image side {image_size} is smaller than the {KERNEL_SIZE}x{KERNEL_SIZE} kernel")
    return (image_size - KERNEL_SIZE) // STRIDE + 1


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def im2col_slots_needed(image_size: int) -> int:
    """Slots TenSEAL's im2col encoding takes: kernel cells padded to a power of two x windows.

    (7x7 -> 64 rows; 28x28 -> 8x8 = 64 windows -> 4096 slots; 32x32 -> 81 windows -> 5184.)
    """
    return _next_pow2(KERNEL_SIZE * KERNEL_SIZE) * conv_output_side(image_size) ** 2


def poly_modulus_degree_for(image_size: int) -> int:
    """Tutorial's N = 8192 when the encoding fits its N/2 slots, else the next power of two that does."""
    n = TUTORIAL_POLY_MODULUS_DEGREE
    while n // 2 < im2col_slots_needed(image_size):
        n *= 2
    return n


class TutorialNet(nn.Module):
    """The tutorial's ConvNet: conv(1->4, 7x7, stride 3) -> x^2 -> fc(->64) -> x^2 -> fc(->classes)."""

    def __init__(self, image_size: int = 28, num_classes: int = 10, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        side = conv_output_side(self.image_size)
        self.conv1 = nn.Conv2d(1, CONV_CHANNELS, kernel_size=KERNEL_SIZE, padding=0, stride=STRIDE)
        self.fc1 = nn.Linear(CONV_CHANNELS * side * side, hidden)
        self.fc2 = nn.Linear(hidden, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x * x
        x = torch.flatten(x, 1)  # channel-major, then row-major windows: same order as pack_vectors
        x = self.fc1(x)
        x = x * x
        return self.fc2(x)


def train_tutorial_net(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    num_classes: int | None = None,
    progress: bool = True,
) -> TutorialNet:
    """Train TutorialNet like the tutorial (Adam, cross-entropy, batch 64); returns it in eval mode.

    train_images: float32 (n, 1, S, S), already preprocessed. Seeded: same inputs and seed
    give the same weights (single-process CPU).
    """
    x = torch.as_tensor(np.ascontiguousarray(train_images, dtype=np.float32))
    y = torch.as_tensor(np.asarray(train_labels).reshape(-1).astype(np.int64))
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]:
        raise ValueError(f"train_images must be (n, 1, S, S), got {tuple(x.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{x.shape[0]} images vs {y.shape[0]} labels; need the same non-zero count")
    if num_classes is None:
        num_classes = int(y.max().item()) + 1
    torch.manual_seed(seed)
    model = TutorialNet(image_size=int(x.shape[2]), num_classes=max(num_classes, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    model.train()
    bar = tqdm(range(epochs), desc="train TutorialNet", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.item()) * len(idx)
        bar.set_postfix(loss=f"{total / n:.4f}")
    model.eval()
    return model


def plaintext_logits(model: TutorialNet, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """float32 (n, 1, S, S) -> float64 (n, classes) plaintext logits."""
    outs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32))
            outs.append(model(batch).double().numpy())
    if not outs:
        return np.zeros((0, model.num_classes))
    return np.concatenate(outs, axis=0)


class TenSEALTutorialRunner:
    """Encrypted inference of a TutorialNet exactly as in TenSEAL's CNN tutorial.

    Client side: `client_context` (secret key, made with ts.context). Server side:
    `server_context` rebuilt from the public serialisation (no secret key) and the model
    weights as plain Python lists (conv weight per channel as 7x7, fc weights transposed).
    """

    def __init__(
        self,
        model: TutorialNet,
        *,
        poly_modulus_degree: int | None = None,
        coeff_mod_bit_sizes: Sequence[int] = TUTORIAL_COEFF_MOD_BIT_SIZES,
        scale_bits: int = TUTORIAL_SCALE_BITS,
    ) -> None:
        self.image_size = model.image_size
        self.num_classes = model.num_classes
        self.windows_side = conv_output_side(self.image_size)
        needed = im2col_slots_needed(self.image_size)
        if poly_modulus_degree is None:
            poly_modulus_degree = poly_modulus_degree_for(self.image_size)
        if poly_modulus_degree // 2 < needed:
            raise ValueError(
                f"im2col encoding of a {self.image_size}x{self.image_size} image needs {needed} slots; "
                f"poly_modulus_degree {poly_modulus_degree} has {poly_modulus_degree // 2}. "
                f"Use {poly_modulus_degree_for(self.image_size)} (or None for automatic)."
            )
        self.poly_modulus_degree = int(poly_modulus_degree)
        self.coeff_mod_bit_sizes = [int(b) for b in coeff_mod_bit_sizes]
        self.scale_bits = int(scale_bits)

        # --- client: secret-key context, tutorial style ---------------------------------
        t0 = time.perf_counter()
        self.client_context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            self.poly_modulus_degree,
            coeff_mod_bit_sizes=self.coeff_mod_bit_sizes,
        )
        self.client_context.global_scale = 2.0**self.scale_bits
        self.client_context.generate_galois_keys()
        self.keygen_s = time.perf_counter() - t0

        # --- what the server receives once: public context with relin + Galois keys --------
        self.public_context_bytes = self.client_context.serialize(save_secret_key=False)
        self.server_context = ts.context_from(self.public_context_bytes)
        if self.server_context.is_private():
            raise RuntimeError("server context unexpectedly holds the secret key")

        # --- server: plaintext model weights, as the tutorial's EncConvNet holds them -------
        conv = model.conv1
        self.conv_weights = conv.weight.data.view(conv.out_channels, KERNEL_SIZE, KERNEL_SIZE).tolist()
        self.conv_biases = conv.bias.data.tolist()
        self.fc1_weight = model.fc1.weight.T.data.tolist()
        self.fc1_bias = model.fc1.bias.data.tolist()
        self.fc2_weight = model.fc2.weight.T.data.tolist()
        self.fc2_bias = model.fc2.bias.data.tolist()

    @property
    def eval_key_bytes(self) -> int:
        """Size of the serialized public context (public, relinearisation and Galois keys)."""
        return len(self.public_context_bytes)

    @property
    def parameters(self) -> dict[str, Any]:
        return {
            "scheme": "CKKS",
            "api": f"TenSEAL {ts.__version__} high-level (im2col_encoding, conv2d_im2col, mm)",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "global_scale_bits": self.scale_bits,
            "galois_keys": True,
            "image_size": self.image_size,
            "im2col_slots": im2col_slots_needed(self.image_size),
            "architecture": (
                f"conv{KERNEL_SIZE}x{KERNEL_SIZE}/s{STRIDE}x{CONV_CHANNELS} -> x^2 -> "
                f"fc{HIDDEN} -> x^2 -> fc{self.num_classes}"
            ),
            "deviates_from_tutorial": (
                self.poly_modulus_degree != TUTORIAL_POLY_MODULUS_DEGREE
                or tuple(self.coeff_mod_bit_sizes) != TUTORIAL_COEFF_MOD_BIT_SIZES
                or self.scale_bits != TUTORIAL_SCALE_BITS
            ),
        }

    # --- the three protocol steps ---------------------------------------------------------

    def client_encrypt(self, image: np.ndarray) -> ts.CKKSVector:
        """(1, S, S) or (S, S) preprocessed float image -> im2col-encoded encrypted vector."""
        image = np.asarray(image, dtype=np.float64)
        if image.ndim == 3 and image.shape[0] == 1:
            image = image[0]
        if image.shape != (self.image_size, self.image_size):
            raise ValueError(f"expected a ({self.image_size}, {self.image_size}) image, got {image.shape}")
        enc_x, windows_nb = ts.im2col_encoding(
            self.client_context, image.tolist(), KERNEL_SIZE, KERNEL_SIZE, STRIDE
        )
        if windows_nb != self.windows_side**2:
            raise RuntimeError(f"im2col gave {windows_nb} windows, expected {self.windows_side ** 2}")
        return enc_x

    def server_evaluate(self, enc_x: ts.CKKSVector) -> ts.CKKSVector:
        """The tutorial's EncConvNet.forward on an encrypted im2col vector (server context)."""
        windows_nb = self.windows_side**2
        channels = []
        for kernel, bias in zip(self.conv_weights, self.conv_biases):
            channels.append(enc_x.conv2d_im2col(kernel, windows_nb) + bias)
        enc = ts.CKKSVector.pack_vectors(channels)
        enc.square_()
        enc = enc.mm(self.fc1_weight) + self.fc1_bias
        enc.square_()
        enc = enc.mm(self.fc2_weight) + self.fc2_bias
        return enc

    def client_decrypt(self, result_bytes: bytes) -> np.ndarray:
        result = ts.ckks_vector_from(self.client_context, result_bytes)
        return np.asarray(result.decrypt(), dtype=np.float64)

    def diagnose(self, image: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """Encrypt, evaluate, decrypt one (1, S, S) preprocessed image.

        Returns (logits float64 (num_classes,), timings) where timings holds
        client_encrypt_s (im2col encode + encrypt), server_eval_s (conv2d_im2col, square,
        mm, square, mm), client_decrypt_s, the (de)serialisation times, and the sizes
        ciphertext_size_bytes (upload), result_size_bytes (download), eval_key_bytes.
        """
        t0 = time.perf_counter()
        enc_x = self.client_encrypt(image)
        t1 = time.perf_counter()
        upload = enc_x.serialize()
        t2 = time.perf_counter()

        server_x = ts.ckks_vector_from(self.server_context, upload)
        t3 = time.perf_counter()
        enc_out = self.server_evaluate(server_x)
        t4 = time.perf_counter()
        download = enc_out.serialize()
        t5 = time.perf_counter()

        logits = self.client_decrypt(download)
        t6 = time.perf_counter()
        timings = {
            "client_encrypt_s": t1 - t0,
            "client_serialize_s": t2 - t1,
            "server_deserialize_s": t3 - t2,
            "server_eval_s": t4 - t3,
            "server_serialize_s": t5 - t4,
            "client_decrypt_s": t6 - t5,
            "ciphertext_size_bytes": float(len(upload)),
            "result_size_bytes": float(len(download)),
            "eval_key_bytes": float(self.eval_key_bytes),
        }
        return logits[: self.num_classes], timings


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def run_baseline(
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    *,
    limit: int,
    epochs: int = 10,
    seed: int = 0,
    poly_modulus_degree: int | None = None,
    progress: bool = True,
    after_image: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train TutorialNet, score it in plaintext on all of eval_x and encrypted on eval_x[:limit].

    train_x / eval_x: float32 (n, 1, S, S) preprocessed. Returns a JSON-safe dict with the
    RESULT_KEYS (plus training/keygen details and per-image lists). `after_image(i)` runs after
    the baseline's image i, outside its timings (compare_tenseal.py evaluates medhe's image i
    there, so both systems meet the same machine state).
    """
    train_y = np.asarray(train_y).reshape(-1).astype(np.int64)
    eval_y = np.asarray(eval_y).reshape(-1).astype(np.int64)
    num_classes = int(max(train_y.max(), eval_y.max() if eval_y.size else 0)) + 1

    t0 = time.perf_counter()
    model = train_tutorial_net(
        train_x, train_y, epochs=epochs, seed=seed, num_classes=num_classes, progress=progress
    )
    train_s = time.perf_counter() - t0

    plain = plaintext_logits(model, eval_x)
    plain_pred = plain.argmax(axis=1)
    plaintext_accuracy = float((plain_pred == eval_y).mean()) if eval_y.size else None

    runner = TenSEALTutorialRunner(model, poly_modulus_degree=poly_modulus_degree)
    n_enc = min(int(limit), len(eval_x))
    enc_pred: list[int] = []
    errors: list[float] = []
    rel_errors: list[float] = []
    enc_logits: list[list[float]] = []
    server: list[float] = []
    encrypt: list[float] = []
    decrypt: list[float] = []
    upload_bytes = download_bytes = None
    bar = tqdm(range(n_enc), desc="TenSEAL tutorial encrypted", unit="img", disable=not progress)
    for i in bar:
        logits, timings = runner.diagnose(eval_x[i])
        enc_pred.append(int(np.argmax(logits)))
        errors.append(float(np.max(np.abs(logits - plain[i]))))
        # Relative to the logit scale (CKKS error grows with the activations it squares).
        rel_errors.append(errors[-1] / max(1.0, float(np.max(np.abs(plain[i])))))
        enc_logits.append([float(v) for v in logits])
        server.append(timings["server_eval_s"])
        encrypt.append(timings["client_encrypt_s"])
        decrypt.append(timings["client_decrypt_s"])
        upload_bytes = int(timings["ciphertext_size_bytes"])
        download_bytes = int(timings["result_size_bytes"])
        bar.set_postfix(server_s=f"{timings['server_eval_s']:.2f}")
        if after_image is not None:
            after_image(i)

    enc_pred_arr = np.asarray(enc_pred, dtype=np.int64)
    return {
        "system": SYSTEM_NAME,
        "plaintext_accuracy": plaintext_accuracy,
        "n_plaintext": int(len(eval_y)),
        "encrypted_accuracy": float((enc_pred_arr == eval_y[:n_enc]).mean()) if n_enc else None,
        "plaintext_accuracy_on_encrypted_subset": (
            float((plain_pred[:n_enc] == eval_y[:n_enc]).mean()) if n_enc else None
        ),
        "agreement": float((enc_pred_arr == plain_pred[:n_enc]).mean()) if n_enc else None,
        "n_encrypted": n_enc,
        "server_latency_median_s": _median(server),
        "server_latency_p90_s": _percentile(server, 90),
        "client_encrypt_median_s": _median(encrypt),
        "client_decrypt_median_s": _median(decrypt),
        "max_abs_logit_error": max(errors) if errors else None,
        "max_rel_logit_error": max(rel_errors) if rel_errors else None,
        "upload_bytes": upload_bytes,
        "download_bytes": download_bytes,
        "eval_key_bytes": runner.eval_key_bytes,
        "parameters": {
            **runner.parameters,
            "num_classes": num_classes,
            "epochs": epochs,
            "batch_size": 64,
            "lr": 1e-3,
            "optimizer": "Adam",
            "seed": seed,
            "n_train": int(len(train_y)),
        },
        "train_s": train_s,
        "keygen_s": runner.keygen_s,
        "per_image": {
            "server_eval_s": server,
            "client_encrypt_s": encrypt,
            "client_decrypt_s": decrypt,
            "max_abs_logit_error": errors,
            "rel_logit_error": rel_errors,
            "encrypted_logits": enc_logits,
            "plaintext_logits": [[float(v) for v in row] for row in plain[:n_enc]],
            "encrypted_pred": enc_pred,
            "plaintext_pred": [int(p) for p in plain_pred[:n_enc]],
            "label": [int(v) for v in eval_y[:n_enc]],
        },
    }


__all__ = [
    "RESULT_KEYS",
    "SYSTEM_NAME",
    "TenSEALTutorialRunner",
    "TutorialNet",
    "conv_output_side",
    "im2col_slots_needed",
    "plaintext_logits",
    "poly_modulus_degree_for",
    "run_baseline",
    "train_tutorial_net",
]
