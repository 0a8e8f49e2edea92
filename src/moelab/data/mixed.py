"""A mixed-modality corpus, offline: small grey images as patch tokens, each after its class name.

MoMa and ProMoE route by token type (text / image). This corpus gives them one stream where both
kinds of token interleave and every token carries its type:

    b"ankle boot: " <49 image tokens> b"\\n"  b"shirt: " <49 image tokens> b"\\n" ...
     type 0 (text)   type 1 (image)    0

- **Fashion-MNIST** (Debian ``dataset-fashion-mnist``: 60,000 train and 10,000 test images,
  28 x 28, under ``/usr/share/datasets/fashion-mnist``): each image is cut into 4 x 4-pixel
  patches (7 x 7 = 49 tokens, row-major); a patch's token is its mean grey level quantised to 16
  levels. Train images form the train stream, test images the val stream.
- **digits** (``sklearn.datasets.load_digits``, which ships inside scikit-learn: 1,797 images,
  8 x 8, 17 grey levels): 2 x 2-pixel patches (16 tokens), same quantisation; the last 10% of
  images (in the dataset's order) are val.

Our reading of "4x4-patch tokens, 16 grey levels" (the issue's words): one token per patch, its
mean quantised, so the image vocabulary is 16 symbols (not 16^16 patch patterns).

Vocabulary: bytes 0-255 are text (the byte tokenizer's), 256-271 the 16 grey levels. Types:
``TEXT = 0``, ``IMAGE = 1``.

``--data mixed`` takes Fashion-MNIST when the Debian package is installed and otherwise falls
back to digits, saying so; ``mixed:fashion`` insists on Fashion-MNIST (the error gives the install
line) and ``mixed:digits`` asks for digits.
"""

from __future__ import annotations

import gzip
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from moelab.data.corpus import Corpus

TEXT, IMAGE = 0, 1
LEVELS = 16  # grey levels of an image token
MIXED = "mixed"
SOURCES = ("mixed", "mixed:fashion", "mixed:digits")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "sudo apt-get install dataset-fashion-mnist"
FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def is_mixed_source(source: object) -> bool:
    """Whether a data source names this corpus (``"mixed"``, ``"mixed:fashion"``, ``"mixed:digits"``)."""
    return isinstance(source, str) and source.split(":")[0] == MIXED


class MixedTokenizer:
    """Bytes for text (ids 0-255) and 16 grey levels for image patches (ids 256-271)."""

    name = "mixed"
    vocab_size = 256 + LEVELS
    image_offset = 256

    def encode(self, text: str | bytes) -> list[int]:
        """Text only (an image is encoded by ``encode_image``)."""
        return list(text.encode("utf-8") if isinstance(text, str) else text)

    def encode_image(self, levels: np.ndarray) -> list[int]:
        """Patch grey levels ``[n]`` in ``[0, 16)`` as token ids."""
        return (np.asarray(levels, dtype=np.int64).reshape(-1) + self.image_offset).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        """Text bytes as text; an image token as one character of a 16-step grey ramp."""
        ramp = " .:-=+*#%@ABCDEF"
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
            else:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(ramp[i - self.image_offset])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_json(self) -> dict:
        return {"type": "mixed", "vocab_size": self.vocab_size}


def patch_levels(images_NHW: np.ndarray, patch: int, max_value: float) -> np.ndarray:
    """``[N, (H/patch) * (W/patch)]`` int: each ``patch x patch`` block's mean, quantised to
    ``LEVELS`` levels of ``[0, max_value]`` (row-major patches)."""
    n, h, w = images_NHW.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch={patch}")
    blocks = images_NHW.reshape(n, h // patch, patch, w // patch, patch).astype(np.float64).mean(axis=(2, 4))
    q = np.floor(blocks / max_value * LEVELS).astype(np.int64)
    return np.clip(q, 0, LEVELS - 1).reshape(n, -1)


def interleave(
    names: list[str], labels: np.ndarray, levels_NP: np.ndarray, tok: MixedTokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, types)``: per image ``"<class name>: "`` (text), its patch tokens (image), ``"\\n"`` (text)."""
    heads = [np.array(tok.encode(f"{name}: "), dtype=np.uint16) for name in names]
    newline = np.array(tok.encode("\n"), dtype=np.uint16)
    image = (levels_NP + tok.image_offset).astype(np.uint16)
    tokens, types = [], []
    for lab, img in zip(labels.tolist(), image, strict=True):
        head = heads[lab]
        tokens += [head, img, newline]
        types += [np.full(len(head), TEXT, np.uint8), np.full(len(img), IMAGE, np.uint8), np.zeros(1, np.uint8)]
    return np.concatenate(tokens), np.concatenate(types)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian header, then uint8 data), gzipped."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_available(directory: Path = FASHION_DIR) -> bool:
    return all((directory / f"{s}-{k}-idx{d}-ubyte.gz").is_file() for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1)))


def load_fashion(directory: Path = FASHION_DIR) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((train images, labels), (test images, labels))`` of Fashion-MNIST from the Debian package."""
    if not fashion_available(directory):
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed (looked in {directory}); install it with: {FASHION_INSTALL}"
        )
    split = lambda s: (_read_idx(directory / f"{s}-images-idx3-ubyte.gz"), _read_idx(directory / f"{s}-labels-idx1-ubyte.gz"))  # noqa: E731
    return split("train"), split("t10k")


def load_digits_images() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """sklearn's digits (bundled with scikit-learn), the last 10% as val."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits fallback needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    images, labels = d.images.astype(np.float64), d.target.astype(np.int64)
    cut = int(round(len(images) * 0.9))
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def load_mixed(source: str = MIXED) -> tuple[Corpus, MixedTokenizer, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The mixed corpus (module docstring): ``(corpus, tokenizer, train_tokens, val_tokens,
    train_types, val_types)``; ``moelab.data.load_data("mixed")`` wraps it in a ``Data``."""
    if source not in SOURCES:
        raise ValueError(f"mixed data source must be one of {SOURCES}, got {source!r}")
    kind = source.partition(":")[2] or ("fashion" if fashion_available() else "digits")
    if source == MIXED and kind == "digits":
        warnings.warn(
            f"Fashion-MNIST is not installed ({FASHION_INSTALL}); --data mixed falls back to sklearn's digits",
            stacklevel=2,
        )
    tok = MixedTokenizer()
    if kind == "fashion":
        (xtr, ytr), (xva, yva) = load_fashion()
        names, patch, top = FASHION_CLASSES, 4, 256.0
    else:
        (xtr, ytr), (xva, yva) = load_digits_images()
        names, patch, top = DIGIT_CLASSES, 2, 17.0
    train_tokens, train_types = interleave(list(names), ytr, patch_levels(xtr, patch, top), tok)
    val_tokens, val_types = interleave(list(names), yva, patch_levels(xva, patch, top), tok)
    corpus = Corpus(name=f"mixed:{kind}", train=[(f"{kind}-train", b"")], val=[(f"{kind}-val", b"")])
    corpus.summary = (
        f"mixed:{kind}: {len(xtr)} train / {len(xva)} val images ({patch}x{patch} patches, {LEVELS} grey levels) "
        f"with class names; {len(train_tokens)} train / {len(val_tokens)} val tokens, "
        f"{train_types.mean():.0%} image"
    )
    return corpus, tok, train_tokens, val_tokens, train_types, val_types
