"""Per-region object stores: content of a region only ever goes to that region's store.

:class:`~datamesh.storage.objects.config.ObjectsSettings` says which regions have a store and where
(``DATAMESH_OBJECTS_URL`` with one sub-folder or sub-prefix per region, overridden per region by
``DATAMESH_OBJECTS_URL_<REGION>``, limited by ``DATAMESH_OBJECTS_REGIONS``).  A region with no store
is an error, never a fallback.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from datamesh.core.errors import ConfigError, NotFound
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import GeoRegion
from datamesh.storage.objects.base import ObjectStore
from datamesh.storage.objects.config import URL_VARIABLE, Location, ObjectsSettings, region_variable
from datamesh.storage.objects.filesystem import FilesystemObjectStore

AnyObjectStore = ObjectStore[Any]


class ObjectStoreRouter:
    """Maps each configured region to its object store."""

    def __init__(self, stores: Mapping[GeoRegion, AnyObjectStore], *, clients: Iterable[Any] = ()) -> None:
        self._stores = dict(stores)
        self._clients = list(clients)  # shared S3 clients, closed with the router

    def for_region(self, region: GeoRegion) -> Result[AnyObjectStore, NotFound]:
        """The store of ``region``; ``Err(NotFound)`` when the region has no configured store."""
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
        for client in self._clients:
            client.close()


def open_object_stores(url: str, *, variable: str = URL_VARIABLE) -> Result[ObjectStoreRouter, ConfigError]:
    """Build the router for ``url`` alone: every region under ``<url>/<region>``, default S3 settings."""
    settings = ObjectsSettings.from_env({}, default_url=url)
    if isinstance(settings, Err):
        return Err(ConfigError(variable, settings.error.message))
    return open_object_stores_from(settings.value)


def open_object_stores_from_env(
    environ: Mapping[str, str], *, default_url: str
) -> Result[ObjectStoreRouter, ConfigError]:
    """Read the ``DATAMESH_OBJECTS_*`` / ``DATAMESH_S3_*`` variables and build the router."""
    settings = ObjectsSettings.from_env(environ, default_url=default_url)
    if isinstance(settings, Err):
        return settings
    return open_object_stores_from(settings.value)


def open_object_stores_from(settings: ObjectsSettings) -> Result[ObjectStoreRouter, ConfigError]:
    """One store per configured region; S3 stores of the same AWS region share a client."""
    stores: dict[GeoRegion, AnyObjectStore] = {}
    clients: dict[str | None, Any] = {}
    for region, location in settings.locations.items():
        opened = _open_one(region, location, settings, clients)
        if isinstance(opened, Err):
            ObjectStoreRouter(stores, clients=clients.values()).close()
            return opened
        stores[region] = opened.value
    return Ok(ObjectStoreRouter(stores, clients=clients.values()))


def _open_one(
    region: GeoRegion, location: Location, settings: ObjectsSettings, clients: dict[str | None, Any]
) -> Result[AnyObjectStore, ConfigError]:
    if location.scheme == "file":
        try:
            return Ok(FilesystemObjectStore(Path(location.path), folder_fsync=settings.folder_fsync))
        except OSError as exc:
            return Err(
                ConfigError(region_variable(region), f"cannot create object store folder {location.path}: {exc}")
            )
    try:
        from datamesh.storage.objects.s3 import S3ObjectStore, make_client
    except ImportError as exc:  # boto3 is the optional extra datamesh[s3]
        return Err(ConfigError(region_variable(region), f"s3:// needs boto3 (pip install datamesh[s3]): {exc}"))
    s3 = settings.s3
    aws_region = location.region_name or s3.region_name
    if aws_region not in clients:
        clients[aws_region] = make_client(s3, region_name=aws_region)
    return Ok(
        S3ObjectStore(
            clients[aws_region],
            location.bucket,
            location.path,
            part_bytes=s3.part_bytes,
            max_copy_bytes=s3.max_copy_bytes,
            single_put_max_bytes=s3.single_put_max_bytes,
            upload_concurrency=s3.upload_concurrency,
            retry=s3.retry,
        )
    )
