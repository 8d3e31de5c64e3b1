"""The saga plan as the saga log keeps it: compact JSON rows read back into the same plan."""

from __future__ import annotations

import json

from datamesh.pipeline.plan import BlobPlan, ItemPlan, SagaPlan


def _item(index: int) -> ItemPlan:
    return ItemPlan(
        index=index,
        idempotency_key=f"key-{index}",
        request_sha256="a" * 64,
        conversation_id=f"conversation-{index}",
        new_conversation=True,
        turn_id=f"turn-{index}",
        entity_id="entity",
        region="eu-west",
        shard=index % 4,
        prompt_sha256="b" * 64,
        prompt_size=10,
        prompt_location="ap",
        response_sha256="c" * 64,
        response_size=20_000,
        response_location="objects",
        has_embedding=index % 2 == 0,
        metadata={"n": str(index)},
    )


def test_a_plan_reads_back_as_written() -> None:
    plan = SagaPlan("saga", "tenant", [_item(i) for i in range(3)], [BlobPlan("eu-west", "c" * 64, 20_000)])
    assert SagaPlan.from_json(plan.to_json()) == plan


def test_a_plan_whose_rows_name_their_fields_in_another_order_reads_back_by_name() -> None:
    # Given a plan written by a version that listed the item fields in another order,
    plan = SagaPlan("saga", "tenant", [_item(i) for i in range(3)], [])
    data = json.loads(plan.to_json())
    data["item_fields"] = data["item_fields"][::-1]
    data["items"] = [row[::-1] for row in data["items"]]
    # then each value still lands in its field.
    assert SagaPlan.from_json(json.dumps(data)) == plan
