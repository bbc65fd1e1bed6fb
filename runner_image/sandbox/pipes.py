"""A child's pipes as PID 1 reads them while it supervises: bounded buffers, and a task's stdout and
stderr kept up to the cap and, when the request streams, forwarded to the host as `output` frames."""

import codecs
import math
import time

from runner_image.sandbox.config import READ_CHUNK
from runner_image.sandbox.fdio import read_pipe
from runner_image.sandbox.frames import send

# Streaming (`"stream": true`): a chunk of output goes out as an `output` frame at once, unless that stream
# sent one less than STREAM_INTERVAL_S ago; then it waits, and what arrives meanwhile joins it (coalesced),
# so a task that prints in a tight loop costs at most ~100 frames a second per stream, not one per write.
STREAM_INTERVAL_S = 0.01
STREAM_FRAME_BYTES = 1 << 15  # ... or sooner, once this much is waiting


class Bounded:
    """A pipe's bytes up to a bound; what comes past it is read (so the writer never blocks) and dropped."""

    def __init__(self, bound: int) -> None:
        self.data = bytearray()
        self.bound = bound
        self.overflowed = False

    def pump(self, fd: int, drain: bool) -> bool:
        """Read one chunk (or, with `drain`, what is there, at most one bound's worth more). False at EOF."""
        budget = [self.bound + READ_CHUNK]

        def take(chunk: bytes) -> bool:
            room = self.bound - len(self.data)
            self.overflowed = self.overflowed or len(chunk) > room
            self.data += chunk[:max(room, 0)]
            budget[0] -= len(chunk)
            return budget[0] > 0
        return read_pipe(fd, take, drain)


class Forward:
    """One stream's bytes read but not yet sent, and its UTF-8 decoder (which holds a split character)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending = bytearray()
        self.sent_at = 0.0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")


class Outputs:
    """A task's stdout and stderr as they arrive: kept up to the cap (a buffer longer than `limit` passed
    it), and with `stream_id` also sent to the host as `output` frames (only bytes within the cap, decoded
    incrementally so that no frame splits a UTF-8 character), coalesced per STREAM_INTERVAL_S.

    PID 1 never blocks on the host for this: the frames go out on the same channel as every reply, and the
    host reads that channel whatever its clients do."""

    def __init__(self, out_r: int, err_r: int, limit: int, stream_id: str | None = None,
                 keep_reading: bool = False) -> None:
        self.bufs = {out_r: bytearray(), err_r: bytearray()}
        self.limit = limit
        # Plain tasks stop reading a stream past the cap (the task is killed at once). A session call keeps
        # reading and drops the excess, so that its interpreter never blocks on a full pipe while it is
        # being interrupted, and nothing of this call is left in the pipe for the next one.
        self.keep_reading = keep_reading
        self.stream_id = stream_id
        self.forward = {fd: Forward(name) for fd, name in ((out_r, "stdout"), (err_r, "stderr"))} if stream_id else {}

    def read(self, fd: int, drain: bool = False) -> bool:
        """Read one chunk (or, with `drain`, all there is). False at EOF."""
        buf = self.bufs[fd]

        def take(chunk: bytes) -> bool:
            nonlocal buf
            if self.forward and len(buf) < self.limit:
                self.forward[fd].pending += chunk[:self.limit - len(buf)]
            buf += chunk[:self.limit + 1 - len(buf)] if self.keep_reading else chunk
            return self.keep_reading or len(buf) <= self.limit
        return not (self.keep_reading or len(buf) <= self.limit) or read_pipe(fd, take, drain)

    def drain(self) -> None:
        for fd in self.bufs:
            self.read(fd, drain=True)

    def over_limit(self) -> bool:
        return any(len(buf) > self.limit for buf in self.bufs.values())

    def flush_in(self) -> float:
        """Seconds until a waiting chunk is due to go out (inf when none waits)."""
        now = time.monotonic()
        return min((max(0.0, f.sent_at + STREAM_INTERVAL_S - now) for f in self.forward.values() if f.pending),
                   default=math.inf)

    def flush(self, final: bool = False) -> None:
        now = time.monotonic()
        for forward in self.forward.values():
            due = final or len(forward.pending) >= STREAM_FRAME_BYTES or now >= forward.sent_at + STREAM_INTERVAL_S
            if forward.pending and due:
                text = forward.decoder.decode(bytes(forward.pending), final)
                forward.pending.clear()
                forward.sent_at = now
                if text:
                    send({"op": "output", "id": self.stream_id, "stream": forward.name, "text": text})
