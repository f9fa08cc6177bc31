"""Prints a fresh codec key: ``python -m codec.keys [KEY_ID]``.

The output is the JSON entry to add to ``CB_CODEC_KEYS`` (key id -> base64 of 32 random bytes);
the key is printed once and stored nowhere.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from codec.aesgcm import KEY_ID_PATTERN, new_key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m codec.keys", description=__doc__)
    parser.add_argument("key_id", nargs="?",
                        help="the new key's id (default: k<today>, e.g. k20250131)")
    args = parser.parse_args(argv)
    key_id = args.key_id or f"k{datetime.now(UTC):%Y%m%d}"
    if not KEY_ID_PATTERN.match(key_id):
        parser.error(f"a key id must match {KEY_ID_PATTERN.pattern}")
    print(json.dumps({key_id: new_key()}))


if __name__ == "__main__":
    main()
