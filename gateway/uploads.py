"""Request bodies: multipart uploads parsed by the `multipart` library straight into storage temp files.

werkzeug's own multipart parser compiles two regular expressions for every request's boundary, which
cost more than the rest of parsing a small DICOM upload; `multipart` parses the same bodies about ten
times faster. It is plugged in through werkzeug's public hooks (Request.form_data_parser_class and
make_form_data_parser, FormDataParser.parse). File parts go to a temp file in the storage folder, so
storing one is a rename.
"""
import multipart
from flask import current_app, request
from flask.wrappers import Request
from werkzeug.datastructures import FileStorage, Headers
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

READ_BYTES = 1 << 16


class MultipartFormParser(FormDataParser):
    """multipart/form-data read by `multipart`, each file part into a file from stream_factory; any
    other body as werkzeug reads it."""

    def parse(self, stream, mimetype, content_length, options=None):
        if mimetype != "multipart/form-data":
            return super().parse(stream, mimetype, content_length, options)
        boundary = (options or {}).get("boundary")
        if not boundary:
            raise BadRequest("the multipart body has no boundary")
        try:
            form, files = self._read_parts(stream, boundary, content_length)
        except multipart.MultipartError as error:  # a BadRequest, not the ValueError werkzeug would swallow
            raise BadRequest(f"the multipart body could not be read: {error}") from None
        return stream, self.cls(form), self.cls(files)

    def _read_parts(self, stream, boundary, content_length):
        form, files = [], []
        part = target = None
        parts = 0
        parser = multipart.PushMultipartParser(boundary, content_length if content_length is not None else -1)
        for event in parser.parse_blocking(stream.read, READ_BYTES):
            if isinstance(event, multipart.MultipartSegment):
                part = event
                parts += 1
                if self.max_form_parts is not None and parts > self.max_form_parts:
                    raise BadRequest(f"the multipart body has more than {self.max_form_parts} parts")
                target = bytearray() if part.filename is None else self.stream_factory(
                    total_content_length=content_length,
                    content_type=part.content_type,
                    filename=part.filename,
                )
            elif event:
                if part.filename is None:
                    if self.max_form_memory_size is not None and len(target) + len(event) > self.max_form_memory_size:
                        raise RequestEntityTooLarge()
                    target += event
                else:
                    target.write(event)
            elif part.filename is None:
                form.append((part.name, target.decode("utf-8", "replace")))  # as browsers send
            else:
                target.seek(0)
                headers = Headers(part.headerlist)
                files.append((part.name, FileStorage(target, part.filename, part.name, headers=headers)))
        return form, files


class GatewayRequest(Request):
    """Spools uploaded files into the storage's tmp folder; discard_unused_uploads removes what is left."""

    form_data_parser_class = MultipartFormParser

    def make_form_data_parser(self):
        return self.form_data_parser_class(
            stream_factory=self.upload_temp_file,
            max_form_memory_size=self.max_form_memory_size,
            max_content_length=self.max_content_length,
            max_form_parts=self.max_form_parts,
            cls=self.parameter_storage_class,
        )

    def upload_temp_file(self, **_part_details):
        """A stream factory: an open temp file in the storage folder, whatever the part's size, type or name."""
        handle = current_app.extensions["gateway.storage"].temp_file()
        self.environ.setdefault("gateway.temp_files", []).append(handle)
        return handle


def discard_unused_uploads(_error):
    """Teardown: remove the temp files of this request that were not moved into place."""
    storage = current_app.extensions["gateway.storage"]
    for handle in request.environ.pop("gateway.temp_files", []):
        handle.close()
        storage.discard_temp(handle.name)
