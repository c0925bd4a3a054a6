"""The package layout holds: no package imports another's private modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "node" / "tessera"


def cross_private_imports(root: Path) -> list[str]:
    """Imports of `tessera.<other>._private` (or its private names) under `root`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("").parts
        own = rel[1] if len(rel) > 2 else ""
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            parts = node.module.split(".")
            if parts[0] != "tessera" or len(parts) < 2 or parts[1] == own:
                continue
            names = [a.name for a in node.names]
            private_module = any(p.startswith("_") for p in parts[2:])
            private_name = any(n.startswith("_") and not n.startswith("__") for n in names)
            if private_module or private_name:
                found.append(f"{'/'.join(rel)}.py:{node.lineno} from {node.module} "
                             f"import {', '.join(names)}")
    return found


def test_no_package_imports_another_packages_private_modules() -> None:
    assert cross_private_imports(ROOT) == []


def test_a_planted_private_import_is_reported(tmp_path: Path) -> None:
    pkg = tmp_path / "tessera" / "api"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from tessera.api._own import x\n")
    (pkg / "_bad.py").write_text("def f():\n    from tessera.pki._node import NodeCertificates\n")
    found = cross_private_imports(tmp_path / "tessera")
    assert len(found) == 1 and "tessera.pki._node" in found[0]
