"""Replicate's files API (`replicate.files.*`, and what the client does with file inputs):
`POST /v1/files` (multipart `content`, optional `filename`, `type`, `metadata` as JSON),
`GET /v1/files`, `GET /v1/files/{id}`, `GET /v1/files/{id}/download`, `DELETE
/v1/files/{id}`. An upload's `urls.get` works as an `image` or `mask` input (see
`serve.uploads`)."""

from __future__ import annotations

import json
import mimetypes
import re

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from serve.context import base_url, client_name, ingress, multipart_form, sees, sees_all
from serve.errors import AtelierError, InvalidField
from serve.uploads import Upload

router = APIRouter()
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"RIFF", "image/webp"), (b"GIF8", "image/gif"))
_SAFE_NAME = re.compile(r"[^\w.\- ]")  # a file name, fit for a Content-Disposition header
_FORM = {"content": {"type": "string", "format": "binary"}, "filename": {"type": "string"},
         "type": {"type": "string"}, "metadata": {"type": "string", "description": "JSON"}}


class UploadNotFound(AtelierError):
    status = 404
    kind = "file_not_found"


@router.post("/v1/files", summary="Replicate: upload a file", status_code=201,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": {
                     "type": "object", "required": ["content"], "properties": _FORM}}}}})
async def create_file(request: Request) -> JSONResponse:
    # Malformed multipart data, or a second file: 422 on content.
    async with multipart_form(request, "content", max_files=1, max_fields=8) as form:
        content = form.get("content")
        if not isinstance(content, UploadFile):
            raise InvalidField("content", "send the file as the multipart field `content`")
        data = await content.read()
        if not data:
            raise InvalidField("content", "the file is empty")
        name = _SAFE_NAME.sub("_", str(form.get("filename") or content.filename or "file")
                              )[:255]
        media = (str(form.get("type") or "") or _part_type(content)
                 or mimetypes.guess_type(name)[0] or _sniff(data))
        upload = Upload.of(data, name, media, _metadata(form.get("metadata")),
                           owner=client_name(request))
    state = ingress()
    await state.store.put_upload(upload, data)
    return JSONResponse(upload.to_json(base_url(request), state.router.config.file_ttl_s),
                        status_code=201)


def _part_type(content: UploadFile) -> str | None:
    media = (content.content_type or "").split(";")[0].strip()
    return None if media in ("", "application/octet-stream") else media


def _sniff(data: bytes) -> str:
    """The image type by its first bytes (what a client sends for a nameless file object)."""
    for magic, media in _MAGIC:
        if data.startswith(magic) and (media != "image/webp" or data[8:12] == b"WEBP"):
            return media
    return "application/octet-stream"


def _metadata(raw: object) -> dict:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, UploadFile):
        raise InvalidField("metadata", "must be a JSON object, not a file")
    try:
        value = json.loads(str(raw))
    except ValueError:
        raise InvalidField("metadata", "must be a JSON object") from None
    if not isinstance(value, dict):
        raise InvalidField("metadata", "must be a JSON object")
    return value


_PAGE = 100


@router.get("/v1/files", summary="Replicate: list uploaded files, newest first")
async def list_files(request: Request, cursor: str | None = None) -> dict:
    """The key's own uploads (every one for a key with `sees_all_predictions`), from the
    store's index of them, newest first, `_PAGE` at a time."""
    state = ingress()
    ttl_s, base = state.router.config.file_ttl_s, base_url(request)
    owner = None if sees_all(request) else client_name(request)
    page, after = await state.store.upload_page(cursor, _PAGE, owner)
    return {"results": [u.to_json(base, ttl_s) for u in page], "previous": None,
            "next": f"{base}/v1/files?cursor={after}" if after else None}


async def _upload(upload_id: str, request: Request) -> Upload:
    """The upload, if the request's key may see it: another key's is a 404, as its
    predictions are."""
    upload = await ingress().store.get_upload(upload_id)
    if upload is None or not sees(request, upload.owner):
        raise UploadNotFound(f"no file {upload_id!r} (uploads are kept file_ttl_s)")
    return upload


@router.get("/v1/files/{upload_id}", summary="Replicate: get an uploaded file's details")
async def get_file(upload_id: str, request: Request) -> dict:
    upload = await _upload(upload_id, request)
    return upload.to_json(base_url(request), ingress().router.config.file_ttl_s)


@router.get("/v1/files/{upload_id}/download", summary="Replicate: download an uploaded file")
async def download_file(upload_id: str, request: Request) -> Response:
    upload = await _upload(upload_id, request)
    data = await ingress().store.upload_data(upload_id)
    if data is None:  # expired between the two reads
        raise UploadNotFound(f"no file {upload_id!r} (uploads are kept file_ttl_s)")
    return Response(data, media_type=upload.content_type, headers={
        "Content-Disposition": f'attachment; filename="{upload.name}"',
        "ETag": f'"{upload.checksums["md5"]}"'})


@router.delete("/v1/files/{upload_id}", summary="Replicate: delete an uploaded file",
               status_code=204)
async def delete_file(upload_id: str, request: Request) -> Response:
    upload = await _upload(upload_id, request)
    if not await ingress().store.delete_upload(upload):
        raise UploadNotFound(f"no file {upload_id!r} (uploads are kept file_ttl_s)")
    return Response(status_code=204)
