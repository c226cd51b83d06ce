"""Request decoding that names the field holding bad UTF-8.

protobuf refuses a proto3 `string` field that is not valid UTF-8 with a DecodeError that
names no field, and grpcio turns a raising deserializer into INTERNAL. The server wants
INVALID_ARGUMENT naming the field, so on failure the bytes are re-read with a mirror of the
schema in which every string is `bytes` (the wire format is the same) to find the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TypeVar, cast

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from kvserve.server.proto import pb

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class BadRequest:
    """What a deserializer returns instead of a message: the handler answers INVALID_ARGUMENT."""

    message: str


def _strings_to_bytes(msg: descriptor_pb2.DescriptorProto) -> None:
    if msg.options.map_entry:
        return  # map keys must stay strings; no request carries a map
    for field in msg.field:
        if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
            field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    for nested in msg.nested_type:
        _strings_to_bytes(nested)


@cache
def _lenient_pool() -> descriptor_pool.DescriptorPool:
    file_proto = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    for msg in file_proto.message_type:
        _strings_to_bytes(msg)
    pool = descriptor_pool.DescriptorPool()  # private: the real names stay free
    pool.Add(file_proto)
    return pool


def _lenient_class(full_name: str) -> type[Message]:
    return message_factory.GetMessageClass(_lenient_pool().FindMessageTypeByName(full_name))


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf 7 dropped `label` for `is_repeated`; 5.x has only `label`
    flag = getattr(field, "is_repeated", None)
    if flag is None:
        flag = getattr(field, "label", None) == FieldDescriptor.LABEL_REPEATED
    return bool(flag)


def _first_bad_utf8(strict: Descriptor, lenient: Message, path: str) -> str | None:
    """The path of the first string field of `strict` whose bytes in `lenient` are not UTF-8,
    e.g. "messages.messages[1].content"."""
    for field, value in lenient.ListFields():
        real = strict.fields_by_name[field.name]
        repeated = _is_repeated(real)
        for i, item in enumerate(value if repeated else [value]):
            where = f"{path}{field.name}[{i}]" if repeated else f"{path}{field.name}"
            if real.type == FieldDescriptor.TYPE_STRING:
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError:
                    return where
            elif real.type == FieldDescriptor.TYPE_MESSAGE:
                message_type = real.message_type
                if message_type is None or message_type.GetOptions().map_entry:
                    continue
                found = _first_bad_utf8(message_type, item, f"{where}.")
                if found is not None:
                    return found
    return None


def decode_or_explain(cls: type[M], data: bytes) -> M | BadRequest:
    """Parse `data` as `cls`; on failure say which field is wrong."""
    try:
        return cls.FromString(data)
    except DecodeError:
        pass
    try:
        lenient = _lenient_class(cls.DESCRIPTOR.full_name).FromString(data)
    except DecodeError:
        return BadRequest("request: not a valid protobuf message")
    where = _first_bad_utf8(cast(Descriptor, cls.DESCRIPTOR), lenient, "")
    if where is None:
        return BadRequest("request: not a valid protobuf message")
    return BadRequest(f"{where}: not valid UTF-8")


def deserializer(cls: type[M]) -> Callable[[bytes], M | BadRequest]:
    return lambda data: decode_or_explain(cls, data)
