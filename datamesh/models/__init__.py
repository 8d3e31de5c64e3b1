"""The CP tier's models; importing the package registers every table on ``Base.metadata``."""

from datamesh.models import access, tables

__all__ = ["access", "tables"]
