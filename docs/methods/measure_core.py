"""Small, reproducible measurements behind the "Measured" sections of docs/methods/*.md.

    .venv/bin/python docs/methods/measure_core.py            # all, ~1-2 minutes on 2 cores
    .venv/bin/python docs/methods/measure_core.py bias lb    # a subset

Writes docs/methods/measured_core.json and prints markdown tables. Every number is from
synthetic data with fixed seeds; nothing here is a benchmark of speed except the last table
(which is indicative only: timings on a shared machine vary).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import moelab
from moelab.losses import load_balance, z_loss
from moelab.routers import ExpertChoiceRouter, SigmoidTopKRouter, TopKRouter

torch.set_num_threads(2)
OUT = Path(__file__).with_name("measured_core.json")


def skewed_input(t: int, d: int, seed: int, skew: float = 1.5) -> torch.Tensor:
    """Tokens around one fixed offset (the same for every seed): a router at init prefers a few
    experts for all of them. ``seed`` only changes the per-token noise."""
    offset = torch.randn(d, generator=torch.Generator().manual_seed(12345))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, d, generator=g) + skew * offset


def max_over_mean(load: torch.Tensor) -> float:
    load = load.float()
    return float(load.max() / load.mean())


# --------------------------------------------------------------------------- aux-loss-free bias
def measure_bias(steps=(0, 50, 100, 200, 400, 800), rates=(1e-3, 1e-2)) -> dict:
    """sigmoid_topk with frozen router weights: only the expert bias moves (sign rule)."""
    out = {}
    d, e, k, t = 32, 16, 2, 1024
    for rate in rates:
        torch.manual_seed(0)
        r = SigmoidTopKRouter(d, e, top_k=k, bias_update_rate=rate).train()
        rows = {}
        for step in range(max(steps) + 1):
            x = skewed_input(t, d, seed=1000 + step)
            routing = r(x)
            if step in steps:
                rows[step] = round(max_over_mean(routing.tokens_per_expert()), 3)
            r.step_end()
        out[str(rate)] = rows
    return out


# ---------------------------------------------------------------------------- topk specifics
def measure_topk() -> dict:
    """GShard's sampled second expert: observed keep rate vs min(1, 2*g2); Switch k=1: router
    gradient from the task loss with and without renormalising the single gate."""
    from moelab.routers import sample_second_expert

    n = 50000
    grid = [0.05, 0.15, 0.3, 0.45]
    g2 = torch.tensor(grid).repeat_interleave(n)
    keep = sample_second_expert(torch.stack([1 - g2, g2], 1), 0.5, generator=torch.Generator().manual_seed(0))
    rates = keep[:, 1].float().view(len(grid), n).mean(1).tolist()
    sampling = {
        f"g2={g}": {"expected": round(min(1.0, 2 * g), 3), "observed": round(r, 4)}
        for g, r in zip(grid, rates, strict=True)
    }
    grads = {}
    for normalize in (False, True):
        torch.manual_seed(0)
        moe = moelab.MoE(16, num_experts=4, top_k=1, router="topk", router_kwargs={"normalize": normalize})
        moe(torch.randn(64, 16)).square().mean().backward()
        grads[f"normalize={normalize}"] = float(moe.router.weight.grad.norm())
    return {"gshard_sampling": sampling, "switch_k1_router_grad_norm": grads}


# ---------------------------------------------------------------------------- capacity drops
def measure_capacity(cfs=(0.5, 1.0, 1.25, 1.5, 2.0, 3.0)) -> dict:
    """topk k=2, E=8, T=1024: drop rate vs capacity factor, the router-probability mass lost and
    the share of tokens that lost their first choice, per drop policy (batch_priority serves every
    first choice before any second; probs drops the lowest gates globally; position drops late tokens)."""
    d, e, k, t = 32, 8, 2, 1024
    out = {}
    for skew in (0.0, 1.5):
        x = skewed_input(t, d, seed=7, skew=skew)
        rows = {}
        for cf in cfs:
            row = {}
            for policy in ("batch_priority", "probs", "position"):
                torch.manual_seed(0)
                r = TopKRouter(d, e, top_k=k, capacity_factor=cf, drop_policy=policy).train()
                routing = r(x)
                full, first = routing.probs.topk(k, -1)
                full = full / full.sum(-1, keepdim=True)  # renormalised gates of all requests
                kept_mass = float(routing.weight.sum() / full.sum())
                kept = set(zip(routing.token_index.tolist(), routing.expert_index.tolist(), strict=True))
                lost_first = sum((tok, int(first[tok, 0])) not in kept for tok in range(t)) / t
                row[policy] = {
                    "drop_rate": round(routing.drop_rate(), 4),
                    "gate_mass_lost": round(1 - kept_mass, 4),
                    "first_choice_lost": round(lost_first, 4),
                }
            rows[str(cf)] = row
        out[f"skew={skew}"] = rows
    return out


# --------------------------------------------------------------------------- expert choice
def measure_expert_choice(cs=(1.0, 2.0, 4.0)) -> dict:
    d, e, t = 32, 8, 1024
    x = skewed_input(t, d, seed=3)
    out = {}
    for c in cs:
        torch.manual_seed(0)
        routing = ExpertChoiceRouter(d, e, capacity_factor=c)(x)
        per_tok = routing.experts_per_token().float()
        torch.manual_seed(0)
        tk = TopKRouter(d, e, top_k=max(1, int(c)))(x)  # same gate init, token choice
        out[str(c)] = {
            "max_over_mean_load": round(max_over_mean(routing.tokens_per_expert()), 3),
            "topk_same_init_max_over_mean": round(max_over_mean(tk.tokens_per_expert()), 3),
            "tokens_with_0_experts": round(float((per_tok == 0).float().mean()), 4),
            "mean_experts_per_token": round(float(per_tok.mean()), 3),
            "max_experts_per_token": int(per_tok.max()),
        }
    return out


# ------------------------------------------------------------- training with auxiliary losses
def _train(router: str, aux: dict, steps: int = 200, seed: int = 0, router_kwargs=None) -> dict:
    """A single MoE layer regressing a fixed random teacher on skewed clustered inputs."""
    torch.manual_seed(seed)
    d, e = 32, 8
    teacher = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.GELU(), torch.nn.Linear(64, d))
    for p in teacher.parameters():
        p.requires_grad_(False)
    moe = moelab.MoE(
        d, num_experts=e, top_k=2, hidden=32, router=router, router_kwargs=router_kwargs, aux_losses=aux
    )
    opt = torch.optim.Adam(moe.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    centers = torch.randn(4, d, generator=g) * 2
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
    loads, task = [], []
    for step in range(steps):
        c = torch.multinomial(probs, 16 * 32, replacement=True, generator=g)
        x = (centers[c] + torch.randn(16 * 32, d, generator=g)).view(16, 32, d)
        y = moe(x)
        loss = (y - teacher(x)).square().mean()
        (loss + moe.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        moelab.step_end(moe)
        if step >= steps - 20:  # average the last 20 steps
            with moelab.trace(moe) as tr, torch.no_grad():
                moe(x)
            r = tr.routing(tr.layers[0])
            loads.append(max_over_mean(r.tokens_per_expert()))
            task.append(loss.item())
            last = {
                "lb": float(load_balance(r)),
                "z": float(z_loss(r)),
                "max_logit": float(r.logits.abs().max()),
            }
    return {
        "max_over_mean": round(sum(loads) / len(loads), 3),
        "task_mse": round(sum(task) / len(task), 4),
        "lb_term": round(last["lb"], 4),
        "z_term": round(last["z"], 3),
        "max_abs_logit": round(last["max_logit"], 2),
    }


def measure_losses(seeds=(0, 1, 2)) -> dict:
    configs = {
        "topk, no aux": ("topk", {}, None),
        "topk, load_balance 1e-2": ("topk", {"load_balance": 1e-2}, None),
        "topk, load_balance 1e-1": ("topk", {"load_balance": 1e-1}, None),
        "topk, load_balance_seq 1e-1": ("topk", {"load_balance_seq": 1e-1}, None),
        "topk, z 1e-3": ("topk", {"z": 1e-3}, None),
        "topk, z 1e-1": ("topk", {"z": 1e-1}, None),
        "sigmoid_topk, bias off": ("sigmoid_topk", {}, {"bias_update_rate": 0.0}),
        "sigmoid_topk, bias 1e-3": ("sigmoid_topk", {}, None),
        "sigmoid_topk, bias 1e-2": ("sigmoid_topk", {}, {"bias_update_rate": 1e-2}),
        "expert_choice": ("expert_choice", {}, None),
    }
    out = {}
    for name, (router, aux, kw) in configs.items():
        runs = [_train(router, aux, seed=s, router_kwargs=kw) for s in seeds]
        out[name] = {key: round(sum(r[key] for r in runs) / len(runs), 4) for key in runs[0]}
    return out


# ------------------------------------------------------------------- reference vs sorted
def measure_backends(n_cases: int = 200) -> dict:
    """Largest difference between ``sorted`` and ``reference`` over random cases (forward and
    every gradient), fp32 and bf16; shapes as in tests/ops/test_backends_property.py but larger."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        worst = {"y": 0.0, "grad_x": 0.0, "grad_weight": 0.0, "grad_bank": 0.0}
        g = torch.Generator().manual_seed(0)
        for case in range(n_cases):
            torch.manual_seed(case)
            e = int(torch.randint(1, 9, (1,), generator=g))
            k = int(torch.randint(1, e + 1, (1,), generator=g))
            t = int(torch.randint(0, 33, (1,), generator=g))
            d = [8, 16, 32, 12, 20][case % 5]
            bank = moelab.ExpertBank(e, d, 16, ["swiglu", "gelu"][case % 2]).to(dtype)
            x = torch.randn(t, d, generator=g).to(dtype).requires_grad_(True)
            r = TopKRouter(d, e, top_k=k, capacity_factor=[None, 1.0][case % 2])
            routing = r(x.detach().float())
            w = routing.weight.detach().requires_grad_(True)
            routing = moelab.Routing(routing.token_index, routing.expert_index, w, t, e, top_k=routing.top_k)
            gy = torch.randn(t, d, generator=g).to(dtype)
            grads = {}
            for name in ("reference", "sorted"):
                y = moelab.ops.get_executor(name)(x, routing, bank)
                inputs = [x, w, *bank.parameters()]
                gs = (
                    torch.autograd.grad((y * gy).sum(), inputs, allow_unused=True)
                    if y.requires_grad
                    else [None] * 5
                )
                gs = [torch.zeros_like(p) if q is None else q for q, p in zip(gs, inputs, strict=False)]
                grads[name] = (y.detach(), gs)
            (ya, ga), (yb, gb) = grads["reference"], grads["sorted"]

            def diff(a, b):
                return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0

            worst["y"] = max(worst["y"], diff(ya, yb))
            worst["grad_x"] = max(worst["grad_x"], diff(ga[0], gb[0]))
            worst["grad_weight"] = max(worst["grad_weight"], diff(ga[1], gb[1]))
            worst["grad_bank"] = max(
                worst["grad_bank"], max(diff(p, q) for p, q in zip(ga[2:], gb[2:], strict=True))
            )
        out[str(dtype).replace("torch.", "")] = {
            "cases": n_cases,
            **{k: float(f"{v:.3g}") for k, v in worst.items()},
        }
    return out


PARTS = {
    "topk": measure_topk,
    "bias": measure_bias,
    "capacity": measure_capacity,
    "expert_choice": measure_expert_choice,
    "lb": measure_losses,
    "backends": measure_backends,
}


def main(argv: list[str]) -> None:
    chosen = argv or list(PARTS)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for name in chosen:
        t0 = time.perf_counter()
        results[name] = PARTS[name]()
        print(f"## {name} ({time.perf_counter() - t0:.1f} s)")
        print(json.dumps(results[name], indent=1))
    results["_env"] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    OUT.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
