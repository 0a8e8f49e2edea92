"""Training-step throughput: ``moelab.models.MoELM`` against transformers' ``OlmoeForCausalLM``.

    python -m bench.train_step [--json PATH] [--rounds 3]

The same model on both sides (the issue's config: d=512, 8 layers, E=8, k=2, seq 512, batch 8):
8 heads of 64, every layer MoE, expert width 1024 (MoELM's default ``4 d / k``), byte vocabulary
(256, MoELM's default tokenizer), untied embeddings, OLMoE's routing (softmax top-2 without
renormalisation) and one auxiliary loss, the Switch load-balance loss at 0.01 (OLMoE's
``router_aux_loss_coef``). One step = forward, loss, backward, AdamW step, zero_grad. Reported:
tokens/s (``batch * seq / median step time``) after a warm-up step, the implementations timed in
interleaved rounds.

Rows: moelab with ``backend="auto"`` (and ``"sorted"`` for reference), OLMoE with its default
experts implementation (``grouped_mm``) and with ``eager``. Architectural differences that stay:
OLMoE normalises q and k (QK-norm: two extra RMSNorms per layer), MoELM does not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .common import Stopwatch, interleaved, machine_info, md_table, median, set_threads, write_json

CONFIG = dict(
    d_model=512, n_layers=8, n_heads=8, num_experts=8, top_k=2, seq=512, batch=8, vocab=256, hidden=1024
)


# moelab_sorted is left out by default to keep `make bench` under ten minutes (--impls adds it).
DEFAULT_IMPLS = ("moelab_auto", "olmoe_grouped_mm", "olmoe_eager")


def build_moelab(backend: str):
    from moelab.models import MoELM, MoELMConfig

    c = CONFIG
    cfg = MoELMConfig(
        vocab_size=c["vocab"],
        d_model=c["d_model"],
        n_layers=c["n_layers"],
        n_heads=c["n_heads"],
        max_seq_len=c["seq"],
        moe_every=1,
        num_experts=c["num_experts"],
        top_k=c["top_k"],
        expert_hidden=c["hidden"],
        router="topk",
        router_kwargs={"normalize": False},
        aux_losses={"load_balance": 1e-2},
        backend=backend,
        tie_embeddings=False,
    )
    return MoELM(cfg)


def build_olmoe(experts_impl: str):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    c = CONFIG
    cfg = OlmoeConfig(
        vocab_size=c["vocab"],
        hidden_size=c["d_model"],
        intermediate_size=c["hidden"],
        num_hidden_layers=c["n_layers"],
        num_attention_heads=c["n_heads"],
        num_key_value_heads=c["n_heads"],
        num_experts=c["num_experts"],
        num_experts_per_tok=c["top_k"],
        max_position_embeddings=c["seq"],
        norm_topk_prob=False,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    cfg._experts_implementation = experts_impl
    return OlmoeForCausalLM(cfg)


def step_fn(model, ids):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def once():
        with Stopwatch() as sw:
            out = model(ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (sw.s,)

    return once


def run(rounds: int = 3, impls: list[str] | None = None, log=print) -> list[dict]:
    c = CONFIG
    ids = torch.randint(0, c["vocab"], (c["batch"], c["seq"]), generator=torch.Generator().manual_seed(0))
    builders = {
        "moelab_auto": lambda: build_moelab("auto"),
        "moelab_sorted": lambda: build_moelab("sorted"),
        "olmoe_grouped_mm": lambda: build_olmoe("grouped_mm"),
        "olmoe_eager": lambda: build_olmoe("eager"),
    }
    fns, params, errors = {}, {}, []
    for name, build in builders.items():
        if name not in (impls or DEFAULT_IMPLS):
            continue
        try:
            torch.manual_seed(0)
            model = build()
        except Exception as exc:  # e.g. transformers missing, or MoELM not importable
            errors.append({"impl": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        params[name] = sum(p.numel() for p in model.parameters())
        fns[name] = step_fn(model, ids)
        fns[name]()  # warm-up
    times = interleaved(fns, rounds)
    tokens = c["batch"] * c["seq"]
    rows = []
    for name, ts in times.items():
        s = median([t[0] for t in ts])
        rows.append(
            {
                "impl": name,
                "step_ms": round(s * 1e3, 1),
                "tokens_per_s": round(tokens / s, 1),
                "params": params[name],
            }
        )
    base = next((r for r in rows if r["impl"] == "olmoe_grouped_mm"), None)
    best_hf = max((r["tokens_per_s"] for r in rows if r["impl"].startswith("olmoe")), default=None)
    for r in rows:
        r["x_olmoe_default"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3) if base else None
        r["x_best_olmoe"] = round(r["tokens_per_s"] / best_hf, 3) if best_hf else None
    log(format_rows(rows + errors))
    return rows + errors


def format_rows(rows: list[dict]) -> str:
    body = [
        [
            r["impl"],
            r.get("step_ms"),
            r.get("tokens_per_s"),
            r.get("params"),
            r.get("x_olmoe_default"),
            r.get("x_best_olmoe"),
        ]
        if "error" not in r
        else [r["impl"], "-", "-", "-", r["error"], ""]
        for r in rows
    ]
    return md_table(["impl", "step ms", "tokens/s", "params", "x OLMoE (grouped_mm)", "x best OLMoE"], body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--impls", default=None, help="comma-separated subset")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    log = print
    log(f"## train step: {CONFIG}")
    rows = run(args.rounds, args.impls.split(",") if args.impls else None, log=log)
    if args.json is not None:
        write_json(args.json, {"machine": machine_info(), "config": CONFIG, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
