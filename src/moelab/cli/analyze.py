"""CLI commands of this subpackage; ``register(app)`` is called by ``moelab.cli``.

- ``moelab analyze TARGET``: trace a model (MoELM checkpoint or transformers model directory) on a
  corpus, or read a saved trace, and write a markdown + HTML report with plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


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
    progress: bool = True,
    console: Any = None,
) -> dict[str, Path]:
    """The body of ``moelab analyze`` (callable from Python). Returns the written files by name."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from moelab.analysis.arank import arank_per_layer
    from moelab.analysis.cache import DEFAULT_LOOKAHEAD
    from moelab.analysis.crosslingual import crosslingual_divergence
    from moelab.analysis.lrc import SEGMENT_LENGTHS
    from moelab.analysis.report import AnalysisOptions, analyze_trace, write_report
    from moelab.analysis.runner import (
        corpus_texts,
        load_target,
        read_parallel,
        run_trace,
        save_trace,
        sentence_routings,
        token_windows,
    )

    console = console or Console()
    tgt = load_target(target, tokenizer=tokenizer)
    out_dir = Path(out) if out is not None else Path("runs") / "analyze" / Path(str(target)).resolve().name
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = [f"target kind: {tgt.kind}"]
    bar = Progress(
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(bar_width=28),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
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
        title=f"moelab routing analysis: {Path(str(target)).name}",
        source=str(target),
        divergence=divergence,
        arank=arank,
        notes=notes,
    )
    if tgt.kind != "trace":
        files["trace"] = out_dir / "trace.safetensors"
    return files


def register(app: typer.Typer) -> None:
    """Add this subpackage's commands to ``app``."""

    @app.command("analyze")
    def analyze_cmd(
        target: Annotated[
            Path, typer.Argument(help="MoELM checkpoint dir, transformers model dir, or trace file")
        ],
        out: Annotated[
            Path | None, typer.Option("--out", "-o", help="report dir (default runs/analyze/<name>)")
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
        no_progress: Annotated[bool, typer.Option("--no-progress", help="hide the progress bar")] = False,
    ) -> None:
        """Trace a model on a corpus (or read a trace) and write a markdown + HTML routing report."""
        from rich.console import Console

        console = Console()
        Ls = _parse_ints(segment_lengths, "--segment-lengths")
        par = None if parallel is None or parallel[0] is None else (parallel[0], parallel[1])
        try:
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
                progress=not no_progress,
                console=console,
            )
        except (ValueError, FileNotFoundError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
        console.print(f"report: {files['markdown']}  {files['html']}")
        for name, path in files.items():
            if name not in ("markdown", "html"):
                console.print(f"  {name}: {path}")
