"""Builds the demo model's corpus: the Python 3.11 documentation (reStructuredText sources) from
Debian's `python3.11-doc` package, licensed under the PSF License Version 2 (code examples under
the Zero-Clause BSD licence); see the package's copyright file.

    python benchmarks/demo_model/corpus.py --out .corpus      # needs apt (Debian's registry)

Writes train.txt, valid.txt and corpus.json (source, licence, split, sizes) to --out. The split
is by file: every VALID_EVERY-th file in sorted order is held out."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
VALID_EVERY = 40
_UNDERLINE = re.compile(r"^([=\-~^\"'`*+#.:_])\1{2,}\s*$")


def fetch(workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True, capture_output=True)
    deb = next(workdir.glob(f"{PACKAGE}_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(workdir / "x")], check=True)
    return workdir / "x" / SOURCES


def clean(text: str) -> str:
    """reST to plain prose and code: drop section underlines, directives, comments, field lists
    and inline role markup; keep paragraphs and examples."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if _UNDERLINE.match(stripped) or stripped.startswith(".. ") or stripped.startswith(":"):
            continue
        line = re.sub(r":\w+(?::\w+)?:`~?([^`<]+?)(?:\s*<[^>]+>)?`", r"\1", line)
        line = line.replace("``", "")
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sources", type=Path, help="an extracted _sources folder (skips apt)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sources = args.sources or fetch(Path(tmp))
        files = sorted(sources.rglob("*.rst.txt"))
        train, valid = [], []
        for i, path in enumerate(files):
            (valid if i % VALID_EVERY == 0 else train).append(
                clean(path.read_text(errors="replace"))
            )
        valid_names = [
            str(f.relative_to(sources)) for i, f in enumerate(files) if i % VALID_EVERY == 0
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.txt").write_text("\n\n".join(train))  # documents end "\n": 3 newlines
    (args.out / "valid.txt").write_text("\n\n".join(valid))
    manifest = {
        "source": f"Debian package {PACKAGE} (3.11.2-6+deb12u8), {SOURCES}/**/*.rst.txt",
        "licence": "PSF License Version 2 (documentation); Zero-Clause BSD (code examples)",
        "split": f"by file, sorted paths: every {VALID_EVERY}th file held out for validation",
        "valid_files": valid_names,
        "train_chars": sum(map(len, train)), "valid_chars": sum(map(len, valid)),
    }  # fmt: skip
    (args.out / "corpus.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps({k: v for k, v in manifest.items() if k != "valid_files"}, indent=2))


if __name__ == "__main__":
    main()
