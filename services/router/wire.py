"""Just enough of the protobuf wire format to forward Open Inference Protocol requests untouched.

The router reads model_name (field 1) and model_version (field 2) of an inference.ModelInferRequest
and rewrites the version by *appending* field 2: protobuf's merge rule (last value of a singular field
wins) makes that equal to setting it, so the tensors are never parsed or re-serialised.
"""

from __future__ import annotations

from services.shared.errors import InvalidArgument

MODEL_NAME_FIELD = 1
MODEL_VERSION_FIELD = 2
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise InvalidArgument("malformed ModelInferRequest: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise InvalidArgument("malformed ModelInferRequest: varint too long")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_model_ref(buf: bytes) -> tuple[str, str]:
    """(model_name, model_version) of a serialised ModelInferRequest; last occurrence wins."""
    name = version = b""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _LENGTH_DELIMITED:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise InvalidArgument("malformed ModelInferRequest: field runs past the end")
            if field == MODEL_NAME_FIELD:
                name = buf[pos : pos + length]
            elif field == MODEL_VERSION_FIELD:
                version = buf[pos : pos + length]
            pos += length
        elif wire_type == _VARINT:
            _, pos = _read_varint(buf, pos)
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        else:
            raise InvalidArgument(f"malformed ModelInferRequest: unsupported wire type {wire_type}")
    if pos != end:
        raise InvalidArgument("malformed ModelInferRequest: field runs past the end")
    try:
        return name.decode(), version.decode()
    except UnicodeDecodeError:
        raise InvalidArgument("malformed ModelInferRequest: model name or version is not UTF-8") from None


def string_field(field: int, value: str) -> bytes:
    data = value.encode()
    return _varint(field << 3 | _LENGTH_DELIMITED) + _varint(len(data)) + data


def with_model(buf: bytes, name: str | None = None, version: str | None = None) -> bytes:
    """The same request with model_name and/or model_version replaced (appended; tensors untouched)."""
    suffix = b""
    if name is not None:
        suffix += string_field(MODEL_NAME_FIELD, name)
    if version is not None:
        suffix += string_field(MODEL_VERSION_FIELD, version)
    return buf + suffix if suffix else buf
