"""How the package's modules depend on each other, read from their source (ast): imports point
down only, from the entry points (`cli`) to the tools (`tools`) to the serving libraries; no
module reaches into another's private names; the client library stays torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "python_backend"
PACKAGE = SOURCE / "qwen3vl"
SHELLS = sorted(ROOT.glob("model_repository/*/1/model.py"))   # serving, like the package's backend/
SCRIPTS = sorted(ROOT.glob("bench/*.py"))                     # tools that live outside the package


@dataclass(frozen=True)
class Import:
    importer: str  # a module's dotted name, or a script's path in the repository
    target: str    # what is imported, dotted in full: a module, or module.name
    line: int

    def of(self, module: str) -> bool:
        """Whether this imports `module` or something inside it."""
        return self.target == module or self.target.startswith(module + ".")

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, importer: str, package: str | None = None) -> list[Import]:
    """Every import statement in the file, relative ones resolved against `package` (the package
    the module is in)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(importer, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            found += [Import(importer, f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def package_imports() -> list[Import]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found += imports_of(path, module, package)
    return found


def script_imports(paths: list[Path]) -> list[Import]:
    return [i for path in paths for i in imports_of(path, str(path.relative_to(ROOT)))]


def in_layer(importer: str, *layers: str) -> bool:
    return any(importer == layer or importer.startswith(layer + ".") for layer in layers)


def test_the_walk_sees_the_imports():
    """Guards the tests below against reading nothing: known imports, relative ones included."""
    found = {(i.importer, i.target) for i in package_imports()}
    assert ("qwen3vl.cli.serve", "qwen3vl.launch.tritonserver.server_env") in found
    assert ("qwen3vl.tools.shapes.train", "qwen3vl.tools.make_checkpoint.write_json") in found
    assert ("qwen3vl.openai.triton", "qwen3vl.client.inputs.build_inputs") in found
    assert any(i.of("qwen3vl.backend") for i in script_imports(SHELLS))


def test_nothing_outside_cli_imports_it():
    """`cli` holds the entry points: tools, libraries and the model shells never import them."""
    bad = [i for i in package_imports() + script_imports(SHELLS + SCRIPTS)
           if i.of("qwen3vl.cli") and not in_layer(i.importer, "qwen3vl.cli")]
    assert not bad, "\n".join(map(str, bad))


def test_serving_never_imports_the_tools():
    """Serving modules (engine, model, encoder, disagg, backend, openai, client, launch, the
    leaves) and the model shells never import `tools`: a tool may use them, not the reverse."""
    bad = [i for i in package_imports() + script_imports(SHELLS)
           if i.of("qwen3vl.tools") and not in_layer(i.importer, "qwen3vl.cli", "qwen3vl.tools")]
    assert not bad, "\n".join(map(str, bad))


def test_no_private_name_is_imported_from_another_module():
    """A `_name` is its module's own: what another module needs is made public (or moved)."""
    def private(target: str) -> bool:
        return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in target.split("."))

    bad = [i for i in package_imports() + script_imports(SHELLS + SCRIPTS)
           if i.of("qwen3vl") and private(i.target)]
    assert not bad, "\n".join(map(str, bad))


def test_cli_holds_entry_points_and_every_script_names_a_main():
    names = {"qwen3vl-make-checkpoint", "qwen3vl-serve", "qwen3vl-client", "qwen3vl-bench", "qwen3vl-soak",
             "qwen3vl-openai", "qwen3vl-sizing", "qwen3vl-train-demo"}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == names

    def functions(path: Path) -> set[str]:
        return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}

    for name, target in scripts.items():
        module, _, function = target.partition(":")
        path = SOURCE.joinpath(*module.split(".")).with_suffix(".py")
        assert function in functions(path), f"{name}: {target} is not a function"
    for path in (PACKAGE / "cli").glob("*.py"):
        assert "main" in functions(path), f"{path.name} in cli/ is not an entry point"


def test_the_client_library_does_not_import_torch():
    """A client machine needs tritonclient and numpy, not torch (nor transformers); the OpenAI
    service decodes data URLs with qwen3vl.data_url."""
    code = ("import sys, qwen3vl.client, qwen3vl.client.cancel, qwen3vl.cli.client, qwen3vl.data_url; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
