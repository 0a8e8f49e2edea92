"""A LoRA mixture saved as a PEFT-shaped folder: layout, PEFT loads each expert, bit-exact reload,
a mixture built from PEFT LoRA folders, and clear errors on bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft_tiny import TARGETS, logits, lora_reference_logits, make_peft_lora, tiny_ids, tiny_llama  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import moelab  # noqa: E402
from moelab import lora  # noqa: E402
from moelab.integrations.peft import (  # noqa: E402
    MIXTURE_PEFT_TYPE,
    from_peft_adapters,
    load_mixture,
    read_lora_adapter,
    save_mixture,
)

E, R = 3, 4
MIXTURE = dict(num_experts=E, rank=R, alpha=8, router="topk", top_k=2)


def mixture_model(seed: int = 5, dtype: torch.dtype = torch.float32, **mixture):
    """``tiny_llama()`` with a mixture on q/v/up, its experts and router randomised (B is zero at init)."""
    model = tiny_llama().to(dtype)
    lora.apply(model, TARGETS, **{**MIXTURE, **mixture})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.mixture_layers(model).values():
            for p in layer.bank.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            for p in layer.router.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def one_expert(j: int):
    """A routing transform sending every token to expert ``j`` alone, with weight 1."""

    def fn(routing, site):
        t = routing.num_tokens
        return moelab.Routing(
            token_index=torch.arange(t),
            expert_index=torch.full((t,), j, dtype=torch.long),
            weight=torch.ones(t),
            num_tokens=t,
            num_experts=routing.num_experts,
            top_k=1,
        )

    return fn


def expert_modules(model, i: int) -> dict:
    return {
        n: (m.bank.lora_A[i].detach(), m.bank.lora_B[i].detach())
        for n, m in lora.mixture_layers(model).items()
    }


# --------------------------------------------------------------------------- save_mixture


def test_saved_folder_is_peft_shaped(tmp_path):
    model = mixture_model()
    save_mixture(model, tmp_path / "mix")
    top = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert top["peft_type"] == MIXTURE_PEFT_TYPE
    assert top["moelab_version"] == moelab.__version__
    assert top["experts"] == [f"experts/expert_{i}" for i in range(E)]
    for key, value in lora.mixture_config(model).items():
        assert top[key] == value, key

    # The expert keys are exactly the keys PEFT itself writes for a LoRA on the same modules.
    make_peft_lora(tmp_path / "peft", seed=0, r=R)
    peft_keys = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    for i in range(E):
        sub = tmp_path / "mix" / "experts" / f"expert_{i}"
        tensors = load_file(str(sub / "adapter_model.safetensors"))
        assert set(tensors) == peft_keys
        config = peft.LoraConfig.from_pretrained(str(sub))
        assert (config.peft_type, config.r, config.lora_alpha) == (peft.PeftType.LORA, R, 8)
        name = "model.layers.1.mlp.up_proj"
        layer = lora.mixture_layers(model)[name]
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], layer.bank.lora_A[i])
        assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], layer.bank.lora_B[i])

    router = load_file(str(tmp_path / "mix" / "router.safetensors"))
    layers = lora.mixture_layers(model)
    assert router and all(any(k.startswith(f"{n}.") for n in layers) for k in router)
    assert not any("lora_A" in k or "lora_B" in k or k.endswith("base.weight") for k in router)


def test_each_expert_loads_into_plain_peft(tmp_path):
    model = mixture_model()
    save_mixture(model, tmp_path / "mix")
    ids = tiny_ids()
    scaling = 8 / R
    for i in range(E):
        peft_model = peft.PeftModel.from_pretrained(
            tiny_llama(), str(tmp_path / "mix" / "experts" / f"expert_{i}")
        )
        got = logits(peft_model, ids)
        want = lora_reference_logits(ids, expert_modules(model, i), scaling)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # and the mixture with every token routed to expert i alone computes the same
        with moelab.override_routing(model, one_expert(i)):
            torch.testing.assert_close(logits(model, ids), want, rtol=1e-5, atol=1e-5)
    # The experts differ, so this is not vacuous.
    assert not torch.allclose(
        lora_reference_logits(ids, expert_modules(model, 0), scaling),
        lora_reference_logits(ids, expert_modules(model, 1), scaling),
    )


# --------------------------------------------------------------------------- load_mixture


@pytest.mark.parametrize(
    "dtype, mixture",
    [
        (torch.float32, {}),
        (torch.float32, {"method": "dynmole", "router": None, "top_k": None}),  # tsallis_topp, its losses
        (torch.bfloat16, {"method": "mole", "router": None, "top_k": None}),
    ],
    ids=["topk-fp32", "dynmole-fp32", "mole-bf16"],
)
def test_reload_is_bit_exact(tmp_path, dtype, mixture):
    model = mixture_model(dtype=dtype, **mixture)
    # One training step, so that the router and experts are no longer what apply() initialises.
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = tiny_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    save_mixture(model, tmp_path / "mix")

    fresh = tiny_llama().to(dtype)
    names = load_mixture(fresh, tmp_path / "mix")
    assert sorted(names) == sorted(lora.mixture_layers(model))
    assert lora.mixture_config(fresh) == lora.mixture_config(model)
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert list(saved) == list(loaded)
    for key in saved:
        assert saved[key].dtype == loaded[key].dtype and torch.equal(saved[key], loaded[key]), key
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == [
        (n, p.requires_grad) for n, p in fresh.named_parameters()
    ]
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    # and the reloaded mixture trains (the router gets a gradient)
    fresh(input_ids=ids, labels=ids).loss.backward()
    router = next(iter(lora.mixture_layers(fresh).values())).router
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())


def test_remove_after_load_restores_the_base(tmp_path):
    save_mixture(mixture_model(), tmp_path / "mix")
    fresh = tiny_llama()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    load_mixture(fresh, tmp_path / "mix")
    lora.remove(fresh)
    after = fresh.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- from_peft_adapters


@pytest.fixture(scope="module")
def peft_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    # Different lora_alpha on one of them: the mixture folds each adapter's scaling into its B.
    return [make_peft_lora(root / f"a{i}", seed=10 + i, r=R, alpha=a) for i, a in enumerate((8, 8, 16))]


def test_from_peft_adapters_routes_to_each_adapter(peft_folders):
    model = tiny_llama()
    names = from_peft_adapters(model, peft_folders, router="topk", top_k=2)
    assert len(names) == 2 * len(TARGETS)
    ids = tiny_ids()
    for j, folder in enumerate(peft_folders):
        want = logits(peft.PeftModel.from_pretrained(tiny_llama(), str(folder)), ids)
        with moelab.override_routing(model, one_expert(j)):
            torch.testing.assert_close(logits(model, ids), want, rtol=1e-5, atol=1e-5)
    # the router is fresh and trainable; so are the experts unless frozen
    model(input_ids=ids, labels=ids).loss.backward()
    layer = next(iter(lora.mixture_layers(model).values()))
    assert all(p.requires_grad for p in layer.router.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.router.parameters())
    assert layer.bank.lora_A.requires_grad and layer.bank.lora_B.requires_grad


def test_rslora_adapters_keep_their_scaling(tmp_path, peft_folders):
    # rsLoRA scales by lora_alpha / sqrt(r): as the first expert it sets the mixture's alpha, as a
    # later one its B is rescaled to the mixture's scaling.
    rs = make_peft_lora(tmp_path / "rs", seed=7, r=R, alpha=8, use_rslora=True)
    ids = tiny_ids()
    for folders in ([rs, peft_folders[0]], [peft_folders[0], rs]):
        model = tiny_llama()
        from_peft_adapters(model, folders, router="topk", top_k=1)
        for j, folder in enumerate(folders):
            want = logits(peft.PeftModel.from_pretrained(tiny_llama(), str(folder)), ids)
            with moelab.override_routing(model, one_expert(j)):
                torch.testing.assert_close(logits(model, ids), want, rtol=1e-5, atol=1e-5)


def test_from_peft_adapters_can_freeze_experts(peft_folders):
    model = tiny_llama()
    from_peft_adapters(model, peft_folders[:2], freeze_experts=True, router="topk", top_k=1)
    for layer in lora.mixture_layers(model).values():
        assert not layer.bank.lora_A.requires_grad and not layer.bank.lora_B.requires_grad
        assert all(p.requires_grad for p in layer.router.parameters())


def test_adapters_round_trip_through_a_saved_mixture(peft_folders, tmp_path):
    model = tiny_llama()
    from_peft_adapters(model, peft_folders[:2], router="topk", top_k=1)  # same alpha: no folding
    save_mixture(model, tmp_path / "mix")
    for i, folder in enumerate(peft_folders[:2]):
        original = load_file(str(folder / "adapter_model.safetensors"))
        saved = load_file(str(tmp_path / "mix" / "experts" / f"expert_{i}" / "adapter_model.safetensors"))
        assert set(original) == set(saved) and all(torch.equal(original[k], saved[k]) for k in original)
    fresh = tiny_llama()
    load_mixture(fresh, tmp_path / "mix")
    ids = tiny_ids()
    assert torch.equal(logits(fresh, ids), logits(model, ids))


# --------------------------------------------------------------------------- bad input


def test_save_refuses_a_model_without_mixture(tmp_path):
    with pytest.raises(ValueError, match="no LoRA mixture"):
        save_mixture(tiny_llama(), tmp_path / "mix")


def test_load_refuses_bad_folders(tmp_path, peft_folders):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mixture(tiny_llama(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a moelab LoRA mixture.*plain PEFT LoRA"):
        load_mixture(tiny_llama(), peft_folders[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_mixture(tiny_llama(), tmp_path / "empty")

    save_mixture(mixture_model(), tmp_path / "mix")
    with pytest.raises(ValueError, match="already has a LoRA mixture"):
        load_mixture(mixture_model(), tmp_path / "mix")

    broken = tmp_path / "no_router"
    shutil.copytree(tmp_path / "mix", broken)
    (broken / "router.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="router"):
        load_mixture(tiny_llama(), broken)

    broken = tmp_path / "edited"
    shutil.copytree(tmp_path / "mix", broken)
    config_path = broken / "experts" / "expert_0" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "lora_alpha": 16}))
    with pytest.raises(ValueError, match="scaling 4 .*differs"):
        load_mixture(tiny_llama(), broken)

    broken = tmp_path / "no_expert"
    shutil.copytree(tmp_path / "mix", broken)
    shutil.rmtree(broken / "experts" / "expert_1")
    with pytest.raises(FileNotFoundError, match="expert_1"):
        load_mixture(tiny_llama(), broken)


def test_failed_load_leaves_no_mixture(tmp_path):
    save_mixture(mixture_model(), tmp_path / "mix")
    router = load_file(str(tmp_path / "mix" / "router.safetensors"))
    dropped = sorted(router)[0]
    save_file({k: v for k, v in router.items() if k != dropped}, str(tmp_path / "mix" / "router.safetensors"))
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Missing key"):
        load_mixture(model, tmp_path / "mix")
    assert not lora.mixture_layers(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_load_refuses_another_architecture(tmp_path):
    save_mixture(mixture_model(), tmp_path / "mix")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
        )
    )
    with pytest.raises(ValueError, match="shape"):
        load_mixture(other, tmp_path / "mix")
    assert not lora.mixture_layers(other)


def test_from_peft_adapters_refuses_mismatches(tmp_path, peft_folders):
    with pytest.raises(ValueError, match="one rank"):
        from_peft_adapters(tiny_llama(), [peft_folders[0], make_peft_lora(tmp_path / "r8", seed=1, r=8)])
    with pytest.raises(ValueError, match="same modules"):
        from_peft_adapters(
            tiny_llama(), [peft_folders[0], make_peft_lora(tmp_path / "qk", seed=1, r=R, targets=["q_proj"])]
        )
    with pytest.raises(ValueError, match="empty"):
        from_peft_adapters(tiny_llama(), [])
    with pytest.raises(TypeError, match="list of PEFT LoRA folders"):
        from_peft_adapters(tiny_llama(), str(peft_folders[0]))
    with pytest.raises(ValueError, match="rank comes from the adapters"):
        from_peft_adapters(tiny_llama(), peft_folders, rank=8)
    model = mixture_model()
    with pytest.raises(ValueError, match="already has a LoRA mixture"):
        from_peft_adapters(model, peft_folders)


def test_non_peft_and_unsupported_folders_are_refused(tmp_path, peft_folders):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "weights.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        from_peft_adapters(tiny_llama(), [tmp_path / "plain"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_lora_adapter(tmp_path / "missing")

    ia3 = tmp_path / "ia3"
    model = peft.get_peft_model(
        tiny_llama(), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    )
    model.save_pretrained(str(ia3))
    with pytest.raises(ValueError, match="'IA3'.*plain LoRA"):
        read_lora_adapter(ia3)

    dora = make_peft_lora(tmp_path / "dora", seed=2, r=R, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        read_lora_adapter(dora)

    pickled = tmp_path / "pickled"
    shutil.copytree(peft_folders[0], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ValueError, match="never unpickles"):
        read_lora_adapter(pickled)

    bad_json = tmp_path / "bad_json"
    shutil.copytree(peft_folders[0], bad_json)
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_lora_adapter(bad_json)

    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(peft_folders[0], wrong_shape)
    config = json.loads((wrong_shape / "adapter_config.json").read_text())
    (wrong_shape / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(ValueError, match="r = 2"):
        read_lora_adapter(wrong_shape)

    with pytest.raises(ValueError, match="not an nn.Linear|is missing"):
        from transformers import LlamaConfig, LlamaForCausalLM

        one_layer = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
        from_peft_adapters(one_layer, peft_folders)
