"""Files as input parts through a live stack, with the official openai client.

The SDK uploads a PDF (written here, a one-page PDF with a text stream) and a text file with
``files.create(purpose="user_data")`` and names them as ``input_file`` parts of ``responses.create``.
The echo model counts every word of the conversation as a prompt token and answers the last
user message back, so the PDF's extracted text and the text file's content are seen arriving.
"""

from __future__ import annotations

import base64

import openai
import pytest

from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow

PDF_TEXT = "the launch code is swordfish"
NOTES = "remember the milk\nand the bread"


def one_page_pdf(text: str) -> bytes:
    """A minimal valid PDF: catalog, pages, one page whose content stream shows ``text`` in Helvetica."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_uploaded_pdf_and_text_file_reach_the_model(echo_stack: Stack) -> None:
    client = echo_stack.server.openai_client()
    pdf = client.files.create(file=("brief.pdf", one_page_pdf(PDF_TEXT), "application/pdf"), purpose="user_data")
    notes = client.files.create(file=("notes.txt", NOTES.encode(), "text/plain"), purpose="assistants")
    assert (pdf.purpose, notes.purpose) == ("user_data", "assistants")

    def ask(*parts: dict[str, str]) -> openai.types.responses.Response:
        content = [{"type": "input_text", "text": "read:\n"}, *parts]
        return client.responses.create(model="echo", input=[{"role": "user", "content": content}])  # type: ignore[list-item]

    bare = ask()
    answer = ask({"type": "input_file", "file_id": pdf.id}, {"type": "input_file", "file_id": notes.id})
    # Echo answers the user message back: the PDF's extracted text and the text file, each under its name.
    assert "[file: brief.pdf]\n" + PDF_TEXT in answer.output_text
    assert "[file: notes.txt]\n" + NOTES in answer.output_text
    # Echo counts words: the prompt grew by exactly the files' words and their [file: ...] headers.
    assert answer.usage is not None and bare.usage is not None
    added = len(f"[file: brief.pdf] {PDF_TEXT} [file: notes.txt] {NOTES}".split())
    assert answer.usage.input_tokens == bare.usage.input_tokens + added

    # The same files inline (file_data + filename), and on chat as "file" parts.
    inline = ask({"type": "input_file", "filename": "brief.pdf",
                  "file_data": base64.b64encode(one_page_pdf(PDF_TEXT)).decode()})  # fmt: skip
    assert PDF_TEXT in inline.output_text
    chat = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": [{"type": "file", "file": {"file_id": notes.id}}]}]
    )
    assert NOTES in (chat.choices[0].message.content or "")


def test_file_part_errors_are_400s(echo_stack: Stack) -> None:
    client = echo_stack.server.openai_client()
    binary = client.files.create(file=("blob.bin", b"\x00\x01\x02", "application/octet-stream"), purpose="user_data")
    cases = [
        ({"type": "input_file", "file_id": binary.id}, "of a kind ollm does not read"),
        ({"type": "input_file", "filename": "x.pdf", "file_data": base64.b64encode(b"%PDF-1.4 junk").decode()},
         "could not be read"),
        ({"type": "input_file", "file_url": "https://example.com/a.pdf"}, "does not fetch file_url"),
    ]  # fmt: skip
    for part, expect in cases:
        with pytest.raises(openai.BadRequestError) as error:
            client.responses.create(model="echo", input=[{"role": "user", "content": [part]}])  # type: ignore[list-item]
        assert expect in str(error.value)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(
            model="echo",
            input=[{"role": "user", "content": [{"type": "input_file", "file_id": "file-" + "0" * 32}]}],
        )
    with pytest.raises(openai.BadRequestError, match="purpose 'fine-tune' is not served"):
        client.files.create(file=("a.txt", b"x", "text/plain"), purpose="fine-tune")
