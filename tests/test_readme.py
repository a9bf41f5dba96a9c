"""README.md's Python: every snippet parses, and every ``tvmq.<name>`` it mentions exists
after a bare ``import tvmq`` (the snippets that build or need a board are not run here;
tests/test_compiler.py and tests/test_rpc.py run the same calls)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
# tvmq.compile(...), `tvmq.pruning.MagnitudePruner`, tvmq.rpc.connect(...): dotted names only.
NAMES = sorted(set(re.findall(r"\btvmq(?:\.[A-Za-z_]\w*)+", README)))


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 2 and "tvmq.compile" in NAMES


def test_every_python_snippet_parses():
    for block in BLOCKS:
        ast.parse(block)


def test_every_tvmq_name_in_the_readme_exists_after_import_tvmq():
    # A fresh interpreter: what `import tvmq` alone gives, not what other tests imported.
    code = (
        "import sys, tvmq\n"
        "missing = []\n"
        "for name in sys.argv[1:]:\n"
        "    obj = tvmq\n"
        "    try:\n"
        "        for part in name.split('.')[1:]:\n"
        "            obj = getattr(obj, part)\n"
        "    except AttributeError:\n"
        "        missing.append(name)\n"
        "print(' '.join(missing))\n"
    )
    # Names of files and folders (tvmq/cpu_schedule.py is written as a path, not a name).
    names = [n for n in NAMES if not re.search(rf"{re.escape(n)}[/\w]*\.(py|json|md)\b", README)]
    result = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
