"""The Prefect UI's run forms explain every parameter, and the parameters are validated."""

from __future__ import annotations

import pytest

from flows.prewarm import prewarm_fleet
from flows.pull import pull_image


@pytest.mark.parametrize("flow", [pull_image, prewarm_fleet], ids=lambda f: f.name)
def test_every_parameter_has_a_description(flow) -> None:
    properties = flow.parameters.model_dump()["properties"]
    missing = [name for name, schema in properties.items() if not schema.get("description")]
    assert properties and not missing, f"{flow.name}: no description for {missing}"


def test_concurrency_and_retry_for_are_bounded() -> None:
    properties = pull_image.parameters.model_dump()["properties"]
    assert properties["concurrency"].get("maximum") == 32 and properties["concurrency"].get("minimum") == 1
    assert properties["retry_for"].get("minimum") == 0
