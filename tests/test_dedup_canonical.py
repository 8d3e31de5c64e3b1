"""The request digest's canonical form is exactly ``json.dumps`` of the defining fields.

Digests of stored idempotency keys depend on these bytes: a replay after an upgrade must still be
recognised, so the hand-spelled encoding is checked against the reference one on varied requests.
"""

from __future__ import annotations

import json

import pytest

from datamesh.core.types import ConversationId, EntityId, GeoRegion
from datamesh.pipeline.dedup import canonical_request
from datamesh.pipeline.request import ValidRequest


def _reference(request: ValidRequest, prompt_sha256: str, response_sha256: str) -> str:
    canonical = {
        "entity": str(request.entity_id),
        "region": request.region.value,
        "conversation": str(request.conversation_id) if request.conversation_id else None,
        "prompt": prompt_sha256,
        "response": response_sha256,
        "metadata": sorted(request.metadata.items()),
    }
    return json.dumps(canonical, sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize("region", list(GeoRegion))
@pytest.mark.parametrize("conversation", [None, ConversationId.generate()])
@pytest.mark.parametrize(
    "metadata",
    [{}, {"source": "api"}, {"z": "last", "a": "first", "ü": 'quote " back \\ é 😀\n\t\u2028'}],
)
def test_canonical_request_matches_json_dumps(
    region: GeoRegion, conversation: ConversationId | None, metadata: dict[str, str]
) -> None:
    # Given a validated request of every shape
    request = ValidRequest(EntityId.generate(), b"p", b"r", region, conversation, None, None, metadata)
    # When its canonical form is built
    built = canonical_request(request, "a" * 64, "b" * 64)
    # Then it is byte for byte what json.dumps gives
    assert built == _reference(request, "a" * 64, "b" * 64)
    # and the same when the caller hands over the entity id's text it made already
    assert canonical_request(request, "a" * 64, "b" * 64, entity_id=str(request.entity_id)) == built
