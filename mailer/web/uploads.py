"""Reading an uploaded CSV only after the uploader is known, and never more than the import takes.

FastAPI parses a form body before it runs an endpoint's dependencies, so an endpoint that declares an
`UploadFile` would spool any stranger's upload to disk before saying 401. The import endpoints take
the request instead: they check who is asking first, then the declared length, then read the form.
"""

from __future__ import annotations

from fastapi import HTTPException, Request
from starlette.datastructures import FormData, UploadFile

from mailer import imports
from mailer.errors import InvalidInput

# Room for the form's other fields and the multipart framing around the file.
SLACK = 64 * 1024

OPENAPI_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "CSV with columns email, name, categories, frequency, status."}}}}}}}


async def read_csv(request: Request) -> tuple[str, bytes, FormData]:
    """(file name, file bytes, the rest of the form). Call only after the caller is authorised."""
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        raise HTTPException(411, "Send the upload with a Content-Length header.")
    if int(length) > imports.MAX_BYTES + SLACK:
        raise HTTPException(413, f"The file is larger than {imports.MAX_BYTES // 1024 // 1024} MB; split it.")
    form = await request.form(max_files=1, max_fields=20)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidInput("file", "Choose a CSV file to upload.")
    data = await upload.read(imports.MAX_BYTES + 1)
    return upload.filename or "upload.csv", data, form
