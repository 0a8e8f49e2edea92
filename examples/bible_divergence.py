"""Cross-lingual routing divergence of a small bilingual MoELM, on the English and Spanish Bibles.

    apt-get install -y diatheke sword-text-web sword-text-sparv     # Debian's SWORD Bibles
    .venv/bin/python examples/bible_divergence.py                   # about 5 min on an idle 2-core CPU

1. Reads the World English Bible (``engWEB2015eb``) and the Reina-Valera 1909 (``spaRV1909eb``)
   verse by verse with diatheke and aligns them by reference (``moelab.analysis.parallel_verses``).
2. Holds out every 50th verse pair (never trained on); writes the rest as one text file per book
   and language, so that the corpus' file-level train/val split keeps both languages in training.
3. Trains a byte-level ``MoELM`` (4 MoE layers, 8 experts, top-2) with ``moelab.train.Trainer``.
4. Runs ``moelab analyze`` on the trained model with the held-out pairs as ``--parallel`` data, and
   computes the same divergence for two controls: the untrained model (same seed, step 0) and the
   trained model on *mismatched* pairs (English verse i against Spanish verse i+1).
5. Writes ``docs/figures/analysis_bible_divergence.png`` and ``docs/figures/analysis_bible.json``
   (the numbers quoted in ``docs/analysis.md``); the full report goes to ``runs/bible/report``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moelab.analysis.crosslingual import (
    crosslingual_divergence,
    parallel_verses,
    split_parallel,
    write_bilingual_corpus,
)
from moelab.analysis.runner import sentence_routings
from moelab.cli.analyze import analyze
from moelab.data import ByteTokenizer
from moelab.models import MoELM, MoELMConfig
from moelab.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bible")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--pairs", type=int, default=256, help="held-out verse pairs for the divergence")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: best on a shared machine)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    verses = parallel_verses()
    train, held = split_parallel(verses, 50)
    print(f"{len(verses)} aligned verse pairs; {len(train)} for training, {len(held)} held out")

    data_dir = write_bilingual_corpus(train, out / "data")
    test = held[: args.pairs]
    en_file, es_file = out / "test_en.txt", out / "test_es.txt"
    en_file.write_text("\n".join(e for _, e, _ in test) + "\n", encoding="utf-8")
    es_file.write_text("\n".join(s for _, _, s in test) + "\n", encoding="utf-8")
    # held-out text of both languages for the rest of the report (load, SRP, caches)
    mixed = out / "test_mixed.txt"
    mixed.write_text("\n".join(x for _, e, s in held for x in (e, s)) + "\n", encoding="utf-8")

    model_cfg = MoELMConfig(
        d_model=128, n_layers=4, n_heads=4, max_seq_len=256, num_experts=8, top_k=2, router="topk"
    )
    train_cfg = TrainConfig(
        steps=args.steps,
        batch_size=16,
        seq_len=128,
        lr=3e-3,
        warmup_steps=50,
        eval_every=200,
        eval_batches=8,
        seed=args.seed,
        data=str(data_dir),
        tokenizer="bytes",
        threads=args.threads,
    )
    # progress: a live bar on a terminal, one line per evaluation in a log file
    trainer = Trainer(model_cfg, train_cfg, out / "train", description="bilingual MoELM")
    untrained = MoELM(trainer.model_config)
    untrained.load_state_dict(trainer.model.state_dict())  # step 0 weights, for the control
    result = trainer.train()
    print(f"trained {args.steps} steps in {result.train_time_s:.0f}s: val loss {result.val_loss:.3f}")
    final = out / "train" / "final"

    files = analyze(
        final,
        out / "report",
        text=[str(mixed)],
        parallel=(str(en_file), str(es_file)),
        seq_len=256,
        num_seqs=32,
        n_boot=args.n_boot,
        seed=args.seed,
        max_pairs=args.pairs,
        force=True,  # a rerun replaces the previous report
    )
    report = json.loads(files["json"].read_text())
    trained_rows = report["divergence"]

    tok = ByteTokenizer()
    en_s, es_s = [e for _, e, _ in test], [s for _, _, s in test]
    ra0 = sentence_routings(untrained, tok, en_s, 256)
    rb0 = sentence_routings(untrained, tok, es_s, 256)
    untrained_rows = crosslingual_divergence(ra0, rb0, n_boot=args.n_boot, seed=args.seed)
    model = MoELM.from_pretrained(final)
    ra = sentence_routings(model, tok, en_s, 256)
    rb = sentence_routings(model, tok, es_s, 256)
    shifted = {k: v[1:] + v[:1] for k, v in rb.items()}  # English i against Spanish i+1
    mismatched_rows = crosslingual_divergence(ra, shifted, n_boot=args.n_boot, seed=args.seed)
    en_shift = {k: v[1:] + v[:1] for k, v in ra.items()}  # English i against English i+1
    same_lang_rows = crosslingual_divergence(ra, en_shift, n_boot=args.n_boot, seed=args.seed)

    figs = Path(args.figures)
    figs.mkdir(parents=True, exist_ok=True)
    _plot(
        trained_rows, untrained_rows, mismatched_rows, same_lang_rows, figs / "analysis_bible_divergence.png"
    )
    summary = {
        "modules": ["engWEB2015eb", "spaRV1909eb"],
        "aligned_pairs": len(verses),
        "train_pairs": len(train),
        "test_pairs": len(test),
        "model": model_cfg.to_dict(),
        "train": {
            "steps": args.steps,
            "batch_size": 16,
            "seq_len": 128,
            "val_loss": result.val_loss,
            "train_time_s": result.train_time_s,
        },
        "divergence": {
            "normalizer": "JS / H(mixture)",
            "n_boot": args.n_boot,
            "trained_parallel": trained_rows,
            "untrained_parallel": untrained_rows,
            "trained_mismatched": mismatched_rows,
            "trained_english_vs_english": same_lang_rows,
        },
        "report": {k: v for k, v in report.items() if k in ("layers", "metrics", "srp", "arank")},
        "wall_time_s": time.perf_counter() - t0,
    }
    (figs / "analysis_bible.json").write_text(json.dumps(summary, indent=1, default=float))
    for name, rows in (
        ("trained, parallel", trained_rows),
        ("untrained, parallel", untrained_rows),
        ("trained, mismatched", mismatched_rows),
        ("trained, en vs en", same_lang_rows),
    ):
        print(
            f"{name:22s}", "  ".join(f"{r['divergence']:.4f} [{r['low']:.4f}, {r['high']:.4f}]" for r in rows)
        )
    print(f"report: {files['markdown']}; figure: {figs / 'analysis_bible_divergence.png'}")


def _plot(trained, untrained, mismatched, same_lang, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for rows, label in (
        (trained, "trained: en vs es, parallel"),
        (mismatched, "trained: en vs es, mismatched"),
        (same_lang, "trained: en vs en, mismatched"),
        (untrained, "untrained: en vs es, parallel"),
    ):
        x = list(range(len(rows)))
        ax.plot(x, [r["divergence"] for r in rows], marker="o", label=label)
        ax.fill_between(x, [r["low"] for r in rows], [r["high"] for r in rows], alpha=0.2)
    ax.set_xticks(range(len(trained)), [str(i) for i in range(len(trained))])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("JS / H(mixture)")
    ax.set_title("routing divergence between Bible verses (95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
