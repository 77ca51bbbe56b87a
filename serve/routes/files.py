"""`GET /files/{name}`: generated files, by unguessable name, until they expire.

The name (128 random bits) is the capability, as with a hosted API's delivery URLs, so
these links work without an API key and can be handed to a browser.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from serve.context import ingress
from serve.errors import AtelierError

router = APIRouter()


class FileNotFound(AtelierError):
    status = 404
    kind = "file_not_found"


@router.get("/files/{name}", summary="Download a generated file")
async def get_file(name: str) -> Response:
    stored = await ingress().store.get_file(name)
    if stored is None:
        raise FileNotFound("no such file, or it has expired")
    return Response(stored.data, media_type=stored.media_type,
                    headers={"Cache-Control": "private, max-age=3600"})
