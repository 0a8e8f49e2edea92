"""The built-in tasks (moelab.data.tasks): determinism, disjoint splits, targets recomputed
independently of the generators, exact metrics on hand-made cases, chrF against hand-computed
values, the Debian-backed tasks skipped cleanly, and the token mask for fine-tuning."""

from __future__ import annotations

import gzip
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from moelab.data import bibles
from moelab.data import tasks as T
from moelab.data.tokenizers import ByteTokenizer

SMALL = {"train": 60, "val": 20, "test": 20}
GENERATED = ("arithmetic", "brackets", "sort")
BIBLE_MISSING = bibles.bibles_missing()
FASHION_MISSING = T.task_unavailable("fashion")


def available(names=T.TASK_NAMES):
    return [n for n in names if T.task_unavailable(n) is None]


def body(ex: T.Example) -> str:
    """The task input: the prompt without its instruction line and final newline."""
    head, rest = ex.prompt.split("\n", 1)
    assert head == T.INSTRUCTIONS[ex.task] and rest.endswith("\n")
    return rest[:-1]


# --------------------------------------------------------------------------------------------------
# API, determinism, splits
# --------------------------------------------------------------------------------------------------
def test_load_tasks_api_and_bad_input():
    tasks = T.load_tasks(["sort", "arithmetic"], seed=3, sizes={"train": 10})
    assert list(tasks) == ["sort", "arithmetic"]
    task = tasks["sort"]
    assert (task.name, task.metric, task.instruction) == ("sort", T.EXACT_MATCH, T.INSTRUCTIONS["sort"])
    assert [len(task.examples(s)) for s in T.SPLITS] == [10, T.DEFAULT_SIZES["val"], T.DEFAULT_SIZES["test"]]
    assert all(isinstance(e, T.Example) and e.task == "sort" for e in task.examples("train"))
    assert list(T.load_tasks("brackets", sizes=SMALL)) == ["brackets"]  # one name as a string
    with pytest.raises(ValueError, match="split must be one of"):
        task.examples("dev")
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        T.load_tasks(["poetry"])
    with pytest.raises(ValueError, match="sizes keys"):
        T.load_tasks("sort", sizes={"dev": 3})
    with pytest.raises(ValueError, match=r"sizes\['train'\]"):
        T.load_tasks("sort", sizes={"train": -1})
    with pytest.raises(TypeError, match="seed must be an int"):
        T.load_tasks("sort", seed=1.5)
    with pytest.raises(ValueError, match="ran out"):
        T.load_tasks("code", sizes={"train": 10**6})


def test_every_task_is_deterministic_under_a_seed():
    names = available()
    a, b, c = (T.load_tasks(names, seed=s, sizes=SMALL) for s in (0, 0, 1))
    for n in names:
        for s in T.SPLITS:
            assert a[n].examples(s) == b[n].examples(s), (n, s)
        assert a[n].examples("test") != c[n].examples("test"), n  # another seed, other examples


def test_splits_are_disjoint_and_val_test_do_not_depend_on_train_size():
    names = available()
    tasks = T.load_tasks(names, seed=0)
    for n in names:
        prompts = [{e.prompt for e in tasks[n].examples(s)} for s in T.SPLITS]
        assert [len(p) for p in prompts] == [T.DEFAULT_SIZES[s] for s in T.SPLITS], n  # unique inside
        assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2]), n
    # code: split by file, so no source file lends functions to two splits
    files = [{e.source.rsplit(":", 1)[0] for e in tasks["code"].examples(s)} for s in T.SPLITS]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
    small = T.load_tasks(names, seed=0, sizes={"train": 7})
    for n in names:
        for s in ("val", "test"):
            assert small[n].examples(s) == tasks[n].examples(s), (n, s)


# --------------------------------------------------------------------------------------------------
# targets recomputed independently
# --------------------------------------------------------------------------------------------------
# the word problems read back with patterns of their own: each sentence is one operation
_STEPS = [
    (re.compile(r"^\w+ has (\d+) \w+\.$"), "{}"),
    (re.compile(r"^(?:\w+ buys|\w+ finds|A friend gives \w+) (\d+) more \w+\.$"), "({} + {})"),
    (re.compile(r"^\w+ (?:gives away|loses) (\d+) \w+\.$"), "({} - {})"),
    (re.compile(r"^\w+ ends up with (\d+) times as many \w+\.$"), "({} * {})"),
    (re.compile(r"^\w+ splits the \w+ into (\d+) equal piles and keeps one pile\.$"), "({} // {})"),
]


def expression_of(problem: str) -> str:
    sentences = re.findall(r"[^.?]+[.?]", problem)
    assert sentences[-1].strip().startswith("How many")
    expr = None
    for s in sentences[:-1]:
        for pattern, form in _STEPS:
            m = pattern.match(s.strip())
            if m:
                expr = form.format(m.group(1)) if expr is None else form.format(expr, m.group(1))
                break
        else:
            raise AssertionError(f"unread sentence {s!r}")
    return expr


def test_arithmetic_answers_equal_the_evaluated_expression():
    task = T.load_tasks("arithmetic", seed=5)["arithmetic"]
    ops_seen = set()
    for s in T.SPLITS:
        for e in task.examples(s):
            expr = expression_of(body(e))
            value = eval(expr)  # noqa: S307 (our own digits and operators)
            assert e.target == str(value) and value >= 0
            ops_seen |= set(re.findall(r"//|[+*-]", expr))
    assert ops_seen == {"+", "-", "*", "//"}


def test_arithmetic_division_is_exact():
    rng = __import__("random").Random(0)
    for _ in range(500):
        problem, answer = T.arithmetic_problem(rng)
        expr = expression_of(problem)
        assert eval(expr.replace("//", "/")) == int(answer)  # noqa: S307 (true division agrees)


def test_sort_targets_are_sorted_inputs():
    task = T.load_tasks("sort", seed=2)["sort"]
    for e in task.examples("train") + task.examples("test"):
        direction, numbers = body(e).split(": ")
        xs = [int(x) for x in numbers.split(", ")]
        want = sorted(xs, reverse=direction == "descending")
        assert [int(x) for x in e.target.split(", ")] == want


def test_bracket_targets_close_the_prefix():
    pairs = {")": "(", "]": "[", "}": "{", ">": "<"}
    task = T.load_tasks("brackets", seed=4)["brackets"]
    for e in task.examples("train") + task.examples("val"):
        prefix, closers = body(e).split(), e.target.split()
        stack = []
        for b in prefix:  # a valid prefix: every closer matches the innermost open bracket
            if b in pairs:
                assert stack and stack.pop() == pairs[b], e.prompt
            else:
                stack.append(b)
        assert stack and len(closers) == len(stack)  # something is open; no extra closer
        for b in closers:  # the target closes them, innermost first, and leaves nothing open
            assert b in pairs and stack.pop() == pairs[b]
        assert not stack


def test_code_targets_are_the_next_line_of_the_stdlib_source():
    task = T.load_tasks("code", seed=0, sizes=SMALL)["code"]
    root = Path(sysconfig.get_paths()["stdlib"])
    for e in task.examples("train") + task.examples("test"):
        rel, line = e.source.rsplit(":", 1)
        src = (root / rel).read_text(encoding="utf-8").split("\n")
        code = body(e).split("\n")
        start = int(line) - 1
        assert re.match(r"\s*(async\s+)?def\s", src[start]) and code[0].startswith(("def", "async"))
        got = [ln.strip() for ln in src[start : start + len(code)]]
        assert got == [ln.strip() for ln in code], e.source  # the prompt is the source, dedented
        rest = [ln for ln in src[start + len(code) :] if ln.strip()]
        assert rest[0].strip() == e.target.strip() and e.target == e.target.rstrip()


@pytest.mark.skipif(FASHION_MISSING is not None, reason=str(FASHION_MISSING))
def test_fashion_text_is_the_pooled_image_and_the_label_its_class():
    task = T.load_tasks("fashion", seed=0, sizes=SMALL)["fashion"]

    def read(name: str, offset: int) -> np.ndarray:
        return np.frombuffer(gzip.open(T.FASHION_DIR / name).read()[offset:], dtype=np.uint8)

    raw = {
        "train": (read("train-images-idx3-ubyte.gz", 16), read("train-labels-idx1-ubyte.gz", 8)),
        "test": (read("t10k-images-idx3-ubyte.gz", 16), read("t10k-labels-idx1-ubyte.gz", 8)),
    }
    classes = "T-shirt/top Trouser Pullover Dress Coat Sandal Shirt Sneaker Bag Ankle_boot".split()
    for split in T.SPLITS:
        for e in task.examples(split):
            part, index = e.source.removeprefix("fashion-").split(":")
            assert part == ("test" if split == "test" else "train")  # test images from the test file
            images, labels = raw[part]
            image = torch.tensor(images[int(index) * 784 : (int(index) + 1) * 784], dtype=torch.float64)
            pooled = torch.nn.functional.avg_pool2d(image.view(1, 1, 28, 28), 4)[0, 0]
            want = "\n".join("".join(str(int(v * 10 // 256)) for v in row) for row in pooled.tolist())
            assert body(e) == want
            assert e.target == classes[labels[int(index)]].replace("_", " ")


# --------------------------------------------------------------------------------------------------
# the Debian-backed tasks
# --------------------------------------------------------------------------------------------------
def test_bible_tasks_skip_with_the_install_line_without_diatheke(monkeypatch, capsys):
    monkeypatch.setattr(bibles.shutil, "which", lambda name: None)
    tasks = T.load_tasks(["translate_en_es", "sort", "translate_es_en"], sizes=SMALL)
    assert list(tasks) == ["sort"]
    err = capsys.readouterr().err
    assert err.count("apt-get install -y diatheke sword-text-web sword-text-sparv") == 2
    assert "skipping task 'translate_en_es'" in err and "skipping task 'translate_es_en'" in err


def test_fashion_skips_with_the_install_line_when_absent(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(T, "FASHION_DIR", tmp_path)
    assert T.load_tasks(["fashion"], sizes=SMALL) == {}
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.skipif(BIBLE_MISSING is not None, reason=str(BIBLE_MISSING))
def test_bible_tasks_are_verse_aligned_and_split_alike():
    tasks = T.load_tasks(["translate_en_es", "translate_es_en"], seed=0)
    en = bibles.read_bible(bibles.ENGLISH_MODULE, "John")
    es = bibles.read_bible(bibles.SPANISH_MODULE, "John")
    checked = 0
    for s in T.SPLITS:
        for e in tasks["translate_en_es"].examples(s):
            if e.source.startswith("John "):
                assert (body(e), e.target) == (en[e.source], es[e.source])
                checked += 1
        for e in tasks["translate_es_en"].examples(s):
            if e.source.startswith("John "):
                assert (body(e), e.target) == (es[e.source], en[e.source])
        # the same verses in each split, both directions
        assert {e.source for e in tasks["translate_en_es"].examples(s)} == {
            e.source for e in tasks["translate_es_en"].examples(s)
        }
    assert checked > 100
    assert tasks["translate_en_es"].metric == T.CHRF


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
def test_exact_match_normalisation_per_task():
    cases = [
        (
            "arithmetic",
            ["42", "The answer is 1,234.\nmore", "x = 3 + 4 = 7", "forty", "\n\n 9"],
            ["42", "1234", "7", "40", "9"],
            [1, 1, 1, 0, 1],
        ),  # fmt: skip
        ("brackets", ["] ) >", "])>", "] )", ") ] >"], ["] ) >"] * 4, [1, 1, 0, 0]),
        ("sort", ["1, 2, 3", "1,2,3", "[1, 2, 3]", "1, 3, 2"], ["1, 2, 3"] * 4, [1, 1, 1, 0]),
        ("fashion", ["ankle  boot", "Ankle boot\nBag", "Sneaker"], ["Ankle boot"] * 3, [1, 1, 0]),
        (
            "code",
            ["        return  x + 1\n    pass", "return x+1", "return x + 1"],
            ["    return x + 1"] * 3,
            [1, 0, 1],
        ),  # fmt: skip
    ]
    for task, preds, targets, hits in cases:
        for p, t, h in zip(preds, targets, hits, strict=True):
            assert T.score(task, [p], [t]) == h, (task, p, t)
        assert T.score(task, preds, targets) == pytest.approx(sum(hits) / len(hits))


def test_chrf_against_hand_computed_values():
    # "ab" vs "abc": 1-grams P=2/2 R=2/3, 2-grams P=1/1 R=1/2, 3-grams: none in the hypothesis,
    # so not counted; P=1, R=7/12, chrF2 = 5PR/(4P+R) = 7/11
    assert T.chrf(["ab"], ["abc"]) == pytest.approx(700 / 11, abs=1e-12)
    # corpus statistics add up before the F-score: 1-grams (2+0)/(2+1) and (2+0)/(3+1),
    # 2-grams 1/1 and 1/2 ("x", "y" have no 2-grams): P=(2/3+1)/2=5/6, R=1/2, F=25/46
    assert T.chrf(["ab", "x"], ["abc", "y"]) == pytest.approx(2500 / 46, abs=1e-12)
    assert T.chrf(["el agua"], ["el agua"]) == pytest.approx(100.0)
    assert T.chrf(["el  agua "], ["elagua"]) == pytest.approx(100.0)  # whitespace is not a character
    assert T.chrf(["xyz"], ["abc"]) == 0.0
    assert T.chrf([""], ["abc"]) == 0.0
    # beta weighs recall: hypothesis "a" for "ab" has P=1, R=1/2
    assert T.chrf(["a"], ["ab"], beta=1.0) == pytest.approx(100 * 2 * 0.5 / 1.5)
    assert T.score("translate_en_es", ["ab\nignored"], ["abc"]) == pytest.approx(7 / 11)
    with pytest.raises(ValueError, match="equal length"):
        T.chrf(["a"], ["a", "b"])
    with pytest.raises(TypeError, match="sequence of strings"):
        T.score("sort", "1, 2", "1, 2")
    with pytest.raises(ValueError, match="task_name must be one of"):
        T.score("poetry", ["a"], ["a"])


def test_chrf_matches_sacrebleu_when_installed():
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = __import__("random").Random(0)
    alphabet = "abcde fgháé,."
    for _ in range(300):
        n = rng.randint(1, 4)
        hyp = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 15))) for _ in range(n)]
        ref = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 15))) for _ in range(n)]
        assert T.chrf(hyp, ref) == pytest.approx(sacrebleu.corpus_chrf(hyp, [ref]).score, abs=1e-9)


# --------------------------------------------------------------------------------------------------
# tokenisation for causal-LM fine-tuning
# --------------------------------------------------------------------------------------------------
def test_encode_examples_masks_the_prompt_with_the_byte_tokenizer():
    ex = [T.Example("Q: é?\n", "12", "arithmetic"), T.Example("Sort: 3, 1\n", "1, 3", "sort")]
    batch = T.encode_examples(ex, ByteTokenizer())
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.dtype == torch.long
    for i, e in enumerate(ex):
        p, t = list(e.prompt.encode()), list(e.target.encode()) + [ord("\n")]
        n = len(p) + len(t)
        assert ids[i, :n].tolist() == p + t
        assert labels[i, : len(p)].tolist() == [-100] * len(p) and labels[i, len(p) : n].tolist() == t
        assert mask[i, :n].tolist() == [1] * n and mask[i, n:].sum() == 0
        assert (labels[i, n:] == -100).all()
    # too long: the prompt loses its start, the target stays whole
    cut = T.encode_examples(ex[:1], ByteTokenizer(), max_length=5)
    assert cut["input_ids"][0].tolist() == list(b"?\n12\n")
    assert cut["labels"][0].tolist() == [-100, -100, *list(b"12\n")]
    with pytest.raises(ValueError, match="non-empty"):
        T.encode_examples([], ByteTokenizer())
    with pytest.raises(TypeError, match="encode"):
        T.encode_examples(ex, object())


def test_encode_examples_with_a_transformers_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    words = ["<eos>", "<pad>", "Sort", ":", "3", ",", "1", "\n", "Q", "?", " "]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|\W"), behavior="isolated")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")
    ex = [T.Example("Sort: 3, 1\n", "1, 3", "sort"), T.Example("Q?\n", "1", "arithmetic")]
    batch = T.encode_examples(ex, tok)
    for i, e in enumerate(ex):
        p = tok.encode(e.prompt, add_special_tokens=False)
        t = tok.encode(e.target, add_special_tokens=False) + [tok.eos_token_id]
        n = len(p) + len(t)
        assert batch["input_ids"][i, :n].tolist() == p + t
        assert batch["labels"][i].tolist() == [-100] * len(p) + t + [-100] * (batch["labels"].shape[1] - n)
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
    target_ids = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert tok.convert_ids_to_tokens(target_ids) == ["1", ",", " ", "3", "<eos>"]
