"""The aiohttp engine builds its responses without `web.Response`'s constructor: the same object, field by field."""

from __future__ import annotations

import pytest
from aiohttp import web
from multidict import CIMultiDict

from archeio.http.aiohttp_impl import _Answer

CASES = [
    (307, {"Location": "https://registry.example/v2/pause/manifests/3.10"}, None),
    (307, {"Location": "https://registry.example/v2/pause/manifests/3.10", "Content-Length": "0"}, None),
    (404, {"Content-Length": "17", "Content-Type": "application/json"}, b'{"errors": [...]}'),
    (405, {"Allow": "GET, HEAD", "Content-Length": "2"}, b"{}"),
    (200, {"Docker-Distribution-Api-Version": "registry/2.0", "Content-Length": "0"}, b""),
    (599, {}, None),  # a status without a reason phrase
]


@pytest.mark.parametrize(("status", "headers", "body"), CASES)
def test_answer_has_every_field_aiohttp_gives_the_same_response(
    status: int, headers: dict[str, str], body: bytes | None,
) -> None:
    ours = _Answer(status, CIMultiDict(headers), body)
    theirs = web.Response(status=status, headers=headers, body=body)
    fields = {name: getattr(ours, name) for name in vars(theirs)}
    assert fields == vars(theirs)
    assert set(vars(ours)) <= set(vars(theirs))
    assert (ours.status, ours.reason, ours.body, dict(ours.headers)) == (status, theirs.reason, body, headers)
