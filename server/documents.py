"""Files given as input parts -> what the model reads: text files as text, PDFs as their text, images as images.

Shared by every API family that takes files (Responses ``input_file`` / ``input_image``, chat
``file`` parts): a file arrives inline (base64 ``file_data``) or by the id of a /v1/files upload
(``file_id``, resolved by ``uploaded_files`` before the pure translators run). A file that is none
of these kinds, or does not decode as its kind, is a 400 that says which kinds are read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import mimetypes
from dataclasses import dataclass

from ollm.errors import InvalidRequestError
from ollm.generation import ContentPart
from server.stores.files import FileStore

_TEXT_MIME = ("text/", "application/json", "application/xml", "application/x-yaml", "application/yaml")
_TEXT_SUFFIX = (
    ".txt", ".md", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".xml", ".yaml", ".yml", ".toml", ".ini", ".log",
    ".html", ".css", ".py", ".js", ".ts", ".java", ".c", ".h", ".cpp", ".hpp", ".go", ".rs", ".rb", ".sh", ".sql",
    ".tex",
)  # fmt: skip
_IMAGE_SUFFIX = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                 ".webp": "image/webp"}  # fmt: skip


@dataclass(frozen=True)
class UploadedFile:
    filename: str
    content: bytes


async def uploaded_files(store: FileStore, file_ids: set[str]) -> dict[str, UploadedFile]:
    """The named uploads' names and bytes (404 for an id that is no file)."""
    out = {}
    for file_id in sorted(file_ids):
        record = await store.get(file_id)
        path = await store.content(file_id)
        out[file_id] = UploadedFile(record.filename, await asyncio.to_thread(path.read_bytes))
    return out


def inline_file(file_data: str, filename: str | None, param: str) -> UploadedFile:
    """``file_data``: base64, or a data: URI whose media type stands in for a missing file name."""
    mime, _, data = file_data.partition(",") if file_data.startswith("data:") else ("", "", file_data)
    mime = mime.removeprefix("data:").split(";")[0]
    name = filename or f"file{mimetypes.guess_extension(mime) or ''}"
    try:
        return UploadedFile(name, base64.b64decode(data, validate=True))
    except binascii.Error as exc:
        raise InvalidRequestError(f"file {name!r}: file_data is not valid base64 ({exc})", param=param) from None


def referenced_file(
    file_id: str | None, file_data: str | None, filename: str | None, files: dict[str, UploadedFile], param: str
) -> ContentPart:
    """A file part by upload id (already read into ``files`` by ``uploaded_files``) or inline data."""
    if file_id is not None:
        return file_part(files[file_id], param)
    if file_data is not None:
        return file_part(inline_file(file_data, filename, param), param)
    raise InvalidRequestError(
        "a file part needs file_id (a /v1/files upload) or file_data (inline base64) with filename; ollm does "
        "not fetch file_url",
        param=param,
    )


def file_part(file: UploadedFile, param: str) -> ContentPart:
    """One file as a content part, chosen by its name (and, for PDFs, its first bytes)."""
    name = file.filename
    lower = name.lower()
    suffix = lower[lower.rfind(".") :] if "." in lower else ""
    if suffix in _IMAGE_SUFFIX:
        return ContentPart(
            type="image", image=f"data:{_IMAGE_SUFFIX[suffix]};base64,{base64.b64encode(file.content).decode()}"
        )
    if suffix == ".pdf" or file.content.startswith(b"%PDF-"):
        return _text_part(name, _pdf_text(file, param))
    guessed = mimetypes.guess_type(name)[0] or ""
    if suffix in _TEXT_SUFFIX or guessed.startswith(_TEXT_MIME):
        try:
            text = file.content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(f"file {name!r} is not UTF-8 text: {exc}", param=param) from None
        return _text_part(name, text)
    raise InvalidRequestError(
        f"file {name!r} is of a kind ollm does not read; send text files (txt, md, json, csv, code), PDFs or "
        "images (png, jpeg, gif, webp)",
        param=param,
    )


def _text_part(name: str, text: str) -> ContentPart:
    # Named, and closed by a blank line: the part after it (more text, another file) starts apart.
    return ContentPart(type="text", text=f"[file: {name}]\n{text.rstrip()}\n\n")


def _pdf_text(file: UploadedFile, param: str) -> str:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(file.content))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:  # pypdf raises many types (its own, KeyError, IndexError...) on malformed files
        raise InvalidRequestError(f"PDF {file.filename!r} could not be read: {exc}", param=param) from None
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text:
        raise InvalidRequestError(
            f"PDF {file.filename!r} has no text to extract (a scan?); send its text or its pages as images",
            param=param,
        )
    return text
