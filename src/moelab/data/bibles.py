"""Verse-aligned Bibles read through ``diatheke`` (Debian's SWORD front end), offline.

Debian ships the World English Bible (``sword-text-web``, module ``engWEB2015eb``) and the
Reina-Valera 1909 (``sword-text-sparv``, module ``spaRV1909eb``); ``diatheke`` prints their verses
with OSIS markup, which ``parse_diatheke`` removes. Both the cross-lingual routing analysis
(``moelab.analysis.crosslingual``) and the translation tasks (``moelab.data.tasks``) read them
here. Without the packages every reader raises ``DiathekeError`` with the line to install them;
``bibles_missing()`` says so without raising.
"""

from __future__ import annotations

import re
import shutil
import subprocess

# SWORD modules shipped by Debian's sword-text-web and sword-text-sparv packages.
ENGLISH_MODULE = "engWEB2015eb"  # World English Bible (2015), with deuterocanon
SPANISH_MODULE = "spaRV1909eb"  # Reina-Valera 1909
INSTALL_LINE = "apt-get install -y diatheke sword-text-web sword-text-sparv"


class DiathekeError(RuntimeError):
    """diatheke or a SWORD module is missing."""


_INSTALL_HINT = f"install them with: {INSTALL_LINE}"


def diatheke_modules() -> list[str]:
    """Names of the installed SWORD modules (``diatheke -b system -k modulelistnames``)."""
    exe = shutil.which("diatheke")
    if exe is None:
        raise DiathekeError(f"the 'diatheke' program is not installed; {_INSTALL_HINT}")
    out = subprocess.run(
        [exe, "-b", "system", "-k", "modulelistnames"], capture_output=True, text=True, check=False
    )
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]


def bibles_missing(modules: tuple[str, ...] = (ENGLISH_MODULE, SPANISH_MODULE)) -> str | None:
    """Why the Bibles cannot be read here (diatheke or a module missing, with the install line), or None."""
    try:
        installed = diatheke_modules()
    except DiathekeError as e:
        return str(e)
    missing = [m for m in modules if m not in installed]
    if missing:
        return f"SWORD module(s) {missing} are not installed; {_INSTALL_HINT}"
    return None


_REF = re.compile(r"^(.+? \d+:\d+): ?(.*)$")
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?)\]”’»])")
_SPACE_AFTER = re.compile(r"([(\[“‘¿¡«])\s+")


def parse_diatheke(text: str) -> dict[str, str]:
    """Verses ``{"Genesis 1:1": "In the beginning, ..."}`` from diatheke's default (OSIS) output.

    diatheke prints one verse per line, ``<Book> <chapter>:<verse>: <marked-up text>``, possibly
    preceded by a heading in ``<title>``; titles and footnotes are dropped, other tags removed.
    """
    verses: dict[str, str] = {}
    for line in text.splitlines():
        s = re.sub(r"<title\b[^>]*>.*?</title>", " ", line)
        s = re.sub(r"<note\b[^>]*>.*?</note>", " ", s)
        s = re.sub(r"<[^>]*>", " ", s)
        s = " ".join(s.split())
        m = _REF.match(s)
        if not m:
            continue
        body = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", m.group(2))).strip()
        verses[m.group(1)] = body
    return verses


def read_bible(module: str, key: str = "Gen-Rev") -> dict[str, str]:
    """All verses of ``module`` in ``key`` (a diatheke range such as ``"Genesis"`` or ``"Gen-Rev"``).

    Raises ``DiathekeError`` naming the packages to install when diatheke or the module is missing.
    """
    mods = diatheke_modules()
    if module not in mods:
        raise DiathekeError(f"SWORD module {module!r} is not installed (installed: {mods}); {_INSTALL_HINT}")
    exe = shutil.which("diatheke")
    out = subprocess.run([exe, "-b", module, "-k", key], capture_output=True, text=True, check=False)  # type: ignore[list-item]
    verses = parse_diatheke(out.stdout)
    if not verses:
        raise DiathekeError(f"diatheke returned no verses for module {module!r}, key {key!r}")
    return verses


def parallel_verses(
    module_a: str = ENGLISH_MODULE,
    module_b: str = SPANISH_MODULE,
    key: str = "Gen-Rev",
    max_ratio: float = 3.0,
    max_chars: int = 1000,
) -> list[tuple[str, str, str]]:
    """``[(reference, text_a, text_b)]`` for verses present and non-empty in both modules, in the
    order of ``module_b``. Pairs whose lengths differ by more than ``max_ratio`` or that exceed
    ``max_chars`` (an appendix glued to a last verse, a heading inside a verse) are dropped."""
    a, b = read_bible(module_a, key), read_bible(module_b, key)
    out = []
    for ref, tb in b.items():
        ta = a.get(ref, "")
        if not ta or not tb or len(ta) > max_chars or len(tb) > max_chars:
            continue
        if max(len(ta), len(tb)) > max_ratio * min(len(ta), len(tb)):
            continue
        out.append((ref, ta, tb))
    return out
