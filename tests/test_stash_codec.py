"""The stashed ``write_ap`` part: a binary frame that round-trips every kind of turn, the JSON form of
earlier versions still read, and damaged parts refused with a clear error."""

from __future__ import annotations

import json

import pytest

from datamesh.pipeline.plan import LOCATION_AP, ItemPlan, SagaPlan
from datamesh.tasks.codec import PartFormatError, decode_part, encode_content, encode_part
from tests.helpers import alpaca

OBJECTS = "objects"


def item(
    index: int, *, prompt_at: str = LOCATION_AP, response_at: str = LOCATION_AP, embedded: bool = False
) -> ItemPlan:
    return ItemPlan(
        index, f"key-{index}", "r" * 64, f"c-{index}", True, f"t-{index}", "e", "eu-west", 2,
        "p" * 64, 10, LOCATION_AP, "q" * 64, 20, response_at, embedded, {"source": "test"},
    )  # fmt: skip


def sample() -> tuple[SagaPlan, dict[int, tuple[bytes, bytes, tuple[float, ...] | None]]]:
    rows = alpaca()[:3]
    items = [item(0), item(1, embedded=True), item(2, response_at=OBJECTS), item(3, embedded=True), item(4)]
    content: dict[int, tuple[bytes, bytes, tuple[float, ...] | None]] = {
        0: (rows[0]["instruction"].encode(), rows[0]["output"].encode(), None),
        1: ("ünïcode ✓".encode(), b"\x00\xff binary \r\n", (0.25, -1.5, 3.0e-12)),
        2: (rows[1]["instruction"].encode(), b"kept in the object store", None),
        3: (b"", b"", ()),  # empty payloads, an empty embedding
        4: (rows[2]["instruction"].encode(), rows[2]["output"].encode() * 40, None),  # ~100 KB
    }
    return SagaPlan("saga-1", "tenant", items, []), content


def test_a_part_round_trips_every_kind_of_turn() -> None:
    plan, content = sample()
    decoded_plan, decoded = decode_part(encode_part(plan, content))
    assert decoded_plan == plan
    expected = dict(content)
    expected[2] = (content[2][0], b"", None)  # a payload in the object store is not sent again
    assert decoded == expected


def test_a_part_in_the_json_form_of_earlier_versions_is_still_read() -> None:
    plan, content = sample()
    legacy = json.dumps({"plan": plan.to_json(), "content": encode_content(plan, content)}).encode()
    assert decode_part(legacy) == decode_part(encode_part(plan, content))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:-5], "ends inside turn 4"),
        (lambda raw: b"XXXX" + raw[4:], "not b'DMP1' or JSON"),
        (lambda raw: raw[:6], "cannot be read"),
        (lambda raw: raw[: raw.index(b"\x04\x00\x00\x00", raw.index(b"t-4"))], r"lacks the content of turns \[4\]"),
    ],
)
def test_a_damaged_part_is_refused_naming_what_is_wrong(damage: object, message: str) -> None:
    plan, content = sample()
    with pytest.raises(PartFormatError, match=message):
        decode_part(damage(encode_part(plan, content)))  # type: ignore[operator]
