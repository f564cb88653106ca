"""The package's layers point one way (every import statement, also those inside functions).

  model, parallel, data     import no other famjax package (data may use none of the model either)
  conversion                the model only
  workdir                   the model and conversion only
  training                  neither data, evaluation, inference nor the command-line edge
  evaluation, inference     not training
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "famjax"
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
ALLOWED = {  # package -> the other famjax packages it may import
    "model": set(),
    "parallel": set(),
    "data": set(),
    "conversion": {"model"},
    "workdir": {"model", "conversion"},
    "training": {"model", "parallel", "conversion", "workdir"},
    "inference": {"model"},
    "evaluation": {"model", "conversion", "workdir", "data", "inference"},
}


def famjax_imports(path: Path) -> set[str]:
  """The famjax packages (or top-level modules) a file imports, as their first name after famjax."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "famjax"]
    for name in names:
      parts = name.split(".")
      if parts[0] == "famjax" and len(parts) > 1:
        out.add(parts[1])
  return out


def test_every_package_has_a_rule():
  assert set(PACKAGES) == set(ALLOWED), "add the new package to ALLOWED with the layers it may use"


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_the_layers_below(package):
  bad = {}
  for path in sorted((ROOT / package).rglob("*.py")):
    above = famjax_imports(path) - ALLOWED[package] - {package}
    if above:
      bad[str(path.relative_to(ROOT.parent))] = sorted(above)
  assert not bad, f"imports above the {package} layer: {bad}"
