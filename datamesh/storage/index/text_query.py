"""Turning text into what FTS5 indexes, and a user's query into a safe FTS5 expression.

FTS5's ``unicode61`` tokenizer splits on spaces and punctuation, folds case and (with
``remove_diacritics 2``) accents, so "cafe" finds "Café" and "uber" finds "Über".  Scripts written
without spaces (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar) would become one token per run of
characters, so a word inside a sentence could never be found.  Before indexing we make each such
character its own token by putting :data:`SEGMENT_MARK` (a private-use character declared a separator
to the tokenizer) around it; a query term is segmented the same way and searched as a phrase, so
"東京" matches the adjacent characters 東 京: substring semantics for those scripts, word semantics
for the rest.  The mark is invisible in stored text and removed from snippets.

Query syntax (everything else is treated as literal words, never as FTS5 syntax)::

    word        a token, accents and case ignored
    "a phrase"  adjacent tokens in order
    pre*        tokens starting with "pre"

Terms are ANDed.  A query with no searchable characters is rejected.
"""

from __future__ import annotations

import re

from datamesh.core.errors import ValidationError
from datamesh.core.result import Err, Ok, Result

SEGMENT_MARK = "\ue000"
TOKENIZER = f"unicode61 remove_diacritics 2 separators '{SEGMENT_MARK}'"

_UNSPACED = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff66-\uff9f"  # halfwidth Katakana
    "\U00020000-\U0003134f"  # CJK extensions B..G
)
_UNSPACED_CHAR = re.compile(f"([{_UNSPACED}])")
_TERM = re.compile(r'"([^"]*)"|(\S+)')
_WORDLIKE = re.compile(r"\w", re.UNICODE)


def segment(text: str) -> str:
    """The text as indexed: each character of an unspaced script becomes its own token."""
    if text.isascii():  # O(1) in CPython; ASCII holds neither the mark nor an unspaced script
        return text
    cleaned = text.replace(SEGMENT_MARK, " ")
    if _UNSPACED_CHAR.search(cleaned) is None:
        return cleaned  # most text: nothing to mark, and no template to expand per call
    return _UNSPACED_CHAR.sub(SEGMENT_MARK + r"\1" + SEGMENT_MARK, cleaned)


def desegment(text: str) -> str:
    """Undo :func:`segment` (for snippets)."""
    return text.replace(SEGMENT_MARK, "")


def _quote(term: str) -> str:
    return '"' + segment(term).replace('"', '""') + '"'


def build_match(query: str) -> Result[str, ValidationError]:
    """The FTS5 MATCH expression for ``query``: quoted terms, ANDed; ``*`` suffix kept as a prefix query."""
    parts: list[str] = []
    for match in _TERM.finditer(query):
        phrase, word = match.group(1), match.group(2)
        if phrase is not None:
            if _WORDLIKE.search(phrase):
                parts.append(_quote(phrase))
            continue
        prefix = word.endswith("*")
        body = word.rstrip("*")
        if not _WORDLIKE.search(body):
            continue
        parts.append(_quote(body) + (" *" if prefix else ""))
    if not parts:
        return Err(ValidationError("text", "the query has no searchable characters"))
    return Ok(" AND ".join(parts))
