"""Framing: runner frames inside Docker's multiplexed stream, however the bytes arrive."""

import random
import struct

import pytest

from pool.model.protocol import FrameDecoder, ProtocolError, encode_frame


def docker_chunk(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


def test_frames_survive_any_split():
    messages = [{"op": "result", "id": str(i), "stdout": "é" * i + "\x10\x11"} for i in range(50)]
    stdout = b"".join(encode_frame(m) for m in messages)
    rng = random.Random(7)
    wire = bytearray()
    offset = 0
    while offset < len(stdout):  # Docker may cut the runner's bytes anywhere
        size = rng.randint(1, 40)
        wire += docker_chunk(1, stdout[offset:offset + size])
        if rng.random() < 0.2:
            wire += docker_chunk(2, b"runner noise on stderr")
        offset += size
    decoder = FrameDecoder()
    got = []
    position = 0
    while position < len(wire):
        step = rng.randint(1, 17)
        got += decoder.feed(bytes(wire[position:position + step]))
        position += step
    assert got == messages


def test_oversized_frame_is_a_protocol_error():
    decoder = FrameDecoder(max_frame_bytes=10)
    with pytest.raises(ProtocolError, match="frame of 11 bytes exceeds the 10 byte cap"):
        decoder.feed(docker_chunk(1, struct.pack(">I", 11) + b"x" * 11))


def test_non_object_frame_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="not a JSON object"):
        FrameDecoder().feed(docker_chunk(1, struct.pack(">I", 2) + b"[]"))


def test_a_frame_that_is_not_json_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="not JSON"):
        FrameDecoder().feed(docker_chunk(1, struct.pack(">I", 5) + b"{nope"))


def test_unknown_stream_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="unknown docker stream type 9"):
        FrameDecoder().feed(struct.pack(">BxxxI", 9, 0))
