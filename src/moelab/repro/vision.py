"""A small non-causal image classifier with routed FFNs: where Soft MoE's claim can be checked.

Soft MoE (Puigcerver et al. 2023) mixes every token of a sequence into every slot, so in a causal
language model a position's output sees later tokens and the val loss is not a language-model
loss. Its paper's claim is about image classification, where nothing is causal. This runner
trains that kind of model, at CPU scale:

- data: Fashion-MNIST (Debian ``dataset-fashion-mnist``) as 7 x 7 = 49 patch tokens of 4 x 4
  pixels (16 grey values each, scaled to [0, 1]); without the package, sklearn's digits as 4 x 4 =
  16 patches of 2 x 2 pixels (and the row says so);
- model (``PatchClassifier``): a linear patch embedding plus learned positions, ``n_layers``
  pre-norm blocks of bidirectional attention and a routed FFN (``moelab.models.lm.routed_ffn``:
  the same ``moelab.MoE`` or Soft MoE layer ``MoELM`` builds), a final norm, mean pooling and a
  linear classifier;
- every arm: the same seed (weights outside the routed FFNs, batch order), the same steps; the
  rows report the val cross-entropy (``val_loss``) and accuracy (``val_acc``) on the whole test
  split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def patch_images(images_NHW: np.ndarray, patch: int, max_value: float) -> Tensor:
    """``[N, (H/patch)(W/patch), patch*patch]`` float patches in ``[0, 1]`` (row-major)."""
    n, h, w = images_NHW.shape
    x = torch.from_numpy(np.ascontiguousarray(images_NHW, dtype=np.float32)) / max_value
    x = x.reshape(n, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch).contiguous()


def image_data() -> tuple[str, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``(name, (x, y) train, (x, y) test)``: Fashion-MNIST when installed, else sklearn digits."""
    from moelab.data.mixed import fashion_available, load_digits_images, load_fashion

    if fashion_available():
        (xtr, ytr), (xte, yte) = load_fashion()
        name, patch, top = "Fashion-MNIST", 4, 255.0
    else:
        (xtr, ytr), (xte, yte) = load_digits_images()
        name, patch, top = "digits (Fashion-MNIST not installed)", 2, 16.0
    as_y = lambda y: torch.from_numpy(np.asarray(y, dtype=np.int64))  # noqa: E731
    return name, (patch_images(xtr, patch, top), as_y(ytr)), (patch_images(xte, patch, top), as_y(yte))


class PatchClassifier(nn.Module):
    """Patches ``[B, N, p]`` -> class logits ``[B, classes]`` through blocks with routed FFNs.

    ``config`` is a ``MoELMConfig`` (its ``d_model``, ``n_layers``, ``n_heads``, router, experts
    and losses; the vocabulary is unused): each block's FFN is what ``MoELM`` would build.
    """

    def __init__(self, config: Any, patch_dim: int, num_patches: int, num_classes: int) -> None:
        super().__init__()
        from moelab.core.router import link_routers
        from moelab.models.lm import routed_ffn

        d = config.d_model
        self.embed = nn.Linear(patch_dim, d)
        self.pos = nn.Parameter(torch.randn(num_patches, d) * 0.02)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(config.n_layers))
        self.attns = nn.ModuleList(
            nn.MultiheadAttention(d, config.n_heads, batch_first=True) for _ in range(config.n_layers)
        )
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        # built last, so that under one seed every weight outside them is the same for every arm
        self.ffns = nn.ModuleList(routed_ffn(config) for _ in range(config.n_layers))
        link_routers(list(self.ffns))

    def forward(self, patches_BNP: Tensor) -> Tensor:
        from moelab.core.context import RoutingContext

        x = self.embed(patches_BNP) + self.pos
        ctx = RoutingContext(batch_shape=(x.shape[0], x.shape[1]))
        for i, (an, attn, fn, ffn) in enumerate(
            zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns, strict=True)
        ):
            h = an(x)
            x = x + attn(h, h, h, need_weights=False)[0]
            x = x + ffn(fn(x), ctx.replace(layer_index=i))
        return self.head(self.norm(x).mean(1))

    def aux_loss(self) -> Tensor:
        return sum(f.aux_loss for f in self.ffns)


def classifier_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Any]]:
    """Cross-entropy plus the routed layers' auxiliary losses."""
    x, y = batch
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    inner = getattr(model, "module", model)
    aux = inner.aux_loss()
    return ce + aux, {
        "task_loss": ce,
        "aux_loss": aux,
        "count": int(y.shape[0]),
        "tokens": int(x.shape[0] * x.shape[1]),
    }


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> dict[str, float]:
    """Cross-entropy and accuracy over all of ``(x, y)`` in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i : i + batch_size])
        loss += float(F.cross_entropy(logits, y[i : i + batch_size], reduction="sum"))
        correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
    model.train()
    return {"val_loss": loss / x.shape[0], "val_acc": correct / x.shape[0]}


def run_patch_classifiers(
    arms: dict[str, Any],
    *,
    seed: int,
    model: dict[str, Any],
    train: dict[str, Any],
    out: Path,
    progress: bool = False,
    console: Any = None,
) -> dict[str, dict[str, float]]:
    """Train one ``PatchClassifier`` per arm (``moelab.repro.rules.Arm``) on ``seed``; rows of
    ``val_loss``, ``val_acc``, ``max_over_mean`` (mean over layers, val set) per arm."""
    from moelab.data import TensorData
    from moelab.models.config import MoELMConfig
    from moelab.train.trainer import TrainConfig, Trainer

    name, (xtr, ytr), (xte, yte) = image_data()
    rows: dict[str, dict[str, float]] = {}
    for label, arm in arms.items():
        mcfg = MoELMConfig.from_dict(
            {
                **model,
                **arm.model,
                "router": arm.router,
                "router_kwargs": arm.router_kwargs,
                "aux_losses": arm.aux_losses,
            }
        )
        tcfg = TrainConfig.from_dict({**train, "seed": seed})
        torch.manual_seed(seed)  # the Trainer seeds too; this makes the build itself seeded
        net = PatchClassifier(mcfg, xtr.shape[2], xtr.shape[1], int(ytr.max()) + 1)
        trainer = Trainer(
            net,
            tcfg,
            None,
            loss_fn=classifier_loss,
            data=TensorData(train=(xtr, ytr), val=(xte, yte)),
            progress=progress,
            console=console,
            description=f"{label} s{seed}",
        )
        res = trainer.train()
        rows[label] = {
            **evaluate(trainer.model, xte, yte),
            "max_over_mean": float(
                np.nanmean([r["max_over_mean"] for r in res.routing]) if res.routing else np.nan
            ),
        }
    rows["_data"] = {"images": float(xtr.shape[0]), "fashion": float(name == "Fashion-MNIST")}
    return rows
