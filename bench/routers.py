"""Router cost: every registered router, per 1k tokens and as a fraction of the MoE layer's time.

    python -m bench.routers [--json PATH] [--tokens 4096]

For the coarse (d=1024, E=8, k=2) and fine (d=1024, E=64, k=8) configurations of
``bench/moe_layer.py``, each router in ``moelab.list_methods("router")`` is built by name with its
defaults and timed on the same ``T`` tokens: forward (the ``Routing``) and forward + backward (a
scalar of the combine weights and the router's own aux terms, back to the router's parameters).
The denominators are a whole ``moelab.MoE`` layer with the ``topk`` router and ``backend="auto"``,
and the ``topk`` router itself (``x topk``: each router's forward + backward time over topk's),
timed in the same interleaved rounds. New routers appear here as soon as they are registered; one
that cannot be built with defaults, or fails, gets a row saying why instead of a time. Each router
is timed as the first of two linked layers (``_linked_router``): what it costs inside ``MoELM``.

Two more tables: routed *layers* that replace the MoE layer (Soft MoE), timed whole against the
``topk`` MoE layer at the same expert compute (``slots_per_expert = k S / E``: ``E p = k S``
slots per sequence of ``S`` tokens, the rows top-k sends to experts); and the ERC loss, whose cost must not grow
with ``T`` (its ``E^2`` proxy activations do not depend on the batch): the loss alone and the
layer with and without it at several ``T``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import moelab
from moelab.core import RoutingContext

from .common import Stopwatch, interleaved, machine_info, md_table, median, set_threads, write_json

CONFIGS = {"coarse": dict(d=1024, h=2816, E=8, k=2), "fine": dict(d=1024, h=512, E=64, k=8)}


def _ctx(t: int, seq: int, g: torch.Generator) -> RoutingContext:
    """The context of ``t`` tokens in sequences of ``seq`` (``seq`` must divide ``t``), with token
    ids (pre-gating) and two token types (modality routers)."""
    return RoutingContext(
        batch_shape=(t // seq, seq),
        layer_index=0,
        token_ids=torch.randint(0, 256, (t,), generator=g),
        token_types=torch.randint(0, 2, (t,), generator=g),
        step=0,
    )


# Routers whose method fixes k (MixER is hard top-1): timed at that k, which the table says.
FIXED_TOP_K = {"mixer": 1}


def _linked_router(name: str, d: int, e: int, k: int):
    """Router ``name`` as the first of two linked MoE layers (what it is inside ``MoELM``): RMoE
    owns the shared GRU, Read-ME runs its pre-gate, ReXMoE scores both layers' pools. The layers'
    experts are tiny: only the router is timed."""
    k = FIXED_TOP_K.get(name, k)
    layers = [moelab.MoE(d, e, k, hidden=8, router=name) for _ in range(2)]
    moelab.link_routers(layers)
    return layers[0].router


def _router_step(router, x, ctx_fn, train: bool):
    def once():
        for p in router.parameters():
            p.grad = None
        ctx = ctx_fn()
        if not train:
            with torch.no_grad(), Stopwatch() as sw:
                router(x, ctx)
            return (sw.s,)
        with Stopwatch() as fw:
            r = router(x, ctx)
        with Stopwatch() as bw:
            loss = (r.weight.float() * torch.linspace(0.5, 1.5, r.weight.shape[0])).sum()
            for v in r.aux.values():
                loss = loss + v.float().sum()
            if loss.requires_grad:
                loss.backward()
        return (fw.s, fw.s + bw.s)

    return once


def bench_config(name: str, tokens: int, rounds: int, log=print) -> list[dict]:
    cfg = CONFIGS[name]
    d, e, k = cfg["d"], cfg["E"], cfg["k"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g)
    ctx_fn = lambda: _ctx(tokens, min(tokens, 512), torch.Generator().manual_seed(1))  # noqa: E731
    torch.manual_seed(0)
    layer = moelab.MoE(d, num_experts=e, top_k=k, hidden=cfg["h"], router="topk", backend="auto")
    xl = x.clone().requires_grad_(True)
    gy = torch.randn(tokens, d, generator=g)

    def layer_once():
        xl.grad = None
        for p in layer.parameters():
            p.grad = None
        with Stopwatch() as fw:
            y = layer(xl, ctx_fn())
        with Stopwatch() as bw:
            (y * gy).sum().add(layer.aux_loss).backward()
        return (fw.s, fw.s + bw.s)

    fns = {"moe_layer": layer_once}
    rows, failed = [], []
    for info in moelab.list_methods("router"):
        try:
            torch.manual_seed(0)
            router = _linked_router(info.name, d, e, k)
            router.train()
            fn = _router_step(router, x, ctx_fn, train=True)
            fn()  # warm-up, and proof that it runs with defaults
            fns[info.name] = fn
        except Exception as exc:  # a router that needs arguments we cannot guess
            failed.append(
                {"config": name, "router": info.name, "error": f"{type(exc).__name__}: {exc}"[:200]}
            )
    layer_once()  # warm-up
    times = interleaved(fns, rounds)
    lay_f = median([t[0] for t in times["moe_layer"]])
    lay_fb = median([t[1] for t in times["moe_layer"]])
    topk_fb = median([t[1] for t in times["topk"]]) if "topk" in times else float("nan")
    for rname, ts in times.items():
        if rname == "moe_layer":
            continue
        f, fb = median([t[0] for t in ts]), median([t[1] for t in ts])
        rows.append(
            {
                "config": name,
                "router": rname if rname not in FIXED_TOP_K else f"{rname} (k={FIXED_TOP_K[rname]})",
                "tokens": tokens,
                "fwd_ms_per_1k": round(f * 1e3 * 1000 / tokens, 4),
                "fwdbwd_ms_per_1k": round(fb * 1e3 * 1000 / tokens, 4),
                "fwd_fraction_of_layer": round(f / lay_f, 4),
                "fwdbwd_fraction_of_layer": round(fb / lay_fb, 4),
                "fwdbwd_over_topk": round(fb / topk_fb, 3),
                "layer_fwd_ms": round(lay_f * 1e3, 2),
                "layer_fwdbwd_ms": round(lay_fb * 1e3, 2),
            }
        )
    log(format_rows(rows, failed))
    return rows + failed


def bench_layers(name: str, tokens: int, rounds: int, log=print) -> list[dict]:
    """Registered routed layers other than ``moe`` (Soft MoE), forward + backward, over the
    ``topk`` MoE layer of the same experts. Soft MoE gets ``slots_per_expert = k S / E``, i.e.
    ``E p = k S`` slots per sequence of ``S`` tokens: as many expert rows as top-k."""
    cfg = CONFIGS[name]
    d, e, k, h = cfg["d"], cfg["E"], cfg["k"], cfg["h"]
    seq = min(tokens, 512)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens // seq, seq, d, generator=g)
    gy = torch.randn(tokens // seq, seq, d, generator=g)

    def timed(layer):
        def once():
            for prm in layer.parameters():
                prm.grad = None
            with Stopwatch() as fw:
                y = layer(x)
            with Stopwatch() as bw:
                (y * gy).sum().add(layer.aux_loss).backward()
            return (fw.s, fw.s + bw.s)

        return once

    torch.manual_seed(0)
    fns = {"moe_topk": timed(moelab.MoE(d, e, k, hidden=h, router="topk"))}
    rows, failed = [], []
    for info in moelab.list_methods("layer"):
        if info.name == "moe":
            continue
        try:
            slots = max(1, k * seq // e)
            layer = info.obj(d, e, k, h, router_kwargs={"slots_per_expert": slots})
            fn = timed(layer)
            fn()
            fns[info.name] = fn
        except Exception as exc:  # a layer that needs arguments we cannot guess
            failed.append({"config": name, "layer": info.name, "error": f"{type(exc).__name__}: {exc}"[:200]})
    fns["moe_topk"]()
    times = interleaved(fns, rounds)
    base = median([t[1] for t in times["moe_topk"]])
    for lname, ts in times.items():
        if lname == "moe_topk":
            continue
        fb = median([t[1] for t in ts])
        rows.append(
            {
                "config": name,
                "layer": lname,
                "tokens": tokens,
                "fwdbwd_ms_per_1k": round(fb * 1e3 * 1000 / tokens, 4),
                "fwdbwd_over_moe_topk": round(fb / base, 3),
                "moe_topk_fwdbwd_ms": round(base * 1e3, 2),
            }
        )
    body = [
        [r["config"], r["layer"], r["fwdbwd_ms_per_1k"], f"{r['fwdbwd_over_moe_topk']:.2f}"] for r in rows
    ]
    body += [[r["config"], r["layer"], "-", r["error"]] for r in failed]
    log(md_table(["config", "layer", "fwd+bwd ms / 1k tok", "x topk MoE layer"], body))
    return rows + failed


def bench_erc(name: str, token_counts: tuple[int, ...], rounds: int, log=print) -> list[dict]:
    """The ERC loss's cost against ``T``: the loss alone (forward + backward) and the ``topk`` MoE
    layer with and without it, at each ``T``."""
    cfg = CONFIGS[name]
    d, e, k, h = cfg["d"], cfg["E"], cfg["k"], cfg["h"]
    torch.manual_seed(0)
    plain = moelab.MoE(d, e, k, hidden=h, router="topk", aux_losses={"load_balance": 1e-2})
    with_erc = moelab.MoE(d, e, k, hidden=h, router="topk", aux_losses={"load_balance": 1e-2, "erc": 0.1})
    with_erc.load_state_dict(plain.state_dict())
    erc = moelab.losses.get_loss("erc")
    rows = []
    for t in token_counts:
        g = torch.Generator().manual_seed(t)
        x, gy = torch.randn(t, d, generator=g), torch.randn(t, d, generator=g)

        def layer_step(layer, x=x, gy=gy):
            def once():
                for prm in layer.parameters():
                    prm.grad = None
                with Stopwatch() as sw:
                    (layer(x) * gy).sum().add(layer.aux_loss).backward()
                return (sw.s,)

            return once

        def loss_alone():
            for prm in with_erc.parameters():
                prm.grad = None
            with Stopwatch() as sw:
                erc(None, layer=with_erc).backward()
            return (sw.s,)

        fns = {"plain": layer_step(plain), "with_erc": layer_step(with_erc), "erc_alone": loss_alone}
        for fn in fns.values():
            fn()
        ts = {n: median([v[0] for v in vs]) for n, vs in interleaved(fns, rounds).items()}
        rows.append(
            {
                "config": name,
                "tokens": t,
                "erc_loss_ms": round(ts["erc_alone"] * 1e3, 2),
                "layer_ms": round(ts["plain"] * 1e3, 2),
                "layer_with_erc_ms": round(ts["with_erc"] * 1e3, 2),
                "erc_fraction_of_layer": round((ts["with_erc"] - ts["plain"]) / ts["plain"], 4),
            }
        )
    body = [
        [
            r["tokens"],
            r["erc_loss_ms"],
            r["layer_ms"],
            r["layer_with_erc_ms"],
            f"{100 * r['erc_fraction_of_layer']:.1f}%",
        ]
        for r in rows
    ]
    log(md_table(["T", "ERC loss fwd+bwd ms", "layer fwd+bwd ms", "layer + ERC ms", "ERC share"], body))
    return rows


def format_rows(rows: list[dict], failed: list[dict] | None = None) -> str:
    body = [
        [
            r["config"], r["router"], r["fwd_ms_per_1k"], r["fwdbwd_ms_per_1k"],
            f"{100 * r['fwd_fraction_of_layer']:.2f}%", f"{100 * r['fwdbwd_fraction_of_layer']:.2f}%",
            f"{r['fwdbwd_over_topk']:.2f}",
        ]
        for r in rows
        if "error" not in r
    ]  # fmt: skip
    body += [[r["config"], r["router"], "-", "-", r["error"], "", ""] for r in (failed or [])]
    header = [
        "config",
        "router",
        "fwd ms / 1k tok",
        "fwd+bwd ms / 1k tok",
        "% of layer fwd",
        "% of layer fwd+bwd",
        "fwd+bwd x topk",
    ]
    return md_table(header, body)


def run(tokens: int = 4096, rounds: int = 3, configs: list[str] | None = None, log=print) -> list[dict]:
    rows = []
    for name in configs or list(CONFIGS):
        log(f"\n## routers, {name}: T={tokens}, {CONFIGS[name]}")
        rows += bench_config(name, tokens, rounds, log=log)
        log(f"\n## routed layers, {name}: T={tokens} in sequences of {min(tokens, 512)}")
        rows += [{"table": "layers", **r} for r in bench_layers(name, tokens, rounds, log=log)]
    erc_config = (configs or list(CONFIGS))[-1]
    log(f"\n## ERC loss against T, {erc_config}: {CONFIGS[erc_config]}")
    rows += [{"table": "erc", **r} for r in bench_erc(erc_config, (256, 1024, 4096), rounds, log=log)]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default=None, help="comma-separated subset of coarse,fine")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    rows = run(args.tokens, args.rounds, args.configs.split(",") if args.configs else None)
    if args.json is not None:
        write_json(args.json, {"machine": machine_info(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
