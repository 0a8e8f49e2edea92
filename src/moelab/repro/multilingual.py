"""The ``multilingual_u_shape`` reproduction: a bilingual byte-level MoELM on verse-aligned Bibles.

Needs Debian's SWORD Bibles (``apt-get install -y diatheke sword-text-web sword-text-sparv``);
``bibles_missing()`` says what is missing before anything trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelab.data.bibles import bibles_missing

__all__ = ["bibles_missing", "run_bilingual"]


def run_bilingual(
    arm: Any,
    pairs: int,
    *,
    seed: int,
    model: dict[str, Any],
    train: dict[str, Any],
    out: Path,
    progress: bool = False,
    console: Any = None,
) -> dict[str, dict[str, float]]:
    """Train a byte-level MoELM (``arm``: router, kwargs, losses, model overrides) on English +
    Spanish Bible verses, then measure the entropy-normalised JS divergence of each MoE layer
    between ``pairs`` held-out parallel verses. Returns the reproduction's rows."""
    from moelab.analysis.crosslingual import (
        crosslingual_divergence,
        parallel_verses,
        split_parallel,
        write_bilingual_corpus,
    )
    from moelab.analysis.runner import sentence_routings
    from moelab.data import ByteTokenizer
    from moelab.models.config import MoELMConfig
    from moelab.train.trainer import TrainConfig, Trainer

    verses = parallel_verses()  # DiathekeError (with the apt packages to install) when absent
    train_v, held = split_parallel(verses, 50)
    data_dir = write_bilingual_corpus(train_v, out / "data")
    mcfg = MoELMConfig.from_dict(
        {
            **model,
            **arm.model,
            "router": arm.router,
            "router_kwargs": arm.router_kwargs,
            "aux_losses": arm.aux_losses,
        }
    )
    tcfg = TrainConfig.from_dict({**train, "seed": seed, "data": str(data_dir), "tokenizer": "bytes"})
    trainer = Trainer(
        mcfg, tcfg, None, progress=progress, console=console, description=f"bilingual seed {seed}"
    )
    res = trainer.train()
    test = held[:pairs]
    tok = ByteTokenizer()
    max_len = mcfg.max_seq_len
    ra = sentence_routings(trainer.model, tok, [en for _, en, _ in test], max_len)
    rb = sentence_routings(trainer.model, tok, [es for _, _, es in test], max_len)
    rows = crosslingual_divergence(ra, rb, n_boot=200, seed=seed)
    return {
        "bilingual": {
            "val_loss": res.val_loss,
            "layers": float(len(rows)),
            **{f"layer{i}": float(r["divergence"]) for i, r in enumerate(rows)},
        }
    }
