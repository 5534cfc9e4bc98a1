"""Parameter types the flows share, with their constraints (checked when a run starts).

Descriptions for the Prefect UI's run form live in each flow's Google-style ``Args:``
docstring section: that is where Prefect reads them from (it ignores ``Field(description=)``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

__all__ = ["Concurrency", "Mirrors", "RetryFor"]

Concurrency = Annotated[int, Field(ge=1, le=32)]
RetryFor = Annotated[float, Field(ge=0)]
#: A mirror base URL without userinfo: the pattern is in the deployment's parameter schema, so
#: a run asking for ``http://user:pw@mirror`` is refused before Prefect stores its parameters.
MirrorURL = Annotated[str, Field(pattern=r"^https?://[^/@?#\s]+(/[^?#]*)?$")]
Mirrors = dict[str, list[MirrorURL]] | None
