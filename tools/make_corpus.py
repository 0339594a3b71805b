"""Build the bundled English + Chinese corpus from Debian's fortune cookie packages.

    apt-get download fortunes fortunes-min fortunes-zh
    python tools/make_corpus.py fortunes_*.deb fortunes-min_*.deb fortunes-zh_*.deb
    python tools/train_tokenizer.py

Writes flagscale/data/corpus/corpus.jsonl.gz: one {"text": ..., "source": "<package>/<file>"} per
fortune, files in the order below, fortunes in file order, ANSI colour codes removed. The gzip
header carries no name or time, so the same packages always give the same bytes.
Licences: fortunes and fortunes-min are BSD (Regents of the University of California), fortunes-zh
is GPL-3.0+; see flagscale/data/corpus/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "flagscale/data/corpus/corpus.jsonl.gz"

# English files chosen for general, inoffensive prose; ascii-art and the multi-lingual
# translate-me/disclaimer files are left out because they teach the tokenizer little.
FILES = {
    "fortunes-min": ["fortunes", "literature", "riddles"],
    "fortunes": ["art", "computers", "cookie", "debian", "definitions", "education", "food",
                 "goedel", "humorists", "kids", "law", "linux", "linuxcookie", "love", "magic",
                 "medicine", "news", "paradoxum", "people", "pets", "platitudes", "science",
                 "songs-poems", "sports", "startrek", "tao", "wisdom", "work", "zippy"],
    "fortunes-zh": ["tang300", "song100", "chinese"],
}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def fortunes_of(path: Path) -> list[str]:
    """The fortunes of one strfile source: entries separated by lines holding only '%'."""
    text = _ANSI.sub("", path.read_text(encoding="utf-8"))
    entries = re.split(r"^%\s*$", text, flags=re.MULTILINE)
    return [e.strip("\n").rstrip() for e in entries if e.strip()]


def extract(deb: Path, into: Path) -> str:
    """Unpack a .deb with dpkg-deb; returns its package name."""
    package = subprocess.run(["dpkg-deb", "--field", str(deb), "Package"], check=True,
                             capture_output=True, text=True).stdout.strip()
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into / package)], check=True)
    return package


def main(argv: list[str] | None = None) -> int:
    """Extract the packages and write the corpus."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("debs", nargs="+", type=Path,
                        help="the fortunes, fortunes-min and fortunes-zh .deb files")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        packages = {extract(deb, root) for deb in args.debs}
        missing = set(FILES) - packages
        if missing:
            sys.exit(f"missing packages: {', '.join(sorted(missing))}")
        buffer = io.BytesIO()
        count = 0
        for package, names in FILES.items():
            for name in names:
                path = root / package / "usr/share/games/fortunes" / name
                for text in fortunes_of(path):
                    record = {"text": text, "source": f"{package}/{name}"}
                    buffer.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
                    count += 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.output.with_name(args.output.name + ".tmp")
    with open(tmp_out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                   mtime=0, compresslevel=9) as gz:
        gz.write(buffer.getvalue())
    tmp_out.replace(args.output)
    print(f"wrote {args.output}: {count} documents, {len(buffer.getvalue()) / 1e6:.2f} MB "
          f"uncompressed, {args.output.stat().st_size / 1e6:.2f} MB gzipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
