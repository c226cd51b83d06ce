"""Small parts of the HTTP front that need no server process."""

from __future__ import annotations

import asyncio
import socket

from kvserve.server.http.errors import field_path, from_validation
from kvserve.server.http.front import _bind


def test_accepted_connections_have_nagle_off() -> None:
    """Each SSE event must leave at once, not wait for the client's delayed ACK."""

    async def accepted_nodelay() -> int:
        sock = _bind("127.0.0.1", 0)
        seen: list[int] = []

        def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw = writer.get_extra_info("socket")
            seen.append(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_client, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            while not seen:
                await asyncio.sleep(0.01)
            writer.close()
        return seen[0]

    assert asyncio.run(accepted_nodelay()) != 0


def test_validation_errors_name_the_deepest_field() -> None:
    assert field_path(["messages", 0, "content", 1, "type"]) == "messages[0].content[1].type"
    union = [
        {"type": "string_type", "loc": ("body", "messages", 0, "content", "str"), "msg": "x"},
        {
            "type": "literal_error",
            "msg": "Input should be 'text'",
            "loc": ("body", "messages", 0, "content", "list[TextPart]", 0, "type"),
        },
    ]
    err = from_validation(union)
    assert err.param == "messages[0].content[0].type" and err.status == 400
    extra = from_validation([{"type": "extra_forbidden", "loc": ("body", "tools"), "msg": "x"}])
    assert (extra.param, extra.message) == ("tools", "tools: not supported by kvserve")
    bad_json = from_validation([{"type": "json_invalid", "loc": ("body", 7), "msg": "JSON"}])
    assert bad_json.param is None
