"""Built-in multi-task instruction data, offline, each task with an exact metric.

Seven tasks (``TASK_NAMES``), each deterministic under a seed and split into ``train`` / ``val`` /
``test`` (``SPLITS``) with no prompt in two splits:

- ``code``: Python code completion from the running interpreter's standard library (the corpus
  of ``moelab.data.corpus``): the prompt is a function's signature and docstring (or, without a
  docstring, its signature and first body line), the target the next line. Split by file.
  Metric: exact match of the first line, whitespace-normalised.
- ``translate_en_es`` / ``translate_es_en``: Bible verse translation between the World English
  Bible and the Reina-Valera 1909 (Debian ``sword-text-web``, ``sword-text-sparv``, read with
  ``diatheke`` through ``moelab.data.bibles``); both directions split the same verses the same
  way. Metric: corpus chrF (Popović 2015) with sacrebleu's defaults, divided by 100.
- ``arithmetic``: generated word problems (add, take away, multiply, share equally) with a
  non-negative integer answer. Metric: exact match of the final number.
- ``brackets``: a generated valid prefix of a bracket sequence over ``() [] {} <>``; the target
  closes every open bracket. Metric: exact match ignoring whitespace.
- ``sort``: generated lists of integers to sort ascending or descending. Metric: exact match of
  the list of integers.
- ``fashion``: a Fashion-MNIST image (Debian ``dataset-fashion-mnist``) as text, 28x28 averaged
  over 4x4 blocks to 7x7 and quantised to grey levels 0-9, one row of digits per line; the
  target is the class name. Test images come from the official test file. Metric: exact match,
  case-insensitive.

Prompts are ``instruction + "\\n" + input + "\\n"`` and targets a single line; a prediction is
scored on its first non-blank line (generation may run on). Splits fill in the order test, val,
train from one seeded stream, so changing the train size leaves val and test as they were.
Without the Debian packages ``load_tasks`` prints the install line and skips those tasks.

``encode_examples`` turns examples into ``input_ids`` / ``labels`` (``-100`` on the prompt) /
``attention_mask`` tensors for causal-LM fine-tuning, with a transformers tokenizer or moelab's.
"""

from __future__ import annotations

import ast
import functools
import gzip
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moelab.data.bibles import ENGLISH_MODULE, SPANISH_MODULE, bibles_missing, parallel_verses
from moelab.data.corpus import stdlib_files

TASK_NAMES = ("code", "translate_en_es", "translate_es_en", "arithmetic", "brackets", "sort", "fashion")
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 2000, "val": 200, "test": 200}
EXACT_MATCH = "exact_match"
CHRF = "chrf"
IGNORE_INDEX = -100  # labels that the loss skips (PyTorch's and transformers' convention)

INSTRUCTIONS = {
    "code": "Write the next line of this Python function.",
    "translate_en_es": "Translate this Bible verse from English to Spanish.",
    "translate_es_en": "Translate this Bible verse from Spanish to English.",
    "arithmetic": "Solve the word problem. Answer with a whole number.",
    "brackets": "Close every open bracket of this sequence.",
    "sort": "Sort the numbers in the order asked.",
    "fashion": "Name the Fashion-MNIST class of this 7x7 image (grey levels 0-9, one row per line).",
}
METRICS = {name: CHRF if name.startswith("translate_") else EXACT_MATCH for name in TASK_NAMES}

# Gospels first: ~3800 aligned verses read in well under the time of the whole Bible (~5 s);
# the whole Bible only when more verses are asked for.
BIBLE_KEYS = ("Matt-John", "Gen-Rev")

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL_LINE = "apt-get install -y dataset-fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_GRID = 7  # 28 / 4
FASHION_LEVELS = 10  # grey levels, written as one digit each

# code task limits (our choice): short enough for a small model's context, varied across files
CODE_MAX_PER_FILE = 8
CODE_MAX_PROMPT_CHARS = 1000
CODE_MAX_TARGET_CHARS = 100
CODE_MAX_SIGNATURE_LINES = 12
CODE_MAX_DOCSTRING_LINES = 40


# --------------------------------------------------------------------------------------------------
# data types
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One instruction example: the model reads ``prompt`` and should write ``target``.

    ``source`` says where it came from (``"argparse.py:1234"``, ``"John 3:16"``,
    ``"fashion-test:17"``; empty for generated tasks)."""

    prompt: str
    target: str
    task: str
    source: str = ""


@dataclass(frozen=True)
class Task:
    """A built task: its name, metric (``"exact_match"`` or ``"chrf"``), instruction and splits."""

    name: str
    metric: str
    instruction: str
    splits: Mapping[str, list[Example]] = field(repr=False)

    def examples(self, split: str) -> list[Example]:
        """The examples of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.splits[split]

    def score(self, predictions: Sequence[str], targets: Sequence[str]) -> float:
        """``score(self.name, predictions, targets)``."""
        return score(self.name, predictions, targets)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.splits[s])}" for s in SPLITS)
        return f"Task({self.name!r}, metric={self.metric!r}, {sizes})"


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
def first_line(text: str) -> str:
    """The first non-blank line of ``text`` (``""`` when there is none): what a prediction is scored on."""
    for line in text.splitlines():
        if line.strip():
            return line
    return ""


_INT = re.compile(r"-?\d+")


def normalize_answer(task_name: str, text: str) -> str:
    """What the exact-match metric of ``task_name`` compares: ``text``'s first non-blank line,
    normalised (code: whitespace runs collapsed and ends stripped, so indentation is ignored;
    arithmetic: the last integer, thousands commas removed; brackets: whitespace removed; sort:
    the integers, comma-joined; fashion: lower case, whitespace collapsed; translation: the line
    as it is, since chrF drops whitespace itself)."""
    _check_task_name(task_name)
    line = first_line(text)
    if task_name == "arithmetic":
        found = _INT.findall(re.sub(r"(?<=\d),(?=\d{3})", "", line))
        return str(int(found[-1])) if found else ""
    if task_name == "brackets":
        return "".join(line.split())
    if task_name == "sort":
        return ",".join(str(int(x)) for x in _INT.findall(line))
    if task_name == "fashion":
        return " ".join(line.lower().split())
    if task_name == "code":
        return " ".join(line.split())
    return line.strip()


def exact_match(predictions: Sequence[str], targets: Sequence[str], task_name: str) -> float:
    """Share of predictions equal to their target after ``normalize_answer(task_name, .)``, in [0, 1]."""
    _check_pairs(predictions, targets)
    hits = sum(
        normalize_answer(task_name, p) == normalize_answer(task_name, t)
        for p, t in zip(predictions, targets, strict=True)
    )
    return hits / len(targets)


def chrf(
    hypotheses: Sequence[str], references: Sequence[str], *, char_order: int = 6, beta: float = 2.0
) -> float:
    """Corpus-level chrF, 0..100: Popović 2015, "chrF: character n-gram F-score for automatic MT
    evaluation", with sacrebleu 2.x's defaults (``sacrebleu.metrics.CHRF()``: character n-grams
    1..6, beta 2, whitespace removed, case kept, one reference per hypothesis, no word n-grams).

    Per order ``n``, character n-gram counts are summed over the corpus: hypothesis n-grams
    (counted only for segments whose reference has n-grams of that order), reference n-grams, and
    matches (clipped counts). Precision ``P_n`` and recall ``R_n`` are averaged over the orders
    where both totals are positive (sacrebleu's effective order), and

        chrF = 100 * (1 + beta^2) * P * R / (beta^2 * P + R),

    0 when ``P + R == 0``.
    """
    _check_pairs(hypotheses, references)
    if isinstance(char_order, bool) or not isinstance(char_order, int) or char_order < 1:
        raise ValueError(f"char_order must be an int >= 1, got {char_order!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    hyp_total, ref_total, match_total = [0] * char_order, [0] * char_order, [0] * char_order
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = "".join(hyp.split()), "".join(ref.split())
        for n in range(1, char_order + 1):
            h_grams = Counter(h[i : i + n] for i in range(len(h) - n + 1))
            r_grams = Counter(r[i : i + n] for i in range(len(r) - n + 1))
            # a hypothesis n-gram counts only where the reference has n-grams of that order
            hyp_total[n - 1] += sum(h_grams.values()) if r_grams else 0
            ref_total[n - 1] += sum(r_grams.values())
            match_total[n - 1] += sum(min(c, r_grams[g]) for g, c in h_grams.items() if g in r_grams)
    precisions = [m / h for h, r, m in zip(hyp_total, ref_total, match_total, strict=True) if h > 0 and r > 0]
    recalls = [m / r for h, r, m in zip(hyp_total, ref_total, match_total, strict=True) if h > 0 and r > 0]
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p + r == 0:
        return 0.0
    b2 = beta * beta
    return 100.0 * (1 + b2) * p * r / (b2 * p + r)


def score(task_name: str, predictions: Sequence[str], targets: Sequence[str]) -> float:
    """The task's metric on ``predictions`` against ``targets``, in [0, 1] (chrF divided by 100).

    Each prediction is scored on its first non-blank line (``first_line``)."""
    _check_task_name(task_name)
    if METRICS[task_name] == CHRF:
        _check_pairs(predictions, targets)
        return chrf([first_line(p) for p in predictions], list(targets)) / 100.0
    return exact_match(predictions, targets, task_name)


def _check_task_name(task_name: str) -> None:
    if task_name not in METRICS:
        raise ValueError(f"task_name must be one of {TASK_NAMES}, got {task_name!r}")


def _check_pairs(predictions: Sequence[str], targets: Sequence[str]) -> None:
    for arg, seq in (("predictions", predictions), ("targets", targets)):
        if isinstance(seq, str) or not all(isinstance(s, str) for s in seq):
            raise TypeError(f"{arg} must be a sequence of strings, got {type(seq).__name__}")
    if len(predictions) != len(targets) or not targets:
        raise ValueError(
            f"predictions and targets must be non-empty and of equal length, got {len(predictions)} and {len(targets)}"
        )


# --------------------------------------------------------------------------------------------------
# split filling: one seeded stream of groups, test first, then val, then train
# --------------------------------------------------------------------------------------------------
Candidate = tuple[str, str, str]  # (input text, target, source)


def _fill(
    name: str,
    sizes: Mapping[str, int],
    streams: Mapping[str, Iterator[list[Candidate]]],
    max_misses: int = 10_000,
) -> dict[str, list[Example]]:
    """Fill test, val and train (in that order) from ``streams[split]`` (streams may be shared).

    A group (all examples of one source file, say) never straddles two splits: when a split
    fills up inside a group, the rest of the group is dropped. Prompts are unique across splits.
    """
    seen: set[str] = set()
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for split in ("test", "val", "train"):
        want, misses = sizes[split], 0
        while len(out[split]) < want:
            group = next(streams[split], None)
            if group is None:
                have = {s: len(v) for s, v in out.items()}
                raise ValueError(
                    f"task {name!r}: its source ran out at {have} examples; sizes asked: {dict(sizes)}"
                )
            added = 0
            for text, target, source in group:
                prompt = f"{INSTRUCTIONS[name]}\n{text}\n"
                if prompt in seen or len(out[split]) >= want:
                    continue
                seen.add(prompt)
                out[split].append(Example(prompt, target, name, source))
                added += 1
            misses = 0 if added else misses + 1
            if misses > max_misses:  # a generator whose space is used up
                raise ValueError(
                    f"task {name!r}: no new distinct example in {max_misses} draws; ask smaller sizes"
                )
    return out


def _rng(name: str, seed: int) -> random.Random:
    # string seeds hash with SHA-512 in CPython: the same stream on every run and machine
    return random.Random(f"moelab.data.tasks:{name}:{seed}")


def _generated(
    gen: Callable[[random.Random], tuple[str, str]], rng: random.Random
) -> Iterator[list[Candidate]]:
    while True:
        text, target = gen(rng)
        yield [(text, target, "")]


# --------------------------------------------------------------------------------------------------
# generated tasks
# --------------------------------------------------------------------------------------------------
_NAMES = ("Ana", "Ben", "Carla", "Dev", "Eli", "Femi", "Grace", "Hiro", "Ines", "Jon", "Kai", "Lena")
_ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells", "stamps")
# phrasings of each operation; the tests read the problem back with their own patterns
_ADD = ("{n} buys {a} more {items}.", "{n} finds {a} more {items}.", "A friend gives {n} {a} more {items}.")
_SUB = ("{n} gives away {a} {items}.", "{n} loses {a} {items}.")
_MUL = ("{n} ends up with {a} times as many {items}.",)
_DIV = ("{n} splits the {items} into {a} equal piles and keeps one pile.",)
ARITH_MAX = 999  # every intermediate value stays in 0..ARITH_MAX


def arithmetic_problem(rng: random.Random) -> tuple[str, str]:
    """A word problem of 1-3 steps on a starting count, and its answer (a non-negative int)."""
    n, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, 60)
    sentences = [f"{n} has {value} {items}."]
    for _ in range(rng.randint(1, 3)):
        ops = ["add", "add", "sub", "sub"]
        if value * 2 <= ARITH_MAX:
            ops.append("mul")
        if any(value % k == 0 for k in range(2, 6)):
            ops.append("div")
        op = rng.choice(ops)
        if op == "add":
            a = rng.randint(1, min(40, ARITH_MAX - value))
            value += a
            tpl = rng.choice(_ADD)
        elif op == "sub":
            a = rng.randint(0 if value == 0 else 1, value)
            value -= a
            tpl = rng.choice(_SUB)
        elif op == "mul":
            a = rng.randint(2, max(2, min(4, ARITH_MAX // max(value, 1))))
            value *= a
            tpl = rng.choice(_MUL)
        else:
            a = rng.choice([k for k in range(2, 6) if value % k == 0])
            value //= a
            tpl = rng.choice(_DIV)
        sentences.append(tpl.format(n=n, a=a, items=items))
    sentences.append(f"How many {items} does {n} have now?")
    return " ".join(sentences), str(value)


_OPEN, _CLOSE = "([{<", ")]}>"


def bracket_prefix(rng: random.Random, min_len: int = 2, max_len: int = 16) -> tuple[str, str]:
    """A valid prefix of a bracket sequence with at least one bracket open, and the closers that
    complete it (innermost first), both space-separated."""
    length = rng.randint(min_len, max_len)
    tokens: list[str] = []
    stack: list[str] = []
    for _ in range(length):
        if stack and rng.random() < 0.45:
            tokens.append(_CLOSE[_OPEN.index(stack.pop())])
        else:
            b = rng.choice(_OPEN)
            stack.append(b)
            tokens.append(b)
    if not stack:
        b = rng.choice(_OPEN)
        stack.append(b)
        tokens.append(b)
    closers = [_CLOSE[_OPEN.index(b)] for b in reversed(stack)]
    return " ".join(tokens), " ".join(closers)


def sort_problem(rng: random.Random, min_len: int = 3, max_len: int = 10, high: int = 99) -> tuple[str, str]:
    """``"ascending: 5, 3, 9"`` (or descending) and the sorted list ``"3, 5, 9"``."""
    xs = [rng.randint(0, high) for _ in range(rng.randint(min_len, max_len))]
    descending = rng.random() < 0.5
    direction = "descending" if descending else "ascending"
    return f"{direction}: {', '.join(map(str, xs))}", ", ".join(map(str, sorted(xs, reverse=descending)))


def _build_generated(name: str, gen: Callable[[random.Random], tuple[str, str]], seed: int, sizes):
    stream = _generated(gen, _rng(name, seed))
    return _fill(name, sizes, {"test": stream, "val": stream, "train": stream})


# --------------------------------------------------------------------------------------------------
# code: next line of a stdlib function
# --------------------------------------------------------------------------------------------------
_DEF = re.compile(r"^([ \t]*)(?:async[ \t]+)?def[ \t]+\w+")
_DOC_OPEN = re.compile(r"^[ \t]*[rRuU]?(\"\"\"|''')")


def _dedent(line: str, indent: str) -> str:
    return line[len(indent) :] if line.startswith(indent) else line.lstrip()


def _parses_as(snippet: str, target: str) -> ast.AST | None:
    """The function parsed from ``snippet`` (a block opener as the last line gets a ``pass``)."""
    tries = [snippet]
    if target.rstrip().endswith(":") or "#" in target:
        tries.append(snippet + "\n" + target[: len(target) - len(target.lstrip())] + "    pass")
    for code in tries:
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError):
            continue
        if len(tree.body) == 1 and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
            return tree.body[0]
    return None


def code_candidates(text: str) -> list[tuple[int, str, str]]:
    """``(line number, prompt code, target line)`` for the functions of a Python source.

    The prompt is the function from its ``def`` line through its docstring, dedented to the
    ``def``; the target is the next non-blank line. Without a docstring the prompt runs through
    the first body line (a one-line statement). Candidates are found line by line and each is
    checked by parsing the snippet alone (``ast``), which is ~10x cheaper than parsing whole
    files; comment targets, multi-line target statements and over-long ones are left out.
    """
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        m = _DEF.match(line)
        if not m:
            continue
        indent = m.group(1)
        depth, j = 0, i
        while j < len(lines) and j < i + CODE_MAX_SIGNATURE_LINES:  # the signature's last line
            code = lines[j].split("#", 1)[0]
            depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
            if depth <= 0 and code.rstrip().endswith(":"):
                break
            j += 1
        else:
            continue
        k = _next_nonblank(lines, j + 1)
        if k is None:
            continue
        doc = _DOC_OPEN.match(lines[k])
        if doc:
            quote = doc.group(1)
            rest = lines[k][doc.end() :]
            end = k if quote in rest else None
            if end is None:
                end = next(
                    (
                        e
                        for e in range(k + 1, min(len(lines), k + CODE_MAX_DOCSTRING_LINES))
                        if quote in lines[e]
                    ),
                    None,
                )
            if end is None:
                continue
            prompt_end = end
        else:
            prompt_end = k  # the first body line, a one-line statement (checked below)
        t = _next_nonblank(lines, prompt_end + 1)
        if t is None:
            continue
        target = lines[t].rstrip()
        if target.lstrip().startswith("#") or len(target.strip()) > CODE_MAX_TARGET_CHARS:
            continue
        if len(lines[t]) - len(lines[t].lstrip()) <= len(indent):  # not inside the function
            continue
        prompt = "\n".join(_dedent(ln, indent).rstrip() for ln in lines[i : prompt_end + 1])
        if len(prompt) > CODE_MAX_PROMPT_CHARS:
            continue
        target = _dedent(target, indent)
        fn = _parses_as("\n".join(_dedent(ln, indent) for ln in lines[i : t + 1]), target)
        if fn is None or len(fn.body) != 2:  # the docstring or first line, then the target's statement
            continue
        first, second = fn.body
        if doc and not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)):
            continue
        if not doc and first.end_lineno != first.lineno:  # prompt must hold the whole first statement
            continue
        if second.lineno != t - i + 1:  # the target is where the next statement starts
            continue
        out.append((i + 1, prompt, target))
    return out


def _next_nonblank(lines: list[str], start: int) -> int | None:
    return next((k for k in range(start, len(lines)) if lines[k].strip()), None)


@functools.cache
def _code_candidates_of(path: str) -> tuple[tuple[int, str, str], ...]:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return ()
    return tuple(code_candidates(text.replace("\r\n", "\n")))


@functools.lru_cache(maxsize=4)
def _stdlib_files() -> tuple[tuple[str, str], ...]:
    return tuple((rel, str(p)) for rel, p in stdlib_files())


def _code_stream(seed: int) -> Iterator[list[Candidate]]:
    files = list(_stdlib_files())
    rng = _rng("code", seed)
    rng.shuffle(files)
    for rel, path in files:
        cands = list(_code_candidates_of(path))
        if len(cands) > CODE_MAX_PER_FILE:
            cands = sorted(rng.sample(cands, CODE_MAX_PER_FILE))
        if cands:
            yield [(prompt, target, f"{rel}:{line}") for line, prompt, target in cands]


def _build_code(seed: int, sizes):
    stream = _code_stream(seed)
    return _fill("code", sizes, {"test": stream, "val": stream, "train": stream})


# --------------------------------------------------------------------------------------------------
# translation: Bible verses
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _verses(key: str) -> tuple[tuple[str, str, str], ...]:
    return tuple(parallel_verses(ENGLISH_MODULE, SPANISH_MODULE, key=key))


def _build_translation(name: str, seed: int, sizes):
    need = sum(sizes.values())
    for key in BIBLE_KEYS:
        verses = list(_verses(key))
        if len(verses) >= need:
            break
    # a verse whose English or Spanish text came earlier is dropped in both directions (the
    # split drops repeated prompts), and one permutation serves both (the seed alone picks it):
    # a verse is in the same split in en->es and es->en, so multi-task training never sees a test
    # verse the other way round
    seen: set[str] = set()
    unique = []
    for v in verses:
        if v[1] not in seen and v[2] not in seen:
            unique.append(v)
        seen.update(v[1:])
    verses = unique
    random.Random(f"moelab.data.tasks:bible:{seed}").shuffle(verses)
    src, tgt = (1, 2) if name == "translate_en_es" else (2, 1)
    stream = iter([[(v[src], v[tgt], v[0])] for v in verses])
    return _fill(name, sizes, {"test": stream, "val": stream, "train": stream})


# --------------------------------------------------------------------------------------------------
# fashion: Fashion-MNIST as text
# --------------------------------------------------------------------------------------------------
def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file (MNIST's format): big-endian magic ``0x0000 08 ndim``, ``ndim`` int32 sizes, uint8 data."""
    data = gzip.decompress(path.read_bytes())
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x0800 + ndim:
        raise ValueError(f"{path} is not a {ndim}-d uint8 IDX file (magic {magic:#x})")
    shape = [int.from_bytes(data[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=4)
def _fashion(directory: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = FASHION_FILES[part]
    images = _read_idx(Path(directory) / images_file, 3)
    labels = _read_idx(Path(directory) / labels_file, 1)
    if len(images) != len(labels) or images.shape[1:] != (28, 28):
        raise ValueError(
            f"Fashion-MNIST {part} files in {directory} are inconsistent: {images.shape}, {labels.shape}"
        )
    return images, labels


def render_image(image_HW: np.ndarray) -> str:
    """A 28x28 uint8 image as 7 lines of 7 digits: the mean of each 4x4 block, quantised to
    ``floor(mean * 10 / 256)`` (grey levels 0-9)."""
    if image_HW.shape != (28, 28):
        raise ValueError(f"image_HW must be 28x28, got {image_HW.shape}")
    cell = 28 // FASHION_GRID
    means = image_HW.astype(np.float64).reshape(FASHION_GRID, cell, FASHION_GRID, cell).mean(axis=(1, 3))
    levels = np.floor(means * FASHION_LEVELS / 256).astype(int)
    return "\n".join("".join(str(v) for v in row) for row in levels)


def _fashion_stream(directory: str, part: str, rng: random.Random) -> Iterator[list[Candidate]]:
    images, labels = _fashion(directory, part)
    order = list(range(len(images)))
    rng.shuffle(order)
    for i in order:
        yield [(render_image(images[i]), FASHION_CLASSES[int(labels[i])], f"fashion-{part}:{i}")]


def _build_fashion(seed: int, sizes):
    d = str(FASHION_DIR)
    train = _fashion_stream(d, "train", _rng("fashion-train", seed))
    test = _fashion_stream(d, "test", _rng("fashion-test", seed))
    return _fill("fashion", sizes, {"test": test, "val": train, "train": train})


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def task_unavailable(name: str) -> str | None:
    """Why ``name`` cannot be built on this machine (with the line that installs what is missing), or None."""
    _check_task_name(name)
    if name.startswith("translate_"):
        return bibles_missing()
    if name == "fashion":
        missing = [f for pair in FASHION_FILES.values() for f in pair if not (FASHION_DIR / f).is_file()]
        if missing:
            return f"Fashion-MNIST is not installed ({FASHION_DIR} lacks {missing}); install it with: {FASHION_INSTALL_LINE}"
    return None


def _builders() -> dict[str, Callable[[int, dict[str, int]], dict[str, list[Example]]]]:
    return {
        "code": _build_code,
        "translate_en_es": functools.partial(_build_translation, "translate_en_es"),
        "translate_es_en": functools.partial(_build_translation, "translate_es_en"),
        "arithmetic": functools.partial(_build_generated, "arithmetic", arithmetic_problem),
        "brackets": functools.partial(_build_generated, "brackets", bracket_prefix),
        "sort": functools.partial(_build_generated, "sort", sort_problem),
        "fashion": _build_fashion,
    }


def load_tasks(
    names: str | Iterable[str] | None = None,
    *,
    seed: int = 0,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, Task]:
    """Build the tasks ``names`` (default: all of ``TASK_NAMES``) for ``seed``.

    Args:
        names: task names, or one name; ``None`` for every task.
        seed: picks the examples and their split; the same seed gives the same examples.
        sizes: examples per split, e.g. ``{"train": 500}``; missing splits take ``DEFAULT_SIZES``
            (2000 / 200 / 200).

    A task whose Debian package is missing is skipped with a line on stderr saying what to
    install; the result then lacks it. Raises ``ValueError`` when a source cannot give ``sizes``.
    """
    if names is None:
        wanted = list(TASK_NAMES)
    elif isinstance(names, str):
        wanted = [names]
    else:
        wanted = list(names)
    for n in wanted:
        if n not in TASK_NAMES:
            raise ValueError(f"unknown task {n!r}; the tasks are {TASK_NAMES}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    full = dict(DEFAULT_SIZES)
    for split, size in (sizes or {}).items():
        if split not in SPLITS:
            raise ValueError(f"sizes keys must be among {SPLITS}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"sizes[{split!r}] must be an int >= 0, got {size!r}")
        full[split] = size
    builders = _builders()
    tasks: dict[str, Task] = {}
    for n in dict.fromkeys(wanted):
        reason = task_unavailable(n)
        if reason is not None:
            print(f"moelab.data.tasks: skipping task {n!r}: {reason}", file=sys.stderr)
            continue
        tasks[n] = Task(n, METRICS[n], INSTRUCTIONS[n], builders[n](seed, full))
    return tasks


# --------------------------------------------------------------------------------------------------
# tokenisation for causal-LM fine-tuning
# --------------------------------------------------------------------------------------------------
def encoder_of(tokenizer: Any) -> tuple[Callable[[str], list[int]], int, int]:
    """``(encode, end_id, pad_id)`` for a transformers tokenizer or a moelab one: ``encode(text)``
    adds no special token; ``end_id`` ends a target (EOS, ``<|endoftext|>``, else ``"\\n"``);
    ``pad_id`` pads rows (the pad token, else ``end_id``)."""
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must have an encode(text) method, got {type(tokenizer).__name__}")
    if hasattr(tokenizer, "eos_token_id"):  # transformers: no BOS/EOS added inside, EOS appended once
        encode = functools.partial(tokenizer.encode, add_special_tokens=False)
        end = tokenizer.eos_token_id
        pad = getattr(tokenizer, "pad_token_id", None)
    else:  # moelab: BPETokenizer has eot_id, ByteTokenizer has no special token
        encode = tokenizer.encode
        end = getattr(tokenizer, "eot_id", None)
        pad = None
    if end is None:  # targets are one line: a newline ends them
        newline = encode("\n")
        if len(newline) != 1:
            raise ValueError("the tokenizer has no end-of-text token and no single token for '\\n'")
        end = newline[0]
    return encode, int(end), int(end if pad is None else pad)


def encode_examples(
    examples: Sequence[Example], tokenizer: Any, *, max_length: int | None = None
) -> dict[str, Tensor]:
    """Token tensors for causal-LM fine-tuning on ``examples``.

    Each row is ``encode(prompt) + encode(target) + [end]``, right-padded to the longest row;
    ``labels`` equal ``input_ids`` on the target and its end token and ``-100`` on the prompt and
    padding (a transformers causal LM shifts labels itself). Prompt and target are encoded
    separately, so the boundary is exact. The end token is the tokenizer's EOS (transformers),
    ``<|endoftext|>`` (moelab BPE), else the token of ``"\\n"`` (moelab bytes). A row longer than
    ``max_length`` loses the start of its prompt (our choice: the target and the text next to it
    are kept); a target alone longer than ``max_length`` is cut at its end.

    Returns ``{"input_ids", "labels", "attention_mask"}``, int64 tensors ``[N, L]``.
    """
    if not examples:
        raise ValueError("examples must be a non-empty sequence of Example")
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise ValueError(f"max_length must be an int >= 1 or None, got {max_length!r}")
    encode, end, pad = encoder_of(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []
    for ex in examples:
        if not isinstance(ex, Example):
            raise TypeError(f"examples must hold Example objects, got {type(ex).__name__}")
        prompt, target = list(encode(ex.prompt)), list(encode(ex.target)) + [end]
        if max_length is not None and len(prompt) + len(target) > max_length:
            target = target[:max_length]
            prompt = prompt[len(prompt) - (max_length - len(target)) :] if max_length > len(target) else []
        rows.append((prompt, target))
    length = max(len(p) + len(t) for p, t in rows)
    input_ids_NL = torch.full((len(rows), length), pad, dtype=torch.long)
    labels_NL = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask_NL = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (prompt, target) in enumerate(rows):
        n_p, n = len(prompt), len(prompt) + len(target)
        input_ids_NL[i, :n] = torch.tensor(prompt + target, dtype=torch.long)
        labels_NL[i, n_p:n] = torch.tensor(target, dtype=torch.long)
        mask_NL[i, :n] = 1
    return {"input_ids": input_ids_NL, "labels": labels_NL, "attention_mask": mask_NL}
