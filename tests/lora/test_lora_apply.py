"""``moelab.lora.apply`` / ``remove`` on a tiny transformers Llama: exact at init, only the mixtures
train, the base stays bit-exact, ``remove`` restores the very modules and flags; the presets on a
real model; the config; bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_llama import tiny_llama
from torch import nn

import moelab
from moelab import RoutingContext
from moelab.lora import (
    RoutedLoRA,
    apply,
    matches_target,
    mixture_config,
    mixture_layers,
    remove,
    use_context,
)
from moelab.routers.topk import TopKRouter
from moelab.routers.tsallis import TsallisTopPRouter

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]
WRAPPED = [
    f"model.layers.{i}.{p}"
    for i in range(2)
    for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_apply_train_remove_round_trip():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag apply must give back
    originals = {n: model.get_submodule(n) for n in WRAPPED}
    state = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = ids()
    with torch.no_grad():
        logits = model(x).logits

    names = apply(model, TARGETS, num_experts=4, rank=4, method="mole")
    assert names == WRAPPED and list(mixture_layers(model)) == WRAPPED
    for n in WRAPPED:
        layer = model.get_submodule(n)
        assert isinstance(layer, RoutedLoRA) and layer.base is originals[n]
    assert model.model.layers[0].self_attn.v_proj.d_out == 16  # 32 -> 16 (2 kv heads): d_in != d_out
    with torch.no_grad():
        assert torch.equal(model(x).logits, logits)  # B = 0: exactly the base model
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"{n}.{p}" for n in WRAPPED for p in ("router.weight", "experts.lora_A", "experts.lora_B")
    )

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(4):
        out = model(ids(step), labels=ids(step))
        loss = out.loss + moelab.aux_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    after = model.state_dict()
    for k, v in state.items():  # every base tensor, under its wrapped name where it was wrapped
        key = k
        for n in WRAPPED:
            if k.startswith(n + "."):
                key = f"{n}.base.{k[len(n) + 1 :]}"
        assert torch.equal(after[key], v), k
    assert all(model.get_submodule(n).experts.lora_B.detach().abs().sum() > 0 for n in WRAPPED)
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(x).logits, logits)

    remove(model)
    assert not mixture_layers(model)
    for n in WRAPPED:
        assert model.get_submodule(n) is originals[n]
    restored = model.state_dict()
    assert list(restored) == list(state)
    assert all(torch.equal(restored[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(model(x).logits, logits)
    # After remove, apply works again.
    assert apply(model, ["o_proj"], num_experts=2, rank=2) == [
        f"model.layers.{i}.self_attn.o_proj" for i in range(2)
    ]


def test_presets_on_a_real_model_and_generate():
    for method, router_cls, losses in (
        ("mole", TopKRouter, {"load_balance"}),
        ("dynmole", TsallisTopPRouter, {"tsallis_entropy", "load_balance"}),
    ):
        model = tiny_llama()
        apply(model, TARGETS, method=method, num_experts=4, rank=4)
        for layer in mixture_layers(model).values():
            with torch.no_grad():
                layer.experts.lora_B.normal_(0, 0.1)
        out = model(ids(), labels=ids())
        for layer in mixture_layers(model).values():
            assert isinstance(layer.router, router_cls) and set(layer.aux_terms) == losses
        total = sum(layer.aux_loss for layer in mixture_layers(model).values())
        torch.testing.assert_close(moelab.aux_loss(model), total)
        (out.loss + moelab.aux_loss(model)).backward()
        assert all(layer.router.weight.grad is not None for layer in mixture_layers(model).values())
        with torch.no_grad():
            gen = model.generate(ids()[:1, :4], max_new_tokens=3, do_sample=False)
        assert gen.shape == (1, 7)


def test_mixture_config_is_json_and_rebuilds_the_mixture():
    model = tiny_llama()
    apply(model, TARGETS, method="dynmole", num_experts=3, rank=4, dropout=0.05)
    config = mixture_config(model)
    assert json.loads(json.dumps(config)) == config
    assert config == {
        "method": "dynmole",
        "targets": TARGETS,
        "target_parameters": None,
        "wrapped": WRAPPED,
        "wrapped_parameters": [],
        "num_experts": 3,
        "rank": 4,
        "alpha": 8.0,
        "dropout": 0.05,
        "router": "tsallis_topp",
        "top_k": 2,
        "router_kwargs": {"top_p": 0.75, "entropy_threshold": 0.9, "q": 1.1, "eps": 1e-5},
        "aux_losses": {"tsallis_entropy": 1e-2, "load_balance": 1e-3},
        "aux_loss_kwargs": {"tsallis_entropy": {"q": 1.1, "eps": 1e-5}},
    }
    config["targets"].append("k_proj")  # a copy
    assert mixture_config(model)["targets"] == TARGETS
    other = tiny_llama(seed=1)
    kwargs = {k: v for k, v in mixture_config(model).items() if k not in ("wrapped", "wrapped_parameters")}
    assert apply(other, **kwargs) == WRAPPED
    state, other_state = model.state_dict(), other.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in other_state.items()}
    other.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, other(ids()).logits, rtol=0, atol=0)


def test_target_rules_match_peft():
    assert matches_target("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert matches_target("q_proj", ["q_proj"])
    assert not matches_target("model.layers.0.self_attn.qq_proj", ["q_proj"])
    assert matches_target("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert matches_target("model.layers.1.mlp.down_proj", r".*\.1\.mlp\.down_proj")
    assert not matches_target("model.layers.1.mlp.down_proj", r"down_proj")  # a regex matches whole names
    model = tiny_llama()
    assert apply(model, r".*layers\.1\.self_attn\.(q|v)_proj") == WRAPPED[3:5]
    remove(model)
    peft = pytest.importorskip("peft")
    # The same modules PEFT would adapt with target_modules=TARGETS.
    config = peft.LoraConfig(target_modules=TARGETS)
    exists = peft.tuners.tuners_utils.check_target_module_exists
    found = [n for n, _ in model.named_modules() if n and exists(config, n)]
    assert found == WRAPPED


def test_use_context_reaches_every_layer():
    model = tiny_llama()
    apply(model, TARGETS, num_experts=2, rank=2)
    seen = []

    def record(routing, site):
        seen.append((site.name, site.ctx.layer_index, site.ctx.token_ids, site.ctx.batch_shape))
        return routing

    x = ids()
    ctx = RoutingContext(token_ids=x.reshape(-1))
    with use_context(model, ctx), moelab.override_routing(model, record):
        model(x)
    assert [s[0] for s in seen] == WRAPPED and [s[1] for s in seen] == list(range(6))
    assert all(s[2] is ctx.token_ids and s[3] == (2, 12) for s in seen)
    assert len(ctx.history) == 6
    assert all(layer.context is None for layer in mixture_layers(model).values())


def test_bad_inputs_leave_the_model_unchanged():
    model = tiny_llama()
    state = snapshot(model)
    with pytest.raises(ValueError, match=r"targets \['qq_proj'\] match no module.*'q_proj'"):
        apply(model, ["qq_proj"])
    with pytest.raises(ValueError, match=r"not nn.Linear: \['model.layers.0.mlp \(LlamaMLP\)'"):
        apply(model, ["mlp"])
    with pytest.raises(ValueError, match="targets must be a non-empty list"):
        apply(model, [])
    with pytest.raises(TypeError, match="targets must be a list of names"):
        apply(model, 3)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        apply(model, "(")
    with pytest.raises(ValueError, match="method must be one of"):
        apply(model, TARGETS, method="mixlora")
    with pytest.raises(TypeError, match="router must be a registered router name"):
        apply(model, TARGETS, router=TopKRouter(32, 4))
    with pytest.raises(ValueError, match=r"top_k must be <= num_experts \(2\)"):
        apply(model, TARGETS, num_experts=2, top_k=3)
    with pytest.raises(TypeError, match="model must be a torch nn.Module"):
        apply("model", TARGETS)
    with pytest.raises(ValueError, match="has no LoRA mixture"):
        remove(model)
    with pytest.raises(ValueError, match="has no LoRA mixture"):
        mixture_config(model)
    assert not mixture_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    apply(model, TARGETS, num_experts=2, rank=2)
    with pytest.raises(ValueError, match="already has LoRA mixture layers"):
        apply(model, TARGETS)
    with pytest.raises(ValueError, match="already has LoRA mixture layers"):
        apply(model, ["o_proj"])
    remove(model)
    # A mixture layer put there by hand counts too.
    model.model.layers[0].self_attn.o_proj = RoutedLoRA(model.model.layers[0].self_attn.o_proj, 2, 2)
    with pytest.raises(ValueError, match="already has LoRA mixture layers"):
        apply(model, TARGETS)


class FusedExperts(nn.Module):
    """transformers 5's fused expert layout: 3-D parameters, not nn.Linear modules."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(4, 16, 8))
        self.down_proj = nn.Parameter(torch.zeros(4, 8, 8))


def test_fused_3d_expert_parameters_go_in_target_parameters():
    model = nn.ModuleDict({"mlp": nn.ModuleDict({"experts": FusedExperts(), "gate": nn.Linear(8, 4)})})
    with pytest.raises(
        ValueError, match=r"fused 3-D expert parameters \['mlp.experts.gate_up_proj'\].*target_parameters"
    ):
        apply(model, ["gate_up_proj"])
    names = apply(model, ["gate"], num_experts=2, rank=2, target_parameters=["gate_up_proj"])
    assert names == ["mlp.gate", "mlp.experts.gate_up_proj"]
