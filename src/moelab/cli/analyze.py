"""``moelab analyze TARGET``: trace a model on a corpus, or read a saved trace, and write a
markdown + HTML routing report with plots. ``register(app)`` is called by ``moelab.cli``.

Targets (``load_target``): a ``MoELM`` checkpoint directory (``config.json`` +
``model.safetensors``), a transformers model directory (``AutoModelForCausalLM``, through
``moelab.integrations.hf.loading``), or a saved trace (``Trace.save`` file, with an optional
``<file>.json`` sidecar holding the sequence lengths). Loading lives here, not in
``moelab.analysis``: analysis sits below the integrations and never imports transformers.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

# What a report directory holds; a directory holding any of the first three is a report.
REPORT_FILES = ("report.md", "report.html", "analysis.json")
REPORT_ARTEFACTS = REPORT_FILES + (
    "trace.safetensors",
    "trace.safetensors.json",
    "load_heatmap.png",
    "coactivation.png",
    "mutual_information.png",
    "srp.png",
    "sch.png",
    "cache_hit_rate.png",
    "divergence.png",
    "arank.png",
)


# --------------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------------
@dataclass
class Target:
    """What was loaded: ``kind`` is ``"moelm"``, ``"transformers"`` or ``"trace"``."""

    kind: str
    path: Path
    model: Any = None  # torch.nn.Module
    tokenizer: Any = None  # anything with encode(text) -> list[int]
    trace: Any = None  # moelab.Trace
    lengths: list[int] | None = None
    max_len: int | None = None
    notes: list[str] = field(default_factory=list)


def _is_moelm_config(cfg: dict[str, Any]) -> bool:
    return "model_type" not in cfg and {"n_layers", "num_experts", "d_model"} <= set(cfg)


def load_target(path: str | Path, tokenizer: str | None = None) -> Target:
    """Load a MoELM checkpoint, a transformers model directory or a trace file (module doc)."""
    p = Path(path)
    if p.is_file():
        from moelab.analysis.runner import load_trace

        trace, lengths = load_trace(p)
        return Target("trace", p, trace=trace, lengths=lengths)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is neither a trace file nor a model directory")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{p} has no config.json: not a MoELM checkpoint nor a transformers model directory"
        )
    if _is_moelm_config(json.loads(cfg_file.read_text())):
        from moelab.models import MoELM

        model = MoELM.from_pretrained(p).eval()
        t = Target("moelm", p, model=model, max_len=model.config.max_seq_len)
        t.tokenizer = _moelm_tokenizer(p, model.config.vocab_size, tokenizer)
        return t
    try:
        from moelab.integrations.hf.loading import load_causal_lm
    except ImportError as e:  # pragma: no cover - the [hf] extra is part of the dev install
        raise ImportError(
            "analysing a transformers model needs the [hf] extra (pip install transformers)"
        ) from e
    model = load_causal_lm(p)
    t = Target("transformers", p, model=model, max_len=getattr(model.config, "max_position_embeddings", None))
    t.tokenizer = _hf_tokenizer(p, int(model.config.vocab_size), tokenizer)
    return t


def _tokenizer_file(path: Path) -> Any:
    """A ``tokenizers`` JSON file (moelab's BPE checkpoints) as a ``moelab.data`` tokenizer."""
    from moelab.data.tokenizers import load_tokenizer

    return load_tokenizer(path)


def _byte_tokenizer() -> Any:
    from moelab.data.tokenizers import ByteTokenizer

    return ByteTokenizer()


def _moelm_tokenizer(d: Path, vocab_size: int, override: str | None) -> Any:
    """The tokenizer the checkpoint was trained with (``moelab.data``), unless ``--tokenizer``."""
    from moelab.data.tokenizers import checkpoint_tokenizer

    if override is not None:
        return _override_tokenizer(override, vocab_size)
    try:
        return checkpoint_tokenizer(d, vocab_size)
    except ValueError as e:
        raise ValueError(f"{e}; pass --tokenizer PATH/TO/tokenizer.json") from None


def _hf_tokenizer(d: Path, vocab_size: int, override: str | None) -> Any:
    from moelab.integrations.hf.loading import has_tokenizer_files, load_tokenizer

    if override is not None:
        return _override_tokenizer(override, vocab_size)
    if has_tokenizer_files(d):
        return load_tokenizer(d)
    if vocab_size >= 256:
        return _byte_tokenizer()
    raise ValueError(
        f"{d} has no tokenizer files and vocab_size={vocab_size} < 256 (bytes do not fit); pass --tokenizer"
    )


def _override_tokenizer(spec: str, vocab_size: int) -> Any:
    if spec == "bytes":
        if vocab_size < 256:
            raise ValueError(f"--tokenizer bytes needs vocab_size >= 256, the model has {vocab_size}")
        return _byte_tokenizer()
    p = Path(spec)
    if p.is_file():
        return _tokenizer_file(p)
    if p.is_dir():
        from moelab.integrations.hf.loading import load_tokenizer

        return load_tokenizer(p)
    raise ValueError(
        f"--tokenizer must be 'bytes', a tokenizer.json file or a tokenizer directory, got {spec!r}"
    )


# --------------------------------------------------------------------------------------------------
# the report directory
# --------------------------------------------------------------------------------------------------
def default_out_dir(target: str | Path) -> Path:
    """``runs/analyze/<name>``, ``<name>`` the target's last three path components (a file without
    its suffix) joined by ``-``, counted after the last ``runs`` directory when there is one, and
    one more when a ``seed<k>`` folder (``moelab compare``'s layout) is among them:
    ``runs/demo/topk/final`` -> ``runs/analyze/demo-topk-final``, ``runs/demo/topk/seed0/final`` ->
    ``runs/analyze/demo-topk-seed0-final``. Checkpoints that are all named ``final`` so get
    distinct reports."""
    p = Path(target).resolve()
    dirs = list(p.parent.parts)
    if "runs" in dirs:
        dirs = dirs[len(dirs) - dirs[::-1].index("runs") :]
    parts = [d for d in dirs if d != p.anchor][-3:] + [p.stem if p.is_file() else p.name]
    keep = 4 if any(re.fullmatch(r"seed\d+", x) for x in parts[-3:]) else 3
    return Path("runs") / "analyze" / "-".join(parts[-keep:])


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse a directory that already holds a report unless ``force``; with ``force``, remove the
    files an earlier report wrote there (and nothing else), so no stale plot survives."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} exists and is not a directory")
    existing = [f for f in REPORT_FILES if (out_dir / f).exists()]
    if existing and not force:
        raise FileExistsError(
            f"{out_dir} already holds a report ({', '.join(existing)}); pass --force to overwrite it, "
            "or --out DIR for another directory"
        )
    if force:
        for name in REPORT_ARTEFACTS:
            f = out_dir / name
            if f.is_file():
                f.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _parse_ints(text: str, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=name
        ) from None
    if not vals or any(v < 1 for v in vals):
        raise typer.BadParameter(f"expected positive integers, got {text!r}", param_hint=name)
    return vals


def analyze(
    target: str | Path,
    out: str | Path | None = None,
    *,
    text: list[str] | None = None,
    parallel: tuple[str, str] | None = None,
    seq_len: int | None = None,
    num_seqs: int = 32,
    batch_size: int = 8,
    segment_lengths: tuple[int, ...] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    lookahead: int | None = None,
    max_pairs: int = 256,
    arank_samples: int = 4,
    tokenizer: str | None = None,
    force: bool = False,
    progress: bool = True,
    console: Any = None,
) -> dict[str, Path]:
    """The body of ``moelab analyze`` (callable from Python). Returns the written files by name.

    ``out`` defaults to ``default_out_dir(target)``; a directory that already holds a report is
    refused unless ``force`` (``FileExistsError``).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from moelab.analysis.arank import arank_per_layer
    from moelab.analysis.cache import DEFAULT_LOOKAHEAD
    from moelab.analysis.crosslingual import crosslingual_divergence
    from moelab.analysis.lrc import SEGMENT_LENGTHS
    from moelab.analysis.report import AnalysisOptions, analyze_trace, write_report
    from moelab.analysis.runner import (
        corpus_texts,
        read_parallel,
        run_trace,
        save_trace,
        sentence_routings,
        token_windows,
    )

    console = console or Console()
    out_dir = Path(out) if out is not None else default_out_dir(target)
    prepare_out_dir(out_dir, force)  # before loading or running anything: fail fast
    tgt = load_target(target, tokenizer=tokenizer)
    notes: list[str] = [f"target kind: {tgt.kind}"]
    bar = Progress(
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(bar_width=28),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not progress,
    )
    divergence = arank = None
    with bar:
        if tgt.kind == "trace":
            if text or parallel:
                raise typer.BadParameter(
                    "--text/--parallel need a model, not a trace file", param_hint="TARGET"
                )
            trace, lengths = tgt.trace, tgt.lengths
            if lengths is None:
                notes.append(
                    "no sequence lengths recorded with the trace: it is analysed as one sequence per layer"
                )
            ids = None
        else:
            S = seq_len or min(512, tgt.max_len or 512)
            if tgt.max_len is not None and S > tgt.max_len:
                raise typer.BadParameter(f"--seq-len {S} exceeds the model's maximum length {tgt.max_len}")
            vocab = getattr(getattr(tgt.model, "config", None), "vocab_size", None)
            ids = token_windows(corpus_texts(text), tgt.tokenizer, S, num_seqs, vocab)
            task = bar.add_task("forward", total=int(ids.shape[0]))
            trace, lengths = run_trace(tgt.model, ids, batch_size, on_batch=lambda n: bar.advance(task, n))
            notes.append(
                f"corpus: {', '.join(text) if text else 'stdlib val split'}; {ids.shape[0]} x {S} tokens"
            )
            save_trace(trace, out_dir / "trace.safetensors", lengths, source=str(target))
        assert trace is not None
        seqs = len(lengths) if lengths else 1
        max_seq = max(lengths) if lengths else trace.routing(trace.layers[0]).num_tokens
        Ls = tuple(L for L in (segment_lengths or SEGMENT_LENGTHS) if L <= max_seq) or (max_seq,)
        opts = AnalysisOptions(
            segment_lengths=Ls,
            n_boot=n_boot,
            seed=seed,
            lookahead=DEFAULT_LOOKAHEAD if lookahead is None else lookahead,
        )
        task = bar.add_task("analysis", total=len(trace.layers) + 1)
        with warnings.catch_warnings():
            # A trace without lengths is one sequence per layer: the report's notes say so.
            warnings.filterwarnings("ignore", message="analyze_trace: lengths=None")
            res = analyze_trace(trace, lengths, opts, progress=lambda _: bar.advance(task))
        if parallel is not None and tgt.model is not None:
            pairs = read_parallel(parallel[0], parallel[1], max_pairs)
            task = bar.add_task("parallel", total=2 * len(pairs))
            ra = sentence_routings(
                tgt.model, tgt.tokenizer, [a for a, _ in pairs], tgt.max_len, lambda: bar.advance(task)
            )
            rb = sentence_routings(
                tgt.model, tgt.tokenizer, [b for _, b in pairs], tgt.max_len, lambda: bar.advance(task)
            )
            divergence = crosslingual_divergence(ra, rb, n_boot=n_boot, seed=seed)
            notes.append(f"parallel data: {parallel[0]} / {parallel[1]}, {len(pairs)} sentence pairs")
        if tgt.model is not None and ids is not None and arank_samples > 0:
            task = bar.add_task("arank", total=1)
            sample = ids[:arank_samples]
            ranks = arank_per_layer(tgt.model, sample)
            arank = [
                {"layer": i, "arank": r, "seq_len": int(sample.shape[1]), "samples": int(sample.shape[0])}
                for i, r in enumerate(ranks)
            ]
            bar.advance(task)
    notes.append(
        f"sequences per layer: {seqs}; segment lengths: {list(Ls)}; bootstrap: {n_boot} resamples of sequences"
    )
    files = write_report(
        res,
        out_dir,
        title=f"moelab routing analysis: {default_out_dir(target).name}",
        source=str(target),
        divergence=divergence,
        arank=arank,
        notes=notes,
    )
    if tgt.kind != "trace":
        files["trace"] = out_dir / "trace.safetensors"
    return files


def register(app: typer.Typer) -> None:
    """Add ``moelab analyze`` to ``app``."""

    @app.command("analyze")
    def analyze_cmd(
        target: Annotated[
            Path, typer.Argument(help="MoELM checkpoint dir, transformers model dir, or trace file")
        ],
        out: Annotated[
            Path | None,
            typer.Option("--out", "-o", help="report dir (default runs/analyze/<last 3 path parts>)"),
        ] = None,
        text: Annotated[
            list[str] | None,
            typer.Option("--text", help="text file/folder to run on (repeatable; default: stdlib val)"),
        ] = None,
        parallel: Annotated[
            tuple[str, str] | None,
            typer.Option("--parallel", help="two line-aligned files (e.g. en.txt es.txt)"),
        ] = None,
        seq_len: Annotated[
            int | None, typer.Option(help="tokens per sequence (default min(512, model max))")
        ] = None,
        num_seqs: Annotated[int, typer.Option(help="sequences to trace")] = 32,
        batch_size: Annotated[int, typer.Option(help="sequences per forward")] = 8,
        segment_lengths: Annotated[
            str, typer.Option(help="SRP/SCH segment lengths (<= seq len are used)")
        ] = "4,16,64,256",
        n_boot: Annotated[int, typer.Option(help="bootstrap resamples (LRC paper: 1000)")] = 1000,
        seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
        lookahead: Annotated[
            int | None, typer.Option(help="lookahead cache window in tokens (default 8)")
        ] = None,
        max_pairs: Annotated[int, typer.Option(help="parallel sentence pairs to use")] = 256,
        arank_samples: Annotated[int, typer.Option(help="sequences for ARank (0 disables)")] = 4,
        tokenizer: Annotated[
            str | None,
            typer.Option(help="'bytes', a tokenizer.json or a tokenizer dir (default: from the target)"),
        ] = None,
        force: Annotated[
            bool, typer.Option("--force", help="overwrite a report already in the output directory")
        ] = False,
        no_progress: Annotated[bool, typer.Option("--no-progress", help="hide the progress bar")] = False,
        threads: Annotated[
            int, typer.Option(help="PyTorch threads on CPU (0: the default, 1: measured fastest)")
        ] = 0,
    ) -> None:
        """Trace a model on a corpus (or read a trace) and write a markdown + HTML routing report."""
        from rich.console import Console

        from moelab.cli.options import warn_load
        from moelab.train.resources import torch_threads

        console = Console()
        warn_load(console)
        Ls = _parse_ints(segment_lengths, "--segment-lengths")
        par = None if parallel is None or parallel[0] is None else (parallel[0], parallel[1])
        try:
            with torch_threads(threads):
                files = analyze(
                    target,
                    out,
                    text=text or None,
                    parallel=par,
                    seq_len=seq_len,
                    num_seqs=num_seqs,
                    batch_size=batch_size,
                    segment_lengths=Ls,
                    n_boot=n_boot,
                    seed=seed,
                    lookahead=lookahead,
                    max_pairs=max_pairs,
                    arank_samples=arank_samples,
                    tokenizer=tokenizer,
                    force=force,
                    progress=not no_progress,
                    console=console,
                )
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
        console.print(f"report: {files['markdown']}  {files['html']}")
        for name, path in files.items():
            if name not in ("markdown", "html"):
                console.print(f"  {name}: {path}")
