"""Request bodies: multipart uploads parsed by the `multipart` library straight into storage temp files.

werkzeug's own multipart parser compiles two regular expressions for every request's boundary, which
cost more than the rest of parsing a small DICOM upload; `multipart` parses the same bodies about ten
times faster. File parts go to a temp file in the storage folder, so storing one is a rename.
"""
import multipart
from flask import current_app, request
from flask.wrappers import Request
from werkzeug.datastructures import FileStorage, Headers
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

READ_BYTES = 1 << 16


class _FormDataParser(FormDataParser):
    def _parse_multipart(self, stream, mimetype, content_length, options):
        boundary = options.get("boundary")
        if not boundary:
            raise BadRequest("the multipart body has no boundary")
        form, files = [], []
        part = target = None
        try:
            with multipart.PushMultipartParser(
                boundary,
                content_length if content_length is not None else -1,
                max_segment_count=self.max_form_parts or float("inf"),
            ) as parser:
                while not parser.closed:
                    for event in parser.parse(stream.read(READ_BYTES)):
                        if isinstance(event, multipart.MultipartSegment):
                            part = event
                            target = bytearray() if part.filename is None else self.stream_factory(
                                total_content_length=content_length,
                                content_type=part.content_type,
                                filename=part.filename,
                            )
                        elif event:
                            if part.filename is None:
                                if self.max_form_memory_size and len(target) + len(event) > self.max_form_memory_size:
                                    raise RequestEntityTooLarge()
                                target += event
                            else:
                                target.write(event)
                        elif part.filename is None:
                            form.append((part.name, target.decode("utf-8", "replace")))  # as browsers send
                        else:
                            target.seek(0)
                            files.append((part.name, FileStorage(target, part.filename, part.name,
                                                                 headers=Headers(part.headerlist))))
        except multipart.ParserError as error:  # a BadRequest, not the ValueError werkzeug would swallow
            raise BadRequest(f"the multipart body could not be read: {error}") from None
        return stream, self.cls(form), self.cls(files)


class GatewayRequest(Request):
    """Spools uploaded files into the storage's tmp folder; discard_unused_uploads removes what is left."""

    form_data_parser_class = _FormDataParser

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        handle = current_app.extensions["gateway.storage"].temp_file()
        self.environ.setdefault("gateway.temp_files", []).append(handle)
        return handle


def discard_unused_uploads(_error):
    """Teardown: remove the temp files of this request that were not moved into place."""
    storage = current_app.extensions["gateway.storage"]
    for handle in request.environ.pop("gateway.temp_files", []):
        handle.close()
        storage.discard_temp(handle.name)
