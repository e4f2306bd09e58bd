"""The documentation against the code: README.md and docs/*.md.

- docs/configuration.md documents every key of `config_lib.base_config()`, no key that is gone,
  and each default as the code has it.
- README.md stays a guide (at most 250 lines), and every relative link (and anchor into our own
  pages) resolves.
- Every command shown (in ```bash blocks, or inline as `python ...` / `make ...`) is either run
  by a test or benchmark named in COMMANDS below, or visibly marked as needing hardware
  (`# needs: GPU`, `# needs: TPU`, `# needs: cluster`; docs/README.md says what they mean).
- docs/architecture.md's module map names every module of slw_jax/.
"""

import ast
import dataclasses
import re
import warnings

from ml_collections import config_dict

from conftest import REPO
from slw_jax import config_lib

README = REPO / "README.md"
DOCS = REPO / "docs"
CONFIGURATION = DOCS / "configuration.md"
ARCHITECTURE = DOCS / "architecture.md"
MAX_README_LINES = 250

# Command prefix -> the test or benchmark that runs it. A shown command is matched by its longest
# prefix here (whole words: "make test" does not match "make test-fast"), after `.venv/bin/python`
# is read as `python`. Each file must exist and name the command's module, script or make target,
# so an entry cannot outlive what it points at; each entry must be used by some shown command.
COMMANDS = {
    # Both run the target's own recipe (install stamps taken as done, PY replaced) and check what
    # it sets: make train never forces the CPU, make test always does.
    "make train": "tests/test_hardware.py",
    "make test": "tests/test_hardware.py",
    "make test-fast": "tests/test_hardware.py",
    "python -m slw_jax.main": "tests/test_trainer.py",
    "python -m slw_jax.main --config=configs/tiny.py --workdir=runs/adaptive "
    "--config.pacing.kind=adaptive": "tests/faults/test_kill_resume.py",
    "python -m slw_jax.main --config=configs/tiny.py --workdir=runs/tiny "
    "--config.log.wandb_project=slw": "tests/test_wandb_log.py",
    "python -m slw_jax.report runs/tiny --out=reports/tiny --wandb": "tests/test_wandb_log.py",
    "python -m slw_jax.prepare --config=configs/tiny.py --config.data.source=hf:/data/owt":
        "tests/test_hf_source.py",
    "python -m slw_jax.main --config=configs/tiny.py --workdir=runs/tiny "
    "--config.data.dir=s3://my-bucket/data/pystdlib_byte": "tests/test_staging.py",
    # A whole run in a bucket of the local S3 server (and the GCS emulator), killed and resumed.
    "python -m slw_jax.main --config=configs/tiny.py --workdir=s3://my-bucket/runs/tiny":
        "tests/faults/test_bucket_runs.py",
    "python -m slw_jax.plan": "tests/test_plan.py",
    "python -m slw_jax.plan --config=configs/gpt2_117m.py --memory": "benchmarks/memory_plan.py",
    "python -m slw_jax.plan --config=configs/gpt3_125m.py --compile_estimate":
        "benchmarks/compile_plan.py",
    "python -m slw_jax.plan --config.pacing.kind=adaptive": "tests/test_adaptive.py",
    # Every source and vocabulary form, on small corpora (files:, gpt2:, spm:, --train_spm).
    "python -m slw_jax.prepare": "tests/test_prepare.py",
    # Each task on small crafted files and on a trained tiny run.
    "python -m slw_jax.evaluate": "tests/test_evaluate.py",
    "python -m slw_jax.convert": "tests/test_convert.py",
    "python -m slw_jax.report": "tests/test_report.py",
    "python -m slw_jax.tune": "tests/test_tune.py",
    # The smoke preset, every stage, and --analyse; the full sweep is the study itself.
    "python experiments/stability/run.py": "tests/test_stability_study.py",
    "DEVICES_PER_PROCESS=4 launch/local.sh": "tests/test_multihost.py",
}
# Shown commands that no test runs yet (each is to get one; then move it to COMMANDS). Listed so
# that they are visible in every test run, never silently accepted.
NOT_RUN_BY_ANY_TEST = {
    "make setup": "only its ACCEL check runs (make -n setup ACCEL=rocm); the install does not",
}
NEEDS = re.compile(r"\bneeds:\s*(GPU|TPU|cluster)\b")
# Commands that only make sense with the hardware: they must carry a `needs:` marker.
HARDWARE_ONLY = re.compile(
    r"^(make \S+ .*ACCEL=(cuda|tpu)|sbatch |kubectl |launch/(tpu_vm\.sh|slurm\.sbatch)|"
    r"python -m slw_jax\.main --config=configs/(gpt2_117m|gpt2_1p5b|gpt3_125m)\.py)")
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# An inline code span is a command when it starts so (a bare script name such as `launch/local.sh`
# is a file named in prose; with arguments it is a command).
INLINE_COMMAND = re.compile(r"^(\.venv/bin/python |python |make |sbatch |kubectl |[A-Z_]+=\S* |"
                            r"launch/\S+ )")


def pages():
  return [README, *sorted(DOCS.glob("*.md"))]


def name(path) -> str:
  return str(path.relative_to(REPO))


# ----- parsing ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Block:
  language: str
  first_line: int  # 1-based line number of the first line inside the fence.
  lines: list[str]


def split_fences(text: str) -> tuple[list[Block], list[tuple[int, str]]]:
  """The fenced blocks of a markdown text, and its other lines as (line number, text)."""
  blocks, prose, block = [], [], None
  for number, line in enumerate(text.splitlines(), start=1):
    fence = re.match(r"^\s*```(.*)$", line)
    if fence and block is None:
      block = Block(fence.group(1).strip(), number + 1, [])
    elif fence:
      blocks.append(block)
      block = None
    elif block is not None:
      block.lines.append(line)
    else:
      prose.append((number, line))
  assert block is None, f"a fence opened at line {block.first_line - 1} is never closed"
  return blocks, prose


def without_code_spans(line: str) -> str:
  return re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), line)


def flat_keys(node, prefix="") -> dict:
  """{"a.b": value} for every leaf of a ConfigDict."""
  flat = {}
  for key, value in node.items():
    if isinstance(value, config_dict.ConfigDict):
      flat.update(flat_keys(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def documented_keys() -> dict[str, tuple[str, int]]:
  """Key -> (its default cell, line) from the `| key | default | meaning |` tables."""
  _, prose = split_fences(CONFIGURATION.read_text())
  rows, in_table = {}, False
  for number, line in prose:
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    if not line.startswith("|"):
      in_table = False
    elif cells[:3] == ["key", "default", "meaning"]:
      in_table = True
    elif in_table and not set(cells[0]) <= set("-: "):
      key = re.fullmatch(r"`([a-z0-9_.]+)`", cells[0])
      assert key, f"docs/configuration.md:{number}: the first cell must be one `dotted.key`"
      assert key.group(1) not in rows, f"docs/configuration.md:{number}: {key.group(1)} twice"
      rows[key.group(1)] = (cells[1], number)
  return rows


def default_matches(cell: str, value) -> bool:
  """An unset default reads "unset...", an empty string "empty..."; any other is one literal
  in backticks, equal to the code's (strings unquoted)."""
  if value is None:
    return cell.startswith("unset")
  if value == "":
    return cell.startswith("empty")
  literal = re.fullmatch(r"`([^`]*)`", cell)
  if not literal:
    return False
  if isinstance(value, str):
    return literal.group(1) == value
  try:
    parsed = ast.literal_eval(literal.group(1))
  except (ValueError, SyntaxError):
    return False
  return type(parsed) is type(value) and parsed == value


def slug(heading: str) -> str:
  """GitHub's anchor of a heading."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def anchors(path) -> set[str]:
  _, prose = split_fences(path.read_text())
  seen, found = {}, set()
  for _, line in prose:
    heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if heading:
      base = slug(heading.group(1))
      found.add(base if base not in seen else f"{base}-{seen[base]}")
      seen[base] = seen.get(base, 0) + 1
  return found


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(path):
  """(line, target) of every link and image in the page's prose (code spans left out)."""
  _, prose = split_fences(path.read_text())
  for number, line in prose:
    for target in LINK.findall(without_code_spans(line)):
      if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", target):  # Not http:, mailto:, #anchor.
        yield number, target
      elif target.startswith("#"):
        yield number, path.name + target


@dataclasses.dataclass
class Command:
  where: str
  text: str  # Normalized: one line, single spaces, `.venv/bin/python` read as `python`.
  marker: str | None


def normalize(command: str) -> str:
  command = " ".join(command.split())
  return "python " + command[len(".venv/bin/python "):] if command.startswith(
      ".venv/bin/python ") else command


def shell_commands(block: Block, page: str):
  """The commands of a shell block. A `needs:` marker on a comment line covers the commands
  after it up to the next blank line; one in a command's trailing comment covers that one."""
  marker, pending, start = None, "", None
  for offset, line in enumerate(block.lines):
    if pending:
      line = pending + " " + line.strip()
    else:
      start = block.first_line + offset
    if line.rstrip().endswith("\\"):
      pending = line.rstrip()[:-1]
      continue
    pending, stripped = "", line.strip()
    if not stripped:
      marker = None
    elif stripped.startswith("#"):
      found = NEEDS.search(stripped)
      marker = found.group(1) if found else marker
    else:
      command, *comment = re.split(r"\s+#(?:\s|$)", stripped, maxsplit=1)
      found = NEEDS.search(comment[0]) if comment else None
      yield Command(f"{page}:{start}", normalize(command), found.group(1) if found else marker)


def inline_commands(prose, page: str):
  for number, line in prose:
    for match in re.finditer(r"`([^`]+)`", line):
      if INLINE_COMMAND.match(match.group(1)):
        after = NEEDS.match(line[match.end():].lstrip(" (")) if line[match.end():] else None
        yield Command(f"{page}:{number}", normalize(match.group(1)),
                      after.group(1) if after else None)


def shown_commands() -> list[Command]:
  commands = []
  for path in pages():
    blocks, prose = split_fences(path.read_text())
    for block in blocks:
      assert block.language, (f"{name(path)}:{block.first_line - 1}: a fenced block must name "
                              "its language (bash for commands, text for output)")
      if block.language in SHELL_LANGUAGES:
        commands += shell_commands(block, name(path))
    commands += inline_commands(prose, name(path))
  return commands


def longest_prefix(command: str, table) -> str | None:
  matches = [p for p in table if command == normalize(p) or command.startswith(normalize(p) + " ")]
  return max(matches, key=len, default=None)


def runs(text: str, prefix: str) -> bool:
  """Whether a test or benchmark's source names the module, script or make target of `prefix`."""
  words = prefix.split()
  while re.match(r"^[A-Z_]+=", words[0]):  # Environment settings before the command.
    words = words[1:]
  if prefix.startswith("python -m slw_jax."):
    module = words[2].split(".", 1)[1]
    return (f"slw_jax.{module}" in text or
            re.search(rf"from slw_jax import \(?[^)\n]*\b{module}\b", text) is not None or
            (f'"{module}"' in text and "slw_jax" in text))
  if prefix.startswith("make "):
    return re.search(r"[\"']make[\"']", text) is not None and f'"{words[1]}"' in text
  script = words[1] if words[0] == "python" else words[0]
  parent, _, base = script.rpartition("/")
  return script in text or (base in text and parent.rsplit("/", 1)[-1] in text)


# ----- 1. every config key documented, no stale one -----------------------------------------------

def test_configuration_documents_every_key_and_no_other():
  code = set(flat_keys(config_lib.base_config()))
  documented = set(documented_keys())
  missing, stale = sorted(code - documented), sorted(documented - code)
  assert not missing and not stale, (
      f"docs/configuration.md lacks {len(missing)} key(s) of base_config(): {missing}; "
      f"documents {len(stale)} key(s) base_config() no longer has: {stale}")


def test_configuration_shows_each_default_as_the_code_has_it():
  code = flat_keys(config_lib.base_config())
  wrong = [f"line {line}: {key} shows {cell!r}, the code has {code[key]!r}"
           for key, (cell, line) in documented_keys().items()
           if key in code and not default_matches(cell, code[key])]
  assert not wrong, "docs/configuration.md defaults:\n" + "\n".join(wrong)


# ----- 2. a short README, links that resolve ---------------------------------------------

def test_readme_is_a_guide_of_at_most_250_lines():
  lines = len(README.read_text().splitlines())
  assert lines <= MAX_README_LINES, (f"README.md has {lines} lines (at most {MAX_README_LINES}): "
                                     "move reference material into docs/")


def test_every_relative_link_points_at_a_file_that_exists():
  broken = []
  ours = {p.resolve() for p in pages()}
  for path in pages():
    for line, target in relative_links(path):
      file_part, _, anchor = target.partition("#")
      resolved = (path.parent / file_part).resolve()
      if not resolved.exists():
        broken.append(f"{name(path)}:{line}: {target} (no such file)")
      elif anchor and resolved in ours and anchor not in anchors(resolved):
        broken.append(f"{name(path)}:{line}: {target} (no heading #{anchor} there)")
  assert not broken, "broken links:\n" + "\n".join(broken)


# ----- 3. every command run by a test, or marked as needing hardware ------------------------------

def test_every_shown_command_is_run_by_a_test_or_marked_as_needing_hardware():
  commands = shown_commands()
  assert len(commands) > 20  # The parser found the commands.
  unmarked_hardware = [f"{c.where}: {c.text}" for c in commands
                       if c.marker is None and HARDWARE_ONLY.match(c.text)]
  assert not unmarked_hardware, ("commands that need hardware must be marked `# needs: GPU`, "
                                 "`TPU` or `cluster`:\n" + "\n".join(unmarked_hardware))
  unaccounted = [f"{c.where}: {c.text}" for c in commands
                 if c.marker is None and not longest_prefix(c.text, COMMANDS)
                 and not longest_prefix(c.text, NOT_RUN_BY_ANY_TEST)]
  assert not unaccounted, ("commands no test runs: add the test and name it in "
                           "tests/test_docs.py COMMANDS, or mark the command `# needs: ...` if "
                           "it needs hardware:\n" + "\n".join(unaccounted))
  pending = sorted({p for c in commands if c.marker is None and not longest_prefix(
      c.text, COMMANDS) for p in [longest_prefix(c.text, NOT_RUN_BY_ANY_TEST)] if p})
  if pending:
    warnings.warn("shown commands no test runs yet: " + "; ".join(
        f"{p} ({NOT_RUN_BY_ANY_TEST[p]})" for p in pending))


def test_each_command_entry_names_a_test_that_runs_it_and_is_used():
  commands = shown_commands()
  problems = []
  for prefix, runner in COMMANDS.items():
    path = REPO / runner
    if not path.is_file():
      problems.append(f"{prefix!r}: {runner} does not exist")
    elif not runs(path.read_text(), normalize(prefix)):
      problems.append(f"{prefix!r}: {runner} does not name the command's module or script")
    if not any(longest_prefix(c.text, COMMANDS) == prefix for c in commands if not c.marker):
      problems.append(f"{prefix!r}: no command shown in README.md or docs/ uses this entry")
  for prefix in NOT_RUN_BY_ANY_TEST:
    if not any(longest_prefix(c.text, NOT_RUN_BY_ANY_TEST) == prefix for c in commands):
      problems.append(f"{prefix!r} (NOT_RUN_BY_ANY_TEST): no longer shown; remove it")
  assert not problems, "\n".join(problems)


def test_the_parser_reads_markers_continuations_and_comments():
  block = Block("bash", 10, ["# needs: GPU. Two lines:", ".venv/bin/python -m slw_jax.main \\",
                             "    --config=configs/gpt2_117m.py", "", "make train   # comment",
                             "make setup ACCEL=cuda   # needs: GPU. Installs"])
  assert [(c.where, c.text, c.marker) for c in shell_commands(block, "X.md")] == [
      ("X.md:11", "python -m slw_jax.main --config=configs/gpt2_117m.py", "GPU"),
      ("X.md:14", "make train", None), ("X.md:15", "make setup ACCEL=cuda", "GPU")]
  assert longest_prefix("make test-fast", COMMANDS) == "make test-fast"  # Whole words:
  assert longest_prefix("make test", COMMANDS) == "make test"  # "make test" is not its prefix.
  assert longest_prefix("make tests", COMMANDS) is None


# ----- the module map -----------------------------------------------------------------------------

def test_the_module_map_names_every_module():
  text = ARCHITECTURE.read_text()
  missing = sorted(p.name for p in (REPO / "slw_jax").glob("*.py")
                   if f"`slw_jax/{p.name}`" not in text)
  assert not missing, f"docs/architecture.md's module map lacks: {missing}"
