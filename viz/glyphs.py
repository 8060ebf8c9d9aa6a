"""Text a drawing can show: characters a common sans-serif font lacks, and invisible ones, become ``\\uXXXX``.

Feature labels and tokens hold anything a tokenizer knows: CJK, Armenian, emoji, control characters, zero-width
joiners, private-use code points. Drawn with a font that lacks them they become boxes (tofu); a control character even
makes the SVG invalid XML (graphviz copies it through). A drawing therefore shows only the characters of
``DRAWABLE_RANGES`` (what DejaVu Sans covers in full: Latin, Greek, Cyrillic, Armenian, Hebrew and most Arabic
letters, punctuation, arrows, mathematical operators, box drawing and geometric shapes, and the ``⏎`` and ``␣`` tokens
are shown with; DejaVu Sans is where fontconfig falls back to from graphviz's Helvetica on Linux, and Mac and Windows
fonts cover the same), and of those only letters, marks, numbers, punctuation, symbols and the plain space. CJK, Thai,
Hangul, Devanagari, emoji and the like are escaped: the fonts a drawing meets most often lack them. Every character
not drawn is written as Python writes it: ``\\u9ad3``, ``\\x07``, ``\\U0001f600``, so a reader still sees which code
point the token holds. ``tests/test_render.py`` checks the ranges against the DejaVu Sans installed (with
``fc-query``) where there is one.

Hover texts (tooltips) are shown by the browser with the system's fonts; they keep printable characters and only lose
what XML cannot hold or nobody can see (:func:`visible_text`).
"""

from __future__ import annotations

import unicodedata

# (first, last) code points, inclusive; every assigned printable character in them is in DejaVu Sans.
DRAWABLE_RANGES: tuple[tuple[int, int], ...] = (
    (0x0020, 0x007E),  # Basic Latin
    (0x00A0, 0x02AF),  # Latin-1 Supplement, Latin Extended-A and -B, IPA
    (0x0300, 0x034F),  # combining diacritical marks (most)
    (0x0370, 0x04FF),  # Greek and Coptic, Cyrillic
    (0x0531, 0x0556), (0x0559, 0x055F), (0x0561, 0x0587), (0x0589, 0x058A),  # Armenian
    (0x05D0, 0x05EA),  # Hebrew letters
    (0x0621, 0x063A), (0x0640, 0x0655), (0x0660, 0x0670), (0x0679, 0x06BF),  # Arabic (most letters, digits)
    (0x1E00, 0x1EFB),  # Latin Extended Additional
    (0x1F00, 0x1FFF),  # Greek Extended
    (0x2000, 0x209F),  # General Punctuation, superscripts and subscripts
    (0x2190, 0x22FF),  # arrows, mathematical operators
    (0x23CE, 0x23CE),  # ⏎, how a newline token is shown
    (0x2423, 0x2423),  # ␣, how feature labels show a space token
    (0x2500, 0x25FF),  # box drawing, block elements, geometric shapes
)
_PRINTABLE = frozenset("LMNPS")  # Unicode major categories: letter, mark, number, punctuation, symbol


def _escaped(char: str) -> str:
    return ascii(char)[1:-1]  # '\x07', '\u9ad3', '\U0001f600'


def _in_ranges(code: int) -> bool:
    return any(first <= code <= last for first, last in DRAWABLE_RANGES)


def drawable_char(char: str) -> bool:
    """Whether ``char`` is drawn as itself (see the module docstring)."""
    if char == " ":
        return True
    return unicodedata.category(char)[0] in _PRINTABLE and _in_ranges(ord(char))


def drawable_text(text: str) -> str:
    """``text`` with every character a drawing cannot show written as its escape, e.g. ``“髓”`` -> ``“\\u9ad3”``."""
    return "".join(c if drawable_char(c) else _escaped(c) for c in text)


def visible_text(text: str) -> str:
    """``text`` for a hover text: only control, format, unassigned, private-use and surrogate characters and
    spaces other than the plain space are escaped (the browser's fonts show the rest)."""
    return "".join(_escaped(c) if c != " " and unicodedata.category(c)[0] in "CZ" else c for c in text)
