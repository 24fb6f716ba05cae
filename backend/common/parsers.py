"""Request parsers with limits: JSON nested deeper than ``MAX_JSON_DEPTH`` is a clear 400.

Python's JSON decoder recurses per nesting level; a body of ``[[[[...`` would otherwise raise
``RecursionError`` here or in any code that walks the data later (serializers, error messages).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

MAX_JSON_DEPTH = 32


def json_depth(text: str | bytes) -> int:
    """The deepest nesting of arrays/objects in a JSON text: vectorised, no recursion, linear time.

    Brackets inside strings do not count; a quote is escaped when an odd run of backslashes
    precedes it. Works on UTF-8 bytes: ASCII bytes never occur inside multi-byte characters.
    """
    if isinstance(text, str):
        text = text.encode("utf-8", errors="replace")
    codes = np.frombuffer(text, dtype=np.uint8)
    if codes.size == 0:
        return 0
    index = np.arange(codes.size)
    backslash = codes == 92
    # Length of the run of backslashes ending at each position (0 where there is none).
    last_other = np.maximum.accumulate(np.where(backslash, -1, index))
    run = index - last_other
    escaped = np.zeros(codes.size, dtype=bool)
    escaped[1:] = run[:-1] % 2 == 1
    quotes = (codes == 34) & ~escaped
    outside = np.cumsum(quotes) % 2 == 0
    outside &= ~quotes
    opening = ((codes == 91) | (codes == 123)) & outside
    closing = ((codes == 93) | (codes == 125)) & outside
    return int(np.cumsum(opening.astype(np.int32) - closing.astype(np.int32)).max(initial=0))


def loads_bounded(text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses documents nested deeper than ``max_depth`` (ParseError, 400)."""
    if isinstance(text, bytes):
        try:
            text = text.decode(settings.DEFAULT_CHARSET)
        except UnicodeDecodeError:
            raise ParseError("the JSON body is not valid UTF-8") from None
    if json_depth(text) > max_depth:
        raise ParseError(f"the JSON body is nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ParseError(f"the JSON body is malformed: {exc}") from None


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser with a nesting limit; the body size is bounded by DATA_UPLOAD_MAX_MEMORY_SIZE."""

    def parse(self, stream, media_type=None, parser_context=None):
        if stream is None:
            return None
        return loads_bounded(stream.read())
