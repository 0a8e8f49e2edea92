"""Decoding speed of depth-routed MoELMs against a dense MoELM of the same width, in one run.

    python -m bench.generate [--d 256] [--layers 8] [--train-steps 150] [--prompt 32] [--new 96]
                             [--rounds 5] [--threads N] [--json PATH] [--md PATH]

Models (same width ``d``, heads and FFN width; dense FFNs everywhere):

- ``dense``: ``layers`` blocks;
- ``mod``: the same blocks, mixture-of-depths at C = 12.5% on every other block (paper setting);
- ``mor`` (when registered): mixture-of-recursions, expert choice, N_r = 3, middle-cycle sharing,
  at equal parameters (``layers`` unique blocks; effective depth 2 + 3 (layers - 2)) and at equal
  effective depth (2 + (layers - 2) / 3 unique blocks: a third of the middle parameters, the
  paper's comparison).

Each model first trains ``train-steps`` steps on the default corpus (stdlib sources), so that its
routers' causal decisions are calibrated (an untrained MoD router keeps about half the tokens, not
12.5%). Then ``moelab.generate`` decodes ``new`` tokens greedily after a ``prompt``-token prompt,
batch 1, with the KV cache; rounds interleave the models. Reported per model: decode tokens/s
(median over rounds) and its ratio to dense, forward FLOPs per decoded token (``moelab.core.flops``:
what the layers actually ran), parameters, and the val loss after the short training. Writes JSON
(with the machine: CPU model, threads, load) and a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from moelab import registry
from moelab.core.context import RoutingContext, Session
from moelab.core.flops import model_flops
from moelab.models import MoELM, MoELMConfig
from moelab.models.generate import generate
from moelab.train import TrainConfig, Trainer

from .common import interleaved, machine_info, median, set_threads, write_json


def model_specs(layers: int) -> dict[str, dict]:
    specs = {"dense": {}, "mod": {"depth": "mod", "depth_kwargs": {"capacity": 0.125, "every": 2}}}
    if "mor" in registry.names("depth"):
        specs["mor_equal_params"] = {"depth": "mor", "depth_kwargs": {"num_recursions": 3}}
        middle = max(1, round((layers - 2) / 3))
        specs["mor_equal_depth"] = {"depth": "mor", "depth_kwargs": {"num_recursions": 3}, "n_layers": 2 + middle}
    return specs


@torch.no_grad()
def decode_flops(model: MoELM, prompt: torch.Tensor, new: int) -> float:
    """Mean forward FLOPs per decoded token (greedy, cached), the output projection included."""
    model.eval()
    s = Session()
    logits = model(prompt, ctx=RoutingContext(session=s)).logits[:, -1]
    total = 0.0
    head = 2.0 * model.config.d_model * model.config.vocab_size
    for _ in range(new):
        nxt = logits.argmax(-1, keepdim=True)
        logits = model(nxt, ctx=RoutingContext(session=s)).logits[:, -1]
        total += model_flops(model) + head
    return total / max(new, 1)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    base = dict(
        d_model=args.d,
        n_layers=args.layers,
        n_heads=args.heads,
        moe_every=10_000,  # dense FFNs: the comparison is about depth
        max_seq_len=max(args.seq_len, args.prompt + args.new),
    )
    models, rows = {}, []
    for name, spec in model_specs(args.layers).items():
        cfg = MoELMConfig(**{**base, **spec})
        tcfg = TrainConfig(
            steps=args.train_steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=3e-3,
            warmup_steps=min(20, args.train_steps),
            eval_every=0,
            eval_batches=4,
            final_eval_batches=4,
            seed=0,
            threads=threads,
        )
        trainer = Trainer(cfg, tcfg, None, progress=False)
        res = trainer.train()
        trainer.close()
        torch.set_num_threads(threads)
        models[name] = (trainer.model.eval(), res)
    prompt = torch.randint(0, 256, (1, args.prompt), generator=torch.Generator().manual_seed(0))

    def timer(model: MoELM):
        def run() -> tuple[float]:
            t0 = time.perf_counter()
            generate(model, prompt, args.new)
            return (time.perf_counter() - t0,)

        return run

    timings = interleaved({n: timer(m) for n, (m, _) in models.items()}, args.rounds)
    machine = machine_info()
    dense_tps = None
    for name, (model, res) in models.items():
        tps = args.new / median([t[0] for t in timings[name]])
        dense_tps = tps if name == "dense" else dense_tps
        rows.append(
            {
                "model": name,
                "n_layers": model.config.n_layers,
                "depth": model.config.depth,
                "depth_kwargs": model.config.depth_kwargs,
                "params": sum(p.numel() for p in model.parameters()),
                "decode_tokens_per_s": tps,
                "speed_vs_dense": tps / dense_tps if dense_tps else float("nan"),
                "decode_flops_per_token": decode_flops(model, prompt, args.new),
                "val_loss": res.val_loss,
            }
        )
    dense_flops = rows[0]["decode_flops_per_token"]
    lines = [
        f"Greedy decoding, batch 1, prompt {args.prompt}, {args.new} new tokens, KV cache; d={args.d}, "
        f"{args.layers} layers, dense FFNs; each model trained {args.train_steps} steps first. "
        f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, load "
        f"{machine['loadavg_1_5_15']}, {machine['date']}",
        "",
        "| model | blocks | params | decode tok/s | vs dense | MFLOP / decoded token | vs dense | val loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n_layers']} | {r['params'] / 1e6:.2f}M | {r['decode_tokens_per_s']:.0f} | "
            f"{r['speed_vs_dense']:.2f}x | {r['decode_flops_per_token'] / 1e6:.2f} | "
            f"{r['decode_flops_per_token'] / dense_flops:.2f}x | {r['val_loss']:.3f} |"
        )
    print("\n".join(lines))
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine,
                "args": vars(args) | {"json": str(args.json), "md": str(args.md)},
                "rows": rows,
            },
        )
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
