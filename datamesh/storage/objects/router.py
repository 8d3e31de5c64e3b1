"""Per-region object stores: content of a region only ever goes to that region's store.

``DATAMESH_OBJECTS_URL`` names the base location; each region gets its own sub-folder (or, for
remote backends, prefix).  A region with no store is an error, never a fallback.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

from datamesh.core.errors import ConfigError, NotFound
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import GeoRegion
from datamesh.storage.objects.base import ObjectStore
from datamesh.storage.objects.filesystem import FilesystemObjectStore


class ObjectStoreRouter:
    """Maps each configured region to its object store."""

    def __init__(self, stores: Mapping[GeoRegion, ObjectStore[object]]) -> None:
        self._stores = dict(stores)

    def for_region(self, region: GeoRegion) -> Result[ObjectStore[object], NotFound]:
        store = self._stores.get(region)
        if store is None:
            return Err(NotFound("object store for region", region.value))
        return Ok(store)

    @property
    def regions(self) -> list[GeoRegion]:
        return list(self._stores)

    def close(self) -> None:
        for store in self._stores.values():
            store.close()


def open_object_stores(url: str, *, variable: str = "DATAMESH_OBJECTS_URL") -> Result[ObjectStoreRouter, ConfigError]:
    """Build the router for ``url`` (``file:///path``: one sub-folder per region)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            return Err(ConfigError(variable, f"file URLs must be local, got host {parsed.netloc!r}"))
        root = Path(unquote(parsed.path))
        try:
            stores: dict[GeoRegion, ObjectStore[object]] = {
                region: FilesystemObjectStore(root / region.value)  # type: ignore[misc]
                for region in GeoRegion
            }
        except OSError as exc:
            return Err(ConfigError(variable, f"cannot create object store folders under {root}: {exc}"))
        return Ok(ObjectStoreRouter(stores))
    return Err(
        ConfigError(
            variable,
            f"unsupported object store scheme {parsed.scheme!r}; expected file://",
        )
    )
