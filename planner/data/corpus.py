"""Text sources: the built-in corpus (no download), local files, and hub datasets by name.

`builtin` is the English text of Python's `pydoc_data.topics` (the language reference topics
that ship with every CPython): ~465k characters, ~110k tokens for a Llama-style tokenizer.
`builtin-docs` is a second built-in corpus (standard-library docstrings) for unseen-text checks.
"""

from __future__ import annotations

import json
from pathlib import Path

from planner.errors import BadDataset

BUILTIN = "builtin"
BUILTIN_DOCS = "builtin-docs"   # a second, different built-in corpus: stdlib docstrings
_DOC_MODULES = ("abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
                "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
                "enum", "fractions", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
                "html.parser", "http.client", "http.server", "imaplib", "inspect", "ipaddress", "itertools", "json",
                "locale", "logging", "mailbox", "mimetypes", "multiprocessing", "netrc", "numbers", "operator",
                "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
                "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
                "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "subprocess",
                "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
                "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
                "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo")
HUB = {  # name -> (dataset id, config, split, text field)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text"),
}


def builtin_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def builtin_docs_text() -> str:
    """Docstrings of ~100 standard-library modules and their public members: English technical
    prose that shares no text with `builtin` (the language reference), for checking that a plan
    searched on one corpus did not overfit it."""
    import importlib
    import inspect

    parts: list[str] = []
    for name in _DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            parts.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                parts += [inspect.getdoc(m) or "" for k, m in sorted(vars(obj).items())
                          if not k.startswith("_") and callable(m)]
    seen: set[str] = set()
    return "\n\n".join(p for p in parts if len(p) > 40 and not (p in seen or seen.add(p)))


def _file_text(path: Path, field: str) -> str:
    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ".md"):
            return path.read_text(encoding="utf-8", errors="replace")
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return "\n\n".join(str(r[field]) for r in rows)
        if suffix == ".parquet":
            import pandas as pd

            return "\n\n".join(pd.read_parquet(path, columns=[field])[field].astype(str))
    except KeyError:
        raise BadDataset(f"{path} has rows without a {field!r} field: pass --text-field NAME") from None
    except (ValueError, OSError) as e:
        raise BadDataset(f"cannot read {path} ({str(e).splitlines()[0][:120]}): check the file") from None
    raise BadDataset(f"unsupported dataset file type {suffix!r}: use .txt, .jsonl or .parquet")


def _hub_text(name: str, max_chars: int) -> str:
    ds_id, config, split, field = HUB[name]
    try:
        import datasets
    except ImportError:
        raise BadDataset(f"dataset {name!r} needs the `datasets` package and a network: pip install datasets, "
                         "or use --dataset builtin or a local file") from None
    try:
        ds = datasets.load_dataset(ds_id, config, split=split, streaming=True)
        parts, total = [], 0
        for row in ds:
            parts.append(row[field])
            total += len(row[field])
            if total >= max_chars:
                break
    except Exception as e:  # offline, gated, renamed: all end the same way for the user
        raise BadDataset(f"cannot fetch hub dataset {name!r} ({type(e).__name__}): no network? "
                         "use --dataset builtin or a local .txt/.jsonl/.parquet file") from None
    return "\n\n".join(parts)


def load_text(dataset: str, text_field: str = "text", max_chars: int = 4_000_000) -> str:
    if dataset == BUILTIN:
        return builtin_text()
    if dataset == BUILTIN_DOCS:
        return builtin_docs_text()
    if dataset in HUB:
        return _hub_text(dataset, max_chars)
    path = Path(dataset).expanduser()
    if path.is_file():
        text = _file_text(path, text_field)
        if not text.strip():
            raise BadDataset(f"{dataset} contains no text")
        return text[:max_chars]
    raise BadDataset(f"unknown dataset {dataset!r}: use 'builtin', 'builtin-docs', a local .txt/.jsonl/.parquet file, "
                     f"or one of {', '.join(HUB)} (needs a network)")
