"""Reading JSON request bodies with bounded work: structural limits checked as the bytes arrive.

A body is refused with 400 (naming the limit and its config key) as soon as the bytes read so far
break a limit, before it is parsed or validated and without reading the rest of it:

- ``limits.max_json_depth``: nesting of arrays and objects (so nothing further down can hit a
  recursion limit: orjson, pydantic, LiteLLM);
- ``limits.max_json_items``: array elements and object members at any depth, each container counted
  once (what the parser has to build; parsing 9 MB of tiny objects holds the GIL for ~0.5 s);
- per-path array lengths; for chat: ``limits.max_messages`` (``messages``), ``limits.max_content_parts``
  (``messages[i].content``) and ``limits.max_tools`` (``tools``, ``functions``).

:class:`JsonShape` is an incremental scanner over the raw bytes: one regular expression finds the
structural characters and skips whole strings in C; only the structural tokens reach Python. A
string cut by a chunk boundary is carried over as state (never re-scanned), so the work is linear in
the body's size and spread over its chunks (a large chunk is scanned in slices, yielding to the event
loop between them). Bodies over ``limits.offload_bytes`` are then parsed (and validated, by the
caller) in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request

from gateway.config import LimitsConfig
from gateway.errors import ClientDisconnectedError, InvalidRequestError
from gateway.http.state import gateway_state

T = TypeVar("T")

#: in data without escapes: a whole string, a structural byte, or (at the end only) a string the data ends inside
_TOKENS = re.compile(rb'"[^"]*+"|[\[\]{},:]|"[^"]*+\Z')
_QUOTE, _COLON, _COMMA = 0x22, 0x3A, 0x2C
_OPEN_OBJ, _OPEN_ARR, _CLOSE_OBJ, _CLOSE_ARR = 0x7B, 0x5B, 0x7D, 0x5D
_KEY_MAX = 256  # keys longer than this are never a path we look for: their text is not kept
#: the largest slice scanned without yielding to the event loop
SLICE_BYTES = 16 * 1024


@dataclass(frozen=True)
class ArrayLimit:
    limit: int
    what: str  # "messages", "content parts", "tools"
    key: str  # the config key, e.g. "limits.max_messages"


#: a path component: an object member's name (UTF-8), or None for "any element of an array"
_Part = bytes | None
_Path = tuple[_Part, ...]


class _Frame:
    """An open array or object whose path may lead to a limited array (others are ``None`` on the stack)."""

    __slots__ = ("at", "commas", "is_array", "key", "limit", "parent", "path")

    def __init__(self, is_array: bool, path: _Path, parent: _Frame | None, at: int | bytes | None,
                 limit: ArrayLimit | None) -> None:
        self.is_array, self.path, self.parent, self.at, self.limit = is_array, path, parent, at, limit
        self.commas = 0  # separators seen at this level (arrays: elements - 1)
        self.key: bytes | None = None  # objects: the name of the member being read

    def param(self) -> str:
        """Where this container is, as the error's ``param``: ``messages[3].content``."""
        out = ""
        frame: _Frame | None = self
        while frame is not None and frame.parent is not None:
            at = frame.at
            if isinstance(at, int):
                out = f"[{at}]{out}"
            else:
                name = at.decode("utf-8", "replace") if at is not None else "?"
                out = f".{name}{out}" if frame.parent.parent is not None else f"{name}{out}"
            frame = frame.parent
        return out


class JsonShape:
    """Incremental structural check of one JSON document; :meth:`feed` raises the 400 of the first limit
    the bytes so far break. It does not validate JSON (the parser does that afterwards)."""

    def __init__(self, max_depth: int, max_items: int, arrays: Mapping[tuple[str, ...], ArrayLimit] | None = None):
        self.max_depth = max_depth
        self.max_items = max_items
        self.items = 0
        self._limits: dict[_Path, ArrayLimit] = {}
        self._children: dict[tuple[_Path, _Part], _Path] = {}  # the tracked paths, by parent path and part
        for path, limit in (arrays or {}).items():
            parts: _Path = tuple(None if p == "*" else p.encode() for p in path)
            self._limits[parts] = limit
            for k in range(len(parts)):
                self._children[(parts[:k], parts[k])] = parts[:k + 1]
        self._stack: list[_Frame | None] = []
        self._in_string = False
        self._escape = False  # the previous chunk ended in the backslash of an escape
        self._partial: bytes | None = b""  # the text of the string being read (None once longer than _KEY_MAX)
        self._last: bytes | None = None  # the last complete string, quotes included (None: too long to be a key)

    def feed(self, data: bytes) -> None:
        pos = 0
        if self._in_string:
            pos = self._string_rest(data)
            if self._in_string:
                return
        # whole strings and structural bytes, found in C
        if data.find(b"\\", pos) < 0:
            tokens = _TOKENS.findall(data, pos)
        else:  # find them where every escape pair is blanked out (same offsets), take them from the data itself
            view = data[pos:]
            tokens = [view[m.start():m.end()] for m in _TOKENS.finditer(_unescaped(view))]
        if tokens and tokens[-1][0] == _QUOTE and not _complete(tokens[-1]):
            text = tokens.pop()[1:]  # the data ends inside this string: carry it into the next chunk
            self._in_string = True
            self._escape = _odd_backslashes_before(text, len(text), 0)
            self._partial = text if len(text) <= _KEY_MAX else None
        stack = self._stack
        last = self._last
        for tok in tokens:
            c = tok[0]
            if c == _QUOTE:
                last = tok
            elif c == _COMMA:
                self.items += 1
                if self.items > self.max_items:
                    raise _too_many_items(self.max_items)
                top = stack[-1] if stack else None
                if top is not None:
                    top.commas += 1
                    lim = top.limit
                    if lim is not None and top.commas >= lim.limit:
                        param = top.param()
                        raise InvalidRequestError(f"too many {lim.what} in '{param}': more than {lim.limit}, the "
                                                  f"limit set by {lim.key}", param=param, code="limit_exceeded")
                    top.key = None
            elif c == _COLON:
                top = stack[-1] if stack else None
                if top is not None and not top.is_array:
                    top.key = _key(last[1:-1]) if last is not None and len(last) <= _KEY_MAX + 2 else None
            elif c in (_OPEN_OBJ, _OPEN_ARR):
                self.items += 1
                if self.items > self.max_items:
                    raise _too_many_items(self.max_items)
                if len(stack) >= self.max_depth:
                    raise InvalidRequestError(
                        f"request body is nested more than {self.max_depth} levels deep (arrays and objects), the "
                        f"limit set by limits.max_json_depth", code="limit_exceeded")
                stack.append(self._child(stack, c == _OPEN_ARR))
            elif stack:  # a closing bracket (extra ones are left to the parser)
                stack.pop()
        self._last = last

    def _child(self, stack: list[_Frame | None], is_array: bool) -> _Frame | None:
        """The frame of a container opening now (None when its path leads to no limited array)."""
        if not stack:
            return _Frame(is_array, (), None, None, self._limits.get(()) if is_array else None)
        parent = stack[-1]
        if parent is None:
            return None
        at = parent.commas if parent.is_array else parent.key
        path = self._children.get((parent.path, None if parent.is_array else parent.key))
        if path is None:
            return None
        return _Frame(is_array, path, parent, at, self._limits.get(path) if is_array else None)

    def _string_rest(self, data: bytes) -> int:
        """Continue a string begun in an earlier chunk; the index after its closing quote, or len(data)."""
        start = 0
        if self._escape:
            if not data:
                return 0
            start, self._escape = 1, False  # the first byte is escaped
        end = _string_end(data, start)
        closed = end >= 0
        partial = self._partial
        if partial is not None:
            piece = data[:end] if closed else data
            partial = partial + piece if len(partial) + len(piece) <= _KEY_MAX else None
        if closed:
            self._in_string = False
            self._last = b'"' + partial + b'"' if partial is not None else None
            self._partial = b""
            return end + 1
        self._escape = _odd_backslashes_before(data, len(data), start)
        self._partial = partial
        return len(data)


def _complete(tok: bytes) -> bool:
    """Whether a string token (starting with its quote) ends with its closing quote."""
    return len(tok) >= 2 and tok[-1] == _QUOTE and not _odd_backslashes_before(tok, len(tok) - 1, 1)


def _string_end(data: bytes, start: int) -> int:
    """The index of the quote closing a string whose text (not escaped at ``start``) starts at ``start``, or -1."""
    j = data.find(b'"', start)
    if j <= start or data[j - 1] != 0x5C:
        return j
    clean = _unescaped(data[start:])
    k = clean.find(b'"')
    return k if k < 0 else start + k


def _unescaped(text: bytes) -> bytes:
    """``text`` (the inside of a string, from a position that is not escaped) with every escaped backslash
    and escaped quote blanked out; same length, so offsets stay."""
    return text.replace(b"\\\\", b"\0\0").replace(b'\\"', b"\0\0")


def _odd_backslashes_before(data: bytes, j: int, start: int) -> bool:
    """Whether ``data[j]`` is escaped: an odd run of backslashes ends just before it (not counting before ``start``)."""
    seg = data[start:j]
    return (len(seg) - len(seg.rstrip(b"\\"))) % 2 == 1


def _key(raw: bytes | None) -> bytes | None:
    """A member name as UTF-8 (escapes decoded), or None when it was not kept or is not a string."""
    if raw is None or b"\\" not in raw:
        return raw
    try:
        out = json.loads(b'"' + raw + b'"')
    except ValueError:
        return None
    return out.encode("utf-8", "surrogatepass") if isinstance(out, str) else None


def _too_many_items(limit: int) -> InvalidRequestError:
    return InvalidRequestError(f"request body has more than {limit} JSON values (array elements and object "
                               f"members), the limit set by limits.max_json_items", code="limit_exceeded")


def json_shape(limits: LimitsConfig) -> JsonShape:
    """The checks every JSON body gets: depth and size in values."""
    return JsonShape(limits.max_json_depth, limits.max_json_items)


def _chat_arrays(limits: LimitsConfig) -> dict[tuple[str, ...], ArrayLimit]:
    return {
        ("messages",): ArrayLimit(limits.max_messages, "messages", "limits.max_messages"),
        ("messages", "*", "content"): ArrayLimit(limits.max_content_parts, "content parts",
                                                 "limits.max_content_parts"),
        ("tools",): ArrayLimit(limits.max_tools, "tools", "limits.max_tools"),
        ("functions",): ArrayLimit(limits.max_tools, "functions", "limits.max_tools"),
    }


def chat_shape(limits: LimitsConfig) -> JsonShape:
    """The checks of a chat completion body (and of an Anthropic Messages body): depth, values, and the lengths
    of its arrays."""
    return JsonShape(limits.max_json_depth, limits.max_json_items, _chat_arrays(limits))


def responses_shape(limits: LimitsConfig) -> JsonShape:
    """The checks of a Responses API body: the chat limits, with its ``input`` items counted as messages
    (``limits.max_messages``) and their ``content`` lists as content parts (``limits.max_content_parts``)."""
    return JsonShape(limits.max_json_depth, limits.max_json_items, {
        **_chat_arrays(limits),
        ("input",): ArrayLimit(limits.max_messages, "input items", "limits.max_messages"),
        ("input", "*", "content"): ArrayLimit(limits.max_content_parts, "content parts", "limits.max_content_parts"),
    })


def embeddings_shape(limits: LimitsConfig) -> JsonShape:
    """The checks of an embeddings body: depth, values, and the entries of its ``input`` list
    (``limits.max_embedding_inputs``)."""
    return JsonShape(limits.max_json_depth, limits.max_json_items, {
        ("input",): ArrayLimit(limits.max_embedding_inputs, "inputs", "limits.max_embedding_inputs"),
    })


def limits_of(request: Request) -> LimitsConfig:
    return gateway_state(request).limits


async def read_body(request: Request, shape: JsonShape) -> bytes:
    """The whole body, checked by ``shape`` chunk by chunk as it arrives (400 at the first broken limit,
    without reading the rest). The body's size and read time are bounded by the middleware (413, 408)."""
    chunks: list[bytes] = []
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            if len(chunk) <= SLICE_BYTES:
                shape.feed(chunk)
            else:
                view = memoryview(chunk)
                for i in range(0, len(chunk), SLICE_BYTES):
                    shape.feed(bytes(view[i:i + SLICE_BYTES]))
                    await asyncio.sleep(0)  # let other requests (and health probes) run between slices
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnectedError("the client disconnected while sending its request") from None
    return b"".join(chunks)


async def off_loop(size: int, limits: LimitsConfig, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``: in a worker thread when the body it works on is larger than ``limits.offload_bytes``."""
    if size > limits.offload_bytes:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
