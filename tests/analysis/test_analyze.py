"""`moelab analyze` end to end: MoELM checkpoint, tiny transformers MoE, saved trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moelab
from moelab.analysis.report import AnalysisOptions, analyze_trace, docs_link, write_report
from moelab.cli import app

PLOTS = ("load_heatmap.png", "srp.png", "sch.png", "cache_hit_rate.png", "divergence.png", "arank.png")


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 40)
    en, es = tmp_path / "en.txt", tmp_path / "es.txt"
    en.write_text("In the beginning God created the heavens.\nThe earth was empty.\n\nLet there be light.\n")
    es.write_text("En el principio creó Dios los cielos.\nLa tierra estaba vacía.\n\nSea la luz.\n")
    return {"text": text, "en": en, "es": es}


def run_cli(target: Path, out: Path, corpus: dict[str, Path], *extra: str) -> None:
    args = [
        "analyze",
        str(target),
        "--out",
        str(out),
        "--text",
        str(corpus["text"]),
        "--parallel",
        str(corpus["en"]),
        str(corpus["es"]),
        "--seq-len",
        "32",
        "--num-seqs",
        "4",
        "--batch-size",
        "2",
        "--n-boot",
        "50",
        "--arank-samples",
        "2",
        "--no-progress",
        *extra,
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)


def check_report(out: Path, plots=PLOTS) -> str:
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for name in plots:
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name
        assert f"({name})" in md and f'src="{name}"' in html
    data = json.loads((out / "analysis.json").read_text())
    assert data["layers"] and data["srp"]
    return md


def test_analyze_moelm_checkpoint(tmp_path, corpus):
    from moelab.models import MoELM, MoELMConfig

    torch.manual_seed(0)
    ck = MoELM(
        MoELMConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, num_experts=8, top_k=2)
    ).save_pretrained(tmp_path / "ck")
    out = tmp_path / "report"
    run_cli(ck, out, corpus)
    md = check_report(out)
    assert "SRP L=4" in md and "SRP L=16" in md and "lookahead" in md and "Cross-lingual" in md
    data = json.loads((out / "analysis.json").read_text())
    assert len(data["divergence"]) == 2 and data["divergence"][0]["pairs"] == 3
    assert len(data["arank"]) == 2
    # the saved trace reloads and its sidecar holds the sequence lengths
    tr = moelab.Trace.load(out / "trace.safetensors")
    assert tr.layers == data["layers"]
    assert json.loads((out / "trace.safetensors.json").read_text())["sequence_lengths"] == [32] * 4

    # a saved trace is a valid target too (no model: no ARank or divergence)
    out2 = tmp_path / "from_trace"
    res = CliRunner().invoke(
        app,
        ["analyze", str(out / "trace.safetensors"), "--out", str(out2), "--n-boot", "20", "--no-progress"],
    )
    assert res.exit_code == 0, res.output
    check_report(out2, plots=("load_heatmap.png", "srp.png", "sch.png", "cache_hit_rate.png"))
    again = json.loads((out2 / "analysis.json").read_text())
    assert again["metrics"] == data["metrics"]


def test_analyze_tiny_transformers_moe(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OlmoeConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    transformers.OlmoeForCausalLM(cfg).save_pretrained(tmp_path / "olmoe")
    out = tmp_path / "report"
    run_cli(tmp_path / "olmoe", out, corpus)
    md = check_report(out)
    data = json.loads((out / "analysis.json").read_text())
    assert len(data["layers"]) == 2 and data["num_experts"] == [8, 8] and data["top_k"] == [2, 2]
    assert "Cross-lingual" in md and len(data["arank"]) == 2


def test_analyze_reports_bad_targets(tmp_path):
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "missing"), "--no-progress"])
    assert res.exit_code == 2 and "neither a trace file nor a model directory" in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "empty"), "--no-progress"])
    assert res.exit_code == 2 and "config.json" in res.output
    res = CliRunner().invoke(app, ["analyze", str(tmp_path), "--segment-lengths", "4,x", "--no-progress"])
    assert res.exit_code != 0


def test_ragged_routings_get_srp_sch_and_cache_curves(tmp_path):
    """Expert choice (0..E experts per token) and capacity drops: every curve, read per token set."""
    from moelab.analysis.cache import ragged_cache_sizes, simulate_cache
    from moelab.analysis.lrc import sch_curve

    torch.manual_seed(0)
    ec = moelab.MoE(16, num_experts=4, top_k=2, router="expert_choice")
    capped = moelab.MoE(16, num_experts=4, top_k=2, router="topk", router_kwargs={"capacity_factor": 0.5})
    model = torch.nn.Sequential(ec, capped)
    with moelab.trace(model) as tr:
        model(torch.randn(4, 16, 16))
    res = analyze_trace(tr, [16] * 4, AnalysisOptions(segment_lengths=(4,), n_boot=20))
    assert len(res["layers"]) == 2 and set(res["ragged"]) == set(res["layers"])
    for name in res["layers"]:
        r = tr.routing(name)
        per_tok = r.experts_per_token()
        assert int(per_tok.min()) != int(per_tok.max())  # really ragged
        assert res["srp"][name]["4"]["sequences"] == 4
        # SCH of the report = the mean over sequences of the per-sequence padded-index curves
        seqs = list(torch.split(r.topk_index(fill=-1), [16] * 4))
        want = sch_curve(seqs, 4, 4)
        got = res["sch"][name]["4"]
        assert got["estimate"] == pytest.approx([float(want[m - 1]) for m in got["cache_size"]])
        cache = res["cache"][name]
        assert cache["cache_size"] == [float(m) for m in ragged_cache_sizes(per_tok, 4)]
        m = int(cache["cache_size"][0])
        hits = sum(simulate_cache(s, 4, m, "lru").hits for s in seqs)
        assert cache["lru"][0] == pytest.approx(hits / int(per_tok.sum()))
    drops = [res["ragged"][n]["capacity_dropped"] for n in res["layers"]]
    assert drops[0] is None and drops[1] > 0.3  # expert choice records no request counts
    files = write_report(res, tmp_path)
    assert files["srp"].is_file() and files["sch"].is_file() and files["cache"].is_file()
    md = (tmp_path / "report.md").read_text()
    assert "Ragged routing" in md and "capacity-dropped" in md


# ------------------------------------------------------------------------ the report directory
@pytest.fixture
def saved_trace(tmp_path: Path) -> Path:
    """A two-layer trace of 4 sequences x 16 tokens, saved as runs/demo/topk/trace.safetensors."""
    from moelab.analysis.runner import save_trace

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        moelab.MoE(16, num_experts=4, top_k=2), moelab.MoE(16, num_experts=4, top_k=2)
    )
    with moelab.trace(model) as tr:
        model(torch.randn(4, 16, 16))
    return save_trace(tr, tmp_path / "runs" / "demo" / "topk" / "trace.safetensors", [16] * 4)


def test_default_out_dir_is_named_after_the_parent_directories(tmp_path):
    from moelab.cli.analyze import default_out_dir

    (tmp_path / "runs" / "demo" / "topk" / "final").mkdir(parents=True)
    assert default_out_dir(tmp_path / "runs/demo/topk/final") == Path("runs/analyze/demo-topk-final")
    assert default_out_dir(tmp_path / "runs/demo/topk/seed0/final") == Path("runs/analyze/demo-topk-seed0-final")
    assert default_out_dir(tmp_path / "runs/demo/sinkhorn/final") == Path("runs/analyze/demo-sinkhorn-final")
    (tmp_path / "runs" / "x.safetensors").write_bytes(b"")
    assert default_out_dir(tmp_path / "runs" / "x.safetensors") == Path("runs/analyze/x")


def test_report_is_named_defined_and_never_overwritten_silently(saved_trace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["analyze", str(saved_trace), "--n-boot", "10", "--segment-lengths", "4", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "analyze" / "demo-topk-trace"  # named after the parent directories
    assert (out / "coactivation.png").is_file()

    # one-line definitions first, inline code rendered, a docs link that works from the folder
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert md.index("## Definitions") < md.index("## Load, entropy")
    for term in ("max/mean", "CV", "entropy", "NMI top1", "co-activation", "SRP", "SCH", "cache hit rate"):
        assert f"- **{term}" in md, term
    assert "**divergence**" not in md and "**ARank**" not in md  # no such section in this report
    assert "`" not in html and "<code>max_e n_e / mean_e n_e</code>" in html
    link = md.split("[docs/analysis.md](")[1].split(")")[0]
    docs = Path(__file__).resolve().parents[2] / "docs" / "analysis.md"
    assert link == docs.as_uri()  # the report is outside the checkout: an absolute link
    assert f'href="{link}"' in html
    inside = docs.parents[1] / "runs" / "analyze" / "x"
    assert docs_link(inside)[0].endswith("(../../../docs/analysis.md).")  # inside: relative

    # a second run refuses; --force replaces what a report wrote, and nothing else
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "already holds a report" in res.output and "--force" in res.output
    (out / "divergence.png").write_bytes(b"stale")  # a plot an earlier run with --parallel wrote
    (out / "notes.txt").write_text("mine")
    res = CliRunner().invoke(app, [*args, "--force"])
    assert res.exit_code == 0, res.output
    assert not (out / "divergence.png").exists() and (out / "notes.txt").read_text() == "mine"


def test_analyze_trace_warns_when_sequences_are_unknown(saved_trace):
    from moelab.analysis.runner import load_trace

    tr, lengths = load_trace(saved_trace)
    assert lengths == [16] * 4
    opts = AnalysisOptions(segment_lengths=(4,), n_boot=10)
    with pytest.warns(UserWarning, match=r"lengths=None reads each layer's tokens as one sequence"):
        one = analyze_trace(tr, None, opts)
    per_seq = analyze_trace(tr, lengths, opts)
    assert one["sequences"] == [1, 1] and per_seq["sequences"] == [4, 4]
    name = tr.layers[0]
    assert per_seq["srp"][name]["4"]["sequences"] == 4


def test_tokenizer_options_resolve_to_moelab_data_and_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from moelab.cli.analyze import _override_tokenizer
    from moelab.data.tokenizers import BPETokenizer, ByteTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "in": 2, "the": 3, "beginning": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "hf_tok")
    assert fast("in the beginning")["input_ids"] == [1, 2, 3, 4]  # the tokenizer itself adds <s>

    hf = _override_tokenizer(str(tmp_path / "hf_tok"), 5)
    assert hf.encode("in the beginning") == [2, 3, 4]  # analysis windows get no special tokens
    assert isinstance(_override_tokenizer(str(tmp_path / "tokenizer.json"), 5), BPETokenizer)
    assert isinstance(_override_tokenizer("bytes", 300), ByteTokenizer)
    with pytest.raises(ValueError, match="needs vocab_size >= 256"):
        _override_tokenizer("bytes", 5)
    with pytest.raises(ValueError, match="--tokenizer must be"):
        _override_tokenizer(str(tmp_path / "missing"), 5)
