"""Labels wrapped on word boundaries to fit a node: never cut inside a word.

A label is broken at spaces; a word longer than a line (``tokens/joined/by/slashes``, as logit-lens labels are) may
also break after one of its slashes or before an escaped character (``\\u9ad3``, see :mod:`viz.glyphs`: CJK text has
no spaces and breaks between any two characters). A line may run past ``width`` only when one word is longer than a
line on its own. When the words need more than ``max_lines`` lines, the last line ends with ``…`` after its last whole
word (the full text stays in the node's hover text). Widths are counted in characters: the drawings' fonts are
proportional, ``width`` is chosen to fit an average line.
"""

from __future__ import annotations

import re

ELLIPSIS = "…"
_BREAKS = re.compile(r"(?<=/)(?!/)|(?=\\(?:x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}))")


def _pieces(text: str, width: int) -> list[tuple[str, str]]:
    """(glue, piece): the words of ``text`` (the glue before each is a space), with words longer than ``width``
    split after their slashes and before escaped characters (glue "")."""
    pieces = []
    for word in text.split():
        parts = [p for p in _BREAKS.split(word) if p] if len(word) > width else [word]
        pieces += [(" " if i == 0 else "", part) for i, part in enumerate(parts)]
    return pieces


def wrap_label(text: str, width: int = 20, max_lines: int = 3) -> list[str]:
    """``text`` as lines of at most ``width`` characters (see the module docstring); ``[]`` for blank text.

    Without the ellipsis, the lines joined with the whitespace between them give back ``text``.
    """
    if width < 1 or max_lines < 1:
        raise ValueError(f"width and max_lines must be positive, got {width} and {max_lines}")
    lines: list[str] = []
    for glue, piece in _pieces(text, width):
        if lines and len(lines[-1]) + len(glue) + len(piece) <= width:
            lines[-1] += glue + piece
        else:
            lines.append(piece)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += ELLIPSIS
    return lines
