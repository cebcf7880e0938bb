"""The HE-friendly CNN and its architecture description (JSON-serialisable)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from medhe.errors import ConfigError
from medhe.nn.layers import PolyAct

ACTIVATIONS = ("poly", "relu")


@dataclass(frozen=True)
class ArchConfig:
    """Architecture of the default network: conv blocks then a hidden dense layer.

    Each block is conv(kxk, same padding) -> avgpool(2) -> batch norm -> activation. Pooling
    before the activation quarters the number of activations (and, in throughput mode, of
    ciphertext squares) at no accuracy cost we could measure; batch norm sits right before the
    activation so the polynomial sees N(0,1)-like inputs.
    """

    image_size: int = 28
    in_channels: int = 1
    # Two blocks: a third (8,8,8) costs a level (every rotation runs on one prime more) and
    # 1.3-1.7x the encrypted latency for no consistent held-out gain (benchmarks/pareto.py).
    conv_channels: tuple[int, ...] = (8, 8)
    # Average-pool side of each block (empty: 2 everywhere); e.g. (2, 4) gives two blocks the
    # 3x3 maps of three.
    pool_sizes: tuple[int, ...] = ()
    kernel_size: int = 3
    # 16 hidden units: the dense layer's replicate-multiply-reduce lowering fits 16 copies of
    # its input between the conv grid's values (32 would need a second pass of rotations).
    # 0: no hidden layer (the conv features go straight to the logits): one activation and one
    # rescale fewer, so every layer runs one level lower, where rotations are cheaper.
    hidden_units: int = 16
    num_classes: int = 2
    activation: str = "poly"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.kernel_size % 2 != 1:
            raise ConfigError(f"kernel_size must be odd (same padding), got {self.kernel_size}")
        if len(self.conv_channels) < 1 or any(c < 1 for c in self.conv_channels):
            raise ConfigError(f"conv_channels must be positive, got {self.conv_channels}")
        if self.pool_sizes and (len(self.pool_sizes) != len(self.conv_channels) or min(self.pool_sizes) < 1):
            raise ConfigError(f"pool_sizes needs one positive size per conv block ({len(self.conv_channels)}), "
                              f"got {self.pool_sizes}")
        if self.hidden_units < 0:
            raise ConfigError(f"hidden_units must be >= 0 (0: no hidden layer), got {self.hidden_units}")
        if self.feature_size() < 1:
            raise ConfigError(
                f"image_size {self.image_size} is too small for {len(self.conv_channels)} "
                "pooling blocks"
            )

    def block_pools(self) -> tuple[int, ...]:
        return self.pool_sizes or (2,) * len(self.conv_channels)

    def feature_size(self) -> int:
        size = self.image_size
        for pool in self.block_pools():
            size //= pool
        return size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["conv_channels"] = list(self.conv_channels)
        if self.pool_sizes:
            d["pool_sizes"] = list(self.pool_sizes)
        else:
            del d["pool_sizes"]  # cards written before pool sizes existed read the same
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ArchConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown architecture fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for key in ("conv_channels", "pool_sizes"):
            if key in d:
                d[key] = tuple(int(c) for c in d[key])
        return cls(**d)


def make_activation(kind: str) -> nn.Module:
    return PolyAct() if kind == "poly" else nn.ReLU()


class HECNN(nn.Module):
    """conv blocks -> flatten -> [dense -> BN -> act] -> dense (logits)."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        layers: list[nn.Module] = []
        channels_in = arch.in_channels
        for channels_out, pool in zip(arch.conv_channels, arch.block_pools()):
            layers += [
                nn.Conv2d(channels_in, channels_out, arch.kernel_size, padding=arch.kernel_size // 2),
                nn.AvgPool2d(pool),
                nn.BatchNorm2d(channels_out),
                make_activation(arch.activation),
            ]
            channels_in = channels_out
        features = channels_in * arch.feature_size() ** 2
        layers.append(nn.Flatten())
        if arch.hidden_units:
            layers += [
                nn.Linear(features, arch.hidden_units),
                nn.BatchNorm1d(arch.hidden_units),
                make_activation(arch.activation),
            ]
            features = arch.hidden_units
        layers.append(nn.Linear(features, arch.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
