"""The file maps (tables whose first cell names files: README.md, docs/*.md) name files that exist: a module moved
or removed leaves no row behind (docs/serving.md listed `engine/batch_invariant.py` long after it had moved)."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASES = ("", "ringlinear")  # docs name modules from the root or from inside the package


def _rows():
    """(doc, line number, [paths]) for table rows whose first cell is backticked names ending in .py/.md/.sh or /."""
    for doc in ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]:
        with open(os.path.join(ROOT, doc)) as f:
            for n, line in enumerate(f, 1):
                if not line.startswith("| `"):
                    continue
                names = re.findall(r"`([^`]+)`", line.split("|")[1])
                if names and all(re.fullmatch(r"[\w./-]+(\.py|\.md|\.sh|/)", x) for x in names):
                    yield doc, n, names


def _exists(name, folder):
    cands = [os.path.join(b, name) for b in BASES] + ([os.path.join(folder, name)] if folder else [])
    return next((c for c in cands if os.path.exists(os.path.join(ROOT, c))), None)


def test_every_file_map_row_names_existing_files():
    rows, missing = list(_rows()), []
    assert len(rows) > 50, len(rows)  # the maps were found
    for doc, n, names in rows:
        folder = None
        for name in names:  # a later bare name lives beside the first ("`engine/llm.py`, `async_engine.py`")
            found = _exists(name, folder)
            if found is None:
                missing.append(f"{doc}:{n}: {name}")
            elif folder is None:
                folder = os.path.dirname(found)
    assert not missing, "\n".join(missing)
