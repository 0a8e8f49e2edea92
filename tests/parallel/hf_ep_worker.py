"""Run under torchrun by test_ep.py: expert parallelism on patched transformers models.

Usage: torchrun --nproc_per_node 2 hf_ep_worker.py OUT_DIR

For each family, every rank builds the same tiny random transformers model (one seed), patches it
(``moelab.hf.patch``), and computes the single-process reference on every rank's batch rows
concatenated. Then it shards a copy (``shard_experts``) and runs it on its own rows only: the
logits, the replicated parameters' gradients summed over ranks and its experts' gradients equal
the reference (fp32, within 1e-5), and ``gathered_state_dict`` is the unsharded model's state dict
under transformers' own key names.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from ep_worker import close, grad, summed
from torchrun import run_checks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "hf"))
from hf_tiny import tiny_ids, tiny_model  # noqa: E402

import moelab.hf  # noqa: E402
from moelab.ops.all_to_all import AllToAllDispatcher  # noqa: E402
from moelab.parallel.sharding import (  # noqa: E402
    expert_block,
    expert_parameter_names,
    gathered_state_dict,
    moe_layers,
    shard_experts,
)

FAMILIES = ("olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss")
ROWS_PER_RANK = 2


def check_family(family):
    def check(rank, p, done):
        full = moelab.hf.patch(tiny_model(family, seed=7))
        unpatched_keys = set(tiny_model(family, seed=7).state_dict())
        ids = tiny_ids(batch=ROWS_PER_RANK * p, seq=10, seed=3)
        mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        g = torch.Generator().manual_seed(4)

        ep = shard_experts(copy.deepcopy(full))
        layers = moe_layers(ep)
        assert layers and all(isinstance(m.dispatcher, AllToAllDispatcher) for _, m in layers)

        logits_ref = full(ids).logits
        gy = torch.randn(logits_ref.shape, generator=g)
        (logits_ref * gy).sum().backward()
        logits = ep(ids[mine]).logits
        close(logits, logits_ref[mine].detach(), f"{family}: logits")
        (logits * gy[mine]).sum().backward()

        expert_names = set(expert_parameter_names(ep))
        assert expert_names, f"{family}: no sharded expert parameters"
        ref = dict(full.named_parameters())
        blocks = {}
        for prefix, layer in layers:
            blocks[prefix] = expert_block(layer.num_experts, p, rank)
        for name, param in ep.named_parameters():
            if name in expert_names:
                prefix = name.split(".experts.")[0]
                s, e = blocks[prefix]
                close(grad(param), grad(ref[name])[s:e], f"{family}: expert grad {name}")
            else:
                close(summed(grad(param)), grad(ref[name]), f"{family}: grad {name} summed over ranks")

        state = gathered_state_dict(ep)
        want = full.state_dict()
        assert set(state) == set(want) == unpatched_keys, f"{family}: state dict keys differ"
        for k, v in want.items():
            assert torch.equal(state[k], v), f"{family}: gathered {k} differs"
        sent = sum(m.dispatcher.bytes_sent for _, m in layers)
        assert sent > 0, f"{family}: no bytes counted"
        done.append(f"hf-{family}")

    return check


if __name__ == "__main__":
    run_checks([check_family(f) for f in FAMILIES])
