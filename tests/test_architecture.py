"""The package's shape: imports form no circle, modules stay small, and bad input has one type."""

import ast
import importlib
import inspect
import pathlib
import pkgutil

import slw_jax
from slw_jax import errors

PACKAGE = pathlib.Path(slw_jax.__file__).parent
MAX_MODULE_LINES = 600
MAX_TRAINER_LINES = 410  # The "about 400": the loop, with the setup that wires it.
# Exceptions that are not bad input: the run failed, or a save did, after it started.
NOT_INPUT_ERRORS = {"SaveError", "SyncError"}  # A full disk; a bucket failing at the end.


def import_graph() -> dict[str, set[str]]:
  """Module -> the package modules it imports anywhere in its file (deferred imports too: an
  import inside a function closes a circle just the same, only later)."""
  graph = {}
  for path in sorted(PACKAGE.glob("*.py")):
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == "slw_jax":
        deps |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slw_jax."):
        deps.add(node.module.split(".")[1])
      elif isinstance(node, ast.Import):
        deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("slw_jax.")}
    graph[path.stem] = deps - {path.stem}
  return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
  state, path = {}, []

  def visit(module):
    state[module] = "open"
    path.append(module)
    for dep in sorted(graph.get(module, ())):
      if state.get(dep) == "open":
        return path[path.index(dep):] + [dep]
      if dep not in state and (circle := visit(dep)):
        return circle
    state[module] = "done"
    path.pop()
    return None

  for module in sorted(graph):
    if module not in state and (circle := visit(module)):
      return circle
  return None


def test_the_import_graph_has_no_circle():
  assert find_circle(import_graph()) is None, " -> ".join(find_circle(import_graph()))


def test_the_circle_finder_finds_a_circle():
  assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_errors_imports_nothing_from_the_package():
  assert import_graph()["errors"] == set()


def test_no_module_is_over_600_lines_and_the_trainer_is_the_loop():
  lines = {p.stem: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
  assert {m: n for m, n in lines.items() if n > MAX_MODULE_LINES} == {}
  assert lines["trainer"] <= MAX_TRAINER_LINES


def test_every_error_class_of_the_package_is_input_or_named_internal():
  """A new `...Error` must say which it is: bad input (an InputError, one line at the command
  line) or not (listed here, and it keeps its traceback)."""
  found = {}
  for info in pkgutil.iter_modules([str(PACKAGE)]):
    module = importlib.import_module(f"slw_jax.{info.name}")
    for name, value in vars(module).items():
      if (inspect.isclass(value) and issubclass(value, Exception) and name.endswith("Error")
          and value.__module__ == module.__name__):
        found[name] = value
  assert "ConfigError" in found and "CorpusError" in found  # The walk sees the package.
  unsorted = {name for name, cls in found.items()
              if not issubclass(cls, errors.InputError) and name not in NOT_INPUT_ERRORS}
  assert unsorted == set()
