"""A small real-image restoration task with routed FFNs: where MoFME's claim can be checked.

MoFME (Zhang et al., AAAI 2024, arXiv 2312.16610) claims that feature-modulated experts around
one shared expert block restore images as well as (0.1-0.2 dB better than) a conventional MoE of
FFN experts, with far fewer parameters (more than 72% fewer) and less inference time. Its task is
removing several adverse-weather degradations with one model. This runner builds a CPU-sized
version of that task:

- **images**: Fashion-MNIST (Debian ``dataset-fashion-mnist``, 28 x 28, loaded by
  ``moelab.data.mixed`` as ``moelab.repro.vision`` does); without it, sklearn's digits (8 x 8). Grey
  values scaled to ``[0, 1]``. ``train_images`` images of the train split train, the first
  ``val_images`` of the test split are held out.
- **three corruptions**, one per image (a balanced random assignment: a third each), drawn once
  from a fixed generator (``DATA_SEED``), so every arm and seed sees the same corrupted images:
  ``noise`` adds Gaussian noise of standard deviation ``noise_std`` (0.2; not clipped),
  ``blur`` convolves with a normalised ``blur_kernel x blur_kernel`` Gaussian of standard
  deviation ``blur_sigma`` (5 and 1.0 px) with circular padding (so the blur keeps every image's
  mean exactly; Fashion-MNIST's borders are black, so the wrap-around is not visible), and
  ``occlusion`` sets one ``occlusion_size``-pixel square (10 px), placed uniformly inside the
  image, to 0. Digits use 3 px, 0.8 and 3 px (``CorruptionSpec.for_size``).
- **model** (``DenoiseNet``): the corrupted image as patch tokens (4 x 4 pixels: 49 tokens of 16
  values; digits 2 x 2: 16 of 4), a linear embedding plus learned positions, ``n_layers`` pre-norm
  blocks of bidirectional attention and a routed FFN, a final norm and a linear head to patch
  pixels added to the input patch (residual learning; the head starts at zero, so the untrained
  net is the identity). The routed FFN is the arm's: ``mofme`` (``moelab.layers.mofme.MoFME``) or
  ``moelab.MoE`` with GELU FFN experts of width ``mlp_dim`` (the official conventional MoE's
  ``FeedForward(dim, mlp_dim)`` experts), same ``E`` and ``k``. Everything outside the routed FFNs
  is built first under the seed, so it is identical for every arm.
- **training**: MSE to the clean image plus the routed layers' auxiliary losses, with
  ``moelab.train.Trainer`` (AdamW, warmup + cosine).
- **metrics**: PSNR ``10 log10(1 / MSE)`` per held-out image (predictions clipped to ``[0, 1]``),
  averaged over images, overall (``val_psnr``) and per corruption (``psnr_noise``, ...), with the
  corrupted input's PSNR for reference; parameters of the routed layers (``moe_params``) and of
  the model (``model_params``); the eval forward latency of the whole model on 256 held-out images
  (``forward_ms``, median of 5, on the run's threads).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.repro.rules import Arm, Condition, Reproduction, Rows, diff, lower

CORRUPTIONS = ("noise", "blur", "occlusion")
DATA_SEED = 0  # the corruptions are the same for every arm and seed
TRAIN_IMAGES = 12_000
VAL_IMAGES = 1_000
LATENCY_IMAGES = 256
# A PSNR difference below this (dB) is of no practical consequence here (our choice: the paper's
# own gains are 0.1-0.2 dB).
PSNR_MARGIN = 0.1


# -- corruptions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorruptionSpec:
    """The three corruptions' strengths (module docstring)."""

    noise_std: float = 0.2
    blur_kernel: int = 5
    blur_sigma: float = 1.0
    occlusion_size: int = 10

    @classmethod
    def for_size(cls, size: int) -> CorruptionSpec:
        """Fashion-MNIST's (28 px) strengths, or smaller ones for 8 x 8 digits."""
        return cls() if size >= 16 else cls(noise_std=0.2, blur_kernel=3, blur_sigma=0.8, occlusion_size=3)


def _images(x: object, name: str = "images_NHW") -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating [N, H, W] tensor, got {got}")
    return x


def add_noise(images_NHW: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """``x + std * N(0, 1)`` per pixel (not clipped, so the noise has exactly the stated law)."""
    _images(images_NHW)
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std}")
    noise = torch.randn(images_NHW.shape, generator=generator, dtype=images_NHW.dtype)
    return images_NHW + std * noise.to(images_NHW.device)


def gaussian_kernel(size: int, sigma: float) -> Tensor:
    """``[size, size]`` float64 Gaussian of standard deviation ``sigma`` px, centred, summing to 1."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be an odd int >= 1, got {size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    return k / k.sum()


def blur(images_NHW: Tensor, size: int, sigma: float) -> Tensor:
    """Gaussian blur with circular padding: each output pixel is a weighted mean (weights summing
    to 1) of its neighbours, wrapping at the borders, so every image keeps its mean exactly."""
    _images(images_NHW)
    k = gaussian_kernel(size, sigma).to(images_NHW.dtype).to(images_NHW.device)
    p = size // 2
    x = F.pad(images_NHW[:, None], (p, p, p, p), mode="circular") if p else images_NHW[:, None]
    return F.conv2d(x, k[None, None])[:, 0]


def occlude(
    images_NHW: Tensor, size: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Set one ``size x size`` square per image to 0, at a uniformly random position inside it.

    Returns ``(occluded [N, H, W], corners [N, 2])`` (each square's top-left ``(row, col)``).
    """
    _images(images_NHW)
    n, h, w = images_NHW.shape
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= min(h, w):
        raise ValueError(f"size must be an int in [1, {min(h, w)}], got {size!r}")
    top = torch.randint(0, h - size + 1, (n,), generator=generator)
    left = torch.randint(0, w - size + 1, (n,), generator=generator)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    inside = (
        (rows >= top[:, None, None]) & (rows < top[:, None, None] + size)
        & (cols >= left[:, None, None]) & (cols < left[:, None, None] + size)
    )  # fmt: skip
    return images_NHW.masked_fill(inside.to(images_NHW.device), 0.0), torch.stack([top, left], 1)


def corrupt(
    images_NHW: Tensor, spec: CorruptionSpec, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Each image through one corruption. Returns ``(corrupted [N, H, W], kind [N])``, ``kind``
    indexing ``CORRUPTIONS``: a random permutation of ``0, 1, 2, 0, 1, 2, ...`` (a third each)."""
    _images(images_NHW)
    n = images_NHW.shape[0]
    kind = (torch.arange(n) % len(CORRUPTIONS))[torch.randperm(n, generator=generator)]
    out = images_NHW.clone()
    noise, blurred, occluded = (kind == i for i in range(len(CORRUPTIONS)))
    out[noise] = add_noise(images_NHW[noise], spec.noise_std, generator)
    out[blurred] = blur(images_NHW[blurred], spec.blur_kernel, spec.blur_sigma)
    out[occluded] = occlude(images_NHW[occluded], spec.occlusion_size, generator)[0]
    return out, kind


# -- data -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _raw_images() -> tuple[str, int, float, np.ndarray, np.ndarray]:
    """``(name, patch, max value, train [N, H, W], test [M, H, W])`` as stored (uint8 for
    Fashion-MNIST): Fashion-MNIST when installed, else sklearn's digits (the loaders
    ``moelab.repro.vision.image_data`` uses). Cached: three seeds read the files once."""
    from moelab.data.mixed import fashion_available, load_digits_images, load_fashion

    if fashion_available():
        (xtr, _), (xte, _) = load_fashion()
        return "Fashion-MNIST", 4, 255.0, xtr, xte
    (xtr, _), (xte, _) = load_digits_images()
    return "digits (Fashion-MNIST not installed)", 2, 16.0, xtr, xte


@dataclass
class DenoiseData:
    """Corrupted and clean images as patch tokens (``[N, P, p*p]``), with each image's corruption."""

    name: str
    patch: int
    spec: CorruptionSpec
    train: tuple[Tensor, Tensor, Tensor]  # (corrupted patches, clean patches, kind)
    val: tuple[Tensor, Tensor, Tensor]


def denoise_data(train_images: int = TRAIN_IMAGES, val_images: int = VAL_IMAGES) -> DenoiseData:
    """The task's data (module docstring): the first ``train_images`` train and ``val_images``
    test images, each corrupted once from the fixed generator ``DATA_SEED``."""
    from moelab.core.checks import positive_int
    from moelab.repro.vision import patch_images

    positive_int("train_images", train_images)
    positive_int("val_images", val_images)
    name, patch, top, xtr, xte = _raw_images()
    spec = CorruptionSpec.for_size(xtr.shape[1])
    g = torch.Generator().manual_seed(DATA_SEED)

    def split(images: np.ndarray, n: int) -> tuple[Tensor, Tensor, Tensor]:
        clean = torch.from_numpy(np.asarray(images[:n], dtype=np.float32) / np.float32(top))
        bad, kind = corrupt(clean, spec, g)
        return patch_images(bad.numpy(), patch, 1.0), patch_images(clean.numpy(), patch, 1.0), kind

    return DenoiseData(name, patch, spec, split(xtr, train_images), split(xte, val_images))


# -- model ----------------------------------------------------------------------------------------
def routed_ffn_for(arm: Arm, d_model: int, num_experts: int, top_k: int, mlp_dim: int) -> nn.Module:
    """An arm's routed FFN: a registered routed layer other than ``moe`` (``"mofme"``) built with
    ``moelab.MoE``'s leading arguments, or a ``moelab.MoE`` with GELU FFN experts of width ``mlp_dim``
    routed by the router ``arm.router``."""
    from moelab import registry
    from moelab.layers.moe import MoE

    if arm.router != "moe" and arm.router in registry.names("layer"):
        cls = registry.get("layer", arm.router).obj
        return cls(
            d_model, num_experts, top_k, mlp_dim, router_kwargs=dict(arm.router_kwargs), aux_losses=dict(arm.aux_losses)
        )
    return MoE(
        d_model, num_experts, top_k, mlp_dim, activation="gelu",
        router=arm.router, router_kwargs=dict(arm.router_kwargs), aux_losses=dict(arm.aux_losses),
    )  # fmt: skip


class DenoiseNet(nn.Module):
    """Corrupted patches ``[B, P, p]`` -> restored patches ``[B, P, p]`` (module docstring).

    ``ffns``: one routed FFN per block (``routed_ffn_for``); built by the caller after this
    module's other weights when the arms must share those (``DenoiseNet.build``).
    """

    def __init__(self, d_model: int, n_layers: int, n_heads: int, patch_dim: int, num_patches: int) -> None:
        super().__init__()
        self.embed = nn.Linear(patch_dim, d_model)
        self.pos = nn.Parameter(torch.randn(num_patches, d_model) * 0.02)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.attns = nn.ModuleList(nn.MultiheadAttention(d_model, n_heads, batch_first=True) for _ in range(n_layers))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, patch_dim)
        nn.init.zeros_(self.head.weight)  # the untrained net returns its input (residual learning)
        nn.init.zeros_(self.head.bias)
        self.ffns = nn.ModuleList()

    @classmethod
    def build(cls, arm: Arm, model: dict[str, Any], patch_dim: int, num_patches: int) -> DenoiseNet:
        """The net of ``model``'s sizes (``d_model, n_layers, n_heads, num_experts, top_k``,
        ``mlp_dim`` default ``4 d``), its routed FFNs built last, linked in depth order."""
        from moelab.core.router import link_routers

        d = model["d_model"]
        net = cls(d, model["n_layers"], model["n_heads"], patch_dim, num_patches)
        mlp_dim = model.get("mlp_dim") or 4 * d
        for _ in range(model["n_layers"]):
            net.ffns.append(routed_ffn_for(arm, d, model["num_experts"], model["top_k"], mlp_dim))
        link_routers(list(net.ffns))
        return net

    def forward(self, patches_BPQ: Tensor) -> Tensor:
        from moelab.core.context import RoutingContext

        x = self.embed(patches_BPQ) + self.pos
        ctx = RoutingContext(batch_shape=(x.shape[0], x.shape[1]))
        for i, (an, attn, fn, ffn) in enumerate(zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns, strict=True)):
            h = an(x)
            x = x + attn(h, h, h, need_weights=False)[0]
            x = x + ffn(fn(x), ctx.replace(layer_index=i))
        return patches_BPQ + self.head(self.norm(x))

    def aux_loss(self) -> Tensor:
        return sum(f.aux_loss for f in self.ffns)

    def moe_parameters(self) -> int:
        """Parameters of the routed FFN layers (router, experts and everything else in them)."""
        return sum(p.numel() for p in self.ffns.parameters())


def denoise_loss(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, Any]]:
    """MSE to the clean patches plus the routed layers' auxiliary losses."""
    bad, clean, _ = batch
    mse = F.mse_loss(model(bad), clean)
    aux = getattr(model, "module", model).aux_loss()
    return mse + aux, {
        "task_loss": mse,
        "aux_loss": aux,
        "count": int(bad.shape[0]),
        "tokens": int(bad.shape[0] * bad.shape[1]),
    }


def psnr(pred: Tensor, clean: Tensor) -> Tensor:
    """``[N]`` PSNR in dB of each image (``[N, ...]`` in ``[0, 1]``; ``pred`` clipped to it)."""
    mse = (pred.clamp(0, 1) - clean).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate(model: nn.Module, val: tuple[Tensor, Tensor, Tensor], batch_size: int = 500) -> dict[str, float]:
    """Mean PSNR over the held-out images, overall and per corruption, and the inputs' PSNR."""
    bad, clean, kind = val
    model.eval()
    out = torch.cat([model(bad[i : i + batch_size]) for i in range(0, bad.shape[0], batch_size)])
    model.train()
    restored, given = psnr(out, clean), psnr(bad, clean)
    row = {
        "val_psnr": float(restored.mean()),
        "val_mse": float((out - clean).square().mean()),
        "input_psnr": float(given.mean()),
    }
    for i, name in enumerate(CORRUPTIONS):
        row[f"psnr_{name}"] = float(restored[kind == i].mean())
        row[f"input_psnr_{name}"] = float(given[kind == i].mean())
    return row


@torch.no_grad()
def forward_ms(model: nn.Module, x: Tensor, repeats: int = 5) -> float:
    """Median eval forward time of ``model`` on ``x`` (ms), after one warm-up."""
    model.eval()
    model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    model.train()
    return 1e3 * statistics.median(times)


def run_denoisers(
    arms: dict[str, Arm],
    *,
    seed: int,
    model: dict[str, Any],
    train: dict[str, Any],
    out: Path | None = None,
    progress: bool = False,
    console: Any = None,
    train_images: int = TRAIN_IMAGES,
    val_images: int = VAL_IMAGES,
) -> Rows:
    """Train one ``DenoiseNet`` per arm (``moelab.repro.rules.Arm``) on ``seed``; each arm's row.

    ``model``: ``d_model``, ``n_layers``, ``n_heads``, ``num_experts``, ``top_k`` (and optionally
    ``mlp_dim``; ``moelab repro``'s other keys, such as ``max_seq_len``, are ignored), with each
    arm's ``model`` overrides. ``train``: ``TrainConfig`` fields (``seq_len`` unused).
    Rows (module docstring): ``val_psnr``, ``psnr_<corruption>``, ``input_psnr``, ``val_mse``,
    ``moe_params``, ``model_params``, ``forward_ms``, ``max_over_mean``; and ``_data``.
    """
    from moelab.data import TensorData
    from moelab.train.config import TrainConfig
    from moelab.train.resources import torch_threads
    from moelab.train.trainer import Trainer

    data = denoise_data(train_images, val_images)
    xtr = data.train[0]
    rows: Rows = {}
    for label, arm in arms.items():
        sizes = {**model, **arm.model}
        tcfg = TrainConfig.from_dict({**train, "seed": seed})
        torch.manual_seed(seed)  # the Trainer seeds too; this makes the build itself seeded
        net = DenoiseNet.build(arm, sizes, xtr.shape[2], xtr.shape[1])
        trainer = Trainer(
            net,
            tcfg,
            None,
            loss_fn=denoise_loss,
            data=TensorData(train=data.train, val=data.val),
            progress=progress,
            console=console,
            description=f"{label} s{seed}",
        )
        res = trainer.train()
        trained = trainer.model
        with torch_threads(tcfg.threads):
            latency = forward_ms(trained, data.val[0][:LATENCY_IMAGES])
        loads = [r["max_over_mean"] for r in res.routing]
        rows[label] = {
            **evaluate(trained, data.val),
            "moe_params": float(trained.moe_parameters()),
            "model_params": float(sum(p.numel() for p in trained.parameters())),
            "forward_ms": latency,
            "max_over_mean": float(np.nanmean(loads)) if loads else math.nan,
        }
    rows["_data"] = {"images": float(xtr.shape[0]), "fashion": float(data.name == "Fashion-MNIST")}
    return rows


# -- the reproduction -----------------------------------------------------------------------------
_LB = {"load_balance": 1e-2}
# Both arms: MoFME's router form (linear with bias -> KeepTopK -> softmax), the same balance loss.
MOFME_ARMS = {
    "ffn_moe": Arm("topk", {"normalize": True, "bias": True}, _LB),
    "mofme": Arm("mofme", {}, _LB),
}
MOFME_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "num_experts": 8, "top_k": 2}
MOFME_TRAIN = {"batch_size": 32, "lr": 2e-3, "eval_every": 0, "eval_batches": 4, "final_eval_batches": 0}


def _run_mofme(**kwargs: Any) -> Rows:
    import moelab.layers.mofme  # noqa: F401  (registers layer "mofme" wherever the package lists it)

    return run_denoisers(MOFME_ARMS, **kwargs)


def _describe_mofme(r: Rows) -> str:
    data = "Fashion-MNIST" if r["_data"]["fashion"] >= 0.5 else "digits (Fashion-MNIST not installed)"
    f, m = r["ffn_moe"], r["mofme"]
    per = ", ".join(f"{c} {f[f'psnr_{c}']:.2f} / {m[f'psnr_{c}']:.2f}" for c in CORRUPTIONS)
    return (
        f"{data}, {int(r['_data']['images'])} train images; held-out PSNR FFN-MoE / MoFME "
        f"{f['val_psnr']:.2f} / {m['val_psnr']:.2f} dB (input {f['input_psnr']:.2f}; {per}); "
        f"routed-layer parameters {int(f['moe_params']):,} / {int(m['moe_params']):,} "
        f"({100 * (1 - m['moe_params'] / f['moe_params']):.0f}% fewer), whole model "
        f"{int(f['model_params']):,} / {int(m['model_params']):,}; eval forward "
        f"{f['forward_ms']:.1f} / {m['forward_ms']:.1f} ms per {LATENCY_IMAGES} images"
    )


def _requires_images() -> str | None:
    from moelab.data.mixed import fashion_available

    if fashion_available():
        return None
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return "needs Fashion-MNIST (sudo apt-get install dataset-fashion-mnist) or scikit-learn (digits)"
    return None


MOFME_REPRODUCTION = Reproduction(
    name="mofme",
    method="mofme",
    paper="MoFME (Zhang et al., AAAI 2024, arXiv 2312.16610); cheap check of PAPERS.md sec. 9, image restoration",
    claim=(
        "On a three-corruption restoration task (Gaussian noise, blur, occlusion of Fashion-MNIST), MoFME "
        f"restores images as well as an FFN-expert MoE with the same E and k (held-out PSNR no more than "
        f"{PSNR_MARGIN} dB lower) with fewer parameters in its routed layers."
    ),
    arms=MOFME_ARMS,
    model=MOFME_MODEL,
    train=MOFME_TRAIN,
    conditions=(
        Condition("val PSNR (dB): mofme - ffn_moe", diff("val_psnr", "mofme", "ffn_moe"), "higher", -PSNR_MARGIN),
        lower("moe_params", "mofme", "ffn_moe", name="routed-layer parameters"),
    ),
    describe=_describe_mofme,
    runner=_run_mofme,
    requires=_requires_images,
)
