"""Forward FLOPs of the last forward: what each layer of a model actually computed.

A FLOP here is one multiply or one add (a multiply-add is 2), the convention of Kaplan et al.
2020 and of the mixture-of-depths isoFLOP comparisons. Modules that know their cost keep a float
``flops`` that their forward adds to (attention, dense FFNs, depth routers); ``reset_flops``
zeroes them before a forward, so after it they hold that forward's cost, however many times a
module ran (a recursion's shared block runs ``N_r`` times).

Routed layers (``RoutedLayer``) count what they routed: tokens and assignments, per forward.
``routed_flops`` turns that into FLOPs with the 2-FLOPs-per-parameter rule: every parameter of
the routed FFN outside its expert banks (routers, shared experts, dense branches) is used once
per token, and each assignment uses one expert's share of its bank's parameters. That is exact
for matmul experts (an FFN expert, an atomic PEER expert, a LoRA adapter) and ignores the
elementwise work (activations, norms), as the isoFLOP literature does.
"""

from __future__ import annotations

from torch import nn

from moelab.core.routed import RoutedLayer


def reset_flops(model: nn.Module) -> None:
    """Zero every module's ``flops`` and every routed layer's counts (call before a forward)."""
    for m in model.modules():
        if isinstance(getattr(m, "flops", None), float):
            m.flops = 0.0
        if isinstance(m, RoutedLayer):
            m.__dict__["_routed_counts"] = [0, 0]


def _banks(layer: nn.Module) -> list[nn.Module]:
    """The expert banks directly owned by routed layers under ``layer`` (each counted once)."""
    seen: dict[int, nn.Module] = {}
    for m in layer.modules():
        bank = getattr(m, "experts", None)
        if isinstance(m, RoutedLayer) and isinstance(bank, nn.Module) and hasattr(bank, "num_experts"):
            seen[id(bank)] = bank
    return list(seen.values())


def routed_counts(ffn: nn.Module) -> dict[int, int]:
    """Assignments routed so far by each routed layer under ``ffn`` (a snapshot for ``routed_flops``)."""
    return {
        id(m): m.__dict__.get("_routed_counts", (0, 0))[1]
        for m in ffn.modules()
        if isinstance(m, RoutedLayer)
    }


def routed_flops(ffn: nn.Module, num_tokens: int, since: dict[int, int] | None = None) -> float:
    """Forward FLOPs of routed FFN ``ffn`` that ran on ``num_tokens`` tokens (module docstring):
    the assignments counted since snapshot ``since`` (``routed_counts`` before the call; None:
    since ``reset_flops``)."""
    banks = _banks(ffn)
    bank_params = {id(b): sum(p.numel() for p in b.parameters()) for b in banks}
    other = sum(p.numel() for p in ffn.parameters()) - sum(bank_params.values())
    total = 2.0 * other * num_tokens
    for m in ffn.modules():
        if not isinstance(m, RoutedLayer):
            continue
        bank = getattr(m, "experts", None)
        if bank is None or id(bank) not in bank_params:
            continue
        assignments = m.__dict__.get("_routed_counts", (0, 0))[1] - (since or {}).get(id(m), 0)
        total += 2.0 * bank_params[id(bank)] / max(1, int(bank.num_experts)) * assignments
    return total


def model_flops(model: nn.Module) -> float:
    """The sum of every module's ``flops`` after a forward (attention, FFNs, routers, heads)."""
    return float(sum(m.flops for m in model.modules() if isinstance(getattr(m, "flops", None), float)))
