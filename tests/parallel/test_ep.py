"""Expert parallelism (``ep``): the count exchange, the single-process world, sharding, errors; and
under torchrun with 2 and 4 gloo processes, equality with the single-process layer (ep_worker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchrun import run_workers

import moelab
from moelab import registry
from moelab.core.routing import Routing
from moelab.models import MoELM, MoELMConfig
from moelab.ops import get_dispatcher, get_executor
from moelab.ops.all_to_all import (
    AllToAllDispatcher,
    Traffic,
    check_ep_rows,
    local_expert_count,
    received_expert_ids,
    send_counts,
)
from moelab.parallel.sharding import (
    clip_grad_norm_,
    expert_block,
    expert_parameter_names,
    gather_experts,
    gathered_state_dict,
    moe_layers,
    shard_experts,
    slice_bank,
)

HERE = Path(__file__).parent
WORKER_CHECKS = [
    "direct-reference",
    "direct-sorted",
    "empty-experts",
    "layer-cfNone-reference",
    "layer-cfNone-sorted",
    "layer-cf0.75-sorted",
    "moelm",
    "ep+ddp",
]


def random_routing(t: int, e: int, g: torch.Generator, n: int | None = None) -> Routing:
    n = 2 * t if n is None else n
    return Routing(
        torch.randint(0, max(t, 1), (n,), generator=g),
        torch.randint(0, e, (n,), generator=g),
        torch.rand(n, generator=g).requires_grad_(True),
        t,
        e,
    )


# ---------------------------------------------------------------------- the count exchange's math
def test_local_expert_count_needs_divisible_experts():
    assert local_expert_count(8, 4) == 2
    with pytest.raises(ValueError, match="num_experts=6 must be divisible by the group size 4"):
        local_expert_count(6, 4)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        local_expert_count(6, 0)


def test_expert_block_is_contiguous_and_checked():
    assert [expert_block(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="rank must lie in"):
        expert_block(8, 4, 4)


@pytest.mark.parametrize("p,e", [(2, 4), (4, 8), (3, 3)])
def test_simulated_exchange_delivers_each_row_to_its_expert(p, e):
    """Simulate the count and row all-to-alls in one process: every row lands on its expert's owner
    with the right local expert id, in the order the receiver rebuilds from the counts alone."""
    g = torch.Generator().manual_seed(p * 10 + e)
    routings = [random_routing(t, e, g) for t in (5, 0, 7, 2)[:p]]
    e_local = e // p
    sent = [send_counts(r.by_expert().counts, p) for r in routings]  # [P, E_local] per source
    for dest in range(p):
        recv_counts = torch.stack([sent[q][dest] for q in range(p)])  # what all_to_all delivers
        ids = received_expert_ids(recv_counts)
        # naive: walk the sources in rank order, each one's rows for dest's experts in expert order
        want = []
        for r in routings:
            order = r.by_expert()
            mine = order.expert_index[(order.expert_index // e_local) == dest]
            want += (mine - dest * e_local).tolist()
        assert ids.tolist() == want
        for q in range(p):  # the send split q -> dest is what dest expects from q
            assert int(sent[q][dest].sum()) == int(recv_counts[q].sum())


def test_send_counts_rejects_an_indivisible_expert_count():
    with pytest.raises(ValueError, match="divisible"):
        send_counts(torch.zeros(5, dtype=torch.long), 2)


# ---------------------------------------------------------------------- a single-process world
@pytest.mark.parametrize("executor", ["reference", "sorted", "fast"])
@pytest.mark.parametrize("t", [0, 1, 9])
def test_world_of_one_equals_local(executor, t):
    g = torch.Generator().manual_seed(t)
    torch.manual_seed(t)
    bank = moelab.ExpertBank(4, 6, 5, "swiglu", d_out=7)
    x = torch.randn(t, 6, generator=g, requires_grad=True)
    routing = random_routing(t, 4, g, n=3 * t)
    ex = get_executor(executor)
    y_ref = moelab.ops.moe_reference(x, routing, bank)
    disp = AllToAllDispatcher()
    y = disp(x, routing, bank, ex)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    if t:
        inputs = [x, routing.weight, *bank.parameters()]
        g_ref = torch.autograd.grad(y_ref.square().sum(), inputs, allow_unused=True)
        g_ep = torch.autograd.grad(y.square().sum(), inputs, allow_unused=True)
        for a, b in zip(g_ep, g_ref, strict=True):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert disp.bytes_sent == disp.bytes_received == 0  # nothing crosses a wire in a world of one
    assert disp.traffic.calls == 1


def test_registered_and_built_by_name():
    assert "ep" in registry.names("dispatcher")
    d = get_dispatcher("ep")
    assert isinstance(d, AllToAllDispatcher) and d.group is None
    assert isinstance(AllToAllDispatcher.example(), AllToAllDispatcher)


def test_bad_group_and_mismatched_routing_are_named():
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        AllToAllDispatcher(group="world")
    bank = moelab.ExpertBank(2, 4, 4)
    x = torch.randn(3, 4)
    r = Routing.from_topk(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), 4)
    with pytest.raises(
        ValueError, match=r"routing.num_experts=4 must equal the local bank's num_experts \(2\)"
    ):
        check_ep_rows(x, r, bank, 1)
    check_ep_rows(x, r, bank, 2)  # 2 ranks x 2 local experts: fine
    with pytest.raises(ValueError, match="x must be"):
        check_ep_rows(torch.randn(3, 5), r, bank, 2)
    with pytest.raises(ValueError, match="routing.num_tokens=3 but x has 2 rows"):
        check_ep_rows(torch.randn(2, 4), r, bank, 2)


def test_traffic_sums_and_resets():
    t = Traffic()
    t.add("dispatch", 10, 4)
    t.add("combine_backward", 1, 2)
    assert (t.bytes_sent, t.bytes_received) == (11, 6)
    t.reset()
    assert (t.bytes_sent, t.bytes_received, t.calls) == (0, 0, 0)


# ---------------------------------------------------------------------- sharding
def test_slice_bank_copies_the_rows_and_checks_the_range():
    bank = moelab.ExpertBank(6, 4, 3, "gelu")
    part = slice_bank(bank, 2, 4)
    assert type(part) is type(bank) and part.num_experts == 2 and part.activation == "gelu"
    assert torch.equal(part.w_in, bank.w_in[2:4]) and torch.equal(part.down_proj, bank.down_proj[2:4])
    assert part.w_in.data_ptr() != bank.w_in.data_ptr()  # a copy: the global bank can be freed
    x = torch.randn(5, 4)
    torch.testing.assert_close(part.expert_forward(1, x), bank.expert_forward(3, x))
    with pytest.raises(ValueError, match=r"need 0 <= start < stop <= num_experts=6, got \[4, 4\)"):
        slice_bank(bank, 4, 4)


class SharedBasisBank(nn.Module):
    """A bank with a parameter that is not per-expert: it cannot be sliced along dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.d_in, self.d_out = 4, 3, 3
        self.basis = nn.Parameter(torch.randn(3, 3))
        self.scale = nn.Parameter(torch.randn(4, 3))

    def expert_forward(self, e, x):
        return (x @ self.basis) * self.scale[e]

    def forward_sorted(self, x, order):
        return (x @ self.basis) * self.scale[order.expert_index]


def test_slice_bank_refuses_a_bank_that_is_not_expert_major():
    with pytest.raises(TypeError, match=r"basis is not \[E=4, ...\]; give the bank a slice_experts"):
        slice_bank(SharedBasisBank(), 0, 2)


def test_shard_experts_in_a_world_of_one_is_the_same_layer():
    torch.manual_seed(0)
    layer = moelab.MoE(8, num_experts=4, top_k=2, shared_experts=1)
    x = torch.randn(2, 5, 8)
    y = layer(x)
    shard_experts(layer)
    assert isinstance(layer.dispatcher, AllToAllDispatcher) and layer.experts.num_experts == 4
    assert expert_parameter_names(layer) == ["experts.gate_up_proj", "experts.down_proj"]
    torch.testing.assert_close(layer(x), y)
    with pytest.raises(ValueError, match="already sharded"):
        shard_experts(layer)
    gather_experts(layer)
    assert type(layer.dispatcher).__name__ == "LocalDispatcher" and expert_parameter_names(layer) == []
    torch.testing.assert_close(layer(x), y)


def test_shard_experts_finds_every_moelm_layer_and_refuses_others():
    cfg = MoELMConfig(
        vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, num_experts=4, aux_losses={}
    )
    model = MoELM(cfg)
    ids = torch.randint(0, 32, (1, 8))
    want = model(ids).logits
    shard_experts(model)
    assert len(moe_layers(model)) == 2
    assert all(isinstance(m.dispatcher, AllToAllDispatcher) for _, m in model.moe_layers())
    assert len(expert_parameter_names(model)) == 4
    torch.testing.assert_close(model(ids).logits, want)
    with pytest.raises(ValueError, match="found no moelab.MoE layer in Linear"):
        shard_experts(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="found no sharded"):
        gather_experts(nn.Linear(2, 2))


def test_clip_and_gathered_state_in_a_world_of_one_match_torch():
    cfg = MoELMConfig(
        vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, num_experts=4, aux_losses={}
    )
    torch.manual_seed(1)
    full = MoELM(cfg)
    model = shard_experts(MoELM(cfg))
    model.load_state_dict(full.state_dict())
    assert gathered_state_dict(model).keys() == full.state_dict().keys()
    ids = torch.randint(0, 32, (2, 8))
    full(ids, labels=ids).loss.backward()
    model(ids, labels=ids).loss.backward()
    want = torch.nn.utils.clip_grad_norm_(full.parameters(), 0.1)
    got = clip_grad_norm_(model, 0.1)
    torch.testing.assert_close(got, want)
    for (n, a), b in zip(model.named_parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=n)
    with pytest.raises(ValueError, match="clip_grad_norm_ found no sharded"):
        clip_grad_norm_(full, 1.0)


# ---------------------------------------------------------------------- torchrun, 2 and 4 gloo ranks
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_torchrun_ep_equals_single_process_layer(tmp_path, nproc):
    for res in run_workers(HERE / "ep_worker.py", tmp_path, nproc):
        assert res["world_size"] == nproc and res["checks"] == WORKER_CHECKS


def test_torchrun_ep_on_patched_transformers_models(tmp_path):
    """``shard_experts`` on ``moelab.hf.patch``-ed OLMoE, Qwen2-MoE (shared expert), DeepSeek-V3
    (grouped routing, bias) and gpt-oss (expert biases): logits and every gradient equal the
    single-process model, and the gathered state dict has transformers' own keys (hf_ep_worker.py)."""
    pytest.importorskip("transformers")
    for res in run_workers(HERE / "hf_ep_worker.py", tmp_path, 2):
        assert res["checks"] == ["hf-olmoe", "hf-qwen2_moe", "hf-deepseek_v3", "hf-gpt_oss"], res
