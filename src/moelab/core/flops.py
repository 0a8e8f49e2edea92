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

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from moelab.core.routed import RoutedLayer

# The instance attributes modules count their cost in: ``flops`` (a float, FLOPs so far) and
# ``ffn_tokens`` (an int, the tokens a routed FFN ran on, turned into FLOPs on read by
# ``routed_flops``; ``moelab.models.blocks.Block`` keeps it). Routed layers add ``_routed_counts``.
COUNTERS = ("flops", "ffn_tokens")


def reset_flops(model: nn.Module) -> None:
    """Zero every module's counters and every routed layer's counts (call before a forward)."""
    for m in model.modules():
        state = vars(m)
        for name in COUNTERS:
            if name in state:
                state[name] = type(state[name])(0)
        if isinstance(m, RoutedLayer):
            state["_routed_counts"] = [0, 0]


@contextmanager
def uncounted(module: nn.Module) -> Iterator[None]:
    """Run work that is not part of the model's cost (a reference run, a probe): every counter
    under ``module`` is restored on exit."""
    saved = []
    for m in module.modules():
        state = vars(m)
        saved.append(
            (
                state,
                {
                    n: list(state[n]) if n == "_routed_counts" else state[n]
                    for n in (*COUNTERS, "_routed_counts")
                    if n in state
                },
            )
        )
    try:
        yield
    finally:
        for state, values in saved:
            state.update(values)


def _banks(layer: nn.Module) -> list[nn.Module]:
    """The expert banks directly owned by routed layers under ``layer`` (each counted once)."""
    seen: dict[int, nn.Module] = {}
    for m in layer.modules():
        bank = getattr(m, "experts", None)
        if isinstance(m, RoutedLayer) and isinstance(bank, nn.Module) and hasattr(bank, "num_experts"):
            seen[id(bank)] = bank
    return list(seen.values())


def routed_flops(ffn: nn.Module, num_tokens: int) -> float:
    """Forward FLOPs of routed FFN ``ffn`` since ``reset_flops``, having run on ``num_tokens``
    tokens in all (module docstring): its routed layers' assignments since then."""
    banks = _banks(ffn)
    bank_params = {id(b): sum(p.numel() for p in b.parameters()) for b in banks}
    other = sum(p.numel() for p in ffn.parameters()) - sum(bank_params.values())
    total = 2.0 * other * num_tokens
    for m in ffn.modules():
        bank = getattr(m, "experts", None)
        if not isinstance(m, RoutedLayer) or bank is None or id(bank) not in bank_params:
            continue
        assignments = m.__dict__.get("_routed_counts", (0, 0))[1]
        total += 2.0 * bank_params[id(bank)] / max(1, int(bank.num_experts)) * assignments
    return total


def model_flops(model: nn.Module) -> float:
    """The sum of every module's ``flops`` after a forward (attention, FFNs, routers, heads)."""
    return float(sum(m.flops for m in model.modules() if isinstance(getattr(m, "flops", None), float)))
